"""FHIR Bulk Data under ``/fhir``: ``$export`` (Bulk Data Access IG) at every level and
``$import``, the status of a job of either (poll it; ``DELETE`` cancels it) and its files. The
views parse and answer; the work is :mod:`node.flows.bulk_export`'s and
:mod:`node.flows.bulk_import`'s. Errors are OperationOutcomes, as everywhere under /fhir.

``GET /fhir/$export``, ``/fhir/Patient/$export``, ``/fhir/Group/<id>/$export`` with
``Prefer: respond-async`` (or ``POST`` them a Parameters body, which may also name ``patient``
references): 202 and ``Content-Location`` (the status URL). ``GET`` the status:
202 with ``X-Progress`` and ``Retry-After`` while it runs, 200 and the manifest when done.
``DELETE`` it: 202; the job stops and its files are deleted. Files: ``GET`` with the same
token (``requiresAccessToken``), ``application/fhir+ndjson``. The status, files and DELETE of
an export ask what its kick-off asked: the user who asked, with a token whose ``system/``
scopes cover every type it exports; those of an import, an admin's token with a ``system/``
create scope, as its kick-off did. A 202 has no body, and no Content-Type. Each bulk request
first deletes the jobs kept past their ``Expires``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from flask import Blueprint, Response, request, send_file

from fhir_adapters.errors import FhirError, InvalidRequest, Issue, NotFound, operation_outcome
from fhir_adapters.store import jsonio
from node.flows import bulk_export, bulk_import, bulk_jobs
from node.web.context import authenticate, caller, services
from node.web.fhir.messages import preference

bp = Blueprint("bulk", __name__, url_prefix="/fhir")
FHIR_JSON = "application/fhir+json"
RETRY_SECONDS = 2


@bp.errorhandler(FhirError)
def fhir_error(exc: FhirError) -> Response:
    response = Response(jsonio.dump(exc.outcome()), exc.status, content_type=FHIR_JSON)
    if isinstance(exc, bulk_jobs.Busy):
        response.headers["Retry-After"] = str(bulk_jobs.BUSY_RETRY_SECONDS)
    return response


@bp.before_request
def forget_expired() -> None:
    """Jobs past their ``Expires`` go now (no thread polls for them)."""
    bulk_export.forget_expired(services())
    bulk_import.forget_expired(services())


def _accepted() -> Response:
    """202 with an empty body and no Content-Type (Flask would say text/html)."""
    response = Response(status=202)
    del response.headers["Content-Type"]
    return response


@bp.route("/$export", methods=["GET", "POST"])
def export_system() -> Response:
    return _kick_off("system", None)


@bp.route("/Patient/$export", methods=["GET", "POST"])
def export_patients() -> Response:
    return _kick_off("patient", None)


@bp.route("/Group/<group_id>/$export", methods=["GET", "POST"])
def export_group(group_id: str) -> Response:
    return _kick_off("group", group_id)


def _kick_off(level: str, group: str | None) -> Response:
    principal = authenticate()
    if "respond-async" not in request.headers.get("Prefer", ""):
        raise InvalidRequest("$export runs asynchronously: send Prefer: respond-async")
    accept = request.headers.get("Accept", FHIR_JSON)
    if not any(kind in accept for kind in (FHIR_JSON, "application/json", "*/*")):
        raise InvalidRequest(f"$export answers in {FHIR_JSON}, not {accept!r}")
    url = services().config.url.rstrip("/") + request.full_path.rstrip("?")
    if request.method == "POST":
        if request.args:
            raise InvalidRequest("a POST $export takes its parameters in the body, not the URL")
        query = bulk_export.posted_query(jsonio.parse(request.get_data(), "the Parameters"))
    else:
        query = list(request.args.items(multi=True))
    lenient = preference(request.headers.get("Prefer"), "handling", "strict") == "lenient"
    asked, ignored = bulk_export.parse_export(
        services(),
        principal,
        level,
        group,
        query,
        url,
        posted=request.method == "POST",
        lenient=lenient,
    )
    job = bulk_export.start_export(services(), caller(), asked)
    response = _accepted()
    if ignored:  # the IG lets a kick-off's 202 carry an OperationOutcome
        response = Response(jsonio.dump(_left_out(ignored)), 202, content_type=FHIR_JSON)
    response.headers["Content-Location"] = _status_url(job.id)
    return response


def _left_out(names: list[str]) -> dict[str, Any]:
    """The OperationOutcome of a lenient kick-off: a warning for each parameter left out."""
    return operation_outcome(
        [
            Issue(
                f"$export does not support the parameter {name!r}: it was left out "
                "(Prefer: handling=lenient)",
                code="not-supported",
                severity="warning",
            )
            for name in names
        ]
    )


def _status_url(job_id: str) -> str:
    return f"{services().config.url.rstrip('/')}/fhir/$bulk-status/{job_id}"


@bp.route("/$import", methods=["POST"])
def import_kick_off() -> Response:
    principal = authenticate()
    if "respond-async" not in request.headers.get("Prefer", ""):
        raise InvalidRequest("$import runs asynchronously: send Prefer: respond-async")
    body = jsonio.parse(request.get_data(), "the Parameters")
    files = bulk_import.parse_import(services(), principal, body)
    url = services().config.url.rstrip("/") + request.path
    job = bulk_import.start_import(services(), caller(), files, url)
    response = _accepted()
    response.headers["Content-Location"] = _status_url(job.id)
    return response


def _job(job_id: str) -> bulk_jobs.Job:
    """The caller's job, going again if its process was lost: 404 if it is not theirs or was
    cancelled, 403 if the token may not do what the job's kick-off asked."""
    principal = authenticate()
    job = bulk_jobs.get_job(services(), job_id, principal.username)
    if job.state == bulk_jobs.CANCELLED:
        raise NotFound(f"no bulk data job {job_id} of yours is known here")
    if job.kind == "export":
        bulk_export.authorize(principal, job)
        return bulk_export.export_status(services(), caller(), job)
    bulk_import.authorize(principal)
    return bulk_import.import_status(services(), caller(), job)


