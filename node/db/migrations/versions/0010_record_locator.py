"""The record locator's table, filled at a registry by the members' signed updates (which
pseudonyms each member holds results for, by category, with the newest date).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 12:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "locator_holdings",
        sa.Column("patient", sa.String(length=64), nullable=False),
        sa.Column("member", sa.String(length=64), nullable=False),
        sa.Column("category", sa.String(length=32), nullable=False),
        sa.Column("newest", sa.String(length=10), nullable=False),
        sa.Column("updated", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("patient", "member", "category"),
    )


def downgrade() -> None:
    op.drop_table("locator_holdings")
