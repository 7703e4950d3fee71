"""The FHIR R4 REST API at ``/fhir``: one blueprint, every interaction of the
CapabilityStatement it serves at ``/fhir/metadata``.

Each request is authenticated (:mod:`node.auth`), checked against the caller's scopes and
role, carried out by the resource store, audited (:mod:`node.audit`) and answered in
``application/fhir+json``. Stored resources go out as the bytes they were stored as. Every
error, including a wrong URL or method, is an OperationOutcome with the status FHIR gives it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote

from flask import Blueprint, Response, current_app, g, request
from werkzeug.exceptions import HTTPException

from fhir_adapters import jsonio
from fhir_adapters.errors import (
    FhirError,
    Gone,
    InvalidRequest,
    Issue,
    MethodNotAllowed,
    NotAcceptable,
    NotFound,
    Unauthorized,
    UnsupportedMediaType,
    operation_outcome,
)
from fhir_adapters.resources import RESOURCE_TYPES, check_id, check_type
from fhir_adapters.search import (
    DEFAULT_COUNT,
    MAX_COUNT,
    Access,
    Matches,
    parse_search,
    whole_number,
)
from fhir_adapters.search_params import date_range
from fhir_adapters.store import Stored, format_instant, http_date, now_micros, readable_only
from node.audit import AuditRecord
from node.auth import Principal
from node.capability import capability_statement
from node.services import Services

log = logging.getLogger(__name__)

bp = Blueprint("fhir", __name__, url_prefix="/fhir")

FHIR_JSON = "application/fhir+json; charset=utf-8"
JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")
MAX_BODY_BYTES = 8 * 1024 * 1024  # a FHIR request body (413 beyond; the app allows more)


def services() -> Services:
    found: Services = current_app.extensions["hrx"]
    return found


# -- request context ---------------------------------------------------------------------------


@dataclass
class Call:
    """One FHIR request: its caller, and whether the answer is indented."""

    principal: Principal | None = None
    pretty: bool = False


def call() -> Call:
    if "fhir_call" not in g:
        g.fhir_call = Call()
    found: Call = g.fhir_call
    return found


def authenticate() -> Principal:
    current = call()
    if current.principal is None:
        header = request.headers.get("Authorization")
        try:
            current.principal = services().tokens.authenticate(header)
        except Unauthorized as exc:
            if header:  # a token was presented and refused: worth an audit record
                _audit_refusal(None, "login", str(exc))
            raise
        g.actor = current.principal  # who writes, for what the store's observers record
    return current.principal


def _audit_refusal(principal: Principal | None, interaction: str, reason: str) -> None:
    record = _record(interaction, principal)
    record.outcome = "4"
    record.description = reason
    try:
        services().audit.record(record)
    except Exception:  # a refusal stands even if its record cannot be written
        log.exception("could not record a refused request")


def _record(interaction: str, principal: Principal | None) -> AuditRecord:
    return AuditRecord(
        interaction=interaction,
        username=principal.username if principal else None,
        role=principal.role if principal else None,
        address=request.remote_addr,
        client=request.headers.get("User-Agent"),
        token_id=principal.token_id if principal else None,
    )


def permit(resource_type: str, action: str, interaction: str) -> Access:
    principal = authenticate()
    if resource_type == "AuditEvent" and action in "rs":
        services().audit.flush()  # reading the trail: this process's queued records first
    try:
        return principal.require(resource_type, action)
    except FhirError as exc:
        _audit_refusal(principal, interaction, str(exc))
        raise


def per_patient(
    items: list[Stored], patients: dict[tuple[str, str], frozenset[str]]
) -> list[tuple[set[str], list[Stored]]]:
    """The items grouped by patient: each patient's AuditEvent lists only that patient's
    resources, so a patient reading their audit trail learns nothing of anyone else.
    Resources in no patient's compartment (practitioners, organizations) form a group of
    their own."""
    groups: dict[str | None, list[Stored]] = {}
    for item in items:
        for patient in patients.get((item.type, item.id)) or {None}:
            groups.setdefault(patient, []).append(item)
    if not groups:
        return [(set(), [])]
    return [
        ({patient} if patient else set(), group)
        for patient, group in sorted(groups.items(), key=lambda g: g[0] or "")
    ]


def audited(interaction: str, items: list[Stored], query: str | None = None) -> None:
    """Record a read-type interaction (one AuditEvent per patient concerned)."""
    principal = authenticate()
    patients = services().store.patients_by_item(items) if items else {}
    for group_patients, group in per_patient(items, patients):
        record = _record(interaction, principal)
        record.entities = group
        record.patients = group_patients
        record.query = query
        services().audit.record(record)


# -- formats and headers -------------------------------------------------------------------


@bp.before_request
def negotiate() -> None:
    request.max_content_length = MAX_BODY_BYTES  # read no more of a body than this: 413
    request.max_form_memory_size = MAX_BODY_BYTES  # a POST _search's form: the same limit
    fmt = request.args.get("_format")
    if fmt is not None and fmt not in ("json", *JSON_TYPES):
        raise NotAcceptable(f"_format={fmt!r}: this server speaks FHIR JSON only (_format=json)")
    accept = request.headers.get("Accept")
    if accept and fmt is None:
        kinds = [part.split(";")[0].strip().lower() for part in accept.split(",")]
        if not any(k in (*JSON_TYPES, "*/*", "application/*") for k in kinds):
            raise NotAcceptable(
                f"Accept: {accept[:100]} — this server answers in application/fhir+json only"
            )
    call().pretty = request.args.get("_pretty") == "true"


def body_json(what: str = "the body") -> Any:
    kind = (request.mimetype or "").lower()
    if kind not in JSON_TYPES:
        raise UnsupportedMediaType(
            f"Content-Type {request.content_type or '(none)'} is not FHIR JSON; send "
            "application/fhir+json"
        )
    check_charset()
    data = request.get_data(cache=True)
    if not data:
        raise InvalidRequest(f"{what} is empty")
    return jsonio.parse(data, what)


def check_charset() -> None:
    """415 unless the body's Content-Type names UTF-8 (in any case) or no charset: FHIR JSON
    is UTF-8, and a body in another character set must not be read as if it were."""
    charset = request.mimetype_params.get("charset")
    if charset and charset.lower() != "utf-8":  # an empty one names none
        raise UnsupportedMediaType(
            f"Content-Type charset={charset[:40]!r}: this server reads bodies as UTF-8 only; "
            "send them in UTF-8 (charset=utf-8, or no charset)"
        )


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
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def version_headers(stored: Stored) -> dict[str, str]:
    return {"ETag": stored.etag, "Last-Modified": http_date(stored.last_updated)}


def prefer(name: str, default: str) -> str:
    for part in request.headers.get("Prefer", "").split(","):
        key, _, value = part.strip().partition("=")
        if key.strip() == name:
            return value.strip().strip('"')
    return default


def written(stored: Stored, status: int) -> Response:
    headers = version_headers(stored)
    headers["Location"] = f"{services().config.fhir_base}/{stored.location}"
    headers["Content-Location"] = headers["Location"]
    wanted = prefer("return", "representation")
    if wanted == "minimal":
        return respond(status, None, headers)
    if wanted == "OperationOutcome":
        outcome = operation_outcome(
            [
                Issue(
                    f"{stored.type}/{stored.id} stored as version {stored.version}",
                    "informational",
                    severity="information",
                )
            ]
        )
        return respond(status, outcome, headers)
    return respond(status, stored.body, headers)


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
    route = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
    log.exception("FHIR request failed: %s %s", request.method, route)  # no ids in the log
    return respond(
        500,
        operation_outcome(
            [Issue("the server failed to handle this request; it is logged", "exception")]
        ),
    )


# -- capability ----------------------------------------------------------------------------


@bp.get("/metadata")
def metadata() -> Response:
    return respond(200, capability_statement(services().config))


# -- instance level ------------------------------------------------------------------------


def _not_modified(stored: Stored) -> Response | None:
    if_none_match = request.headers.get("If-None-Match")
    if if_none_match and stored.etag in [v.strip() for v in if_none_match.split(",")]:
        return respond(304, None, version_headers(stored))
    since = request.if_modified_since
    if since is not None and stored.last_updated // 1_000_000 <= int(since.timestamp()):
        return respond(304, None, version_headers(stored))
    return None


def _visible(stored: Stored, access: Access) -> None:
    """404 (not 403: existence is itself private) when the caller may not see it."""
    if access.patients is not None and not (
        services().store.patients_by_item([stored])[(stored.type, stored.id)] & access.patients
    ):
        raise NotFound(f"{stored.type}/{stored.id} is not known")


@bp.get("/<resource_type>/<resource_id>")
def read(resource_type: str, resource_id: str) -> Response:
    check_type(resource_type)
    access = permit(resource_type, "r", "read")
    stored = services().store._current(resource_type, resource_id)
    _visible(stored, access)  # before telling deleted from unknown: that too is private
    if stored.deleted:
        raise Gone(f"{resource_type}/{resource_id} was deleted")
    unchanged = _not_modified(stored)
    audited("read", [stored])
    return unchanged or respond(200, stored.body, version_headers(stored))


@bp.get("/<resource_type>/<resource_id>/_history/<version>")
def vread(resource_type: str, resource_id: str, version: str) -> Response:
    check_type(resource_type)
    access = permit(resource_type, "r", "vread")
    try:
        if not re.fullmatch(r"[0-9]{1,9}", version):
            raise NotFound(f"{resource_type}/{resource_id} has no version {version[:40]!r}")
        current = services().store._current(resource_type, resource_id)
        _visible(current, access)
        stored = services().store.vread(resource_type, resource_id, int(version))
        if access.patients is not None:
            _visible_version(stored, access)
    except (NotFound, Gone):
        if access.patients is None:
            raise
        # to a patient, every way of not seeing it looks the same
        raise NotFound(f"{resource_type}/{resource_id} is not known") from None
    audited("vread", [stored])
    return respond(200, stored.body, version_headers(stored))


def _visible_version(stored: Stored, access: Access) -> None:
    from fhir_adapters.search_params import index_values

    assert access.patients is not None
    rows = index_values(stored.resource(), services().config.fhir_base)
    if not rows.compartment & access.patients:
        raise NotFound(f"{stored.type}/{stored.id} has no such version")


@bp.put("/<resource_type>/<resource_id>")
def update(resource_type: str, resource_id: str) -> Response:
    check_type(resource_type)
    permit(resource_type, "u", "update")
    check_id(resource_id)
    resource = body_json()
    svc = services()
    with svc.store.writing() as writer:
        before = patients_before(writer, resource_type, resource_id)
        stored, created = writer.update(
            resource_type, resource_id, resource, request.headers.get("If-Match")
        )
        if created:  # an update that creates needs the right to create (else rolled back)
            permit(resource_type, "c", "update")
        _audit_write(writer, "update" if not created else "create", [stored], before)
    return written(stored, 201 if created else 200)


@bp.delete("/<resource_type>/<resource_id>")
def delete(resource_type: str, resource_id: str) -> Response:
    check_type(resource_type)
    permit(resource_type, "d", "delete")
    svc = services()
    with svc.store.writing() as writer:
        before = patients_before(writer, resource_type, resource_id)
        stored = writer.delete(resource_type, resource_id, request.headers.get("If-Match"))
        if stored is not None:
            _audit_write(writer, "delete", [stored], before)
    return respond(204, None, {"ETag": stored.etag} if stored else {})


def _audit_write(
    writer: Any,
    interaction: str,
    items: list[Stored],
    before: dict[tuple[str, str], frozenset[str]] | None = None,
) -> None:
    """Record a write in its own transaction: one AuditEvent per patient concerned, by the
    version written and, for updates and deletes, the patients of the version before
    (``before``), so a resource moved away from a patient or deleted still shows up in that
    patient's trail."""
    from fhir_adapters.search_params import index_values

    principal = authenticate()
    patients: dict[tuple[str, str], frozenset[str]] = {}
    for item in items:
        key = (item.type, item.id)
        now = (
            index_values(item.resource(), services().config.fhir_base).compartment
            if item.body is not None
            else set()
        )
        patients[key] = frozenset(now) | (before or {}).get(key, frozenset())
    for group_patients, group in per_patient(items, patients):
        record = _record(interaction, principal)
        record.entities = group
        record.patients = group_patients
        services().audit.record_in(writer, record)


