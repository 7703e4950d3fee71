"""Every chain a node holds (ChainStore): its rosters, heads and blocks; the blocks other members
signed, imported; evidence, resolutions and certificates; reads by patient, proofs and the
export."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ledger import merkle
from ledger.canonical import canonical_bytes, parse_canonical
from ledger.errors import LedgerError, StoreError
from ledger.model import (
    ZERO_HASH,
    block_bytes,
    block_hash,
    format_time,
)
from ledger.resolution import resolves
from ledger.roster import Roster, check_roster, open_roster
from ledger.store.schema import (
    HOLD_SETTING,
    RESOLUTION_SETTING,
    blocks_table,
    checkpoints_table,
    create_schema,
    entries_table,
    evidence_table,
    node_seq,
    open_engine,
    pick_nodes,
    roster_table,
    settings_table,
    subjects_table,
    votes_table,
    writer_lock_key,
)

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
        # the stored rosters, by the newest version they hold: the table is append-only, so a
        # version seen again means nothing changed (a roster of 1,200 members is ~700 KB)
        self._rosters_cache: tuple[int, list[tuple[dict[str, Any], str]], Roster] | None = None

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
        """Every stored roster version, oldest first, as ``(roster, signature)``. Without
        ``conn``, read again only when a newer version was stored (treat what is returned as
        read-only); with one, read from the rows as they are (what verifying and exporting
        need: a row changed in place must show)."""
        if conn is not None:
            return self._read_rosters(conn)
        if self.roster_version() is None:
            return []
        return list(self._cached_rosters()[1])

    def _cached_rosters(self) -> tuple[int, list[tuple[dict[str, Any], str]], Roster]:
        version = self.roster_version()
        cached = self._rosters_cache
        if version is None:
            raise StoreError("no roster stored; initialise with: hrx ledger init")
        if cached is None or cached[0] != version:
            rosters = self._read_rosters(None)
            body, signature = rosters[-1]
            newest = open_roster(body, signature, None, check_possession=False)
            cached = self._rosters_cache = (version, rosters, newest)
        return cached

    def _read_rosters(self, conn: Connection | None) -> list[tuple[dict[str, Any], str]]:
        query = sa.select(
            roster_table.c.version, roster_table.c.roster, roster_table.c.signature
        ).order_by(roster_table.c.version)
        self._require_schema()
        if conn is not None:
            rows = conn.execute(query).all()
        else:
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
        if conn is None:
            return self._cached_rosters()[2]
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

    def head(self, chain: str) -> Head | None:
        """The newest stored block of one chain, or None (one indexed row: cheap at any
        number of chains)."""
        self._require_schema()
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(blocks_table.c.header, blocks_table.c.signature)
                .where(blocks_table.c.chain == chain)
                .order_by(blocks_table.c.height.desc())
                .limit(1)
            ).first()
        return None if row is None else Head(parse_canonical(row.header), row.signature)

    def roster_version(self) -> int | None:
        """The newest stored roster version (None: none), without reading the rosters."""
        self._require_schema()
        with self.engine.connect() as conn:
            version = conn.execute(sa.select(sa.func.max(roster_table.c.version))).scalar()
        return None if version is None else int(version)

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
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({writer_lock_key(chain)})")
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

    def certificate_epoch(self) -> int | None:
        """The epoch of the newest stored certificate (None: none), without reading it."""
        self._require_schema()
        with self.engine.connect() as conn:
            epoch = conn.execute(sa.select(sa.func.max(checkpoints_table.c.epoch))).scalar()
        return None if epoch is None else int(epoch)

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
        return pick_nodes(wanted, blobs)

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
        with self.engine.connect() as conn:  # the rows as they are now, never a cached copy
            rosters = self.rosters(conn)
        for roster, signature in rosters:
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
