"""Bulk export (FHIR Bulk Data Access IG 2.0, ``$export``): every resource of the asked types
as NDJSON files, written by a job in the background and fetched by the client afterwards.

Three levels: the whole server (``[base]/$export``), every patient's compartment
(``Patient/$export``: the Patients and the resources in a patient's compartment) and a
Group's members' compartments (``Group/[id]/$export``). Parameters: ``_outputFormat``
(``application/fhir+ndjson``, ``application/ndjson`` or ``ndjson``), ``_type`` (types, comma
separated; default every type the caller may read, at patient level those in the patient
compartment), ``_since`` (an instant: resources changed after it) and ``_typeFilter``
(``Type?search``, searches as the API reads them; a value may list several, comma separated,
and several for one type are OR-ed; result parameters such as ``_sort`` or ``_count`` in one
are refused). Anything else is refused (400) rather than ignored.

A Group export takes the Group's current members: ``member.entity`` Patients that are not
``inactive`` and whose ``period`` (if any) holds now. At Patient and Group level, the
Provenance resources whose ``target`` is a resource of an exported type in one of the export's
compartments come too (the IG's rule when ``includeAssociatedData`` is not offered).

What is exported is the store as it was at the manifest's ``transactionTime``, two seconds
before the job started; before reading, the export waits for every write begun by then to end
(:func:`_wait_for_older_writes`), so that a client that asks again with ``_since`` equal to it
misses nothing and gets nothing twice. A resource changed after that keeps its version of then;
one created after it is left out. With ``_since``, the manifest's ``deleted`` lists what was
deleted since (transaction Bundles of DELETE entries, as the IG asks).

Files are written straight from the stored bytes, ``LINES_PER_FILE`` resources a file, read
``BATCH`` rows at a time in (lastUpdated, row) order through the store's index: memory stays
flat whatever the size, and each row is read once.

Only tokens with a ``system/`` read scope may export (issued by ``hrx token issue`` or the
token endpoint's password grant to an admin or an auditor account), and only the types their
``system/`` scopes and role may read; the job's status and files ask the same of the token
that fetches them (:func:`authorize`). Each export is recorded as an AuditEvent (who, what was
asked, how many resources).

At most :data:`MOST_RUNNING` exports run at once on a node (more: 429). A cancelled job stops
at its next check (before each file, and at each heartbeat while it writes) and deletes its
own folder. A finished job's files are kept :data:`bulk_jobs.RETENTION_SECONDS` (the
manifest's ``Expires``) and deleted at the first bulk request after that
(:func:`forget_expired`).
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qsl

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from consent.model import EMERGENCY, PURPOSES, RESEARCH
from fhir_adapters.definitions import patient_compartment
from fhir_adapters.errors import Forbidden, InvalidRequest, NotFound
from fhir_adapters.store import Stored, format_instant, jsonio, now_micros, tables
from fhir_adapters.store.resources import RESOURCE_TYPES
from fhir_adapters.store.search import Access, match_query, parse_search
from fhir_adapters.store.search_params import date_range, index_values, parse_reference
from node.flows import bulk_jobs, member_export
from node.flows.access_decision import RESULT_TYPES
from node.flows.export_files import LINES_PER_FILE
from node.flows.prior_results import CATEGORIES as RELEASED_CATEGORIES
from node.identity.tokens import Principal
from node.records.audit_trail import Caller
from node.services import Services

FORMATS = ("application/fhir+ndjson", "application/ndjson", "ndjson")
LEVELS = ("system", "patient", "group")
PARAMETERS = ("_outputFormat", "_type", "_since", "_typeFilter")
MEMBER_PARAMETERS = ("source", "purpose", "category", "study")  # a Group's export from members
STUDY_STATUSES = ("approved", "active")  # a ResearchStudy a research export may be for
BATCH = 1000
SETTLE_SECONDS = 2  # transactionTime lies this far before the job starts (see the module)
WRITES_WAIT_SECONDS = 600  # PostgreSQL: how long an export waits for older writes to end
# a write transaction of the node's database, begun at or before a time, that is still open
# (it has written: PostgreSQL gave it a transaction id; readers, such as other exports, have
# none)
_OLDER_WRITE = sa.text(
    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
    "AND pid <> pg_backend_pid() AND backend_xid IS NOT NULL AND xact_start <= :before LIMIT 1"
)
MOST_RUNNING = 4  # exports running at once on a node; one more is refused (429)
RESULT_PARAMETERS = (  # search result parameters the IG forbids in a _typeFilter
    "_sort",
    "_include",
    "_revinclude",
    "_count",
    "_summary",
    "_elements",
    "_total",
    "_contained",
    "_containedType",
)
# where a _typeFilter value's next query starts: a comma before "Type?" (a comma in a search
# value is escaped, \,)
_NEXT_QUERY = re.compile(r"(?<!\\),(?=[A-Z][A-Za-z]+\?)")
_INSTANT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})")

R, V, C = tables.resources, tables.versions, tables.compartment
REF = tables.references


def bulk_readable(principal: Principal) -> tuple[str, ...]:
    """The types ``principal`` may export: readable and searchable through its ``system/``
    scopes (a ``user/`` or ``patient/`` scope does not widen a bulk export) and its role."""
    system = replace(principal, scopes=tuple(s for s in principal.scopes if s.context == "system"))
    return tuple(t for t in RESOURCE_TYPES if system.allows(t, "r") and system.allows(t, "s"))


def authorize(principal: Principal, job: bulk_jobs.Job) -> None:
    """403 unless ``principal`` may export every type of the export ``job`` (its status and
    files ask what its kick-off asked); the job is the principal's (404 otherwise) already."""
    readable = set(bulk_readable(principal))
    missing = [t for t in job.request.get("types", []) if t not in readable]
    if missing:
        raise Forbidden(
            f"{principal.username}'s token may not read "
            + ", ".join(missing[:5])
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            + " through a system/ scope: this export's status and files need a token whose "
            "system/ scopes cover every type it exports"
        )


