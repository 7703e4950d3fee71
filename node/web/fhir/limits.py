"""The limits the FHIR API holds requests to, in one place: the server enforces them and the
CapabilityStatement states them from the same constants."""

MAX_BODY_BYTES = 8 * 1024 * 1024  # a FHIR request body (413 beyond; the app allows more)
MAX_ENTRIES = 200  # of a batch or transaction: each entry is a request (and an AuditEvent)
