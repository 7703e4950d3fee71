"""FHIR R4 storage for a hospital node, and the mappers that feed it from the hospital's own
systems. Only this package knows HL7 v2 or DICOM.

Two rooms: :mod:`fhir_adapters.store` (the FHIR repository: store, search, search parameters,
index tables, resource validation, codes, JSON) and the mappers, pure functions from a
hospital format to FHIR resources: :mod:`~fhir_adapters.hl7v2` (ORU^R01 from the LIS),
:mod:`~fhir_adapters.dicom` (DICOM/DICOMweb studies from the PACS), :mod:`~fhir_adapters.lis_csv`
(CSV exports) and :mod:`~fhir_adapters.ucum` (units). Beneath them
:mod:`~fhir_adapters.definitions`, the R4 definitions (resource types, SearchParameters, the
Patient compartment) as data, standard library only (its lookups raise KeyError). Every other
error is an :class:`~fhir_adapters.errors.AdapterError`.

Imports: the mappers may import the store, never the reverse; the package imports
:mod:`consent.pseudonym` (the resident-identity system) and nothing of ``ledger``, ``exchange``
or ``node``.
"""
