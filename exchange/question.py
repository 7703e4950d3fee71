"""A member's question about a patient, and the proof that the asker put it on its own chain.

Whether a hospital holds records for a person is itself sensitive (a psychiatric or an
infectious-disease hospital says much by answering "yes"), and every member can compute any
resident's pseudonym. So no member answers a question about a patient, not even "I hold
nothing", unless the question is on the asker's chain first: the asker appends
``access.requested`` (the pseudonym, the asking member and doctor, the purpose, the
categories) and sends, with its signed request, the entry with its inclusion proof in a block
it signed (:func:`ledger.receipt.entry_proof`). The member asked checks that proof against its
own rosters (:func:`check_question`) before it looks the pseudonym up. A member can then never
learn where a patient is treated without a signed entry on its own chain saying that it asked,
for which purpose: replicated to the witnesses, shown to the patient in the portal beside the
other accesses, and verified by the auditor. Withdrawing it later would be a fork.

A patient's own question — who accessed my records? — asked in the portal of a member that
holds only some chains is proven the same way, by a ``history.requested`` entry on that
member's chain (:func:`check_history_question`).

The check is cheap (one Ed25519 signature and a Merkle path of at most 64 hashes) and holds
no state: it scales with nothing but the asker's chain length (logarithmically).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from consent.model import PURPOSES
from fhir_adapters.errors import Forbidden
from ledger.errors import LedgerError, VerificationError
from ledger.model import parse_time
from ledger.receipt import check_entry_proof
from ledger.roster import Roster

QUESTION_TYPE = "access.requested"
HISTORY_TYPE = "history.requested"  # a patient's own question, asked in a member's portal
MAX_AGE = timedelta(minutes=10)  # a question is answered within minutes of being recorded
CLOCK_SKEW = timedelta(minutes=5)  # how far the asker's clock may run ahead of ours


def check_question(
    asked: Any,
    *,
    asker: str,
    request_id: str,
    patient: str,
    purpose: str,
    categories: Sequence[str],
    roster_of: Callable[[int], Roster],
    now: datetime,
) -> dict[str, Any]:
    """The asker's ``access.requested`` entry, once ``asked`` proves that ``asker`` signed it
    on its own chain, recently, for exactly this request: the same request id, patient and
    purpose, and at least these categories. Forbidden (403) naming what does not hold."""
    if purpose not in PURPOSES:
        raise Forbidden(f"purpose {purpose!r} is not one of {', '.join(PURPOSES)}")
    entry = _recorded(asked, QUESTION_TYPE, asker, request_id, patient, roster_of, now)
    body = entry["body"]
    if body.get("purpose") != purpose:
        raise Forbidden(
            f"the recorded question states purpose {body.get('purpose')!r}, not {purpose!r}"
        )
    recorded = body.get("categories")
    if not isinstance(recorded, list) or not set(categories) <= set(recorded):
        raise Forbidden("the request asks for categories the recorded question does not name")
    return entry


def check_history_question(
    asked: Any,
    *,
    asker: str,
    request_id: str,
    patient: str,
    roster_of: Callable[[int], Roster],
    now: datetime,
) -> dict[str, Any]:
    """The asker's ``history.requested`` entry (a patient asked, in the asker's portal, who
    accessed their records), once ``asked`` proves it as :func:`check_question` proves a
    question; Forbidden (403) naming what does not hold."""
    return _recorded(asked, HISTORY_TYPE, asker, request_id, patient, roster_of, now)


def _recorded(
    asked: Any,
    entry_type: str,
    asker: str,
    request_id: str,
    patient: str,
    roster_of: Callable[[int], Roster],
    now: datetime,
) -> dict[str, Any]:
    """The entry ``asked`` proves: of ``entry_type``, signed on ``asker``'s own chain within
    the last minutes, with this request id and patient."""
    try:
        entry = check_entry_proof(asked, roster_of)
    except (VerificationError, LedgerError) as exc:
        raise Forbidden(f"the question is not proven to be on {asker}'s chain: {exc}") from None
    body = entry["body"]
    if entry["chain"] != asker or entry["type"] != entry_type:
        raise Forbidden(
            f"the proof is of an entry of type {entry['type']} on {entry['chain']}'s chain, "
            f"not of an entry of type {entry_type} on the chain of {asker}, who asks"
        )
    if body.get("request_id") != request_id or body.get("patient") != patient:
        raise Forbidden("the recorded question is about another request or another patient")
    moment = parse_time(entry["time"], "the question's time")
    if not now - MAX_AGE <= moment <= now + CLOCK_SKEW:
        raise Forbidden(
            f"the question was recorded at {entry['time']}: more than "
            f"{MAX_AGE.seconds // 60} minutes from now; record it again"
        )
    return entry
