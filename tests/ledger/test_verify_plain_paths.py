"""The verifier's whole-block paths (``Verifier._plain_bodies`` for parsed entries and
``Verifier._plain_columns`` for the fields the compiled reader cuts from canonical bytes) may
only send a block to the entry-by-entry checks, never accept what those checks refuse. Here is
a fault that only a later block of a chain can hold, which the validly signed malformed blocks
of test_verify_faults.py (each a chain's first block, where ``first_seq`` is 0) cannot: a
block whose entries are numbered again from 0, as many as the chain held before it. It is
refused at its first entry, in the same words, whichever way the block comes: parsed from an
export line, as canonical bytes read by the compiled reader or parsed in Python (a database's
rows), and in a whole export with and without the compiled reader. Written for the mutant of
``_plain_columns`` that compares the seqs with ``range(first_seq)``, which the earlier tests
left alive (mutation testing, docs/spec.md §18.12)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ledger import merkle
from ledger import verify as verify_module
from ledger.canonical import canonical_bytes
from ledger.errors import VerificationError
from ledger.model import ZERO_HASH, block_bytes, block_hash
from ledger.verify import Verifier, verify_export
from tests.helpers.ledgers import Ledger, signed_block
from tests.ledger.verify_cases import outcome

BLOCK_TIME = "2026-11-22T09:30:00.000Z"


def _entry(seq: int, number: int) -> dict[str, Any]:
    return {
        "v": 1,
        "chain": "hosp-a",
        "seq": seq,
        "type": "access.requested",
        "time": "2026-11-22T09:29:59.000Z",
        "body": {"n": number},
    }


def _chain(ledger: Ledger, batches: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Consecutive blocks of hosp-a holding each batch of entries exactly as given, validly
    signed by its member: each header's ``first_seq``, ``tree_size`` and ``tree_root`` count
    and hash every entry before it, as a member's own signing of wrong entries would."""
    frontier = merkle.Frontier()
    blocks: list[dict[str, Any]] = []
    prev = ZERO_HASH
    for height, entries in enumerate(batches):
        first_seq = frontier.size
        frontier.extend(merkle.leaf_hashes([canonical_bytes(entry) for entry in entries]))
        block = signed_block(
            ledger.key,
            entries,
            height=height,
            prev=prev,
            first_seq=first_seq,
            tree_size=frontier.size,
            tree_root=frontier.root().hex(),
            time=BLOCK_TIME,
        )
        prev = block_hash(block["header"]).hex()
        blocks.append(block)
    return blocks


def _verifier(ledger: Ledger) -> Verifier:
    verifier = Verifier(ledger.authority.public_key())
    for roster, signature in ledger.store.rosters():
        verifier.add_roster(roster, signature, check_possession=False)
    return verifier


def _stored_nodes(blocks: list[dict[str, Any]]) -> list[list[bytes]]:
    """The Merkle subtree hashes a database stores beside each entry row, block by block."""
    frontier = merkle.Frontier()
    return [
        [b"".join(frontier.append(merkle.leaf_hash(canonical_bytes(e)))) for e in b["entries"]]
        for b in blocks
    ]


def _fault_of_each_way(
    ledger: Ledger, blocks: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> list[Any]:
    """What verifying ``blocks`` in order gives each way they can come to the verifier: parsed
    entries, stored bytes with the compiled reader, stored bytes parsed in Python."""
    nodes = _stored_nodes(blocks)
    results = []
    for way in ("parsed", "compiled", "python"):
        verifier = _verifier(ledger)
        with monkeypatch.context() as patched:
            if way == "python":
                patched.setattr(verify_module, "_speedups", None)
            try:
                for block, stored_nodes in zip(blocks, nodes, strict=True):
                    header, signature = block["header"], block["signature"]
                    if way == "parsed":
                        verifier.add_block(header, signature, block["entries"])
                        continue
                    datas = [canonical_bytes(entry) for entry in block["entries"]]
                    verifier.add_block(header, signature, stored=datas, stored_nodes=stored_nodes)
            except VerificationError as exc:
                results.append((str(exc), exc.chain, exc.height, exc.seq))
                continue
        results.append(("verified", verifier.summary.entries))
    return results


@pytest.mark.parametrize("count", [1, 2, 3])
def test_a_later_block_numbering_its_entries_again_from_0_is_refused(
    ledger_db: Ledger, count: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Block 1 holds as many entries as block 0, numbered 0.. again: the seqs of
    ``range(first_seq)``, never those of ``range(first_seq, first_seq + count)``."""
    first = [_entry(seq, seq) for seq in range(count)]
    again = [_entry(seq, count + seq) for seq in range(count)]
    blocks = _chain(ledger_db, [first, again])
    fault = (
        f"chain hosp-a, block height 1, seq {count}: entry says seq 0 where seq {count} belongs",
        "hosp-a",
        1,
        count,
    )
    assert _fault_of_each_way(ledger_db, blocks, monkeypatch) == [fault] * 3
    # the same block numbered as it should be verifies every way
    right = [_entry(count + seq, count + seq) for seq in range(count)]
    blocks = _chain(ledger_db, [first, right])
    assert _fault_of_each_way(ledger_db, blocks, monkeypatch) == [("verified", 2 * count)] * 3


def test_an_export_whose_later_block_numbers_its_entries_again_is_refused_alike(
    ledger_db: Ledger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same fault in an export: its canonical block lines go to the compiled reader, and
    without it to the parsed entries; both name it at its line's first entry."""
    blocks = _chain(ledger_db, [[_entry(0, 0), _entry(1, 1)], [_entry(0, 2), _entry(1, 3)]])
    lines = [next(iter(ledger_db.store.export_lines()))]
    for block in blocks:
        datas = [canonical_bytes(entry) for entry in block["entries"]]
        lines.append(block_bytes(datas, canonical_bytes(block["header"]), block["signature"]))
    export = tmp_path / "export.jsonl"
    export.write_bytes(b"".join(line + b"\n" for line in lines))
    authority = ledger_db.authority.public_key()
    fault = (
        "fault",
        "chain hosp-a, block height 1, seq 2: entry says seq 0 where seq 2 belongs",
        "entry says seq 0 where seq 2 belongs",
        "hosp-a",
        1,
        2,
    )
    assert outcome(verify_export, export, authority) == fault
    with monkeypatch.context() as patched:
        patched.setattr(verify_module, "_speedups", None)
        assert outcome(verify_export, export, authority) == fault
