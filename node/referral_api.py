"""``GET /fhir/Patient/{id}/$prior-results``: a doctor at referral sees the patient's prior
results from every member, each with its mutual-recognition verdict (DESIGN §2.3, §6).

The node appends ``access.requested`` to its chain (the patient's pseudonym, this member, the
doctor as a pseudonym, purpose, categories, the referral's hash), asks every other member in
parallel with signed requests (:mod:`exchange.referral`), records what it received (each
result's source URL and hash) in its AuditEvent, and answers with one searchset:
results with their source and verdict, a Provenance each, and an OperationOutcome for every
member that timed out, could not be reached or denied. Each member is sent, with the request,
the proof that the question is on this node's chain (:mod:`exchange.question`). Parameters:
``category`` (``laboratory``, ``imaging``; default both), ``code`` (``system|code``, a code, or
an imaging modality), ``purpose`` (``TREAT``, default, or ``ETREAT`` with a ``reason-code`` of
:data:`consent.model.EMERGENCY_REASONS` and a ``reason`` in words), ``referral``
(``ServiceRequest/{id}``).
"""

from __future__ import annotations

import threading
import uuid
from datetime import datetime
from typing import Any
from urllib.parse import quote

import requests
from flask import Blueprint, Response, current_app, request

from consent.errors import ConsentError
from consent.model import EMERGENCY, PURPOSES, emergency_reason
from consent.pseudonym import pseudonym as pseudonym_of_identifier
from exchange.recognition import Rules, load_rules
from exchange.referral import fan_out, prior_results_bundle
from fhir_adapters.errors import FhirError, Forbidden, InvalidRequest, NotFound, Unprocessable
from fhir_adapters.resources import check_id
from fhir_adapters.store import format_instant, now_micros
from ledger import keys
from ledger.errors import LedgerError
from ledger.receipt import entry_proof
from node import fhir_api
from node.audit import AuditRecord
from node.logs import current_request_id
from node.replication import SignedPeers
from node.services import Services

bp = Blueprint("referral", __name__, url_prefix="/fhir")
bp.register_error_handler(FhirError, fhir_api.fhir_error)
bp.before_request(fhir_api.negotiate)

CATEGORIES = ("laboratory", "imaging")
RESULT_TYPES = ("Observation", "DiagnosticReport", "ImagingStudy")
_local = threading.local()  # one HTTP session per fan-out thread
_cache: dict[str, Any] = {}


def services() -> Services:
    found: Services = current_app.extensions["hrx"]
    return found


def _peers(svc: Services) -> SignedPeers:
    peers = _cache.get("peers")
    if peers is None:
        key = keys.load_private_key(svc.config.ed25519_key)
        peers = _cache["peers"] = SignedPeers(svc.chain_store, svc.config.node_id, key)
    assert isinstance(peers, SignedPeers)
    return peers


def rules(svc: Services) -> Rules:
    found = _cache.get("rules")
    if found is None:
        found = _cache["rules"] = load_rules(svc.config.recognition_rules)
    assert isinstance(found, Rules)
    return found


def _post(peers: SignedPeers) -> Any:
    request_id = current_request_id()  # the fan-out's threads ask under the doctor's request

    def post(member: str, path: str, body: dict[str, Any], timeout: float) -> bytes:
        session = getattr(_local, "session", None)
        if session is None:
            session = _local.session = requests.Session()
        return peers.fetch(member, "POST", path, body, timeout, session, request_id=request_id)

    return post


def _listed(name: str) -> list[str]:
    return [part for value in request.args.getlist(name) for part in value.split(",") if part]


@bp.get("/Patient/<patient_id>/$prior-results")
def prior_results(patient_id: str) -> Response:
    principal = fhir_api.authenticate()
    check_id(patient_id)
    unknown = set(request.args) - {
        "category",
        "code",
        "purpose",
        "reason",
        "reason-code",
        "referral",
        "_format",
    }
    if unknown:
        raise InvalidRequest(f"$prior-results takes no parameter(s) {sorted(unknown)}")
    svc = services()
    referral_hash = None
    referral = request.args.get("referral")
    if referral:
        kind, _, referral_id = referral.partition("/")
        if kind != "ServiceRequest" or not referral_id:
            raise InvalidRequest("referral must be ServiceRequest/{id}")
        try:
            referral_hash = svc.store.read("ServiceRequest", referral_id).sha256()
        except NotFound:
            raise InvalidRequest(f"{referral} is not known here") from None
    bundle = fetch_prior_results(
        svc,
        principal,
        patient_id,
        _listed("category") or list(CATEGORIES),
        codes=_listed("code"),
        purpose=request.args.get("purpose", "TREAT"),
        reason=request.args.get("reason"),
        reason_code=request.args.get("reason-code"),
        referral_hash=referral_hash,
    )
    return fhir_api.respond(200, bundle)


