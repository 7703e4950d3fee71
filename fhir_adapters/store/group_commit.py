"""Group commit for the resource store: the writes that threads of one process make at the same
time share one database transaction, and so one commit (one fsync).

:meth:`GroupCommit.write` is what :meth:`ResourceStore.writing
<fhir_adapters.store.repository.ResourceStore.writing>` runs every write in. The writes take
turns on one connection: the first to come begins a transaction (on SQLite ``BEGIN
IMMEDIATE``, which takes the database's write lock); each write runs in a SAVEPOINT of its own
inside it, in its own thread; when one is done and nobody is waiting for a turn (or
:data:`MOST_WRITES` have shared the transaction), that write's thread commits for all of them.
Each write returns only once the transaction holding it is committed, so an answer sent after
it is an answer about a durable write. A write that fails (its checks, its observers, its SQL)
is rolled back to its savepoint and raises at once; the others in the transaction go on and
commit. When the transaction itself is lost (the connection, or SQLite rolling it back after
an I/O error or a full disk) or its commit fails, every write in it raises
:class:`CommitFailed`: none of them was stored, and none was answered as if it were.

How it scales: the writes of N threads at once cost one commit instead of N, and the gain
grows with the number of concurrent writers in a process (gunicorn threads, MLLP connections).
The writes themselves run one after another: within a process a write transaction is taken
in turns, as SQLite's single write lock would have made them anyway (on PostgreSQL they
could overlap before; with Python's GIL they seldom did). Between processes the database
serialises as before: SQLite's write lock (a process waits for it in ``BEGIN IMMEDIATE``),
PostgreSQL's row and advisory locks. What a lone writer pays: nothing but a SAVEPOINT and its
RELEASE (two statements, some tens of µs: sent on the DBAPI cursor, as SQLAlchemy compiles
each savepoint statement anew); nobody is waited for when nobody is waiting, so
there is no gather window. Under load, a write waits for the writes ahead of it in the
transaction and for one shared commit.

A write made while its thread is already inside one (nested) gets a transaction of its own, as
every write did before: it cannot join the transaction its own thread holds open.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, RootTransaction

from fhir_adapters.errors import FhirError

MOST_WRITES = 64  # writes that share one transaction, at most (bounds what one commit waits)
SQLITE_RETRY_SECONDS = 0.001  # the longest pause between tries for SQLite's write lock


class CommitFailed(FhirError):
    """503: the transaction holding this write could not be committed; nothing of the write
    was stored."""

    status = 503
    code = "transient"


@dataclass
class _Transaction:
    """The transaction the writes of this moment share."""

    connection: Connection
    root: RootTransaction
    writes: int = 0  # writes done in it (their savepoints released)
    savepoints: int = 0  # savepoints begun in it (each write's is named by its number)
    error: BaseException | None = None  # why it cannot commit
    done: threading.Event = field(default_factory=threading.Event)  # committed or given up


class GroupCommit:
    """Runs writes on ``engine`` in shared transactions (see the module docstring).
    Thread-safe; one per engine and process."""

    def __init__(self, engine: Engine, most_writes: int = MOST_WRITES) -> None:
        self.engine = engine
        self.most_writes = most_writes
        self._start()

    def _start(self) -> None:
        self._pid = os.getpid()
        self._turn = threading.Lock()  # held by the thread writing in the shared transaction
        self._state = threading.Lock()  # guards the two below
        self._arriving = 0  # threads waiting for their turn
        self._open: _Transaction | None = None
        self._inside = threading.local()  # whether this thread is writing

    @property
    def waiting(self) -> int:
        """How many writes are waiting for their turn in the shared transaction."""
        return self._arriving

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """One write: the block runs in a SAVEPOINT of the shared transaction on the
        connection given; leaving it waits for the commit (CommitFailed when there was
        none). Whatever the block raises undoes its own statements only, and is raised."""
        if self._pid != os.getpid():  # a forked child (gunicorn): nothing of the parent's
            self._start()
        if getattr(self._inside, "writing", False):
            with self.engine.begin() as connection:
                yield connection
            return
        transaction = self._take_turn()
        try:
            savepoint = _Savepoint(transaction)
        except BaseException as exc:
            transaction.error = exc
            self._end_turn(transaction)
            raise
        self._inside.writing = True
        try:
            yield transaction.connection
            savepoint.release()
        except BaseException:
            self._inside.writing = False
            self._undo(transaction, savepoint)
            self._end_turn(transaction)
            raise
        self._inside.writing = False
        transaction.writes += 1
        self._end_turn(transaction)
        transaction.done.wait()
        if transaction.error is not None:
            raise CommitFailed(
                "the write could not be committed, so nothing of it was stored; send it again "
                f"({type(transaction.error).__name__})"
            ) from transaction.error

    def _take_turn(self) -> _Transaction:
        """Wait for the turn; the open transaction, begun now when there is none."""
        with self._state:
            self._arriving += 1
        self._turn.acquire()
        with self._state:
            self._arriving -= 1
        if self._open is not None:
            return self._open
        try:
            connection = self.engine.connect()
            try:
                root = _begin(connection)
            except BaseException:
                connection.close()
                raise
        except BaseException:
            self._turn.release()
            raise
        self._open = _Transaction(connection, root)
        return self._open

    def _undo(self, transaction: _Transaction, savepoint: _Savepoint) -> None:
        """Roll a failed write back to its savepoint; when that cannot be done, or the
        transaction is gone with it, the transaction is lost for every write in it."""
        try:
            if savepoint.active:
                savepoint.rollback()
            if not transaction.root.is_active or not _in_transaction(transaction.connection):
                raise RuntimeError("the transaction was rolled back by the database")
        except BaseException as exc:
            if transaction.error is None:
                transaction.error = exc

    def _end_turn(self, transaction: _Transaction) -> None:
        """Pass the turn on; commit first when this was the last write waiting, or the
        transaction is full or lost."""
        with self._state:
            last = (
                self._arriving == 0
                or transaction.writes >= self.most_writes
                or transaction.error is not None
            )
            if last:
                self._open = None
        try:
            if last:
                self._finish(transaction)
        finally:
            self._turn.release()

    def _finish(self, transaction: _Transaction) -> None:
        try:
            if transaction.error is None and transaction.writes:
                transaction.root.commit()
            else:
                transaction.root.rollback()
        except BaseException as exc:
            if transaction.error is None:
                transaction.error = exc
        finally:
            with contextlib.suppress(Exception):
                transaction.connection.close()
            transaction.done.set()


class _Savepoint:
    """One write's SAVEPOINT in the shared transaction, as SQL text on the connection's DBAPI
    cursor (SQLite and PostgreSQL spell it alike). SQLAlchemy's ``begin_nested`` compiled its
    SAVEPOINT and RELEASE statements anew for every write: a tenth of what a small write
    cost."""

    def __init__(self, transaction: _Transaction) -> None:
        transaction.savepoints += 1
        self.name = f"hrx_write_{transaction.savepoints}"
        self.connection = transaction.connection
        self._execute(f"SAVEPOINT {self.name}")
        self.active = True

    def _execute(self, statement: str) -> None:
        cursor = self.connection.connection.cursor()
        try:
            cursor.execute(statement)
        finally:
            cursor.close()

    def release(self) -> None:
        self._execute(f"RELEASE SAVEPOINT {self.name}")
        self.active = False

    def rollback(self) -> None:
        """Undo the write's statements and end its savepoint."""
        self._execute(f"ROLLBACK TO SAVEPOINT {self.name}")
        self.active = False
        self._execute(f"RELEASE SAVEPOINT {self.name}")


