"""Batch and transaction Bundles posted to ``/fhir``.

A **batch** runs each entry as if it had been sent alone (same checks, same audit), and
answers each with its own status, an OperationOutcome for those that failed.

A **transaction** is all or nothing: every write runs in one database transaction, in the
order FHIR prescribes (DELETE, POST, PUT and PATCH), after ``urn:uuid:`` fullUrls of created
resources are given their ids and every reference to them is rewritten. The first failure undoes
everything and is answered with its status and an OperationOutcome naming the entry. Reads
(GET entries) run after the writes commit, and see them.

Either takes at most :data:`MAX_ENTRIES` entries (413 beyond, before any is run). An entry's
``request.url`` is relative to this server's FHIR base, or an absolute URL under that base:
one naming another server is refused (its entry fails in a batch; a transaction fails whole).
A ``PATCH`` entry holds its JSON Patch in a Binary (:mod:`node.web.fhir.patching`).
"""

from __future__ import annotations

import uuid
from typing import Any, Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

from fhir_adapters.errors import FhirError, InvalidRequest, Issue, TooCostly, Unprocessable
from fhir_adapters.store import Stored, Writer, format_instant, jsonio
from fhir_adapters.store.resources import check_id, check_type, references
from fhir_adapters.store.search import Access
from node.services import Services
from node.web.fhir.limits import MAX_ENTRIES
from node.web.fhir.messages import JSON_PATCH, FhirRequest, FhirResponse
from node.web.fhir.patching import operations_in_binary, patched


class FhirApi(Protocol):
    """What a Bundle's entries are carried out by (:class:`node.web.fhir.interactions.FhirApi`)."""

    svc: Services

    def handle(self, req: FhirRequest) -> FhirResponse: ...

    def permit(
        self, req: FhirRequest, resource_type: str, action: str, interaction: str
    ) -> Access: ...

    def conditional_match(
        self,
        req: FhirRequest,
        writer: Writer,
        resource_type: str,
        condition: str,
        what: str = "If-None-Exist",
    ) -> Stored | None: ...

    def written(self, req: FhirRequest, stored: Stored, status: int) -> FhirResponse: ...


ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3}


def _fail(index: int, exc: FhirError) -> FhirError:
    """The error, its issues placed in the entry that failed."""
    where = f"Bundle.entry[{index}]"

    def place(expression: str | None) -> str:
        if not expression:
            return where
        _type, dot, rest = expression.partition(".")
        return f"{where}.resource" + (f".{rest}" if dot else "")

    exc.issues = [
        Issue(f"{where}: {issue.diagnostics}", issue.code, place(issue.expression), issue.severity)
        for issue in exc.issues
    ]
    return exc


def _entries(bundle: Any) -> tuple[str, list[dict[str, Any]]]:
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise InvalidRequest("POST /fhir takes a Bundle of type batch or transaction")
    kind = bundle.get("type")
    if kind not in ("batch", "transaction"):
        raise InvalidRequest(
            f"Bundle.type {kind!r}: only batch and transaction Bundles can be posted here",
            expression="Bundle.type",
        )
    entries = bundle.get("entry", [])
    if not isinstance(entries, list):
        raise InvalidRequest("Bundle.entry must be an array", expression="Bundle.entry")
    if len(entries) > MAX_ENTRIES:
        raise TooCostly(
            f"the Bundle has {len(entries)} entries; a {kind} takes at most {MAX_ENTRIES}: "
            "split it",
            expression="Bundle.entry",
            status=413,
        )
    for index, entry in enumerate(entries):
        where = f"Bundle.entry[{index}]"
        if not isinstance(entry, dict):
            raise InvalidRequest(f"{where} must be an object", expression=where)
        req = entry.get("request")
        if not isinstance(req, dict) or not isinstance(req.get("url"), str):
            raise InvalidRequest(f"{where}.request.url is required", expression=f"{where}.request")
        if req.get("method") not in ORDER:
            raise InvalidRequest(
                f"{where}.request.method must be GET, POST, PUT, PATCH or DELETE",
                expression=f"{where}.request.method",
            )
        if req["method"] in ("POST", "PUT", "PATCH") and not isinstance(
            entry.get("resource"), dict
        ):
            raise InvalidRequest(f"{where}: {req['method']} needs a resource", expression=where)
    return kind, entries