@bp.route("/$bulk-status/<job_id>", methods=["GET"])
def status(job_id: str) -> Response:
    job = _job(job_id)
    if job.state == bulk_jobs.RUNNING:
        response = _accepted()
        response.headers["X-Progress"] = _progress(job)
        response.headers["Retry-After"] = str(RETRY_SECONDS)
        return response
    if job.state == bulk_jobs.DONE:
        response = Response(jsonio.dump(job.result), 200, content_type="application/json")
        expires = datetime.fromtimestamp(bulk_jobs.expires(job) / 10**6, UTC)
        response.headers["Expires"] = format_datetime(expires, usegmt=True)
        return response
    error = (job.result or {}).get("error", job.state)
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "error",
                "code": "exception",
                "diagnostics": f"the {job.kind} job failed: {error}",
            }
        ],
    }
    return Response(jsonio.dump(outcome), 500, content_type=FHIR_JSON)


def _progress(job: bulk_jobs.Job) -> str:
    progress = job.progress
    if job.kind == "import":
        share = progress.get("bytes", 0) / max(progress.get("of", 0), 1)
        return f"{share:.0%} read, {progress.get('lines', 0)} lines settled"
    now = f", now {progress['now']}" if progress.get("now") else ""
    return f"{progress.get('resources', 0)} resources written{now}"


@bp.route("/$bulk-status/<job_id>", methods=["DELETE"])
def cancel(job_id: str) -> Response:
    """Stop the job (an import keeps what it stored), delete its files, forget it (a running
    job's thread does, at its next check; to the client it is gone at once)."""
    job = _job(job_id)
    if job.kind == "export":
        bulk_export.cancel_export(services(), job)
    else:
        bulk_import.cancel_import(services(), job)
    return _accepted()


@bp.route("/$bulk-file/<job_id>/<name>", methods=["GET"])
def file(job_id: str, name: str) -> Response:
    job = _job(job_id)
    if job.kind == "export":
        path = bulk_export.export_files(services(), job).get(name)
    elif job.state == bulk_jobs.DONE and name == "refused-outcomes.ndjson":
        path = bulk_import.import_outcomes(services(), job)
    else:
        path = None
    if path is None or not path.is_file():
        raise NotFound(f"bulk data job {job_id} has no file {name!r}")
    return send_file(path, mimetype="application/fhir+ndjson", conditional=False)
