"""``/peer``: what member nodes ask of each other, every request signed (DESIGN §7).

- ``POST /peer/heads``: a push hint — "my chain has new blocks"; the replication worker
  runs its next round at once instead of waiting for its interval.
- ``POST /peer/checkpoints/sign``: the epoch's proposer asks for this node's BLS signature of
  a checkpoint. This node signs only heads it holds and has verified, under its newest
  roster, and never two different checkpoints of one epoch.
- ``POST /peer/checkpoints``: a certificate, stored once it verifies.
- ``POST /peer/access``: a member asks for a patient's records. Nothing is looked up before
  the question is proven to be on the asker's chain (:mod:`exchange.question`): no member
  learns whether this one treats a person without a record the patient and the auditor see.
  When this node holds records, it decides with the consent policy, records
  ``access.decided`` (and ``emergency.access`` for break-glass) with the hashes of what it
  releases, and answers with the released resources; when it holds none it says only that
  (``{"holds": false}``).
"""

from __future__ import annotations

import re
import time
from datetime import timedelta, timezone
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, current_app, g, request

from consent.errors import ConsentError
from consent.model import EMERGENCY, emergency_reason
from consent.policy import CONSENT_TYPES, AccessRequest
from consent.pseudonym import is_pseudonym
from exchange.decisions import decide_access, decided_body, emergency_body
from exchange.question import check_question
from exchange.recognition import result_of
from fhir_adapters.errors import Conflict, FhirError, InvalidRequest
from fhir_adapters.store import Stored
from ledger import checkpoint as checkpoints
from ledger.canonical import canonical_bytes, parse_json
from ledger.errors import LedgerError
from ledger.model import format_time, parse_time
from ledger.roster import Roster, open_roster
from node import metrics
from node.audit import AuditRecord
from node.ledger_api import verified_peer
from node.pseudonyms import patients_with
from node.replication import replicator_for, synced_age

bp = Blueprint("peer", __name__, url_prefix="/peer")

HINT_FILE = "replicate.hint"
EPOCH_TOLERANCE_SLOTS = 120  # how far (in slots) an epoch may be from this node's clock
RESULT_TYPES = ("Observation", "DiagnosticReport", "ImagingStudy")  # what a member releases
_cache: dict[str, Any] = {}
ZONE = timezone(timedelta(hours=8))  # only categories are read here: the zone does not matter


def _json(value: Any, status: int = 200) -> Response:
    return Response(canonical_bytes(value), status=status, mimetype="application/json")


@bp.before_request
def authenticate() -> None:
    g.peer = verified_peer()


@bp.errorhandler(FhirError)
def fhir_error(exc: FhirError) -> Response:
    return _json({"error": str(exc)}, exc.status)


@bp.errorhandler(LedgerError)
def ledger_error(exc: LedgerError) -> Response:
    return _json({"error": str(exc)}, 400)


def _body() -> Any:
    try:
        return parse_json(request.get_data(cache=True))
    except LedgerError as exc:
        raise InvalidRequest(f"the body: {exc}") from None


def hint_path(directory: Path) -> Path:
    return directory / HINT_FILE


@bp.post("/heads")
def heads_hint() -> Response:
    services = current_app.extensions["hrx"]
    with hint_path(services.config.directory).open("a") as hint:
        hint.write(g.peer + "\n")  # who spoke up: the worker stops backing off from it
    return _json({"ok": True})


