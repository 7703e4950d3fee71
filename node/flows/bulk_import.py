"""Bulk import of FHIR NDJSON into this node, for ``hrx adapters bulk-import`` and ``$import``:
one job over a list of files, run by :class:`fhir_adapters.store.bulk_import.BulkImport`.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fhir_adapters.store.bulk_import import BulkImport, Counts, Progress
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
