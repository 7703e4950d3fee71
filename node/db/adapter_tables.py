"""The tables the hospital adapters keep beside the FHIR store: what they have already taken in
(so a message sent twice is stored once), what they could not take in (the quarantine, kept
whole so it can be replayed after a fix), and how far each scheduled sync has come."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

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