@bp.post("/checkpoints/sign")
def sign_checkpoint() -> Response:
    services = current_app.extensions["hrx"]
    store = services.chain_store
    checkpoint = checkpoints.check_checkpoint(_body())
    roster = store.roster()
    _check_epoch(checkpoint["epoch"], services.config.slot_seconds)
    witnesses = sorted(roster.witnesses())
    if services.config.node_id not in witnesses:
        raise Conflict(
            f"{services.config.node_id} is no witness in roster version {roster.version}"
        )
    proposer = witnesses[checkpoint["epoch"] % len(witnesses)]
    if g.peer != proposer:
        raise Conflict(f"epoch {checkpoint['epoch']} is {proposer}'s to propose, not {g.peer}'s")
    if checkpoint["roster"] != roster.version:
        raise Conflict(
            f"the checkpoint names roster version {checkpoint['roster']}; this node is at "
            f"{roster.version}"
        )
    frozen = store.frozen_chains()
    for chain, head in checkpoint["heads"].items():
        if chain in frozen:
            raise Conflict(f"chain {chain} is frozen here (fork evidence): not signed")
        ours = store.block_at(chain, head["height"])
        if ours is None:
            raise Conflict(f"this node has not yet verified chain {chain} up to {head['height']}")
        if (ours.hash, ours.header["tree_root"], ours.header["tree_size"]) != (
            head["hash"],
            head["tree_root"],
            head["tree_size"],
        ):
            raise Conflict(f"chain {chain} at height {head['height']} is another block here")
    if not services.chain_writes.vote(checkpoint):
        raise Conflict(
            f"this node already signed another checkpoint of epoch {checkpoint['epoch']}"
        )
    from ledger import bls

    signature = checkpoints.sign(checkpoint, bls.read_secret_key(services.config.bls_key))
    return _json({"member": services.config.node_id, "signature": signature})


@bp.post("/checkpoints")
def receive_certificate() -> Response:
    services = current_app.extensions["hrx"]
    store = services.chain_store
    certificate = _body()
    roster = store.roster()
    # only under the newest roster: keys a later version removed count for nothing now
    checkpoint = checkpoints.verify_certificate(certificate, {roster.version: roster})
    _check_epoch(checkpoint["epoch"], services.config.slot_seconds)
    for chain, head in checkpoint["heads"].items():
        ours = store.block_at(chain, head["height"])
        if ours is not None and ours.hash != head["hash"]:
            raise Conflict(f"the certificate's {chain} at {head['height']} is another block here")
    stored = services.chain_writes.add_certificate(certificate)
    return _json({"stored": stored})


@bp.post("/access")
def decide_access_request() -> Response:
    """A member asks for a patient's records: decide with the consent policy over this node's
    ledger and record the decision (and a break-glass access) on this node's chain before
    answering. The requester is the member whose signature the request carries, never a field
    of the body."""
    services = current_app.extensions["hrx"]
    body = _body()
    request_id, patient, purpose, categories, reason, reason_code = _access_request(body)
    now = format_time()
    check_question(
        body["asked"],
        asker=g.peer,
        request_id=request_id,
        patient=patient,
        purpose=purpose,
        categories=categories,
        roster_of=_roster_of(services),
        now=parse_time(now),
    )
    access = AccessRequest(
        patient=patient,
        requester=g.peer,
        purpose=purpose,
        categories=tuple(categories),
        time=now,
        reason=reason,
        reason_code=reason_code,
    )
    patients = patients_with(services.database.engine, patient)
    if not patients:  # nothing to decide about; the question is on the asker's chain
        return _json({"request_id": request_id, "holds": False})
    decided = decide_access(services.chain_store, access, _sync_consent_chains(services, patient))
    released: list[Stored] = []
    if decided.decision.permitted:
        released = [
            stored
            for stored in services.store.in_compartments(patients, RESULT_TYPES)
            if result_of(stored.resource(), ZONE).category in categories
        ]
    entries = [
        (
            "access.decided",
            decided_body(request_id, access, decided, [s.sha256() for s in released]),
        )
    ]
    if decided.decision.emergency:
        entries.append(("emergency.access", emergency_body(request_id, access)))
    seqs = services.consents.chain_writer().append_many(entries)
    metrics.count_access_decision(
        decided.decision.decision, decided.decision.emergency, requester=g.peer
    )
    record = AuditRecord(
        interaction="operation",
        username=g.peer,
        role="member",
        address=request.remote_addr,
        client=request.headers.get("User-Agent"),
        outcome="0" if decided.decision.permitted else "4",
        description=(
            f"{g.peer} asked for {', '.join(categories)} ({purpose}); "
            f"{decided.decision.decision}: {decided.decision.reason}"
            + (f"; emergency reason stated: {reason}" if decided.decision.emergency else "")
        ),
        entities=released,
        patients=set(patients),
    )
    services.audit.record(record)
    head = canonical_bytes(
        {
            "request_id": request_id,
            "decision": decided.decision.decision,
            "reasons": list(decided.decision.reasons),
            "consent": decided.decision.consent,
            "emergency": decided.decision.emergency,
            "decided": {"chain": services.config.node_id, "seq": seqs[0]},
            "view": decided.view,
        }
    )
    # the resources go out as the bytes they are stored as (their hashes are on the ledger)
    body = head[:-1] + b',"resources":[' + b",".join(s.body or b"" for s in released) + b"]}"
    return Response(body, mimetype="application/json")


