"""The chain store on both engines: appends, group commit, proofs, append-only tables."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledger import keys, merkle
from ledger.canonical import canonical_bytes
from ledger.errors import EntryError, ProofError, SigningHeld, StoreError
from ledger.store import ChainStore, ChainWriter, chains, open_engine
from ledger.store import writer as writer_module
from ledger.verify import verify_database
from tests.helpers.ledgers import BLS_KEY, Ledger, make_ledger


def _leaf(store: ChainStore, chain: str, seq: int) -> bytes:
    return merkle.leaf_hash(canonical_bytes(store.entry(chain, seq)))


def test_appends_form_signed_blocks(ledger_db: Ledger) -> None:
    with ChainWriter(ledger_db.store, "hosp-a", ledger_db.key) as writer:
        assert writer.append("consent.granted", {"consent_id": "c-1"}) == 0
        assert writer.append_many([("access.requested", {"n": i}) for i in range(5)]) == [
            1,
            2,
            3,
            4,
            5,
        ]
    head = ledger_db.store.heads()["hosp-a"]
    assert head.header["height"] == 1
    assert head.header["tree_size"] == 6
    assert head.header["first_seq"] == 1 and head.header["count"] == 5
    keys.verify(
        ledger_db.key.public_key(), keys.BLOCK_DOMAIN, bytes.fromhex(head.hash), head.signature
    )
    entry = ledger_db.store.entry("hosp-a", 3)
    assert entry["type"] == "access.requested" and entry["body"] == {"n": 2}
    assert entry["seq"] == 3 and entry["chain"] == "hosp-a" and entry["v"] == 1
    summary = verify_database(ledger_db.store, ledger_db.authority.public_key())
    assert summary.entries == 6 and summary.blocks == 2


def test_threads_are_group_committed_into_one_linear_chain(ledger_db: Ledger) -> None:
    seqs: list[int] = []
    lock = threading.Lock()
    with ChainWriter(ledger_db.store, "hosp-a", ledger_db.key) as writer:

        def work(worker: int) -> None:
            for n in range(50):
                seq = writer.append("access.requested", {"worker": worker, "n": n})
                with lock:
                    seqs.append(seq)

        threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sorted(seqs) == list(range(400))
    assert ledger_db.store.block_count() < 400  # batched: fewer signatures than entries
    verify_database(ledger_db.store, ledger_db.authority.public_key())


def test_large_append_is_split_into_blocks_in_one_call(ledger_db: Ledger) -> None:
    with ChainWriter(ledger_db.store, "hosp-a", ledger_db.key, max_block_entries=10) as writer:
        assert writer.append_many([("access.requested", {"n": i}) for i in range(35)]) == list(
            range(35)
        )
    assert next(iter(ledger_db.store.heads().values())).header["height"] == 3
    verify_database(ledger_db.store, ledger_db.authority.public_key())


def test_bad_body_is_refused_and_nothing_appended(ledger_db: Ledger) -> None:
    with ChainWriter(ledger_db.store, "hosp-a", ledger_db.key) as writer:
        writer.append("consent.granted", {"ok": 1})
        for bad in ({"fee": 1.5}, {"名字": "x"}, [1, 2]):
            with pytest.raises(EntryError):
                writer.append_many([("access.requested", {"n": 1}), ("access.requested", bad)])  # type: ignore[list-item]
        with pytest.raises(EntryError, match="dotted lowercase"):
            writer.append("Consent", {})
    assert ledger_db.store.heads()["hosp-a"].tree_size == 1


def test_writer_key_must_be_the_rosters(ledger_db: Ledger, tmp_path: Path) -> None:
    other = keys.load_or_create_private_key(tmp_path / "other.pem")
    with pytest.raises(StoreError, match="not the key roster version 1 lists"):
        ChainWriter(ledger_db.store, "hosp-a", other)
    with pytest.raises(Exception, match="not a member"):
        ChainWriter(ledger_db.store, "hosp-z", ledger_db.key)


def test_two_writers_on_one_chain_never_fork(ledger_db: Ledger) -> None:
    """Each writer re-reads the head under the lock, so alternating writers extend one chain."""
    first = ChainWriter(ledger_db.store, "hosp-a", ledger_db.key)
    second = ChainWriter(ChainStore(ledger_db.url), "hosp-a", ledger_db.key)
    try:
        for n in range(20):
            writer = first if n % 3 else second
            assert writer.append("access.requested", {"n": n}) == n
    finally:
        first.close()
        second.close()
    verify_database(ledger_db.store, ledger_db.authority.public_key())


def test_append_in_a_transaction_commits_or_rolls_back_with_it(ledger_db: Ledger) -> None:
    """A transactional append is stored only when the caller's transaction commits, and
    interleaves with group-committed appends without forking the chain."""
    engine = open_engine(ledger_db.url, immediate=True)
    store = ChainStore(engine)
    with ChainWriter(store, "hosp-a", ledger_db.key) as writer:
        assert writer.append("access.requested", {"n": 0}) == 0
        with engine.begin() as conn:
            assert writer.append_in(conn, [("consent.granted", {"consent_id": "c-1"})]) == [1]
        assert store.entry("hosp-a", 1)["body"] == {"consent_id": "c-1"}
        with pytest.raises(RuntimeError), engine.begin() as conn:
            writer.append_in(conn, [("consent.revoked", {"consent_id": "c-1"})])
            raise RuntimeError("the rest of the transaction failed")
        assert store.heads()["hosp-a"].tree_size == 2
        assert writer.append("access.requested", {"n": 2}) == 2
        with engine.begin() as conn:
            assert writer.append_in(conn, [("consent.revoked", {"consent_id": "c-1"})] * 2) == [
                3,
                4,
            ]
        assert writer.append("access.requested", {"n": 5}) == 5
        with pytest.raises(EntryError), engine.begin() as conn:
            writer.append_in(conn, [("consent.granted", {"fee": 1.5})])
    verify_database(ledger_db.store, ledger_db.authority.public_key())
    engine.dispose()


def test_entries_are_indexed_by_the_patient_they_name(ledger_db: Ledger, tmp_path: Path) -> None:
    """Group-committed, transactional and replicated entries all land in the patient index."""
    alice, bob = "a" * 64, "b" * 64
    engine = open_engine(ledger_db.url, immediate=True)
    with ChainWriter(ChainStore(engine), "hosp-a", ledger_db.key) as writer:
        writer.append_many(
            [
                ("consent.granted", {"consent_id": "c1", "patient": alice}),
                ("access.requested", {"request_id": "r1", "patient": bob}),
                ("access.decided", {"request_id": "r1", "patient": 7}),  # not a pseudonym
                ("checkpoint.note", {"n": 1}),
            ]
        )
        with engine.begin() as conn:
            writer.append_in(conn, [("consent.revoked", {"consent_id": "c1", "patient": alice})])
    engine.dispose()
    about_alice = ledger_db.store.entries_about(alice)
    assert [(e["seq"], e["type"]) for e in about_alice] == [
        (0, "consent.granted"),
        (4, "consent.revoked"),
    ]
    assert [e["seq"] for e in ledger_db.store.entries_about(alice, ["consent.revoked"])] == [4]
    assert [e["seq"] for e in ledger_db.store.entries_about(bob)] == [1]
    # a replica imports the blocks and indexes them the same way
    replica = make_ledger(f"sqlite:///{tmp_path / 'replica.db'}", tmp_path / "replica")
    replica.store.import_blocks(
        "hosp-a",
        "0" * 64,
        [
            (bytes(b.header_bytes), b.signature, b.entry_data, b.entry_nodes)
            for b in ledger_db.store.block_rows("hosp-a")
        ],
    )
    assert replica.store.entries_about(alice) == about_alice
    with pytest.raises(sa.exc.DBAPIError), ledger_db.store.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM ledger_subjects"))


def test_proofs_verify_against_signed_heads(ledger_db: Ledger) -> None:
    store = ledger_db.store
    with ChainWriter(store, "hosp-a", ledger_db.key) as writer:
        for size in (1, 2, 3, 5, 8, 13, 21, 34, 55, 89):
            writer.append_many([("access.requested", {"n": n}) for n in range(size)])
    heads = {}
    for block in store.block_rows("hosp-a"):
        heads[block.header["tree_size"]] = bytes.fromhex(block.header["tree_root"])
    assert len(heads) == 10
    for size, root in heads.items():
        for seq in {0, size // 2, size - 1}:
            proof = store.inclusion_proof("hosp-a", seq, size)
            assert proof["tree_size"] == size and proof["leaf_index"] == seq
            path = [bytes.fromhex(h) for h in proof["audit_path"]]
            merkle.verify_inclusion(_leaf(store, "hosp-a", seq), seq, size, path, root)
    sizes = sorted(heads)
    for first in sizes:
        for second in sizes:
            if first <= second:
                proof = store.consistency_proof("hosp-a", first, second)
                path = [bytes.fromhex(h) for h in proof["path"]]
                merkle.verify_consistency(first, second, heads[first], heads[second], path)
    newest = store.inclusion_proof("hosp-a", 7)
    assert newest["tree_size"] == sizes[-1]


def test_proofs_only_for_signed_sizes(ledger_db: Ledger) -> None:
    with ChainWriter(ledger_db.store, "hosp-a", ledger_db.key) as writer:
        writer.append_many([("access.requested", {"n": n}) for n in range(4)])
        writer.append_many([("access.requested", {"n": n}) for n in range(4)])
    with pytest.raises(StoreError, match="no block of chain hosp-a signs tree size 5"):
        ledger_db.store.inclusion_proof("hosp-a", 1, 5)
    with pytest.raises(ProofError, match="not below tree size 4"):
        ledger_db.store.inclusion_proof("hosp-a", 4, 4)
    with pytest.raises(StoreError):
        ledger_db.store.consistency_proof("hosp-a", 3, 8)
    with pytest.raises(StoreError, match="no blocks"):
        ledger_db.store.inclusion_proof("hosp-q", 0)


def _ledger_tables_refuse(store: ChainStore, statements: list[str]) -> None:
    for statement in statements:
        with pytest.raises(sa.exc.DatabaseError, match="append-only"), store.engine.begin() as conn:
            conn.exec_driver_sql(statement)


def test_database_refuses_update_and_delete(ledger_db: Ledger) -> None:
    with ChainWriter(ledger_db.store, "hosp-a", ledger_db.key) as writer:
        writer.append_many([("access.requested", {"n": n}) for n in range(3)])
    statements = [
        "UPDATE ledger_entries SET data = data WHERE seq = 1",
        "DELETE FROM ledger_entries WHERE seq = 2",
        "UPDATE ledger_blocks SET signature = 'x'",
        "DELETE FROM ledger_blocks",
        "UPDATE ledger_roster SET version = 2",
        "DELETE FROM ledger_roster",
    ]
    if ledger_db.store.is_postgres:
        statements += [
            "TRUNCATE ledger_entries",
            "TRUNCATE ledger_blocks",
            "TRUNCATE ledger_roster",
        ]
    _ledger_tables_refuse(ledger_db.store, statements)
    summary = verify_database(ledger_db.store, ledger_db.authority.public_key())
    assert summary.entries == 3


def test_frontier_is_rebuilt_from_stored_nodes(ledger_db: Ledger, tmp_path: Path) -> None:
    """A writer that starts on an existing chain loads O(log n) nodes and goes on correctly."""
    for round_ in range(5):
        with ChainWriter(ChainStore(ledger_db.url), "hosp-a", ledger_db.key) as writer:
            writer.append_many(
                [("access.requested", {"r": round_, "n": n}) for n in range(round_ * 7 + 3)]
            )
    verify_database(ledger_db.store, ledger_db.authority.public_key())


def test_uninitialised_database_is_named(tmp_path: Path) -> None:
    store = ChainStore(str(tmp_path / "empty.db"))
    with pytest.raises(StoreError, match="holds no ledger; create one with: hrx ledger init"):
        store.heads()


def test_roster_versions_only_go_up(ledger_db: Ledger, tmp_path: Path) -> None:
    roster, signature = ledger_db.store.rosters()[0]
    with pytest.raises(StoreError, match="not newer"):
        ledger_db.store.add_roster(roster, signature)


def test_second_chain_in_one_database(db_url: str, tmp_path: Path) -> None:
    ledger = make_ledger(db_url, tmp_path)
    with ChainWriter(ledger.store, "hosp-a", ledger.key) as writer:
        writer.append("consent.granted", {"a": 1})
    assert ledger.store.chains() == ["hosp-a"]
    ledger.store.close()


def test_writer_refuses_to_sign_once_the_roster_rotates_its_key(
    ledger_db: Ledger, tmp_path: Path
) -> None:
    """A block signed with a key the newest roster no longer lists could never verify."""
    from ledger.roster import make_member, make_roster, sign_roster

    with ChainWriter(ledger_db.store, "hosp-a", ledger_db.key) as writer:
        writer.append("consent.granted", {"n": 0})
        rotated = keys.load_or_create_private_key(tmp_path / "rotated.pem")
        member = make_member(
            "hosp-a", "Hospital hosp-a", "https://hosp-a.example", rotated, BLS_KEY
        )
        roster = make_roster("test", [member], quorum=1, version=2)
        ledger_db.store.add_roster(roster, sign_roster(roster, ledger_db.authority))
        with pytest.raises(StoreError, match="not the key roster version 2 lists"):
            writer.append("consent.granted", {"n": 1})
    assert ledger_db.store.heads()["hosp-a"].tree_size == 1
    stale = verify_database(ledger_db.store, ledger_db.authority.public_key())
    assert stale.warnings == [
        "chain hosp-a: its newest block is signed under roster version 1, "
        "and roster version 2 gives it another key"
    ]
    with ChainWriter(ledger_db.store, "hosp-a", rotated) as writer:
        assert writer.append("consent.granted", {"n": 1}) == 1
    summary = verify_database(ledger_db.store, ledger_db.authority.public_key())
    assert summary.chains["hosp-a"].roster == 2 and summary.warnings == []


def test_pages_of_blocks_are_cut_to_the_entry_budget(
    ledger_db: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    with ChainWriter(ledger_db.store, "hosp-a", ledger_db.key, max_block_entries=4) as writer:
        writer.append_many([("access.requested", {"n": n}) for n in range(30)])
    whole = list(ledger_db.store.export_lines())
    monkeypatch.setattr(chains, "PAGE_ENTRIES", 5)
    assert list(ledger_db.store.export_lines()) == whole
    assert [b.row_height for b in ledger_db.store.block_rows("hosp-a", page=3)] == list(range(8))
    assert verify_database(ledger_db.store, ledger_db.authority.public_key()).entries == 30


def test_a_signing_hold_stops_the_writer_before_it_signs_anything(
    ledger_db: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The committer may build a block before it has read the hold (on PostgreSQL, while the
    database takes the lock), but it signs none while a hold is set."""
    signed: list[bytes] = []
    sign = keys.sign

    def counted(key: Ed25519PrivateKey, domain: bytes, digest: bytes) -> str:
        signed.append(digest)
        return sign(key, domain, digest)

    monkeypatch.setattr(keys, "sign", counted)
    with ChainWriter(ledger_db.store, "hosp-a", ledger_db.key) as writer:
        assert writer.append("access.requested", {"n": 0}) == 0  # the writer knows the head
        ledger_db.store.hold_signing("restored from a backup")
        for _ in range(2):
            with pytest.raises(SigningHeld, match="restored from a backup"):
                writer.append("access.requested", {"n": 1})
        assert len(signed) == 1
        ledger_db.store.release_signing()
        assert writer.append_many([("access.requested", {"n": n}) for n in (1, 2)]) == [1, 2]
    assert len(signed) == 2
    assert verify_database(ledger_db.store, ledger_db.authority.public_key()).entries == 3


