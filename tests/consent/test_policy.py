"""The consent policy (docs/spec.md §14.2), table-driven: grantee, category, purpose, period,
revoked, expired, superseded, break-glass, and the reasons each decision gives."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from consent.policy import AccessRequest, decide

PATIENT = "a" * 64
OTHER = "b" * 64
NOW = "2026-11-25T10:00:00.000Z"


def grant(
    seq: int,
    consent_id: str = "c1",
    *,
    chain: str = "hosp-a",
    patient: str = PATIENT,
    grantees: tuple[str, ...] = ("hosp-b",),
    categories: tuple[str, ...] = ("laboratory", "imaging"),
    purposes: tuple[str, ...] = ("TREAT",),
    start: str = "2026-01-01T00:00:00.000Z",
    end: str | None = "2026-12-31T23:59:59.999Z",
) -> dict[str, Any]:
    return {
        "chain": chain,
        "seq": seq,
        "time": "2026-01-01T00:00:00.000Z",
        "type": "consent.granted",
        "body": {
            "consent_id": consent_id,
            "patient": patient,
            "grantees": list(grantees),
            "categories": list(categories),
            "purposes": list(purposes),
            "period": {"start": start, "end": end},
            "resource_hash": "0" * 64,
        },
    }


def revoke(
    seq: int, consent_id: str = "c1", *, chain: str = "hosp-a", patient: str = PATIENT
) -> dict[str, Any]:
    return {
        "chain": chain,
        "seq": seq,
        "time": "2026-06-01T00:00:00.000Z",
        "type": "consent.revoked",
        "body": {"consent_id": consent_id, "patient": patient},
    }


def request(
    requester: str = "hosp-b",
    purpose: str = "TREAT",
    categories: tuple[str, ...] = ("laboratory",),
    time: str = NOW,
    reason: str | None = None,
) -> AccessRequest:
    return AccessRequest(PATIENT, requester, purpose, categories, time, reason)


CASES: list[tuple[str, list[dict[str, Any]], AccessRequest, str, str, dict[str, Any] | None]] = [
    ("no consent at all", [], request(), "deny", "no consent of this patient is recorded", None),
    (
        "granted to the requester",
        [grant(0)],
        request(),
        "permit",
        "permitted by consent c1",
        {"chain": "hosp-a", "seq": 0},
    ),
    (
        "granted to every member",
        [grant(3, grantees=("*",))],
        request("hosp-z"),
        "permit",
        "permitted",
        {"chain": "hosp-a", "seq": 3},
    ),
    (
        "another member is not a grantee",
        [grant(0)],
        request("hosp-c"),
        "deny",
        "does not grant hosp-c",
        None,
    ),
    (
        "category not granted",
        [grant(0)],
        request(categories=("laboratory", "procedure")),
        "deny",
        "does not cover procedure",
        None,
    ),
    (
        "every category must be granted",
        [grant(0, categories=("imaging",))],
        request(categories=("imaging", "laboratory")),
        "deny",
        "does not cover laboratory",
        None,
    ),
    (
        "purpose not granted",
        [grant(0)],
        request(purpose="ETREAT", reason="unconscious"),
        "permit",
        "without consent",
        None,
    ),
    (
        "unknown purpose",
        [grant(0)],
        request(purpose="HMARKT"),
        "deny",
        "is not one of TREAT, ETREAT, HRESCH, PUBHLTH",
        None,
    ),
    (
        "a consent for care does not cover research",
        [grant(0, purposes=("ETREAT", "TREAT"))],
        request(purpose="HRESCH"),
        "deny",
        "does not cover purpose HRESCH",
        None,
    ),
    (
        "research added to a consent by a later grant",
        [grant(0, purposes=("TREAT",)), grant(1, purposes=("HRESCH", "TREAT"))],
        request(purpose="HRESCH"),
        "permit",
        "permitted by consent c1 (hosp-a seq 1) superseding seq 0",
        {"chain": "hosp-a", "seq": 1},
    ),
    (
        "research taken out of a consent by a later grant",
        [grant(0, purposes=("HRESCH", "PUBHLTH", "TREAT")), grant(1, purposes=("TREAT",))],
        request(purpose="HRESCH"),
        "deny",
        "consent c1 (hosp-a seq 1) does not cover purpose HRESCH",
        None,
    ),
    (
        "public health named by the consent",
        [grant(0, purposes=("PUBHLTH",))],
        request(purpose="PUBHLTH"),
        "permit",
        "permitted by consent c1 (hosp-a seq 0)",
        {"chain": "hosp-a", "seq": 0},
    ),
    (
        "before the period",
        [grant(0, start="2027-01-01T00:00:00.000Z", end=None)],
        request(),
        "deny",
        "valid only from 2027-01-01",
        None,
    ),
    (
        "expired",
        [grant(0, end="2026-03-31T15:59:59.999Z")],
        request(),
        "deny",
        "expired at 2026-03-31T15:59:59.999Z",
        None,
    ),
    (
        "open-ended",
        [grant(0, end=None)],
        request(time="2049-01-01T00:00:00.000Z"),
        "permit",
        "permitted",
        {"chain": "hosp-a", "seq": 0},
    ),
    (
        "last millisecond of the period",
        [grant(0)],
        request(time="2026-12-31T23:59:59.999Z"),
        "permit",
        "permitted",
        {"chain": "hosp-a", "seq": 0},
    ),
    ("revoked", [grant(0), revoke(5)], request(), "deny", "was revoked at 2026-06-01", None),
    (
        "revoked, then granted again",
        [grant(0), revoke(5), grant(9)],
        request(),
        "permit",
        "permitted by consent c1 (hosp-a seq 9)",
        {"chain": "hosp-a", "seq": 9},
    ),
    (
        "narrowed: the newer grant supersedes",
        [grant(0), grant(4, categories=("imaging",))],
        request(),
        "deny",
        "does not cover laboratory",
        None,
    ),
    (
        "widened: the newer grant supersedes",
        [grant(0, categories=("imaging",)), grant(4)],
        request(),
        "permit",
        "superseding seq 0",
        {"chain": "hosp-a", "seq": 4},
    ),
    (
        "order of the entries given does not matter",
        [grant(4, categories=("imaging",)), grant(0)],
        request(),
        "deny",
        "does not cover laboratory",
        None,
    ),
    (
        "another patient's consent",
        [grant(0, patient=OTHER)],
        request(),
        "deny",
        "no consent of this patient",
        None,
    ),
    (
        "revoking another consent leaves this one",
        [grant(0), grant(1, "c2"), revoke(2, "c2")],
        request(),
        "permit",
        "consent c1",
        {"chain": "hosp-a", "seq": 0},
    ),
    (
        "same consent id on another chain is another consent",
        [grant(0), revoke(1, chain="hosp-c")],
        request(),
        "permit",
        "consent c1 (hosp-a seq 0)",
        {"chain": "hosp-a", "seq": 0},
    ),
    (
        "one of several consents applies",
        [grant(0, categories=("imaging",)), grant(1, "c2", categories=("laboratory",))],
        request(),
        "permit",
        "consent c2",
        {"chain": "hosp-a", "seq": 1},
    ),
    (
        "break-glass without a reason",
        [],
        request(purpose="ETREAT"),
        "deny",
        "needs a stated reason",
        None,
    ),
    (
        "break-glass with a blank reason",
        [],
        request(purpose="ETREAT", reason="  "),
        "deny",
        "needs a stated reason",
        None,
    ),
    (
        "break-glass with a reason",
        [],
        request(purpose="ETREAT", reason="unconscious, no relatives"),
        "permit",
        "break-glass",
        None,
    ),
    (
        "break-glass after revocation",
        [grant(0, purposes=("TREAT", "ETREAT")), revoke(1)],
        request(purpose="ETREAT", reason="trauma"),
        "permit",
        "without consent",
        None,
    ),
    (
        "emergency covered by consent",
        [grant(0, purposes=("TREAT", "ETREAT"))],
        request(purpose="ETREAT", reason="trauma"),
        "permit",
        "break-glass) permitted by consent c1",
        {"chain": "hosp-a", "seq": 0},
    ),
    (
        "no category asked",
        [grant(0)],
        request(categories=()),
        "deny",
        "names no data category",
        None,
    ),
]


@pytest.mark.parametrize(
    ("entries", "access", "decision", "reason", "consent"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_policy(
    entries: list[dict[str, Any]],
    access: AccessRequest,
    decision: str,
    reason: str,
    consent: dict[str, Any] | None,
) -> None:
    result = decide(entries, access)
    assert result.decision == decision, result.reasons
    assert reason in result.reason
    assert result.consent == consent
    assert result.emergency == (access.purpose == "ETREAT" and result.permitted)


def test_every_consent_that_did_not_apply_is_a_reason() -> None:
    entries = [
        grant(0, "c1", end="2026-03-31T15:59:59.999Z"),
        grant(1, "c2", grantees=("hosp-c",)),
        grant(2, "c3"),
        revoke(3, "c3"),
    ]
    result = decide(entries, request())
    assert result.decision == "deny"
    assert result.reasons[0] == "no consent permits this request"
    assert any("c1" in r and "expired" in r for r in result.reasons)
    assert any("c2" in r and "does not grant hosp-b" in r for r in result.reasons)
    assert any("c3" in r and "revoked" in r for r in result.reasons)
    assert PATIENT not in result.reason


def test_policy_is_a_pure_function_of_its_inputs() -> None:
    entries = [grant(0), revoke(5), grant(9, categories=("imaging",))]
    first = decide(entries, request())
    assert decide(list(reversed(entries)), request()) == first
    assert decide(entries, request()) == first


@pytest.mark.parametrize(
    ("entries", "access", "reasons"),
    [
        ([], request(), ("no consent of this patient is recorded",)),
        ([grant(0)], request(categories=()), ("the request names no data category",)),
        (
            [grant(0)],
            request(purpose="ETREAT"),
            ("emergency access (ETREAT) needs a stated reason",),
        ),
        (
            [grant(0, grantees=("hosp-c",))],
            request(purpose="ETREAT", reason="unconscious on arrival"),
            (
                "emergency access (break-glass) without consent, with a stated reason",
                "consent c1 (hosp-a seq 0) does not grant hosp-b",
            ),
        ),
        (
            [grant(0, categories=("imaging",))],
            request(categories=("laboratory", "imaging", "genomics")),
            (
                "no consent permits this request",
                "consent c1 (hosp-a seq 0) does not cover laboratory, genomics",
            ),
        ),
    ],
)
def test_the_reasons_are_exactly_these(
    entries: list[dict[str, Any]], access: AccessRequest, reasons: tuple[str, ...]
) -> None:
    """The reasons are recorded with the decision and compared in the auditor's replay: their
    words are part of the decision, not decoration."""
    result = decide(entries, access)
    assert result.reasons == reasons
    assert not result.emergency or access.purpose == "ETREAT"


def test_the_state_of_a_consent_does_not_depend_on_the_order_entries_come_in() -> None:
    """Of a consent's entries the highest seq is its state, and the grants below it are named
    as superseded (revocations are not), whichever order the view lists them in. (The
    superseded seqs are named in the order the view lists them.)"""
    entries = [grant(0), revoke(3), grant(5), grant(9)]
    for order in itertools.permutations(entries):
        (reason,) = decide(order, request()).reasons
        summary, superseded = reason.split(" superseding seq ")
        assert summary == "permitted by consent c1 (hosp-a seq 9)"
        assert sorted(map(int, superseded.split(", "))) == [0, 5]


def test_entries_of_other_patients_and_types_are_skipped_not_a_stop() -> None:
    other_type = {**grant(1), "type": "record.registered"}
    entries = [grant(0, "c9", patient=OTHER), other_type, grant(2)]
    assert decide(entries, request()).consent == {"chain": "hosp-a", "seq": 2}


def test_a_consent_is_valid_from_the_first_millisecond_of_its_period() -> None:
    start = "2026-11-25T10:00:00.000Z"
    assert decide([grant(0, start=start)], request(time=start)).permitted
    assert not decide([grant(0, start=start)], request(time="2026-11-25T09:59:59.999Z")).permitted
