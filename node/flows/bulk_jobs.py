"""The record of bulk data jobs (``$export``, ``$import``): who asked, what, how far it is, and
what came of it, in ``node_bulk_jobs``; and the thread that runs a job in the process that
accepted it.

A running job's thread writes a heartbeat every few seconds. A job whose heartbeat is older
than :data:`STALE_SECONDS` lost its process (a restart, a crash): the next status request for
it, in whichever process, runs it again (an export of this node's own data from the start;
an export from other members and an import from where they stopped). Only the user who asked
sees a job; to anyone else it does not exist (404).

A job is cancelled by marking it so (:func:`cancel`); its thread notices at its next heartbeat
or check (:class:`Cancelled`), discards what it wrote and forgets the job itself, so that
nothing is deleted under a thread still writing. A finished job's record and files go when
they are deleted or expire: :data:`RETENTION_SECONDS` after it ended (the manifest's
``Expires``), found at the next bulk request (:func:`expired`; no thread polls for them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from fhir_adapters.errors import FhirError, NotFound
from fhir_adapters.store import now_micros
from node.db.schema import bulk_jobs_table as J
from node.services import Services

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5
STALE_SECONDS = 60
RUNNING, DONE, FAILED, CANCELLED = "running", "done", "failed", "cancelled"
RETENTION_SECONDS = 24 * 3600  # an ended job's record and files are kept this long (Expires)
BUSY_RETRY_SECONDS = 30  # Retry-After of a kick-off refused: as many jobs run as it takes


@dataclass(frozen=True)
class Job:
    id: str
    kind: str
    owner: str
    request: dict[str, Any]
    state: str
    created: int
    heartbeat: int
    finished: int | None
    progress: dict[str, Any]
    result: dict[str, Any] | None

    @property
    def stale(self) -> bool:
        return self.state == RUNNING and now_micros() - self.heartbeat > STALE_SECONDS * 10**6


class Cancelled(Exception):
    """Raised in a job's thread when the job was cancelled: it stops there."""


class Busy(FhirError):
    """429: as many jobs of a kind run as the node takes; ask again after
    :data:`BUSY_RETRY_SECONDS` (the answer's ``Retry-After``)."""

    status = 429
    code = "throttled"


def new_job(
    svc: Services,
    kind: str,
    owner: str,
    request: dict[str, Any],
    *,
    most_running: int | None = None,
) -> Job:
    """Record a new running job; :class:`Busy` when ``most_running`` jobs of ``kind`` run
    already. The count and the new row are one transaction that kick-offs of the kind take in
    turns (SQLite's write lock, taken as it begins; on PostgreSQL an advisory lock), so two at
    the same instant cannot both pass the last free place."""
    now = now_micros()
    job = Job(str(uuid.uuid4()), kind, owner, request, RUNNING, now, now, None, {}, None)
    with svc.database.write_engine.begin() as conn:
        if most_running is not None:
            if conn.dialect.name == "postgresql":
                conn.execute(
                    sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _lock_key(kind)}
                )
            if _running(conn, kind) >= most_running:
                raise Busy(
                    f"this node runs {most_running} bulk {kind}s at once already; ask again in "
                    f"{BUSY_RETRY_SECONDS} s"
                )
        conn.execute(
            J.insert().values(
                id=job.id,
                kind=kind,
                owner=owner,
                request=json.dumps(request, ensure_ascii=False),
                state=RUNNING,
                created=now,
                heartbeat=now,
                progress="{}",
            )
        )
    return job


def get_job(svc: Services, job_id: str, owner: str) -> Job:
    """The job, when ``owner`` asked for it; else 404."""
    with svc.database.engine.connect() as conn:
        row = conn.execute(sa.select(J).where(J.c.id == job_id, J.c.owner == owner)).first()
    if row is None:
        raise NotFound(f"no bulk data job {job_id} of yours is known here")
    return Job(
        row.id,
        row.kind,
        row.owner,
        json.loads(row.request),
        row.state,
        row.created,
        row.heartbeat,
        row.finished,
        json.loads(row.progress),
        json.loads(row.result) if row.result else None,
    )


def beat(svc: Services, job_id: str, progress: dict[str, Any]) -> None:
    """Record that the job lives and how far it is; :class:`Cancelled` when it was."""
    with svc.database.write_engine.begin() as conn:
        updated = conn.execute(
            J.update()
            .where(J.c.id == job_id, J.c.state == RUNNING)
            .values(heartbeat=now_micros(), progress=json.dumps(progress))
        ).rowcount
    if not updated:
        raise Cancelled


def finish(svc: Services, job_id: str, state: str, result: dict[str, Any]) -> bool:
    """Record how a running job ended; False when it was no longer running (cancelled)."""
    with svc.database.write_engine.begin() as conn:
        updated = conn.execute(
            J.update()
            .where(J.c.id == job_id, J.c.state == RUNNING)
            .values(state=state, finished=now_micros(), result=json.dumps(result))
        ).rowcount
    return bool(updated)


