"""The auditor's verification: valid ledgers pass, and any single changed byte of any stored
row or export line is found and placed."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from ledger import keys
from ledger.errors import StoreError, VerificationError
from ledger.store import ChainStore, ChainWriter
from ledger.verify import verify_database, verify_export
from tests.helpers.ledgers import Ledger, make_ledger, rows_changeable


def _fill(ledger: Ledger) -> None:
    with ChainWriter(ledger.store, "hosp-a", ledger.key) as writer:
        writer.append("consent.granted", {"consent_id": "c-1", "patient": "ab" * 32})
        writer.append_many([("access.requested", {"n": n, "reason": "复诊"}) for n in range(4)])
        writer.append_many([("access.decided", {"n": n}) for n in range(3)])


def _export(ledger: Ledger, path: Path) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in ledger.store.export_lines()))
    return path


def _changed(value: Any, position: int) -> Any:
    """``value`` with one byte changed at ``position`` (integers: one bit of one byte)."""
    if isinstance(value, int):
        return value ^ (1 << (8 * position + 5))
    raw = bytearray(value if isinstance(value, bytes) else value.encode())
    raw[position % len(raw)] ^= 0x01 if raw[position % len(raw)] != 0x7E else 0x02
    return bytes(raw) if isinstance(value, bytes) else raw.decode("latin-1")


KEYS = {
    "ledger_roster": ["version"],
    "ledger_blocks": ["chain", "height"],
    "ledger_entries": ["chain", "seq"],
}


def _rows(store: ChainStore, table: str) -> list[dict[str, Any]]:
    with store.engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(sa.text(f"SELECT * FROM {table}"))]


def test_valid_ledger_verifies_from_database_and_export(ledger_db: Ledger, tmp_path: Path) -> None:
    _fill(ledger_db)
    authority = ledger_db.authority.public_key()
    for summary in (
        verify_database(ledger_db.store, authority),
        verify_export(_export(ledger_db, tmp_path / "e.jsonl"), authority),
    ):
        assert summary.anchored and summary.rosters == [1]
        assert (summary.blocks, summary.entries) == (3, 8)
        assert summary.chains["hosp-a"].height == 2


def test_break_glass_accesses_are_listed_for_the_auditor(ledger_db: Ledger, tmp_path: Path) -> None:
    _fill(ledger_db)
    with ChainWriter(ledger_db.store, "hosp-a", ledger_db.key) as writer:
        writer.append_many(
            [
                ("access.decided", {"request_id": "r1", "decision": "permit"}),
                ("emergency.access", {"request_id": "r1", "requester_org": "hosp-b"}),
            ]
        )
        writer.append("emergency.access", {"request_id": "r2", "requester_org": "hosp-c"})
    anchor = ledger_db.authority.public_key()
    for summary in (
        verify_database(ledger_db.store, anchor),
        verify_export(_export(ledger_db, tmp_path / "ledger.jsonl"), anchor),
    ):
        assert [(e.chain, e.seq, e.requester) for e in summary.emergencies] == [
            ("hosp-a", 9, "hosp-b"),
            ("hosp-a", 10, "hosp-c"),
        ]


def test_wrong_authority_is_refused(ledger_db: Ledger, tmp_path: Path) -> None:
    _fill(ledger_db)
    stranger = keys.load_or_create_private_key(tmp_path / "stranger.pem").public_key()
    with pytest.raises(VerificationError, match="roster version 1: authority signature"):
        verify_database(ledger_db.store, stranger)
    summary = verify_database(ledger_db.store, None)
    assert not summary.anchored


def test_every_changed_byte_of_every_row_is_found(ledger_db: Ledger) -> None:
    _fill(ledger_db)
    authority = ledger_db.authority.public_key()
    cases = 0
    for table, key_columns in KEYS.items():
        for row in _rows(ledger_db.store, table):
            for column, value in row.items():
                size = 8 if isinstance(value, int) else len(value)
                positions = sorted(
                    {0, 1, size // 3, size // 2, size - 2, size - 1} & set(range(size))
                )
                if isinstance(value, int):
                    positions = [0, 1]
                for position in positions:
                    where = " AND ".join(f"{k} = :k_{k}" for k in key_columns)
                    params = {f"k_{k}": row[k] for k in key_columns}
                    new_value = _changed(value, position)
                    with rows_changeable(ledger_db.store) as conn:
                        conn.execute(
                            sa.text(f"UPDATE {table} SET {column} = :new WHERE {where}"),
                            {"new": new_value, **params},
                        )
                    new_params = {
                        f"k_{k}": (new_value if k == column else row[k]) for k in key_columns
                    }
                    try:
                        with pytest.raises(VerificationError) as caught:
                            verify_database(ledger_db.store, authority)
                    finally:
                        with rows_changeable(ledger_db.store) as conn:
                            conn.execute(
                                sa.text(
                                    f"UPDATE {table} SET {column} = :old WHERE "
                                    + " AND ".join(f"{k} = :k_{k}" for k in key_columns)
                                ),
                                {"old": value, **new_params},
                            )
                    message = str(caught.value)
                    if table == "ledger_roster":
                        assert "roster" in message, message
                    else:
                        assert "chain" in message and ("height" in message or "seq" in message), (
                            table,
                            column,
                            position,
                            message,
                        )
                    cases += 1
    assert cases > 100
    verify_database(ledger_db.store, authority)  # every row restored


def test_fault_names_chain_height_and_seq(ledger_db: Ledger, tmp_path: Path) -> None:
    _fill(ledger_db)
    with rows_changeable(ledger_db.store) as conn:
        data = conn.execute(sa.text("SELECT data FROM ledger_entries WHERE seq = 3")).scalar_one()
        changed = bytes(data).replace(b'"n":2', b'"n":7')
        conn.execute(sa.text("UPDATE ledger_entries SET data = :d WHERE seq = 3"), {"d": changed})
    with pytest.raises(VerificationError) as caught:
        verify_database(ledger_db.store, ledger_db.authority.public_key())
    fault = caught.value
    assert (fault.chain, fault.height, fault.seq) == ("hosp-a", 1, 3)
    assert "leaf hash stored with it" in fault.what
    # The same change in an export (which carries no stored hashes) breaks the signed root.
    lines = [line.replace(b'"n":2', b'"n":7') for line in ledger_db.store.export_lines()]
    export = tmp_path / "e.jsonl"
    export.write_bytes(b"\n".join(lines))
    with pytest.raises(VerificationError, match="tree_root") as caught:
        verify_export(export, ledger_db.authority.public_key())
    assert (caught.value.chain, caught.value.height) == ("hosp-a", 1)


def test_missing_and_extra_entry_rows_are_found(ledger_db: Ledger) -> None:
    _fill(ledger_db)
    with rows_changeable(ledger_db.store) as conn:
        conn.execute(sa.text("DELETE FROM ledger_entries WHERE seq = 7"))
    with pytest.raises(VerificationError, match="entry row is missing") as caught:
        verify_database(ledger_db.store, ledger_db.authority.public_key())
    assert (caught.value.chain, caught.value.height, caught.value.seq) == ("hosp-a", 2, 7)
    with rows_changeable(ledger_db.store) as conn:
        conn.execute(
            sa.text(
                "INSERT INTO ledger_entries (chain, seq, data, nodes) VALUES ('hosp-a', 7, :d, :n)"
            ),
            {"d": b"{}", "n": b""},
        )
        conn.execute(sa.text("UPDATE ledger_entries SET seq = 8 WHERE seq = 7"))
    with pytest.raises(VerificationError, match="entry row is missing"):
        verify_database(ledger_db.store, ledger_db.authority.public_key())


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_every_changed_byte_of_the_export_is_found(ledger_db: Ledger, tmp_path: Path) -> None:
    _fill(ledger_db)
    export = _export(ledger_db, tmp_path / "e.jsonl")
    authority = ledger_db.authority.public_key()
    original = _lines(export)
    tampered = tmp_path / "t.jsonl"
    for number, line in enumerate(original):
        for position in range(0, len(line) - 1, 7):  # every 7th byte of every line
            changed = bytearray(line)
            changed[position] ^= 0x01
            tampered.write_bytes(
                b"".join([*original[:number], bytes(changed), *original[number + 1 :]])
            )
            try:
                summary = verify_export(tampered, authority)
            except VerificationError:
                continue
            # A change JSON cannot see (e.g. an escaped character written another way) is fine
            # only if the content is the same.
            assert json.loads(bytes(changed)) == json.loads(line), (number, position, summary)


def test_reordered_dropped_or_repeated_blocks_are_found(ledger_db: Ledger, tmp_path: Path) -> None:
    _fill(ledger_db)
    lines = _lines(_export(ledger_db, tmp_path / "e.jsonl"))
    authority = ledger_db.authority.public_key()
    variants = {
        "dropped": [lines[0], lines[1], lines[3]],
        "swapped": [lines[0], lines[2], lines[1], lines[3]],
        "repeated": [lines[0], lines[1], lines[1], lines[2], lines[3]],
        "no roster": lines[1:],
    }
    for name, variant in variants.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(b"".join(variant))
        with pytest.raises(VerificationError):
            verify_export(path, authority)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda e: e.update(type=["x"]), "entry type"),
        (lambda e: e["body"].update(fee=1.5), "floating-point"),
        (lambda e: e["body"].update({"名": 1}), "not ASCII"),
        (lambda e: e["body"].update(big=2**60), "53-bit"),
        (lambda e: e.update(seq=99), "seq 99"),
        (lambda e: e.update(chain="hosp-b"), "says chain"),
        (lambda e: e.update(time="2099-01-01T00:00:00.000Z"), "after its block's time"),
        (lambda e: e.update(time="2026-02-30T00:00:00.000Z"), "not a valid date"),
        (lambda e: e.pop("v"), "malformed entry"),
    ],
)
def test_malformed_export_entries_are_named(
    ledger_db: Ledger, tmp_path: Path, change: Any, problem: str
) -> None:
    """Each malformed entry in an otherwise well-formed export is reported at its seq."""
    _fill(ledger_db)
    lines = [json.loads(line) for line in ledger_db.store.export_lines()]
    change(lines[2]["entries"][1])
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(line, ensure_ascii=False) for line in lines))
    with pytest.raises(VerificationError, match=problem) as caught:
        verify_export(path, ledger_db.authority.public_key())
    assert (caught.value.chain, caught.value.height, caught.value.seq) == ("hosp-a", 1, 2)


def test_duplicate_keys_in_an_export_are_refused(ledger_db: Ledger, tmp_path: Path) -> None:
    _fill(ledger_db)
    lines = list(ledger_db.store.export_lines())
    lines[1] = lines[1].replace(b'{"body":{', b'{"body":{"grantees":["*"]},"body":{', 1)
    path = tmp_path / "dup.jsonl"
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(VerificationError, match="'body' appears twice"):
        verify_export(path, ledger_db.authority.public_key())


def test_duplicate_keys_in_a_certificate_line_are_refused(
    ledger_db: Ledger, tmp_path: Path
) -> None:
    _fill(ledger_db)
    lines = list(ledger_db.store.export_lines())
    lines.append(b'{"certificate":{"signers":["hosp-x"],"signers":["hosp-a"]}}')
    path = tmp_path / "dup.jsonl"
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(VerificationError, match="'signers' appears twice"):
        verify_export(path, ledger_db.authority.public_key())


def test_block_rows_outside_the_chain_are_found(ledger_db: Ledger) -> None:
    _fill(ledger_db)
    with rows_changeable(ledger_db.store) as conn:
        conn.execute(
            sa.text(
                "INSERT INTO ledger_blocks (chain, height, tree_size, header, signature) "
                "SELECT chain, -1, 99, header, signature FROM ledger_blocks WHERE height = 0"
            )
        )
    with pytest.raises(VerificationError, match=r"4 block rows numbered -1\.\.2"):
        verify_database(ledger_db.store, ledger_db.authority.public_key())


def test_auditor_opens_a_sqlite_file_read_only(tmp_path: Path) -> None:
    ledger = make_ledger(str(tmp_path / "l.db"), tmp_path)
    _fill(ledger)
    ledger.store.close()
    with sqlite3.connect(tmp_path / "l.db") as conn:
        conn.execute("PRAGMA journal_mode=DELETE")
    before = (tmp_path / "l.db").read_bytes()
    store = ChainStore(str(tmp_path / "l.db"), read_only=True)
    verify_database(store, ledger.authority.public_key())
    store.close()
    assert (tmp_path / "l.db").read_bytes() == before
    with pytest.raises(StoreError, match="does not exist"):
        ChainStore(str(tmp_path / "typo.db"), read_only=True)
    assert not (tmp_path / "typo.db").exists()


def test_the_first_fault_in_seq_order_is_named(ledger_db: Ledger, tmp_path: Path) -> None:
    _fill(ledger_db)
    lines = [json.loads(line) for line in ledger_db.store.export_lines()]
    lines[2]["entries"][0]["chain"] = "hosp-b"  # seq 1
    lines[2]["entries"][2]["body"]["fee"] = 1.5  # seq 3
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(line, ensure_ascii=False) for line in lines))
    with pytest.raises(VerificationError, match="says chain") as caught:
        verify_export(path, ledger_db.authority.public_key())
    assert caught.value.seq == 1


def test_stored_subtree_hashes_checked_a_level_at_a_time() -> None:
    """The level-wise check agrees with appending one leaf at a time, for blocks anywhere."""
    import random

    from ledger import merkle
    from ledger.verify import _stored_nodes_match

    rng = random.Random(7)
    leaves = [merkle.leaf_hash(rng.randbytes(4)) for _ in range(300)]
    frontier = merkle.Frontier()
    rows = [b"".join(frontier.append(leaf)) for leaf in leaves]
    for _ in range(500):
        first = rng.randrange(300)
        count = rng.randrange(1, 301 - first)
        block, stored = leaves[first : first + count], rows[first : first + count]
        before = merkle.Frontier()
        before.extend(leaves[:first])
        completed = before.copy().extend(block)
        assert _stored_nodes_match(stored, first, block, completed)
        tampered = list(stored)
        row = rng.randrange(count)
        changed = bytearray(tampered[row])
        changed[rng.randrange(len(changed))] ^= 1
        tampered[row] = bytes(changed)
        assert not _stored_nodes_match(tampered, first, block, completed)