@dataclass(frozen=True)
class ExportRequest:
    level: str
    group: str | None
    types: tuple[str, ...]
    since: int | None  # µs: only resources changed after it
    type_filters: dict[str, list[str]] = field(default_factory=dict)  # type: its searches
    url: str = ""  # the kick-off request as asked
    sources: tuple[str, ...] = ()  # members asked for their results (none: this node's own)
    purpose: str = "TREAT"  # of an export from members
    categories: tuple[str, ...] = ()  # the data categories asked of members
    study: str | None = None  # ResearchStudy/{id}: what a research export (HRESCH) is for
    study_hash: str | None = None  # the hash of its version when the export was asked
    patients: tuple[str, ...] = ()  # a POST kick-off's ``patient``: only these (none: all)

    def as_json(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "group": self.group,
            "types": list(self.types),
            "since": self.since,
            "type_filters": self.type_filters,
            "url": self.url,
            "sources": list(self.sources),
            "purpose": self.purpose,
            "categories": list(self.categories),
            "study": self.study,
            "study_hash": self.study_hash,
            "patients": list(self.patients),
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> ExportRequest:
        return cls(
            value["level"],
            value["group"],
            tuple(value["types"]),
            value["since"],
            value["type_filters"],
            value["url"],
            tuple(value.get("sources", ())),  # absent from jobs recorded before these
            value.get("purpose", "TREAT"),
            tuple(value.get("categories", ())),
            value.get("study"),
            value.get("study_hash"),
            tuple(value.get("patients", ())),
        )


def parse_export(
    svc: Services,
    principal: Principal,
    level: str,
    group: str | None,
    query: Sequence[tuple[str, str]],
    url: str,
    *,
    posted: bool = False,
    lenient: bool = False,
) -> tuple[ExportRequest, list[str]]:
    """The export asked for (``query``: a GET's query, or a POST's Parameters as
    :func:`posted_query` reads them), checked: 400 for what the IG or this server does not
    allow, 403 for what the caller may not read; and the parameters left out. A parameter
    this server does not support is a 400, or, ``lenient`` (``Prefer: handling=lenient``),
    left out and named in that list (its values are not looked at)."""
    if not any(scope.context == "system" for scope in principal.scopes):
        raise Forbidden(
            f"{principal.username} may not export: bulk export needs a token with a system/ "
            "read scope (e.g. from hrx token issue --scope system/*.rs), held by an admin or an "
            "auditor account"
        )
    values: dict[str, list[str]] = {}
    ignored: list[str] = []
    supported = PARAMETERS + MEMBER_PARAMETERS + (("patient",) if posted else ())
    for name, value in query:
        if name in supported:
            values.setdefault(name, []).append(value)
        elif lenient:
            ignored.append(name)
        else:
            raise InvalidRequest(
                f"$export does not support the parameter {name!r}"
                + (" in a GET kick-off (POST it in a Parameters body)" if name == "patient" else "")
                + "; supported: "
                + ", ".join(supported)
                + " (or send Prefer: handling=lenient to have it left out)"
            )
    ignored = list(dict.fromkeys(ignored))
    for output_format in values.get("_outputFormat", []):
        if output_format not in FORMATS:
            raise InvalidRequest(
                f"_outputFormat {output_format!r} is not supported; use one of "
                + ", ".join(FORMATS)
            )
    in_compartment = {t for t in RESOURCE_TYPES if patient_compartment(t)} | {"Patient"}
    readable = bulk_readable(principal)
    asked = [t.strip() for v in values.get("_type", []) for t in v.split(",") if t.strip()]
    for resource_type in asked:
        if resource_type not in RESOURCE_TYPES:
            raise InvalidRequest(
                f"_type: {resource_type!r} is not a resource type this server hosts"
            )
        if resource_type not in readable:
            raise Forbidden(f"{principal.username} may not read {resource_type} resources")
        if level != "system" and resource_type not in in_compartment:
            raise InvalidRequest(
                f"_type: {resource_type} resources are in no patient's compartment; a "
                f"{level}-level export holds only those (export it at [base]/$export)"
            )
    types = tuple(dict.fromkeys(asked)) or tuple(
        t for t in readable if level == "system" or t in in_compartment
    )
    since = None
    for text in values.get("_since", [])[-1:]:
        if not _INSTANT.fullmatch(text):
            raise InvalidRequest(
                f"_since {text!r} is not a FHIR instant (e.g. 2026-01-01T00:00:00+08:00)"
            )
        since = int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 10**6)
    filters: dict[str, list[str]] = {}
    for text in (q for v in values.get("_typeFilter", []) for q in _NEXT_QUERY.split(v)):
        resource_type, _, search = text.partition("?")
        if resource_type not in types:
            raise InvalidRequest(
                f"_typeFilter {text!r}: {resource_type or 'no type'} is not among the exported "
                "types"
            )
        query = parse_qsl(search, keep_blank_values=True)
        for name, _ in query:
            if name.partition(":")[0] in RESULT_PARAMETERS:
                raise InvalidRequest(
                    f"_typeFilter {text!r}: {name} is a search result parameter, which a "
                    "_typeFilter may not hold (" + ", ".join(RESULT_PARAMETERS) + ")"
                )
        parse_search(resource_type, query)  # 400 if wrong
        filters.setdefault(resource_type, []).append(search)
    request = ExportRequest(level, group, types, since, filters, url)
    if "patient" in values:
        request = replace(request, patients=_patients(level, values["patient"]))
    if any(name in values for name in MEMBER_PARAMETERS):
        return _from_members(svc, principal, request, values, bool(asked)), ignored
    return request, ignored


