"""Receipts: made from a store, verified offline, every forgery refused."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from ledger import keys
from ledger.canonical import canonical_bytes
from ledger.checkpoint import make_certificate, make_checkpoint, sign
from ledger.errors import VerificationError
from ledger.receipt import entry_proof, make_receipt, receipt_of_proof, verify_receipt
from ledger.store import ChainWriter
from tests.helpers.ledgers import BLS_KEY, Ledger


def _fill(ledger: Ledger, count: int) -> None:
    with ChainWriter(ledger.store, "hosp-a", ledger.key) as writer:
        for n in range(count):
            writer.append("consent.granted", {"consent_id": f"c{n}", "patient": "a" * 64})


def _certify(ledger: Ledger, epoch: int) -> None:
    checkpoint = make_checkpoint(epoch, 1, ledger.store.heads())
    ledger.store.add_certificate(
        make_certificate(checkpoint, {"hosp-a": sign(checkpoint, BLS_KEY)})
    )


def test_a_receipt_without_a_certificate_says_so(ledger_db: Ledger) -> None:
    _fill(ledger_db, 5)
    receipt = make_receipt(ledger_db.store, "hosp-a", 3)
    assert receipt["certificate"] is None
    summary = verify_receipt(receipt, ledger_db.authority.public_key())
    assert (summary.chain, summary.seq, summary.tree_size) == ("hosp-a", 3, 5)
    assert summary.epoch is None and summary.anchored
    assert "no checkpoint certificate covers it yet" in summary.describe()
    unanchored = verify_receipt(receipt)
    assert "not checked against the authority" in unanchored.describe()


def test_a_certified_receipt_proves_to_the_certified_tree(ledger_db: Ledger) -> None:
    _fill(ledger_db, 4)
    _certify(ledger_db, 1)
    _fill(ledger_db, 3)  # grown since the checkpoint: the receipt uses the certified tree
    receipt = make_receipt(ledger_db.store, "hosp-a", 2)
    summary = verify_receipt(receipt, ledger_db.authority.public_key())
    assert summary.epoch == 1 and summary.tree_size == 4
    assert summary.signers == ("hosp-a",) and summary.quorum == 1
    assert "checkpoint epoch 1 covers that tree" in summary.describe()
    # an entry after the newest certificate gets a receipt to the newest signed head
    later = make_receipt(ledger_db.store, "hosp-a", 5)
    assert later["certificate"] is None and later["inclusion"]["tree_size"] == 7
    verify_receipt(later, ledger_db.authority.public_key())


def test_a_receipt_from_another_members_proof(ledger_db: Ledger) -> None:
    """A member that does not hold the chain builds a receipt from the proof a witness sent
    (spec §15.6): its own roster, no certificate; it verifies like one made from the chain."""
    _fill(ledger_db, 5)
    receipt = receipt_of_proof(ledger_db.store, entry_proof(ledger_db.store, "hosp-a", 1))
    assert receipt["certificate"] is None and [
        r["roster"]["version"] for r in receipt["rosters"]
    ] == [1]
    summary = verify_receipt(receipt, ledger_db.authority.public_key())
    assert (summary.chain, summary.seq, summary.tree_size, summary.epoch) == ("hosp-a", 1, 5, None)
    assert receipt == make_receipt(ledger_db.store, "hosp-a", 1)


def _tamper(receipt: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    forged = copy.deepcopy(receipt)
    target = forged
    parts = path.split(".")
    for part in parts[:-1]:
        target = target[int(part)] if isinstance(target, list) else target[part]
    last = parts[-1]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return forged


@pytest.mark.parametrize(
    ("path", "value", "words"),
    [
        ("entry.body.patient", "b" * 64, "does not lead to the root"),
        ("entry.seq", 1, "not for this entry"),
        ("inclusion.audit_path.0", "0" * 64, "does not lead to the root"),
        ("block.header.tree_root", "0" * 64, "signature"),
        ("block.signature", "A" * 86, "signature"),
        ("certificate.signature", "00" * 96, "aggregate signature does not verify"),
        ("certificate.checkpoint.heads.hosp-a.tree_size", 3, "aggregate signature"),
        ("rosters", [], "lacks roster version 1"),
        ("receipt", 2, "not a receipt"),
    ],
)
def test_forged_receipts_are_refused(ledger_db: Ledger, path: str, value: Any, words: str) -> None:
    _fill(ledger_db, 4)
    _certify(ledger_db, 1)
    receipt = make_receipt(ledger_db.store, "hosp-a", 2)
    with pytest.raises(VerificationError, match=words):
        verify_receipt(_tamper(receipt, path, value), ledger_db.authority.public_key())


def test_a_receipt_from_another_authority_is_refused(ledger_db: Ledger) -> None:
    _fill(ledger_db, 2)
    receipt = make_receipt(ledger_db.store, "hosp-a", 1)
    stranger = keys.load_or_create_private_key(ledger_db.key_path.with_name("stranger.pem"))
    with pytest.raises(VerificationError, match="authority signature"):
        verify_receipt(receipt, stranger.public_key())


def test_hrx_audit_receipt(ledger_db: Ledger, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from node.cli import main

    _fill(ledger_db, 3)
    _certify(ledger_db, 7)
    path = tmp_path / "receipt.json"
    path.write_bytes(canonical_bytes(make_receipt(ledger_db.store, "hosp-a", 1)))
    authority = keys.public_key_text(ledger_db.authority)
    result = CliRunner().invoke(main, ["audit", "receipt", str(path), "--authority", authority])
    assert result.exit_code == 0, result.output
    assert "VALID" in result.output and "checkpoint epoch 7" in result.output
    forged = make_receipt(ledger_db.store, "hosp-a", 1)
    forged["entry"]["body"]["consent_id"] = "c9"
    path.write_bytes(canonical_bytes(forged))
    result = CliRunner().invoke(main, ["audit", "receipt", str(path), "--authority", authority])
    assert result.exit_code == 1 and "INVALID" in result.output
    path.write_text("not json")
    result = CliRunner().invoke(main, ["audit", "receipt", str(path)])
    assert result.exit_code == 1 and "is not a receipt" in result.output
