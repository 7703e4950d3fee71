"""Ordering an exam for a referred patient, and what mutual recognition does to the order.

- ``POST /fhir/ServiceRequest/$check-recognition`` (body: the ServiceRequest about to be
  ordered, stored or not): which item of the recognised list it orders, and the patient's
  prior results from every member that are recognised for it, as a Parameters resource.
- Creating a ServiceRequest of a listed item for a referred patient (one with an active
  referral) answers the same question in headers (``X-HRX-Recognised-Results``), and with
  ``Prefer: return=OperationOutcome`` in the outcome's issues.
- ``POST /fhir/ServiceRequest/{id}/$accept-recognised`` (Parameters ``result``: the
  ``fullUrl`` of the prior result): the doctor accepts a recognised result instead of the exam.
  It is checked again (still recognised, the same item), ``result.recognized`` goes on this
  node's chain with the cost avoided, and the order is revoked.
- ``POST /fhir/ServiceRequest/{id}/$reorder`` (Parameters ``reason``: one of the reasons the
  2022 national measures allow, ``text`` for ``other``, optionally ``result``): the exam is
  ordered anyway; ``result.reordered`` goes on the chain with the reason. Free text stays off
  the ledger (only its SHA-256 goes on) and in the order's note.
"""

from __future__ import annotations

import hashlib
from typing import Any

from flask import Blueprint, Response, current_app, request

from exchange.recognition import DICOM_MODALITY, REORDER_REASONS, Item
from exchange.referral import RECOGNITION_URL
from fhir_adapters import jsonio
from fhir_adapters.errors import Conflict, FhirError, InvalidRequest, Unprocessable
from fhir_adapters.resources import check_id, validate
from fhir_adapters.search import Access, parse_search
from fhir_adapters.store import Stored
from ledger.errors import LedgerError
from node import fhir_api
from node.audit import AuditRecord
from node.referral_api import fetch_prior_results, rules
from node.services import Services

bp = Blueprint("orders", __name__, url_prefix="/fhir")
bp.register_error_handler(FhirError, fhir_api.fhir_error)
bp.before_request(fhir_api.negotiate)


def services() -> Services:
    found: Services = current_app.extensions["hrx"]
    return found


def _ordering() -> Any:
    principal = fhir_api.authenticate()
    fhir_api.permit("ServiceRequest", "u", "operation")
    if principal.role not in ("doctor", "admin"):
        raise InvalidRequest(f"{principal.username} ({principal.role}) does not order exams")
    return principal


def _patient_of(order: dict[str, Any]) -> str:
    reference = (order.get("subject") or {}).get("reference", "")
    kind, _, patient_id = str(reference).partition("/")
    if kind != "Patient" or not patient_id:
        raise Unprocessable(
            "the order's subject must be a local Patient", expression="ServiceRequest.subject"
        )
    return patient_id


def _item(order: dict[str, Any]) -> Item:
    item = rules(services()).item_for_order(order)
    if item is None:
        raise Unprocessable(
            "the order's code (and body site) is no item of the recognised list",
            expression="ServiceRequest.code",
        )
    return item


def _recognised(order: dict[str, Any], principal: Any) -> tuple[Item, list[dict[str, Any]], Any]:
    """The item ordered, the recognised prior results for it, and the prior-results Bundle."""
    item = _item(order)
    bundle = fetch_prior_results(services(), principal, _patient_of(order), [item.category])
    hashes = {  # what each Provenance says the source released (the ledger has the same)
        e["resource"]["target"][0]["reference"]: e["resource"]["entity"][0]["what"]["identifier"][
            "value"
        ].removeprefix("urn:sha256:")
        for e in bundle["entry"]
        if e["search"]["mode"] == "include"
    }
    found = []
    for entry in bundle["entry"]:
        if entry["search"]["mode"] != "match":
            continue
        resource = entry["resource"]
        (verdict,) = [e for e in resource["extension"] if e["url"] == RECOGNITION_URL]
        parts = {p["url"]: p for p in verdict["extension"] if p["url"] != "reason"}
        if (
            parts["recognised"]["valueBoolean"]
            and parts.get("item", {}).get("valueCode") == item.id
        ):
            found.append(
                {
                    "fullUrl": entry["fullUrl"],
                    "resource": resource,
                    "hash": hashes[entry["fullUrl"]],
                    "validUntil": parts.get("validUntil", {}).get("valueDate"),
                }
            )
    return item, found, bundle


