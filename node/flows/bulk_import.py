"""Bulk import of FHIR NDJSON into this node, for ``hrx adapters bulk-import`` and ``$import``:
one job over a list of files, run by :class:`fhir_adapters.store.bulk_import.BulkImport`.

``POST [base]/$import`` takes the request form HAPI FHIR, Azure and Pathling share (the Bulk
Data IG's import is still a draft): a Parameters resource with ``inputFormat`` and one
``input`` per file (parts ``type`` and ``url``), asked with ``Prefer: respond-async``. The
files must lie in the node's ``import/`` directory and are named by ``file://`` URLs: the node
fetches nothing from the network on a request's word. Only an admin with a ``system/`` create
scope may import. The completion manifest counts what was stored; its ``error`` entry points
to an NDJSON file of OperationOutcomes, one per refused line.

A job is named by its files (each one's full path, size and modification time): running the
same import again resumes it where it stopped, a crash included, and nothing is stored twice.
Changed files make a new job; since resources keep their ids, lines stored before come out
unchanged.

Refused lines are kept aside under the node's directory, ``bulk/<job>/``: ``refused.ndjson``
holds them as they were read (fix them, and import that file), ``refused.txt`` says, for each
in the same order, its file, line and why. The job ends with one AuditEvent (the operation,
who ran it, the counts); the resources themselves carry no per-patient AuditEvents (see
docs/spec.md §15.9).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from fhir_adapters.errors import Forbidden, InvalidRequest
from fhir_adapters.store import format_instant, jsonio
from fhir_adapters.store.bulk_import import BulkImport, Counts, Progress
from node.flows import bulk_jobs
from node.identity.tokens import Principal
from node.records.audit_trail import Caller
from node.services import Services


@dataclass(frozen=True)
class ImportOutcome:
    job: str
    counts: Counts
    finished: bool  # False: cancelled before the end
    refused_lines: Path | None  # refused.ndjson, when any line was refused
    refused_reasons: Path | None  # refused.txt


def import_job_id(files: Sequence[Path]) -> str:
    """The job a list of files makes: the same files, unchanged, make the same job."""
    digest = hashlib.sha256()
    for path in files:
        resolved = path.resolve()
        status = resolved.stat()
        digest.update(json.dumps([str(resolved), status.st_size, status.st_mtime_ns]).encode())
    return "import-" + digest.hexdigest()[:20]


def job_directory(svc: Services, job: str) -> Path:
    return svc.config.directory / "bulk" / job


def run_import(
    svc: Services,
    caller: Caller,
    files: Sequence[Path],
    *,
    job: str | None = None,
    workers: int | None = None,
    progress: Callable[[Progress], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> ImportOutcome:
    """Import ``files`` (resuming the job they make, if it was started before)."""
    job = job or import_job_id(files)
    engine = BulkImport(
        svc.store,
        job,
        files,
        workers=workers,
        actor=caller.principal,
        progress=progress,
        cancelled=cancelled,
    )
    counts = engine.run()
    finished = counts.held == 0 and not (cancelled and cancelled())
    lines_path = reasons_path = None
    if finished and counts.refused:
        folder = job_directory(svc, job)
        folder.mkdir(parents=True, exist_ok=True)
        lines_path, reasons_path = folder / "refused.ndjson", folder / "refused.txt"
        with lines_path.open("wb") as lines, reasons_path.open("w", encoding="utf-8") as reasons:
            for refusal in engine.refusals():
                lines.write(refusal.text + b"\n")
                reason = " ".join(refusal.reason.split())
                reasons.write(f"{refusal.source}:{refusal.line}: {reason}\n")
    if finished:
        _audit(svc, caller, job, files, counts)
    return ImportOutcome(job, counts, finished, lines_path, reasons_path)


def _audit(svc: Services, caller: Caller, job: str, files: Sequence[Path], counts: Counts) -> None:
    description = (
        f"$import {job}: {len(files)} file(s); {counts.created} created, {counts.updated} "
        f"updated, {counts.unchanged} unchanged, {counts.refused} refused"
    )
    record = caller.record("operation", description=description)
    record.query = "$import"
    if counts.refused:
        record.outcome = "4"
    with svc.store.writing(caller.principal) as writer:
        svc.audit.record_in(writer, record)


# -- $import: the same, asked over FHIR by an admin, run as a job -----------------------------

FORMATS = ("application/fhir+ndjson", "application/ndjson", "ndjson")


def import_directory(svc: Services) -> Path:
    """Where ``$import`` reads its files: nothing outside it (a URL naming a network location
    or another directory is refused, so the node never fetches what a request points at)."""
    return svc.config.directory / "import"


def parse_import(svc: Services, principal: Principal, body: Any) -> list[Path]:
    """The files a ``$import`` Parameters body names, checked (400, or 403 for a caller who
    may not import)."""
    if principal.role != "admin" or not any(
        scope.context == "system" and "c" in scope.actions for scope in principal.scopes
    ):
        raise Forbidden(
            f"{principal.username} may not import: $import needs an admin's token with a "
            "system/ create scope (e.g. system/*.cruds)"
        )
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise InvalidRequest("$import takes a Parameters resource")
    folder = import_directory(svc).resolve()
    files: list[Path] = []
    for parameter in body.get("parameter") or []:
        name = parameter.get("name") if isinstance(parameter, dict) else None
        if name == "inputFormat":
            if parameter.get("valueCode") not in FORMATS:
                raise InvalidRequest(
                    f"inputFormat {parameter.get('valueCode')!r} is not supported; use "
                    + ", ".join(FORMATS)
                )
        elif name == "input":
            parts = {p.get("name"): p for p in parameter.get("part") or [] if isinstance(p, dict)}
            url = (parts.get("url") or {}).get("valueUri") or (parts.get("url") or {}).get(
                "valueUrl"
            )
            if not isinstance(url, str) or not url.startswith("file://"):
                raise InvalidRequest(
                    f"input url {url!r}: give a file:// URL of a file in the node's import "
                    f"directory ({folder})"
                )
            path = Path(unquote(url.removeprefix("file://"))).resolve()
            if folder not in path.parents or not path.is_file():
                raise InvalidRequest(
                    f"input url {url!r} names no file in the import directory ({folder})"
                )
            files.append(path)
        elif name not in ("inputSource", "mode", "storageDetail"):
            raise InvalidRequest(f"$import does not support the parameter {name!r}")
    if not files:
        raise InvalidRequest("$import needs at least one input (part url: file://...)")
    return files


def start_import(svc: Services, caller: Caller, files: list[Path], url: str) -> bulk_jobs.Job:
    principal = caller.principal
    assert principal is not None
    request = {"files": [str(path) for path in files], "url": url}
    job = bulk_jobs.new_job(svc, "import", principal.username, request)
    _run_in_background(svc, caller, job)
    return job


def import_status(svc: Services, caller: Caller, job: bulk_jobs.Job) -> bulk_jobs.Job:
    """The job; one whose process was lost resumes here."""
    if job.stale and bulk_jobs.take_over(svc, job):
        _run_in_background(svc, caller, job)
    return job


def import_outcomes(svc: Services, job: bulk_jobs.Job) -> Path:
    """The job's file of refusals: one OperationOutcome per refused line."""
    return job_directory(svc, f"import-{job.id}") / "refused-outcomes.ndjson"


