"""Remote reading across members (基层检查、上级诊断): a consult from the member that holds a
study (the requester) to a member that reads it (the reader), the reader's worklist, and the
signed report that comes back (docs/referral.md, Remote reading; docs/spec.md §15.8).

At the requester, :func:`request_consult` checks that the study is held here and is the
patient's, stores a ServiceRequest (category imaging, ``performer`` the reading member,
priority) and a Task that tracks it, appends ``consult.requested`` and sends the reader the
consult with the proof of that entry (``POST /peer/consults``). A reader that cannot be
reached gets it later: the Task stays ``businessStatus`` undelivered, and
:func:`deliver_pending` (the replication worker runs it) sends it again; the deadline counts
from the request all the same. A reader that refuses (it is not a member, or reads no such
modality) makes the consult rejected, with ``consult.cancelled`` saying why.

At the reader, :func:`receive_consult` checks that proof and the modality against
``consults.modalities`` and keeps the consult as a Task in its worklist (:func:`worklist`).
A radiologist claims it (``consult.accepted`` at the first claim), may release it, reads the
images through ``/dicomweb/members/<requester>`` (the consult is the grant) and reports
(:func:`report`): a DiagnosticReport with findings (所见) and impression (诊断意见), coded by
modality and body site, signed with the reader's node key (:mod:`exchange.reading`) in a
Provenance, ``consult.reported`` with the content's hash, and sent back
(``POST /peer/consults/report``). Reporting again amends: a new version, signed again, the old
kept. At the requester, :func:`receive_report` verifies the signature against the roster and
the hash against the reader's ledger entry before it stores the report and its Provenance;
a report for a consult cancelled here is refused (the reader keeps it). The requester may
cancel (:func:`cancel`: ``consult.cancelled``, and the reader is told).
"""

from __future__ import annotations

import base64
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import requests

from consent.pseudonym import is_pseudonym
from consent.pseudonym import pseudonym as pseudonym_of_identifier
from exchange.reading import (
    ACCEPTED,
    CANCELLED,
    PRIORITIES,
    REPORTED,
    REQUESTED,
    report_hash,
    sign_report,
    signer_of,
    verify_report,
    with_signature,
)
from fhir_adapters.errors import (
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    PreconditionFailed,
    Unprocessable,
)
from fhir_adapters.store import Stored
from fhir_adapters.store.search import EVERYONE, parse_search
from ledger import keys
from ledger.canonical import canonical_bytes, parse_json
from ledger.errors import LedgerError, VerificationError
from ledger.model import format_time
from ledger.receipt import check_entry_proof, entry_proof
from node.consortium.signing import sign_request
from node.flows.access_decision import installed_roster_of
from node.flows.dicomweb import held_study
from node.flows.permissions import permit, refuse
from node.records.audit_trail import Caller
from node.records.pseudonym_index import pseudonym_of_patient
from node.services import Services

CONSULT_SYSTEM = "urn:hrx:consult"  # the identifier of a consult's resources: its consult id
MEMBER_SYSTEM = "urn:hrx:member"
IMAGING = {"system": "http://snomed.info/sct", "code": "363679005", "display": "Imaging"}
READ = {"system": "http://snomed.info/sct", "code": "386053000", "display": "Evaluation procedure"}
REPORT_CODE = {
    "system": "http://loinc.org",
    "code": "18748-4",
    "display": "Diagnostic imaging study",
}
RADIOLOGY = {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}
DCM = "http://dicom.nema.org/resources/ontology/DCM"
AUTHOR_SIGNATURE = {
    "system": "urn:iso-astm:E1762-95:2013",
    "code": "1.2.840.10065.1.12.1.1",
    "display": "Author's Signature",
}
BODY_SITE_EXTENSION = "http://hl7.org/fhir/StructureDefinition/bodySite"
UNDELIVERED, DELIVERED = "undelivered", "delivered"
DELIVERY_EXTENSION = "urn:hrx:fhir:StructureDefinition:consult-delivery"  # the message to send
OPEN_STATUSES = ("requested", "received", "accepted", "in-progress")
DELIVERY_SECONDS = 5.0
CONSULT_ID = re.compile(r"[A-Za-z0-9\-]{8,64}")


