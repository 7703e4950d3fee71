"""The group committer's PostgreSQL path (libpq's pipeline mode, prepared statements): a
failed transaction fails exactly the appends it held, a lost connection is replaced, every
statement shape is written whether prepared or not, and concurrent appends land once each,
in order, on one linear chain."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from ledger.errors import StoreError
from ledger.store import ChainWriter
from ledger.store import writer as writer_module
from ledger.store.schema import writer_lock_key
from ledger.verify import verify_database
from tests.helpers.ledgers import Ledger, make_ledger

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_ledger(postgres_url: str, tmp_path: Path) -> Iterator[Ledger]:
    ledger = make_ledger(postgres_url, tmp_path)
    yield ledger
    ledger.store.close()


def _until(condition: Callable[[], bool], what: str) -> None:
    """Wait for a condition of the test's own making (never a timing assertion: a generous
    bound only keeps a broken writer from hanging the run)."""
    deadline = time.monotonic() + 60
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.005)


def _bodies(ledger: Ledger) -> list[dict[str, object]]:
    head = ledger.store.heads().get("hosp-a")
    size = 0 if head is None else head.tree_size
    return [ledger.store.entry("hosp-a", seq)["body"] for seq in range(size)]


def test_numbered_parameters() -> None:
    assert writer_module._numbered("SELECT %s, %s") == b"SELECT $1, $2"
    assert writer_module._numbered("COMMIT") == b"COMMIT"


def test_a_failed_transaction_fails_exactly_the_appends_it_held(pg_ledger: Ledger) -> None:
    """Three appends queue while the committer waits for the chain's lock; one of them cannot
    be stored (PostgreSQL refuses a NUL in text), so its whole batch fails and nothing of it is
    stored, while the batch before and the append after are stored."""
    results: dict[str, object] = {}
    admin = psycopg.connect(pg_ledger.url, autocommit=True)
    try:
        with ChainWriter(pg_ledger.store, "hosp-a", pg_ledger.key) as writer:
            assert writer.append("access.requested", {"n": "first"}) == 0

            def append(name: str, body: dict[str, object]) -> None:
                try:
                    results[name] = writer.append("access.requested", body)
                except StoreError as exc:
                    results[name] = exc

            admin.execute("SELECT pg_advisory_lock(%s)", (writer_lock_key("hosp-a"),))
            threads = [threading.Thread(target=append, args=("a", {"n": "a"}))]
            threads[0].start()
            _until(lambda: writer._waiting == [], "the committer to take the first batch")
            _until(
                lambda: (
                    admin.execute(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                    ).fetchone()
                    == (1,)
                ),
                "the committer to wait for the chain's lock",
            )
            bodies = {"b": {"n": "b"}, "c": {"n": "c", "patient": "bad\0patient"}, "d": {"n": "d"}}
            for name, body in bodies.items():
                threads.append(threading.Thread(target=append, args=(name, body)))
                threads[-1].start()
            _until(lambda: len(writer._waiting) == 3, "three appends queued behind the lock")
            admin.execute("SELECT pg_advisory_unlock(%s)", (writer_lock_key("hosp-a"),))
            for thread in threads:
                thread.join()
            assert results["a"] == 1
            for name in "bcd":
                assert isinstance(results[name], StoreError)
                assert "nothing of it was stored" in str(results[name])
            assert writer.append("access.requested", {"n": "after"}) == 2
    finally:
        admin.close()
    assert [body["n"] for body in _bodies(pg_ledger)] == ["first", "a", "after"]
    summary = verify_database(pg_ledger.store, pg_ledger.authority.public_key())
    assert summary.entries == 3


def test_a_lost_connection_is_named_and_replaced(pg_ledger: Ledger) -> None:
    """The server ends the committer's connection between two blocks: the next batch fails
    saying its fate is unknown (nothing was stored), and the one after goes through a new
    connection, on the head read back from the database."""
    with ChainWriter(pg_ledger.store, "hosp-a", pg_ledger.key) as writer:
        assert writer.append_many([("access.requested", {"n": n}) for n in range(3)]) == [0, 1, 2]
        backend = writer._connection.info.backend_pid
        with psycopg.connect(pg_ledger.url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (backend,))
        with pytest.raises(StoreError, match="whether it was stored is unknown"):
            writer.append("access.requested", {"n": "lost"})
        assert writer.append("access.requested", {"n": 3}) == 3
        assert writer._connection.info.backend_pid != backend
    assert [body["n"] for body in _bodies(pg_ledger)] == [0, 1, 2, 3]
    verify_database(pg_ledger.store, pg_ledger.authority.public_key())


def test_statements_beyond_the_prepared_ones_are_written_too(
    pg_ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the first few statements are prepared on a connection; batches of other sizes go
    as unprepared statements, and every row lands once, in order."""
    monkeypatch.setattr(writer_module, "PREPARED_PER_CONNECTION", 4)
    patient = "p" * 64
    with ChainWriter(pg_ledger.store, "hosp-a", pg_ledger.key, max_block_entries=5) as writer:
        seq = 0
        for count in (1, 2, 3, 4, 5, 6, 11, 2, 1):
            items = [("consent.granted", {"n": seq + n, "patient": patient}) for n in range(count)]
            assert writer.append_many(items) == list(range(seq, seq + count))
            seq += count
        assert len(writer._pipeline._names) == 4
    assert [body["n"] for body in _bodies(pg_ledger)] == list(range(seq))
    assert [e["body"]["n"] for e in pg_ledger.store.entries_about(patient)] == list(range(seq))
    verify_database(pg_ledger.store, pg_ledger.authority.public_key())


def test_concurrent_appends_land_once_each_in_their_order(pg_ledger: Ledger) -> None:
    """Sixteen threads append batches of 1 to 4 entries (blocks of at most 3): every append's
    entries are at the seqs it was given, in its order, contiguous, and nothing else is
    stored."""
    given: dict[tuple[int, int], list[int]] = {}
    lock = threading.Lock()
    with ChainWriter(pg_ledger.store, "hosp-a", pg_ledger.key, max_block_entries=3) as writer:

        def work(worker: int) -> None:
            for call in range(30):
                count = 1 + (worker + call) % 4
                items = [
                    ("access.requested", {"w": worker, "c": call, "i": i}) for i in range(count)
                ]
                seqs = writer.append_many(items)
                with lock:
                    given[(worker, call)] = seqs

        threads = [threading.Thread(target=work, args=(worker,)) for worker in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    bodies = _bodies(pg_ledger)
    assert sorted(seq for seqs in given.values() for seq in seqs) == list(range(len(bodies)))
    for (worker, call), seqs in given.items():
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        assert [bodies[seq] for seq in seqs] == [
            {"w": worker, "c": call, "i": i} for i in range(len(seqs))
        ]
    verify_database(pg_ledger.store, pg_ledger.authority.public_key())