def _patients(level: str, references: list[str]) -> tuple[str, ...]:
    """The ids of a POST kick-off's ``patient`` references (Patient and Group level only)."""
    if level == "system":
        raise InvalidRequest(
            "patient: a system-level export takes no patient (use Patient/$export or "
            "Group/[id]/$export)"
        )
    patients = []
    for reference in references:
        target = parse_reference(reference)
        if target is None or target[0] != "Patient":
            raise InvalidRequest(f"patient: {reference!r} is not a reference Patient/[id]")
        patients.append(target[1])
    if len(set(patients)) > MOST_MEMBERS:
        raise InvalidRequest(f"patient: at most {MOST_MEMBERS:,} patients in one export")
    return tuple(sorted(set(patients)))


def posted_query(body: Any) -> list[tuple[str, str]]:
    """A POST kick-off's Parameters as (name, value) pairs, as a GET's query would give them:
    each parameter's one primitive ``value[x]``; ``patient`` a ``valueReference``."""
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise InvalidRequest("a POST $export takes a Parameters resource")
    query = []
    for parameter in body.get("parameter", []):
        name = parameter.get("name", "")
        if name == "patient":
            reference = (parameter.get("valueReference") or {}).get("reference")
            if not isinstance(reference, str):
                raise InvalidRequest("patient: give a valueReference with a reference")
            query.append((name, reference))
            continue
        if name not in PARAMETERS + MEMBER_PARAMETERS:  # not offered, whatever its value
            query.append((name, ""))  # parse_export refuses it, or leaves it out (lenient)
            continue
        values = [v for k, v in parameter.items() if k.startswith("value")]
        if len(values) != 1 or not isinstance(values[0], str) or "part" in parameter:
            raise InvalidRequest(f"parameter {name!r}: give it one value[x] of a string type")
        query.append((name, values[0]))
    return query


