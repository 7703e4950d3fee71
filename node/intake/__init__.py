"""The adapters' processes, which feed the node from the hospital's own systems: HL7 v2 lab
results (:mod:`.hl7`) over MLLP (:mod:`.mllp`), the PACS's studies over DICOMweb or from DICOM
files (:mod:`.dicom`), CSV exports (:mod:`.csv`), and one quarantine for what none of them
could take in (:mod:`.quarantine`). The mapping itself is pure and lives in
:mod:`fhir_adapters`.

May import: the rooms below it (``services`` and down); never ``flows``, ``ops``, ``web``,
``cli`` or ``demo``."""
