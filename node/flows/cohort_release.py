"""The source's side of a member's bulk export (``POST /peer/export``): another member asks
for the results of a cohort of patients at once, and this node decides each patient with the
consent policy exactly as it decides one access request (:mod:`node.flows.access_decision`).

The request names a purpose, categories, optionally a time (only results changed after it,
except for a patient whose permitting consent was granted after it: all of theirs) and the
types wanted, and up to :data:`MOST_REQUESTS` patients, each as an access request of
its own: a request id, the pseudonym and the proof that the asker recorded
``access.requested`` for it on its own chain. Every proof is checked before anything about any
patient is looked up; one that fails refuses the whole call (403) and nothing is recorded.

Then, for each patient this node holds, the consent chains are brought up to date (each chain
once for the whole cohort), the policy decides, and ``access.decided`` is recorded with the
hashes of what is released: all the cohort's decisions in one block. The answer streams as
NDJSON: a first line with the decisions (for each request: whether this node holds the
patient, the decision, its reasons, where it is recorded and the released hashes), then each
released resource as the bytes it is stored as, one a line, read back by the versions the
decisions name (a result changed meanwhile goes out as the version whose hash is recorded).
Memory holds the cohort's version numbers and hashes, never its resources.

Each patient's decision is also an AuditEvent of its own (what was released for that patient
only), so a patient reading the trail in the portal learns nothing of the rest of the cohort.

Cost: per call, one signature check and one Merkle path per patient, one consent sync per
consent chain involved (an ordinary member asks a witness which chains those are, once for
the call), one block appended, and the released rows read twice (once to decide and hash,
once to send). Nothing grows with the number of members.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from consent.model import EMERGENCY
from consent.policy import CONSENT_TYPES, AccessRequest
from exchange.decisions import decide_access, decided_body
from exchange.recognition import result_of
from fhir_adapters.errors import Conflict, InvalidRequest
from fhir_adapters.store import Stored
from ledger.canonical import canonical_bytes
from ledger.errors import PeerUnavailable
from ledger.model import format_time, parse_time
from node.flows.access_decision import (
    RESULT_TYPES,
    ZONE,
    ask_witnesses,
    proven_request,
    sync_chains,
    witnesses_in_turn,
)
from node.records.audit_trail import Caller
from node.records.pseudonym_index import patients_with
from node.services import Services

MOST_REQUESTS = 200  # patients in one call (the asker sends a larger cohort in several)
READ_BATCH = 500  # released versions read back at once


@dataclass(frozen=True)
class Release:
    """The first line of the answer (the decisions), the versions it releases as (res_pk,
    version) pairs in the order they are sent, and each decision made ("permit", "deny")."""

    head: bytes
    versions: list[tuple[int, int]]
    decided: list[str]


def parse_cohort(body: Any) -> tuple[str, list[str], int | None, list[str], list[dict[str, Any]]]:
    """The purpose, categories, ``since`` (µs or None), types and access requests of a
    cohort export request; 400 naming what is wrong."""
    if not isinstance(body, dict):
        raise InvalidRequest("a cohort export request is a JSON object")
    unknown = set(body) - {"purpose", "categories", "since", "types", "requests"}
    if unknown:
        raise InvalidRequest(f"a cohort export request has no field(s) {sorted(unknown)}")
    purpose, categories = body.get("purpose"), body.get("categories")
    if purpose == EMERGENCY:
        raise InvalidRequest(
            f"emergency access ({EMERGENCY}) is asked for one patient at a time, with its "
            "reason, never for a cohort"
        )
    since = body.get("since")
    if since is not None and (not isinstance(since, int) or isinstance(since, bool)):
        raise InvalidRequest("since is a time in microseconds since the epoch, or null")
    types = body.get("types", list(RESULT_TYPES))
    if not isinstance(types, list) or not types or not all(t in RESULT_TYPES for t in types):
        raise InvalidRequest(f"types must be some of {', '.join(RESULT_TYPES)}")
    requests = body.get("requests")
    if not isinstance(requests, list) or not 0 < len(requests) <= MOST_REQUESTS:
        raise InvalidRequest(f"requests must be 1-{MOST_REQUESTS} access requests")
    asked = []
    for item in requests:
        if not isinstance(item, dict) or set(item) != {"request_id", "patient", "asked"}:
            raise InvalidRequest('each request is {"request_id", "patient", "asked"}')
        asked.append({**item, "purpose": purpose, "categories": categories})
    for name in ("request_id", "patient"):
        if len({str(item[name]) for item in asked}) != len(asked):
            raise InvalidRequest(f"two requests of the cohort have one {name}")
    return str(purpose), list(categories or []), since, list(types), asked


def release_cohort(svc: Services, caller: Caller, asker: str, body: Any) -> Release:
    """Decide member ``asker``'s cohort export request ``body`` (see the module docstring)."""
    purpose, _, since, types, items = parse_cohort(body)
    now = format_time()
    proven = [proven_request(svc, asker, item, now) for item in items]  # 403 before any lookup
    categories = proven[0][3]
    found = []  # (request, pseudonym, local patient ids)
    decisions: dict[str, dict[str, Any]] = {}
    for request_id, patient, *_ in proven:
        decisions[request_id] = {"request_id": request_id, "holds": False}
        local = patients_with(svc.database.engine, patient)
        if local:
            found.append((request_id, patient, local))
    learned = _consent_chains(svc, asker, body, found)
    held = [(r, patient, local, learned[r]) for r, patient, local in found]
    involved = set().union(*(c for *_, c in held if not isinstance(c, str)))
    stale = sync_chains(svc, involved, held[0][1]) if held else {}
    entries, audits, versions = [], [], []
    for request_id, patient, local, chains in held:
        access = AccessRequest(patient, asker, purpose, tuple(categories), now)
        why = (
            {"*": chains} if isinstance(chains, str) else {c: stale[c] for c in chains & set(stale)}
        )
        decided = decide_access(svc.chain_store, access, why)
        released = []
        if decided.decision.permitted:
            newer = _granted_after(svc, decided.decision.consent, since)
            released = _released(svc, local, categories, types, None if newer else since)
        hashes = sorted(stored.sha256() for stored in released)
        entries.append(("access.decided", decided_body(request_id, access, decided, hashes)))
        decisions[request_id] = {
            "request_id": request_id,
            "holds": True,
            "decision": decided.decision.decision,
            "reasons": list(decided.decision.reasons),
            "consent": decided.decision.consent,
            "view": decided.view,
            "released": hashes,
        }
        versions += [(int(stored.res_pk or 0), stored.version) for stored in released]
        named = [replace(stored, body=None) for stored in released]  # the audit names them only
        audits.append((request_id, local, decided.decision, named))
    seqs = svc.consents.chain_writer().append_many(entries) if entries else []
    for seq, (request_id, local, decision, named) in zip(seqs, audits, strict=True):
        decisions[request_id]["decided"] = {"chain": svc.config.node_id, "seq": seq}
        svc.audit.record(
            caller.record(
                "operation",
                outcome="0" if decision.permitted else "4",
                description=(
                    f"{asker} exported {', '.join(categories)} ({purpose}) of a cohort; "
                    f"{decision.decision}: {decision.reason}"
                ),
                entities=named,
                patients=set(local),
            )
        )
    return Release(
        canonical_bytes({"decisions": list(decisions.values())}),
        list(dict.fromkeys(versions)),  # a resource in two patients' compartments goes once
        [decision.decision for _, _, decision, _ in audits],
    )