def _from_members(
    svc: Services,
    principal: Principal,
    request: ExportRequest,
    values: dict[str, list[str]],
    typed: bool,
) -> ExportRequest:
    """``request`` as an export of results from the members ``source`` names (see
    :mod:`node.flows.member_export`), checked."""
    if request.level != "group":
        raise InvalidRequest(
            "source: results are exported from other members for a Group's patients only "
            "(Group/[id]/$export?source=…)"
        )
    if principal.role != "admin":
        raise Forbidden(
            f"{principal.username} ({principal.role}) may not export from other members: "
            "an admin account's system/ token may"
        )
    members = {m["id"] for m in svc.chain_store.roster().body["members"]}
    sources = _listed(values, "source")
    if not sources:
        raise InvalidRequest("source: name the members to export from (their ids, comma separated)")
    for member in sources:
        if member == svc.config.node_id or member not in members:
            raise InvalidRequest(
                f"source: {member!r} is not another member of the consortium "
                f"(members: {', '.join(sorted(members - {svc.config.node_id}))})"
            )
    purposes = values.get("purpose", ["TREAT"])
    purpose = purposes[-1]
    if purpose not in PURPOSES or purpose == EMERGENCY:
        raise InvalidRequest(
            f"purpose {purpose!r}: an export from members is for "
            + ", ".join(p for p in PURPOSES if p != EMERGENCY)
            + f" (emergency access, {EMERGENCY}, is asked for one patient at a time)"
        )
    study, study_hash = _study(svc, purpose, values.get("study", []))
    categories = _listed(values, "category") or list(RELEASED_CATEGORIES)
    for category in categories:
        if category not in RELEASED_CATEGORIES:
            raise InvalidRequest(
                f"category {category!r}: members release " + ", ".join(RELEASED_CATEGORIES)
            )
    if request.type_filters:
        raise InvalidRequest("_typeFilter is not supported for an export from members")
    types = request.types if typed else tuple(t for t in request.types if t in RESULT_TYPES)
    for resource_type in types:
        if resource_type not in RESULT_TYPES:
            raise InvalidRequest(
                f"_type: members release {', '.join(RESULT_TYPES)}, not {resource_type}"
            )
    return replace(
        request,
        types=types,
        sources=tuple(sources),
        purpose=purpose,
        categories=tuple(categories),
        study=study,
        study_hash=study_hash,
    )


def _study(svc: Services, purpose: str, asked: list[str]) -> tuple[str | None, str | None]:
    """The ResearchStudy a research export is for and its version's hash (none for another
    purpose): held here, approved or active. Its hash goes on the ledger with each question."""
    study = asked[-1].strip() if asked else ""
    if purpose != RESEARCH:
        if study:
            raise InvalidRequest(
                f"study: only an export for research (purpose={RESEARCH}) names a study"
            )
        return None, None
    kind, _, study_id = study.partition("/")
    if kind != "ResearchStudy" or not study_id:
        raise InvalidRequest(
            f"study: an export for research ({RESEARCH}) names the approved study it is for, "
            "study=ResearchStudy/{id}"
        )
    try:
        stored = svc.store.read("ResearchStudy", study_id)
    except NotFound:
        raise InvalidRequest(f"study: {study} is not held here") from None
    status = stored.resource().get("status")
    if status not in STUDY_STATUSES:
        raise InvalidRequest(
            f"study: {study} has status {status!r}; a research export needs a study that is "
            + " or ".join(STUDY_STATUSES)
        )
    return study, stored.sha256()


def _listed(values: dict[str, list[str]], name: str) -> list[str]:
    return list(
        dict.fromkeys(t.strip() for v in values.get(name, []) for t in v.split(",") if t.strip())
    )


# -- the job ------------------------------------------------------------------------------


def start_export(svc: Services, caller: Caller, request: ExportRequest) -> bulk_jobs.Job:
    """Record the job and run it in a thread of this process; the job."""
    principal = caller.principal
    assert principal is not None
    if request.level == "group":
        _group(svc, str(request.group))  # 404 now rather than a failed job
    job = bulk_jobs.new_job(
        svc, "export", principal.username, request.as_json(), most_running=MOST_RUNNING
    )
    _run_in_background(svc, caller, job)
    return job