@dataclass(frozen=True)
class Consult:
    """A consult as a page shows it: its Task, and what the Task says."""

    task: Stored
    consult_id: str
    status: str
    priority: str
    deadline: str
    requester: str
    reader: str
    owner: str | None
    study: str
    modality: str
    body_site: str
    question: str
    delivery: str | None
    reason: str  # why it was refused or cancelled ("" when it was not)

    @classmethod
    def of(cls, task: Stored) -> Consult:
        resource = task.resource()
        inputs = {i["type"]["text"]: _input_value(i) for i in resource.get("input", [])}
        return cls(
            task=task,
            consult_id=_consult_id(resource),
            status=str(resource["status"]),
            priority=str(resource.get("priority", "routine")),
            deadline=str(resource.get("restriction", {}).get("period", {}).get("end", "")),
            requester=str(resource["requester"]["identifier"]["value"]),
            reader=str(resource["owner"]["identifier"]["value"])
            if resource.get("owner", {}).get("identifier", {}).get("system") == MEMBER_SYSTEM
            else str(inputs.get("reader", "")),
            owner=inputs.get("radiologist"),
            study=str(inputs.get("study", "")),
            modality=str(inputs.get("modality", "")),
            body_site=str(inputs.get("body-site", "")),
            question=str(inputs.get("question", "")),
            delivery=(resource.get("businessStatus") or {}).get("text"),
            reason=str((resource.get("statusReason") or {}).get("text", "")),
        )


def _input_value(item: dict[str, Any]) -> Any:
    return next(v for k, v in item.items() if k.startswith("value"))


def _consult_id(resource: dict[str, Any]) -> str:
    for identifier in resource.get("identifier", []):
        if identifier.get("system") == CONSULT_SYSTEM:
            return str(identifier["value"])
    raise Unprocessable("the Task carries no consult id")


def _now() -> datetime:
    return datetime.now(UTC)


def _members(svc: Services) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in svc.chain_store.roster().body["members"]}


def _doctor(svc: Services, caller: Caller, what: str) -> str:
    """The signed-in doctor's (or admin's) username; 403, recorded, for anyone else."""
    permit(svc, caller, "Task", "u", "operation")
    principal = caller.principal
    assert principal is not None
    if principal.role not in ("doctor", "admin"):
        refusal = Forbidden(f"{principal.username} ({principal.role}) may not {what}")
        refuse(svc, caller, "operation", str(refusal))
        raise refusal
    return principal.username


def _append(svc: Services, entry_type: str, body: dict[str, Any]) -> int:
    try:
        return svc.consents.chain_writer().append(entry_type, body)
    except LedgerError as exc:
        raise Unprocessable(f"the consult could not be recorded on the ledger: {exc}") from None


def find_task(svc: Services, consult_id: str) -> Stored | None:
    search = parse_search("Task", [("identifier", f"{CONSULT_SYSTEM}|{consult_id}")])
    found = svc.store.count_matches(search, EVERYONE, 1)
    return svc.store.by_pk(found[0]) if found else None


def _update(svc: Services, caller: Caller, stored: Stored, resource: dict[str, Any]) -> Stored:
    resource = {k: v for k, v in resource.items() if k != "meta"}
    with svc.store.writing(caller.principal) as writer:
        updated, _ = writer.update(stored.type, stored.id, resource, stored.etag)
        svc.audit.writes(writer, caller, "update", [updated])
    return updated


def _body(consult: dict[str, Any], **more: Any) -> dict[str, Any]:
    """A consult entry's body: the fields every consult entry carries, and ``more``."""
    return {
        "consult_id": consult["consult_id"],
        "patient": consult["patient"],
        "requester_org": consult["requester_org"],
        "reader_org": consult["reader_org"],
        "priority": consult["priority"],
        "deadline": consult["deadline"],
        **more,
    }


# -- at the requester -------------------------------------------------------------------------


