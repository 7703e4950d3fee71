"""The auditor replays every access decision over the consents of its view: honest decisions
pass; a hand-forged permit, a permit after a revocation the source held, an impossible view are
flagged by hrx audit verify (exit 1), from the database and from the export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from exchange.decision_replay import DecisionReplay
from ledger import keys
from ledger.store import ChainWriter
from node.cli import main
from tests.helpers.ledgers import Ledger

P, Q = "a" * 64, "b" * 64
GRANT = {
    "consent_id": "c1",
    "patient": P,
    "grantees": ["hosp-b"],
    "categories": ["laboratory"],
    "purposes": ["TREAT"],
    "period": {"start": "2026-01-01T00:00:00.000Z", "end": None},
    "resource_hash": "0" * 64,
}


def decided(patient: str, decision: str, view: dict[str, int], **extra: Any) -> dict[str, Any]:
    return {
        "request_id": "r-" + "0" * 8,
        "requester_org": "hosp-b",
        "patient": patient,
        "purpose": "TREAT",
        "categories": ["laboratory"],
        "decided_at": "2026-11-25T08:00:00.000Z",
        "reason_stated": False,
        "decision": decision,
        "reason": "as recorded",
        "consent": {"chain": "hosp-a", "seq": 0} if decision == "permit" else None,
        "view": view,
        "released": [],
        **extra,
    }


def audit(ledger: Ledger, tmp_path: Path) -> list[tuple[int, str]]:
    authority = keys.public_key_text(ledger.authority)
    export = tmp_path / "ledger.jsonl"
    export.write_bytes(b"".join(line + b"\n" for line in ledger.store.export_lines()))
    results = []
    for target in (ledger.url, str(export)):
        result = CliRunner().invoke(main, ["audit", "verify", target, "--authority", authority])
        results.append((result.exit_code, result.output))
    assert results[0][0] == results[1][0]
    return results


def test_honest_decisions_replay(ledger_db: Ledger, tmp_path: Path) -> None:
    with ChainWriter(ledger_db.store, "hosp-a", ledger_db.key) as writer:
        writer.append("consent.granted", GRANT)
        writer.append("access.decided", decided(P, "permit", {"hosp-a": 1}))
        writer.append("access.decided", decided(Q, "deny", {"hosp-a": 2}))
        writer.append("consent.revoked", {"consent_id": "c1", "patient": P})
        writer.append("access.decided", decided(P, "deny", {"hosp-a": 4}))
    for code, output in audit(ledger_db, tmp_path):
        assert code == 0, output
        assert "3 access decision(s) replayed" in output


def test_forged_decisions_are_flagged(ledger_db: Ledger, tmp_path: Path) -> None:
    with ChainWriter(ledger_db.store, "hosp-a", ledger_db.key) as writer:
        writer.append("consent.granted", GRANT)  # seq 0
        writer.append("consent.revoked", {"consent_id": "c1", "patient": P})  # seq 1
        # a permit after the revocation this very chain holds
        writer.append("access.decided", decided(P, "permit", {"hosp-a": 2}))  # seq 2
        # the same, hiding the revocation behind an old view of its own chain
        writer.append("access.decided", decided(P, "permit", {"hosp-a": 1}))  # seq 3
        # a hand-forged permit for a patient who never consented
        writer.append("access.decided", decided(Q, "permit", {"hosp-a": 4}))  # seq 4
        # a view of entries that did not exist yet
        writer.append("access.decided", decided(P, "deny", {"hosp-a": 99}))  # seq 5
        # a decision that cannot be replayed at all
        writer.append("access.decided", {"request_id": "r-1", "decision": "permit"})  # seq 6
    for code, output in audit(ledger_db, tmp_path):
        assert code == 1, output
        flat = " ".join(output.split())
        assert "5 finding(s): access decisions the policy would not have made" in flat
        assert (
            "hosp-a seq 2: recorded permit for hosp-b, but the consents in its view call for deny"
            in flat
        )
        assert (
            "hosp-a seq 3: recorded permit over a view that leaves out hosp-a's own earlier entries"
            in flat
        )
        assert "hosp-a seq 4: recorded permit" in flat and "no consent of this patient" in flat
        assert "hosp-a seq 5: its view claims 99 entries" in flat
        assert "hosp-a seq 6: access.decided lacks" in flat


def test_a_decision_is_not_replayed_over_a_copy_that_lacks_its_view() -> None:
    """A copy cut short on a chain the decision read cannot show the decision was right: it
    is a finding, not a silent replay over fewer consent entries."""
    audit = DecisionReplay()
    decided = {
        "v": 1,
        "chain": "hosp-a",
        "seq": 4,
        "time": "2026-12-01T00:00:00.000Z",
        "type": "access.decided",
        "body": {
            "request_id": "r-12345678",
            "requester_org": "hosp-b",
            "patient": "ab" * 32,
            "purpose": "TREAT",
            "categories": ["laboratory"],
            "decided_at": "2026-12-01T00:00:00.000Z",
            "reason_stated": False,
            "decision": "deny",
            "reason": "no consent of this patient is recorded",
            "consent": None,
            "view": {"hosp-a": 4, "hosp-c": 12},
            "stale": [],
            "released": [],
        },
    }
    audit.observe(decided)
    assert audit.findings() == []  # nothing known of the copy: replayed as before
    (finding,) = audit.findings({"hosp-a": 5, "hosp-c": 9})
    assert "cannot be replayed from this copy" in str(finding)
    assert "12 entries of hosp-c (this copy holds 9)" in str(finding)
    assert audit.findings({"hosp-a": 5, "hosp-c": 12}) == []


def _entry(seq: int, kind: str, body: dict[str, Any]) -> dict[str, Any]:
    return {
        "v": 1,
        "chain": "hosp-a",
        "seq": seq,
        "time": "2026-11-25T08:00:00.000Z",
        "type": kind,
        "body": body,
    }


FORGED = _entry(9, "access.decided", decided(Q, "permit", {"hosp-a": 9}))
FORGED_FINDING = (
    "hosp-a seq 9: recorded permit for hosp-b, but the consents in its view call for deny: "
    "no consent of this patient is recorded"
)
BROKEN = decided(P, "deny", {"hosp-a": 3}, categories=5)


@pytest.mark.parametrize(
    ("entries", "held", "findings"),
    [
        (
            [_entry(3, "access.decided", {"request_id": "r-1", "decision": "permit"})],
            None,
            [
                "hosp-a seq 3: access.decided lacks patient, requester_org, purpose, categories, "
                "decided_at, view: it cannot be replayed"
            ],
        ),
        (
            [_entry(3, "access.decided", decided(P, "deny", [3]))],
            None,
            ["hosp-a seq 3: access.decided lacks a view: it cannot be replayed"],
        ),
        (
            [
                _entry(
                    4, "access.decided", decided(P, "deny", {"hosp-a": 4, "hosp-b": 1, "hosp-c": 2})
                )
            ],
            {"hosp-a": 10},
            [
                "hosp-a seq 4: cannot be replayed from this copy: its view reads 1 entries of "
                "hosp-b (this copy holds 0), 2 entries of hosp-c (this copy holds 0)"
            ],
        ),
        (
            [_entry(5, "access.decided", decided(P, "deny", {"hosp-a": 99}))],
            None,
            ["hosp-a seq 5: its view claims 99 entries of hosp-a, which did not yet exist"],
        ),
        *(
            (
                [_entry(5, "access.decided", decided(P, "deny", view))],
                held,
                [
                    "hosp-a seq 5: its view is not a map of chain ids to entry counts: it "
                    "cannot be replayed"
                ],
            )
            for view in (
                {"hosp-a": "9"},
                {"hosp-b": "9"},
                {"hosp-a": 2, "hosp-c": -1},
                {"hosp-b": 1.5},
                {"hosp-b": True},
                {"hosp-b": None},
            )
            for held in (None, {"hosp-a": 10})
        ),
        (
            [_entry(3, "access.decided", BROKEN)],
            None,
            ["hosp-a seq 3: cannot be replayed: 'int' object is not iterable"],
        ),
        (
            [
                _entry(0, "consent.granted", GRANT),
                _entry(1, "consent.granted", {**GRANT, "consent_id": "c2"}),
                _entry(
                    2,
                    "access.decided",
                    decided(P, "permit", {"hosp-a": 2}, consent={"chain": "hosp-a", "seq": 1}),
                ),
            ],
            None,
            [
                "hosp-a seq 2: permit rests on consent {'chain': 'hosp-a', 'seq': 1}, but the "
                "policy finds {'chain': 'hosp-a', 'seq': 0}"
            ],
        ),
        # the first decision of a chain may read none of its own chain (an empty view)
        ([_entry(0, "access.decided", decided(P, "deny", {}))], None, []),
    ],
)
def test_each_finding_names_the_decision_and_its_fault(
    entries: list[dict[str, Any]], held: dict[str, int] | None, findings: list[str]
) -> None:
    """Each fault, alone and then followed by a forged decision: a finding says which
    decision and why, and never stops the replay of the decisions after it."""
    for tail, also in (([], []), ([FORGED], [FORGED_FINDING])):
        audit = DecisionReplay()
        for entry in [*entries, *tail]:
            audit.observe(entry)
        got = [str(f) for f in audit.findings(held)]
        assert got == findings + also


def _entry(chain: str, seq: int, kind: str, body: dict[str, Any]) -> dict[str, Any]:
    return {
        "v": 1,
        "chain": chain,
        "seq": seq,
        "time": "2026-12-01T00:00:00.000Z",
        "type": kind,
        "body": body,
    }


def test_record_locator_lookups_must_answer_a_recorded_question() -> None:
    """A registry may look a patient up only for a question its requester recorded: the same
    request id, patient and purpose on the requester's chain; its holders is a count."""
    audit = DecisionReplay()
    question = {
        "request_id": "r-1",
        "patient": P,
        "requester": {"org": "hosp-b"},
        "purpose": "TREAT",
        "categories": ["laboratory"],
        "referral": None,
    }
    audit.observe(_entry("hosp-b", 3, "access.requested", question))
    lookup = {
        "request_id": "r-1",
        "patient": P,
        "requester_org": "hosp-b",
        "purpose": "TREAT",
        "holders": 2,
    }
    audit.observe(_entry("hosp-r", 0, "locator.lookup", lookup))
    audit.observe(_entry("hosp-r", 7, "locator.lookup", {**lookup, "holders": 0}))  # none found
    assert audit.findings() == []
    audit.observe(_entry("hosp-r", 1, "locator.lookup", {**lookup, "request_id": "r-2"}))
    audit.observe(_entry("hosp-r", 2, "locator.lookup", {**lookup, "patient": Q}))
    audit.observe(_entry("hosp-r", 3, "locator.lookup", {**lookup, "purpose": "ETREAT"}))
    audit.observe(_entry("hosp-r", 4, "locator.lookup", {**lookup, "requester_org": "hosp-c"}))
    audit.observe(_entry("hosp-r", 5, "locator.lookup", {**lookup, "holders": -1}))
    audit.observe(_entry("hosp-r", 6, "locator.lookup", {**lookup, "holders": True}))
    assert [str(f) for f in audit.findings()] == [
        "hosp-r seq 1: looks up a patient for hosp-b, whose chain in this copy records no "
        "question r-2",
        "hosp-r seq 2: looks up another patient or purpose than hosp-b's question r-1 names",
        "hosp-r seq 3: looks up another patient or purpose than hosp-b's question r-1 names",
        "hosp-r seq 4: looks up a patient for hosp-c, whose chain in this copy records no "
        "question r-1",
        "hosp-r seq 5: its holders is not a count of members",
        "hosp-r seq 6: its holders is not a count of members",
    ]


