"""The source's side of an access request (``POST /peer/access``): a member asks for a
patient's records, and this node decides with the consent policy.

Nothing is looked up before the question is proven to be on the asker's chain
(:mod:`exchange.question`): no member learns whether this one treats a person without a record
the patient and the auditor see. When this node holds records, it brings the chains holding
the patient's consents up to their authors' heads, decides over its ledger, records
``access.decided`` (and ``emergency.access`` for break-glass) with the hashes of what it
releases on its own chain, and answers with the released resources as the bytes it stores;
when it holds none it says only that (``{"holds": false}``). An ordinary member, which holds
only its own chain and those decisions needed, learns from a witness which chains hold the
patient's consents (:func:`consent_chains` answers there), and takes each from its author, or
from a witness, never in a state that conflicts with the latest certified checkpoint. The
requester is the member whose signature the request carries, never a field of the body.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta, timezone
from typing import Any, TypeVar

from consent.errors import ConsentError
from consent.model import CARE_PURPOSES, EMERGENCY, PURPOSES, emergency_reason
from consent.policy import CONSENT_TYPES, AccessRequest, Decision
from consent.pseudonym import is_pseudonym
from exchange.decisions import decide_access, decided_body, emergency_body
from exchange.question import check_question
from exchange.recognition import result_of
from fhir_adapters.errors import Conflict, InvalidRequest
from fhir_adapters.store import Stored
from ledger import keys
from ledger.canonical import canonical_bytes
from ledger.errors import PeerUnavailable
from ledger.model import format_time, parse_time
from ledger.replication import Replicator
from ledger.roster import Roster, open_roster
from node.consortium.peers import SignedPeers
from node.consortium.worker import replicator_for, synced_age
from node.records.audit_trail import Caller
from node.records.pseudonym_index import patients_with
from node.services import Services

RESULT_TYPES = ("Observation", "DiagnosticReport", "ImagingStudy")  # what a member releases
ZONE = timezone(timedelta(hours=8))  # only categories are read here: the zone does not matter
T = TypeVar("T")
_local = threading.local()  # per thread and Services: the consent-sync client (not shareable)


@dataclass(frozen=True)
class Answered:
    """The answer's bytes, and the decision (None when this node holds no records)."""

    body: bytes
    decision: Decision | None