def _roster_of(services: Any) -> Any:
    """The roster of each version this node has installed (trusted as stored)."""

    def roster_of(version: int) -> Roster:
        for body, signature in reversed(services.chain_store.rosters()):
            if body["version"] == version:
                return open_roster(body, signature, None, check_possession=False)
        raise Conflict(f"roster version {version} is not installed here")

    return roster_of


def _sync_consent_chains(services: Any, patient: str) -> dict[str, str]:
    """Bring the chains that hold the patient's consents up to their authors' heads (DESIGN
    §5); the chains that could not be and whose copy here is older than the staleness bound,
    with why. The worker is kept per process (its rosters are read again at each sync)."""
    config = services.config
    chains = {
        entry["chain"]
        for entry in services.chain_store.entries_about(patient, CONSENT_TYPES)
        if entry["chain"] != config.node_id
    }
    if not chains:
        return {}
    replicator = _cache.get("consent-sync")
    if replicator is None:
        replicator = _cache["consent-sync"] = replicator_for(
            config,
            services.chain_store,
            services.chain_writes,
            timeout=config.sync_timeout_ms / 1000,
        )
    stale = {}
    for chain, why in replicator.sync_from_authors(chains).items():
        age = synced_age(services.chain_store, chain)
        if age is None or age > config.staleness_seconds:
            copy = "never confirmed" if age is None else f"last confirmed {age:.0f} s ago"
            stale[chain] = f"{why}; the copy here was {copy} (bound {config.staleness_seconds} s)"
    return stale


def _access_request(body: Any) -> tuple[str, str, str, list[str], str | None, str | None]:
    if not isinstance(body, dict):
        raise InvalidRequest("an access request is a JSON object")
    fields = {"request_id", "patient", "purpose", "categories", "reason", "reason_code", "asked"}
    unknown = set(body) - fields
    if unknown:
        raise InvalidRequest(f"an access request has no field(s) {sorted(unknown)}")
    if "asked" not in body:
        raise InvalidRequest(
            "an access request carries the proof that the question is on the asker's chain "
            "(asked: its access.requested entry, inclusion proof and signed block)"
        )
    request_id = body.get("request_id")
    if not isinstance(request_id, str) or not re.fullmatch(r"[A-Za-z0-9\-]{8,64}", request_id):
        raise InvalidRequest("request_id must be 8-64 letters, digits or -")
    patient = body.get("patient")
    if not is_pseudonym(patient):
        raise InvalidRequest("patient must be a pseudonym (64 lowercase hex digits)")
    purpose = body.get("purpose")
    if not isinstance(purpose, str) or len(purpose) > 16:
        raise InvalidRequest("purpose must be a purpose of use code such as TREAT")
    categories = body.get("categories")
    if (
        not isinstance(categories, list)
        or not 0 < len(categories) <= 16
        or not all(isinstance(c, str) and 0 < len(c) <= 32 for c in categories)
    ):
        raise InvalidRequest("categories must be 1-16 data category codes")
    reason, reason_code = body.get("reason"), body.get("reason_code")
    if reason is not None or reason_code is not None:
        if purpose != EMERGENCY:
            raise InvalidRequest(f"a reason is stated for emergency access ({EMERGENCY}) only")
        try:
            reason_code, reason = emergency_reason(reason_code, reason)
        except ConsentError as exc:
            raise InvalidRequest(str(exc)) from None
    return request_id, str(patient), purpose, list(categories), reason, reason_code


def _check_epoch(epoch: int, slot_seconds: int) -> None:
    """An epoch is a slot of wall time: none far from now is signed or stored (a member must
    not reserve votes for the future, nor pin "latest" with an epoch from far ahead)."""
    now = int(time.time() // slot_seconds)
    if abs(epoch - now) > EPOCH_TOLERANCE_SLOTS:
        raise Conflict(f"epoch {epoch} is not near the current slot {now}; check the clocks")
