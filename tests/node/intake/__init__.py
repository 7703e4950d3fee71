"""Tests of node.intake: MLLP (HL7 v2), CSV import and DICOM (DICOMweb sync, import, refusals)."""