def decide_access_request(svc: Services, caller: Caller, asker: str, body: Any) -> Answered:
    """Decide member ``asker``'s access request ``body`` (see the module docstring)."""
    now = format_time()
    purpose = body.get("purpose") if isinstance(body, dict) else None
    if purpose in PURPOSES and purpose not in CARE_PURPOSES:
        raise InvalidRequest(
            f"purpose {purpose}: a referral's request is for care ({', '.join(CARE_PURPOSES)}); "
            "research and public health are asked for a cohort (POST /peer/export)"
        )
    request_id, patient, purpose, categories, reason, reason_code = proven_request(
        svc, asker, body, now
    )
    access = AccessRequest(
        patient=patient,
        requester=asker,
        purpose=purpose,
        categories=tuple(categories),
        time=now,
        reason=reason,
        reason_code=reason_code,
    )
    patients = patients_with(svc.database.engine, patient)
    if not patients:  # nothing to decide about; the question is on the asker's chain
        return Answered(canonical_bytes({"request_id": request_id, "holds": False}), None)
    decided = decide_access(
        svc.chain_store, access, _sync_consent_chains(svc, patient, {**body, "requester": asker})
    )
    released: list[Stored] = []
    if decided.decision.permitted:
        released = [
            stored
            for stored in svc.store.in_compartments(patients, RESULT_TYPES)
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
    seqs = svc.consents.chain_writer().append_many(entries)
    svc.audit.record(
        caller.record(
            "operation",
            outcome="0" if decided.decision.permitted else "4",
            description=(
                f"{asker} asked for {', '.join(categories)} ({purpose}); "
                f"{decided.decision.decision}: {decided.decision.reason}"
                + (f"; emergency reason stated: {reason}" if decided.decision.emergency else "")
            ),
            entities=released,
            patients=set(patients),
        )
    )
    head = canonical_bytes(
        {
            "request_id": request_id,
            "decision": decided.decision.decision,
            "reasons": list(decided.decision.reasons),
            "consent": decided.decision.consent,
            "emergency": decided.decision.emergency,
            "decided": {"chain": svc.config.node_id, "seq": seqs[0]},
            "view": decided.view,
        }
    )
    # the resources go out as the bytes they are stored as (their hashes are on the ledger)
    answer = head[:-1] + b',"resources":[' + b",".join(s.body or b"" for s in released) + b"]}"
    return Answered(answer, decided.decision)


def installed_roster_of(svc: Services) -> Any:
    """The roster of each version this node has installed (trusted as stored)."""

    def roster_of(version: int) -> Roster:
        for body, signature in reversed(svc.chain_store.rosters()):
            if body["version"] == version:
                return open_roster(body, signature, None, check_possession=False)
        raise Conflict(f"roster version {version} is not installed here")

    return roster_of


def _sync_consent_chains(svc: Services, patient: str, question: dict[str, Any]) -> dict[str, str]:
    """Bring the chains that hold the patient's consents up to their authors' heads (from a
    witness when the author cannot give them); the chains that could not be and whose copy
    here is older than the staleness bound, with why (``"*"``: which chains hold the
    consents could not be learned). ``question``: the access request this node was asked,
    passed on to the witness an ordinary member learns the chains from."""
    learned = consent_chains_of(svc, patient, question)
    if isinstance(learned, str):
        return {"*": learned}
    return sync_chains(svc, learned, patient)


def consent_chains_of(svc: Services, patient: str, question: dict[str, Any]) -> set[str] | str:
    """The other members' chains that hold the patient's consents, or why they could not be
    learned. A witness knows them from its own copy of every chain; an ordinary member asks a
    witness (:func:`consent_chains`), passing on the ``question`` it was asked."""
    config = svc.config
    roster = svc.chain_store.roster()
    chains = {entry["chain"] for entry in svc.chain_store.entries_about(patient, CONSENT_TYPES)}
    if config.node_id not in roster.witnesses():
        witnesses = witnesses_in_turn(roster.witnesses(), patient, config.node_id)
        learned = _ask_witnesses(svc, witnesses, question)
        if isinstance(learned, str):
            return learned
        chains |= learned
    chains.discard(config.node_id)
    return chains


def sync_chains(svc: Services, chains: set[str], patient: str) -> dict[str, str]:
    """Bring ``chains`` up to their authors' heads (from a witness, starting at the one the
    ``patient``'s pseudonym picks, when the author cannot give them); those that could not be
    and whose copy here is older than the staleness bound, with why. The client is kept per
    thread (its rosters are read again at each sync; its HTTP session and deadline are not
    for sharing)."""
    if not chains:
        return {}
    config = svc.config
    witnesses = witnesses_in_turn(svc.chain_store.roster().witnesses(), patient, config.node_id)
    replicators: dict[int, Replicator] = _local.__dict__.setdefault("replicators", {})
    replicator = replicators.get(id(svc))
    if replicator is None:
        replicator = replicators[id(svc)] = replicator_for(
            config,
            svc.chain_store,
            svc.chain_writes,
            timeout=config.sync_timeout_ms / 1000,
        )
    stale = {}
    synced = replicator.sync_chains(chains, witnesses, seconds=config.sync_timeout_ms / 1000)
    for chain, why in synced.items():
        age = synced_age(svc.chain_store, chain)
        if age is None or age > config.staleness_seconds:
            copy = "never confirmed" if age is None else f"last confirmed {age:.0f} s ago"
            stale[chain] = f"{why}; the copy here was {copy} (bound {config.staleness_seconds} s)"
    return stale


def witnesses_in_turn(witnesses: list[str], patient: str, own: str) -> list[str]:
    """The witnesses other than this node, starting at one that depends on the patient (so
    that the questions of a consortium spread over its witnesses)."""
    others = sorted(w for w in witnesses if w != own)
    if not others:
        return []
    first = int(patient[:8], 16) % len(others)
    return others[first:] + others[:first]


def _ask_witnesses(svc: Services, witnesses: list[str], question: dict[str, Any]) -> Any:
    """The chains holding the patient's consents, from the first witness that answers; or,
    when none does, why (a string)."""

    def chains_of(witness: str, answer: Any) -> set[str]:
        chains = answer.get("chains") if isinstance(answer, dict) else None
        if not isinstance(chains, list) or not all(isinstance(c, str) for c in chains):
            raise PeerUnavailable(f"{witness} answered without a list of chains")
        return set(chains)

    return ask_witnesses(svc, witnesses, "/peer/consent-chains", question, chains_of)


def ask_witnesses(
    svc: Services,
    witnesses: list[str],
    path: str,
    question: dict[str, Any],
    read: Callable[[str, Any], T],
) -> T | str:
    """``read(witness, answer)`` of the first of ``witnesses`` whose answer to ``question``
    at ``path`` it takes (it raises PeerUnavailable for one it does not); or, when none
    answers so, why (a string)."""
    peers = SignedPeers(
        svc.chain_store,
        svc.config.node_id,
        keys.load_private_key(svc.config.ed25519_key),
        timeout=svc.config.sync_timeout_ms / 1000,
    )
    failures = []
    for witness in witnesses:
        try:
            return read(witness, peers.post(witness, path, question))
        except PeerUnavailable as exc:
            failures.append(str(exc))
    return "no witness said which chains hold the patient's consents: " + (
        "; ".join(failures) or "the roster names no other witness"
    )


def consent_chains(svc: Services, asker: str, body: Any) -> dict[str, list[str]]:
    """A witness's answer to an ordinary member deciding an access request (``POST
    /peer/consent-chains``): the chains holding consent entries about the patient. Only for a
    question proven to be on its requester's chain (as the member it was put to checked), so
    no member learns anything about a patient without a recorded question."""
    if svc.config.node_id not in svc.chain_store.roster().witnesses():
        raise Conflict(f"{svc.config.node_id} is no witness: it holds only some chains")
    if not isinstance(body, dict) or not isinstance(body.get("requester"), str):
        raise InvalidRequest("the question is the access request, with its requester")
    question = {k: v for k, v in body.items() if k != "requester"}
    _, patient, _, _, _, _ = proven_request(svc, body["requester"], question, format_time())
    chains = {e["chain"] for e in svc.chain_store.entries_about(patient, CONSENT_TYPES)}
    return {"chains": sorted(chains)}


def proven_request(
    svc: Services, asker: str, body: Any, now: str
) -> tuple[str, str, str, list[str], str | None, str | None]:
    """An access request's fields (:func:`_parse_access_request`), once its ``asked`` proves
    that ``asker`` recorded the question on its own chain (:func:`check_question`, 403
    otherwise): nothing about a patient is looked up before."""
    request_id, patient, purpose, categories, reason, reason_code = _parse_access_request(body)
    check_question(
        body["asked"],
        asker=asker,
        request_id=request_id,
        patient=patient,
        purpose=purpose,
        categories=categories,
        roster_of=installed_roster_of(svc),
        now=parse_time(now),
    )
    return request_id, patient, purpose, categories, reason, reason_code


def _parse_access_request(body: Any) -> tuple[str, str, str, list[str], str | None, str | None]:
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
