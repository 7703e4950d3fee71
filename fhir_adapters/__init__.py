"""FHIR R4 storage and validation for a hospital node, and the importers that feed it from the
hospital's own systems: HL7 v2 ORU^R01 from the LIS, DICOM/DICOMweb from the PACS, and CSV
exports. Only this package knows HL7 v2 or DICOM."""