def _run_in_background(svc: Services, caller: Caller, job: bulk_jobs.Job) -> None:
    files = [Path(name) for name in job.request["files"]]
    state: dict[str, Any] = {"last": 0.0}

    def progress(where: Progress) -> None:
        now = time.monotonic()
        if now - state["last"] >= bulk_jobs.HEARTBEAT_SECONDS:
            state["last"] = now
            counts = where.counts
            bulk_jobs.beat(
                svc,
                job.id,
                {"bytes": where.bytes_done, "of": where.bytes_total, "lines": counts.settled},
            )

    def work() -> dict[str, Any]:
        outcome = run_import(svc, caller, files, workers=None, progress=progress)
        counts = outcome.counts
        base = svc.config.url.rstrip("/") + "/fhir"
        result: dict[str, Any] = {
            "transactionTime": format_instant(job.created),
            "request": job.request["url"],
            "requiresAccessToken": True,
            "output": [
                {
                    "type": "OperationOutcome",
                    "count": counts.created + counts.updated + counts.unchanged,
                    "created": counts.created,
                    "updated": counts.updated,
                    "unchanged": counts.unchanged,
                }
            ],
            "error": [],
        }
        if outcome.refused_reasons is not None:
            folder = job_directory(svc, f"import-{job.id}")
            folder.mkdir(parents=True, exist_ok=True)
            with (
                outcome.refused_reasons.open(encoding="utf-8") as reasons,
                (folder / "refused-outcomes.ndjson").open("wb") as outcomes,
            ):
                for reason in reasons:
                    issue = {"severity": "error", "code": "invalid", "diagnostics": reason.strip()}
                    outcomes.write(
                        jsonio.dump({"resourceType": "OperationOutcome", "issue": [issue]}) + b"\n"
                    )
            result["error"].append(
                {
                    "type": "OperationOutcome",
                    "count": counts.refused,
                    "url": f"{base}/$bulk-file/{job.id}/refused-outcomes.ndjson",
                }
            )
        return result

    bulk_jobs.start(svc, job, work)