def patients_before(
    writer: Any, resource_type: str, resource_id: str
) -> dict[tuple[str, str], frozenset[str]]:
    """The patients of a resource's current version, read inside a write transaction."""
    try:
        current = services().store.read(resource_type, resource_id, writer.conn)
    except FhirError:
        return {}
    return {(resource_type, resource_id): current.patients or frozenset()}


# -- type level ----------------------------------------------------------------------------


@bp.post("/<resource_type>")
def create(resource_type: str) -> Response:
    check_type(resource_type)
    permit(resource_type, "c", "create")
    unexpected = [name for name in request.args if name not in ("_format", "_pretty")]
    if unexpected:
        raise InvalidRequest(
            f"create takes no parameters ({', '.join(unexpected)}); for a conditional create "
            "send the search as the If-None-Exist header"
        )
    resource = body_json()
    condition = request.headers.get("If-None-Exist")
    svc = services()
    with svc.store.writing() as writer:
        if condition:
            existing = _conditional_match(writer, resource_type, condition)
            if existing is not None:  # the caller is shown an existing resource: audited
                _audit_write(writer, "create", [existing])
                return respond(200, existing.body, version_headers(existing))
        stored = writer.create(resource, resource_type)
        _audit_write(writer, "create", [stored])
    return written(stored, 201)