def _consent_chains(
    svc: Services, asker: str, body: dict[str, Any], found: list[tuple[str, str, list[str]]]
) -> dict[str, set[str] | str]:
    """For each request of a patient held here, the other members' chains holding the
    patient's consents, or why they could not be learned. A witness knows them from its own
    copy of every chain; an ordinary member asks a witness once for the whole batch
    (``POST /peer/consent-chains/cohort``, the request as asked, cut to the patients held
    here), in turn as for one patient."""
    own = svc.config.node_id
    chains: dict[str, set[str] | str] = {
        request_id: {e["chain"] for e in svc.chain_store.entries_about(patient, CONSENT_TYPES)}
        - {own}
        for request_id, patient, _ in found
    }
    roster = svc.chain_store.roster()
    if not found or own in roster.witnesses():
        return chains
    asked = {request_id for request_id, _, _ in found}
    question = {
        **body,
        "requests": [r for r in body["requests"] if r["request_id"] in asked],
        "requester": asker,
    }

    def chains_by_request(witness: str, answer: Any) -> dict[str, set[str]]:
        named = answer.get("chains") if isinstance(answer, dict) else None
        if (
            not isinstance(named, dict)
            or set(named) != asked
            or not all(
                isinstance(c, list) and all(isinstance(x, str) for x in c) for c in named.values()
            )
        ):
            raise PeerUnavailable(f"{witness} did not name the chains of each patient asked")
        return {request_id: set(c) for request_id, c in named.items()}

    witnesses = witnesses_in_turn(roster.witnesses(), found[0][1], own)
    learned = ask_witnesses(
        svc, witnesses, "/peer/consent-chains/cohort", question, chains_by_request
    )
    for request_id, known in chains.items():
        assert isinstance(known, set)
        chains[request_id] = (
            learned if isinstance(learned, str) else known | learned[request_id] - {own}
        )
    return chains


