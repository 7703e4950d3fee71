"""The requester's side of a referral (docs/spec.md §15.4): ask every member for a patient's prior
results in parallel, and make one FHIR searchset of what came back.

Each member is asked for the records (``POST /peer/access``, with the proof that the question
is on the requester's chain: :mod:`exchange.question`), within one deadline; a member that
holds none for the patient's pseudonym says only that. The answers become a Bundle in which:

- every released resource keeps its source: ``fullUrl`` and ``meta.source`` at the member,
  and a Provenance (``search.mode`` include) naming the member and the ``access.decided``
  entry that released it, with the resource's SHA-256 as the ledger has it;
- every result carries a recognition verdict (:mod:`exchange.recognition`) as the extension
  :data:`RECOGNITION_URL`: recognised, the mark ``HR``, the item, its price in fen, until when
  it stays valid, and every reason;
- every member that timed out, could not be reached or denied has an OperationOutcome entry
  (``search.mode`` outcome) saying so: a partial answer never looks complete.

The transport is given (``post(member, path, body, timeout) -> bytes``), so this module knows
nothing of HTTP signing; the node passes its signed client.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from consent.model import MEMBER_SYSTEM
from exchange.reading import ReportSignatureError, read_by
from exchange.recognition import Rules, result_of, verdict
from fhir_adapters.errors import FhirError
from fhir_adapters.store import jsonio
from ledger.errors import LedgerError, PeerTimeout

RECOGNITION_URL = "urn:hrx:fhir:StructureDefinition:mutual-recognition"
LEDGER_POLICY = "urn:hrx:ledger"  # urn:hrx:ledger:<chain>:<seq> names an entry

Post = Callable[[str, str, dict[str, Any], float], bytes]
FAN_OUT_THREADS = 32  # members asked at once, over all of a process's requests


@dataclass
class MemberAnswer:
    member: str
    outcome: str  # released | denied | no-records | timeout | unreachable | invalid
    message: str = ""
    decision: dict[str, Any] = field(default_factory=dict)
    resources: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def ask_member(post: Post, member: str, request: Mapping[str, Any], timeout: float) -> MemberAnswer:
    """One member: what does it release (or does it hold no records)?"""
    started = time.monotonic()

    def left() -> float:
        return max(0.05, timeout - (time.monotonic() - started))

    try:
        answer = jsonio.parse(post(member, "/peer/access", dict(request), left()))
    except PeerTimeout as exc:
        return MemberAnswer(member, "timeout", str(exc), seconds=time.monotonic() - started)
    except LedgerError as exc:
        return MemberAnswer(member, "unreachable", str(exc), seconds=time.monotonic() - started)
    except FhirError as exc:
        return MemberAnswer(member, "invalid", f"{member} sent what is not JSON: {exc}")
    if isinstance(answer, dict) and answer.get("holds") is False:
        return MemberAnswer(member, "no-records", seconds=time.monotonic() - started)
    if not isinstance(answer, dict) or answer.get("decision") not in ("permit", "deny"):
        return MemberAnswer(member, "invalid", f"{member} answered without a decision")
    resources = answer.pop("resources", [])
    seconds = time.monotonic() - started
    if answer["decision"] == "deny":
        reasons = "; ".join(str(r) for r in answer.get("reasons", []))
        return MemberAnswer(member, "denied", reasons, answer, seconds=seconds)
    return MemberAnswer(member, "released", "", answer, list(resources), seconds)


_pools: dict[int, ThreadPoolExecutor] = {}  # by process: threads do not survive a fork
_pools_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """This process's fan-out threads. They outlive a request, so each keeps its connections
    to the members open (a new TCP connection per member per request cost more than the
    members' answers on loopback)."""
    with _pools_lock:
        pool = _pools.get(os.getpid())
        if pool is None:
            pool = _pools[os.getpid()] = ThreadPoolExecutor(
                max_workers=FAN_OUT_THREADS, thread_name_prefix="referral"
            )
        return pool


def fan_out(
    post: Post, members: Sequence[str], request: Mapping[str, Any], timeout: float
) -> list[MemberAnswer]:
    """Ask every member at once; a member still silent at the deadline is a timeout (its
    request goes on until its own timeout, on a thread of the pool, and is then dropped)."""
    if not members:
        return []
    pool = _pool()
    futures = {
        member: pool.submit(ask_member, post, member, request, timeout) for member in members
    }
    deadline = time.monotonic() + timeout + 0.5
    answers = []
    for member, future in futures.items():
        try:
            answers.append(future.result(max(0.0, deadline - time.monotonic())))
        except FutureTimeout:
            answers.append(
                MemberAnswer(member, "timeout", f"{member} did not answer within {timeout:g} s")
            )
            future.cancel()  # if it never started: the pool was busy with others' requests
    return answers


def resource_hash(resource: Mapping[str, Any]) -> str:
    """The SHA-256 of a resource as its source stores it (compact FHIR JSON, keys as given)."""
    return hashlib.sha256(jsonio.dump(dict(resource))).hexdigest()


def matches_code(resource: Mapping[str, Any], codes: Sequence[str]) -> bool:
    """Whether a result has one of ``codes`` (``system|code`` or a bare code; for imaging
    studies, a modality)."""
    if not codes:
        return True
    found: set[str] = set()
    for coding in (resource.get("code") or {}).get("coding", []):
        found |= {str(coding.get("code")), f"{coding.get('system')}|{coding.get('code')}"}
    for series in resource.get("series", []):
        found.add(str((series.get("modality") or {}).get("code")))
    for modality in resource.get("modality", []):
        found.add(str(modality.get("code")))
    return bool(found & set(codes))


def recognition_extension(found: Any) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"url": "recognised", "valueBoolean": found.recognised}]
    if found.mark:
        parts.append({"url": "mark", "valueCode": found.mark})
    if found.item is not None:
        parts.append({"url": "item", "valueCode": found.item.id})
        parts.append({"url": "priceFen", "valueInteger": found.item.price_fen})
    if found.valid_until is not None:
        parts.append({"url": "validUntil", "valueDate": found.valid_until.isoformat()})
    for reason in found.reasons:
        parts.append(
            {
                "url": "reason",
                "extension": [
                    {"url": "code", "valueCode": reason.code},
                    {"url": "met", "valueBoolean": reason.positive},
                    {"url": "text", "valueString": reason.text},
                ],
            }
        )
    return {"url": RECOGNITION_URL, "extension": parts}


