"""The FHIR R4 REST API at ``/fhir``: the HTTP side of :mod:`node.web.fhir.interactions`.

Every request under ``/fhir`` is negotiated (FHIR JSON only: ``_format`` and ``Accept``),
authenticated by its bearer token when it carries one (:mod:`node.web.context`), and handed to
the interactions as a :class:`~node.web.fhir.interactions.FhirRequest`; the answer goes out in
``application/fhir+json``, indented with ``_pretty=true``. Every error, including a wrong URL
or method and a body too large, is an OperationOutcome with the status FHIR gives it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, g, request
from werkzeug.exceptions import HTTPException

from fhir_adapters.errors import FhirError, Issue, NotAcceptable, operation_outcome
from fhir_adapters.store import jsonio
from node.web.context import authenticate, caller, services
from node.web.fhir.interactions import FhirApi
from node.web.fhir.limits import MAX_BODY_BYTES
from node.web.fhir.messages import JSON_TYPES, FhirRequest
from node.web.request_log import route_of_request

log = logging.getLogger(__name__)

bp = Blueprint("fhir", __name__, url_prefix="/fhir")

FHIR_JSON = "application/fhir+json; charset=utf-8"


# -- request context ---------------------------------------------------------------------------


@dataclass
class Call:
    """How one FHIR request is answered: indented or not."""

    pretty: bool = False


def call() -> Call:
    if "fhir_call" not in g:
        g.fhir_call = Call()
    found: Call = g.fhir_call
    return found


FHIR_VERSIONS = {"4.0", "4.0.1"}  # the fhirVersion parameter values naming R4


def _media(part: str) -> tuple[str, str | None]:
    """A media range of an Accept header, and its ``fhirVersion`` parameter if any."""
    kind, *parameters = part.split(";")
    version = None
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "fhirversion":
            version = value.strip().strip('"')
    return kind.strip().lower(), version


def negotiate() -> None:
    """406 unless the caller takes FHIR JSON; the body limit; ``_pretty``."""
    request.max_content_length = MAX_BODY_BYTES  # read no more of a body than this: 413
    request.max_form_memory_size = MAX_BODY_BYTES  # a POST _search's form: the same limit
    fmt = request.args.get("_format")
    if fmt is not None and fmt not in ("json", *JSON_TYPES):
        raise NotAcceptable(f"_format={fmt!r}: this server speaks FHIR JSON only (_format=json)")
    accept = request.headers.get("Accept")
    if accept:
        taken = [_media(part) for part in accept.split(",")]
        if fmt is None and not any(k in (*JSON_TYPES, "*/*", "application/*") for k, _ in taken):
            raise NotAcceptable(
                f"Accept: {accept[:100]} — this server answers in application/fhir+json only"
            )
        versions = {v for _, v in taken if v is not None}
        if versions and not versions & FHIR_VERSIONS:
            raise NotAcceptable(
                f"Accept: fhirVersion={sorted(versions)[0][:20]} — this server serves FHIR "
                "4.0.1 (R4) only (fhirVersion=4.0)"
            )
    call().pretty = request.args.get("_pretty") == "true"


def respond(
    status: int, body: bytes | dict[str, Any] | None, headers: dict[str, str] | None = None
) -> Response:
    if isinstance(body, dict):
        body = jsonio.dump(body, pretty=call().pretty)
    elif body is not None and call().pretty:
        body = jsonio.dump(jsonio.parse(body), pretty=True)
    response = Response(body if body is not None else b"", status=status)
    if body is not None:
        response.headers["Content-Type"] = FHIR_JSON
    else:  # nothing to describe (Prefer: return=minimal, 204, 304)
        del response.headers["Content-Type"]
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


# -- errors --------------------------------------------------------------------------------


@bp.errorhandler(FhirError)
def fhir_error(exc: FhirError) -> Response:
    return respond(exc.status, exc.outcome())


@bp.app_errorhandler(HTTPException)
def http_error(exc: HTTPException) -> Response | HTTPException:
    """Under /fhir every error is an OperationOutcome, also those raised before a route is
    found (a method no route takes, a body too large)."""
    if not request.path.startswith(bp.url_prefix or "/fhir"):
        return exc
    status = exc.code or 500
    codes = {404: "not-found", 405: "not-supported", 413: "too-costly"}
    message = exc.description or exc.name
    if status == 405:
        message = f"{request.method} is not supported on {request.path}"
    elif status == 413:
        message = (
            f"the request body is larger than this server takes: at most "
            f"{MAX_BODY_BYTES // (1024 * 1024)} MiB"
        )
    return respond(status, operation_outcome([Issue(message, codes.get(status, "invalid"))]))


@bp.errorhandler(Exception)
def server_error(exc: Exception) -> Response | HTTPException:
    if isinstance(exc, HTTPException):  # e.g. a body over the size limit: 413, not 500
        return http_error(exc)
    log.exception("FHIR request failed: %s %s", request.method, route_of_request())  # no ids
    return respond(
        500,
        operation_outcome(
            [Issue("the server failed to handle this request; it is logged", "exception")]
        ),
    )


# -- every interaction ---------------------------------------------------------------------

METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH"]


@bp.route("", methods=METHODS)
@bp.route("/", methods=METHODS)
@bp.route("/<path:path>", methods=METHODS)
def dispatch(path: str = "") -> Response:
    negotiate()
    if "Authorization" in request.headers and path != "metadata":
        authenticate()  # a refused token is refused (and recorded) whatever was asked
    asked = FhirRequest(
        method="GET" if request.method == "HEAD" else request.method,  # HEAD: GET's headers
        path=path,
        query=list(request.args.items(multi=True)),
        caller=caller(),
        headers={name.lower(): value for name, value in request.headers.items()},
        body=request.get_data(cache=True),
        content_type=(request.mimetype or "").lower(),
        charset=request.mimetype_params.get("charset"),
        raw_query=request.query_string.decode(),
    )
    try:
        answer = FhirApi(services()).handle(asked)
    finally:
        g.route = asked.route  # the access line and metrics name the pattern, not the path
    return respond(answer.status, answer.body, answer.headers)
