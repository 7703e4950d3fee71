"""Messages made from LIS CSV exports, stored before they were counted apart, are counted as
``csv`` (their MSH-3 is always HRX-CSV), not ``hrx_adapter_messages_stored_total{adapter="hl7"}``.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 08:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        sa.text(
            "UPDATE adapter_messages SET adapter = 'csv' "
            "WHERE adapter = 'hl7' AND message_key LIKE 'HRX-CSV|%'"
        )
    )


def downgrade() -> None:
    op.execute(
        sa.text(
            "UPDATE adapter_messages SET adapter = 'hl7' "
            "WHERE adapter = 'csv' AND message_key LIKE 'HRX-CSV|%'"
        )
    )
