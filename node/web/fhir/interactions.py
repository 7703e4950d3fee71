"""The FHIR R4 API without its transport: every interaction of the CapabilityStatement, and the
node's ``$operations``, as functions of a :class:`FhirRequest` that return a
:class:`FhirResponse` (or raise :class:`~fhir_adapters.errors.FhirError`).

:mod:`node.web.fhir.rest` feeds it HTTP requests; :mod:`node.web.fhir.bundles` feeds it the
entries of batch and transaction Bundles, so that an entry runs exactly as the same request
sent alone would (the same checks, the same audit) without going through HTTP again. Each
request is checked against the caller's scopes and role, carried out by the resource store,
audited (:mod:`node.records.audit_trail`) and answered in ``application/fhir+json``; stored
resources go out as the bytes they were stored as.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

from fhir_adapters.errors import (
    FhirError,
    Gone,
    InvalidRequest,
    Issue,
    MethodNotAllowed,
    NotFound,
    PreconditionFailed,
    operation_outcome,
)
from fhir_adapters.store import (
    Stored,
    Writer,
    format_instant,
    http_date,
    jsonio,
    now_micros,
    readable_only,
)
from fhir_adapters.store.resources import RESOURCE_TYPES, check_id, check_type, validate
from fhir_adapters.store.search import (
    DEFAULT_COUNT,
    MAX_COUNT,
    Access,
    Matches,
    parse_search,
    whole_number,
)
from fhir_adapters.store.search_params import COMPARTMENT_PARAMS, date_range, index_values
from fhir_adapters.store.subsetting import Subsetting, parse_subsetting
from node.flows import orders
from node.flows.permissions import permit
from node.flows.prior_results import CATEGORIES, fetch_prior_results
from node.records.audit_trail import per_patient
from node.services import Services
from node.web.fhir.bundles import process_bundle, target_of_update
from node.web.fhir.capability import capability_statement
from node.web.fhir.messages import FhirRequest, FhirResponse
from node.web.fhir.patching import patched

Handler = Callable[..., FhirResponse]


class FhirApi:
    """The interactions of one node (see the module docstring)."""

    def __init__(self, services: Services) -> None:
        self.svc = services

    # -- dispatch --------------------------------------------------------------------------

    def handle(self, req: FhirRequest) -> FhirResponse:
        """Carry out one request; FhirError for everything that is refused. ``req.route`` is
        set to the pattern it matched (``/fhir/<resource_type>/<resource_id>``: never the path,
        which holds ids), for the logs and metrics."""
        method, segments = req.method, [s for s in req.path.split("/") if s]
        route = self._route(method, segments)
        if route is None:
            req.route = "/fhir/<path:rest>"
            return self._unknown(req, segments)
        handler, arguments = route
        req.route = ROUTES[handler.__name__]
        return handler(req, *arguments)

    def _route(self, method: str, s: list[str]) -> tuple[Handler, list[str]] | None:
        """The handler of a request and the parts of its path it takes, or None."""
        n = len(s)
        if n == 0:
            handler: Handler | None = {"GET": self.system_get, "POST": self.bundle}.get(method)
            return (handler, []) if handler else None
        if n == 1 and s[0] == "metadata":
            return (self.metadata, []) if method == "GET" else None
        if n == 1 and s[0] == "_history":
            return (self.history_system, []) if method == "GET" else None
        if n == 2 and s == ["Patient", "$everything"] and method in ("GET", "POST"):
            return self.everything_of_type, []
        operation = self._operations.get((method, s[0], n, s[-1]))
        if operation is not None:
            return operation, s[1:-1]
        if n == 2 and s[1] == "_history":
            return (self.history_type, s[:1]) if method == "GET" else None
        if n == 2 and s[1] == "_search":
            return (self.search_post, s[:1]) if method == "POST" else None
        if n == 3 and s[2] == "_history":
            return (self.history_instance, s[:2]) if method == "GET" else None
        if n == 3 and s[0] == "Patient" and s[2] in RESOURCE_TYPES:
            return (self.compartment_search, s[1:]) if method == "GET" else None
        if n == 4 and s[2] == "_history":
            return (self.vread, [s[0], s[1], s[3]]) if method == "GET" else None
        if n == 2:
            handler = {
                "GET": self.read,
                "PUT": self.update,
                "DELETE": self.delete,
                "PATCH": self.patch,
            }.get(method)
            return (handler, s) if handler else None
        if n == 1:
            handler = {
                "GET": self.search_get,
                "POST": self.create,
                "PUT": self.conditional_update,
                "DELETE": self.conditional_delete,
            }.get(method)
            return (handler, s) if handler else None
        return None

    @property
    def _operations(self) -> dict[tuple[str, str, int, str], Handler]:
        """(method, type, path segments, name) of each operation, and its handler."""
        return {
            ("GET", "Patient", 3, "$everything"): self.everything,
            ("POST", "Patient", 3, "$everything"): self.everything,
            ("GET", "Patient", 3, "$prior-results"): self.prior_results,
            ("POST", "ServiceRequest", 2, "$check-recognition"): self.check_recognition,
            ("POST", "ServiceRequest", 3, "$accept-recognised"): self.accept_recognised,
            ("POST", "ServiceRequest", 3, "$reorder"): self.reorder,
        }

    def _unknown(self, req: FhirRequest, segments: list[str]) -> FhirResponse:
        rest = "/".join(segments)
        first = segments[0] if segments else ""
        if first in RESOURCE_TYPES or first == "metadata" or not segments:
            raise MethodNotAllowed(f"{req.method} /fhir/{rest} is not a supported interaction")
        if first and first[0].isupper():
            check_type(first)
        raise NotFound(f"/fhir/{rest} is not a FHIR endpoint of this server")

    # -- what every interaction shares ---------------------------------------------------------

    def permit(self, req: FhirRequest, resource_type: str, action: str, interaction: str) -> Access:
        req.principal  # noqa: B018  # 401 first, without a token
        return permit(self.svc, req.caller, resource_type, action, interaction)

    def _respond(
        self,
        status: int,
        body: bytes | dict[str, Any] | None,
        headers: dict[str, str] | None = None,
    ) -> FhirResponse:
        return FhirResponse(status, body, headers or {})

    @staticmethod
    def version_headers(stored: Stored) -> dict[str, str]:
        return {"ETag": stored.etag, "Last-Modified": http_date(stored.last_updated)}

    def written(self, req: FhirRequest, stored: Stored, status: int) -> FhirResponse:
        """The answer to a write, as ``Prefer: return=`` asks (FHIR's default: the resource)."""
        headers = self.version_headers(stored)
        headers["Location"] = f"{self.svc.config.fhir_base}/{stored.location}"
        headers["Content-Location"] = headers["Location"]
        wanted = req.prefer("return", "representation")
        if wanted == "minimal":
            return self._respond(status, None, headers)
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
            return self._respond(status, outcome, headers)
        return self._respond(status, stored.body, headers)

    def _visible(self, stored: Stored, access: Access) -> None:
        """404 (not 403: existence is itself private) when the caller may not see it."""
        if access.patients is not None and not (
            self.svc.store.patients_by_item([stored])[(stored.type, stored.id)] & access.patients
        ):
            raise NotFound(f"{stored.type}/{stored.id} is not known")

    def _not_modified(self, req: FhirRequest, stored: Stored) -> FhirResponse | None:
        if_none_match = req.header("If-None-Match")
        if if_none_match and stored.etag in [v.strip() for v in if_none_match.split(",")]:
            return self._respond(304, None, self.version_headers(stored))
        since_text = req.header("If-Modified-Since")
        if since_text:
            try:
                since = parsedate_to_datetime(since_text)
            except (TypeError, ValueError):
                return None  # a date that cannot be read is no condition (RFC 9110 13.1.3)
            if stored.last_updated // 1_000_000 <= int(since.timestamp()):
                return self._respond(304, None, self.version_headers(stored))
        return None

    # -- capability ----------------------------------------------------------------------------

    def metadata(self, req: FhirRequest) -> FhirResponse:
        return self._respond(200, capability_statement(self.svc.config))

    # -- instance level ------------------------------------------------------------------------

    def read(self, req: FhirRequest, resource_type: str, resource_id: str) -> FhirResponse:
        check_type(resource_type)
        access = self.permit(req, resource_type, "r", "read")
        stored = self.svc.store.current(resource_type, resource_id)
        self._visible(stored, access)  # before telling deleted from unknown: that too is private
        if stored.deleted:
            raise Gone(f"{resource_type}/{resource_id} was deleted")
        subsetting = _subsetting(req, resource_type)
        unchanged = self._not_modified(req, stored)
        self.svc.audit.reads(req.caller, "read", [stored])
        return unchanged or self._respond(
            200, _body(stored, subsetting), self.version_headers(stored)
        )

    def vread(
        self, req: FhirRequest, resource_type: str, resource_id: str, version: str
    ) -> FhirResponse:
        check_type(resource_type)
        access = self.permit(req, resource_type, "r", "vread")
        try:
            if not re.fullmatch(r"[0-9]{1,9}", version):
                raise NotFound(f"{resource_type}/{resource_id} has no version {version[:40]!r}")
            current = self.svc.store.current(resource_type, resource_id)
            self._visible(current, access)
            stored = self.svc.store.vread(resource_type, resource_id, int(version))
            if access.patients is not None:
                rows = index_values(stored.resource(), self.svc.config.fhir_base)
                if not rows.compartment & access.patients:
                    raise NotFound(f"{stored.type}/{stored.id} has no such version")
        except (NotFound, Gone):
            if access.patients is None:
                raise
            # to a patient, every way of not seeing it looks the same
            raise NotFound(f"{resource_type}/{resource_id} is not known") from None
        subsetting = _subsetting(req, resource_type)  # refused before anything is recorded
        self.svc.audit.reads(req.caller, "vread", [stored])
        return self._respond(200, _body(stored, subsetting), self.version_headers(stored))

    def update(self, req: FhirRequest, resource_type: str, resource_id: str) -> FhirResponse:
        check_type(resource_type)
        self.permit(req, resource_type, "u", "update")
        check_id(resource_id)
        resource = req.json()
        svc = self.svc
        with svc.store.writing(req.principal) as writer:
            before = svc.audit.patients_before(writer, resource_type, resource_id)
            stored, created = writer.update(
                resource_type, resource_id, resource, req.header("If-Match")
            )
            if created:  # an update that creates needs the right to create (else rolled back)
                self.permit(req, resource_type, "c", "update")
            interaction = "update" if not created else "create"
            svc.audit.writes(writer, req.caller, interaction, [stored], before)
        return self.written(req, stored, 201 if created else 200)

    def delete(self, req: FhirRequest, resource_type: str, resource_id: str) -> FhirResponse:
        check_type(resource_type)
        self.permit(req, resource_type, "d", "delete")
        svc = self.svc
        with svc.store.writing(req.principal) as writer:
            before = svc.audit.patients_before(writer, resource_type, resource_id)
            stored = writer.delete(resource_type, resource_id, req.header("If-Match"))
            if stored is not None:
                svc.audit.writes(writer, req.caller, "delete", [stored], before)
        return self._respond(204, None, {"ETag": stored.etag} if stored else {})

    def patch(self, req: FhirRequest, resource_type: str, resource_id: str) -> FhirResponse:
        """``PATCH Type/id`` with a JSON Patch (RFC 6902), applied to the current version and
        stored as the next one, validated as an update is; ``If-Match`` honoured. A patch that
        cannot be applied (a path that is not there, a failed ``test``) is 422 and changes
        nothing."""
        check_type(resource_type)
        self.permit(req, resource_type, "u", "patch")
        check_id(resource_id)
        operations = req.json_patch()
        svc = self.svc
        with svc.store.writing(req.principal) as writer:
            if_match = req.header("If-Match")
            resource, etag = patched(
                svc.store, writer.conn, resource_type, resource_id, operations, if_match
            )
            before = svc.audit.patients_before(writer, resource_type, resource_id)
            stored, _ = writer.update(resource_type, resource_id, resource, etag)
            svc.audit.writes(writer, req.caller, "patch", [stored], before)
        return self.written(req, stored, 200)

    def conditional_update(self, req: FhirRequest, resource_type: str) -> FhirResponse:
        """``PUT Type?search``: the one match updated (a body naming another id: 400), none:
        created (under the body's id, if it names one), several: 412."""
        check_type(resource_type)
        self.permit(req, resource_type, "u", "update")
        condition = _condition(req, "a conditional update")
        resource = req.json()
        if not isinstance(resource, dict):
            raise InvalidRequest("the body must be a resource (a JSON object)")
        svc = self.svc
        with svc.store.writing(req.principal) as writer:
            match = self.conditional_match(
                req, writer, resource_type, condition, "the conditional update"
            )
            resource_id = target_of_update(resource, match)
            if resource_id is None:
                self.permit(req, resource_type, "c", "update")
                stored, created, before = writer.create(resource, resource_type), True, {}
            else:
                before = svc.audit.patients_before(writer, resource_type, resource_id)
                stored, created = writer.update(
                    resource_type,
                    resource_id,
                    {**resource, "id": resource_id},
                    req.header("If-Match"),
                )
                if created:
                    self.permit(req, resource_type, "c", "update")
            svc.audit.writes(
                writer, req.caller, "create" if created else "update", [stored], before
            )
        return self.written(req, stored, 201 if created else 200)

    def conditional_delete(self, req: FhirRequest, resource_type: str) -> FhirResponse:
        """``DELETE Type?search``: the one match deleted; none: nothing to do (204); several:
        412 (this server deletes one resource per request)."""
        check_type(resource_type)
        self.permit(req, resource_type, "d", "delete")
        condition = _condition(req, "a conditional delete")
        svc = self.svc
        with svc.store.writing(req.principal) as writer:
            match = self.conditional_match(
                req, writer, resource_type, condition, "the conditional delete"
            )
            if match is None:
                return self._respond(204, None)
            before = svc.audit.patients_before(writer, resource_type, match.id)
            stored = writer.delete(resource_type, match.id, req.header("If-Match"))
            if stored is not None:
                svc.audit.writes(writer, req.caller, "delete", [stored], before)
        return self._respond(204, None, {"ETag": stored.etag} if stored else {})

    # -- type level ----------------------------------------------------------------------------

    def create(self, req: FhirRequest, resource_type: str) -> FhirResponse:
        check_type(resource_type)
        self.permit(req, resource_type, "c", "create")
        unexpected = [name for name, _ in req.query if name not in ("_format", "_pretty")]
        if unexpected:
            raise InvalidRequest(
                f"create takes no parameters ({', '.join(unexpected)}); for a conditional "
                "create send the search as the If-None-Exist header"
            )
        resource = req.json()
        condition = req.header("If-None-Exist")
        svc = self.svc
        prepared = None
        events = []
        if not condition:  # validated and prepared, with its record, before the write's turn
            prepared = svc.store.new_resource(validate(resource, resource_type))
            events = svc.audit.created(req.caller, prepared)
        with svc.store.writing(req.principal) as writer:
            if condition:
                existing = self.conditional_match(req, writer, resource_type, condition)
                if existing is not None:  # the caller is shown an existing resource: audited
                    svc.audit.writes(writer, req.caller, "create", [existing])
                    return self._respond(200, existing.body, self.version_headers(existing))
            stored = writer.create(prepared or resource, resource_type)
            if prepared is None:
                self._audit_created(writer, req, stored)
            for event in events:
                writer.create(event, checked=True)
        answer = self.written(req, stored, 201)
        if resource_type == "ServiceRequest":
            self._recognition_hint(req, stored, answer)
        return answer

    def _audit_created(self, writer: Writer, req: FhirRequest, stored: Stored) -> None:
        """A create's AuditEvents, in its transaction, as ``audit.writes`` records them, by
        the patients the store found when it indexed the resource (not indexed again)."""
        if stored.patients is None:
            self.svc.audit.writes(writer, req.caller, "create", [stored])
            return
        patients = {(stored.type, stored.id): stored.patients}
        for group_patients, group in per_patient([stored], patients):
            record = req.caller.record("create", entities=group, patients=group_patients)
            self.svc.audit.record_in(writer, record)

    def _recognition_hint(self, req: FhirRequest, order: Stored, answer: FhirResponse) -> None:
        """A new order of a recognised-list item for a referred patient is answered with
        whether recognised prior results exist: ``X-HRX-Recognised-Results`` (how many) and
        ``X-HRX-Recognised-Item``, and with ``Prefer: return=OperationOutcome`` an information
        issue naming each (the doctor then accepts one with ``$accept-recognised``)."""
        try:
            hint = orders.recognition_hint(self.svc, req.caller, order)
        except FhirError:  # the order stands; the hint is only a convenience
            return
        if hint is None:
            return
        answer.headers["X-HRX-Recognised-Item"] = hint.item.id
        answer.headers["X-HRX-Recognised-Results"] = str(len(hint.found))
        if hint.found and isinstance(answer.body, dict):  # return=OperationOutcome
            answer.body["issue"] += [
                {
                    "severity": "information",
                    "code": "informational",
                    "diagnostics": f"recognised prior result (HR) for {hint.item.label()}: "
                    f"{result['fullUrl']}, valid until {result['validUntil']}",
                }
                for result in hint.found
            ]

    def conditional_match(
        self,
        req: FhirRequest,
        writer: Writer,
        resource_type: str,
        condition: str,
        what: str = "If-None-Exist",
    ) -> Stored | None:
        """The one resource a condition (``what``: an ``If-None-Exist``, a conditional
        reference) matches; None when none; 412 when several."""
        self.permit(req, resource_type, "s", "create")
        text = condition.split("?", 1)[1] if "?" in condition else condition
        query = parse_qsl(text, keep_blank_values=True)
        search = parse_search(resource_type, query)
        if not search.criteria:
            raise InvalidRequest(f"{what} {condition!r} has no search criteria")
        writer.lock(f"if-none-exist {resource_type}?{search.query_string()}")
        pks = self.svc.store.count_matches(search, Access(), 2, conn=writer.conn)
        if len(pks) > 1:
            raise PreconditionFailed(
                f"{what} {condition!r} matches more than one {resource_type}; make it precise"
            )
        if not pks:
            return None
        return self.svc.store.by_pk(pks[0], conn=writer.conn)

    def search_get(self, req: FhirRequest, resource_type: str) -> FhirResponse:
        return self._search(req, resource_type, req.query)

    def search_post(self, req: FhirRequest, resource_type: str) -> FhirResponse:
        return self._search(req, resource_type, req.query + req.form())

    def compartment_search(
        self, req: FhirRequest, patient_id: str, resource_type: str
    ) -> FhirResponse:
        """``Patient/{id}/Type?...``: a search of the resources of that type in the patient's
        compartment (R4's CompartmentDefinition)."""
        check_type(resource_type)
        check_id(patient_id)
        access = self.permit(req, resource_type, "s", "search-type")
        if access.patients is not None and patient_id not in access.patients:
            raise NotFound(f"Patient/{patient_id} is not known")
        if resource_type != "Patient" and not COMPARTMENT_PARAMS.get(resource_type):
            raise InvalidRequest(f"{resource_type} resources are never in a patient's compartment")
        return self._search(req, resource_type, req.query, compartment=patient_id)

    def _search(
        self,
        req: FhirRequest,
        resource_type: str,
        query: list[tuple[str, str]],
        compartment: str | None = None,
    ) -> FhirResponse:
        check_type(resource_type)
        access = self.permit(req, resource_type, "s", "search-type")
        lenient = req.prefer("handling", "strict") == "lenient"
        search = parse_search(resource_type, query, lenient=lenient)
        search.compartment = compartment
        for include in (*search.includes, *search.revincludes):
            target = include.target_type or include.source_type
            self.permit(req, include.source_type, "r", "search-type")
            if target:
                self.permit(req, target, "r", "search-type")
        matches = self.svc.store.search(search, access, req.principal.owner)
        path = f"Patient/{quote(compartment)}/{resource_type}" if compartment else resource_type
        self_link = f"{self.svc.config.fhir_base}/{path}?{search.query_string()}"
        issues = [
            Issue(f"ignored: {name}", "not-supported", severity="warning")
            for name in search.ignored
        ] + [Issue(note, "informational", severity="information") for note in search.notes]
        return self._searchset(
            req,
            matches,
            access,
            self_link,
            issues,
            query=f"{path}?{search.query_string()}",
        )

    def _searchset(
        self,
        req: FhirRequest,
        matches: Matches,
        access: Access,
        self_link: str,
        issues: list[Issue] | None = None,
        *,
        query: str,
        kind: str = "search",
        interaction: str | None = None,
    ) -> FhirResponse:
        svc = self.svc
        items = svc.store.versions_of(matches.pairs)
        included = svc.store.included(items, matches.request, access) if kind == "search" else []
        # an include may reach any type its parameter points to: only what the caller may read
        included = [item for item in included if req.principal.allows(item.type, "r")]
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
        links.extend(self._page_links(matches))
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
        asked = matches.request
        elements = asked.get("elements")
        subsetting = Subsetting(asked.get("summary"), tuple(elements) if elements else None)
        for stored in items:
            entries.append(_entry(base, stored, "match" if kind != "history" else None, subsetting))
        for stored in included:  # _elements names elements of the matches' type only
            entries.append(_entry(base, stored, "include", Subsetting(subsetting.summary)))
        if issues:
            outcome = jsonio.dump(operation_outcome(issues))
            entries.append(b'{"resource":' + outcome + b',"search":{"mode":"outcome"}}')
        svc.audit.reads(
            req.caller,
            interaction
            or {"search": "search-type", "history": "history-type", "everything": "operation"}[
                kind
            ],
            items + included,
            query,
        )
        head = jsonio.dump(bundle_head)
        body = head[:-1] + (b',"entry":[' + b",".join(entries) + b"]}" if entries else b"}")
        return self._respond(200, body)

    def _page_links(self, matches: Matches) -> list[dict[str, str]]:
        if matches.set_id is None or matches.count == 0:
            return []
        base = self.svc.config.fhir_base
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

    def system_get(self, req: FhirRequest) -> FhirResponse:
        if "_getpages" not in {name for name, _ in req.query}:
            return self.search_system(req)
        set_id = req.arg("_getpages")
        if not set_id:
            raise InvalidRequest("_getpages names no search set")
        principal = req.principal
        count = whole_number("_count", req.arg("_count", str(DEFAULT_COUNT)) or "", MAX_COUNT)
        offset = whole_number("_getpagesoffset", req.arg("_getpagesoffset", "0") or "")
        matches = self.svc.store.page(set_id, offset, count, principal.owner)
        kind = matches.request.get("kind", "search")
        resource_type = matches.request.get("type")
        access = principal.access
        if resource_type:
            access = self.permit(
                req, resource_type, "s" if kind == "search" else "r", "search-type"
            )
        self_link = f"{self.svc.config.fhir_base}?{req.raw_query}"
        return self._searchset(req, matches, access, self_link, query=req.raw_query, kind=kind)

    def search_system(self, req: FhirRequest) -> FhirResponse:
        """``GET /fhir?_type=A,B&...``: a search of several types (without ``_type``, of every
        type the caller may search), each by the same parameters (so only parameters every
        one of them has, such as ``_id``, ``_lastUpdated``, ``_tag``). With ``_sort`` (by a
        parameter every type has) the matches are merged in that order; without, they come
        by type, in the order given. ``_include=Type:param`` applies to that type's matches
        (a type that is not searched: 400); ``_revinclude`` to every type's."""
        req.principal  # noqa: B018  # 401 first, without a token
        named = [t.strip() for n, v in req.query if n == "_type" for t in v.split(",")]
        query = [(n, v) for n, v in req.query if n != "_type"]
        if named:
            types = list(dict.fromkeys(check_type(t) for t in named))
        else:
            types = [t for t in RESOURCE_TYPES if req.principal.allows(t, "s")]
            if not [
                n
                for n, _ in query
                if not n.startswith("_")
                or n in ("_id", "_lastUpdated", "_tag", "_profile", "_security", "_source")
            ]:
                raise InvalidRequest(
                    "a search of every type needs criteria, or _type=Type,... to name types"
                )
        for name, value in query:
            source = value.split(":")[0]
            if name == "_include" and value != "*" and source not in types:
                raise InvalidRequest(
                    f"_include={value[:100]} starts from {source[:64]}, which this search "
                    f"does not return (_type={','.join(types)[:200]})"
                )
        access = Access()
        for resource_type in types:
            access = self.permit(req, resource_type, "s", "search-system")
        lenient = req.prefer("handling", "strict") == "lenient"
        searches = []
        for resource_type in types:
            own = [  # each type's own _include (the others' are theirs)
                (n, v)
                for n, v in query
                if n != "_include" or v == "*" or v.split(":")[0] == resource_type
            ]
            try:
                searches.append(parse_search(resource_type, own, lenient=lenient))
            except InvalidRequest as exc:
                raise InvalidRequest(f"{resource_type}: {exc}") from None
        matches = self.svc.store.search_types(searches, access, req.principal.owner)
        others = [  # the other types' own includes, for the self link
            f"_include{':iterate' if i.iterate else ''}={i}"
            for search in searches[1:]
            for i in search.includes
            if i not in searches[0].includes
        ]
        asked = "&".join(
            [f"_type={','.join(types)}", searches[0].query_string(), *dict.fromkeys(others)]
        )
        issues = [
            Issue(f"ignored: {name}", "not-supported", severity="warning")
            for name in dict.fromkeys(n for s in searches for n in s.ignored)
        ]
        return self._searchset(
            req,
            matches,
            access,
            f"{self.svc.config.fhir_base}?{asked}",
            issues,
            query=asked,
            interaction="search-system",
        )

    def history_type(self, req: FhirRequest, resource_type: str) -> FhirResponse:
        check_type(resource_type)
        access = self.permit(req, resource_type, "r", "history-type")
        return self._history(req, resource_type, None, access)

    def history_system(self, req: FhirRequest) -> FhirResponse:
        """``GET /_history``: the versions of every type the caller may read (a patient: only
        those in their compartments), newest first."""
        req.principal  # noqa: B018  # 401 first, without a token
        types = [t for t in RESOURCE_TYPES if req.principal.allows(t, "r")]
        access = self.permit(req, types[0] if types else "Patient", "r", "history-system")
        return self._history(req, None, None, access, types)

    def history_instance(
        self, req: FhirRequest, resource_type: str, resource_id: str
    ) -> FhirResponse:
        check_type(resource_type)
        access = self.permit(req, resource_type, "r", "history-instance")
        check_id(resource_id)
        # a patient sees only the versions that were in their compartment (store.history)
        return self._history(req, resource_type, resource_id, access)

    def _history(
        self,
        req: FhirRequest,
        resource_type: str | None,
        resource_id: str | None,
        access: Access,
        types: Sequence[str] = (),
    ) -> FhirResponse:
        since = None
        at = None
        count = DEFAULT_COUNT
        for name, value in req.query:
            if name == "_at":
                try:
                    at = date_range(value)
                except ValueError as exc:
                    raise InvalidRequest(f"_at: {exc}") from None
            elif name == "_since":
                try:
                    since = date_range(value)[0]
                except ValueError as exc:
                    raise InvalidRequest(f"_since: {exc}") from None
            elif name == "_count":
                count = whole_number("_count", value, MAX_COUNT)
            elif name not in ("_format", "_pretty", "_summary", "_elements"):
                raise InvalidRequest(
                    f"history takes _since, _at, _count, _summary and _elements, not {name!r}"
                )
        matches = self.svc.store.history(
            resource_type,
            resource_id,
            access,
            req.principal.owner,
            since=since,
            count=count,
            types=types,
            subsetting=_subsetting(req, *([resource_type] if resource_type else types)),
            at=at,
        )
        if resource_id is not None and not matches.total and access.patients is not None:
            raise NotFound(f"{resource_type}/{resource_id} is not known")
        path = "/".join(p for p in (resource_type, resource_id, "_history") if p)
        self_link = f"{self.svc.config.fhir_base}/{path}"
        if req.raw_query:
            self_link += "?" + req.raw_query
        return self._searchset(
            req,
            matches,
            access,
            self_link,
            query=path,
            kind="history",
            interaction=None if resource_type else "history-system",
        )

    # -- operations ----------------------------------------------------------------------------

    def everything_of_type(self, req: FhirRequest) -> FhirResponse:
        """``Patient/$everything`` without an id: a patient's own record, for a patient's
        token holding one patient; everyone else names the patient."""
        access = self.permit(req, "Patient", "r", "operation")
        if access.patients is not None and len(access.patients) == 1:
            (patient_id,) = access.patients
            return self.everything(req, patient_id)
        raise InvalidRequest(
            "Patient/$everything needs a patient: ask Patient/{id}/$everything (only a "
            "patient's own token may leave the id out)"
        )

    def everything(self, req: FhirRequest, patient_id: str) -> FhirResponse:
        access = self.permit(req, "Patient", "r", "operation")
        check_id(patient_id)
        count = DEFAULT_COUNT
        for name, value in req.query:
            if name == "_count":
                count = whole_number("_count", value, MAX_COUNT)
            elif name not in ("_format", "_pretty", "_summary", "_elements"):
                raise InvalidRequest(
                    f"$everything takes _count, _summary and _elements, not {name!r}"
                )
        if access.patients is not None and patient_id not in access.patients:
            raise NotFound(f"Patient/{patient_id} is not known")
        for resource_type in RESOURCE_TYPES:  # it reads across types: each must be allowed
            if resource_type != "AuditEvent":
                self.permit(req, resource_type, "r", "operation")
        matches = self.svc.store.everything(
            patient_id,
            access,
            req.principal.owner,
            count,
            _subsetting(req, *[t for t in RESOURCE_TYPES if t != "AuditEvent"]),
        )
        self_link = f"{self.svc.config.fhir_base}/Patient/{quote(patient_id)}/$everything"
        return self._searchset(
            req,
            matches,
            access,
            self_link,
            query=f"Patient/{patient_id}/$everything",
            kind="everything",
        )

    def prior_results(self, req: FhirRequest, patient_id: str) -> FhirResponse:
        """``$prior-results`` (:mod:`node.flows.prior_results`): ``category`` (``laboratory``,
        ``imaging``; default both), ``code`` (``system|code``, a code, or an imaging
        modality), ``purpose`` (``TREAT``, default, or ``ETREAT`` with a ``reason-code`` and a
        ``reason`` in words), ``referral`` (``ServiceRequest/{id}``)."""
        req.principal  # noqa: B018  # 401 first, without a token
        check_id(patient_id)
        known = {"category", "code", "purpose", "reason", "reason-code", "referral", "_format"}
        unknown = {name for name, _ in req.query} - known
        if unknown:
            raise InvalidRequest(f"$prior-results takes no parameter(s) {sorted(unknown)}")
        svc = self.svc
        referral_hash = None
        referral = req.arg("referral")
        if referral:
            kind, _, referral_id = referral.partition("/")
            if kind != "ServiceRequest" or not referral_id:
                raise InvalidRequest("referral must be ServiceRequest/{id}")
            try:
                referral_hash = svc.store.read("ServiceRequest", referral_id).sha256()
            except NotFound:
                raise InvalidRequest(f"{referral} is not known here") from None
        self_link = f"{svc.config.fhir_base}/Patient/{quote(patient_id)}/$prior-results"
        bundle = fetch_prior_results(
            svc,
            req.caller,
            patient_id,
            [c for c in req.listed("category") if c] or list(CATEGORIES),
            codes=[c for c in req.listed("code") if c],
            purpose=req.arg("purpose", "TREAT") or "TREAT",
            reason=req.arg("reason"),
            reason_code=req.arg("reason-code"),
            referral_hash=referral_hash,
            self_link=self_link + (f"?{req.raw_query}" if req.raw_query else ""),
            query=req.raw_query or None,
        )
        return self._respond(200, bundle)

    def check_recognition(self, req: FhirRequest) -> FhirResponse:
        """``ServiceRequest/$check-recognition`` (body: the order, stored or not)."""
        req.principal  # noqa: B018
        orders.ordering(self.svc, req.caller)
        order = validate(req.json("the ServiceRequest"), "ServiceRequest")
        return self._respond(
            200, orders.check_recognition(self.svc, req.caller, order).parameters()
        )

    def accept_recognised(self, req: FhirRequest, order_id: str) -> FhirResponse:
        """``ServiceRequest/{id}/$accept-recognised`` (Parameters ``result``: the fullUrl of
        the prior result accepted instead of the exam)."""
        req.principal  # noqa: B018
        orders.ordering(self.svc, req.caller)
        wanted = _parameter(req.json("the Parameters"), "result")
        if not wanted:
            raise InvalidRequest("give the prior result to accept: parameter result (its fullUrl)")
        item, recorded = orders.accept(
            self.svc, req.caller, orders.open_order(self.svc, order_id), wanted
        )
        return self._respond(
            200,
            {
                "resourceType": "Parameters",
                "parameter": [
                    {"name": "recorded", "valueString": f"{recorded['chain']}:{recorded['seq']}"},
                    {"name": "avoidedCostFen", "valueInteger": item.price_fen},
                ],
            },
        )

    def reorder(self, req: FhirRequest, order_id: str) -> FhirResponse:
        """``ServiceRequest/{id}/$reorder`` (Parameters ``reason``, ``text`` for other, and
        optionally ``result``: the recognised result not taken)."""
        req.principal  # noqa: B018
        orders.ordering(self.svc, req.caller)
        body = req.json("the Parameters")
        recorded = orders.reorder_exam(
            self.svc,
            req.caller,
            orders.open_order(self.svc, order_id),
            _parameter(body, "reason"),
            (_parameter(body, "text") or "").strip(),
            _parameter(body, "result"),
        )
        return self._respond(
            200,
            {
                "resourceType": "Parameters",
                "parameter": [
                    {"name": "recorded", "valueString": f"{recorded['chain']}:{recorded['seq']}"}
                ],
            },
        )

    # -- batch and transaction -----------------------------------------------------------------

    def bundle(self, req: FhirRequest) -> FhirResponse:
        req.principal  # noqa: B018
        return self._respond(200, process_bundle(self, req, req.json("the Bundle")))


ROUTES = {  # each interaction's pattern, as the logs and metrics name it
    "system_get": "/fhir",
    "bundle": "/fhir",
    "metadata": "/fhir/metadata",
    "read": "/fhir/<resource_type>/<resource_id>",
    "update": "/fhir/<resource_type>/<resource_id>",
    "delete": "/fhir/<resource_type>/<resource_id>",
    "vread": "/fhir/<resource_type>/<resource_id>/_history/<version>",
    "create": "/fhir/<resource_type>",
    "search_get": "/fhir/<resource_type>",
    "search_post": "/fhir/<resource_type>/_search",
    "history_system": "/fhir/_history",
    "history_type": "/fhir/<resource_type>/_history",
    "history_instance": "/fhir/<resource_type>/<resource_id>/_history",
    "everything": "/fhir/Patient/<patient_id>/$everything",
    "everything_of_type": "/fhir/Patient/$everything",
    "compartment_search": "/fhir/Patient/<patient_id>/<resource_type>",
    "conditional_update": "/fhir/<resource_type>?<search>",
    "patch": "/fhir/<resource_type>/<resource_id>",
    "conditional_delete": "/fhir/<resource_type>?<search>",
    "prior_results": "/fhir/Patient/<patient_id>/$prior-results",
    "check_recognition": "/fhir/ServiceRequest/$check-recognition",
    "accept_recognised": "/fhir/ServiceRequest/<order_id>/$accept-recognised",
    "reorder": "/fhir/ServiceRequest/<order_id>/$reorder",
}


def _parameter(body: Any, name: str) -> str | None:
    """The first string value of a Parameters resource's parameter ``name``."""
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise InvalidRequest("the body must be a Parameters resource")
    for parameter in body.get("parameter", []):
        if isinstance(parameter, dict) and parameter.get("name") == name:
            for key, value in parameter.items():
                if key.startswith("value") and isinstance(value, str):
                    return value
    return None


def _condition(req: FhirRequest, what: str) -> str:
    """The search a conditional update or delete names (its query, less _format/_pretty);
    400 when there is none."""
    pairs = [(n, v) for n, v in req.query if n not in ("_format", "_pretty")]
    if not pairs:
        raise InvalidRequest(f"{what} names the resource by a search: Type?parameter=value")
    return urlencode(pairs)


def _subsetting(req: FhirRequest, *resource_types: str) -> Subsetting:
    """What ``_summary`` / ``_elements`` ask for of resources of those types (400 for what
    cannot be: an element must be one of every type's)."""
    return parse_subsetting(
        resource_types,
        [v for n, v in req.query if n == "_summary"],
        [v for n, v in req.query if n == "_elements"],
    )


def _body(stored: Stored, subsetting: Subsetting) -> bytes | dict[str, Any] | None:
    """The stored bytes as they are, or the part of the resource asked for."""
    if stored.body is None:
        return None
    subset = subsetting.apply(stored.resource())
    return stored.body if subset is None else subset


def _entry(
    base: str, stored: Stored, mode: str | None, subsetting: Subsetting | None = None
) -> bytes:
    """One searchset (``mode``) or history (None) entry, with the stored bytes as they are
    (or the part ``subsetting`` asks for)."""
    url = jsonio.dump(f"{base}/{stored.type}/{stored.id}")
    body = _body(stored, subsetting or Subsetting())
    resource = jsonio.dump(body) if isinstance(body, dict) else body
    if mode is not None:
        return (
            b'{"fullUrl":'
            + url
            + b',"resource":'
            + (resource or b"{}")
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
    if resource is not None:
        parts.append(b',"resource":' + resource)
    parts.append(b',"request":' + jsonio.dump(request_part))
    parts.append(b',"response":' + jsonio.dump(response_part) + b"}")
    return b"".join(parts)