def _parameters(item: Item, found: list[dict[str, Any]], bundle: Any) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = [
        {"name": "item", "valueCode": item.id},
        {"name": "itemName", "valueString": item.label()},
        {"name": "priceFen", "valueInteger": item.price_fen},
        {"name": "recognised", "valueBoolean": bool(found)},
    ]
    for result in found:
        source = str(result["resource"]["meta"]["source"])
        parameters.append(
            {
                "name": "result",
                "part": [
                    {"name": "reference", "valueUri": result["fullUrl"]},
                    {"name": "source", "valueUri": source},
                    {"name": "validUntil", "valueDate": result["validUntil"]},
                ],
            }
        )
    for entry in bundle["entry"]:
        if entry["search"]["mode"] == "outcome":
            parameters.append({"name": "outcome", "resource": entry["resource"]})
    return {"resourceType": "Parameters", "parameter": parameters}


@bp.post("/ServiceRequest/$check-recognition")
def check_recognition() -> Response:
    principal = _ordering()
    order, _ = validate(fhir_api.body_json("the ServiceRequest"), "ServiceRequest")
    item, found, bundle = _recognised(order, principal)
    return fhir_api.respond(200, _parameters(item, found, bundle))


@bp.after_app_request
def recognition_on_order(response: Response) -> Response:
    """A new order of a recognised-list item for a referred patient is answered with whether
    recognised prior results exist: ``X-HRX-Recognised-Results`` (how many) and
    ``X-HRX-Recognised-Item``, and with ``Prefer: return=OperationOutcome`` an information
    issue naming each (the doctor then accepts one with ``$accept-recognised``)."""
    if (
        request.endpoint != "fhir.create"
        or (request.view_args or {}).get("resource_type") != "ServiceRequest"
        or response.status_code != 201
    ):
        return response
    principal = fhir_api.call().principal
    location = response.headers.get("Location", "")
    if principal is None or principal.role not in ("doctor", "admin") or not location:
        return response
    order_id = location.split("/ServiceRequest/", 1)[1].split("/", 1)[0]
    try:
        order = services().store.read("ServiceRequest", order_id).resource()
        if rules(services()).item_for_order(order) is None or not _referred(order):
            return response
        item, found, _ = _recognised(order, principal)
    except FhirError:  # the order stands; the hint is only a convenience
        return response
    response.headers["X-HRX-Recognised-Item"] = item.id
    response.headers["X-HRX-Recognised-Results"] = str(len(found))
    if found and fhir_api.prefer("return", "representation") == "OperationOutcome":
        outcome = jsonio.parse(response.get_data())
        outcome["issue"] += [
            {
                "severity": "information",
                "code": "informational",
                "diagnostics": f"recognised prior result (HR) for {item.label()}: "
                f"{result['fullUrl']}, valid until {result['validUntil']}",
            }
            for result in found
        ]
        response.set_data(jsonio.dump(outcome))
    return response


def _referred(order: dict[str, Any]) -> bool:
    """Whether the order's patient has an active referral (SNOMED CT 3457005)."""
    search = parse_search(
        "ServiceRequest",
        [
            ("patient", _patient_of(order)),
            ("category", "http://snomed.info/sct|3457005"),
            ("status", "active"),
            ("_count", "1"),
            ("_total", "none"),
        ],
    )
    return bool(services().store.search(search, Access(), "orders").pairs)


def _parameter(body: Any, name: str) -> str | None:
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise InvalidRequest("the body must be a Parameters resource")
    for parameter in body.get("parameter", []):
        if isinstance(parameter, dict) and parameter.get("name") == name:
            for key, value in parameter.items():
                if key.startswith("value") and isinstance(value, str):
                    return value
    return None


def _order(order_id: str) -> Stored:
    check_id(order_id)
    stored = services().store.read("ServiceRequest", order_id)
    if stored.resource().get("status") != "active":
        raise Conflict(f"ServiceRequest/{order_id} is not active")
    return stored


def _close(stored: Stored, status: str | None, note: str) -> None:
    """A new version of the order: its status (unless None) and a note saying why."""
    resource = stored.resource()
    resource.pop("meta", None)
    if status is not None:
        resource["status"] = status
    resource["note"] = [*resource.get("note", []), {"text": note}]
    svc = services()
    with svc.store.writing() as writer:
        updated, _ = writer.update("ServiceRequest", stored.id, resource, stored.etag)
        fhir_api._audit_write(writer, "update", [updated])


def _append(entry_type: str, body: dict[str, Any]) -> dict[str, Any]:
    svc = services()
    try:
        seq = svc.consents.chain_writer().append(entry_type, body)
    except LedgerError as exc:
        raise Unprocessable(f"could not be recorded on the ledger: {exc}") from None
    return {"chain": svc.config.node_id, "seq": seq}


def _pseudonym(patient_id: str) -> str:
    patient = services().store.read("Patient", patient_id).resource()
    found = services().consents.pseudonym_of(patient)
    if found is None:
        raise Unprocessable(f"Patient/{patient_id} has no identifier members match patients by")
    return found


