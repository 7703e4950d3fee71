"""The group-committing writer of a node's own chain (ChainWriter): concurrent appenders batched
into blocks, one signature and one transaction per block, serialised by the database across
processes."""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.engine import Connection

from ledger import keys, merkle
from ledger.canonical import canonical_bytes, canonical_bytes_of_checked, parse_canonical
from ledger.errors import LedgerError, SigningHeld, StoreError
from ledger.model import (
    ZERO_HASH,
    check_body,
    check_chain_id,
    check_entry_type,
    format_time,
    make_header,
)
from ledger.store.chains import ChainStore, Head, subject_of
from ledger.store.schema import (
    blocks_table,
    entries_table,
    node_seq,
    pick_nodes,
    subjects_table,
    writer_lock_key,
)

DEFAULT_MAX_BLOCK_ENTRIES = 1000
GATHER_SECONDS = 0.001  # the longest a block waits for appenders still on their way
# The writer's statements, run for every block straight on the DBAPI cursor: SQLAlchemy's
# per-statement work would be most of a small block's cost. "?" becomes "%s" for psycopg.
_WRITER_SQL = {
    "head": "SELECT (SELECT header FROM ledger_blocks WHERE chain = ? ORDER BY height DESC "
    "LIMIT 1), (SELECT max(version) FROM ledger_roster), "
    "(SELECT value FROM ledger_settings WHERE name = 'signing_hold')",
    "entries": "INSERT INTO ledger_entries (chain, seq, data, nodes) VALUES (?, ?, ?, ?)",
    "blocks": "INSERT INTO ledger_blocks (chain, height, tree_size, header, signature) "
    "VALUES (?, ?, ?, ?, ?)",
    "subjects": "INSERT INTO ledger_subjects (patient, chain, seq, type) VALUES (?, ?, ?, ?)",
}


_POSTGRES_WRITER_SQL = {
    name: statement.replace("?", "%s") for name, statement in _WRITER_SQL.items()
}
# On PostgreSQL a table's rows go in multi-row INSERTs of at most this many rows (a statement
# takes at most 65,535 parameters): psycopg's work for one statement is about what one row of an
# executemany costs, and that work is much of a small block's.
POSTGRES_ROWS_PER_INSERT = 1000


def _postgres_inserts(
    name: str, rows: Sequence[tuple[Any, ...]]
) -> Iterator[tuple[str, list[Any]]]:
    """The rows of one of the writer's tables as multi-row INSERTs with their parameters, in
    order (none for no rows)."""
    insert, _, group = _POSTGRES_WRITER_SQL[name].partition(" VALUES ")
    for start in range(0, len(rows), POSTGRES_ROWS_PER_INSERT):
        chunk = rows[start : start + POSTGRES_ROWS_PER_INSERT]
        yield (
            f"{insert} VALUES {', '.join([group] * len(chunk))}",
            [value for row in chunk for value in row],
        )


def _held_lock() -> threading.Lock:
    lock = threading.Lock()
    lock.acquire()
    return lock


def _checked(
    items: Sequence[tuple[str, dict[str, Any]]],
) -> list[tuple[str, dict[str, Any], str]]:
    """The items, each checked, stamped with one time (EntryError on the first bad one)."""
    now = format_time()
    checked = []
    for entry_type, body in items:
        check_entry_type(entry_type)
        check_body(body)
        checked.append((entry_type, body, now))
    return checked


@dataclass
class _Blocks:
    """A batch built into blocks on top of a head, not yet signed."""

    on: bytes | None  # the stored header bytes of the head built on; None: an empty chain
    roster_version: int
    entry_rows: list[tuple[Any, ...]]
    unsigned: list[tuple[int, int, bytes, bytes]]  # (height, tree_size, header, its SHA-256)
    subjects: list[tuple[Any, ...]]
    seqs: list[list[int]]  # the seqs of each append of the batch, in its order
    head: tuple[bytes, dict[str, Any], merkle.Frontier]  # the new head (ChainWriter._cached)


@dataclass
class _Pending:
    items: list[tuple[str, dict[str, Any], str]]
    # Held until the batch is committed: a bare lock wakes its waiter with far less work than
    # an Event, and the appenders' wake-ups are much of a small block's round trip.
    done: threading.Lock = field(default_factory=_held_lock)
    seqs: list[int] = field(default_factory=list)
    error: BaseException | None = None


