"""What the adapters could not take in: one quarantine for every adapter (``hl7``, ``csv``,
``dicom``, ``dicomweb``), each row the message, rows or file as received, with the reason,
until a replay stores it. The reason may name local patients (by local id) for the operator;
it never goes into a log line."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from fhir_adapters.store import now_micros
from node.base.errors import NodeError
from node.db.schema import quarantine_table

ORIGIN_LENGTH = 255  # adapter_quarantine.origin
REASON_LENGTH = 4000


@dataclass(frozen=True)
class QuarantineRow:
    id: int
    adapter: str
    received_at: int  # µs since the epoch
    origin: str
    reason: str
    size: int
    replayed_at: int | None
    payload: bytes | None = None  # only when asked for


# a QuarantineRow's columns, in its fields' order (the payload, when wanted, after them)
_ROW_COLUMNS = (
    quarantine_table.c.id,
    quarantine_table.c.adapter,
    quarantine_table.c.received_at,
    quarantine_table.c.origin,
    quarantine_table.c.reason,
    sa.func.length(quarantine_table.c.payload),
    quarantine_table.c.replayed_at,
)


def quarantined(
    engine: Engine,
    *,
    adapter: str | None = None,
    include_replayed: bool = False,
    limit: int | None = None,
) -> list[QuarantineRow]:
    """Quarantine rows, oldest first: the open ones (not yet replayed) unless asked for all;
    with ``limit``, the newest ``limit`` of them."""
    Q = quarantine_table
    query = sa.select(*_ROW_COLUMNS).order_by(Q.c.id.desc())
    if adapter is not None:
        query = query.where(Q.c.adapter == adapter)
    if not include_replayed:
        query = query.where(Q.c.replayed_at.is_(None))
    if limit is not None:
        query = query.limit(limit)
    with engine.connect() as conn:
        return [QuarantineRow(*row) for row in conn.execute(query)][::-1]


def quarantine_row(engine: Engine, row_id: int) -> QuarantineRow:
    """One quarantine row with its payload; NodeError when there is none."""
    Q = quarantine_table
    with engine.connect() as conn:
        row = conn.execute(sa.select(*_ROW_COLUMNS, Q.c.payload).where(Q.c.id == row_id)).first()
    if row is None:
        raise NodeError(
            f"the quarantine holds no #{row_id}; see hrx adapters quarantine list --all"
        )
    return QuarantineRow(*row)


def keep_in_quarantine(
    conn: Connection,
    adapter: str,
    origin: str,
    reason: str,
    payload: bytes,
    *,
    row_id: int | None = None,
) -> int:
    """Keep what ``adapter`` refused, byte for byte, with the reason: a new quarantine row, or
    (``row_id``: a row replayed and refused again) that row with the new reason and payload.
    The row's id (the HL7 and DICOM intakes both keep theirs through here)."""
    Q = quarantine_table
    if row_id is None:
        inserted = conn.execute(
            Q.insert()
            .values(
                adapter=adapter,
                received_at=now_micros(),
                origin=origin[:ORIGIN_LENGTH],
                reason=reason,
                payload=payload,
            )
            .returning(Q.c.id)
        )
        return int(inserted.scalar_one())
    conn.execute(Q.update().where(Q.c.id == row_id).values(reason=reason, payload=payload))
    return row_id


def keep_once(conn: Connection, adapter: str, origin: str, reason: str, payload: bytes) -> int:
    """Keep what ``adapter`` refused unless the same bytes wait in the quarantine already (the
    same file imported again): that row's id, or the new one's."""
    Q = quarantine_table
    existing = conn.execute(
        sa.select(Q.c.id).where(
            Q.c.adapter == adapter, Q.c.payload == payload, Q.c.replayed_at.is_(None)
        )
    ).first()
    if existing is not None:
        return int(existing[0])
    return keep_in_quarantine(conn, adapter, origin, reason[:REASON_LENGTH], payload)
