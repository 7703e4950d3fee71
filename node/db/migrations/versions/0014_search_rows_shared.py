"""Search parameters that own no index rows: Observation's union parameters (``combo-code``,
``combo-value-quantity``...) are searched by the rows of the parameters they unite, and its
composites over the Observation itself (``code-value-quantity``, ``code-value-concept``,
``code-value-date``) by the rows of their two parts on the same Observation. The rows an
earlier hrx wrote for them are deleted; nothing else changes. Each deletion reads the index on
(type, param), so it costs the rows deleted, not the size of the store.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07 20:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

# what each index table held of them: parameter names, and prefixes of composite names
UNIONS = ("combo-code", "combo-data-absent-reason", "combo-value-concept")
ROWS_NOT_WRITTEN = {
    "fhir_idx_token": (
        [*UNIONS, *(f"{name}:of-type" for name in UNIONS)],
        ["code-value-concept$"],
    ),
    "fhir_idx_string": ([f"{name}:text" for name in UNIONS], []),
    "fhir_idx_quantity": (["combo-value-quantity"], ["code-value-quantity$"]),
    "fhir_idx_date": ([], ["code-value-date$"]),
}


def upgrade() -> None:
    for table, (names, prefixes) in ROWS_NOT_WRITTEN.items():
        param: sa.ColumnClause[str] = sa.column("param")
        # a composite's names are its name, "$" and a digest; "%" is the character after "$"
        matches: list[sa.ColumnElement[bool]] = [param.in_(names)] if names else []
        matches += [sa.and_(param >= p, param < p[:-1] + "%") for p in prefixes]
        op.execute(
            sa.table(table, sa.column("type"), param)
            .delete()
            .where(sa.column("type") == "Observation", sa.or_(*matches))
        )


def downgrade() -> None:
    # not written back: an older hrx reads these rows, so going back to it needs its search
    # index built again (as its `hrx node upgrade` does across revision 0012)
    pass
