"""The group-committing writer of a node's own chain (ChainWriter): concurrent appenders batched
into blocks, one signature and one transaction per block, serialised by the database across
processes."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import select
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from psycopg import errors as psycopg_errors
from psycopg import pq
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
# The committer's own statements on PostgreSQL, sent through libpq's pipeline mode directly
# (_Pipeline): numbered parameters, bytea parameters and the head's results in binary.
_PG_BEGIN = b"BEGIN"
_PG_LOCK = b"SELECT pg_advisory_xact_lock($1)"
_PG_HEAD = _WRITER_SQL["head"].replace("?", "$1").encode()
_PG_COMMIT = b"COMMIT"
# Each table's parameters, row by row, as the committer sends them: 0 text, 1 binary (bytea).
_PG_FORMATS = {"entries": (0, 0, 1, 1), "blocks": (0, 0, 0, 1, 0), "subjects": (0, 0, 0, 0)}
# On PostgreSQL a table's rows go in multi-row INSERTs of at most this many rows (a statement
# takes at most 65,535 parameters): the work per statement, on either side, is about what one
# row of an executemany costs, and that work is much of a small block's.
POSTGRES_ROWS_PER_INSERT = 1000
PREPARED_PER_CONNECTION = 64  # statements prepared on the writer's connection, at most


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


@functools.lru_cache(maxsize=PREPARED_PER_CONNECTION)
def _numbered(statement: str) -> bytes:
    """A statement with psycopg's parameters (%s) as libpq takes it ($1, $2, ...)."""
    parts = statement.split("%s")
    numbered = [f"{part}${number}" for number, part in enumerate(parts[:-1], 1)]
    return "".join([*numbered, parts[-1]]).encode()


