"""The hospital node: the ``hrx`` command line, configuration, and (as it grows) the Flask app
factory with one blueprint per concern. This is the only package that knows Flask; it wires the
exchange, consent, ledger and FHIR adapter packages together."""
