"""The FHIR store's tables (SQLAlchemy Core), shared by the store, search and migrations.

``fhir_resources`` has one row per resource (its current version); ``fhir_versions`` keeps
every version's stored JSON, so reads return bytes exactly as written. The index tables hold
the search-parameter values of current versions only, one row per value; ``fhir_links``
every local reference (for referential integrity); ``fhir_compartment`` the patients whose
compartment each resource is in (the patient-token and consent filters use it).
``fhir_search_sets`` keep the ordered matches of a search that spans pages, so paging is
stable and totals are exact. Times are integers: microseconds since the Unix epoch.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

_PK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite: an alias of the rowid

resources = sa.Table(
    "fhir_resources",
    metadata,
    sa.Column("res_pk", _PK, primary_key=True, autoincrement=True),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("id", sa.String(64), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("last_updated", sa.BigInteger, nullable=False),
    sa.Column("deleted", sa.Boolean, nullable=False),
    sa.UniqueConstraint("type", "id", name="fhir_resources_type_id"),
    sa.Index("fhir_resources_type_updated", "type", "last_updated"),
)

versions = sa.Table(
    "fhir_versions",
    metadata,
    sa.Column("res_pk", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("last_updated", sa.BigInteger, nullable=False),
    sa.Column("method", sa.String(8), nullable=False),
    sa.Column("body", sa.LargeBinary, nullable=True),  # None: the version that deleted it
    sa.Index("fhir_versions_type_updated", "type", "last_updated"),
)

tokens = sa.Table(
    "fhir_idx_token",
    metadata,
    sa.Column("res_pk", sa.BigInteger, nullable=False),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("param", sa.String(64), nullable=False),
    sa.Column("system", sa.String(255), nullable=False),  # "" when there is none
    sa.Column("code", sa.String(255), nullable=False),
    sa.Index("fhir_idx_token_value", "type", "param", "code", "system"),
    sa.Index("fhir_idx_token_res", "res_pk"),
)

strings = sa.Table(
    "fhir_idx_string",
    metadata,
    sa.Column("res_pk", sa.BigInteger, nullable=False),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("param", sa.String(64), nullable=False),
    sa.Column("value", sa.String(255), nullable=False),  # normalised (case, accents, width)
    sa.Column("exact", sa.String(255), nullable=True),  # as written (None: indexed before 0011)
    sa.Index("fhir_idx_string_value", "type", "param", "value"),
    sa.Index("fhir_idx_string_res", "res_pk"),
)

references = sa.Table(
    "fhir_idx_reference",
    metadata,
    sa.Column("res_pk", sa.BigInteger, nullable=False),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("param", sa.String(64), nullable=False),
    sa.Column("target_type", sa.String(64), nullable=False),
    sa.Column("target_id", sa.String(64), nullable=False),
    sa.Index("fhir_idx_reference_value", "type", "param", "target_id", "target_type"),
    sa.Index("fhir_idx_reference_res", "res_pk"),
)

dates = sa.Table(
    "fhir_idx_date",
    metadata,
    sa.Column("res_pk", sa.BigInteger, nullable=False),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("param", sa.String(64), nullable=False),
    sa.Column("low", sa.BigInteger, nullable=False),
    sa.Column("high", sa.BigInteger, nullable=False),
    sa.Index("fhir_idx_date_value", "type", "param", "low", "high"),
    sa.Index("fhir_idx_date_res", "res_pk"),
)

quantities = sa.Table(
    "fhir_idx_quantity",
    metadata,
    sa.Column("res_pk", sa.BigInteger, nullable=False),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("param", sa.String(64), nullable=False),
    sa.Column("system", sa.String(255), nullable=False),  # "" when there is none
    sa.Column("code", sa.String(64), nullable=False),  # the unit's code, or its text
    sa.Column("value", sa.Float, nullable=False),  # as written
    sa.Column("dimension", sa.String(16), nullable=False),  # "" when not converted
    sa.Column("base", sa.Float, nullable=False),  # in the dimension's base unit
    sa.Column("derived", sa.Boolean, nullable=False),  # by the analyte's molar mass
    sa.Index("fhir_idx_quantity_base", "type", "param", "dimension", "base"),
    sa.Index("fhir_idx_quantity_value", "type", "param", "value"),
    sa.Index("fhir_idx_quantity_res", "res_pk"),
)

links = sa.Table(
    "fhir_links",
    metadata,
    sa.Column("res_pk", sa.BigInteger, nullable=False),
    sa.Column("target_type", sa.String(64), nullable=False),
    sa.Column("target_id", sa.String(64), nullable=False),
    sa.Index("fhir_links_target", "target_type", "target_id"),
    sa.Index("fhir_links_res", "res_pk"),
)

compartment = sa.Table(
    "fhir_compartment",
    metadata,
    sa.Column("patient_id", sa.String(64), primary_key=True),
    sa.Column("res_pk", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Index("fhir_compartment_res", "res_pk"),
)

search_sets = sa.Table(
    "fhir_search_sets",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("created", sa.BigInteger, nullable=False),  # µs since the epoch
    sa.Column("owner", sa.String(255), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),  # "search" or "history"
    sa.Column("total", sa.Integer, nullable=False),
    sa.Column("request", sa.Text, nullable=False),  # what the set answers (JSON)
    sa.Column("matches", sa.LargeBinary, nullable=False),  # packed (res_pk, version) pairs
    sa.Index("fhir_search_sets_created", "created"),
    sa.Index("fhir_search_sets_owner", "owner", "created"),
)

INDEX_TABLES = (tokens, strings, references, dates, quantities, links, compartment)

# -- bulk import (fhir_adapters.store.bulk_import) --

import_positions = sa.Table(
    "fhir_import_positions",
    metadata,
    sa.Column("job", sa.String(64), primary_key=True),
    sa.Column("source", sa.Integer, primary_key=True, autoincrement=False),  # file, from 0
    sa.Column("line", sa.BigInteger, nullable=False),  # lines settled, from the file's start
    sa.Column("offset", sa.BigInteger, nullable=False),  # bytes settled
    sa.Column("created", sa.BigInteger, nullable=False),
    sa.Column("updated", sa.BigInteger, nullable=False),
    sa.Column("unchanged", sa.BigInteger, nullable=False),
    sa.Column("refused", sa.BigInteger, nullable=False),
)

# lines of an import not stored: "held" until what they refer to is stored, or "refused"
import_lines = sa.Table(
    "fhir_import_lines",
    metadata,
    sa.Column("job", sa.String(64), primary_key=True),
    sa.Column("source", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("line", sa.BigInteger, primary_key=True, autoincrement=False),  # from 1
    sa.Column("state", sa.String(8), nullable=False),  # "held" or "refused"
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("text", sa.LargeBinary, nullable=False),  # the line as it was read
)
