"""Batch and transaction Bundles posted to ``/fhir``.

A **batch** runs each entry as if it had been sent alone (same checks, same audit), and
answers each with its own status, an OperationOutcome for those that failed.

A **transaction** is all or nothing: every write runs in one database transaction, in the
order FHIR prescribes (DELETE, POST, PUT), after ``urn:uuid:`` fullUrls of created resources
are given their ids and every reference to them is rewritten. The first failure undoes
everything and is answered with its status and an OperationOutcome naming the entry. Reads
(GET entries) run after the writes commit, and see them.

Either takes at most :data:`MAX_ENTRIES` entries (413 beyond, before any is run). An entry's
``request.url`` is relative to this server's FHIR base, or an absolute URL under that base:
one naming another server is refused (its entry fails in a batch; a transaction fails whole).
"""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import urlsplit

from flask import current_app, request

from fhir_adapters import jsonio
from fhir_adapters.errors import FhirError, InvalidRequest, Issue, TooCostly
from fhir_adapters.resources import check_id, check_type
from fhir_adapters.store import Stored, format_instant
from node import fhir_api

MAX_ENTRIES = 200  # of a batch or transaction: each entry is a request (and an AuditEvent)
STATUS_TEXT = {200: "200 OK", 201: "201 Created", 204: "204 No Content"}
ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "GET": 3}


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
                f"{where}.request.method must be GET, POST, PUT or DELETE",
                expression=f"{where}.request.method",
            )
        if req["method"] in ("POST", "PUT") and not isinstance(entry.get("resource"), dict):
            raise InvalidRequest(f"{where}: {req['method']} needs a resource", expression=where)
    return kind, entries


def process_bundle(bundle: Any) -> dict[str, Any]:
    kind, entries = _entries(bundle)
    if kind == "batch":
        return {
            "resourceType": "Bundle",
            "type": "batch-response",
            "entry": [_dispatch(entry) for entry in entries],
        }
    return _transaction(entries)


def _split(url: str) -> Any:
    """The parts of an entry's URL; 400 when it is none, or an absolute URL of another server
    (FHIR: an absolute request.url must be under the server's base)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise InvalidRequest(f"request.url {url[:100]!r} is not a URL") from None
    if parts.scheme or parts.netloc:
        base = fhir_api.services().config.fhir_base.rstrip("/")
        if not url.startswith(base + "/"):
            raise InvalidRequest(
                f"request.url {url[:100]!r} names another server: an absolute URL must start "
                f"with this server's FHIR base {base}/"
            )
    return parts


def _dispatch(entry: dict[str, Any]) -> dict[str, Any]:
    """Run one entry as its own request through the whole app (auth, checks, audit)."""
    req = entry["request"]
    try:
        url = _split(req["url"])
    except FhirError as exc:
        return {"response": {"status": f"{exc.status} Bad Request", "outcome": exc.outcome()}}
    path = url.path
    base_path = urlsplit(fhir_api.services().config.fhir_base).path
    if path.startswith(base_path + "/"):
        path = path[len(base_path) :]
    headers = {
        "Authorization": request.headers.get("Authorization", ""),
        "Content-Type": "application/fhir+json",
        "Prefer": "return=representation",
    }
    for name, header in (
        ("ifMatch", "If-Match"),
        ("ifNoneExist", "If-None-Exist"),
        ("ifNoneMatch", "If-None-Match"),
    ):
        if isinstance(req.get(name), str):
            headers[header] = req[name]
    body = jsonio.dump(entry["resource"]) if "resource" in entry else None
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    with app.test_request_context(
        "/fhir/" + path.lstrip("/"),
        method=req["method"],
        query_string=url.query,
        headers=headers,
        data=body,
        environ_base={"REMOTE_ADDR": request.remote_addr or ""},
    ):
        response = app.full_dispatch_request()
    result: dict[str, Any] = {
        "response": {"status": f"{response.status_code} {response.status.split(' ', 1)[-1]}"}
    }
    for header, field in (("Location", "location"), ("ETag", "etag")):
        if header in response.headers:
            result["response"][field] = response.headers[header]
    data = response.get_data()
    if data:
        parsed = jsonio.parse(data)
        if response.status_code >= 400:
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


def _target(url: str) -> tuple[str, str | None, str]:
    """(type, id or None, query) of an entry's request URL, relative to the base."""
    parts = _split(url)
    base_path = urlsplit(fhir_api.services().config.fhir_base).path
    path = parts.path
    if path.startswith(base_path + "/"):
        path = path[len(base_path) + 1 :]
    segments = [s for s in path.strip("/").split("/") if s]
    if not segments or len(segments) > 2:
        raise InvalidRequest(f"request.url {url!r} must be Type or Type/id")
    resource_type = check_type(segments[0])
    resource_id = check_id(segments[1]) if len(segments) == 2 else None
    return resource_type, resource_id, parts.query