def _conditional_match(writer: Any, resource_type: str, condition: str) -> Stored | None:
    """The one resource ``If-None-Exist`` matches; None when none; 412 when several."""
    from fhir_adapters.errors import PreconditionFailed

    permit(resource_type, "s", "create")
    text = condition.split("?", 1)[1] if "?" in condition else condition
    query = parse_qsl(text, keep_blank_values=True)
    search = parse_search(resource_type, query)
    if not search.criteria:
        raise InvalidRequest(f"If-None-Exist {condition!r} has no search criteria")
    writer.lock(f"if-none-exist {resource_type}?{search.query_string()}")
    pks = services().store.count_matches(search, Access(), 2, conn=writer.conn)
    if len(pks) > 1:
        raise PreconditionFailed(
            f"If-None-Exist {condition!r} matches more than one {resource_type}; make it precise"
        )
    if not pks:
        return None
    return services().store.by_pk(pks[0], conn=writer.conn)


@bp.route("/<resource_type>", methods=["GET"])
def search_get(resource_type: str) -> Response:
    return _search(resource_type, list(request.args.items(multi=True)))


@bp.post("/<resource_type>/_search")
def search_post(resource_type: str) -> Response:
    if request.mimetype != "application/x-www-form-urlencoded":
        raise UnsupportedMediaType("POST _search takes application/x-www-form-urlencoded")
    check_charset()
    query = list(request.args.items(multi=True)) + list(request.form.items(multi=True))
    return _search(resource_type, query)


