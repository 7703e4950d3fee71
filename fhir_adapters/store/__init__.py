"""The FHIR repository of one node: versioned resources with their search indexes.

``repository`` (the store: writes, reads, history), ``search`` (a search request parsed, run
and paged), ``search_params`` (what each search parameter indexes), ``tables`` (the index
tables), ``resources`` (what a resource must be to be stored), ``codes`` (required code
bindings), ``jsonio`` (FHIR JSON read and written, numbers kept exact). It imports only
:mod:`fhir_adapters.errors` of this repository; the mappers beside it may import it.
"""

from fhir_adapters.store.repository import (
    ResourceStore,
    Stored,
    Writer,
    format_instant,
    http_date,
    now_micros,
    readable_only,
)

__all__ = [
    "ResourceStore",
    "Stored",
    "Writer",
    "format_instant",
    "http_date",
    "now_micros",
    "readable_only",
]