def _transaction(entries: list[dict[str, Any]]) -> dict[str, Any]:
    svc = fhir_api.services()
    ids: dict[str, str] = {}
    plan: list[tuple[int, str, str, str | None, str]] = []
    for index, entry in enumerate(entries):
        method = entry["request"]["method"]
        try:
            resource_type, resource_id, query = _target(entry["request"]["url"])
            if method in ("PUT", "DELETE") and resource_id is None:
                raise InvalidRequest(
                    f"{method} needs Type/id (conditional {method.lower()} is not supported)"
                )
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
    with svc.store.writing() as writer:
        writer.deferred = []  # entries may refer to resources created by later entries
        # conditional creates first: a reference to one that matches must name what matched
        existing_of: dict[int, Stored] = {}
        for index, method, resource_type, _id, _query in plan:
            condition = entries[index]["request"].get("ifNoneExist")
            if method != "POST" or not condition:
                continue
            try:
                match = fhir_api._conditional_match(writer, resource_type, condition)
            except FhirError as exc:
                raise _fail(index, exc) from None
            if match is not None:
                existing_of[index] = match
                full_url = entries[index].get("fullUrl")
                if isinstance(full_url, str) and full_url in ids:
                    ids[full_url] = f"{match.type}/{match.id}"
        for index, method, resource_type, resource_id, _query in sorted(
            plan, key=lambda step: (ORDER[step[1]], step[0])
        ):
            if method == "GET":
                continue
            entry = entries[index]
            writer.tag = index
            try:
                action = {"POST": "c", "PUT": "u", "DELETE": "d"}[method]
                fhir_api.permit(resource_type, action, "transaction")
                if method in ("DELETE", "PUT"):
                    assert resource_id is not None
                    before.update(fhir_api.patients_before(writer, resource_type, resource_id))
                if method == "DELETE":
                    assert resource_id is not None
                    stored = writer.delete(
                        resource_type, resource_id, entry["request"].get("ifMatch")
                    )
                    results[index] = {"response": {"status": STATUS_TEXT[204]}}
                    if stored is not None:
                        written.append(stored)
                    continue
                resource = _rewrite(entry["resource"], ids)
                if method == "POST":
                    existing = existing_of.get(index)
                    if existing is not None:
                        results[index] = _written(existing, 200)
                        written.append(existing)  # shown to the caller: in the audit record
                        continue
                    stored = writer.create(resource, resource_type, resource_id=resource_id)
                    results[index] = _written(stored, 201)
                else:
                    assert resource_id is not None
                    stored, created = writer.update(
                        resource_type, resource_id, resource, entry["request"].get("ifMatch")
                    )
                    if created:
                        fhir_api.permit(resource_type, "c", "transaction")
                    results[index] = _written(stored, 201 if created else 200)
                written.append(stored)
            except FhirError as exc:
                raise _fail(index, exc) from None
        try:
            writer.check_deferred()
        except FhirError as exc:
            raise _fail(writer.tag, exc) from None
        if written:
            fhir_api._audit_write(writer, "transaction", written, before)
    for index, method, *_rest in plan:
        if method == "GET":
            results[index] = _dispatch(entries[index])
    return {
        "resourceType": "Bundle",
        "type": "transaction-response",
        "entry": [results[index] for index in range(len(entries))],
    }


def _written(stored: Stored, status: int) -> dict[str, Any]:
    return {
        "fullUrl": f"{fhir_api.services().config.fhir_base}/{stored.type}/{stored.id}",
        "resource": jsonio.parse(stored.body or b"{}"),
        "response": {
            "status": STATUS_TEXT[status],
            "location": stored.location,
            "etag": stored.etag,
            "lastModified": format_instant(stored.last_updated),
        },
    }
