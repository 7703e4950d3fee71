"""The consent policy of docs/spec.md §14.2, as a pure function of ledger entries and one request.

Deny by default. A request is permitted when an *effective* consent of the same patient
lists the requester (or ``*``), the purpose and every requested category, and the request
time lies in its period. A consent is identified by the chain that recorded it and its
``consent_id``; of its entries the newest (highest seq on that chain) is its state: a
``consent.granted`` supersedes every earlier grant of the same consent (that is how a
patient narrows one), a ``consent.revoked`` ends it, and a later grant re-activates it.

Emergency treatment (``ETREAT``, break-glass) always needs a stated reason. With one, it is
permitted under a consent that covers it, and otherwise without consent; either way the
decision is flagged ``emergency`` so that it is recorded as ``emergency.access`` and shown to
the auditor and to the patient.

The same function decides at the source node and in the auditor's replay: given the entries
of the ``view`` an ``access.decided`` records, it must reach the recorded decision. It reads
no clock: the request carries its time. Every reason it gives names consents by chain and
seq and never carries anything about the patient.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from consent.model import EMERGENCY, PURPOSES

GRANTED = "consent.granted"
REVOKED = "consent.revoked"
CONSENT_TYPES = (GRANTED, REVOKED)


@dataclass(frozen=True)
class AccessRequest:
    patient: str  # pseudonym
    requester: str  # the requesting member's id
    purpose: str
    categories: tuple[str, ...]
    time: str  # ledger time of the request
    reason: str | None = None  # the stated reason, required for ETREAT
    reason_code: str | None = None  # its code (consent.model.EMERGENCY_REASONS)


@dataclass(frozen=True)
class Decision:
    decision: str  # "permit" or "deny"
    reasons: tuple[str, ...]  # the first is the summary; every consent that did not apply follows
    consent: dict[str, Any] | None = None  # {"chain", "seq"} of the grant relied on
    emergency: bool = False

    @property
    def permitted(self) -> bool:
        return self.decision == "permit"

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


@dataclass
class _Consent:
    chain: str
    consent_id: str
    entry: Mapping[str, Any]  # the newest entry: its state
    superseded: list[int] = field(default_factory=list)  # seqs of earlier grants


def effective_consents(entries: Iterable[Mapping[str, Any]], patient: str) -> list[_Consent]:
    """The newest entry of each of the patient's consents, ordered by chain and seq."""
    consents: dict[tuple[str, str], _Consent] = {}
    for entry in entries:
        body = entry.get("body") or {}
        if entry.get("type") not in CONSENT_TYPES or body.get("patient") != patient:
            continue
        key = (entry["chain"], str(body.get("consent_id")))
        known = consents.get(key)
        if known is None:
            consents[key] = _Consent(key[0], key[1], entry)
        elif entry["seq"] > known.entry["seq"]:
            if known.entry["type"] == GRANTED:
                known.superseded.append(known.entry["seq"])
            known.entry = entry
        elif entry["type"] == GRANTED:
            known.superseded.append(entry["seq"])
    return sorted(consents.values(), key=lambda c: (c.chain, c.entry["seq"]))


def _why_not(consent: _Consent, request: AccessRequest) -> str | None:
    """Why this consent does not permit the request; None when it does."""
    entry = consent.entry
    name = f"consent {consent.consent_id} ({consent.chain} seq {entry['seq']})"
    if entry["type"] == REVOKED:
        return f"{name} was revoked at {entry['time']}"
    body = entry["body"]
    period = body.get("period") or {}
    start, end = period.get("start"), period.get("end")
    if isinstance(start, str) and request.time < start:
        return f"{name} is valid only from {start}"
    if isinstance(end, str) and request.time > end:
        return f"{name} expired at {end}"
    grantees = body.get("grantees") or []
    if "*" not in grantees and request.requester not in grantees:
        return f"{name} does not grant {request.requester}"
    if request.purpose not in (body.get("purposes") or []):
        return f"{name} does not cover purpose {request.purpose}"
    missing = [c for c in request.categories if c not in (body.get("categories") or [])]
    if missing:
        return f"{name} does not cover {', '.join(missing)}"
    return None


def decide(entries: Iterable[Mapping[str, Any]], request: AccessRequest) -> Decision:
    """Permit or deny ``request`` given the consent entries in view, with every reason."""
    if request.purpose not in PURPOSES:
        return Decision(
            "deny", (f"purpose {request.purpose!r} is not one of {', '.join(PURPOSES)}",)
        )
    if not request.categories:
        return Decision("deny", ("the request names no data category",))
    emergency = request.purpose == EMERGENCY
    stated = (request.reason or "").strip()
    if emergency and not stated:
        return Decision(
            "deny", ("emergency access (ETREAT) needs a stated reason",), emergency=False
        )
    not_applying: list[str] = []
    for consent in effective_consents(entries, request.patient):
        why = _why_not(consent, request)
        if why is None:
            entry = consent.entry
            summary = (
                f"permitted by consent {consent.consent_id} ({consent.chain} seq {entry['seq']})"
            )
            if consent.superseded:
                summary += " superseding seq " + ", ".join(map(str, consent.superseded))
            if emergency:
                summary = "emergency access (break-glass) " + summary
            return Decision(
                "permit",
                (summary,),
                {"chain": consent.chain, "seq": entry["seq"]},
                emergency,
            )
        not_applying.append(why)
    if emergency:
        return Decision(
            "permit",
            ("emergency access (break-glass) without consent, with a stated reason", *not_applying),
            None,
            True,
        )
    summary = (
        "no consent of this patient is recorded"
        if not not_applying
        else "no consent permits this request"
    )
    return Decision("deny", (summary, *not_applying))