def _search(resource_type: str, query: list[tuple[str, str]]) -> Response:
    check_type(resource_type)
    access = permit(resource_type, "s", "search-type")
    lenient = prefer("handling", "strict") == "lenient"
    search = parse_search(resource_type, query, lenient=lenient)
    for include in (*search.includes, *search.revincludes):
        target = include.target_type or include.source_type
        permit(include.source_type, "r", "search-type")
        if target:
            permit(target, "r", "search-type")
    principal = authenticate()
    matches = services().store.search(search, access, principal.owner)
    self_link = f"{services().config.fhir_base}/{resource_type}?{search.query_string()}"
    issues = [
        Issue(f"ignored: {name}", "not-supported", severity="warning") for name in search.ignored
    ]
    return _searchset(
        matches, access, self_link, issues, query=f"{resource_type}?{search.query_string()}"
    )


def _searchset(
    matches: Matches,
    access: Access,
    self_link: str,
    issues: list[Issue] | None = None,
    *,
    query: str,
    kind: str = "search",
) -> Response:
    svc = services()
    items = svc.store.versions_of(matches.pairs)
    included = svc.store.included(items, matches.request, access) if kind == "search" else []
    # an include may reach any type its parameter points to: only what the caller may read
    principal = authenticate()
    included = [item for item in included if principal.allows(item.type, "r")]
    # a resource an older version stored with a number JSON clients cannot read would make
    # the whole Bundle unreadable: it is left out, and the Bundle says so
    shown = readable_only(items, "served in a Bundle")
    shown_included = readable_only(included, "served in a Bundle")
    left_out = len(items) + len(included) - len(shown) - len(shown_included)
    items, included = shown, shown_included
    if left_out:
        issues = [
            *(issues or []),
            Issue(
                f"{left_out} resource(s) left out: each holds a number JSON clients cannot "
                "read (stored by an older version of hrx); read it alone, or store a "
                "corrected version",
                "processing",
                severity="warning",
            ),
        ]
    links = [{"relation": "self", "url": self_link}]
    links.extend(_page_links(matches))
    bundle_head: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset" if kind != "history" else "history",
        "meta": {"lastUpdated": format_instant(now_micros())},
    }
    if matches.request.get("total", "accurate") != "none":
        bundle_head["total"] = matches.total
    bundle_head["link"] = links
    entries: list[bytes] = []
    base = svc.config.fhir_base
    for stored in items:
        entries.append(_entry(base, stored, "match" if kind != "history" else None))
    for stored in included:
        entries.append(_entry(base, stored, "include"))
    if issues:
        outcome = jsonio.dump(operation_outcome(issues))
        entries.append(b'{"resource":' + outcome + b',"search":{"mode":"outcome"}}')
    audited(
        {"search": "search-type", "history": "history-type", "everything": "operation"}[kind],
        items + included,
        query,
    )
    head = jsonio.dump(bundle_head)
    body = head[:-1] + (b',"entry":[' + b",".join(entries) + b"]}" if entries else b"}")
    return respond(200, body)