def test_a_new_roster_keeping_the_key_is_named_by_the_next_block(
    ledger_db: Ledger, tmp_path: Path
) -> None:
    """A block built before the newest roster version was read is built again under it."""
    from ledger.roster import make_member, make_roster, sign_roster

    with ChainWriter(ledger_db.store, "hosp-a", ledger_db.key) as writer:
        writer.append("consent.granted", {"n": 0})
        member = make_member(
            "hosp-a", "Hospital hosp-a", "https://hosp-a.example", ledger_db.key, BLS_KEY
        )
        roster = make_roster("test", [member], quorum=1, version=2)
        ledger_db.store.add_roster(roster, sign_roster(roster, ledger_db.authority))
        assert writer.append("consent.granted", {"n": 1}) == 1
        assert ledger_db.store.heads()["hosp-a"].header["roster"] == 2
        assert writer.append("consent.granted", {"n": 2}) == 2
    assert ledger_db.store.heads()["hosp-a"].header["roster"] == 2
    summary = verify_database(ledger_db.store, ledger_db.authority.public_key())
    assert summary.entries == 3 and summary.warnings == []


def test_a_batch_is_written_whatever_the_rows_per_statement(
    ledger_db: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL a table's rows go in INSERTs of at most POSTGRES_ROWS_PER_INSERT rows:
    every row lands once, whether a table's rows fill a statement, more, or fewer."""
    monkeypatch.setattr(writer_module, "POSTGRES_ROWS_PER_INSERT", 3)
    alice = "a" * 64
    with ChainWriter(ledger_db.store, "hosp-a", ledger_db.key, max_block_entries=4) as writer:
        for count in (1, 3, 7, 9):
            first = ledger_db.store.heads().get("hosp-a")
            start = 0 if first is None else first.tree_size
            items = [("consent.granted", {"n": n, "patient": alice}) for n in range(count)]
            assert writer.append_many(items) == list(range(start, start + count))
    about = [e["body"]["n"] for e in ledger_db.store.entries_about(alice)]
    assert about == [0, *range(3), *range(7), *range(9)]
    assert [b.row_height for b in ledger_db.store.block_rows("hosp-a")] == list(range(7))
    summary = verify_database(ledger_db.store, ledger_db.authority.public_key())
    assert summary.entries == 20 and summary.blocks == 7


def test_postgres_inserts_cut_rows_into_statements(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer_module, "POSTGRES_ROWS_PER_INSERT", 2)
    rows = [("hosp-a", seq, b"d", b"n") for seq in range(5)]
    statements = list(writer_module._postgres_inserts("entries", rows))
    group = "(%s, %s, %s, %s)"
    insert = "INSERT INTO ledger_entries (chain, seq, data, nodes) VALUES "
    assert statements == [
        (f"{insert}{group}, {group}", ["hosp-a", 0, b"d", b"n", "hosp-a", 1, b"d", b"n"]),
        (f"{insert}{group}, {group}", ["hosp-a", 2, b"d", b"n", "hosp-a", 3, b"d", b"n"]),
        (f"{insert}{group}", ["hosp-a", 4, b"d", b"n"]),
    ]
    assert list(writer_module._postgres_inserts("subjects", [])) == []
