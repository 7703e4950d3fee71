"""The node over HTTP, and the only room that imports Flask: the app factory (:mod:`.app`) and
WSGI entry (:mod:`.wsgi`), what a handler needs of its request (:mod:`.context`: one typed
``services()``, the caller), request IDs and access lines (:mod:`.request_log`), the FHIR API
(:mod:`.fhir`), the people's pages (:mod:`.pages`), the ledger and peer endpoints, health, the
token endpoint and the metrics endpoint. Views parse, call a flow or a room below, and answer.

May import: every room below it (``ops`` and down)."""
