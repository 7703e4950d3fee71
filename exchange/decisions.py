"""The source's side of an access request (docs/spec.md §14, §15.3): decide it and say what
to record.

The decision reads the consent entries of the patient from every chain this node holds, each
up to the tree size it had when the decision began — that set of tree sizes is the ``view``
that ``access.decided`` records, so that an auditor who replays the decision over exactly
those entries (:func:`replay`) must reach the same result.

``access.decided`` carries, beyond the fields of docs/spec.md §13.2, what the replay needs and
the request held: ``patient`` (pseudonym), ``purpose``, ``categories``, ``decided_at`` (the time the
policy was evaluated at), ``reason_stated`` (whether an emergency reason was given; the text
itself stays off the ledger, as it may describe the patient's condition, and is kept in the
source's local AuditEvent, its SHA-256 and its code on the ledger in ``emergency.access``) and
``stale`` (the chains holding the patient's consents that could not be synced and were older
here than the staleness bound: such a request is denied).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from consent.policy import CONSENT_TYPES, AccessRequest, Decision, decide
from ledger.store import ChainStore


@dataclass(frozen=True)
class Decided:
    decision: Decision
    view: dict[str, int]  # chain -> tree size read
    stale: list[str] = field(default_factory=list)  # consent chains too old to decide on


def decide_access(
    store: ChainStore, request: AccessRequest, stale: Mapping[str, str] | None = None
) -> Decided:
    """Decide ``request`` over the consent entries this node holds now. ``stale``: chains
    holding the patient's consents that could not be brought up to date and whose copy here
    is older than the staleness bound, with why: the request is then denied."""
    view = {chain: head.tree_size for chain, head in sorted(store.heads().items())}
    if stale:
        return Decided(stale_decision(stale), view, sorted(stale))
    entries = in_view(store.entries_about(request.patient, CONSENT_TYPES), view)
    return Decided(decide(entries, request), view)


def stale_decision(stale: Mapping[str, str] | Iterable[str]) -> Decision:
    if isinstance(stale, Mapping):
        why = "; ".join(f"{chain}: {reason}" for chain, reason in sorted(stale.items()))
    else:
        why = ", ".join(sorted(stale))
    return Decision(
        "deny",
        (
            f"the chain(s) holding this patient's consents could not be synced and the copy here "
            f"is older than the staleness bound ({why})",
        ),
    )


def in_view(
    entries: Iterable[Mapping[str, Any]], view: Mapping[str, int]
) -> list[Mapping[str, Any]]:
    return [e for e in entries if e["seq"] < view.get(e["chain"], 0)]


def decided_body(
    request_id: str, request: AccessRequest, decided: Decided, released: list[str]
) -> dict[str, Any]:
    """The body of ``access.decided``."""
    decision = decided.decision
    return {
        "request_id": request_id,
        "requester_org": request.requester,
        "patient": request.patient,
        "purpose": request.purpose,
        "categories": list(request.categories),
        "decided_at": request.time,
        "reason_stated": bool((request.reason or "").strip()),
        "decision": decision.decision,
        "reason": decision.reason,
        "consent": decision.consent,
        "view": decided.view,
        "stale": decided.stale,
        "released": sorted(released),
    }


def emergency_body(request_id: str, request: AccessRequest) -> dict[str, Any]:
    """The body of ``emergency.access`` (break-glass), always flagged to auditor and patient."""
    return {
        "request_id": request_id,
        "patient": request.patient,
        "requester_org": request.requester,
        "purpose": request.purpose,
        "reason_code": request.reason_code,
        "reason_hash": hashlib.sha256((request.reason or "").strip().encode()).hexdigest(),
    }


def replay(body: Mapping[str, Any], entries: Iterable[Mapping[str, Any]]) -> Decision:
    """The decision the policy makes for a recorded ``access.decided`` over ``entries`` (the
    consent entries of its patient, which are cut to its view here). A decision that records
    stale consent chains is a deny, whatever the entries say."""
    if body.get("stale"):
        return stale_decision(body["stale"])
    request = AccessRequest(
        patient=str(body["patient"]),
        requester=str(body["requester_org"]),
        purpose=str(body["purpose"]),
        categories=tuple(body["categories"]),
        time=str(body["decided_at"]),
        reason="stated" if body.get("reason_stated") else None,
    )
    return decide(in_view(entries, body["view"]), request)
