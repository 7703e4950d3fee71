"""The FHIR R4 API: a transport-free router of every interaction (:mod:`.interactions`, over
:mod:`.messages`), its HTTP side (:mod:`.rest`), batch and transaction Bundles that call the
router directly (:mod:`.bundles`), the CapabilityStatement (:mod:`.capability`) and the limits
requests are held to (:mod:`.limits`)."""
