"""The FHIR repository of one node: versioned resources with their search indexes.

``repository`` (the store: writes, reads, history, the index rebuilt), ``group_commit``
(concurrent writes sharing a transaction and its commit), ``bulk_import`` (NDJSON files
loaded in groups, resumable), ``search`` (a search
request parsed, run and paged), ``search_params`` (what each search parameter indexes),
``expressions`` (a parameter's FHIRPath as a function of a resource), ``subsetting``
(``_summary`` and ``_elements``), ``tables`` (the index tables), ``resources`` (what a
resource must be to be stored), ``shapes`` (the quick walk that vouches for most valid
resources without validating them into the models), ``codes`` (required code bindings),
``jsonio`` (FHIR JSON read and written, numbers kept exact). It imports only
:mod:`fhir_adapters.errors` and :mod:`fhir_adapters.definitions` of this repository; the
mappers beside it may import it.
"""

from fhir_adapters.store.repository import (
    NewResource,
    ResourceStore,
    Stored,
    Writer,
    format_instant,
    http_date,
    now_micros,
    parse_etag,
    readable_only,
)

__all__ = [
    "NewResource",
    "ResourceStore",
    "Stored",
    "Writer",
    "format_instant",
    "http_date",
    "now_micros",
    "parse_etag",
    "readable_only",
]