class ChainWriter:
    """Appends to one chain, batching concurrent appenders into blocks (group commit).

    Thread-safe. One background thread per writer commits: it takes everything queued, writes
    it as one or more blocks (at most ``max_block_entries`` entries each) in one transaction
    under the chain's writer lock, and wakes the appenders once that transaction is durable.
    """

    def __init__(
        self,
        store: ChainStore,
        chain: str,
        key: Ed25519PrivateKey,
        *,
        max_block_entries: int = DEFAULT_MAX_BLOCK_ENTRIES,
    ) -> None:
        self.store = store
        self.chain = check_chain_id(chain)
        self.key = key
        self.max_block_entries = max_block_entries
        self._keyed_version = self._check_key()
        self._waiting: list[_Pending] = []  # appends not yet taken into a block
        self._arrived = threading.Condition(threading.Lock())
        # The head this writer last wrote: (stored header bytes, header, frontier after it).
        self._cached: tuple[bytes, dict[str, Any], merkle.Frontier] | None = None
        self._closed = False
        self._connection: Any = None  # the committer thread's own DBAPI connection
        self._expected = 1  # appenders the next block waits for (see _run)
        self._thread = threading.Thread(
            target=self._run, name=f"ledger-writer-{chain}", daemon=True
        )
        self._thread.start()

    def _check_key(self, conn: Connection | None = None) -> int:
        """The newest roster version, once it is checked to list this writer's key for its
        chain: a block signed with any other key could never verify."""
        roster = self.store.roster(conn)
        if roster.member(self.chain)["ed25519"] != keys.public_key_text(self.key):
            raise StoreError(
                f"the signing key is not the key roster version {roster.version} lists for "
                f"{self.chain}; nothing was appended"
            )
        return roster.version

    def append(self, entry_type: str, body: dict[str, Any]) -> int:
        """Append one entry; returns its seq once its block is durable."""
        return self.append_many([(entry_type, body)])[0]

    def append_many(self, items: Sequence[tuple[str, dict[str, Any]]]) -> list[int]:
        """Append entries together (one transaction: all or none); returns their seqs.

        Bodies are checked here, before anything is queued; they must not change until this
        returns."""
        if self._closed:
            raise StoreError(f"the writer of chain {self.chain} is closed")
        checked = _checked(items)
        if not checked:
            return []
        pending = _Pending(checked)
        with self._arrived:
            if self._closed:
                raise StoreError(f"the writer of chain {self.chain} is closed")
            self._waiting.append(pending)
            # Wake the committer for the first append, and when all it waits for have come;
            # not for each one in between (every wake-up costs a thread switch).
            if len(self._waiting) in (1, self._expected):
                self._arrived.notify()
        pending.done.acquire()
        if pending.error is not None:
            raise pending.error
        return pending.seqs

    def append_in(self, conn: Connection, items: Sequence[tuple[str, dict[str, Any]]]) -> list[int]:
        """Append entries as one block inside the caller's transaction on ``conn`` (a
        connection of this store's database): they are stored if and only if that transaction
        commits. This is for data that must change together with its ledger entry, such as a
        consent; it bypasses group commit, so it suits rare writes.

        The chain's writer lock is taken in the caller's transaction (PostgreSQL: the advisory
        lock; SQLite: the caller's ``BEGIN IMMEDIATE`` already holds the database's write
        lock) and held until it ends, so the chain never forks against the group committer.
        """
        checked = _checked(items)
        if not checked:
            return []
        if self.store.is_postgres:
            conn.execute(
                sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": writer_lock_key(self.chain)}
            )
        sql = _POSTGRES_WRITER_SQL if self.store.is_postgres else _WRITER_SQL
        head, roster_version, hold = conn.exec_driver_sql(sql["head"], (self.chain,)).one()
        if roster_version is None:
            raise StoreError("no roster stored; initialise with: hrx ledger init")
        if hold is not None:
            raise SigningHeld(hold)
        if roster_version != self._keyed_version:
            self._keyed_version = self._check_key(conn)
        blocks = self._build_blocks(
            [_Pending(checked)],
            head,
            int(roster_version),
            partial(self.store._nodes, conn, self.chain),
        )
        block_rows = self._signed(blocks)
        conn.execute(
            entries_table.insert(),
            [
                dict(zip(("chain", "seq", "data", "nodes"), row, strict=True))
                for row in blocks.entry_rows
            ],
        )
        conn.execute(
            blocks_table.insert(),
            [
                dict(zip(("chain", "height", "tree_size", "header", "signature"), row, strict=True))
                for row in block_rows
            ],
        )
        if blocks.subjects:
            conn.execute(
                subjects_table.insert(),
                [
                    dict(zip(("patient", "chain", "seq", "type"), row, strict=True))
                    for row in blocks.subjects
                ],
            )
        return blocks.seqs[0]

    def close(self) -> None:
        if not self._closed:
            with self._arrived:
                self._closed = True
                self._arrived.notify()
            self._thread.join()
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def __enter__(self) -> ChainWriter:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _run(self) -> None:
        while True:
            with self._arrived:
                while not self._waiting and not self._closed:
                    self._arrived.wait()
                if not self._waiting:
                    return  # closed, and nothing left to write
                # Group commit: while fewer appenders have come than are expected, wait a
                # moment for them (they are typically just waking up from the last commit).
                # One appender alone never waits.
                deadline = time.monotonic() + GATHER_SECONDS
                while len(self._waiting) < self._expected and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._arrived.wait(remaining)
                batch, self._waiting = self._waiting, []
            try:
                self._commit(batch)
            except BaseException as exc:  # hand every failure to the appenders
                self._cached = None
                error = (
                    exc
                    if isinstance(exc, LedgerError)
                    else StoreError(
                        f"appending to chain {self.chain} failed, nothing of it was stored: {exc}"
                    )
                )
                if error is not exc:
                    error.__cause__ = exc
                for pending in batch:
                    pending.error = error
            with self._arrived:
                # Expect back the appenders of this block, and those that came meanwhile:
                # waiting for the former only would split a steady group into two
                # half-full blocks for good.
                self._expected = len(batch) + len(self._waiting)
            for pending in batch:
                pending.done.release()

    def _commit(self, batch: list[_Pending]) -> None:
        """Write the batch in one transaction on the writer's own DBAPI connection, in as few
        round trips as the database allows: the pool's and SQLAlchemy's per-transaction work,
        and on PostgreSQL every round trip, would be most of a small block's cost."""
        postgres = self.store.is_postgres
        connection = self._writer_connection()
        cursor = connection.cursor()
        read_nodes = partial(self._read_nodes, cursor)
        guess = None  # the batch built on the head this writer last wrote, before reading it
        try:
            if postgres:
                # An autocommit connection: BEGIN, the lock and the head in one round trip. The
                # head is read by a statement after the lock's, so that its snapshot (READ
                # COMMITTED: one per statement) is taken with the lock held. While the server
                # runs them, the batch is built on the head this writer last wrote: that build
                # is kept only if it is the head read, and signed only after the checks below.
                with connection.pipeline():
                    cursor.execute("BEGIN")
                    cursor.execute(
                        "SELECT pg_advisory_xact_lock(%s)", (writer_lock_key(self.chain),)
                    )
                    cursor.execute(_POSTGRES_WRITER_SQL["head"], (self.chain,))
                    if self._cached is not None:
                        guess = self._build_blocks(
                            batch, self._cached[0], self._keyed_version, read_nodes
                        )
            else:
                cursor.execute("BEGIN IMMEDIATE")
                cursor.execute(_WRITER_SQL["head"], (self.chain,))
            head, roster_version, hold = cursor.fetchone()
            if roster_version is None:
                raise StoreError("no roster stored; initialise with: hrx ledger init")
            if hold is not None:
                raise SigningHeld(hold)
            if roster_version != self._keyed_version:  # a new roster: is this still our key?
                self._keyed_version = self._check_key()
            if (
                guess is not None
                and head is not None
                and bytes(head) == guess.on
                and roster_version == guess.roster_version
            ):
                blocks = guess
            else:
                blocks = self._build_blocks(batch, head, int(roster_version), read_nodes)
            if postgres:  # the inserts and COMMIT in one round trip
                with connection.pipeline():
                    for statement, parameters in _postgres_inserts("entries", blocks.entry_rows):
                        cursor.execute(statement, parameters)
                    block_rows = self._signed(blocks)  # while the server inserts the entries
                    for name, rows in (("blocks", block_rows), ("subjects", blocks.subjects)):
                        for statement, parameters in _postgres_inserts(name, rows):
                            cursor.execute(statement, parameters)
                    cursor.execute("COMMIT")
            else:
                cursor.executemany(_WRITER_SQL["entries"], blocks.entry_rows)
                cursor.executemany(_WRITER_SQL["blocks"], self._signed(blocks))
                if blocks.subjects:
                    cursor.executemany(_WRITER_SQL["subjects"], blocks.subjects)
                connection.commit()
        except BaseException as exc:
            self._discard_connection(connection)
            dbapi = self.store.engine.dialect.dbapi
            if dbapi is not None and isinstance(exc, dbapi.OperationalError | dbapi.InterfaceError):
                raise StoreError(
                    f"the database failed while writing a block of chain {self.chain}, so whether "
                    f"it was stored is unknown: look at the chain's head before appending again "
                    f"({exc})"
                ) from exc
            raise
        finally:
            with contextlib.suppress(Exception):
                cursor.close()
        self._cached = blocks.head
        for pending, seqs in zip(batch, blocks.seqs, strict=True):
            pending.seqs = seqs

    def _read_nodes(self, cursor: Any, wanted: list[merkle.NodeId]) -> dict[merkle.NodeId, bytes]:
        """Merkle nodes read on the committer's own connection (inside its transaction: on
        SQLite a second connection could not begin while this one holds the write lock)."""
        seqs = sorted({node_seq(node) for node in wanted})
        if not seqs:
            return {}
        mark = "%s" if self.store.is_postgres else "?"
        cursor.execute(
            f"SELECT seq, nodes FROM ledger_entries WHERE chain = {mark} "
            f"AND seq IN ({', '.join([mark] * len(seqs))})",
            (self.chain, *seqs),
        )
        return pick_nodes(wanted, {row[0]: row[1] for row in cursor.fetchall()})

    def _writer_connection(self) -> Any:
        """The committer thread's own DBAPI connection, outside the pool (on PostgreSQL in
        autocommit mode, so that the writer sends BEGIN and COMMIT itself)."""
        if self._connection is None:
            pooled = self.store.engine.raw_connection()
            pooled.detach()
            self._connection = pooled.dbapi_connection
            if self.store.is_postgres:
                self._connection.autocommit = True
        return self._connection

    def _discard_connection(self, connection: Any) -> None:
        self._connection = None
        with contextlib.suppress(Exception):
            connection.rollback()
        with contextlib.suppress(Exception):
            connection.close()

    def _build_blocks(
        self,
        batch: list[_Pending],
        head: bytes | None,
        roster_version: int,
        read_nodes: Callable[[list[merkle.NodeId]], dict[merkle.NodeId, bytes]],
    ) -> _Blocks:
        """The batch's entry and subject rows and its blocks' headers, on top of the stored
        head ``head``; nothing signed yet (see _signed)."""
        on = None if head is None else bytes(head)
        if on is None:
            frontier = merkle.Frontier()
            height, prev, prev_time = 0, ZERO_HASH, ""
        else:
            if self._cached is not None and self._cached[0] == on:
                header, frontier = self._cached[1], self._cached[2].copy()
            else:  # first block of this writer, or another process wrote since
                header = parse_canonical(on)
                stored_head = Head(header, "")
                plan = merkle.Frontier.plan(stored_head.tree_size)
                frontier = self.store._frontier_of(self.chain, stored_head, plan, read_nodes(plan))
            # The stored bytes are canonical (ours, or parsed as such), so they hash as the block.
            prev = hashlib.sha256(on).hexdigest()
            height, prev_time = header["height"] + 1, header["time"]
        seqs_of: list[list[int]] = [[] for _ in batch]
        items = [
            (item, seqs_of[position])
            for position, pending in enumerate(batch)
            for item in pending.items
        ]
        entry_rows: list[tuple[Any, ...]] = []
        unsigned: list[tuple[int, int, bytes, bytes]] = []
        subjects: list[tuple[Any, ...]] = []
        for start in range(0, len(items), self.max_block_entries):
            chunk = items[start : start + self.max_block_entries]
            first_seq = frontier.size
            block_time = max(prev_time, format_time())
            for (entry_type, body, time_), seqs in chunk:
                seq = frontier.size
                entry = {
                    "v": 1,
                    "chain": self.chain,
                    "seq": seq,
                    "time": time_,
                    "type": entry_type,
                    "body": body,
                }
                data = canonical_bytes_of_checked(entry)
                completed = frontier.append(merkle.leaf_hash(data))
                entry_rows.append((self.chain, seq, data, b"".join(completed)))
                patient = subject_of(body)
                if patient is not None:
                    subjects.append((patient, self.chain, seq, entry_type))
                seqs.append(seq)
                block_time = max(block_time, time_)
            header = make_header(
                chain=self.chain,
                height=height,
                prev=prev,
                time=block_time,
                first_seq=first_seq,
                count=len(chunk),
                tree_size=frontier.size,
                tree_root=frontier.root(),
                roster=roster_version,
            )
            header_bytes = canonical_bytes(header)
            digest = hashlib.sha256(header_bytes).digest()
            unsigned.append((height, frontier.size, header_bytes, digest))
            height, prev, prev_time = height + 1, digest.hex(), block_time
        return _Blocks(
            on=on,
            roster_version=roster_version,
            entry_rows=entry_rows,
            unsigned=unsigned,
            subjects=subjects,
            seqs=seqs_of,
            head=(unsigned[-1][2], header, frontier),
        )

    def _signed(self, blocks: _Blocks) -> list[tuple[Any, ...]]:
        """The block rows, each header signed with this writer's key."""
        return [
            (self.chain, height, tree_size, header, keys.sign(self.key, keys.BLOCK_DOMAIN, digest))
            for height, tree_size, header, digest in blocks.unsigned
        ]