def _run_in_background(svc: Services, caller: Caller, job: bulk_jobs.Job) -> None:
    request = ExportRequest.from_json(job.request)
    bulk_jobs.start(
        svc,
        job,
        lambda: export(svc, caller, job, request),
        lambda: _discard(svc, job.id),
    )


def export_status(svc: Services, caller: Caller, job: bulk_jobs.Job) -> bulk_jobs.Job:
    """The job; one whose process was lost starts again here."""
    if job.stale and bulk_jobs.take_over(svc, job):
        _run_in_background(svc, caller, job)
    return job


def cancel_export(svc: Services, job: bulk_jobs.Job) -> None:
    """Cancel the export: a running one's thread stops at its next check and deletes its
    files and record itself; an ended one's are deleted here."""
    bulk_jobs.delete(svc, job.id, lambda job_id: _discard(svc, job_id))


def forget_expired(svc: Services) -> None:
    """Delete the files and records of exports kept past their ``Expires``, and of cancelled
    ones that lost their thread."""
    bulk_jobs.forget_expired(svc, "export", lambda job_id: _discard(svc, job_id))


def _discard(svc: Services, job_id: str) -> None:
    shutil.rmtree(export_folder(svc, job_id), ignore_errors=True)


def export_files(svc: Services, job: bulk_jobs.Job) -> dict[str, Path]:
    """The files of a finished export, by name."""
    if job.state != bulk_jobs.DONE:
        return {}
    folder = export_folder(svc, job.id)
    return {
        Path(item["url"]).name: folder / Path(item["url"]).name
        for part in ("output", "error", "deleted")
        for item in (job.result or {}).get(part, [])
    }


def _wait_for_older_writes(svc: Services, before: int, beats: Callable[[int], None]) -> None:
    """Wait until every write transaction begun at or before ``before`` (µs) has ended, so
    that what it stamped up to then is committed before the export reads (PostgreSQL: writers
    run side by side, and one may commit long after it stamped its rows). On SQLite the
    kick-off's own write already waited for them: one writer at a time, each stamping its
    rows once it holds the lock. More than :data:`WRITES_WAIT_SECONDS`: the job fails (its error,
    in the node's log, names the backend that held it up)."""
    deadline = time.monotonic() + WRITES_WAIT_SECONDS
    moment = datetime.fromtimestamp(before / 10**6, UTC)
    while True:
        with svc.database.engine.connect() as conn:
            row = conn.execute(_OLDER_WRITE, {"before": moment}).first()
        if row is None:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"a write transaction begun before the export's transactionTime (PostgreSQL "
                f"backend {row[0]}) is still open after {WRITES_WAIT_SECONDS} s"
            )
        beats(0)  # the job's heartbeat goes on (and stops it if it was cancelled)
        time.sleep(0.2)


def export_folder(svc: Services, job_id: str) -> Path:
    return svc.config.directory / "bulk" / f"export-{job_id}"


def export(
    svc: Services, caller: Caller, job: bulk_jobs.Job, request: ExportRequest
) -> dict[str, Any]:
    """Write the export's files; its manifest (the IG's completion body)."""
    transaction_time = job.created - SETTLE_SECONDS * 10**6
    folder = export_folder(svc, job.id)
    if not (request.sources and member_export.has_checkpoint(folder)):
        shutil.rmtree(folder, ignore_errors=True)  # an earlier attempt's files: start again
    folder.mkdir(parents=True, exist_ok=True)
    base = svc.config.url.rstrip("/") + "/fhir"
    output: list[dict[str, Any]] = []
    state = {"resources": 0, "now": ""}  # the job's progress: written, and what it is at
    beats = _Beats(svc, job.id, state)
    beats.check()  # cancelled before it began: stop before writing anything
    group, members = _group(svc, str(request.group)) if request.level == "group" else (None, None)
    if request.patients:  # a POST kick-off's patient: only these of the Group, or of all
        members = sorted(
            set(request.patients).intersection(request.patients if members is None else members)
        )
    errors: list[dict[str, Any]] = []
    if svc.database.engine.dialect.name == "postgresql" and not request.sources:
        _wait_for_older_writes(svc, transaction_time, beats)
    if request.sources:
        output, errors = member_export.export_from_members(
            svc, caller, request, members or [], folder, f"{base}/$bulk-file/{job.id}", beats, state
        )
    else:
        for resource_type in request.types:
            state["now"] = resource_type
            with svc.database.engine.connect() as conn:
                rows = _rows(conn, svc, request, resource_type, transaction_time, members)
                for number, count in _write_files(folder, resource_type, rows, beats, beats.check):
                    name = f"{resource_type}-{number}.ndjson"
                    output.append(
                        {
                            "type": resource_type,
                            "url": f"{base}/$bulk-file/{job.id}/{name}",
                            "count": count,
                        }
                    )
    manifest = {
        "transactionTime": format_instant(transaction_time),
        "request": request.url,
        "requiresAccessToken": True,
        "output": output,
        "error": errors,
    }
    if request.since is not None and not request.sources:
        manifest["deleted"] = _write_deletions(
            svc, request, transaction_time, members, folder, base, job.id, beats.check
        )
    beats.check()  # cancelled while it wrote: no audit of an export nobody gets
    _audit(svc, caller, request, sum(item["count"] for item in output), group, members or [])
    return manifest


