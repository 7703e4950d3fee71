"""Record locator lookups (docs/spec.md §15.5): the registry's answer to "which members hold
results for this patient?", and the requester's use of it in a referral.

At the registry (:func:`lookup`, ``POST /peer/locator/lookup``): the question must be proven to
be on the requester's chain, as for any access request (:mod:`exchange.question`); the registry
then appends ``locator.lookup`` to its own chain — the request id, the patient's pseudonym, the
requester, the purpose and how many members it names, never which — and answers with the
holders. The lookup is thus an access event like the others: replicated to the witnesses,
shown in the patient's portal, and checked by the auditor against the recorded question.

At the requester (:func:`locate`): the registries of the roster are asked in turn; the first
answer decides whom the referral asks. With no registry in the roster, or none reachable, every
member is asked, and the note says so (the referral's Bundle carries it as an
OperationOutcome).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fhir_adapters.errors import Conflict
from ledger.errors import LedgerError, PeerUnavailable
from ledger.model import format_time
from node.consortium.locator import holders
from node.consortium.peers import SignedPeers
from node.flows.access_decision import proven_request
from node.records.audit_trail import Caller
from node.services import Services

LOOKUP_TYPE = "locator.lookup"
LOOKUP_SECONDS = 2.0  # at most this long for each registry asked, within the referral's time


def lookup(svc: Services, caller: Caller, asker: str, body: Any) -> dict[str, Any]:
    """The registry's answer to member ``asker``'s lookup (see the module docstring)."""
    roster = svc.chain_store.roster()
    if svc.config.node_id not in roster.registries():
        raise Conflict(f"{svc.config.node_id} runs no record locator (it has no registry role)")
    request_id, patient, purpose, categories, _, _ = proven_request(svc, asker, body, format_time())
    members = set(roster.member_ids()) - {asker}
    found = [m for m in holders(svc.database.engine, patient, categories) if m in members]
    seq = svc.consents.chain_writer().append(
        LOOKUP_TYPE,
        {
            "request_id": request_id,
            "patient": patient,
            "requester_org": asker,
            "purpose": purpose,
            "holders": len(found),
        },
    )
    svc.audit.record(
        caller.record(
            "operation",
            description=f"record locator: {asker} asked which members hold "
            f"{', '.join(categories)} ({purpose}); {len(found)} named",
        )
    )
    return {
        "request_id": request_id,
        "holders": found,
        "lookup": {"chain": svc.config.node_id, "seq": seq},
    }


@dataclass(frozen=True)
class Located:
    """Whom a referral asks, and what the requester's doctor is told about how they were
    found."""

    members: list[str]
    note: str


def locate(svc: Services, caller: Caller, peers: SignedPeers, question: dict[str, Any]) -> Located:
    """The members to ask for a patient's results (see the module docstring)."""
    roster = svc.chain_store.roster()
    own = svc.config.node_id
    everyone = [m for m in roster.member_ids() if m != own]
    registries = roster.registries()
    if not registries:
        return Located(everyone, "no record locator in the roster: every member was asked")
    failures = []
    for registry in registries:
        try:
            if registry == own:
                answer = lookup(svc, caller, own, question)
            else:
                answer = peers.fetch_json(
                    registry, "POST", "/peer/locator/lookup", question, LOOKUP_SECONDS
                )
            named = answer.get("holders") if isinstance(answer, dict) else None
            if not isinstance(named, list) or not all(isinstance(m, str) for m in named):
                raise PeerUnavailable(f"{registry} answered without a list of holders")
        except (PeerUnavailable, LedgerError, Conflict) as exc:
            failures.append(f"{registry}: {exc}")
            continue
        members = [m for m in everyone if m in set(named)]
        name = roster.member(registry).get("name", registry)
        return Located(
            members,
            f"the record locator ({name}) named {len(members)} member(s) holding records; "
            "only they were asked",
        )
    return Located(
        everyone,
        "the record locator could not be reached ("
        + "; ".join(failures)
        + "): every member was asked",
    )
