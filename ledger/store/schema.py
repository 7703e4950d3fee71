"""The ledger's tables and how they are opened: append-only triggers, the settings names, and how a
Merkle node is laid in the row of the entry that completed it."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ledger import merkle
from ledger.errors import StoreError

metadata = sa.MetaData()

roster_table = sa.Table(
    "ledger_roster",
    metadata,
    sa.Column("version", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("roster", sa.LargeBinary, nullable=False),
    sa.Column("signature", sa.String(86), nullable=False),
)

blocks_table = sa.Table(
    "ledger_blocks",
    metadata,
    sa.Column("chain", sa.String(64), primary_key=True),
    sa.Column("height", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("tree_size", sa.BigInteger, nullable=False),
    sa.Column("header", sa.LargeBinary, nullable=False),
    sa.Column("signature", sa.String(86), nullable=False),
    sa.Index("ledger_blocks_tree_size", "chain", "tree_size", unique=True),
    sqlite_with_rowid=False,
)

entries_table = sa.Table(
    "ledger_entries",
    metadata,
    sa.Column("chain", sa.String(64), primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
    sa.Column("nodes", sa.LargeBinary, nullable=False),
    sqlite_with_rowid=False,
)

evidence_table = sa.Table(
    "ledger_evidence",
    metadata,
    sa.Column("chain", sa.String(64), primary_key=True),
    sa.Column("height", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("first_hash", sa.String(64), primary_key=True),  # the lower of the two hashes
    sa.Column("evidence", sa.LargeBinary, nullable=False),  # canonical JSON, see add_evidence
    sa.Column("found", sa.String(24), nullable=False),
)

checkpoints_table = sa.Table(
    "ledger_checkpoints",
    metadata,
    sa.Column("epoch", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("certificate", sa.LargeBinary, nullable=False),  # canonical JSON
)

votes_table = sa.Table(
    "ledger_checkpoint_votes",
    metadata,
    sa.Column("epoch", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("checkpoint", sa.LargeBinary, nullable=False),  # what this node signed
)

# Which entries name which patient: every entry whose body has a string ``patient`` (a
# pseudonym, docs/spec.md §13.1), indexed as it is stored, so that a patient's consents and accesses
# are found without reading whole chains. Derived from the entries, not part of the wire
# format; append-only like them.
subjects_table = sa.Table(
    "ledger_subjects",
    metadata,
    sa.Column("patient", sa.String(64), primary_key=True),
    sa.Column("chain", sa.String(64), primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("type", sa.String(64), nullable=False),
    sqlite_with_rowid=False,
)

settings_table = sa.Table(
    "ledger_settings",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

LEDGER_TABLES = (
    "ledger_roster",
    "ledger_blocks",
    "ledger_entries",
    "ledger_evidence",
    "ledger_checkpoints",
    "ledger_checkpoint_votes",
    "ledger_subjects",
)


def database_url(target: str) -> str:
    """A SQLAlchemy URL from what a user typed: a URL, or a path to a SQLite file."""
    if "://" not in target:
        return f"sqlite:///{Path(target).expanduser().resolve()}"
    if target.startswith("postgresql://") or target.startswith("postgres://"):
        return "postgresql+psycopg://" + target.split("://", 1)[1]
    return target


def open_engine(
    target: str, *, read_only: bool = False, immediate: bool = False, durable: bool = True
) -> Engine:
    """An engine set up for the ledger: SQLite in WAL mode with durable commits (the chain
    writer takes the write lock up front with ``BEGIN IMMEDIATE``), or PostgreSQL via psycopg.

    ``read_only`` (the auditor's way in) opens an existing SQLite file without changing it, not
    even its journal mode, and never creates one. ``immediate`` makes every SQLite transaction
    take the write lock when it begins: for engines that write, so that two transactions never
    both read and then find they cannot write. ``durable=False`` (SQLite: ``synchronous=NORMAL``)
    is for writes that must survive a crash of the process but may be lost with the machine's
    power: a commit then writes the WAL without waiting for the disk.

    Statement parameters never appear in an error's text (``hide_parameters``): they hold
    patients' names and identifiers, and errors get logged.
    """
    url = database_url(target)
    if url.startswith("sqlite"):
        if read_only:
            path = Path(sa.engine.make_url(url).database or "")
            if not path.is_file():
                raise StoreError(f"{path} does not exist")
            url = f"sqlite:///file:{path}?mode=ro&uri=true"
        engine = sa.create_engine(url, connect_args={"timeout": 60}, hide_parameters=True)

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself
            cursor = dbapi_connection.cursor()
            if not read_only:
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            cursor.execute("PRAGMA busy_timeout=60000")
            cursor.close()

        @sa.event.listens_for(engine, "begin")
        def _on_begin(connection: Connection) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine
    return sa.create_engine(
        url, pool_pre_ping=True, pool_size=10, max_overflow=20, hide_parameters=True
    )


_SQLITE_TRIGGERS = [
    "CREATE TRIGGER IF NOT EXISTS {table}_no_update BEFORE UPDATE ON {table} "
    "BEGIN SELECT RAISE(ABORT, '{table} is append-only: UPDATE refused'); END",
    "CREATE TRIGGER IF NOT EXISTS {table}_no_delete BEFORE DELETE ON {table} "
    "BEGIN SELECT RAISE(ABORT, '{table} is append-only: DELETE refused'); END",
]

# "%%" is "%" once psycopg has read the statement.
_POSTGRES_FUNCTION = """
CREATE OR REPLACE FUNCTION hrx_ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION '%% is append-only: %% refused', TG_TABLE_NAME, TG_OP
    USING ERRCODE = 'insufficient_privilege';
END $$
"""

_POSTGRES_TRIGGERS = [
    "CREATE OR REPLACE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
    "FOR EACH ROW EXECUTE FUNCTION hrx_ledger_append_only()",
    "CREATE OR REPLACE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
    "FOR EACH STATEMENT EXECUTE FUNCTION hrx_ledger_append_only()",
]


def create_schema(bind: Engine | Connection) -> None:
    """Create the ledger tables and their append-only triggers (idempotent). Given a
    connection (a migration's), it works inside that connection's transaction."""
    if isinstance(bind, Engine):
        with bind.begin() as conn:
            create_schema(conn)
        return
    metadata.create_all(bind)
    install_append_only_triggers(bind)


def install_append_only_triggers(conn: Connection, tables: Sequence[str] = LEDGER_TABLES) -> None:
    """The triggers by which the database itself refuses UPDATE and DELETE (and on
    PostgreSQL TRUNCATE) on the ledger tables (idempotent)."""
    bind = conn
    postgres = bind.dialect.name == "postgresql"
    if postgres:
        bind.exec_driver_sql(_POSTGRES_FUNCTION)
    for table in tables:
        for statement in _POSTGRES_TRIGGERS if postgres else _SQLITE_TRIGGERS:
            bind.exec_driver_sql(statement.format(table=table))


RESOLUTION_SETTING = "resolution:"  # + chain:height; the authority's signed resolution
HOLD_SETTING = "signing_hold"  # its value says why no block may be signed (ChainStore.hold)


def node_seq(node: merkle.NodeId) -> int:
    """The seq of the entry whose append completed Merkle node ``(level, index)``."""
    level, index = node
    return ((index + 1) << level) - 1


def pick_nodes(wanted: list[merkle.NodeId], blobs: dict[int, bytes]) -> dict[merkle.NodeId, bytes]:
    """The wanted Merkle nodes out of the ``nodes`` column of the entries that completed them."""
    found: dict[merkle.NodeId, bytes] = {}
    for node in wanted:
        blob = blobs.get(node_seq(node))
        level = node[0]
        if blob is not None and len(blob) >= 32 * (level + 1):
            found[node] = bytes(blob[32 * level : 32 * (level + 1)])
    return found


def writer_lock_key(chain: str) -> int:
    digest = hashlib.sha256(b"hrx/ledger-writer\x00" + chain.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)
