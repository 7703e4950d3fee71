"""Bulk import of FHIR NDJSON into this node, for ``hrx adapters bulk-import`` and ``$import``:
one job over a list of files, run by :class:`fhir_adapters.store.bulk_import.BulkImport`.

``POST [base]/$import`` takes the request form of the SMART/HL7 ``$import`` proposal
(github.com/smart-on-fhir/bulk-import, ``import.md``), which HAPI FHIR, Azure and Pathling
also share: a Parameters resource with ``inputFormat`` and one ``input`` per file (parts
``url`` and, optionally, ``type``), asked with ``Prefer: respond-async``. A file declared to
hold one ``type`` refuses a line of another type. ``inputSource`` and ``storageDetail`` are
accepted and not used; ``mode`` is refused whatever its value (this node imports one way:
see :func:`parse_import`). The files must lie in the node's ``import/`` directory and are
named by ``file://`` URLs: the node fetches nothing from the network on a request's word.

Who may import: an admin whose token has a ``system/`` create scope may ask, and follow the job
(its status, its file of refusals, ``DELETE``) with such a token; each line is then
stored only if the token may write its type, judged as ``POST``/``PUT`` judge it (create;
update as well when the resource is stored already). A line the token may not write is
refused as a line. The node's operator, on the command line, has no token and imports every
hosted type. (Tokens come from this node's own token endpoint or ``hrx token issue``; the node
offers the OAuth password grant, not SMART Backend Services.)

The completion manifest follows the proposal: one ``output`` item per input (``type``
OperationOutcome, ``inputUrl``, ``count`` of lines stored, and the created / updated /
unchanged / refused counts under ``extension``), and an ``error`` item pointing to an NDJSON
file of OperationOutcomes, one per refused line.

The command line names a job by its files (each one's full path, size and modification time):
running the same import again resumes it where it stopped, a crash included, and nothing is
stored twice; changed files make a new job, in which lines stored before come out unchanged.
A ``$import`` request is a job of its own; one whose process was lost resumes at the next
status request, where it stopped, with the rights of the token that asked. Its record (the
job's positions, its held and refused lines, its folder) is deleted by ``DELETE`` (a running
job stops first; what it stored stays stored) or when it expires, like an export's, 24 hours
after it ended.

Refused lines are kept aside under the node's directory, ``bulk/<job>/``: ``refused.ndjson``
holds them as they were read (fix them, and import that file), ``refused.txt`` says, for each
in the same order, its file, line and why. Each run of a job ends with one AuditEvent (the
operation, who ran it, the counts so far): finished (outcome 0, or 4 when lines were
refused), stopped by its client (a cancelled ``$import``, an interrupted command: 4) or failed
(8). The resources themselves carry no per-patient AuditEvents (see docs/spec.md §15.9).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from fhir_adapters.errors import Forbidden, InvalidRequest
from fhir_adapters.store import format_instant, jsonio
from fhir_adapters.store.bulk_import import (
    NOT_IMPORTED,
    BulkImport,
    Counts,
    Progress,
    WriteRights,
    forget_job,
    nothing_forbidden,
)
from fhir_adapters.store.resources import RESOURCE_TYPES
from node.flows import bulk_jobs
from node.identity.tokens import Principal, parse_scope
from node.records.audit_trail import Caller
from node.services import Services

log = logging.getLogger(__name__)

FINISHED, STOPPED, FAILED = "finished", "stopped", "failed"  # how a run of a job ended
COUNTS_EXTENSION = "urn:hrx:import-counts"  # the manifest's per-input counts


@dataclass(frozen=True)
class ImportOutcome:
    job: str
    counts: Counts
    finished: bool  # False: cancelled before the end
    refused_lines: Path | None  # refused.ndjson, when any line was refused
    refused_reasons: Path | None  # refused.txt
    per_file: tuple[Counts, ...] = ()  # the counts of each file, in the order given


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


def write_rights(principal: Principal) -> WriteRights:
    """What ``principal``'s token may store, line by line, judged by the same check (and in
    the same words) as ``POST [type]`` and ``PUT [type]/[id]``: a line needs the right to
    create its type, and to update it as well when the resource is stored already."""

    def forbidden(resource_type: str, creating: bool) -> str | None:
        try:
            principal.require(resource_type, "c")
            if not creating:
                principal.require(resource_type, "u")
        except Forbidden as exc:
            return str(exc)
        return None

    return forbidden


def run_import(
    svc: Services,
    caller: Caller,
    files: Sequence[Path],
    *,
    job: str | None = None,
    workers: int | None = None,
    progress: Callable[[Progress], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
    types: Sequence[str | None] | None = None,
    forbidden: WriteRights = nothing_forbidden,
) -> ImportOutcome:
    """Import ``files`` (resuming the job they make, if it was started before); ``types``:
    the type each file is declared to hold (None: any), ``forbidden``: what the caller may
    not write (:func:`write_rights`; by default nothing). However the run ends (finished,
    cancelled, failed), it leaves one AuditEvent with the counts reached."""
    job = job or import_job_id(files)
    engine: BulkImport | None = None
    ending, failure = FAILED, ""
    try:
        engine = BulkImport(
            svc.store,
            job,
            files,
            workers=workers,
            actor=caller.principal,
            progress=progress,
            cancelled=cancelled,
            source_types=types,
            forbidden=forbidden,
        )
        counts = engine.run()
        finished = counts.held == 0 and not (cancelled and cancelled())
        ending = FINISHED if finished else STOPPED
        lines_path = reasons_path = None
        if finished and counts.refused:
            folder = job_directory(svc, job)
            folder.mkdir(parents=True, exist_ok=True)
            lines_path, reasons_path = folder / "refused.ndjson", folder / "refused.txt"
            with (
                lines_path.open("wb") as lines,
                reasons_path.open("w", encoding="utf-8") as reasons,
            ):
                for refusal in engine.refusals():
                    lines.write(refusal.text + b"\n")
                    reason = " ".join(refusal.reason.split())
                    reasons.write(f"{refusal.source}:{refusal.line}: {reason}\n")
        per_file = tuple(engine.source_counts()) if finished else ()
        return ImportOutcome(job, counts, finished, lines_path, reasons_path, per_file)
    except (bulk_jobs.Cancelled, KeyboardInterrupt):
        ending = STOPPED
        raise
    except BaseException as exc:
        failure = type(exc).__name__
        raise
    finally:
        reached = engine.counts if engine is not None else Counts()
        try:
            _audit(svc, caller, job, files, reached, ending, failure)
        except Exception:
            if ending != FAILED:
                raise
            # the failure (a database gone, say) is what the caller must hear of
            log.exception("bulk import %s failed and its AuditEvent could not be recorded", job)


def _audit(
    svc: Services,
    caller: Caller,
    job: str,
    files: Sequence[Path],
    counts: Counts,
    ending: str,
    failure: str,
) -> None:
    """The run's AuditEvent: outcome 0 (finished), 4 (finished with lines refused, or
    stopped by its client) or 8 (failed); what was stored so far stays stored."""
    how = {FINISHED: "", STOPPED: " (stopped before the end)"}.get(ending, f" (failed: {failure})")
    description = (
        f"$import {job}: {len(files)} file(s); {counts.created} created, {counts.updated} "
        f"updated, {counts.unchanged} unchanged, {counts.refused} refused{how}"
    )
    record = caller.record("operation", description=description)
    record.query = "$import"
    if ending == FAILED:
        record.outcome = "8"
    elif ending == STOPPED or counts.refused:
        record.outcome = "4"
    with svc.store.writing(caller.principal) as writer:
        svc.audit.record_in(writer, record)


# -- $import: the same, asked over FHIR by an admin, run as a job -----------------------------

FORMATS = ("application/fhir+ndjson", "application/ndjson", "ndjson")
ACCEPTED_UNUSED = ("inputSource", "storageDetail")  # the proposal's; nothing here depends on them
MODE_REFUSED = (
    "$import takes no mode: this node imports one way only. Each line keeps its id; a "
    "resource not stored yet is created, one stored with other content gets a new version, "
    "one stored with the same content is left unchanged; versionId and lastUpdated are this "
    "node's, as for any write. (Neither InitialLoad, which only creates into an empty server, "
    "nor IncrementalLoad, which keeps the lines' versionId and lastUpdated, is that.) Leave "
    "mode out."
)


@dataclass(frozen=True)
class ImportInput:
    """One ``input`` of a ``$import``: a file in the import directory, the type it is declared
    to hold (None: not declared, any), and its URL as the request gave it."""

    path: Path
    type: str | None
    url: str


def import_directory(svc: Services) -> Path:
    """Where ``$import`` reads its files: nothing outside it (a URL naming a network location
    or another directory is refused, so the node never fetches what a request points at)."""
    return svc.config.directory / "import"


def authorize(principal: Principal) -> None:
    """403 unless ``principal`` may import: an admin's token with a ``system/`` create scope
    (to start an import, and to follow one: its status, its files, ``DELETE``)."""
    if principal.role != "admin" or not any(
        scope.context == "system" and "c" in scope.actions for scope in principal.scopes
    ):
        raise Forbidden(
            f"{principal.username} may not import: $import needs an admin's token with a "
            "system/ create scope (e.g. system/*.cruds)"
        )


def parse_import(svc: Services, principal: Principal, body: Any) -> list[ImportInput]:
    """The inputs a ``$import`` Parameters body names, checked (400; 403 for a caller who may
    not import, or may not create a declared type)."""
    authorize(principal)
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise InvalidRequest("$import takes a Parameters resource")
    folder = import_directory(svc).resolve()
    inputs: list[ImportInput] = []
    for parameter in body.get("parameter") or []:
        name = parameter.get("name") if isinstance(parameter, dict) else None
        if name == "inputFormat":
            if parameter.get("valueCode") not in FORMATS:
                raise InvalidRequest(
                    f"inputFormat {parameter.get('valueCode')!r} is not supported; use "
                    + ", ".join(FORMATS)
                )
        elif name == "input":
            inputs.append(_input(principal, parameter, folder))
        elif name == "mode":
            raise InvalidRequest(MODE_REFUSED)
        elif name not in ACCEPTED_UNUSED:
            raise InvalidRequest(f"$import does not support the parameter {name!r}")
    if not inputs:
        raise InvalidRequest("$import needs at least one input (part url: file://...)")
    seen: set[Path] = set()
    for item in inputs:
        if item.path in seen:
            raise InvalidRequest(f"input url {item.url!r} is given twice")
        seen.add(item.path)
    return inputs


def _input(principal: Principal, parameter: dict[str, Any], folder: Path) -> ImportInput:
    parts = {p.get("name"): p for p in parameter.get("part") or [] if isinstance(p, dict)}
    url_part = parts.get("url") or {}
    url = url_part.get("valueUri") or url_part.get("valueUrl")
    if not isinstance(url, str) or not url.startswith("file://"):
        raise InvalidRequest(
            f"input url {url!r}: give a file:// URL of a file in the node's import "
            f"directory ({folder})"
        )
    path = Path(unquote(url.removeprefix("file://"))).resolve()
    if folder not in path.parents or not path.is_file():
        raise InvalidRequest(f"input url {url!r} names no file in the import directory ({folder})")
    declared = None
    if "type" in parts:
        declared = parts["type"].get("valueCode") or parts["type"].get("valueString")
        if not isinstance(declared, str) or declared not in RESOURCE_TYPES:
            raise InvalidRequest(
                f"input type {declared!r} (of {url}) is not a resource type this node hosts"
            )
        if declared in NOT_IMPORTED:
            raise InvalidRequest(f"input type {declared}: {declared} resources are not imported")
        principal.require(declared, "c")  # every line of it would be refused: say so now
    return ImportInput(path, declared, url)


def start_import(
    svc: Services, caller: Caller, inputs: list[ImportInput], url: str
) -> bulk_jobs.Job:
    principal = caller.principal
    assert principal is not None
    request = {
        "files": [str(item.path) for item in inputs],
        "types": [item.type for item in inputs],
        "urls": [item.url for item in inputs],
        "scopes": [str(scope) for scope in principal.scopes],  # the rights the job runs with
        "url": url,
    }
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
    return job_directory(svc, engine_job(job.id)) / "refused-outcomes.ndjson"


def engine_job(job_id: str) -> str:
    """The import job (its positions, held and refused lines, its folder) of a ``$import``."""
    return f"import-{job_id}"


def cancel_import(svc: Services, job: bulk_jobs.Job) -> None:
    """Stop the job and delete its record and files: a running one's thread does so at its
    next heartbeat; an ended one's are deleted here. What it stored stays stored."""
    bulk_jobs.delete(svc, job.id, lambda job_id: _discard(svc, job_id))