def process_bundle(api: FhirApi, req: FhirRequest, bundle: Any) -> dict[str, Any]:
    """The response Bundle of a batch or transaction posted in ``req``."""
    kind, entries = _entries(bundle)
    if kind == "batch":
        return {
            "resourceType": "Bundle",
            "type": "batch-response",
            "entry": [_dispatch(api, req, entry) for entry in entries],
        }
    return _transaction(api, req, entries)


def _split(api: FhirApi, url: str) -> Any:
    """The parts of an entry's URL; 400 when it is none, or an absolute URL of another server
    (FHIR: an absolute request.url must be under the server's base)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise InvalidRequest(f"request.url {url[:100]!r} is not a URL") from None
    if parts.scheme or parts.netloc:
        base = api.svc.config.fhir_base.rstrip("/")
        if not url.startswith(base + "/"):
            raise InvalidRequest(
                f"request.url {url[:100]!r} names another server: an absolute URL must start "
                f"with this server's FHIR base {base}/"
            )
    return parts


def _dispatch(api: FhirApi, req: FhirRequest, entry: dict[str, Any]) -> dict[str, Any]:
    """Run one entry as the same request sent alone would run (checks, audit), by the same
    caller, and answer it as a response entry."""
    entry_request = entry["request"]
    try:
        url = _split(api, entry_request["url"])
    except FhirError as exc:
        return _failed(exc)
    path = unquote(url.path)
    base_path = urlsplit(api.svc.config.fhir_base).path
    if path.startswith(base_path + "/"):
        path = path[len(base_path) :]
    headers = {"prefer": f"return={req.prefer('return', 'representation')}"}
    for name, header in (
        ("ifMatch", "if-match"),
        ("ifNoneExist", "if-none-exist"),
        ("ifNoneMatch", "if-none-match"),
        ("ifModifiedSince", "if-modified-since"),
    ):
        if isinstance(entry_request.get(name), str):
            headers[header] = entry_request[name]
    try:
        if entry_request["method"] == "PATCH":
            body = jsonio.dump(operations_in_binary(entry["resource"]))
            content_type = JSON_PATCH
        else:
            body = jsonio.dump(entry["resource"]) if "resource" in entry else b""
            content_type = "application/fhir+json"
        answer = api.handle(
            FhirRequest(
                method=entry_request["method"],
                path=path.lstrip("/"),
                query=parse_qsl(url.query, keep_blank_values=True),
                caller=req.caller,
                headers=headers,
                body=body,
                content_type=content_type,
                raw_query=url.query,
            )
        )
    except FhirError as exc:
        return _failed(exc)
    return _answered(answer)


def _failed(exc: FhirError) -> dict[str, Any]:
    return {"response": {"status": FhirResponse(exc.status).status_line, "outcome": exc.outcome()}}


def _answered(answer: FhirResponse) -> dict[str, Any]:
    result: dict[str, Any] = {"response": {"status": answer.status_line}}
    for header, field in (("Location", "location"), ("ETag", "etag")):
        if header in answer.headers:
            result["response"][field] = answer.headers[header]
    body = answer.body
    if body:
        parsed = body if isinstance(body, dict) else jsonio.parse(body)
        if answer.status >= 400 or (  # an outcome, not a stored OperationOutcome (with an id)
            parsed.get("resourceType") == "OperationOutcome" and "id" not in parsed
        ):
            result["response"]["outcome"] = parsed
        else:
            result["resource"] = parsed
    return result


def _rewrite(value: Any, ids: dict[str, str]) -> Any:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key == "reference" and isinstance(item, str) and item in ids:
                out[key] = ids[item]
            else:
                out[key] = _rewrite(item, ids)
        return out
    if isinstance(value, list):
        return [_rewrite(item, ids) for item in value]
    return value


def _target(api: FhirApi, url: str) -> tuple[str, str | None, str]:
    """(type, id or None, query) of an entry's request URL, relative to the base."""
    parts = _split(api, url)
    base_path = urlsplit(api.svc.config.fhir_base).path
    path = parts.path
    if path.startswith(base_path + "/"):
        path = path[len(base_path) + 1 :]
    segments = [s for s in path.strip("/").split("/") if s]
    if not segments or len(segments) > 2:
        raise InvalidRequest(f"request.url {url!r} must be Type or Type/id")
    resource_type = check_type(segments[0])
    resource_id = check_id(segments[1]) if len(segments) == 2 else None
    return resource_type, resource_id, parts.query