def record_question(
    svc: Services,
    request_id: str,
    patient: str,
    username: str,
    purpose: str,
    categories: list[str],
    referral_hash: str | None = None,
) -> dict[str, Any]:
    """Append ``access.requested`` to this node's chain (the patient's pseudonym, this member,
    the doctor as a pseudonym like a patient's, purpose, categories, the referral's hash) and
    return the proof of it that every member asked checks before it answers."""
    requester = {
        "org": svc.config.node_id,
        "practitioner": pseudonym_of_identifier(
            svc.consents.secret(), f"urn:hrx:user:{svc.config.node_id}", username
        ),
    }
    try:
        seq = svc.consents.chain_writer().append(
            "access.requested",
            {
                "request_id": request_id,
                "patient": patient,
                "requester": requester,
                "purpose": purpose,
                "categories": categories,
                "referral": referral_hash,
            },
        )
        return entry_proof(svc.chain_store, svc.config.node_id, seq)
    except LedgerError as exc:
        raise Unprocessable(f"the request could not be recorded on the ledger: {exc}") from None


def fetch_prior_results(
    svc: Services,
    principal: Any,
    patient_id: str,
    categories: list[str],
    *,
    codes: list[str] | None = None,
    purpose: str = "TREAT",
    reason: str | None = None,
    reason_code: str | None = None,
    referral_hash: str | None = None,
) -> dict[str, Any]:
    """The searchset of a patient's prior results from every member (see the module
    docstring); ``access.requested`` is on this node's chain before any member is asked."""
    if principal.role not in ("doctor", "admin"):
        refusal = Forbidden(f"{principal.username} ({principal.role}) may not fetch prior results")
        fhir_api._audit_refusal(principal, "operation", str(refusal))
        raise refusal
    for resource_type in ("Patient", *RESULT_TYPES):
        fhir_api.permit(resource_type, "r", "operation")
    wrong = [c for c in categories if c not in CATEGORIES]
    if wrong:
        raise InvalidRequest(f"category {wrong[0]!r} is not one of {', '.join(CATEGORIES)}")
    if purpose not in PURPOSES:
        raise InvalidRequest(f"purpose {purpose!r} is not one of {', '.join(PURPOSES)}")
    if purpose == EMERGENCY:
        try:
            reason_code, reason = emergency_reason(reason_code, reason)
        except ConsentError as exc:
            raise InvalidRequest(f"{exc} (parameter {exc.expression})") from None
    elif reason is not None or reason_code is not None:
        raise InvalidRequest(f"reason and reason-code are for purpose={EMERGENCY} only")
    patient = svc.store.read("Patient", patient_id).resource()
    pseudonym = svc.consents.pseudonym_of(patient)
    if pseudonym is None:
        raise Unprocessable(
            f"Patient/{patient_id} has no identifier of {svc.config.identifier_system}, which "
            "members match patients by: add it to the Patient first"
        )
    request_id = str(uuid.uuid4())
    body: dict[str, Any] = {
        "request_id": request_id,
        "patient": pseudonym,
        "purpose": purpose,
        "categories": categories,
        "asked": record_question(
            svc, request_id, pseudonym, principal.username, purpose, categories, referral_hash
        ),
    }
    if reason is not None:
        body["reason"], body["reason_code"] = reason, reason_code
    roster = svc.chain_store.roster()
    others = [m for m in roster.member_ids() if m != svc.config.node_id]
    answers = fan_out(_post(_peers(svc)), others, body, svc.config.exchange_timeout_ms / 1000)
    members = {m["id"]: m for m in roster.body["members"]}
    self_link = f"{svc.config.fhir_base}/Patient/{quote(patient_id)}/$prior-results" + (
        f"?{request.query_string.decode()}" if request.query_string else ""
    )
    bundle = prior_results_bundle(
        answers,
        rules=rules(svc),
        members=members,
        here=svc.config.node_id,
        today=datetime.now(rules(svc).zone).date(),
        codes=codes or [],
        recorded=format_instant(now_micros()),
        self_link=self_link,
    )
    record = AuditRecord(
        interaction="operation",
        username=principal.username,
        role=principal.role,
        address=request.remote_addr,
        client=request.headers.get("User-Agent"),
        token_id=principal.token_id,
        description=f"$prior-results {request_id} ({purpose}, {', '.join(categories)}): "
        + "; ".join(
            f"{a.member} {a.outcome} {len(a.resources)} in {a.seconds * 1000:.0f} ms"
            for a in answers
        ),
        patients={patient_id},
        query=request.query_string.decode() or None,
        received=[
            (
                entry["resource"]["target"][0]["reference"],
                entry["resource"]["entity"][0]["what"]["identifier"]["value"].removeprefix(
                    "urn:sha256:"
                ),
            )
            for entry in bundle["entry"]
            if entry["search"]["mode"] == "include"
        ],
    )
    svc.audit.record(record)
    return bundle