def _write_deletions(
    svc: Services,
    request: ExportRequest,
    moment: int,
    members: list[str] | None,
    folder: Path,
    base: str,
    job_id: str,
    check: Callable[[], None],
) -> list[dict[str, Any]]:
    """The manifest's ``deleted`` items (the IG: with ``_since``, the resources deleted since,
    as transaction Bundles of DELETE entries, a thousand a Bundle) and their files."""

    def bundles() -> Iterator[bytes]:
        with svc.database.engine.connect() as conn:
            for resource_type in request.types:
                batch: list[dict[str, Any]] = []
                for reference in _deletions(conn, svc, request, resource_type, moment, members):
                    batch.append({"request": {"method": "DELETE", "url": reference}})
                    if len(batch) == BATCH:
                        yield jsonio.dump(
                            {"resourceType": "Bundle", "type": "transaction", "entry": batch}
                        )
                        batch = []
                if batch:
                    yield jsonio.dump(
                        {"resourceType": "Bundle", "type": "transaction", "entry": batch}
                    )

    return [
        {
            "type": "Bundle",
            "url": f"{base}/$bulk-file/{job_id}/deleted-{number}.ndjson",
            "count": count,
        }
        for number, count in _write_files(folder, "deleted", bundles(), lambda written: None, check)
    ]


def _deletions(
    conn: Connection,
    svc: Services,
    request: ExportRequest,
    resource_type: str,
    moment: int,
    members: list[str] | None,
) -> Iterator[str]:
    """``Type/id`` of each resource of one type deleted after ``_since`` and by ``moment``; at
    Patient or Group level, only those whose version before the deletion was in one of the
    export's compartments (a deleted resource has no index left to ask)."""
    after = -1
    while True:
        batch = conn.execute(
            sa.select(R.c.res_pk, R.c.id, R.c.version)
            .where(
                R.c.type == resource_type,
                R.c.deleted.is_(True),
                R.c.last_updated > request.since,
                R.c.last_updated <= moment,
                R.c.res_pk > after,
            )
            .order_by(R.c.res_pk)
            .limit(BATCH)
        ).all()
        kept = None
        if request.level != "system":
            before = svc.store.versions_of([(pk, version - 1) for pk, _, version in batch])
            kept = {
                stored.res_pk
                for stored in before
                if stored.body is not None
                and _in_scope(
                    index_values(stored.resource(), svc.store.base_url).compartment, members
                )
            }
        for res_pk, resource_id, _ in batch:
            if kept is None or res_pk in kept:
                yield f"{resource_type}/{resource_id}"
        if len(batch) < BATCH:
            return
        after = batch[-1][0]


def _in_scope(compartment: set[str], members: list[str] | None) -> bool:
    """Whether a resource in these patients' compartments is in a Patient export (any
    patient) or a Group export (one of the ``members``)."""
    return bool(compartment if members is None else compartment & set(members))


