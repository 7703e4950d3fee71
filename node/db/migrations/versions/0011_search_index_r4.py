"""Every FHIR R4 resource type, searched by the official R4 search parameters: no table
changes, but the search index of every stored resource is built again by ``hrx node upgrade``
(:data:`node.ops.setup.REINDEXING`), since the parameters of the types served before grew too.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 16:00:00
"""

from __future__ import annotations

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass  # the index rows are rebuilt after the migrations (they need the node's base URL)


def downgrade() -> None:
    pass
