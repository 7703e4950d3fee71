"""Local Patients by pseudonym, for answering members' "do you hold records" queries (filled
by hrx node upgrade and hrx node join, which hold the consortium's key).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25 03:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "patient_pseudonyms",
        sa.Column("pseudonym", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("pseudonym", "patient_id"),
    )
    with op.batch_alter_table("patient_pseudonyms", schema=None) as batch_op:
        batch_op.create_index("patient_pseudonyms_patient", ["patient_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("patient_pseudonyms", schema=None) as batch_op:
        batch_op.drop_index("patient_pseudonyms_patient")
    op.drop_table("patient_pseudonyms")