OUTCOME_SYSTEM = "urn:hrx:prior-results-outcome"  # timeout, unreachable, invalid, denied
REASON_URL = "urn:hrx:fhir:StructureDefinition:decision-reason"  # each of a denial's reasons


def _reasons_of(answer: MemberAnswer) -> dict[str, Any]:
    """A denial's reasons, each as written by the source's policy, as extensions of its
    issue (the diagnostics join them; a page shows each in its reader's language)."""
    reasons = (answer.decision or {}).get("reasons") if answer.outcome == "denied" else None
    if not isinstance(reasons, list) or not reasons:
        return {}
    return {"extension": [{"url": REASON_URL, "valueString": str(r)[:500]} for r in reasons[:20]]}


OUTCOME_CODES = {
    "timeout": ("error", "timeout"),
    "unreachable": ("error", "transient"),
    "invalid": ("error", "exception"),
    "denied": ("warning", "forbidden"),
}


def prior_results_bundle(
    answers: Sequence[MemberAnswer],
    *,
    rules: Rules,
    members: Mapping[str, Mapping[str, Any]],
    here: str,
    today: date,
    codes: Sequence[str],
    recorded: str,
    self_link: str,
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    """The searchset of every member's answer (see the module docstring); ``notes``: what
    the doctor should know of how the members asked were chosen, as informational
    OperationOutcomes."""
    entries: list[dict[str, Any]] = []
    includes: list[dict[str, Any]] = []
    outcomes: list[dict[str, Any]] = [
        {
            "resource": {
                "resourceType": "OperationOutcome",
                "issue": [
                    {"severity": "information", "code": "informational", "diagnostics": note}
                ],
            },
            "search": {"mode": "outcome"},
        }
        for note in notes
    ]
    for answer in answers:
        member = members.get(answer.member, {"id": answer.member})
        base = str(member.get("url", "")).rstrip("/") + "/fhir"
        if answer.outcome in OUTCOME_CODES:
            severity, code = OUTCOME_CODES[answer.outcome]
            outcomes.append(
                {
                    "resource": {
                        "resourceType": "OperationOutcome",
                        "issue": [
                            {
                                "severity": severity,
                                "code": code,
                                "details": {  # for pages: which member, what happened
                                    "coding": [
                                        {"system": MEMBER_SYSTEM, "code": answer.member},
                                        {"system": OUTCOME_SYSTEM, "code": answer.outcome},
                                    ]
                                },
                                "diagnostics": f"{answer.member}: {answer.outcome}: "
                                f"{answer.message}"[:1000],
                                **_reasons_of(answer),
                            }
                        ],
                    },
                    "search": {"mode": "outcome"},
                }
            )
            continue
        decided = answer.decision.get("decided") or {}
        policy = f"{LEDGER_POLICY}:{decided.get('chain')}:{decided.get('seq')}"
        for resource in answer.resources:
            if not matches_code(resource, codes):
                continue
            full_url = f"{base}/{resource.get('resourceType')}/{resource.get('id')}"
            digest = resource_hash(resource)
            found = verdict(
                rules,
                result_of(resource, rules.zone),
                member,
                members.get(here, {}),
                today,
                reading_of(resource, members),
            )
            shown = dict(resource)
            shown["meta"] = {**dict(resource.get("meta") or {}), "source": full_url}
            shown["extension"] = [
                *[e for e in resource.get("extension", []) if e.get("url") != RECOGNITION_URL],
                recognition_extension(found),
            ]
            entries.append({"fullUrl": full_url, "resource": shown, "search": {"mode": "match"}})
            includes.append(
                {
                    "resource": {
                        "resourceType": "Provenance",
                        "target": [{"reference": full_url}],
                        "recorded": recorded,
                        "policy": [policy],
                        "agent": [
                            {
                                "who": {
                                    "identifier": {
                                        "system": MEMBER_SYSTEM,
                                        "value": answer.member,
                                    },
                                    "display": str(member.get("name", answer.member)),
                                }
                            }
                        ],
                        "entity": [
                            {
                                "role": "source",
                                "what": {
                                    "reference": full_url,
                                    "identifier": {
                                        "system": "urn:ietf:rfc:3986",
                                        "value": f"urn:sha256:{digest}",
                                    },
                                },
                            }
                        ],
                    },
                    "search": {"mode": "include"},
                }
            )
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(entries),
        "link": [{"relation": "self", "url": self_link}],
        "entry": entries + includes + outcomes,
    }


def reading_of(
    resource: Mapping[str, Any], members: Mapping[str, Mapping[str, Any]]
) -> tuple[Mapping[str, Any] | None, str | None]:
    """For a report read remotely: the reading member's roster entry, or why its reading
    signature does not hold; (None, None) for any other result."""
    try:
        reader = read_by(resource, members)
    except ReportSignatureError as exc:
        return None, str(exc)
    return (members[reader], None) if reader is not None else (None, None)