def test_a_view_that_read_nothing_of_a_chain_is_a_view() -> None:
    """A view may name a chain with 0 entries read (a chain the source held none of yet)."""
    audit = DecisionReplay()
    body = decided(P, "deny", {"hosp-a": 0, "hosp-c": 0})
    audit.observe(
        {
            "v": 1,
            "chain": "hosp-a",
            "seq": 0,
            "time": "2026-12-01T00:00:00.000Z",
            "type": "access.decided",
            "body": body,
        }
    )
    assert audit.findings() == []


def test_a_read_of_images_must_rest_on_a_permit_that_released_the_study() -> None:
    """``images.read``: a permitted read names an earlier permitted ``access.decided`` of the
    same chain, for the same member and patient, that released the study; a refusal needs
    nothing; anything else is a finding naming the read."""
    study = "5" * 64
    R = "r-" + "0" * 8  # the permit's request id
    audit = DecisionReplay()
    audit.observe(_entry("hosp-a", 0, "consent.granted", {**GRANT, "categories": ["imaging"]}))
    permit = decided(P, "permit", {"hosp-a": 1}, categories=["imaging"], released=[study])
    audit.observe(_entry("hosp-a", 1, "access.decided", permit))
    denied = {**permit, "request_id": "r-denied", "decision": "deny", "consent": None}
    denied["requester_org"] = "hosp-c"  # whom the consent does not name
    denied["released"] = []
    audit.observe(_entry("hosp-a", 2, "access.decided", denied))
    read = {
        "patient": P,
        "requester_org": "hosp-b",
        "study": study,
        "decision": "permit",
        "reason": "",
        "basis": {"access": permit["request_id"]},
    }
    audit.observe(_entry("hosp-a", 3, "images.read", read))
    refused = {**read, "decision": "deny", "reason": "no grant", "basis": None}
    audit.observe(_entry("hosp-a", 4, "images.read", refused))
    assert audit.findings() == []
    # a permit recorded without the list of what it released released nothing
    bare = {k: v for k, v in permit.items() if k != "released"} | {"request_id": "r-bare"}
    audit.observe(_entry("hosp-a", 5, "access.decided", bare))
    rests = "hosp-a seq SEQ: a read of images rests on"
    faults = [
        ({**read, "study": "6" * 64}, f"{rests} access request {R}, which did not release it"),
        (
            {**read, "basis": {"access": "r-bare"}},
            f"{rests} access request r-bare, which did not release it",
        ),
        (
            {**read, "requester_org": "hosp-c"},
            "hosp-a seq SEQ: a read of images by hosp-c rests on access request "
            f"{R}, made for another member or patient",
        ),
        (
            {**read, "patient": Q},
            "hosp-a seq SEQ: a read of images by hosp-b rests on access request "
            f"{R}, made for another member or patient",
        ),
        (
            {**read, "basis": {"access": "r-denied"}},
            f"{rests} access request r-denied, which was denied",
        ),
        (
            {**read, "basis": {"access": "r-none"}},
            f"{rests} access request r-none, which hosp-a did not decide before it",
        ),
        ({**read, "basis": None}, f"{rests} no access decision (basis None)"),
        (
            {**read, "basis": {"access": "x", "y": 1}},
            f"{rests} no access decision (basis {{'access': 'x', 'y': 1}})",
        ),
        (
            {**read, "decision": "maybe"},
            "hosp-a seq SEQ: an images.read is neither a permit nor a deny",
        ),
    ]
    for seq, (body, _) in enumerate(faults, start=6):
        audit.observe(_entry("hosp-a", seq, "images.read", body))
    # a decision recorded after the read does not grant it
    late = _entry("hosp-c", 1, "access.decided", {**permit, "request_id": "r-late"})
    audit.observe(late)
    audit.observe(_entry("hosp-c", 0, "images.read", {**read, "basis": {"access": "r-late"}}))
    assert [str(f) for f in audit.image_read_findings()] == [
        message.replace("SEQ", str(seq)) for seq, (_, message) in enumerate(faults, start=6)
    ] + [
        "hosp-c seq 0: a read of images rests on access request r-late, which hosp-c did not "
        "decide before it"
    ]