def cancel(svc: Services, job_id: str) -> bool:
    """Mark a running job cancelled; True when it was running (its thread, if it still has
    one, then discards its work), False when it had ended already."""
    with svc.database.write_engine.begin() as conn:
        updated = conn.execute(
            J.update()
            .where(J.c.id == job_id, J.c.state == RUNNING)
            .values(state=CANCELLED, finished=now_micros())
        ).rowcount
    return bool(updated)


def _running(conn: sa.Connection, kind: str) -> int:
    """How many jobs of ``kind`` are running now (a job whose process was lost is not)."""
    alive = now_micros() - STALE_SECONDS * 10**6
    count = conn.execute(
        sa.select(sa.func.count())
        .select_from(J)
        .where(J.c.kind == kind, J.c.state == RUNNING, J.c.heartbeat >= alive)
    ).scalar_one()
    return int(count)


def _lock_key(kind: str) -> int:
    """The PostgreSQL advisory lock that kick-offs of ``kind`` take in turns."""
    digest = hashlib.sha256(f"hrx bulk {kind} kick-off".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def expires(job: Job) -> int:
    """When an ended job's record and files are deleted (µs)."""
    return (job.finished or job.created) + RETENTION_SECONDS * 10**6


def expired(svc: Services, kind: str) -> list[str]:
    """The jobs of ``kind`` to forget: ended (done or failed) more than
    :data:`RETENTION_SECONDS` ago, or cancelled with no thread left to discard their work (no
    heartbeat for :data:`STALE_SECONDS`)."""
    now = now_micros()
    ended_before, lost = now - RETENTION_SECONDS * 10**6, now - STALE_SECONDS * 10**6
    with svc.database.engine.connect() as conn:
        rows = conn.execute(
            sa.select(J.c.id).where(
                J.c.kind == kind,
                sa.or_(
                    sa.and_(J.c.state.in_((DONE, FAILED)), J.c.finished < ended_before),
                    sa.and_(J.c.state == CANCELLED, J.c.heartbeat < lost),
                ),
            )
        ).all()
    return [row.id for row in rows]


def forget(svc: Services, job_id: str) -> None:
    with svc.database.write_engine.begin() as conn:
        conn.execute(J.delete().where(J.c.id == job_id))


def delete(svc: Services, job_id: str, discard: Callable[[str], None]) -> None:
    """A client's ``DELETE``: a running job is cancelled (its thread discards its work and
    forgets it at its next check); an ended one's work (``discard(job_id)``: its files) and
    record are deleted now."""
    if not cancel(svc, job_id):
        discard(job_id)
        forget(svc, job_id)


def forget_expired(svc: Services, kind: str, discard: Callable[[str], None]) -> None:
    """Delete the work and records of the jobs of ``kind`` that :func:`expired` finds (asked
    at each bulk request: no thread polls for them)."""
    for job_id in expired(svc, kind):
        discard(job_id)
        forget(svc, job_id)


def start(
    svc: Services,
    job: Job,
    work: Callable[[], dict[str, Any]],
    discard: Callable[[], None] | None = None,
) -> threading.Thread:
    """Run ``work`` (which returns the job's result) in a thread of this process; the thread.
    When the job is cancelled (:class:`Cancelled` from a heartbeat, or found cancelled when it
    ends), ``discard`` removes what it wrote and the job is forgotten: no error is logged."""

    def stopped() -> None:
        log.info("bulk %s job %s stopped: it was cancelled", job.kind, job.id)
        if discard is not None:
            discard()
        forget(svc, job.id)

    def run() -> None:
        try:
            result = work()
        except Cancelled:
            stopped()
            return
        except Exception as exc:  # the job fails; the node goes on
            if not finish(svc, job.id, FAILED, {"error": failure(exc)}):
                stopped()  # cancelled while it ran: whatever broke, nobody waits for it
                return
            log.exception("bulk %s job %s failed", job.kind, job.id)
            return
        if not finish(svc, job.id, DONE, result):
            stopped()

    thread = threading.Thread(target=run, name=f"bulk-{job.kind}-{job.id[:8]}", daemon=True)
    thread.start()
    return thread


def failure(exc: Exception) -> str:
    """What the client is told of a failed job: a client's error as it was said, anything else
    by its kind only (its message may name the node's paths; the log has it whole)."""
    if isinstance(exc, FhirError):
        return str(exc)[:500]
    return f"{type(exc).__name__} (the node's log has the details)"


def take_over(svc: Services, job: Job) -> bool:
    """Claim a stale job for this process (one claimant wins); True when claimed."""
    with svc.database.write_engine.begin() as conn:
        claimed = conn.execute(
            J.update()
            .where(J.c.id == job.id, J.c.state == RUNNING, J.c.heartbeat == job.heartbeat)
            .values(heartbeat=now_micros())
        ).rowcount
    return bool(claimed)
