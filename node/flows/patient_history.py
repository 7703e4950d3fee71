"""A patient's ledger history for the portal: the consents and accesses about them on every
chain (docs/spec.md §15.6).

A witness holds every chain (so does every member of a roster without roles) and reads the
history from its own copy. An ordinary member holds only its own chain and the consent chains
its decisions needed, so what other members recorded — a doctor's question there, a source's
decision, a registry's lookup — is not here. It asks a witness, the way any question about a
patient is asked (:mod:`exchange.question`): it first appends ``history.requested`` to its own
chain (the request id, the patient's pseudonym, this member: "the patient asked here who
accessed their records") and sends the proof of it with ``POST /peer/patient-history``. The
witness (:func:`answer_history`) checks the proof before it looks anything up and answers
with every entry about the patient, each with its inclusion proof in a block signed by the
entry's chain (:func:`ledger.receipt.entry_proof`). The member keeps only entries whose proof
holds under its own rosters and that are about this patient: a witness cannot make a member
say what it did not. It could leave entries out; the witnesses are the members trusted to
watch everything, and the spec says what that costs.

Cost: one signed request to one witness per page (or receipt) a patient opens, answered from
the witness's index by pseudonym; it grows with the patient's entries, not with the
consortium. Each one is an entry on the member's chain.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from consent.policy import CONSENT_TYPES
from consent.pseudonym import is_pseudonym
from exchange.question import HISTORY_TYPE, check_history_question
from fhir_adapters.errors import Conflict, InvalidRequest
from ledger import keys
from ledger.errors import LedgerError, PeerUnavailable, VerificationError
from ledger.model import format_time, parse_time
from ledger.receipt import check_entry_proof, entry_proof, make_receipt, receipt_of_proof
from ledger.store.chains import subject_of
from node.consortium.peers import SignedPeers
from node.flows.access_decision import installed_roster_of, witnesses_in_turn
from node.records.audit_trail import Caller
from node.services import Services

ACCESS_TYPES = (
    "access.requested",
    "access.decided",
    "emergency.access",
    "locator.lookup",
    "images.read",
)
HISTORY_TYPES = (*CONSENT_TYPES, *ACCESS_TYPES, HISTORY_TYPE)  # what the history holds
MOST_ENTRIES = 2000  # a witness sends at most the newest this many (and says so)
ASK_SECONDS = 5.0  # for each witness asked


@dataclass(frozen=True)
class History:
    """The entries about a patient (sorted by time), where the ones held elsewhere came from,
    and what is missing."""

    entries: list[dict[str, Any]]
    witness: str | None = None  # the witness that sent the entries held elsewhere
    missing: str | None = None  # why some may be missing (None: nothing known to be)
    proofs: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)


def history(svc: Services, patient: str) -> History:
    """Every entry about ``patient`` (a pseudonym) on the consortium's chains, asked of a
    witness when this member is none (see the module docstring)."""
    own = svc.config.node_id
    roster = svc.chain_store.roster()
    if own in roster.witnesses():
        return History(_sorted(svc.chain_store.entries_about(patient, HISTORY_TYPES)))
    try:
        asked = _record_question(svc, patient)
    except LedgerError as exc:
        return History(
            _sorted(svc.chain_store.entries_about(patient, HISTORY_TYPES)),
            missing=f"the question could not be recorded: {exc}",
        )
    local = svc.chain_store.entries_about(patient, HISTORY_TYPES)  # the question among them
    held = {(e["chain"], e["seq"]) for e in local}
    failures = []
    for witness in witnesses_in_turn(roster.witnesses(), patient, own):
        try:
            proofs, missing = _ask(svc, witness, patient, asked)
        except (PeerUnavailable, VerificationError) as exc:
            failures.append(str(exc))
            continue
        remote = {k: p for k, p in proofs.items() if k not in held}
        entries = local + [p["entry"] for p in remote.values()]
        return History(_sorted(entries), witness, missing, remote)
    return History(
        _sorted(local),
        missing="no witness sent the entries other members hold: "
        + ("; ".join(failures) or "the roster names no other witness"),
    )


def receipt(svc: Services, patient: str, chain: str, seq: int) -> dict[str, Any]:
    """The receipt of entry ``seq`` of ``chain`` when it is about ``patient``: from this
    node's copy, or built from the proof a witness sends (without a certificate). LookupError
    when there is no such entry about the patient."""
    held = {(e["chain"], e["seq"]) for e in svc.chain_store.entries_about(patient, HISTORY_TYPES)}
    try:
        if (chain, seq) in held:
            return make_receipt(svc.chain_store, chain, seq)
        proof = history(svc, patient).proofs.get((chain, seq))
        if proof is None:
            raise LookupError(f"no entry {chain}:{seq} about this patient")
        return receipt_of_proof(svc.chain_store, proof)
    except LedgerError as exc:
        raise LookupError(str(exc)) from None


def _sorted(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(entries, key=lambda e: (e["time"], e["chain"], e["seq"]))


def _record_question(svc: Services, patient: str) -> dict[str, Any]:
    """Append ``history.requested`` to this node's chain; the proof of it."""
    own = svc.config.node_id
    seq = svc.consents.chain_writer().append(
        HISTORY_TYPE, {"request_id": str(uuid.uuid4()), "patient": patient, "requester_org": own}
    )
    return entry_proof(svc.chain_store, own, seq)


