"""Every FHIR R4 resource type, searched by the official R4 search parameters: the quantity
index (``fhir_idx_quantity``: values as written and in their dimension's base unit), strings
as written beside their normalised form (``:exact`` compares those), and the
search index of every stored resource built again by ``hrx node upgrade``
(:data:`node.ops.setup.REINDEXING`), since the parameters of the types served before grew too.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 16:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # the index rows are rebuilt after the migrations (they need the node's base URL)
    with op.batch_alter_table("fhir_idx_string", schema=None) as batch_op:
        batch_op.add_column(sa.Column("exact", sa.String(length=255), nullable=True))
    op.create_table(
        "fhir_idx_quantity",
        sa.Column("res_pk", sa.BigInteger(), nullable=False),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("param", sa.String(length=64), nullable=False),
        sa.Column("system", sa.String(length=255), nullable=False),
        sa.Column("code", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("dimension", sa.String(length=16), nullable=False),
        sa.Column("base", sa.Float(), nullable=False),
        sa.Column("derived", sa.Boolean(), nullable=False),
    )
    with op.batch_alter_table("fhir_idx_quantity", schema=None) as batch_op:
        batch_op.create_index(
            "fhir_idx_quantity_base", ["type", "param", "dimension", "base"], unique=False
        )
        batch_op.create_index("fhir_idx_quantity_value", ["type", "param", "value"], unique=False)
        batch_op.create_index("fhir_idx_quantity_res", ["res_pk"], unique=False)


def downgrade() -> None:
    op.drop_table("fhir_idx_quantity")
    with op.batch_alter_table("fhir_idx_string", schema=None) as batch_op:
        batch_op.drop_column("exact")