def _transaction(api: FhirApi, req: FhirRequest, entries: list[dict[str, Any]]) -> dict[str, Any]:
    svc = api.svc
    ids: dict[str, str] = {}
    plan: list[tuple[int, str, str, str | None, str]] = []
    for index, entry in enumerate(entries):
        method = entry["request"]["method"]
        try:
            resource_type, resource_id, query = _target(api, entry["request"]["url"])
            if method in ("PUT", "DELETE") and resource_id is None and not query:
                raise InvalidRequest(f"{method} needs Type/id or Type?search (conditional)")
            if method == "PATCH":
                if resource_id is None:
                    raise InvalidRequest("PATCH needs Type/id")
                operations_in_binary(entry["resource"])  # a malformed one fails before any
            if method == "POST" and resource_id is not None:
                raise InvalidRequest("POST takes a type, not Type/id")
            if method in ("POST", "PUT") and entry["resource"].get("resourceType") != resource_type:
                raise InvalidRequest(
                    f"the resource is a {entry['resource'].get('resourceType')}, the URL names "
                    f"{resource_type}"
                )
        except FhirError as exc:
            raise _fail(index, exc) from None
        full_url = entry.get("fullUrl")
        if method == "POST":
            resource_id = str(uuid.uuid4())
            if isinstance(full_url, str) and full_url.startswith("urn:uuid:"):
                if full_url in ids:
                    raise InvalidRequest(f"Bundle.entry[{index}]: fullUrl {full_url} twice")
                ids[full_url] = f"{resource_type}/{resource_id}"
        plan.append((index, method, resource_type, resource_id, query))
    results: dict[int, dict[str, Any]] = {}
    written: list[Stored] = []
    before: dict[tuple[str, str], frozenset[str]] = {}  # patients of what is changed
    with svc.store.writing(req.principal) as writer:
        writer.deferred = []  # entries may refer to resources created by later entries
        # conditional creates first: a reference to one that matches must name what matched
        existing_of: dict[int, Stored] = {}
        for index, method, resource_type, _id, _query in plan:
            condition = entries[index]["request"].get("ifNoneExist")
            if method != "POST" or not condition:
                continue
            try:
                match = api.conditional_match(req, writer, resource_type, condition)
            except FhirError as exc:
                raise _fail(index, exc) from None
            if match is not None:
                existing_of[index] = match
                full_url = entries[index].get("fullUrl")
                if isinstance(full_url, str) and full_url in ids:
                    ids[full_url] = f"{match.type}/{match.id}"
        plan = _resolve_conditional_targets(api, req, writer, entries, plan, ids)
        _resolve_conditional_references(api, req, writer, entries, ids)
        for index, method, resource_type, resource_id, _query in sorted(
            plan, key=lambda step: (ORDER[step[1]], step[0])
        ):
            if method == "GET":
                continue
            entry = entries[index]
            writer.tag = index
            try:
                action = {"POST": "c", "PUT": "u", "PATCH": "u", "DELETE": "d"}[method]
                api.permit(req, resource_type, action, "transaction")
                if method == "DELETE" and resource_id is None:  # a conditional one: no match
                    results[index] = {"response": {"status": FhirResponse(204).status_line}}
                    continue
                if method in ("DELETE", "PUT", "PATCH"):
                    assert resource_id is not None
                    before.update(svc.audit.patients_before(writer, resource_type, resource_id))
                if method == "DELETE":
                    assert resource_id is not None
                    stored = writer.delete(
                        resource_type, resource_id, entry["request"].get("ifMatch")
                    )
                    results[index] = {"response": {"status": FhirResponse(204).status_line}}
                    if stored is not None:
                        written.append(stored)
                    continue
                if method == "PATCH":
                    assert resource_id is not None
                    operations = _rewrite(operations_in_binary(entry["resource"]), ids)
                    resource, etag = patched(
                        svc.store,
                        writer.conn,
                        resource_type,
                        resource_id,
                        operations,
                        entry["request"].get("ifMatch"),
                    )
                    stored, _ = writer.update(resource_type, resource_id, resource, etag)
                    results[index] = _written(api, req, stored, 200)
                    written.append(stored)
                    continue
                resource = _rewrite(entry["resource"], ids)
                if method == "POST":
                    existing = existing_of.get(index)
                    if existing is not None:
                        results[index] = _written(api, req, existing, 200)
                        written.append(existing)  # shown to the caller: in the audit record
                        continue
                    stored = writer.create(resource, resource_type, resource_id=resource_id)
                    results[index] = _written(api, req, stored, 201)
                else:
                    assert resource_id is not None
                    if _query:  # a conditional update: the id its search resolved to
                        resource = {**resource, "id": resource_id}
                    stored, created = writer.update(
                        resource_type, resource_id, resource, entry["request"].get("ifMatch")
                    )
                    if created:
                        api.permit(req, resource_type, "c", "transaction")
                    results[index] = _written(api, req, stored, 201 if created else 200)
                written.append(stored)
            except FhirError as exc:
                raise _fail(index, exc) from None
        try:
            writer.check_deferred()
        except FhirError as exc:
            raise _fail(writer.tag, exc) from None
        if written:
            svc.audit.writes(writer, req.caller, "transaction", written, before)
    for index, method, *_rest in plan:
        if method == "GET":
            results[index] = _dispatch(api, req, entries[index])
    return {
        "resourceType": "Bundle",
        "type": "transaction-response",
        "entry": [results[index] for index in range(len(entries))],
    }