def _ask(
    svc: Services, witness: str, patient: str, asked: dict[str, Any]
) -> tuple[dict[tuple[str, int], dict[str, Any]], str | None]:
    """The entries a witness sends, by (chain, seq), each with its proof checked, and what
    the witness said it left out; VerificationError when any proof fails or is about another
    patient (the whole answer is then put aside and the next witness asked)."""
    peers = SignedPeers(
        svc.chain_store,
        svc.config.node_id,
        keys.load_private_key(svc.config.ed25519_key),
        timeout=ASK_SECONDS,
    )
    body = asked["entry"]["body"]
    answer = peers.post(
        witness,
        "/peer/patient-history",
        {"request_id": body["request_id"], "patient": patient, "asked": asked},
    )
    sent = answer.get("entries") if isinstance(answer, dict) else None
    if not isinstance(sent, list):
        raise PeerUnavailable(f"{witness} answered without a list of entries")
    roster_of = installed_roster_of(svc)
    proofs = {}
    for proof in sent:
        try:
            entry = check_entry_proof(proof, roster_of)
        except Conflict as exc:  # a roster version not installed here yet
            raise VerificationError(f"{witness} sent an entry under {exc}") from None
        if entry["type"] not in HISTORY_TYPES or subject_of(entry["body"]) != patient:
            raise VerificationError(
                f"{witness} sent entry {entry['chain']}:{entry['seq']}, not about this patient"
            )
        proofs[(entry["chain"], entry["seq"])] = proof
    if answer.get("complete") is False:
        return proofs, f"{witness} sent only the newest {len(sent)} entries"
    return proofs, None


def answer_history(svc: Services, caller: Caller, asker: str, body: Any) -> dict[str, Any]:
    """A witness's answer to an ordinary member whose patient asked, in its portal, who
    accessed their records (``POST /peer/patient-history``): the entries about the patient on
    every chain with their proofs, once the question is proven to be on the asker's chain."""
    if svc.config.node_id not in svc.chain_store.roster().witnesses():
        raise Conflict(f"{svc.config.node_id} is no witness: it holds only some chains")
    if not isinstance(body, dict) or set(body) != {"request_id", "patient", "asked"}:
        raise InvalidRequest('the question is {"request_id", "patient", "asked"}')
    request_id, patient = body["request_id"], body["patient"]
    if not isinstance(request_id, str) or not re.fullmatch(r"[A-Za-z0-9\-]{8,64}", request_id):
        raise InvalidRequest("request_id must be 8-64 letters, digits or -")
    if not is_pseudonym(patient):
        raise InvalidRequest("patient must be a pseudonym (64 lowercase hex digits)")
    check_history_question(
        body["asked"],
        asker=asker,
        request_id=request_id,
        patient=patient,
        roster_of=installed_roster_of(svc),
        now=parse_time(format_time()),
    )
    entries = _sorted(svc.chain_store.entries_about(patient, HISTORY_TYPES))
    sent = entries[-MOST_ENTRIES:]
    svc.audit.record(
        caller.record(
            "operation",
            description=f"{asker} asked, for a patient in its portal, who accessed their "
            f"records; {len(sent)} ledger entries sent",
        )
    )
    return {
        "request_id": request_id,
        "entries": [entry_proof(svc.chain_store, e["chain"], e["seq"]) for e in sent],
        "complete": len(sent) == len(entries),
    }