def test_a_read_of_images_under_a_consult_must_rest_on_the_consult() -> None:
    """A read granted by a consult names a consult the same chain requested earlier of the
    same member, for the same patient and study, not cancelled before the read."""
    study = "5" * 64
    requested = {
        "consult_id": "k-1",
        "patient": P,
        "requester_org": "hosp-a",
        "reader_org": "hosp-b",
        "priority": "urgent",
        "deadline": "2026-12-01T01:00:00.000Z",
        "study": study,
        "order": "6" * 64,
    }
    read = {
        "patient": P,
        "requester_org": "hosp-b",
        "study": study,
        "decision": "permit",
        "reason": "",
        "basis": {"consult": "k-1"},
    }
    audit = DecisionReplay()
    audit.observe(_entry("hosp-a", 0, "consult.requested", requested))
    audit.observe(_entry("hosp-a", 1, "images.read", read))
    audit.observe(_entry("hosp-a", 3, "consult.cancelled", {**requested, "reason": "x"}))
    audit.observe(_entry("hosp-a", 2, "images.read", read))  # before the cancellation: fine
    assert audit.image_read_findings() == []
    rests = "a read of images rests on consult"
    faults = [
        (read, f"{rests} k-1, cancelled before it"),
        (
            {**read, "basis": {"consult": "k-2"}},
            f"{rests} k-2, which hosp-a did not request before it",
        ),
        (
            {**read, "requester_org": "hosp-c"},
            "a read of images by hosp-c rests on consult k-1, "
            "asked of another member, for another patient or study",
        ),
        (
            {**read, "patient": Q},
            "a read of images by hosp-b rests on consult k-1, asked of "
            "another member, for another patient or study",
        ),
        (
            {**read, "study": "6" * 64},
            "a read of images by hosp-b rests on consult k-1, asked "
            "of another member, for another patient or study",
        ),
    ]
    for seq, (body, _) in enumerate(faults, start=4):
        audit.observe(_entry("hosp-a", seq, "images.read", body))
    # the consult is another chain's: this chain asked nothing
    audit.observe(_entry("hosp-c", 0, "images.read", read))
    # a cancellation alone is no request
    audit.observe(_entry("hosp-d", 0, "consult.cancelled", {**requested, "consult_id": "k-9"}))
    audit.observe(_entry("hosp-d", 1, "images.read", {**read, "basis": {"consult": "k-9"}}))
    assert [str(f) for f in audit.image_read_findings()] == [
        f"hosp-a seq {seq}: {message}" for seq, (_, message) in enumerate(faults, start=4)
    ] + [
        f"hosp-c seq 0: {rests} k-1, which hosp-c did not request before it",
        f"hosp-d seq 1: {rests} k-9, which hosp-d did not request before it",
    ]