def request_consult(
    svc: Services,
    caller: Caller,
    patient_id: str,
    study_uid: str,
    reader: str,
    priority: str,
    question: str,
) -> Consult:
    """Ask member ``reader`` to read study ``study_uid`` of local Patient ``patient_id`` (see
    the module docstring); the consult, delivered or waiting to be."""
    username = _doctor(svc, caller, "request a consult")
    members = _members(svc)
    if reader not in members:
        raise InvalidRequest(f"{reader!r} is not a member of this consortium")
    if reader == svc.config.node_id:
        raise InvalidRequest("a consult asks another member to read: this node is the requester")
    if priority not in PRIORITIES:
        raise InvalidRequest(f"priority must be one of {', '.join(PRIORITIES)}")
    question = question.strip()
    if len(question) > 2000:
        raise InvalidRequest("the clinical question is at most 2000 characters")
    study = held_study(svc, study_uid)
    if study is None:
        raise Unprocessable(f"study {study_uid} is not held here: a consult reads a study of ours")
    if patient_id not in study.patients:
        raise Unprocessable(f"study {study_uid} is not Patient/{patient_id}'s")
    pseudonym = pseudonym_of_patient(svc.database.engine, patient_id)
    if pseudonym is None:
        raise Unprocessable(
            f"Patient/{patient_id} has no identifier members match patients by: add it first"
        )
    imaging = study.stored.resource()
    modalities = sorted(
        {
            str(s["modality"]["code"])
            for s in imaging.get("series", [])
            if (s.get("modality") or {}).get("code")
        }
        | {str(m.get("code")) for m in imaging.get("modality", []) if m.get("code")}
    )
    sites = sorted(
        {
            str((s.get("bodySite") or {}).get("display") or (s.get("bodySite") or {}).get("code"))
            for s in imaging.get("series", [])
            if s.get("bodySite")
        }
    )
    now = _now()
    minutes = dict(svc.config.consult_minutes)[priority]
    deadline = format_time(now + timedelta(minutes=minutes))
    consult_id = str(uuid.uuid4())
    here = svc.config.fhir_base
    identifier = [{"system": CONSULT_SYSTEM, "value": consult_id}]
    reader_ref = {
        "identifier": {"system": MEMBER_SYSTEM, "value": reader},
        "display": members[reader].get("name") or reader,
    }
    own_ref = {
        "identifier": {"system": MEMBER_SYSTEM, "value": svc.config.node_id},
        "display": svc.config.name,
    }
    order = {
        "resourceType": "ServiceRequest",
        "identifier": identifier,
        "status": "active",
        "intent": "order",
        "priority": priority,
        "category": [{"coding": [IMAGING]}],
        "code": {"coding": [READ], "text": "影像会诊 (remote read)"},
        "subject": {"reference": f"Patient/{patient_id}"},
        "authoredOn": format_time(now),
        "requester": {"display": username},
        "performer": [reader_ref],
        "supportingInfo": [{"reference": f"ImagingStudy/{study.stored.id}"}],
        **({"note": [{"text": question}]} if question else {}),
    }
    with svc.store.writing(caller.principal) as writer:
        stored_order = writer.create(order)
        task = {
            "resourceType": "Task",
            "identifier": identifier,
            "status": "requested",
            "businessStatus": {"text": UNDELIVERED},
            "intent": "order",
            "priority": priority,
            "code": {"coding": [READ], "text": "影像会诊 (remote read)"},
            "focus": {"reference": f"ServiceRequest/{stored_order.id}"},
            "for": {"reference": f"Patient/{patient_id}"},
            "authoredOn": format_time(now),
            "requester": own_ref,
            "owner": reader_ref,
            "restriction": {"period": {"end": deadline}},
            "input": _inputs(
                study=study_uid,
                modality=",".join(modalities),
                **{"body-site": ",".join(sites)},
                question=question,
            ),
        }
        stored_task = writer.create(task)
        svc.audit.writes(writer, caller, "create", [stored_order, stored_task])
    consult = {
        "consult_id": consult_id,
        "patient": pseudonym,
        "requester_org": svc.config.node_id,
        "reader_org": reader,
        "priority": priority,
        "deadline": deadline,
    }
    seq = _append(
        svc,
        REQUESTED,
        _body(consult, study=study.stored.sha256(), order=stored_order.sha256()),
    )
    message = {
        **consult,
        "study": study_uid,
        "modality": ",".join(modalities),
        "body_site": ",".join(sites),
        "question": question,
        "order": f"{here}/ServiceRequest/{stored_order.id}",
        "subject": f"{here}/Patient/{patient_id}",
        "imaging_study": f"{here}/ImagingStudy/{study.stored.id}",
        "requested": entry_proof(svc.chain_store, svc.config.node_id, seq),
    }
    _keep_delivery(svc, caller, stored_task, "/peer/consults", message)
    return Consult.of(deliver(svc, caller, consult_id))


def _inputs(**values: str) -> list[dict[str, Any]]:
    return [
        {"type": {"text": name}, "valueString": value} for name, value in values.items() if value
    ]


def _keep_delivery(
    svc: Services, caller: Caller, task: Stored, path: str, message: dict[str, Any]
) -> Stored:
    """The message to send (and where) kept in the Task until it is delivered."""
    resource = task.resource()
    resource["businessStatus"] = {"text": UNDELIVERED}
    resource["extension"] = [
        e for e in resource.get("extension", []) if e["url"] != DELIVERY_EXTENSION
    ] + [
        {
            "url": DELIVERY_EXTENSION,
            "extension": [
                {"url": "path", "valueString": path},
                {
                    "url": "message",
                    "valueBase64Binary": base64.b64encode(canonical_bytes(message)).decode(),
                },
            ],
        }
    ]
    return _update(svc, caller, task, resource)