class _Beats:
    """The job's heartbeat, every few seconds (:class:`~node.flows.bulk_jobs.Cancelled` when
    the job was cancelled)."""

    def __init__(self, svc: Services, job_id: str, state: dict[str, Any]) -> None:
        self.svc, self.job_id, self.state = svc, job_id, state
        self.last = now_micros()

    def __call__(self, written: int) -> None:
        self.state["resources"] += written
        now = now_micros()
        if now - self.last >= bulk_jobs.HEARTBEAT_SECONDS * 10**6:
            self.check()

    def check(self) -> None:
        """Beat now: :class:`~node.flows.bulk_jobs.Cancelled` if the job was cancelled."""
        self.last = now_micros()
        bulk_jobs.beat(self.svc, self.job_id, dict(self.state))


def _write_files(
    folder: Path,
    resource_type: str,
    rows: Iterator[bytes],
    advance: Callable[[int], None],
    check: Callable[[], None],
) -> Iterator[tuple[int, int]]:
    """Write ``rows`` into ``<type>-<n>.ndjson`` files; (n, lines) of each file written.
    ``check`` is called before each file is begun (it raises to stop)."""
    number, count = 0, 0
    handle: BinaryIO | None = None
    pending = 0
    try:
        for body in rows:
            if handle is None or count == LINES_PER_FILE:
                if handle is not None:
                    handle.close()
                    yield number, count
                check()
                number, count = number + 1, 0
                handle = (folder / f"{resource_type}-{number}.ndjson").open("wb")
            handle.write(body)
            handle.write(b"\n")
            count += 1
            pending += 1
            if pending == BATCH:
                advance(pending)
                pending = 0
    finally:
        if handle is not None:
            handle.close()
    advance(pending)
    if handle is not None:
        yield number, count


def _rows(
    conn: Connection,
    svc: Services,
    request: ExportRequest,
    resource_type: str,
    moment: int,
    members: list[str] | None,
) -> Iterator[bytes]:
    """The stored bodies of one type as of ``moment``, in (lastUpdated, row) order: first
    what was current then and has not changed since, then the older versions of what
    changed after ``moment``. Compartments and ``_typeFilter`` are judged by the search
    index, i.e. by current versions."""
    scope = _scope(request, resource_type, members)
    current = (
        sa.select(R.c.last_updated, R.c.res_pk, V.c.body)
        .select_from(R.join(V, sa.and_(V.c.res_pk == R.c.res_pk, V.c.version == R.c.version)))
        .where(R.c.type == resource_type, R.c.deleted.is_(False), R.c.last_updated <= moment)
    )
    if request.since is not None:
        current = current.where(R.c.last_updated > request.since)
    if scope is not None:
        current = current.where(scope)
    after = (request.since or -(2**62), -1)
    while True:
        batch = conn.execute(
            current.where(sa.tuple_(R.c.last_updated, R.c.res_pk) > after)
            .order_by(R.c.last_updated, R.c.res_pk)
            .limit(BATCH)
        ).all()
        kept = _filtered(conn, svc, request, resource_type, [row[1] for row in batch])
        for _, res_pk, body in batch:
            if kept is None or res_pk in kept:
                yield bytes(body)
        if len(batch) < BATCH:
            break
        after = (batch[-1][0], batch[-1][1])
    # what changed after the moment: its version of then, if it had one
    W = V.alias("then")
    then = (
        sa.select(sa.func.max(W.c.version))
        .where(W.c.res_pk == R.c.res_pk, W.c.last_updated <= moment)
        .scalar_subquery()
    )
    changed = (
        sa.select(R.c.res_pk, V.c.body, V.c.last_updated)
        .select_from(R.join(V, V.c.res_pk == R.c.res_pk))
        .where(R.c.type == resource_type, R.c.last_updated > moment, V.c.version == then)
        .order_by(R.c.res_pk)
    )
    if scope is not None:
        changed = changed.where(scope)
    rows = [row for row in conn.execute(changed) if row[1] is not None]
    rows = [row for row in rows if request.since is None or row[2] > request.since]
    kept = _filtered(conn, svc, request, resource_type, [row[0] for row in rows])
    for res_pk, body, _ in rows:
        if kept is None or res_pk in kept:
            yield bytes(body)


def _scope(request: ExportRequest, resource_type: str, members: list[str] | None) -> Any:
    """The condition on a row of ``fhir_resources`` that keeps it in a Patient or Group
    export (None: a system export keeps every row). A correlated EXISTS, so that each batch
    looks up its own rows in the compartment index and nothing more."""
    if request.level == "system":
        return None
    if resource_type == "Patient":
        return None if members is None else R.c.id.in_(members)
    in_compartment = sa.exists().where(C.c.res_pk == R.c.res_pk)
    if members is not None:
        in_compartment = in_compartment.where(C.c.patient_id.in_(members))
    if resource_type == "Provenance":
        return sa.or_(in_compartment, _provenance_of_exported(request, members))
    return in_compartment


