"""The node's own tables, in one place (SQLAlchemy Core): users, tokens and sign-in
throttles; browser sessions and enrollment codes; local Patients by pseudonym; the nonces of
signed requests; the adapters' quarantine, messages and sync state. The ledger's tables are
:mod:`ledger.store`'s and the FHIR store's :mod:`fhir_adapters.store.tables`; the migrations build
all of them (:data:`node.db.engines.MODEL_METADATA`) and copy their shapes rather than import
these live definitions."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()


# -- users, tokens and sign-in throttles (node.identity.users) --

users_table = sa.Table(
    "node_users",
    metadata,
    sa.Column("username", sa.String(64), primary_key=True),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("patient_id", sa.String(64), nullable=True),
    sa.Column("password_hash", sa.String(255), nullable=True),
    sa.Column("active", sa.Boolean, nullable=False),
    sa.Column("created", sa.BigInteger, nullable=False),
    sa.Column("removed", sa.BigInteger, nullable=True),  # when; the row stays (tombstone)
    sa.Column("token_generation", sa.Integer, nullable=False, server_default="0"),
)


tokens_table = sa.Table(
    "node_tokens",
    metadata,
    sa.Column("jti", sa.String(64), primary_key=True),
    sa.Column("username", sa.String(64), nullable=False, index=True),
    sa.Column("issued", sa.BigInteger, nullable=False),
    sa.Column("expires", sa.BigInteger, nullable=False, index=True),
    sa.Column("revoked", sa.BigInteger, nullable=True),
)


# one row per bucket: (username, address) the account from one address, (username, "") the
# account from addresses not known for it, ("", address) one address against every account
throttle_table = sa.Table(
    "signin_throttle",
    metadata,
    sa.Column("username", sa.String(64), primary_key=True),
    sa.Column("address", sa.String(64), primary_key=True),
    sa.Column("failures", sa.Integer, nullable=False),
    sa.Column("blocked_until", sa.BigInteger, nullable=False),
    sa.Column("last_attempt", sa.BigInteger, nullable=False),
    sa.Column("last_success", sa.BigInteger, nullable=True),  # account-and-address buckets
    sa.Column("expires", sa.BigInteger, nullable=False, index=True),  # forgotten after
)


# -- browser sessions and enrollment codes (node.identity.sessions) --

sessions_table = sa.Table(
    "portal_sessions",
    metadata,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("username", sa.String(64), nullable=False, index=True),
    sa.Column("csrf", sa.String(64), nullable=False),
    sa.Column("created", sa.BigInteger, nullable=False),
    sa.Column("seen", sa.BigInteger, nullable=False),
    sa.Column("generation", sa.Integer, nullable=False, server_default="0"),
)


enrollments_table = sa.Table(
    "portal_enrollments",
    metadata,
    sa.Column("code_hash", sa.String(64), primary_key=True),
    sa.Column("patient_id", sa.String(64), nullable=False),
    sa.Column("created", sa.BigInteger, nullable=False),
    sa.Column("expires", sa.BigInteger, nullable=False),
    sa.Column("used", sa.BigInteger, nullable=True),
)


# -- local patients by pseudonym (node.records.pseudonym_index) --

pseudonyms_table = sa.Table(
    "patient_pseudonyms",
    metadata,
    sa.Column("pseudonym", sa.String(64), primary_key=True),
    sa.Column("patient_id", sa.String(64), primary_key=True),
    sa.Index("patient_pseudonyms_patient", "patient_id"),
)


# -- nonces of signed requests from members (node.consortium.signing) --

nonces_table = sa.Table(
    "peer_nonces",
    metadata,
    sa.Column("nonce", sa.String(64), primary_key=True),
    sa.Column("member", sa.String(64), nullable=False),
    sa.Column("seen", sa.BigInteger, nullable=False),  # seconds since the epoch
    sa.Index("peer_nonces_seen", "seen"),
)


# -- the adapters: quarantine, messages taken in, sync state (node.intake) --

# A message or file an adapter refused, kept byte for byte with the reason it was refused.
quarantine_table = sa.Table(
    "adapter_quarantine",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("adapter", sa.String(32), nullable=False),  # hl7, csv, dicom
    sa.Column("received_at", sa.BigInteger, nullable=False),  # µs since the epoch, UTC
    sa.Column("origin", sa.String(255), nullable=False),  # peer address or file name
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),
    sa.Column("replayed_at", sa.BigInteger, nullable=True),  # set once a replay stored it
    sa.Index("adapter_quarantine_open", "adapter", "replayed_at"),
)

# What an adapter has stored, by the sender's own key for it (HL7: MSH-3/MSH-4 and the control
# ID), with the digest of what was sent and the resources written.
messages_table = sa.Table(
    "adapter_messages",
    metadata,
    sa.Column("adapter", sa.String(32), primary_key=True),
    sa.Column("message_key", sa.String(255), primary_key=True),
    sa.Column("received_at", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("resources", sa.Text, nullable=False),  # JSON list of "Type/id/_history/n"
)

# How far a scheduled pull (DICOMweb) has come from one source.
sync_state_table = sa.Table(
    "adapter_sync_state",
    metadata,
    sa.Column("adapter", sa.String(32), primary_key=True),
    sa.Column("source", sa.String(512), primary_key=True),
    sa.Column("last_run_at", sa.BigInteger, nullable=False),
    sa.Column("cursor", sa.Text, nullable=False),  # adapter-defined, e.g. a study date
)


# -- the record locator, at a registry (node.consortium.locator) --

locator_table = sa.Table(
    "locator_holdings",
    metadata,
    sa.Column("patient", sa.String(64), primary_key=True),  # a pseudonym, never more
    sa.Column("member", sa.String(64), primary_key=True),
    sa.Column("category", sa.String(32), primary_key=True),
    sa.Column("newest", sa.String(10), nullable=False),  # YYYY-MM-DD of its newest result
    sa.Column("updated", sa.BigInteger, nullable=False),  # µs since the epoch
)


# -- bulk data jobs: $export and $import (node.flows.bulk_jobs) --

bulk_jobs_table = sa.Table(
    "node_bulk_jobs",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("kind", sa.String(8), nullable=False),  # "export" or "import"
    sa.Column("owner", sa.String(64), nullable=False),  # the username that asked
    sa.Column("request", sa.Text, nullable=False),  # what was asked (JSON)
    sa.Column("state", sa.String(12), nullable=False),  # running, done, failed, cancelled
    sa.Column("created", sa.BigInteger, nullable=False),  # µs since the epoch
    sa.Column("heartbeat", sa.BigInteger, nullable=False),  # the worker's last sign of life
    sa.Column("finished", sa.BigInteger, nullable=True),
    sa.Column("progress", sa.Text, nullable=False),  # for the status answer (JSON)
    sa.Column("result", sa.Text, nullable=True),  # the manifest, or the error (JSON)
    sa.Index("node_bulk_jobs_owner", "owner", "created"),
)
