"""Which local Patients a pseudonym stands for: the index a member answers "do you hold records
for this patient?" from, without revealing anything else.

A Patient's pseudonym is made of its identifier of the consortium's system
(``consent.identifier_system``) with the consortium's key (:mod:`consent.pseudonym`). The
index follows every Patient write (the resource store's observer, in the write's own
transaction); Patients stored before the node joined a consortium, when it had no key yet, are
indexed by ``hrx node join``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from fhir_adapters.store import jsonio, tables
from node.db.schema import pseudonyms_table


def set_pseudonym(conn: Connection, patient_id: str, pseudonym: str | None) -> None:
    """The patient's pseudonym from now on (None: it has none, e.g. deleted)."""
    conn.execute(pseudonyms_table.delete().where(pseudonyms_table.c.patient_id == patient_id))
    if pseudonym is not None:
        conn.execute(pseudonyms_table.insert().values(pseudonym=pseudonym, patient_id=patient_id))


def patients_with(engine: Engine, pseudonym: str) -> list[str]:
    with engine.connect() as conn:
        return sorted(
            row[0]
            for row in conn.execute(
                sa.select(pseudonyms_table.c.patient_id).where(
                    pseudonyms_table.c.pseudonym == pseudonym
                )
            )
        )


def pseudonym_of_patient(engine: Engine, patient_id: str) -> str | None:
    """The pseudonym local Patient ``patient_id`` stands for, or None."""
    with engine.connect() as conn:
        found: str | None = conn.execute(
            sa.select(pseudonyms_table.c.pseudonym).where(
                pseudonyms_table.c.patient_id == patient_id
            )
        ).scalar()
    return found


def rebuild(write_engine: Engine, pseudonym_of: Callable[[dict[str, Any]], str | None]) -> int:
    """Index every current Patient again; returns how many have a pseudonym."""
    resources, versions = tables.resources, tables.versions
    query = (
        sa.select(resources.c.id, versions.c.body)
        .select_from(
            resources.join(
                versions,
                sa.and_(
                    versions.c.res_pk == resources.c.res_pk,
                    versions.c.version == resources.c.version,
                ),
            )
        )
        .where(resources.c.type == "Patient", resources.c.deleted.is_(False))
    )
    count = 0
    with write_engine.begin() as conn:
        conn.execute(pseudonyms_table.delete())
        for patient_id, body in conn.execute(query).all():
            pseudonym = pseudonym_of(jsonio.parse(bytes(body)))
            if pseudonym is not None:
                conn.execute(
                    pseudonyms_table.insert().values(pseudonym=pseudonym, patient_id=patient_id)
                )
                count += 1
    return count
