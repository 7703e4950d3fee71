"""The record of bulk data jobs (``$export``, ``$import``): who asked, what, how far it is, and
what came of it, in ``node_bulk_jobs``; and the thread that runs a job in the process that
accepted it.

A running job's thread writes a heartbeat every few seconds. A job whose heartbeat is older
than :data:`STALE_SECONDS` lost its process (a restart, a crash): the next status request for
it, in whichever process, runs it again (an export of this node's own data from the start;
an export from other members and an import from where they stopped). Only the user who asked
sees a job; to anyone else it does not exist (404).
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from fhir_adapters.errors import NotFound
from fhir_adapters.store import now_micros
from node.db.schema import bulk_jobs_table as J
from node.services import Services

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5
STALE_SECONDS = 60
RUNNING, DONE, FAILED, CANCELLED = "running", "done", "failed", "cancelled"


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


def new_job(svc: Services, kind: str, owner: str, request: dict[str, Any]) -> Job:
    now = now_micros()
    job = Job(str(uuid.uuid4()), kind, owner, request, RUNNING, now, now, None, {}, None)
    with svc.database.write_engine.begin() as conn:
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


def finish(svc: Services, job_id: str, state: str, result: dict[str, Any]) -> None:
    with svc.database.write_engine.begin() as conn:
        conn.execute(
            J.update()
            .where(J.c.id == job_id, J.c.state == RUNNING)
            .values(state=state, finished=now_micros(), result=json.dumps(result))
        )


def cancel(svc: Services, job_id: str) -> None:
    with svc.database.write_engine.begin() as conn:
        conn.execute(
            J.update()
            .where(J.c.id == job_id, J.c.state == RUNNING)
            .values(state=CANCELLED, finished=now_micros())
        )


def forget(svc: Services, job_id: str) -> None:
    with svc.database.write_engine.begin() as conn:
        conn.execute(J.delete().where(J.c.id == job_id))


def start(svc: Services, job: Job, work: Callable[[], dict[str, Any]]) -> None:
    """Run ``work`` (which returns the job's result) in a thread of this process."""

    def run() -> None:
        try:
            result = work()
        except Cancelled:
            return
        except Exception as exc:  # the job fails; the node goes on
            log.exception("bulk %s job %s failed", job.kind, job.id)
            finish(svc, job.id, FAILED, {"error": f"{type(exc).__name__}: {exc}"[:500]})
            return
        finish(svc, job.id, DONE, result)

    threading.Thread(target=run, name=f"bulk-{job.kind}-{job.id[:8]}", daemon=True).start()


def take_over(svc: Services, job: Job) -> bool:
    """Claim a stale job for this process (one claimant wins); True when claimed."""
    with svc.database.write_engine.begin() as conn:
        claimed = conn.execute(
            J.update()
            .where(J.c.id == job.id, J.c.state == RUNNING, J.c.heartbeat == job.heartbeat)
            .values(heartbeat=now_micros())
        ).rowcount
    return bool(claimed)
