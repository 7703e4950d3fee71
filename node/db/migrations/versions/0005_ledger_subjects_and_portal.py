"""The ledger's index of entries by patient pseudonym (append-only, filled from the entries
already stored), and the patient portal's enrollment codes and sessions.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25 02:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from ledger.canonical import parse_canonical
from ledger.store.schema import install_append_only_triggers

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# The tables' shapes as this revision knows them (never the live tables, which later revisions
# may change).
entries = sa.table("ledger_entries", sa.column("chain"), sa.column("seq"), sa.column("data"))
subjects = sa.table(
    "ledger_subjects", sa.column("patient"), sa.column("chain"), sa.column("seq"), sa.column("type")
)


def subject_rows(chain: str, rows: list[tuple[int, bytes]]) -> list[dict[str, object]]:
    """The index rows of stored entries: the patient an entry body names, if any (as
    :func:`ledger.store.chains.subject_rows` did when this revision was written)."""
    found: list[dict[str, object]] = []
    for seq, data in rows:
        if b'"patient":' not in data:
            continue
        entry = parse_canonical(data)
        body = entry.get("body")
        patient = body.get("patient") if isinstance(body, dict) else None
        if isinstance(patient, str) and 0 < len(patient) <= 64:
            found.append({"patient": patient, "chain": chain, "seq": seq, "type": entry["type"]})
    return found


def upgrade() -> None:
    op.create_table(
        "ledger_subjects",
        sa.Column("patient", sa.String(length=64), nullable=False),
        sa.Column("chain", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("patient", "chain", "seq"),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "portal_enrollments",
        sa.Column("code_hash", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("created", sa.BigInteger(), nullable=False),
        sa.Column("expires", sa.BigInteger(), nullable=False),
        sa.Column("used", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("code_hash"),
    )
    op.create_table(
        "portal_sessions",
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("csrf", sa.String(length=64), nullable=False),
        sa.Column("created", sa.BigInteger(), nullable=False),
        sa.Column("seen", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("token_hash"),
    )
    with op.batch_alter_table("portal_sessions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_portal_sessions_username"), ["username"], unique=False)
    bind = op.get_bind()
    chains = [row[0] for row in bind.execute(sa.select(entries.c.chain).distinct())]
    for chain in chains:  # entries stored before the index: index them, a chunk at a time
        last = -1
        while True:
            rows = bind.execute(
                sa.select(entries.c.seq, entries.c.data)
                .where(entries.c.chain == chain, entries.c.seq > last)
                .order_by(entries.c.seq)
                .limit(5000)
            ).all()
            if not rows:
                break
            found = subject_rows(chain, [(row[0], bytes(row[1])) for row in rows])
            if found:
                bind.execute(subjects.insert(), found)
            last = rows[-1][0]
    install_append_only_triggers(bind, ("ledger_subjects",))


def downgrade() -> None:
    raise RuntimeError("the ledger's index is append-only like the ledger; restore a backup")