def _pending(resource: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    for extension in resource.get("extension", []):
        if extension["url"] == DELIVERY_EXTENSION:
            parts = {
                e["url"]: next(v for k, v in e.items() if k.startswith("value"))
                for e in extension["extension"]
            }
            return str(parts["path"]), parse_json(base64.b64decode(parts["message"]))
    return None


def deliver(svc: Services, caller: Caller, consult_id: str) -> Stored:
    """Send a consult's pending message (a request, a report or a cancellation) to the other
    member; the Task as it stands after. Unreachable: it stays pending. Refused: the Task says
    why (and a refused request is cancelled on the ledger)."""
    task = find_task(svc, consult_id)
    if task is None:
        raise NotFound(f"no consult {consult_id} here")
    resource = task.resource()
    pending = _pending(resource)
    if pending is None:
        return task
    path, message = pending
    other = (
        message["reader_org"]
        if message["requester_org"] == svc.config.node_id
        else message["requester_org"]
    )
    status, answer = signed_post(svc, other, path, message)
    if status is None or status >= 500:
        return task  # not reached: tried again later
    resource["extension"] = [e for e in resource["extension"] if e["url"] != DELIVERY_EXTENSION]
    if not resource["extension"]:
        del resource["extension"]
    resource["businessStatus"] = {"text": DELIVERED}
    if status != 200 and path == "/peer/consults":
        why = str(answer.get("error") if isinstance(answer, dict) else answer)[:500]
        resource["status"] = "rejected"
        resource["statusReason"] = {"text": f"{other}: {why}"}
        _append(svc, CANCELLED, _body(message, reason="refused-by-reader"))
    elif status != 200:
        why = str(answer.get("error") if isinstance(answer, dict) else answer)[:500]
        resource["businessStatus"] = {"text": f"refused by {other}: {why}"}
    try:
        return _update(svc, caller, task, resource)
    except PreconditionFailed:  # another process delivered it meanwhile (the receiver is
        return find_task(svc, consult_id) or task  # idempotent): its outcome stands


def deliver_pending(svc: Services, caller: Caller) -> int:
    """Send every message still pending (run by the replication worker); how many went."""
    search = parse_search("Task", [("business-status:text", UNDELIVERED), ("_count", "500")])
    sent = 0
    for pk in svc.store.count_matches(search, EVERYONE, 500):
        task = svc.store.by_pk(pk)
        try:
            after = deliver(svc, caller, _consult_id(task.resource()))
        except (Unprocessable, NotFound):
            continue
        sent += _pending(after.resource()) is None
    return sent


def signed_post(
    svc: Services, member: str, path: str, message: dict[str, Any]
) -> tuple[int | None, Any]:
    """POST ``message`` to a member, signed; its status and JSON answer, or (None, why) when
    it could not be reached."""
    try:
        base = svc.chain_store.roster().member(member)["url"].rstrip("/")
    except LedgerError as exc:
        return 404, {"error": str(exc)}
    body = canonical_bytes(message)
    headers = sign_request(
        svc.config.node_id,
        keys.load_private_key(svc.config.ed25519_key),
        "POST",
        base + path,
        body,
        {"Content-Type": "application/json"},
    )
    try:
        response = requests.post(base + path, data=body, headers=headers, timeout=DELIVERY_SECONDS)
    except requests.RequestException as exc:
        return None, f"{member} at {base}: {type(exc).__name__}"
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, {"error": response.text[:300]}


def cancel(svc: Services, caller: Caller, consult_id: str, reason: str) -> Consult:
    """Cancel an open consult this node requested: ``consult.cancelled``, and the reader is
    told (now, or by :func:`deliver_pending`)."""
    _doctor(svc, caller, "cancel a consult")
    task = find_task(svc, consult_id)
    if task is None:
        raise NotFound(f"no consult {consult_id} here")
    resource = task.resource()
    if resource["requester"]["identifier"]["value"] != svc.config.node_id:
        raise Forbidden(f"consult {consult_id} was requested by another member: it cancels it")
    if resource["status"] not in OPEN_STATUSES:
        raise Conflict(f"consult {consult_id} is {resource['status']}: it cannot be cancelled")
    consult = _entry_fields(svc, resource)
    _append(svc, CANCELLED, _body(consult, reason="cancelled-by-requester"))
    resource["status"] = "cancelled"
    resource["statusReason"] = {"text": reason.strip()[:500] or "cancelled"}
    task = _update(svc, caller, task, resource)
    _keep_delivery(svc, caller, task, "/peer/consults/cancel", {**consult})
    return Consult.of(deliver(svc, caller, consult_id))


def _entry_fields(svc: Services, resource: dict[str, Any]) -> dict[str, Any]:
    """The fields of the ``consult.requested`` entry of a consult this node requested (found
    by the Task's patient)."""
    consult_id = _consult_id(resource)
    patient_id = resource["for"]["reference"].split("/", 1)[1]
    pseudonym = pseudonym_of_patient(svc.database.engine, patient_id)
    for entry in reversed(svc.chain_store.entries_about(pseudonym, (REQUESTED,))):
        if entry["body"].get("consult_id") == consult_id and entry["chain"] == svc.config.node_id:
            names = ("consult_id", "patient", "requester_org", "reader_org", "priority", "deadline")
            return {k: entry["body"][k] for k in names}
    raise NotFound(f"no consult.requested entry of consult {consult_id} is held here")


def receive_report(svc: Services, asker: str, message: Any) -> dict[str, Any]:
    """The reader's report of a consult this node requested (``POST /peer/consults/report``):
    verified (the signature against ``asker``'s key in the rosters, the content's hash
    against ``asker``'s ``consult.reported`` entry) and stored with its Provenance."""
    if not isinstance(message, dict) or not {
        "consult_id",
        "report",
        "provenance",
        "reported",
    } <= set(message):
        raise InvalidRequest("a report is {consult_id, report, provenance, reported}")
    consult_id = str(message["consult_id"])
    task = find_task(svc, consult_id)
    if task is None:
        raise NotFound(f"{svc.config.node_id} requested no consult {consult_id}")
    resource = task.resource()
    if resource["owner"]["identifier"]["value"] != asker:
        raise Forbidden(f"consult {consult_id} was not asked of {asker}")
    if resource["status"] == "cancelled":
        why = resource.get("statusReason", {}).get("text", "")
        raise Conflict(
            f"consult {consult_id} was cancelled here ({why}): the report is not taken; "
            "the reader keeps it"
        )
    report, provenance = message["report"], message["provenance"]
    entry = _proven(svc, message["reported"], asker, REPORTED, consult_id)
    if entry["body"].get("report_hash") != report_hash(report):
        raise Unprocessable("the report is not the one the reader's consult.reported entry names")
    signature = verify_signature(svc, report, provenance)
    if signature != asker:
        raise Forbidden(f"the report is signed by {signature}, not by the reader {asker}")
    order_id = resource["focus"]["reference"].split("/", 1)[1]
    content = {k: v for k, v in report.items() if k not in ("id", "meta")}
    existing = _report_of(svc, consult_id)
    caller = Caller(None)
    with svc.store.writing(None) as writer:
        if existing is None:
            stored = writer.create(content)
        else:
            stored, _ = writer.update(
                "DiagnosticReport", existing.id, {**content, "id": existing.id}, None
            )
        proof = {
            **{k: v for k, v in provenance.items() if k not in ("id", "meta")},
            "target": [{"reference": stored.location}],
        }
        stored_provenance = writer.create(proof)
        svc.audit.writes(writer, caller, "create", [stored, stored_provenance])
    # the Task as it is now: the reader's status notices may have changed it meanwhile
    task = find_task(svc, consult_id) or task
    resource = task.resource()
    resource["status"] = "completed"
    resource["output"] = _outputs(stored, stored_provenance)
    _update(svc, caller, task, resource)
    order = svc.store.read("ServiceRequest", order_id)
    closed = order.resource()
    if closed["status"] == "active":
        closed["status"] = "completed"
        _update(svc, caller, order, closed)
    return {"consult_id": consult_id, "stored": stored.location}


def _report_of(svc: Services, consult_id: str) -> Stored | None:
    search = parse_search("DiagnosticReport", [("identifier", f"{CONSULT_SYSTEM}|{consult_id}")])
    found = svc.store.count_matches(search, EVERYONE, 1)
    return svc.store.by_pk(found[0]) if found else None


def verify_signature(svc: Services, report: dict[str, Any], provenance: dict[str, Any]) -> str:
    """The member whose node key signs the report (the Provenance's JWS), checked against
    every installed roster's key of that member; 422 naming what does not hold."""
    try:
        (signature,) = provenance["signature"]
        jws = base64.b64decode(signature["data"]).decode()
        member = signer_of(jws)
        keys_of = []
        for body, _ in svc.chain_store.rosters():
            for listed in body["members"]:
                if listed["id"] == member:
                    keys_of.append(keys.parse_public_key(listed["ed25519"]))
        return verify_report(jws, report, keys_of)
    except (KeyError, TypeError, ValueError) as exc:
        raise Unprocessable(f"the report's signature cannot be checked: {exc}") from None


def _proven(
    svc: Services, proof: Any, author: str, entry_type: str, consult_id: str
) -> dict[str, Any]:
    try:
        entry = check_entry_proof(proof, installed_roster_of(svc))
    except VerificationError as exc:
        raise Forbidden(f"the proof of the {entry_type} entry does not hold: {exc}") from None
    if entry["chain"] != author or entry["type"] != entry_type:
        raise Forbidden(f"the proof is not of {author}'s {entry_type} entry")
    if entry["body"].get("consult_id") != consult_id:
        raise Forbidden(f"the proven entry is of another consult than {consult_id}")
    return entry


# -- at the reader --------------------------------------------------------------------------


def receive_consult(svc: Services, asker: str, message: Any) -> dict[str, Any]:
    """A consult from member ``asker`` (``POST /peer/consults``), kept in the worklist once
    its ``consult.requested`` entry is proven on ``asker``'s chain and this node reads its
    modality; 422 saying why not."""
    fields = (
        "consult_id",
        "patient",
        "requester_org",
        "reader_org",
        "priority",
        "deadline",
        "study",
        "modality",
        "body_site",
        "question",
        "order",
        "subject",
        "imaging_study",
        "requested",
    )
    if not isinstance(message, dict) or set(message) != set(fields):
        raise InvalidRequest(f"a consult is an object of exactly {', '.join(fields)}")
    consult_id = str(message["consult_id"])
    if not CONSULT_ID.fullmatch(consult_id) or not is_pseudonym(message["patient"]):
        raise InvalidRequest("consult_id must be 8-64 letters, digits or -; patient a pseudonym")
    entry = _proven(svc, message["requested"], asker, REQUESTED, consult_id)
    body = entry["body"]
    for name in ("patient", "requester_org", "reader_org", "priority", "deadline"):
        if body.get(name) != message[name]:
            raise Forbidden(f"the consult's {name} is not what the proven entry records")
    if body["requester_org"] != asker or body["reader_org"] != svc.config.node_id:
        raise Forbidden(f"the proven consult is not from {asker} to {svc.config.node_id}")
    wanted = [m for m in str(message["modality"]).split(",") if m]
    reads = svc.config.consult_modalities
    if not reads:
        raise Unprocessable(f"{svc.config.node_id} reads no modality (consults.modalities)")
    unread = [m for m in wanted if m not in reads]
    if unread or not wanted:
        raise Unprocessable(
            f"{svc.config.node_id} does not read {', '.join(unread) or 'studies of no modality'} "
            f"(it reads {', '.join(reads)})"
        )
    if find_task(svc, consult_id) is not None:
        return {"consult_id": consult_id, "kept": True}  # delivered before: nothing new
    members = _members(svc)
    task = {
        "resourceType": "Task",
        "identifier": [{"system": CONSULT_SYSTEM, "value": consult_id}],
        "status": "requested",
        "intent": "order",
        "priority": message["priority"],
        "code": {"coding": [READ], "text": "影像会诊 (remote read)"},
        "authoredOn": entry["time"],
        "requester": {
            "identifier": {"system": MEMBER_SYSTEM, "value": asker},
            "display": members.get(asker, {}).get("name") or asker,
        },
        "owner": {
            "identifier": {"system": MEMBER_SYSTEM, "value": svc.config.node_id},
            "display": svc.config.name,
        },
        "restriction": {"period": {"end": message["deadline"]}},
        "input": _inputs(
            study=str(message["study"]),
            modality=str(message["modality"]),
            **{"body-site": str(message["body_site"])},
            question=str(message["question"]),
            patient=str(message["patient"]),
            order=str(message["order"]),
            subject=str(message["subject"]),
            **{"imaging-study": str(message["imaging_study"])},
        ),
    }
    with svc.store.writing(None) as writer:
        stored = writer.create(task)
        svc.audit.writes(writer, Caller(None), "create", [stored])
    return {"consult_id": consult_id, "kept": True}


def receive_cancel(svc: Services, asker: str, message: Any) -> dict[str, Any]:
    """The requester cancelled a consult (``POST /peer/consults/cancel``)."""
    consult_id = str(message.get("consult_id")) if isinstance(message, dict) else ""
    task = find_task(svc, consult_id)
    if task is None:
        raise NotFound(f"no consult {consult_id} here")
    resource = task.resource()
    if resource["requester"]["identifier"]["value"] != asker:
        raise Forbidden(f"consult {consult_id} was not requested by {asker}")
    if resource["status"] in OPEN_STATUSES:
        resource["status"] = "cancelled"
        resource["statusReason"] = {"text": f"cancelled by {asker}"}
        _update(svc, Caller(None), task, resource)
    return {"consult_id": consult_id, "cancelled": True}


def worklist(svc: Services, caller: Caller, *, done: bool = False) -> list[Consult]:
    """The consults asked of this node, open ones (``done``: the others), the most pressing
    first: by priority, then deadline."""
    permit(svc, caller, "Task", "s", "search-type")
    statuses = ("completed", "cancelled", "rejected") if done else OPEN_STATUSES
    search = parse_search(
        "Task",
        [
            ("owner:identifier", f"{MEMBER_SYSTEM}|{svc.config.node_id}"),
            ("status", ",".join(statuses)),
            ("_count", "500"),
        ],
    )
    rank = {p: i for i, p in enumerate(PRIORITIES)}
    found = [
        Consult.of(svc.store.by_pk(pk)) for pk in svc.store.count_matches(search, EVERYONE, 500)
    ]
    found = [c for c in found if c.requester != svc.config.node_id]
    return sorted(found, key=lambda c: (rank.get(c.priority, 9), c.deadline))


def requested(svc: Services, caller: Caller) -> list[Consult]:
    """The consults this node asked of others, newest first."""
    permit(svc, caller, "Task", "s", "search-type")
    search = parse_search(
        "Task",
        [
            ("requester:identifier", f"{MEMBER_SYSTEM}|{svc.config.node_id}"),
            ("_sort", "-authored-on"),
            ("_count", "200"),
        ],
    )
    return [
        Consult.of(svc.store.by_pk(pk)) for pk in svc.store.count_matches(search, EVERYONE, 200)
    ]


def claim(svc: Services, caller: Caller, consult_id: str) -> Consult:
    """The radiologist takes the consult (``consult.accepted`` the first time it is taken)."""
    username = _doctor(svc, caller, "read consults")
    task = reader_task(svc, consult_id)
    resource = task.resource()
    consult = Consult.of(task)
    if consult.owner not in (None, username):
        raise Conflict(f"consult {consult_id} is being read by {consult.owner}")
    if resource["status"] not in OPEN_STATUSES:
        raise Conflict(f"consult {consult_id} is {resource['status']}")
    first = not any(
        e["body"].get("consult_id") == consult_id
        for e in svc.chain_store.entries_about(_patient_of(resource), (ACCEPTED,))
    )
    resource["status"] = "accepted"
    resource["input"] = [
        i for i in resource["input"] if i["type"]["text"] != "radiologist"
    ] + _inputs(radiologist=username)
    task = _update(svc, caller, task, resource)
    if first:
        _append(
            svc,
            ACCEPTED,
            _body(
                _reader_fields(svc, resource),
                reader=pseudonym_of_identifier(
                    svc.consents.secret(), f"urn:hrx:user:{svc.config.node_id}", username
                ),
            ),
        )
    return Consult.of(task)


def release(svc: Services, caller: Caller, consult_id: str) -> Consult:
    """The radiologist gives the consult back to the worklist (no ledger entry)."""
    username = _doctor(svc, caller, "read consults")
    task = reader_task(svc, consult_id)
    resource = task.resource()
    if Consult.of(task).owner != username:
        raise Conflict(f"consult {consult_id} is not yours to release")
    resource["status"] = "requested"
    resource["input"] = [i for i in resource["input"] if i["type"]["text"] != "radiologist"]
    return Consult.of(_update(svc, caller, task, resource))


def reader_task(svc: Services, consult_id: str) -> Stored:
    task = find_task(svc, consult_id)
    if task is None or Consult.of(task).requester == svc.config.node_id:
        raise NotFound(f"no consult {consult_id} was asked of {svc.config.node_id}")
    return task


def _patient_of(resource: dict[str, Any]) -> str:
    return str(next(_input_value(i) for i in resource["input"] if i["type"]["text"] == "patient"))


def _reader_fields(svc: Services, resource: dict[str, Any]) -> dict[str, Any]:
    """The fields of a consult's entries, from the Task the reader keeps."""
    return {
        "consult_id": _consult_id(resource),
        "patient": _patient_of(resource),
        "requester_org": str(resource["requester"]["identifier"]["value"]),
        "reader_org": svc.config.node_id,
        "priority": str(resource["priority"]),
        "deadline": str(resource["restriction"]["period"]["end"]),
    }


def report(
    svc: Services, caller: Caller, consult_id: str, findings: str, impression: str
) -> tuple[Stored, str]:
    """Write (or amend) the signed report of a consult and send it back; the report and what
    became of its delivery. A consult cancelled meanwhile keeps the report here, unsent."""
    username = _doctor(svc, caller, "report consults")
    findings, impression = findings.strip(), impression.strip()
    if not findings or not impression:
        raise InvalidRequest("a report needs both its findings (所见) and impression (诊断意见)")
    task = reader_task(svc, consult_id)
    resource = task.resource()
    consult = Consult.of(task)
    if consult.owner not in (None, username):
        raise Conflict(f"consult {consult_id} is being read by {consult.owner}")
    inputs = {i["type"]["text"]: _input_value(i) for i in resource["input"]}
    previous = _report_of(svc, consult_id)
    diagnostic = {
        "resourceType": "DiagnosticReport",
        "identifier": [{"system": CONSULT_SYSTEM, "value": consult_id}],
        "basedOn": [{"reference": inputs["order"]}],
        "status": "amended" if previous is not None else "final",
        "category": [{"coding": [RADIOLOGY]}]
        + [{"coding": [{"system": DCM, "code": m}]} for m in consult.modality.split(",") if m],
        "code": {"coding": [REPORT_CODE], "text": "影像诊断报告"},
        "subject": {"reference": inputs["subject"]},
        "issued": format_time(),
        "performer": [
            {
                "identifier": {"system": MEMBER_SYSTEM, "value": svc.config.node_id},
                "display": svc.config.name,
            }
        ],
        "resultsInterpreter": [
            {
                "identifier": {"system": f"urn:hrx:user:{svc.config.node_id}", "value": username},
                "display": username,
            }
        ],
        "imagingStudy": [{"reference": inputs["imaging-study"]}],
        "conclusion": impression,
        "presentedForm": [
            {
                "contentType": "text/plain; charset=utf-8",
                "language": "zh-CN",
                "data": base64.b64encode(
                    f"所见 / Findings:\n{findings}\n\n"
                    f"诊断意见 / Impression:\n{impression}\n".encode()
                ).decode(),
                "title": "影像诊断报告",
            }
        ],
    }
    if consult.body_site:
        diagnostic["extension"] = [
            {"url": BODY_SITE_EXTENSION, "valueCodeableConcept": {"text": consult.body_site}}
        ]
    key = keys.load_private_key(svc.config.ed25519_key)
    jws = sign_report(key, svc.config.node_id, diagnostic)
    digest = report_hash(diagnostic)
    diagnostic = with_signature(diagnostic, jws)  # travels with the report wherever it goes
    with svc.store.writing(caller.principal) as writer:
        if previous is None:
            stored = writer.create(diagnostic)
        else:
            stored, _ = writer.update(
                "DiagnosticReport", previous.id, {**diagnostic, "id": previous.id}, None
            )
        provenance = provenance_of(svc, stored, username, jws)
        stored_provenance = writer.create(provenance)
        svc.audit.writes(writer, caller, "create", [stored, stored_provenance])
    fields = _reader_fields(svc, resource)
    if resource["status"] == "cancelled":
        return stored, "cancelled"
    seq = _append(
        svc,
        REPORTED,
        _body(
            fields,
            report_hash=digest,
            amends=report_hash(previous.resource()) if previous else None,
        ),
    )
    resource["status"] = "completed"
    resource["output"] = _outputs(stored, stored_provenance)
    task = _update(svc, caller, task, resource)
    sent = {
        "consult_id": consult_id,
        "requester_org": fields["requester_org"],
        "reader_org": svc.config.node_id,
        "report": {k: v for k, v in stored.resource().items() if k not in ("id", "meta")},
        "provenance": {k: v for k, v in provenance.items() if k != "target"},
        "reported": entry_proof(svc.chain_store, svc.config.node_id, seq),
    }
    _keep_delivery(svc, caller, task, "/peer/consults/report", sent)
    after = deliver(svc, caller, consult_id)
    state = (after.resource().get("businessStatus") or {}).get("text", "")
    return stored, state


def _outputs(report: Stored, provenance: Stored) -> list[dict[str, Any]]:
    """A completed Task's outputs: the report version and the Provenance that signs it."""
    return [
        {"type": {"text": "report"}, "valueReference": {"reference": report.location}},
        {"type": {"text": "signature"}, "valueReference": {"reference": provenance.location}},
    ]


def report_and_signature(svc: Services, consult: Consult) -> tuple[Stored, Stored] | None:
    """A completed consult's report and its Provenance, as stored here; None before."""
    outputs = {
        o["type"]["text"]: o["valueReference"]["reference"]
        for o in consult.task.resource().get("output", [])
    }
    if "report" not in outputs or "signature" not in outputs:
        return None
    found = []
    for reference in (outputs["report"], outputs["signature"]):
        kind, resource_id, _, version = reference.split("/")
        found.append(svc.store.vread(kind, resource_id, int(version)))
    return found[0], found[1]


def provenance_of(svc: Services, stored: Stored, username: str, jws: str) -> dict[str, Any]:
    """The Provenance of a report version: the radiologist on behalf of this member, and the
    node key's signature of the report's content."""
    who = {
        "identifier": {"system": f"urn:hrx:user:{svc.config.node_id}", "value": username},
        "display": username,
    }
    org = {
        "identifier": {"system": MEMBER_SYSTEM, "value": svc.config.node_id},
        "display": svc.config.name,
    }
    now = format_time()
    return {
        "resourceType": "Provenance",
        "target": [{"reference": stored.location}],
        "recorded": now,
        "agent": [
            {
                "type": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                            "code": "author",
                        }
                    ]
                },
                "who": who,
                "onBehalfOf": org,
            }
        ],
        "signature": [
            {
                "type": [AUTHOR_SIGNATURE],
                "when": now,
                "who": who,
                "onBehalfOf": org,
                "targetFormat": "application/fhir+json",
                "sigFormat": "application/jose",
                "data": base64.b64encode(jws.encode()).decode(),
            }
        ],
    }