@bp.post("/ServiceRequest/<order_id>/$accept-recognised")
def accept_recognised(order_id: str) -> Response:
    principal = _ordering()
    body = fhir_api.body_json("the Parameters")
    wanted = _parameter(body, "result")
    if not wanted:
        raise InvalidRequest("give the prior result to accept: parameter result (its fullUrl)")
    item, recorded = accept(principal, _order(order_id), wanted)
    return fhir_api.respond(
        200,
        {
            "resourceType": "Parameters",
            "parameter": [
                {"name": "recorded", "valueString": f"{recorded['chain']}:{recorded['seq']}"},
                {"name": "avoidedCostFen", "valueInteger": item.price_fen},
            ],
        },
    )


def accept(principal: Any, stored: Stored, wanted: str) -> tuple[Item, dict[str, Any]]:
    """Accept the recognised prior result ``wanted`` (its fullUrl) instead of the order."""
    order = stored.resource()
    item, found, _ = _recognised(order, principal)
    chosen = next((r for r in found if r["fullUrl"] == wanted), None)
    if chosen is None:
        raise Conflict(
            f"{wanted} is not (or no longer) a recognised result for {item.label('en')}: "
            "check again with $check-recognition"
        )
    recorded = _append(
        "result.recognized",
        {
            "patient": _pseudonym(_patient_of(order)),
            "source": {"org": _member_of(wanted), "resource_hash": chosen["hash"]},
            "code": item.id,
            "avoided_cost_fen": item.price_fen,
            "order": stored.sha256(),
        },
    )
    _close(stored, "revoked", f"replaced by the recognised result {wanted} (HR)")
    _audit(principal, order, f"accepted {wanted} for {item.id}: {recorded}")
    return item, recorded


@bp.post("/ServiceRequest/<order_id>/$reorder")
def reorder(order_id: str) -> Response:
    principal = _ordering()
    body = fhir_api.body_json("the Parameters")
    recorded = reorder_exam(
        principal,
        _order(order_id),
        _parameter(body, "reason"),
        (_parameter(body, "text") or "").strip(),
        _parameter(body, "result"),
    )
    return fhir_api.respond(
        200,
        {
            "resourceType": "Parameters",
            "parameter": [
                {"name": "recorded", "valueString": f"{recorded['chain']}:{recorded['seq']}"}
            ],
        },
    )


def reorder_exam(
    principal: Any, stored: Stored, reason: str | None, text: str, overridden: str | None
) -> dict[str, Any]:
    """Order the exam anyway, for ``reason`` (``text`` for other): ``result.reordered``."""
    if reason not in REORDER_REASONS:
        raise InvalidRequest(f"reason must be one of {', '.join(REORDER_REASONS)}")
    if reason == "other" and not text:
        raise InvalidRequest("reason other needs the text that explains it (parameter text)")
    order = stored.resource()
    item = _item(order)
    entry: dict[str, Any] = {
        "patient": _pseudonym(_patient_of(order)),
        "source": {"org": _member_of(overridden)} if overridden else None,
        "code": item.id,
        "reason": reason,
        "order": stored.sha256(),
    }
    if text:
        entry["reason_text_hash"] = hashlib.sha256(text.encode()).hexdigest()
    recorded = _append("result.reordered", entry)
    _close(stored, None, f"ordered again: {reason}" + (f" ({text})" if text else ""))
    _audit(principal, order, f"re-ordered {item.id}: {reason}: {recorded}")
    return recorded


def order_for(rules_item: Item, patient_id: str) -> dict[str, Any]:
    """A ServiceRequest ordering a recognised-list item for a patient."""
    order: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "subject": {"reference": f"Patient/{patient_id}"},
    }
    if rules_item.category == "laboratory":
        system, _, code = sorted(rules_item.codes)[0].partition("|")
        order["code"] = {"coding": [{"system": system, "code": code}], "text": rules_item.label()}
    else:
        order["code"] = {
            "coding": [{"system": DICOM_MODALITY, "code": rules_item.modality}],
            "text": rules_item.label(),
        }
        site = sorted(rules_item.body_sites)[0]
        order["bodySite"] = [{"text": site}]
    return order


def _member_of(url: str) -> str:
    """The member whose FHIR base a URL is under."""
    for member in services().chain_store.roster().body["members"]:
        base = str(member.get("url", "")).rstrip("/") + "/fhir/"
        if url.startswith(base):
            return str(member["id"])
    raise InvalidRequest(f"{url} is under no member's FHIR base")


def _audit(principal: Any, order: dict[str, Any], description: str) -> None:
    record = AuditRecord(
        interaction="operation",
        username=principal.username,
        role=principal.role,
        address=request.remote_addr,
        client=request.headers.get("User-Agent"),
        token_id=principal.token_id,
        description=description,
        patients={_patient_of(order)},
    )
    services().audit.record(record)