def forget_expired(svc: Services) -> None:
    """Delete the records and files of imports kept past their ``Expires``, and of cancelled
    ones that lost their thread."""
    bulk_jobs.forget_expired(svc, "import", lambda job_id: _discard(svc, job_id))


def _discard(svc: Services, job_id: str) -> None:
    """The engine's record of the job and its folder (not what it stored)."""
    forget_job(svc.store, engine_job(job_id))
    shutil.rmtree(job_directory(svc, engine_job(job_id)), ignore_errors=True)


def _run_in_background(svc: Services, caller: Caller, job: bulk_jobs.Job) -> None:
    bulk_jobs.start(
        svc, job, lambda: run_import_job(svc, caller, job), lambda: _discard(svc, job.id)
    )


def run_import_job(svc: Services, caller: Caller, job: bulk_jobs.Job) -> dict[str, Any]:
    """Run a ``$import`` job (from where it stopped) in this thread; its manifest.
    :class:`bulk_jobs.Cancelled` when it is cancelled meanwhile (found at a heartbeat)."""
    request = job.request
    files = [Path(name) for name in request["files"]]
    types = request.get("types") or [None] * len(files)
    urls = request.get("urls") or [path.as_uri() for path in files]
    principal = caller.principal
    assert principal is not None
    if "scopes" in request:  # the token that asked, under its user's role of now
        principal = replace(principal, scopes=tuple(parse_scope(s) for s in request["scopes"]))
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

    outcome = run_import(
        svc,
        replace(caller, principal=principal),
        files,
        job=engine_job(job.id),
        workers=None,
        progress=progress,
        types=types,
        forbidden=write_rights(principal),
    )
    return _manifest(svc, job, urls, outcome)


