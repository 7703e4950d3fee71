"""The requester's side of a referral (``$prior-results``): a doctor sees the patient's prior
results from the members that hold them, each with its mutual-recognition verdict.

:func:`fetch_prior_results` appends ``access.requested`` to this node's chain (the patient's
pseudonym, this member, the doctor as a pseudonym, purpose, categories, the referral's hash),
asks the members the record locator names (every other member when there is none or it cannot
be reached: :mod:`node.flows.locator_lookup`) in parallel with signed requests
(:mod:`exchange.referral`), each sent with the proof that the question is on this node's chain
(:mod:`exchange.question`), records what it received (each result's source URL and hash) in
its AuditEvent, and returns one searchset: results with their source and verdict, a
Provenance each, an OperationOutcome saying how the members asked were found, and one for
every member that timed out, could not be reached or denied.
"""

from __future__ import annotations

import threading
import uuid
from datetime import datetime
from typing import Any

import requests

from consent.errors import ConsentError
from consent.model import CARE_PURPOSES, EMERGENCY, emergency_reason
from consent.pseudonym import pseudonym as pseudonym_of_identifier
from exchange.recognition import Rules, load_rules
from exchange.referral import Post, fan_out, prior_results_bundle
from fhir_adapters.errors import Forbidden, InvalidRequest, Unprocessable
from fhir_adapters.store import format_instant, now_micros
from ledger import keys
from ledger.errors import LedgerError
from ledger.receipt import entry_proof
from node.consortium.peers import SignedPeers
from node.flows.locator_lookup import locate
from node.flows.permissions import permit, refuse
from node.records.audit_trail import Caller
from node.services import Services

CATEGORIES = ("laboratory", "imaging")
RESULT_TYPES = ("Observation", "DiagnosticReport", "ImagingStudy")
_local = threading.local()  # one HTTP session per fan-out thread
_cache: dict[str, Any] = {}  # this process's signed client and recognition rules


def _peers(svc: Services) -> SignedPeers:
    peers = _cache.get("peers")
    if peers is None:
        key = keys.load_private_key(svc.config.ed25519_key)
        peers = _cache["peers"] = SignedPeers(svc.chain_store, svc.config.node_id, key)
    assert isinstance(peers, SignedPeers)
    return peers


def rules(svc: Services) -> Rules:
    """The consortium's recognition rules (read once per process)."""
    found = _cache.get("rules")
    if found is None:
        found = _cache["rules"] = load_rules(svc.config.recognition_rules)
    assert isinstance(found, Rules)
    return found


def _post(peers: SignedPeers, request_id: str | None) -> Post:
    """The fan-out's transport: the threads ask under the doctor's request ID."""

    def post(member: str, path: str, body: dict[str, Any], timeout: float) -> bytes:
        session = getattr(_local, "session", None)
        if session is None:
            session = _local.session = requests.Session()
        return peers.fetch(member, "POST", path, body, timeout, session, request_id=request_id)

    return post


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
    (proof,) = record_questions(
        svc, [(request_id, patient)], username, purpose, categories, referral_hash
    )
    return proof


def record_questions(
    svc: Services,
    questions: list[tuple[str, str]],
    username: str,
    purpose: str,
    categories: list[str],
    referral_hash: str | None = None,
) -> list[dict[str, Any]]:
    """:func:`record_question` for several (request id, pseudonym) pairs at once, in one
    block; their proofs, in the same order."""
    requester = {
        "org": svc.config.node_id,
        "practitioner": pseudonym_of_identifier(
            svc.consents.secret(), f"urn:hrx:user:{svc.config.node_id}", username
        ),
    }
    entries = [
        (
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
        for request_id, patient in questions
    ]
    try:
        seqs = svc.consents.chain_writer().append_many(entries)
        return [entry_proof(svc.chain_store, svc.config.node_id, seq) for seq in seqs]
    except LedgerError as exc:
        raise Unprocessable(f"the request could not be recorded on the ledger: {exc}") from None


def fetch_prior_results(
    svc: Services,
    caller: Caller,
    patient_id: str,
    categories: list[str],
    *,
    codes: list[str] | None = None,
    purpose: str = "TREAT",
    reason: str | None = None,
    reason_code: str | None = None,
    referral_hash: str | None = None,
    self_link: str | None = None,
    query: str | None = None,
) -> dict[str, Any]:
    """The searchset of a patient's prior results from every member (see the module
    docstring); ``access.requested`` is on this node's chain before any member is asked.
    ``self_link`` and ``query`` are how the request was made (the Bundle's link, the audit)."""
    principal = caller.principal
    if principal is None or principal.role not in ("doctor", "admin"):
        who = f"{principal.username} ({principal.role})" if principal else "nobody signed in"
        refusal = Forbidden(f"{who} may not fetch prior results")
        refuse(svc, caller, "operation", str(refusal))
        raise refusal
    for resource_type in ("Patient", *RESULT_TYPES):
        permit(svc, caller, resource_type, "r", "operation")
    wrong = [c for c in categories if c not in CATEGORIES]
    if wrong:
        raise InvalidRequest(f"category {wrong[0]!r} is not one of {', '.join(CATEGORIES)}")
    if purpose not in CARE_PURPOSES:
        raise InvalidRequest(
            f"purpose {purpose!r}: prior results are fetched for care, "
            f"{' or '.join(CARE_PURPOSES)} (research and public health ask members for a "
            "cohort: Group/[id]/$export?source=…&purpose=…)"
        )
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
    located = locate(svc, caller, _peers(svc), body)
    answers = fan_out(
        _post(_peers(svc), caller.request_id),
        located.members,
        body,
        svc.config.exchange_timeout_ms / 1000,
    )
    members = {m["id"]: m for m in roster.body["members"]}
    bundle = prior_results_bundle(
        answers,
        rules=rules(svc),
        members=members,
        here=svc.config.node_id,
        today=datetime.now(rules(svc).zone).date(),
        codes=codes or [],
        recorded=format_instant(now_micros()),
        notes=[located.note],
        self_link=self_link or f"{svc.config.fhir_base}/Patient/{patient_id}/$prior-results",
    )
    record = caller.record(
        "operation",
        description=f"$prior-results {request_id} ({purpose}, {', '.join(categories)}): "
        + f"{located.note}: "
        + "; ".join(
            f"{a.member} {a.outcome} {len(a.resources)} in {a.seconds * 1000:.0f} ms"
            for a in answers
        ),
        patients={patient_id},
        query=query,
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