def cohort_consent_chains(svc: Services, asker: str, body: Any) -> dict[str, Any]:
    """A witness's answer to an ordinary member deciding a cohort export request (``POST
    /peer/consent-chains/cohort``): for each request, the chains holding consent entries about
    its patient. Only when every question is proven to be on the requester's chain, as the
    member asked checked (:func:`~node.flows.access_decision.consent_chains` for one)."""
    if svc.config.node_id not in svc.chain_store.roster().witnesses():
        raise Conflict(f"{svc.config.node_id} is no witness: it holds only some chains")
    if not isinstance(body, dict) or not isinstance(body.get("requester"), str):
        raise InvalidRequest("the question is the cohort export request, with its requester")
    _, _, _, _, items = parse_cohort({k: v for k, v in body.items() if k != "requester"})
    now = format_time()
    proven = [proven_request(svc, body["requester"], item, now) for item in items]
    return {
        "chains": {
            request_id: sorted(
                {e["chain"] for e in svc.chain_store.entries_about(patient, CONSENT_TYPES)}
            )
            for request_id, patient, *_ in proven
        }
    }


def _released(
    svc: Services, patients: list[str], categories: list[str], types: list[str], since: int | None
) -> list[Stored]:
    """What a permit releases of these local patients: the current results of the asked types
    and categories (changed after ``since``), as stored."""
    return [
        stored
        for stored in svc.store.in_compartments(patients, types)
        if (since is None or stored.last_updated > since)
        and result_of(stored.resource(), ZONE).category in categories
    ]


def _granted_after(svc: Services, consent: dict[str, Any] | None, since: int | None) -> bool:
    """Whether the grant a permit relies on was recorded after ``since``: the patient's
    results were not the asker's to have before, so all of them go, changed or not."""
    if since is None or consent is None:
        return False
    entry = svc.chain_store.entry(consent["chain"], consent["seq"])
    return parse_time(entry["time"]).timestamp() * 10**6 > since


def released_lines(svc: Services, release: Release) -> Iterator[bytes]:
    """The answer's lines: the decisions, then each released version's stored bytes."""
    yield release.head + b"\n"
    for start in range(0, len(release.versions), READ_BATCH):
        for stored in svc.store.versions_of(release.versions[start : start + READ_BATCH]):
            yield (stored.body or b"") + b"\n"
