"""The chain store: the ledger's tables on SQLAlchemy 2 (SQLite by default, PostgreSQL by URL),
the group-committing writer of a node's own chain, and reads, proofs and exports.

Tables (``ledger_roster``, ``ledger_blocks``, ``ledger_entries``) are append-only: triggers in
the database refuse UPDATE, DELETE (and, on PostgreSQL, TRUNCATE). Each entry row keeps the
entry's canonical bytes and the hashes of the Merkle subtrees that entry completes (see
:class:`ledger.merkle.Frontier`), so any inclusion or consistency proof takes O(log n) row
look-ups and no tree is ever rebuilt. ``ledger_settings`` is ordinary configuration (which
chain this database writes, where its key is), not part of the ledger.

Writing: :class:`ChainWriter` batches concurrent appenders (threads) into blocks — one
signature and one transaction per block — and returns from :meth:`ChainWriter.append` only
once that transaction has committed. Writers in other processes are serialised by the database
(SQLite ``BEGIN IMMEDIATE``; PostgreSQL ``pg_advisory_xact_lock`` on the chain), and every
transaction re-reads the chain head under that lock, so the chain never forks itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.engine import Connection, Engine

from ledger import keys, merkle
from ledger.canonical import canonical_bytes, canonical_bytes_of_checked, parse_canonical
from ledger.errors import LedgerError, SigningHeld, StoreError
from ledger.model import (
    ZERO_HASH,
    block_bytes,
    block_hash,
    check_body,
    check_chain_id,
    check_entry_type,
    format_time,
    make_header,
)
from ledger.resolution import resolves
from ledger.roster import Roster, check_roster, open_roster

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
# pseudonym, DESIGN §4), indexed as it is stored, so that a patient's consents and accesses
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
DEFAULT_MAX_BLOCK_ENTRIES = 1000
GATHER_SECONDS = 0.001  # the longest a block waits for appenders still on their way


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


# The writer's statements, run for every block straight on the DBAPI cursor: SQLAlchemy's
# per-statement work would be most of a small block's cost. "?" becomes "%s" for psycopg.
RESOLUTION_SETTING = "resolution:"  # + chain:height; the authority's signed resolution
HOLD_SETTING = "signing_hold"  # its value says why no block may be signed (ChainStore.hold)
_WRITER_SQL = {
    "head": "SELECT (SELECT header FROM ledger_blocks WHERE chain = ? ORDER BY height DESC "
    "LIMIT 1), (SELECT max(version) FROM ledger_roster), "
    "(SELECT value FROM ledger_settings WHERE name = 'signing_hold')",
    "entries": "INSERT INTO ledger_entries (chain, seq, data, nodes) VALUES (?, ?, ?, ?)",
    "blocks": "INSERT INTO ledger_blocks (chain, height, tree_size, header, signature) "
    "VALUES (?, ?, ?, ?, ?)",
    "subjects": "INSERT INTO ledger_subjects (patient, chain, seq, type) VALUES (?, ?, ?, ?)",
}


# Proof queries, built once.
_NEWEST_SIZE = sa.select(sa.func.max(blocks_table.c.tree_size)).where(
    blocks_table.c.chain == sa.bindparam("chain")
)
_SIGNED_SIZE = sa.select(blocks_table.c.height).where(
    blocks_table.c.chain == sa.bindparam("chain"), blocks_table.c.tree_size == sa.bindparam("size")
)
_SIZE_BELOW = sa.select(sa.func.max(blocks_table.c.tree_size)).where(
    blocks_table.c.chain == sa.bindparam("chain"), blocks_table.c.tree_size < sa.bindparam("size")
)
_NODES = sa.select(entries_table.c.seq, entries_table.c.nodes).where(
    entries_table.c.chain == sa.bindparam("chain"),
    entries_table.c.seq.in_(sa.bindparam("seqs", expanding=True)),
)


_POSTGRES_WRITER_SQL = {
    name: statement.replace("?", "%s") for name, statement in _WRITER_SQL.items()
}


def node_seq(node: merkle.NodeId) -> int:
    """The seq of the entry whose append completed Merkle node ``(level, index)``."""
    level, index = node
    return ((index + 1) << level) - 1


def _pick_nodes(wanted: list[merkle.NodeId], blobs: dict[int, bytes]) -> dict[merkle.NodeId, bytes]:
    """The wanted Merkle nodes out of the ``nodes`` column of the entries that completed them."""
    found: dict[merkle.NodeId, bytes] = {}
    for node in wanted:
        blob = blobs.get(node_seq(node))
        level = node[0]
        if blob is not None and len(blob) >= 32 * (level + 1):
            found[node] = bytes(blob[32 * level : 32 * (level + 1)])
    return found


def subject_of(body: Any) -> str | None:
    """The patient an entry body names (its ``patient`` field), if it names one."""
    patient = body.get("patient") if isinstance(body, dict) else None
    return patient if isinstance(patient, str) and 0 < len(patient) <= 64 else None


def subject_rows(chain: str, entries: Iterable[tuple[int, bytes]]) -> list[dict[str, Any]]:
    """Index rows for stored entry data ``(seq, canonical bytes)``; only entries that may name
    a patient are parsed."""
    rows = []
    for seq, data in entries:
        if b'"patient":' not in data:
            continue
        entry = parse_canonical(data)
        patient = subject_of(entry.get("body"))
        if patient is not None:
            rows.append({"patient": patient, "chain": chain, "seq": seq, "type": entry["type"]})
    return rows


def _writer_lock_key(chain: str) -> int:
    digest = hashlib.sha256(b"hrx/ledger-writer\x00" + chain.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@dataclass(frozen=True)
class Head:
    """The newest block of a chain as stored: its header, signature and hash."""

    header: dict[str, Any]
    signature: str

    @property
    def hash(self) -> str:
        return block_hash(self.header).hex()

    @property
    def tree_size(self) -> int:
        return int(self.header["tree_size"])

    def to_json(self) -> dict[str, Any]:
        return {"header": self.header, "signature": self.signature}


class ChainStore:
    """The ledger tables of one database: reads, proofs, export, settings."""

    def __init__(self, target: str | Engine, *, read_only: bool = False) -> None:
        self.engine = (
            target if isinstance(target, Engine) else open_engine(target, read_only=read_only)
        )
        self._initialised = False

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def close(self) -> None:
        self.engine.dispose()

    # -- setup and settings -------------------------------------------------------------

    def create_schema(self) -> None:
        create_schema(self.engine)

    def initialise(
        self, roster: dict[str, Any], signature: str, *, chain: str, key_path: Path
    ) -> None:
        """Create the tables, store the first roster, and record which chain this database
        writes with which key (the defaults of ``hrx ledger append``)."""
        self.create_schema()
        self.add_roster(roster, signature)
        self.set_setting("chain", chain)
        self.set_setting("key", str(key_path.resolve()))

    def is_initialised(self) -> bool:
        if not self._initialised:  # once there, the (append-only) tables stay
            self._initialised = sa.inspect(self.engine).has_table("ledger_roster")
        return self._initialised

    def _require_schema(self) -> None:
        if not self.is_initialised():
            raise StoreError(
                f"{self.engine.url.render_as_string(hide_password=True)} holds no ledger; "
                "create one with: hrx ledger init"
            )

    def setting(self, name: str) -> str | None:
        self._require_schema()
        with self.engine.connect() as conn:
            return conn.execute(
                sa.select(settings_table.c.value).where(settings_table.c.name == name)
            ).scalar_one_or_none()

    def set_setting(self, name: str, value: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(settings_table.delete().where(settings_table.c.name == name))
            conn.execute(settings_table.insert().values(name=name, value=value))

    # -- the hold on signing -------------------------------------------------------------

    def hold_signing(self, reason: str) -> None:
        """Stop every writer of this database from signing a block, in every process, until
        :meth:`release_signing`: the node's own chain is found longer elsewhere than here
        (its database restored from a backup), and a block signed now would fork it."""
        self.set_setting(HOLD_SETTING, reason)

    def release_signing(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(settings_table.delete().where(settings_table.c.name == HOLD_SETTING))

    def signing_hold(self) -> str | None:
        """Why this node signs nothing now, or None."""
        return self.setting(HOLD_SETTING)

    # -- roster ------------------------------------------------------------------------

    def add_roster(self, roster: dict[str, Any], signature: str) -> None:
        """Store a roster version (higher than every stored one; signature checked by caller)."""
        check_roster(roster)
        with self.engine.begin() as conn:
            newest = conn.execute(sa.select(sa.func.max(roster_table.c.version))).scalar()
            if newest is not None and roster["version"] <= newest:
                raise StoreError(
                    f"roster version {roster['version']} is not newer than the stored {newest}"
                )
            conn.execute(
                roster_table.insert().values(
                    version=roster["version"], roster=canonical_bytes(roster), signature=signature
                )
            )

    def rosters(self, conn: Connection | None = None) -> list[tuple[dict[str, Any], str]]:
        """Every stored roster version, oldest first, as ``(roster, signature)``."""
        query = sa.select(
            roster_table.c.version, roster_table.c.roster, roster_table.c.signature
        ).order_by(roster_table.c.version)
        if conn is not None:
            rows = conn.execute(query).all()
        else:
            self._require_schema()
            with self.engine.connect() as own:
                rows = own.execute(query).all()
        rosters = []
        for row in rows:
            try:
                roster = parse_canonical(row.roster)
            except LedgerError as exc:
                raise StoreError(f"stored roster version {row.version}: {exc}") from exc
            if not isinstance(roster, dict) or roster.get("version") != row.version:
                raise StoreError(f"the roster row of version {row.version} holds another version")
            rosters.append((roster, row.signature))
        return rosters

    def roster(self, conn: Connection | None = None) -> Roster:
        """The newest roster, trusted as stored (the local node's own configuration)."""
        rosters = self.rosters(conn)
        if not rosters:
            raise StoreError("no roster stored; initialise with: hrx ledger init")
        body, signature = rosters[-1]
        return open_roster(body, signature, None, check_possession=False)

    # -- reads -------------------------------------------------------------------------

    def chains(self) -> list[str]:
        self._require_schema()
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    sa.select(blocks_table.c.chain).distinct().order_by(blocks_table.c.chain)
                )
                .scalars()
                .all()
            )

    def heads(self) -> dict[str, Head]:
        self._require_schema()
        newest = (
            sa.select(blocks_table.c.chain, sa.func.max(blocks_table.c.height).label("height"))
            .group_by(blocks_table.c.chain)
            .subquery()
        )
        query = sa.select(
            blocks_table.c.chain, blocks_table.c.header, blocks_table.c.signature
        ).join(
            newest,
            sa.and_(
                blocks_table.c.chain == newest.c.chain, blocks_table.c.height == newest.c.height
            ),
        )
        with self.engine.connect() as conn:
            return {
                row.chain: Head(parse_canonical(row.header), row.signature)
                for row in conn.execute(query.order_by(blocks_table.c.chain))
            }

    def block_at(self, chain: str, height: int) -> Head | None:
        """The stored header and signature of one block, or None."""
        self._require_schema()
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(blocks_table.c.header, blocks_table.c.signature).where(
                    blocks_table.c.chain == chain, blocks_table.c.height == height
                )
            ).first()
        return None if row is None else Head(parse_canonical(row.header), row.signature)

    def import_blocks(
        self,
        chain: str,
        after: str,
        blocks: Sequence[tuple[bytes, str, list[bytes], list[bytes]]],
    ) -> None:
        """Store verified blocks of another member's chain: ``(header bytes, signature, entry
        data, entry nodes)`` each, on top of the stored head whose hash is ``after`` (64 zeros:
        none). Checked again under the chain's writer lock: if the head moved meanwhile
        (another replicator stored it), nothing is stored and StoreError says so."""
        if not blocks:
            return
        entry_rows: list[tuple[Any, ...]] = []
        block_rows: list[tuple[Any, ...]] = []
        for header_bytes, signature, datas, nodes in blocks:
            header = parse_canonical(header_bytes)
            first = int(header["first_seq"])
            entry_rows.extend(
                (chain, first + offset, data, node)
                for offset, (data, node) in enumerate(zip(datas, nodes, strict=True))
            )
            block_rows.append(
                (chain, header["height"], header["tree_size"], header_bytes, signature)
            )
        with self.engine.begin() as conn:
            if self.is_postgres:
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_writer_lock_key(chain)})")
            head = conn.execute(
                sa.select(blocks_table.c.header)
                .where(blocks_table.c.chain == chain)
                .order_by(blocks_table.c.height.desc())
                .limit(1)
            ).scalar()
            current = ZERO_HASH if head is None else hashlib.sha256(bytes(head)).hexdigest()
            if current != after:
                raise StoreError(f"chain {chain} moved on while blocks were verified; try again")
            conn.execute(
                entries_table.insert(),
                [{"chain": c, "seq": q, "data": d, "nodes": n} for c, q, d, n in entry_rows],
            )
            conn.execute(
                blocks_table.insert(),
                [
                    {"chain": c, "height": h, "tree_size": t, "header": b, "signature": g}
                    for c, h, t, b, g in block_rows
                ],
            )
            subjects = subject_rows(chain, ((q, bytes(d)) for _c, q, d, _n in entry_rows))
            if subjects:
                conn.execute(subjects_table.insert(), subjects)

    def add_evidence(self, evidence: dict[str, Any]) -> bool:
        """Store fork evidence (two validly signed headers of one chain and height); False
        when this evidence was stored before."""
        headers = evidence["headers"]
        first, second = (h["header"] for h in headers)
        hashes = sorted(block_hash(h["header"]).hex() for h in headers)
        chain, height = first["chain"], first["height"]
        if (second["chain"], second["height"]) != (chain, height) or hashes[0] == hashes[1]:
            raise StoreError("fork evidence is two different blocks of one chain and height")
        with self.engine.begin() as conn:
            known = conn.execute(
                sa.select(evidence_table.c.chain).where(
                    evidence_table.c.chain == chain,
                    evidence_table.c.height == height,
                    evidence_table.c.first_hash == hashes[0],
                )
            ).first()
            if known is not None:
                return False
            conn.execute(
                evidence_table.insert().values(
                    chain=chain,
                    height=height,
                    first_hash=hashes[0],
                    evidence=canonical_bytes(evidence),
                    found=format_time(),
                )
            )
        return True

    def evidence(self) -> list[dict[str, Any]]:
        """Every stored fork evidence, oldest first."""
        self._require_schema()
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(evidence_table.c.evidence).order_by(
                    evidence_table.c.found, evidence_table.c.chain, evidence_table.c.height
                )
            ).all()
        return [parse_canonical(row.evidence) for row in rows]

    def frozen_chains(self) -> set[str]:
        """Chains with fork evidence that no resolution of the authority settles for this node
        (:mod:`ledger.resolution`: it keeps the block this node holds at that height): this
        node accepts no more of their blocks."""
        with self.engine.connect() as conn:
            frozen = set(conn.execute(sa.select(evidence_table.c.chain).distinct()).scalars())
        resolutions = self.resolutions() if frozen else []
        if not resolutions:
            return frozen
        unsettled = set()
        for evidence in self.evidence():
            held = self.block_at(evidence["chain"], evidence["height"])
            keeps = [
                r
                for r in resolutions
                if resolves(r, evidence) and (held is None or held.hash == r["keep"])
            ]
            if not keeps:
                unsettled.add(evidence["chain"])
        return unsettled

    def add_resolution(self, document: dict[str, Any]) -> None:
        """Store the authority's signed resolution of a fork (signature checked by the caller:
        :func:`ledger.resolution.open_resolution`)."""
        body = document["resolution"]
        self.set_setting(
            f"{RESOLUTION_SETTING}{body['chain']}:{body['height']}",
            canonical_bytes(document).decode(),
        )

    def resolutions(self) -> list[dict[str, Any]]:
        """The bodies of every stored resolution."""
        return [document["resolution"] for document in self.resolution_documents()]

    def resolution_documents(self) -> list[dict[str, Any]]:
        """Every stored resolution as the authority signed it."""
        self._require_schema()
        with self.engine.connect() as conn:
            values = conn.execute(
                sa.select(settings_table.c.value).where(
                    settings_table.c.name.startswith(RESOLUTION_SETTING)
                )
            ).scalars()
            return [parse_canonical(value.encode()) for value in values]

    def add_certificate(self, certificate: dict[str, Any]) -> bool:
        """Store a (verified) checkpoint certificate; False when its epoch has one already."""
        epoch = certificate["checkpoint"]["epoch"]
        with self.engine.begin() as conn:
            if conn.execute(
                sa.select(checkpoints_table.c.epoch).where(checkpoints_table.c.epoch == epoch)
            ).first():
                return False
            conn.execute(
                checkpoints_table.insert().values(
                    epoch=epoch, certificate=canonical_bytes(certificate)
                )
            )
        return True

    def certificate(self, epoch: int | None = None) -> dict[str, Any] | None:
        """The certificate of an epoch, or the newest (None when there is none)."""
        self._require_schema()
        query = sa.select(checkpoints_table.c.certificate)
        if epoch is None:
            query = query.order_by(checkpoints_table.c.epoch.desc()).limit(1)
        else:
            query = query.where(checkpoints_table.c.epoch == epoch)
        with self.engine.connect() as conn:
            data = conn.execute(query).scalar()
        return None if data is None else dict(parse_canonical(data))

    def certificates(self) -> Iterator[dict[str, Any]]:
        """Every stored certificate, by epoch."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(checkpoints_table.c.certificate).order_by(checkpoints_table.c.epoch)
            ).all()
        for row in rows:
            yield dict(parse_canonical(row.certificate))

    def vote(self, checkpoint: dict[str, Any]) -> bool:
        """Record that this node signs ``checkpoint``; False when it already signed another
        checkpoint of the same epoch (an honest member signs one per epoch)."""
        data = canonical_bytes(checkpoint)
        with self.engine.begin() as conn:
            signed = conn.execute(
                sa.select(votes_table.c.checkpoint).where(
                    votes_table.c.epoch == checkpoint["epoch"]
                )
            ).scalar()
            if signed is not None:
                return bytes(signed) == data
            conn.execute(votes_table.insert().values(epoch=checkpoint["epoch"], checkpoint=data))
        return True

    def entries_about(
        self, patient: str | None, types: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        """Every stored entry whose body names ``patient`` (None: any patient), of ``types``
        when given, by chain and seq."""
        self._require_schema()
        query = (
            sa.select(entries_table.c.data)
            .select_from(
                subjects_table.join(
                    entries_table,
                    sa.and_(
                        entries_table.c.chain == subjects_table.c.chain,
                        entries_table.c.seq == subjects_table.c.seq,
                    ),
                )
            )
            .order_by(subjects_table.c.chain, subjects_table.c.seq)
        )
        if patient is not None:
            query = query.where(subjects_table.c.patient == patient)
        if types is not None:
            query = query.where(subjects_table.c.type.in_(list(types)))
        with self.engine.connect() as conn:
            return [parse_canonical(bytes(row[0])) for row in conn.execute(query)]

    def entry(self, chain: str, seq: int) -> dict[str, Any]:
        self._require_schema()
        with self.engine.connect() as conn:
            data = conn.execute(
                sa.select(entries_table.c.data).where(
                    entries_table.c.chain == chain, entries_table.c.seq == seq
                )
            ).scalar_one_or_none()
        if data is None:
            raise StoreError(f"chain {chain} has no entry {seq}")
        entry: dict[str, Any] = parse_canonical(data)
        return entry

    def block_rows(
        self, chain: str, from_height: int = 0, limit: int | None = None, *, page: int = 500
    ) -> Iterator[StoredBlock]:
        """Blocks of a chain in height order, as stored, streamed a page at a time (at most
        ``page`` blocks, and no more blocks than hold :data:`PAGE_ENTRIES` entries)."""
        self._require_schema()
        height, remaining = from_height, limit
        while remaining is None or remaining > 0:
            size = page if remaining is None else min(page, remaining)
            with self.engine.connect() as conn:
                rows = conn.execute(
                    sa.select(
                        blocks_table.c.height,
                        blocks_table.c.tree_size,
                        blocks_table.c.header,
                        blocks_table.c.signature,
                    )
                    .where(blocks_table.c.chain == chain, blocks_table.c.height >= height)
                    .order_by(blocks_table.c.height)
                    .limit(size)
                ).all()
                if not rows:
                    return
                headers = [_parse_header(row.header, chain, row.height) for row in rows]
                rows, headers = _within_budget(rows, headers)
                first = min(int(h["first_seq"]) for h in headers)
                last = max(int(h["tree_size"]) for h in headers)
                entry_rows = conn.execute(
                    sa.select(entries_table.c.seq, entries_table.c.data, entries_table.c.nodes)
                    .where(
                        entries_table.c.chain == chain,
                        entries_table.c.seq >= first,
                        entries_table.c.seq < last,
                    )
                    .order_by(entries_table.c.seq)
                ).all()
            by_seq = {row.seq: row for row in entry_rows}
            for row, header in zip(rows, headers, strict=True):
                span = range(int(header["first_seq"]), int(header["tree_size"]))
                stored = [by_seq[s] for s in span if s in by_seq]
                yield StoredBlock(
                    row_height=row.height,
                    row_tree_size=row.tree_size,
                    header=header,
                    header_bytes=row.header,
                    signature=row.signature,
                    entry_seqs=[r.seq for r in stored],
                    entry_data=[r.data for r in stored],
                    entry_nodes=[r.nodes for r in stored],
                )
            height = rows[-1].height + 1
            if remaining is not None:
                remaining -= len(rows)

    def entry_stats(self) -> dict[str, tuple[int, int, int]]:
        """``{chain: (entry rows, lowest seq, highest seq)}`` for every chain with entries."""
        return self._row_stats(entries_table, entries_table.c.seq)

    def block_stats(self) -> dict[str, tuple[int, int, int]]:
        """``{chain: (block rows, lowest height, highest height)}`` for every chain."""
        return self._row_stats(blocks_table, blocks_table.c.height)

    def _row_stats(
        self, table: sa.Table, key: sa.Column[Any], conn: Connection | None = None
    ) -> dict[str, tuple[int, int, int]]:
        query = sa.select(
            table.c.chain, sa.func.count(), sa.func.min(key), sa.func.max(key)
        ).group_by(table.c.chain)
        if conn is None:
            self._require_schema()
            with self.engine.connect() as own:
                rows = own.execute(query).all()
        else:
            rows = conn.execute(query).all()
        return {row[0]: (int(row[1]), int(row[2]), int(row[3])) for row in rows}

    def row_stats_snapshot(
        self,
    ) -> tuple[dict[str, tuple[int, int, int]], dict[str, tuple[int, int, int]], dict[str, int]]:
        """Entry and block row stats and each chain's newest tree size, all read in one
        snapshot of the database (a live node keeps appending while an auditor reads)."""
        self._require_schema()
        with self.engine.connect() as conn:
            if self.is_postgres:
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                entries = self._row_stats(entries_table, entries_table.c.seq, conn)
                blocks = self._row_stats(blocks_table, blocks_table.c.height, conn)
                sizes = {}  # the tree size of each chain's highest block
                for chain, (_rows, _lowest, highest) in blocks.items():
                    sizes[chain] = int(
                        conn.execute(
                            sa.select(blocks_table.c.tree_size).where(
                                blocks_table.c.chain == chain, blocks_table.c.height == highest
                            )
                        ).scalar_one()
                    )
        return entries, blocks, sizes

    def block_count(self) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(sa.select(sa.func.count()).select_from(blocks_table)).scalar_one()
            )

    # -- proofs ------------------------------------------------------------------------

    def _signed_size(self, conn: Connection, chain: str, tree_size: int | None) -> int:
        """``tree_size``, checked to be a size some block of the chain signed (default: newest)."""
        if tree_size is None:
            newest = conn.execute(_NEWEST_SIZE, {"chain": chain}).scalar()
            if newest is None:
                raise StoreError(f"chain {chain} has no blocks")
            return int(newest)
        if conn.execute(_SIGNED_SIZE, {"chain": chain, "size": tree_size}).first() is None:
            below = conn.execute(_SIZE_BELOW, {"chain": chain, "size": tree_size}).scalar()
            raise StoreError(
                f"no block of chain {chain} signs tree size {tree_size}"
                + (f" (the nearest signed size below is {below})" if below else "")
                + "; a proof is only useful against a signed head"
            )
        return tree_size

    def _nodes(
        self, conn: Connection, chain: str, wanted: Iterable[merkle.NodeId]
    ) -> dict[merkle.NodeId, bytes]:
        wanted = list(wanted)
        seqs = sorted({node_seq(node) for node in wanted})
        if not seqs:
            return {}
        blobs = {row[0]: row[1] for row in conn.execute(_NODES, {"chain": chain, "seqs": seqs})}
        return _pick_nodes(wanted, blobs)

    def inclusion_proof(self, chain: str, seq: int, tree_size: int | None = None) -> dict[str, Any]:
        """``{"leaf_index", "tree_size", "audit_path"}`` for entry ``seq`` in a signed tree."""
        self._require_schema()
        with self.engine.connect() as conn:
            size = self._signed_size(conn, chain, tree_size)
            plan = merkle.inclusion_plan(seq, size)
            nodes = self._nodes(conn, chain, merkle.plan_nodes(plan))
        path = merkle.assemble(plan, merkle.node_for_lookup(nodes))
        return {"leaf_index": seq, "tree_size": size, "audit_path": [h.hex() for h in path]}

    def consistency_proof(
        self, chain: str, first: int, second: int | None = None
    ) -> dict[str, Any]:
        """``{"first", "second", "path"}`` between two signed tree sizes of a chain."""
        self._require_schema()
        with self.engine.connect() as conn:
            size2 = self._signed_size(conn, chain, second)
            size1 = self._signed_size(conn, chain, first)
            plan = merkle.consistency_plan(size1, size2)
            nodes = self._nodes(conn, chain, merkle.plan_nodes(plan))
        path = merkle.assemble(plan, merkle.node_for_lookup(nodes))
        return {"first": size1, "second": size2, "path": [h.hex() for h in path]}

    def frontier(self, chain: str, head: Head) -> merkle.Frontier:
        """The right edge of the chain's tree at ``head``, from O(log n) stored nodes."""
        plan = merkle.Frontier.plan(head.tree_size)
        with self.engine.connect() as conn:
            nodes = self._nodes(conn, chain, plan)
        return self._frontier_of(chain, head, plan, nodes)

    def _frontier_of(
        self,
        chain: str,
        head: Head,
        plan: list[merkle.NodeId],
        nodes: dict[merkle.NodeId, bytes],
    ) -> merkle.Frontier:
        size = head.tree_size
        try:
            frontier = merkle.Frontier(size, [merkle.node_for_lookup(nodes)(node) for node in plan])
        except LedgerError as exc:
            raise StoreError(f"chain {chain}: stored Merkle nodes are incomplete: {exc}") from exc
        if frontier.root().hex() != head.header["tree_root"]:
            raise StoreError(
                f"chain {chain}: stored Merkle nodes do not give the root of block "
                f"{head.header['height']}; run hrx audit verify on this database"
            )
        return frontier

    # -- export ------------------------------------------------------------------------

    def export_lines(self) -> Iterator[bytes]:
        """The export: each roster version ``{"roster", "signature"}``, then every chain's blocks
        ``{"entries", "header", "signature"}`` in chain order, then every checkpoint
        ``{"certificate"}`` by epoch and every fork ``{"evidence"}`` — canonical JSON, one per
        line."""
        for roster, signature in self.rosters():
            yield canonical_bytes({"roster": roster, "signature": signature})
        for chain in self.chains():
            for block in self.block_rows(chain):
                yield block.wire_bytes()
        for certificate in self.certificates():
            yield canonical_bytes({"certificate": certificate})
        for evidence in self.evidence():
            yield canonical_bytes({"evidence": evidence})