def _postgres_value(value: Any) -> bytes:
    """A parameter as libpq takes it: bytes as they are (sent binary: bytea), the rest as text,
    refused when it holds a NUL (libpq would cut a text parameter there; psycopg refuses it the
    same way)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, int):
        return b"%d" % value
    text = str(value).encode()
    if b"\0" in text:
        raise psycopg_errors.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes")
    return text


class _Pipeline:
    """The committer's PostgreSQL connection driven through libpq's pipeline mode directly
    (psycopg.pq): statements queued, sent together, and their results read back up to a sync
    point. psycopg's own per-statement work (adapting, cursor and pipeline bookkeeping) was
    about half the committer's Python time for a block of eight, serialised with every
    appender's by the GIL. The connection stays in pipeline mode, in autocommit (the writer
    sends BEGIN and COMMIT itself); after any error it is closed, never reused."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.pgconn = connection.pgconn
        self.encoding = connection.info.encoding
        self.pgconn.nonblocking = 1
        self.pgconn.enter_pipeline_mode()
        self._poll = select.poll()
        self._fd = self.pgconn.socket
        self._names: dict[bytes, bytes] = {}  # statement: its name, once prepared
        self._kept: list[bool] = []  # statements queued since the last sync: result returned?

    def send(
        self,
        statement: bytes,
        parameters: Sequence[bytes | None] | None = None,
        formats: Sequence[int] | None = None,
        *,
        binary_results: bool = False,
        prepare: bool = True,
    ) -> None:
        """Queue one statement (sent at the next push or sync); one to ``prepare`` is prepared
        the first time (as psycopg does for a statement it runs often), so that the server
        parses and plans it once per connection."""
        name = self._names.get(statement)
        if name is None and prepare and len(self._names) < PREPARED_PER_CONNECTION:
            name = b"hrx_writer_%d" % len(self._names)
            self.pgconn.send_prepare(name, statement)
            self._kept.append(False)
            self._names[statement] = name
        if name is None:
            self.pgconn.send_query_params(
                statement, parameters, param_formats=formats, result_format=int(binary_results)
            )
        else:
            self.pgconn.send_query_prepared(
                name, parameters, param_formats=formats, result_format=int(binary_results)
            )
        self._kept.append(True)

    def send_insert(self, name: str, rows: Sequence[tuple[Any, ...]]) -> None:
        """Queue the rows of one of the writer's tables as multi-row INSERTs."""
        formats = _PG_FORMATS[name]
        for statement, parameters in _postgres_inserts(name, rows):
            self.send(
                _numbered(statement),
                [_postgres_value(value) for value in parameters],
                formats * (len(parameters) // len(formats)),
            )

    def push(self) -> None:
        """Send everything queued, without waiting for any result: the server starts on it."""
        while self.pgconn.flush():
            self._wait(select.POLLOUT)

    def sync(self) -> list[Any]:
        """End the queued statements with a sync point, send them, and return their results
        in order once all are in (the first failed statement's error raised instead)."""
        self.pgconn.pipeline_sync()
        self.push()
        return self.results()

    def results(self) -> list[Any]:
        """The results of the statements sent, up to the next sync point."""
        pgconn = self.pgconn
        results: list[Any] = []
        error: Exception | None = None
        kept, self._kept = iter(self._kept), []
        while True:
            if pgconn.is_busy():
                self._wait(select.POLLIN)
                pgconn.consume_input()
                continue
            result = pgconn.get_result()
            if result is None:  # the end of one statement's results
                continue
            status = result.status
            if status == pq.ExecStatus.PIPELINE_SYNC:
                break
            if status == pq.ExecStatus.FATAL_ERROR and error is None:
                error = psycopg_errors.error_from_result(result, encoding=self.encoding)
            if next(kept):  # not a statement's preparation
                results.append(result)
        if error is not None:
            raise error
        return results

    def _wait(self, event: int) -> None:
        self._poll.register(self._fd, event)
        try:
            self._poll.poll()  # the GIL released meanwhile
        finally:
            self._poll.unregister(self._fd)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.connection.close()


def _no_nodes(wanted: list[merkle.NodeId]) -> dict[merkle.NodeId, bytes]:
    """A guess is built on the head this writer wrote, whose frontier it keeps: no reads."""
    raise AssertionError("a guess reads no Merkle nodes")


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
        self._pipeline: _Pipeline | None = None  # on PostgreSQL: that connection's pipeline
        self._chain_parameter = self.chain.encode()
        self._lock_parameter = b"%d" % writer_lock_key(self.chain)
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
            self._discard_connection()

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
        connection = self._writer_connection()
        try:
            if self.store.is_postgres:
                blocks = self._commit_postgres(batch)
            else:
                blocks = self._commit_sqlite(batch, connection)
        except BaseException as exc:
            self._discard_connection()
            dbapi = self.store.engine.dialect.dbapi
            if dbapi is not None and isinstance(exc, dbapi.OperationalError | dbapi.InterfaceError):
                raise StoreError(
                    f"the database failed while writing a block of chain {self.chain}, so whether "
                    f"it was stored is unknown: look at the chain's head before appending again "
                    f"({exc})"
                ) from exc
            raise
        self._cached = blocks.head
        for pending, seqs in zip(batch, blocks.seqs, strict=True):
            pending.seqs = seqs

    def _commit_postgres(self, batch: list[_Pending]) -> _Blocks:
        """The batch's transaction in two round trips. BEGIN, the lock and the head go in
        the first; the head is read by a statement after the lock's, so that its snapshot
        (READ COMMITTED: one per statement) is taken with the lock held. While the server runs
        them, the batch is built on the head this writer last wrote: that build is kept only if
        it is the head read, and signed only after the checks. The inserts and COMMIT go in the
        second, the blocks signed while the server inserts the entries."""
        pipe = self._pipeline
        assert pipe is not None
        pipe.send(_PG_BEGIN)
        pipe.send(_PG_LOCK, [self._lock_parameter])
        pipe.send(_PG_HEAD, [self._chain_parameter], binary_results=True)
        pipe.pgconn.pipeline_sync()
        pipe.push()
        guess = None  # the batch built on the head this writer last wrote, before reading it
        if self._cached is not None:
            guess = self._build_blocks(batch, self._cached[0], self._keyed_version, _no_nodes)
        head_row = pipe.results()[2]
        head, roster, hold = (head_row.get_value(0, column) for column in range(3))
        blocks = self._checked_blocks(
            batch,
            head,
            None if roster is None else int.from_bytes(roster, "big", signed=True),
            None if hold is None else hold.decode(),
            guess,
            self._read_nodes_postgres,
        )
        pipe.send_insert("entries", blocks.entry_rows)
        pipe.push()
        block_rows = self._signed(blocks)  # while the server inserts the entries
        pipe.send_insert("blocks", block_rows)
        pipe.send_insert("subjects", blocks.subjects)
        pipe.send(_PG_COMMIT)
        pipe.sync()
        return blocks

    def _commit_sqlite(self, batch: list[_Pending], connection: Any) -> _Blocks:
        cursor = connection.cursor()
        try:
            cursor.execute("BEGIN IMMEDIATE")
            cursor.execute(_WRITER_SQL["head"], (self.chain,))
            head, roster_version, hold = cursor.fetchone()
            blocks = self._checked_blocks(
                batch, head, roster_version, hold, None, partial(self._read_nodes_sqlite, cursor)
            )
            cursor.executemany(_WRITER_SQL["entries"], blocks.entry_rows)
            cursor.executemany(_WRITER_SQL["blocks"], self._signed(blocks))
            if blocks.subjects:
                cursor.executemany(_WRITER_SQL["subjects"], blocks.subjects)
            connection.commit()
        finally:
            with contextlib.suppress(Exception):
                cursor.close()
        return blocks

    def _checked_blocks(
        self,
        batch: list[_Pending],
        head: bytes | None,
        roster_version: int | None,
        hold: str | None,
        guess: _Blocks | None,
        read_nodes: Callable[[list[merkle.NodeId]], dict[merkle.NodeId, bytes]],
    ) -> _Blocks:
        """The batch built on the head read under the lock, once the roster and the signing
        hold read with it allow signing: the guess if it was built on that head and roster."""
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
            return guess
        return self._build_blocks(batch, head, int(roster_version), read_nodes)

    def _read_nodes_sqlite(
        self, cursor: Any, wanted: list[merkle.NodeId]
    ) -> dict[merkle.NodeId, bytes]:
        """Merkle nodes read on the committer's own connection (inside its transaction: a
        second connection could not begin while this one holds the write lock)."""
        seqs = sorted({node_seq(node) for node in wanted})
        if not seqs:
            return {}
        cursor.execute(
            f"SELECT seq, nodes FROM ledger_entries WHERE chain = ? "
            f"AND seq IN ({', '.join(['?'] * len(seqs))})",
            (self.chain, *seqs),
        )
        return pick_nodes(wanted, {row[0]: row[1] for row in cursor.fetchall()})

    def _read_nodes_postgres(self, wanted: list[merkle.NodeId]) -> dict[merkle.NodeId, bytes]:
        """Merkle nodes read in the committer's transaction, under its lock."""
        seqs = sorted({node_seq(node) for node in wanted})
        if not seqs:
            return {}
        pipe = self._pipeline
        assert pipe is not None
        marks = ", ".join(f"${n + 2}" for n in range(len(seqs)))
        pipe.send(
            f"SELECT seq, nodes FROM ledger_entries WHERE chain = $1 AND seq IN ({marks})".encode(),
            [self._chain_parameter, *(b"%d" % seq for seq in seqs)],
            binary_results=True,
            prepare=False,
        )
        (result,) = pipe.sync()
        return pick_nodes(
            wanted,
            {
                int.from_bytes(result.get_value(row, 0), "big", signed=True): result.get_value(
                    row, 1
                )
                for row in range(result.ntuples)
            },
        )

    def _writer_connection(self) -> Any:
        """The committer thread's own DBAPI connection, outside the pool (on PostgreSQL in
        autocommit mode, so that the writer sends BEGIN and COMMIT itself, and driven through
        _Pipeline)."""
        if self._connection is None:
            pooled = self.store.engine.raw_connection()
            pooled.detach()
            self._connection = pooled.dbapi_connection
            if self.store.is_postgres:
                self._connection.autocommit = True
                self._pipeline = _Pipeline(self._connection)
        return self._connection

    def _discard_connection(self) -> None:
        connection, pipe = self._connection, self._pipeline
        self._connection = self._pipeline = None
        if pipe is not None:  # closing it ends its transaction, if any, on the server
            pipe.close()
        elif connection is not None:
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
