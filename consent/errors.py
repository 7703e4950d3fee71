"""The one error type of :mod:`consent`: a consent that cannot stand, with where it is wrong.

The node answers it as a 422 OperationOutcome whose issue points at ``expression`` (a FHIRPath
such as ``Consent.provision.period``); the portal shows its message next to the form.
"""

from __future__ import annotations


class ConsentError(ValueError):
    """A FHIR Consent, or a request about one, that breaks the consortium's consent rules."""

    def __init__(self, message: str, expression: str | None = None) -> None:
        super().__init__(message)
        self.expression = expression