def _provenance_of_exported(request: ExportRequest, members: list[str] | None) -> Any:
    """The condition on a Provenance row that one of its ``target`` references is a resource
    of an exported type in one of the export's compartments (a Patient's: the compartment
    itself)."""
    T, K = R.alias("target"), C.alias("target_compartment")
    exported = [t for t in request.types if t not in ("Patient", "Provenance")]
    in_compartment = sa.exists().where(K.c.res_pk == T.c.res_pk)
    if members is not None:
        in_compartment = in_compartment.where(K.c.patient_id.in_(members))
    return (
        sa.exists()
        .where(
            REF.c.res_pk == R.c.res_pk,
            REF.c.type == "Provenance",
            REF.c.param == "target",
            REF.c.target_type.in_(exported),
            T.c.type == REF.c.target_type,
            T.c.id == REF.c.target_id,
            T.c.deleted.is_(False),
            in_compartment,
        )
        .correlate(R)
    )


def _filtered(
    conn: Connection, svc: Services, request: ExportRequest, resource_type: str, pks: list[int]
) -> set[int] | None:
    """Which of ``pks`` match one of the type's ``_typeFilter`` searches (None: no filter).
    Asked for one batch at a time, so a filter costs what its batch costs."""
    searches = request.type_filters.get(resource_type)
    if not searches:
        return None
    kept: set[int] = set()
    for search in searches:
        matches = (
            match_query(
                parse_search(resource_type, parse_qsl(search, keep_blank_values=True)),
                Access(),
                svc.store.base_url,
            )
            .with_only_columns(R.c.res_pk)
            .order_by(None)
            .where(R.c.res_pk.in_(pks))
        )
        kept.update(row[0] for row in conn.execute(matches))
    return kept


MOST_MEMBERS = 10_000  # members of a Group exported at once (each is a bound parameter)


def _group(svc: Services, group_id: str) -> tuple[Stored, list[str]]:
    """The Group and the ids of the Patients it names as its members now (``member.entity``,
    neither ``inactive`` nor outside its ``period``); 404 without it."""
    stored = svc.store.read("Group", group_id)
    members = []
    now = now_micros()
    for member in stored.resource().get("member", []):
        if not _member_now(member, now):
            continue
        reference = (member.get("entity") or {}).get("reference", "")
        target = parse_reference(reference, svc.store.base_url)
        if target is not None and target[0] == "Patient":
            members.append(target[1])
    members = sorted(set(members))
    if len(members) > MOST_MEMBERS:
        raise InvalidRequest(
            f"Group/{group_id} names {len(members):,} patients; a Group export takes at most "
            f"{MOST_MEMBERS:,} (split the Group)"
        )
    return stored, members


def _member_now(member: dict[str, Any], now: int) -> bool:
    """Whether a ``Group.member`` is a member at ``now`` (µs): not ``inactive`` ("no longer in
    the group"), its ``period`` begun and not ended (a partial date covers its whole span)."""
    if member.get("inactive") is True:
        return False
    period = member.get("period") or {}
    try:
        if period.get("start") and date_range(period["start"])[0] > now:
            return False
        if period.get("end") and date_range(period["end"])[1] <= now:
            return False
    except ValueError:  # a Group the store took has valid dates; be safe all the same
        return False
    return True


def _audit(
    svc: Services,
    caller: Caller,
    request: ExportRequest,
    count: int,
    group: Stored | None,
    members: list[str],
) -> None:
    """The export's AuditEvent; for a Group export of this node's own records, one more for
    each member patient (shown to the patient in the portal: the export was a question about
    them; an export from members records its own, :mod:`node.flows.member_export`)."""
    record = caller.record("operation", description=f"$export: {count} resource(s)")
    record.query = request.url
    if group is not None:
        record.entities = [group]
    with svc.store.writing(caller.principal) as writer:
        svc.audit.record_in(writer, record)
    if group is not None and not request.sources:
        for patient in members:
            svc.audit.record(
                caller.record(
                    "operation",
                    description=f"$export of Group/{group.id}, which names the patient",
                    entities=[group],
                    patients={patient},
                    query=request.url,
                )
            )