def target_of_update(resource: Any, match: Stored | None) -> str | None:
    """The id a conditional update writes: the match's (400 when the body names another), the
    body's when nothing matched, or None to create under a new id."""
    body_id = resource.get("id") if isinstance(resource, dict) else None
    if match is not None:
        if body_id is not None and body_id != match.id:
            raise InvalidRequest(
                f"the body's id {str(body_id)[:64]!r} is not that of the resource the search "
                f"matched ({match.type}/{match.id})",
                expression="id",
            )
        return match.id
    return check_id(body_id) if isinstance(body_id, str) else None


def _resolve_conditional_targets(
    api: FhirApi,
    req: FhirRequest,
    writer: Writer,
    entries: list[dict[str, Any]],
    plan: list[tuple[int, str, str, str | None, str]],
    ids: dict[str, str],
) -> list[tuple[int, str, str, str | None, str]]:
    """The plan with the id of each conditional update or delete (``PUT``/``DELETE
    Type?search``) resolved as it would be alone: the one match; for an update with none, the
    body's id or a new one (a create); for a delete with none, None (nothing to delete).
    Several matches: 412, naming the entry. An update's ``urn:uuid`` fullUrl then names it."""
    resolved = []
    for index, method, resource_type, resource_id, query in plan:
        if method in ("PUT", "DELETE") and resource_id is None:
            what = f"the conditional {'update' if method == 'PUT' else 'delete'}"
            try:
                match = api.conditional_match(req, writer, resource_type, query, what)
                if method == "PUT":
                    resource_id = target_of_update(entries[index]["resource"], match) or str(
                        uuid.uuid4()
                    )
                    full_url = entries[index].get("fullUrl")
                    if isinstance(full_url, str) and full_url.startswith("urn:uuid:"):
                        ids[full_url] = f"{resource_type}/{resource_id}"
                elif match is not None:
                    resource_id = match.id
            except FhirError as exc:
                raise _fail(index, exc) from None
        resolved.append((index, method, resource_type, resource_id, query))
    return resolved


def _resolve_conditional_references(
    api: FhirApi,
    req: FhirRequest,
    writer: Writer,
    entries: list[dict[str, Any]],
    ids: dict[str, str],
) -> None:
    """Add to ``ids`` what each conditional reference (``Organization?identifier=s|v``) of the
    entries' resources names: the one resource its search matches, as things stand before the
    transaction writes (and after its conditional creates matched). None or several: the
    transaction fails, naming the entry (422, 412), as FHIR R4 asks."""
    for index, entry in enumerate(entries):
        if not isinstance(entry.get("resource"), dict):
            continue
        for _path, reference in references(entry["resource"]):
            if "?" not in reference or reference in ids or "://" in reference:
                continue
            resource_type, _, condition = reference.partition("?")
            try:
                check_type(resource_type)
                match = api.conditional_match(
                    req, writer, resource_type, condition, "the conditional reference"
                )
                if match is None:
                    raise Unprocessable(
                        f"the conditional reference {reference!r} matches no {resource_type}"
                    )
            except FhirError as exc:
                raise _fail(index, exc) from None
            ids[reference] = f"{match.type}/{match.id}"


def _written(api: FhirApi, req: FhirRequest, stored: Stored, status: int) -> dict[str, Any]:
    """A transaction's response entry for a write, holding what ``Prefer: return=`` asks
    for as a write sent alone would (:meth:`FhirApi.written`): the resource (the default),
    nothing, or an OperationOutcome in ``response.outcome``."""
    answer = _answered(api.written(req, stored, status))
    answer["response"].update(
        location=stored.location, lastModified=format_instant(stored.last_updated)
    )
    return {"fullUrl": f"{api.svc.config.fhir_base}/{stored.type}/{stored.id}", **answer}
