"""A question about a patient is answered only with the proof that the asker recorded it on its
own chain (exchange.question): every way the proof or the question can be wrong is refused."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from exchange.question import MAX_AGE, check_history_question, check_question
from fhir_adapters.errors import Forbidden
from ledger.model import parse_time
from ledger.receipt import entry_proof
from ledger.roster import Roster
from ledger.store import ChainWriter
from tests.helpers.ledgers import Ledger, make_ledger

PATIENT = "ab" * 32


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    made = make_ledger(f"sqlite:///{tmp_path / 'asker.db'}", tmp_path, chain="hosp-b")
    yield made
    made.store.close()


def asked(ledger: Ledger, entry_type: str = "access.requested", **changes: Any) -> dict[str, Any]:
    body = {
        "request_id": "req-0001",
        "patient": PATIENT,
        "requester": {"org": "hosp-b", "practitioner": "cd" * 32},
        "purpose": "TREAT",
        "categories": ["laboratory", "imaging"],
        "referral": None,
        **changes,
    }
    with ChainWriter(ledger.store, ledger.chain, ledger.key) as writer:
        writer.append("consent.revoked", {"consent_id": "c-0", "patient": PATIENT})
        seq = writer.append(entry_type, body)
    return entry_proof(ledger.store, ledger.chain, seq)


def check(ledger: Ledger, proof: Any, **changes: Any) -> dict[str, Any]:
    roster = ledger.store.roster()

    def roster_of(version: int) -> Roster:
        assert version == roster.version
        return roster

    arguments: dict[str, Any] = {
        "asker": "hosp-b",
        "request_id": "req-0001",
        "patient": PATIENT,
        "purpose": "TREAT",
        "categories": ["laboratory"],
        "roster_of": roster_of,
        "now": parse_time(proof["entry"]["time"]) + timedelta(seconds=1),
        **changes,
    }
    return check_question(proof, **arguments)


def test_a_recorded_question_is_answered(ledger: Ledger) -> None:
    proof = asked(ledger)
    entry = check(ledger, proof)
    assert entry["type"] == "access.requested" and entry["seq"] == 1
    assert check(ledger, proof, categories=["imaging", "laboratory"])["seq"] == 1


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"asker": "hosp-c"}, "not of an entry of type access.requested on the chain of hosp-c"),
        ({"request_id": "req-0002"}, "another request or another patient"),
        ({"patient": "ef" * 32}, "another request or another patient"),
        ({"purpose": "ETREAT"}, "states purpose 'TREAT'"),
        ({"purpose": "RESEARCH"}, "not one of TREAT, ETREAT"),
        ({"categories": ["laboratory", "medication"]}, "categories the recorded question"),
    ],
)
def test_a_question_other_than_the_recorded_one_is_refused(
    ledger: Ledger, changes: dict[str, Any], words: str
) -> None:
    with pytest.raises(Forbidden, match=words):
        check(ledger, asked(ledger), **changes)


def test_an_old_or_future_question_is_refused(ledger: Ledger) -> None:
    proof = asked(ledger)
    recorded = parse_time(proof["entry"]["time"])
    check(ledger, proof, now=recorded + MAX_AGE)
    with pytest.raises(Forbidden, match="record it again"):
        check(ledger, proof, now=recorded + MAX_AGE + timedelta(seconds=1))
    with pytest.raises(Forbidden, match="record it again"):
        check(ledger, proof, now=recorded - timedelta(minutes=6))


def test_another_entry_type_is_no_question(ledger: Ledger) -> None:
    with pytest.raises(Forbidden, match=r"of type access\.decided on hosp-b's chain"):
        check(ledger, asked(ledger, "access.decided"))


@pytest.mark.parametrize(
    "tamper",
    [
        lambda p: p["entry"]["body"].__setitem__("patient", "ef" * 32),
        lambda p: p["entry"].__setitem__("seq", 0),
        lambda p: p["inclusion"]["audit_path"].__setitem__(0, "00" * 32),
        lambda p: p["inclusion"].__setitem__("audit_path", []),
        lambda p: p["block"]["header"].__setitem__("tree_root", "00" * 32),
        lambda p: p["block"].__setitem__("signature", p["block"]["signature"][::-1]),
        lambda p: p.__setitem__("certificate", None),
        lambda p: p.pop("block"),
    ],
)
def test_a_forged_proof_is_refused(ledger: Ledger, tamper: Any) -> None:
    proof = copy.deepcopy(asked(ledger))
    tamper(proof)
    with pytest.raises(Forbidden, match="not proven to be on hosp-b's chain"):
        check(ledger, proof, patient=proof.get("entry", {}).get("body", {}).get("patient"))


def test_a_proof_signed_by_another_key_is_refused(ledger: Ledger, tmp_path: Path) -> None:
    other = make_ledger(f"sqlite:///{tmp_path / 'other.db'}", tmp_path / "other", chain="hosp-b")
    try:
        proof = asked(other)
    finally:
        other.store.close()
    with pytest.raises(Forbidden, match="not proven to be on hosp-b's chain"):
        check(ledger, proof)


def check_history(ledger: Ledger, proof: Any, **changes: Any) -> dict[str, Any]:
    roster = ledger.store.roster()
    arguments: dict[str, Any] = {
        "asker": "hosp-b",
        "request_id": "req-0001",
        "patient": PATIENT,
        "roster_of": lambda version: roster,
        "now": parse_time(proof["entry"]["time"]) + timedelta(seconds=1),
        **changes,
    }
    return check_history_question(proof, **arguments)


def test_a_patients_own_question_is_proven_by_its_history_entry(ledger: Ledger) -> None:
    proof = asked(ledger, "history.requested")
    assert check_history(ledger, proof)["type"] == "history.requested"
    with pytest.raises(Forbidden, match="another request or another patient"):
        check_history(ledger, proof, patient="ef" * 32)
    with pytest.raises(Forbidden, match="on the chain of hosp-c"):
        check_history(ledger, proof, asker="hosp-c")
    with pytest.raises(Forbidden, match="record it again"):
        check_history(ledger, proof, now=parse_time(proof["entry"]["time"]) + MAX_AGE * 2)
    # a doctor's question is no patient's, nor the other way round
    with pytest.raises(Forbidden, match=r"not of an entry of type history\.requested"):
        check_history(ledger, asked(ledger))
    with pytest.raises(Forbidden, match=r"not of an entry of type access\.requested"):
        check(ledger, proof)
