"""Ordering an exam for a referred patient, and what mutual recognition does to the order.

- :func:`check_recognition`: which item of the recognised list an order (stored or not) is
  for, and the patient's prior results from every member that are recognised for it.
- :func:`recognition_hint`: the same for an order just created, when it is of a listed item
  for a referred patient (one with an active referral); the FHIR create answers with it.
- :func:`accept`: the doctor accepts a recognised result instead of the exam. It is checked
  again (still recognised, the same item), ``result.recognized`` goes on this node's chain
  with the cost avoided, and the order is revoked.
- :func:`reorder_exam`: the exam is ordered anyway, for one of the reasons the 2022 national
  measures allow; ``result.reordered`` goes on the chain with the reason. Free text stays off
  the ledger (only its SHA-256 goes on) and in the order's note.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from exchange.recognition import DICOM_MODALITY, REORDER_REASONS, Item
from exchange.referral import RECOGNITION_URL
from fhir_adapters.errors import Conflict, Forbidden, InvalidRequest, Unprocessable
from fhir_adapters.store import Stored
from fhir_adapters.store.resources import check_id
from fhir_adapters.store.search import Access, parse_search
from ledger.errors import LedgerError
from node.flows.permissions import permit, refuse
from node.flows.prior_results import fetch_prior_results, rules
from node.records.audit_trail import Caller
from node.services import Services

REFERRAL = "http://snomed.info/sct|3457005"  # SNOMED CT: patient referral


@dataclass(frozen=True)
class Recognised:
    """An order's item, its recognised prior results, and the prior-results Bundle."""

    item: Item
    found: list[dict[str, Any]]  # {"fullUrl", "resource", "hash", "validUntil"}
    bundle: dict[str, Any]

    def parameters(self) -> dict[str, Any]:
        """As a FHIR Parameters resource (``$check-recognition``)."""
        item = self.item
        parameters: list[dict[str, Any]] = [
            {"name": "item", "valueCode": item.id},
            {"name": "itemName", "valueString": item.label()},
            {"name": "priceFen", "valueInteger": item.price_fen},
            {"name": "recognised", "valueBoolean": bool(self.found)},
        ]
        for result in self.found:
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
        for entry in self.bundle["entry"]:
            if entry["search"]["mode"] == "outcome":
                parameters.append({"name": "outcome", "resource": entry["resource"]})
        return {"resourceType": "Parameters", "parameter": parameters}


def ordering(svc: Services, caller: Caller) -> None:
    """403 (recorded) unless the caller is a doctor or admin who may update orders."""
    principal = caller.principal
    permit(svc, caller, "ServiceRequest", "u", "operation")
    assert principal is not None
    if principal.role not in ("doctor", "admin"):
        refusal = Forbidden(f"{principal.username} ({principal.role}) does not order exams")
        refuse(svc, caller, "operation", str(refusal))
        raise refusal


def patient_of(order: dict[str, Any]) -> str:
    reference = (order.get("subject") or {}).get("reference", "")
    kind, _, patient_id = str(reference).partition("/")
    if kind != "Patient" or not patient_id:
        raise Unprocessable(
            "the order's subject must be a local Patient", expression="ServiceRequest.subject"
        )
    return patient_id


def _item(svc: Services, order: dict[str, Any]) -> Item:
    item = rules(svc).item_for_order(order)
    if item is None:
        raise Unprocessable(
            "the order's code (and body site) is no item of the recognised list",
            expression="ServiceRequest.code",
        )
    return item


def check_recognition(svc: Services, caller: Caller, order: dict[str, Any]) -> Recognised:
    """The item an order is for and the prior results recognised for it (every member is
    asked, as ``$prior-results`` asks them)."""
    item = _item(svc, order)
    bundle = fetch_prior_results(svc, caller, patient_of(order), [item.category])
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
    return Recognised(item, found, bundle)


def recognition_hint(svc: Services, caller: Caller, order: Stored) -> Recognised | None:
    """For an order just created by a doctor: when it is of a listed item for a referred
    patient, what :func:`check_recognition` says of it; else None. The order stands either
    way: the hint is a convenience, and a member that cannot be asked only makes it shorter."""
    principal = caller.principal
    if principal is None or principal.role not in ("doctor", "admin"):
        return None
    resource = order.resource()
    if rules(svc).item_for_order(resource) is None or not _referred(svc, resource):
        return None
    return check_recognition(svc, caller, resource)


def _referred(svc: Services, order: dict[str, Any]) -> bool:
    """Whether the order's patient has an active referral (SNOMED CT 3457005)."""
    search = parse_search(
        "ServiceRequest",
        [
            ("patient", patient_of(order)),
            ("category", REFERRAL),
            ("status", "active"),
            ("_count", "1"),
            ("_total", "none"),
        ],
    )
    return bool(svc.store.search(search, Access(), "orders").pairs)