PAGE_ENTRIES = 20_000  # entry rows one page of block_rows holds in memory, about 10 MB


def _within_budget(
    rows: Sequence[Any], headers: list[dict[str, Any]]
) -> tuple[Sequence[Any], list[dict[str, Any]]]:
    """The leading blocks of a page whose entries fit :data:`PAGE_ENTRIES` (at least one)."""
    claimed, kept = 0, 0
    for header in headers:
        claimed += int(header["tree_size"]) - int(header["first_seq"])
        if kept and claimed > PAGE_ENTRIES:
            break
        kept += 1
    return rows[:kept], headers[:kept]


def _parse_header(data: bytes, chain: str, height: int) -> dict[str, Any]:
    """A stored header, parsed just enough to find its entries (the verifier checks the rest)."""
    try:
        header = parse_canonical(data)
        if not isinstance(header, dict):
            raise StoreError("not a JSON object")
        for name in ("first_seq", "tree_size"):
            if type(header.get(name)) is not int:
                raise StoreError(f"{name} is not an integer")
    except LedgerError as exc:
        raise StoreError(f"chain {chain}, block height {height}: stored header: {exc}") from exc
    return header


@dataclass
class StoredBlock:
    """A block as its rows hold it, before any check (the verifier checks it)."""

    row_height: int
    row_tree_size: int
    header: dict[str, Any]
    header_bytes: bytes
    signature: str
    entry_seqs: list[int]
    entry_data: list[bytes]
    entry_nodes: list[bytes]

    def wire_bytes(self) -> bytes:
        """The block as one export line, from the stored canonical bytes."""
        return block_bytes(self.entry_data, self.header_bytes, self.signature)


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
                sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _writer_lock_key(self.chain)}
            )
        sql = _POSTGRES_WRITER_SQL if self.store.is_postgres else _WRITER_SQL
        head, roster_version, hold = conn.exec_driver_sql(sql["head"], (self.chain,)).one()
        if roster_version is None:
            raise StoreError("no roster stored; initialise with: hrx ledger init")
        if hold is not None:
            raise SigningHeld(hold)
        if roster_version != self._keyed_version:
            self._keyed_version = self._check_key(conn)
        pending = _Pending(checked)
        entry_rows, block_rows, subjects, _cached = self._build_blocks(
            [pending], head, int(roster_version), partial(self.store._nodes, conn, self.chain)
        )
        conn.execute(
            entries_table.insert(),
            [dict(zip(("chain", "seq", "data", "nodes"), row, strict=True)) for row in entry_rows],
        )
        conn.execute(
            blocks_table.insert(),
            [
                dict(zip(("chain", "height", "tree_size", "header", "signature"), row, strict=True))
                for row in block_rows
            ],
        )
        if subjects:
            conn.execute(
                subjects_table.insert(),
                [
                    dict(zip(("patient", "chain", "seq", "type"), row, strict=True))
                    for row in subjects
                ],
            )
        return pending.seqs

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
        sql = _POSTGRES_WRITER_SQL if postgres else _WRITER_SQL
        connection = self._writer_connection()
        cursor = connection.cursor()
        try:
            if postgres:  # autocommit connection: BEGIN and the lock in one round trip
                key = _writer_lock_key(self.chain)  # an int of ours: safe to write inline
                cursor.execute(f"BEGIN; SELECT pg_advisory_xact_lock({key})")
            else:
                cursor.execute("BEGIN IMMEDIATE")
            cursor.execute(sql["head"], (self.chain,))
            head, roster_version, hold = cursor.fetchone()
            if roster_version is None:
                raise StoreError("no roster stored; initialise with: hrx ledger init")
            if hold is not None:
                raise SigningHeld(hold)
            if roster_version != self._keyed_version:  # a new roster: is this still our key?
                self._keyed_version = self._check_key()
            entry_rows, block_rows, subjects, cached = self._build_blocks(
                batch, head, int(roster_version), partial(self._read_nodes, cursor)
            )
            if postgres:  # inserts and COMMIT in one round trip
                with connection.pipeline():
                    cursor.executemany(sql["entries"], entry_rows)
                    cursor.executemany(sql["blocks"], block_rows)
                    if subjects:
                        cursor.executemany(sql["subjects"], subjects)
                    cursor.execute("COMMIT")
            else:
                cursor.executemany(sql["entries"], entry_rows)
                cursor.executemany(sql["blocks"], block_rows)
                if subjects:
                    cursor.executemany(sql["subjects"], subjects)
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
        self._cached = cached

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
        return _pick_nodes(wanted, {row[0]: row[1] for row in cursor.fetchall()})

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
    ) -> tuple[
        list[tuple[Any, ...]],
        list[tuple[Any, ...]],
        list[tuple[Any, ...]],
        tuple[bytes, dict[str, Any], merkle.Frontier],
    ]:
        """The entry, block and subject rows for a batch on top of the stored head, and the
        new head."""
        if head is None:
            frontier = merkle.Frontier()
            height, prev, prev_time = 0, ZERO_HASH, ""
        else:
            stored = bytes(head)
            if self._cached is not None and self._cached[0] == stored:
                header, frontier = self._cached[1], self._cached[2].copy()
            else:  # first block of this writer, or another process wrote since
                header = parse_canonical(stored)
                stored_head = Head(header, "")
                plan = merkle.Frontier.plan(stored_head.tree_size)
                frontier = self.store._frontier_of(self.chain, stored_head, plan, read_nodes(plan))
            # The stored bytes are canonical (ours, or parsed as such), so they hash as the block.
            prev = hashlib.sha256(stored).hexdigest()
            height, prev_time = header["height"] + 1, header["time"]
        items = [(item, pending) for pending in batch for item in pending.items]
        entry_rows: list[tuple[Any, ...]] = []
        block_rows: list[tuple[Any, ...]] = []
        subjects: list[tuple[Any, ...]] = []
        for start in range(0, len(items), self.max_block_entries):
            chunk = items[start : start + self.max_block_entries]
            first_seq = frontier.size
            block_time = max(prev_time, format_time())
            for (entry_type, body, time_), pending in chunk:
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
                pending.seqs.append(seq)
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
            signature = keys.sign(self.key, keys.BLOCK_DOMAIN, digest)
            block_rows.append((self.chain, height, frontier.size, header_bytes, signature))
            height, prev, prev_time = height + 1, digest.hex(), block_time
        return entry_rows, block_rows, subjects, (block_rows[-1][3], header, frontier)