def _begin(connection: Connection) -> RootTransaction:
    """Begin the shared transaction. On SQLite, whose ``BEGIN IMMEDIATE`` waits for another
    process's write lock by sleeping 1, 2, 5, 10... up to 100 ms between tries, it is tried
    every :data:`SQLITE_RETRY_SECONDS` at most instead (for as long as the connection's
    ``busy_timeout``): a writer in another process holds the lock for milliseconds, and a
    process that slept through its release would leave the database idle."""
    if connection.dialect.name != "sqlite":
        return connection.begin()
    driver: Any = connection.connection.driver_connection
    timeout_ms = driver.execute("PRAGMA busy_timeout").fetchone()[0]
    driver.execute("PRAGMA busy_timeout = 0")
    try:
        deadline = time.monotonic() + timeout_ms / 1000
        pause = SQLITE_RETRY_SECONDS / 8
        while True:
            if _write_lock_taken(driver) and time.monotonic() <= deadline:
                time.sleep(pause)
                pause = min(pause * 2, SQLITE_RETRY_SECONDS)
                continue
            try:
                return connection.begin()
            except sa.exc.OperationalError as exc:
                busy = getattr(exc.orig, "sqlite_errorcode", None) == sqlite3.SQLITE_BUSY
                if not busy or time.monotonic() > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, SQLITE_RETRY_SECONDS)
    finally:
        driver.execute(f"PRAGMA busy_timeout = {int(timeout_ms)}")


def _write_lock_taken(driver: Any) -> bool:
    """Whether another connection holds SQLite's write lock, found by taking it on the driver's
    connection and letting it go at once: a try that fails costs the driver a microsecond or
    two, SQLAlchemy's ``begin`` twenty times that (and a waiting writer tries a thousand times
    a second)."""
    try:
        driver.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_BUSY
    driver.execute("ROLLBACK")
    return False


def _in_transaction(connection: Connection) -> bool:
    """Whether the database itself still holds the connection's transaction open (SQLite
    rolls a transaction back on its own after some errors; SQLAlchemy would not know)."""
    driver = connection.connection.driver_connection
    in_transaction = getattr(driver, "in_transaction", None)
    return True if in_transaction is None else bool(in_transaction)