def _manifest(
    svc: Services, job: bulk_jobs.Job, urls: Sequence[str], outcome: ImportOutcome
) -> dict[str, Any]:
    """The completion manifest, as the proposal shapes it: ``output`` one item per input
    (``type``, ``inputUrl``, ``count`` of lines stored; what became of its lines under
    ``extension``), ``error`` the file of refusals (``type``, ``url``, ``count``)."""
    base = svc.config.url.rstrip("/") + "/fhir"
    output = []
    for url, counts in zip(urls, outcome.per_file, strict=True):
        output.append(
            {
                "type": "OperationOutcome",
                "inputUrl": url,
                "count": counts.created + counts.updated + counts.unchanged,
                "extension": {
                    COUNTS_EXTENSION: {
                        "created": counts.created,
                        "updated": counts.updated,
                        "unchanged": counts.unchanged,
                        "refused": counts.refused,
                    }
                },
            }
        )
    result: dict[str, Any] = {
        "transactionTime": format_instant(job.created),
        "request": job.request["url"],
        "requiresAccessToken": True,
        "output": output,
        "error": [],
    }
    if outcome.refused_reasons is not None:
        path = import_outcomes(svc, job)
        path.parent.mkdir(parents=True, exist_ok=True)
        with (
            outcome.refused_reasons.open(encoding="utf-8") as reasons,
            path.open("wb") as outcomes,
        ):
            folder = f"{import_directory(svc).resolve()}/"
            for reason in reasons:  # the file named as in the import directory, not by path
                text = reason.strip().removeprefix(folder)
                issue = {"severity": "error", "code": "invalid", "diagnostics": text}
                outcomes.write(
                    jsonio.dump({"resourceType": "OperationOutcome", "issue": [issue]}) + b"\n"
                )
        result["error"].append(
            {
                "type": "OperationOutcome",
                "url": f"{base}/$bulk-file/{job.id}/{path.name}",
                "count": outcome.counts.refused,
            }
        )
    return result