def _entry(base: str, stored: Stored, mode: str | None) -> bytes:
    url = jsonio.dump(f"{base}/{stored.type}/{stored.id}")
    if mode is not None:
        return (
            b'{"fullUrl":'
            + url
            + b',"resource":'
            + (stored.body or b"{}")
            + b',"search":{"mode":"'
            + mode.encode()
            + b'"}}'
        )
    method = stored.method
    request_part = {
        "method": method,
        "url": stored.type if method == "POST" else f"{stored.type}/{stored.id}",
    }
    response_part = {
        "status": {"POST": "201 Created", "PUT": "200 OK", "DELETE": "204 No Content"}.get(
            method, "200 OK"
        ),
        "etag": stored.etag,
        "lastModified": format_instant(stored.last_updated),
    }
    parts = [b'{"fullUrl":' + url]
    if stored.body is not None:
        parts.append(b',"resource":' + stored.body)
    parts.append(b',"request":' + jsonio.dump(request_part))
    parts.append(b',"response":' + jsonio.dump(response_part) + b"}")
    return b"".join(parts)


def _page_links(matches: Matches) -> list[dict[str, str]]:
    if matches.set_id is None or matches.count == 0:
        return []
    base = services().config.fhir_base
    count = matches.count

    def link(relation: str, offset: int) -> dict[str, str]:
        return {
            "relation": relation,
            "url": f"{base}?_getpages={matches.set_id}&_getpagesoffset={offset}&_count={count}",
        }

    links = [link("first", 0)]
    if matches.offset > 0:
        links.append(link("previous", max(0, matches.offset - count)))
    if matches.offset + count < matches.total:
        links.append(link("next", matches.offset + count))
    last = max(0, (matches.total - 1) // count * count) if count else 0
    links.append(link("last", last))
    return links


@bp.get("")
@bp.get("/")
def system_get() -> Response:
    set_id = request.args.get("_getpages")
    if not set_id:
        raise MethodNotAllowed("system-wide search is not supported; search a resource type")
    principal = authenticate()
    offset_text = request.args.get("_getpagesoffset", "0")
    count_text = request.args.get("_count", str(DEFAULT_COUNT))
    count = whole_number("_count", count_text, MAX_COUNT)
    offset = whole_number("_getpagesoffset", offset_text)
    matches = services().store.page(set_id, offset, count, principal.owner)
    kind = matches.request.get("kind", "search")
    resource_type = matches.request.get("type")
    access = principal.access
    if resource_type:
        access = permit(resource_type, "s" if kind == "search" else "r", "search-type")
    self_link = f"{services().config.fhir_base}?{request.query_string.decode()}"
    return _searchset(matches, access, self_link, query=request.query_string.decode(), kind=kind)


@bp.get("/<resource_type>/_history")
def history_type(resource_type: str) -> Response:
    check_type(resource_type)
    access = permit(resource_type, "r", "history-type")
    return _history(resource_type, None, access)


@bp.get("/<resource_type>/<resource_id>/_history")
def history_instance(resource_type: str, resource_id: str) -> Response:
    check_type(resource_type)
    access = permit(resource_type, "r", "history-instance")
    check_id(resource_id)
    # a patient sees only the versions that were in their compartment (store.history)
    return _history(resource_type, resource_id, access)


def _history(resource_type: str, resource_id: str | None, access: Access) -> Response:
    since = None
    count = DEFAULT_COUNT
    for name, value in request.args.items(multi=True):
        if name == "_since":
            try:
                since = date_range(value)[0]
            except ValueError as exc:
                raise InvalidRequest(f"_since: {exc}") from None
        elif name == "_count":
            count = whole_number("_count", value, MAX_COUNT)
        elif name not in ("_format", "_pretty"):
            raise InvalidRequest(f"history takes _since and _count, not {name!r}")
    principal = authenticate()
    matches = services().store.history(
        resource_type, resource_id, access, principal.owner, since=since, count=count
    )
    if resource_id is not None and not matches.total and access.patients is not None:
        raise NotFound(f"{resource_type}/{resource_id} is not known")
    path = f"{resource_type}/{resource_id}/_history" if resource_id else f"{resource_type}/_history"
    self_link = f"{services().config.fhir_base}/{path}"
    if request.query_string:
        self_link += "?" + request.query_string.decode()
    return _searchset(matches, access, self_link, query=path, kind="history")


@bp.route("/Patient/<patient_id>/$everything", methods=["GET", "POST"])
def everything(patient_id: str) -> Response:
    access = permit("Patient", "r", "operation")
    check_id(patient_id)
    count = DEFAULT_COUNT
    for name, value in request.args.items(multi=True):
        if name == "_count":
            count = whole_number("_count", value, MAX_COUNT)
        elif name not in ("_format", "_pretty"):
            raise InvalidRequest(f"$everything takes _count, not {name!r}")
    if access.patients is not None and patient_id not in access.patients:
        raise NotFound(f"Patient/{patient_id} is not known")
    principal = authenticate()
    for resource_type in RESOURCE_TYPES:  # $everything reads across types: each must be allowed
        if resource_type != "AuditEvent":
            permit(resource_type, "r", "operation")
    matches = services().store.everything(patient_id, access, principal.owner, count)
    self_link = f"{services().config.fhir_base}/Patient/{quote(patient_id)}/$everything"
    return _searchset(
        matches, access, self_link, query=f"Patient/{patient_id}/$everything", kind="everything"
    )


# -- batch and transaction -----------------------------------------------------------------


@bp.post("")
@bp.post("/")
def bundle() -> Response:
    from node.bundles import process_bundle

    authenticate()
    return respond(200, process_bundle(body_json("the Bundle")))


@bp.route("/<path:rest>", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
def unknown(rest: str) -> Response:
    first = rest.split("/", 1)[0]
    if first in RESOURCE_TYPES:
        if request.method == "PATCH":
            raise MethodNotAllowed("PATCH is not supported; use PUT with the whole resource")
        raise MethodNotAllowed(f"{request.method} /fhir/{rest} is not a supported interaction")
    if first and first[0].isupper():
        check_type(first)
    raise NotFound(f"/fhir/{rest} is not a FHIR endpoint of this server")