def open_order(svc: Services, order_id: str) -> Stored:
    """An active order of this node; 409 when it is no longer active."""
    check_id(order_id)
    stored = svc.store.read("ServiceRequest", order_id)
    if stored.resource().get("status") != "active":
        raise Conflict(f"ServiceRequest/{order_id} is not active")
    return stored


def new_order(svc: Services, caller: Caller, item_id: str, patient_id: str) -> Stored:
    """A new order of a recognised-list item for a patient (the doctors' pages)."""
    item = rules(svc).item(item_id)
    if item is None:
        raise InvalidRequest(f"{item_id!r} is not an item of the recognised list")
    with svc.store.writing(caller.principal) as writer:
        stored = writer.create(order_for(item, patient_id), "ServiceRequest")
        svc.audit.writes(writer, caller, "create", [stored])
    return stored


def accept(
    svc: Services, caller: Caller, stored: Stored, wanted: str
) -> tuple[Item, dict[str, Any]]:
    """Accept the recognised prior result ``wanted`` (its fullUrl) instead of the order."""
    order = stored.resource()
    recognised = check_recognition(svc, caller, order)
    item = recognised.item
    chosen = next((r for r in recognised.found if r["fullUrl"] == wanted), None)
    if chosen is None:
        raise Conflict(
            f"{wanted} is not (or no longer) a recognised result for {item.label('en')}: "
            "check again with $check-recognition"
        )
    recorded = _append(
        svc,
        "result.recognized",
        {
            "patient": _pseudonym(svc, patient_of(order)),
            "source": {"org": _member_of(svc, wanted), "resource_hash": chosen["hash"]},
            "code": item.id,
            "avoided_cost_fen": item.price_fen,
            "order": stored.sha256(),
        },
    )
    _close(svc, caller, stored, "revoked", f"replaced by the recognised result {wanted} (HR)")
    _audit(svc, caller, order, f"accepted {wanted} for {item.id}: {recorded}")
    return item, recorded


def reorder_exam(
    svc: Services,
    caller: Caller,
    stored: Stored,
    reason: str | None,
    text: str,
    overridden: str | None,
) -> dict[str, Any]:
    """Order the exam anyway, for ``reason`` (``text`` for other): ``result.reordered``."""
    if reason not in REORDER_REASONS:
        raise InvalidRequest(f"reason must be one of {', '.join(REORDER_REASONS)}")
    if reason == "other" and not text:
        raise InvalidRequest("reason other needs the text that explains it (parameter text)")
    order = stored.resource()
    item = _item(svc, order)
    entry: dict[str, Any] = {
        "patient": _pseudonym(svc, patient_of(order)),
        "source": {"org": _member_of(svc, overridden)} if overridden else None,
        "code": item.id,
        "reason": reason,
        "order": stored.sha256(),
    }
    if text:
        entry["reason_text_hash"] = hashlib.sha256(text.encode()).hexdigest()
    recorded = _append(svc, "result.reordered", entry)
    _close(svc, caller, stored, None, f"ordered again: {reason}" + (f" ({text})" if text else ""))
    _audit(svc, caller, order, f"re-ordered {item.id}: {reason}: {recorded}")
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


def _close(svc: Services, caller: Caller, stored: Stored, status: str | None, note: str) -> None:
    """A new version of the order: its status (unless None) and a note saying why."""
    resource = stored.resource()
    resource.pop("meta", None)
    if status is not None:
        resource["status"] = status
    resource["note"] = [*resource.get("note", []), {"text": note}]
    with svc.store.writing(caller.principal) as writer:
        updated, _ = writer.update("ServiceRequest", stored.id, resource, stored.etag)
        svc.audit.writes(writer, caller, "update", [updated])


def _append(svc: Services, entry_type: str, body: dict[str, Any]) -> dict[str, Any]:
    try:
        seq = svc.consents.chain_writer().append(entry_type, body)
    except LedgerError as exc:
        raise Unprocessable(f"could not be recorded on the ledger: {exc}") from None
    return {"chain": svc.config.node_id, "seq": seq}


def _pseudonym(svc: Services, patient_id: str) -> str:
    patient = svc.store.read("Patient", patient_id).resource()
    found = svc.consents.pseudonym_of(patient)
    if found is None:
        raise Unprocessable(f"Patient/{patient_id} has no identifier members match patients by")
    return found


def _member_of(svc: Services, url: str) -> str:
    """The member whose FHIR base a URL is under."""
    for member in svc.chain_store.roster().body["members"]:
        base = str(member.get("url", "")).rstrip("/") + "/fhir/"
        if url.startswith(base):
            return str(member["id"])
    raise InvalidRequest(f"{url} is under no member's FHIR base")


def _audit(svc: Services, caller: Caller, order: dict[str, Any], description: str) -> None:
    svc.audit.record(
        caller.record("operation", description=description, patients={patient_of(order)})
    )
