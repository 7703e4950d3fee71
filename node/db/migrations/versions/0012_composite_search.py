"""Composite search parameters (Observation's ``code-value-quantity``,
``component-code-value-quantity``...): no table changes; their rows go into the existing index
tables under names that carry the token part, so the search index of every stored resource is
built again by ``hrx node upgrade`` (:data:`node.ops.setup.REINDEXING`).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 19:00:00
"""

from __future__ import annotations

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # the index rows are rebuilt after the migrations (they need the node's base URL)
    pass


def downgrade() -> None:
    pass
