"""The hospital adapters' tables: quarantine, messages taken in, sync state.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-25 06:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "adapter_quarantine",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("adapter", sa.String(length=32), nullable=False),
        sa.Column("received_at", sa.BigInteger(), nullable=False),
        sa.Column("origin", sa.String(length=255), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("replayed_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("adapter_quarantine", schema=None) as batch_op:
        batch_op.create_index("adapter_quarantine_open", ["adapter", "replayed_at"], unique=False)
    op.create_table(
        "adapter_messages",
        sa.Column("adapter", sa.String(length=32), nullable=False),
        sa.Column("message_key", sa.String(length=255), nullable=False),
        sa.Column("received_at", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("resources", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("adapter", "message_key"),
    )
    op.create_table(
        "adapter_sync_state",
        sa.Column("adapter", sa.String(length=32), nullable=False),
        sa.Column("source", sa.String(length=512), nullable=False),
        sa.Column("last_run_at", sa.BigInteger(), nullable=False),
        sa.Column("cursor", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("adapter", "source"),
    )


def downgrade() -> None:
    op.drop_table("adapter_sync_state")
    op.drop_table("adapter_messages")
    with op.batch_alter_table("adapter_quarantine", schema=None) as batch_op:
        batch_op.drop_index("adapter_quarantine_open")
    op.drop_table("adapter_quarantine")
