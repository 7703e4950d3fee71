"""Ledger benchmark: durable appends, verification and proofs, each printed beside its ceiling
measured in the same run (a ratio holds on a noisy machine; an absolute time drifts).

    python scripts/bench_ledger.py [--entries 1000000] [--appends 20000] [--postgres URL]
        [--writers 1,8,32] [--skip-appends | --skip-verify]

- appends/s through ChainWriter with 1, 8 and 32 concurrent writer threads (each waits until its
  entry is durable), on SQLite and PostgreSQL; ceiling: the same rows inserted raw (no
  canonicalising, hashing or signing) in the same number of transactions;
- verification entries/s over a ledger of ``--entries`` entries on ``--members`` chains, from
  its export file and from its database, on one core (``--jobs 1``) and on every core (one
  worker process per core, ledger.verify_parallel); ceiling: SHA-256 leaf hashes over the same
  canonical bytes, in one process on one core, and in one process per core at once (what the
  machine gives several processes at that moment: other work on it shows here); beside it, the
  same hashes through the compiled module (ledger/_speedups.c: OpenSSL, no Python call each);
- the Merkle floor: the leaf and interior-node hashes every verifier must compute (RFC 9162),
  with no parsing or checking at all, beside the same ceiling;
- inclusion and consistency proofs at that size: made from the store, checked by the verifier.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from ledger import bls, keys, merkle
from ledger.canonical import canonical_bytes
from ledger.roster import make_member, make_roster, open_roster, sign_roster
from ledger.store import ChainStore, ChainWriter, open_engine
from ledger.verify_parallel import (
    available_cores,
    verify_database_in_parallel,
    verify_export_in_parallel,
)

try:
    from ledger import _speedups
except ImportError:  # built without a C compiler: the pure-Python paths
    _speedups = None  # type: ignore[assignment]

console = Console(highlight=False)
LOAD_BEFORE = f"{os.getloadavg()[0]:.2f}"  # other work on the machine shows here
BODY = {
    "request_id": "0f8e2a6c-1b1f-4a59-b7a2-6a6b4a7e5d11",
    "requester_org": "hosp-b",
    "decision": "permit",
    "reason": "consent",
    "consent": {"chain": "hosp-a", "seq": 12},
    "view": {"hosp-a": 40, "hosp-b": 17},
    "released": ["9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"],
}
BLS_KEY = bls.generate_secret_key(b"bench".ljust(32, b"\0"))


def new_ledger(url: str, workdir: Path, members: int = 1) -> tuple[ChainStore, Any, Any]:
    """A ledger of ``members`` members (hosp-a, hosp-b, ...); the first one's key is returned
    (every member's key is ``workdir/<id>.pem``)."""
    ids = [f"hosp-{chr(ord('a') + n)}" if n < 26 else f"hosp-{n}" for n in range(members)]
    signing = {i: keys.load_or_create_private_key(workdir / f"{i}.pem") for i in ids}
    authority = keys.load_or_create_private_key(workdir / "authority.pem")
    roster = make_roster(
        "bench", [make_member(i, f"Hospital {i}", "", signing[i], BLS_KEY) for i in ids], quorum=1
    )
    store = ChainStore(url)
    store.initialise(
        roster, sign_roster(roster, authority), chain="hosp-a", key_path=workdir / "hosp-a.pem"
    )
    return store, signing["hosp-a"], authority


def run_appenders(writer: ChainWriter, threads: int, total: int) -> float:
    """Seconds for ``threads`` threads to append ``total`` entries, one durable append at a time."""

    def work() -> None:
        for _ in range(total // threads):
            writer.append("access.decided", BODY)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    started = time.perf_counter()
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return time.perf_counter() - started


def raw_ceiling(store: ChainStore, from_height: int) -> float:
    """Seconds to insert the rows of blocks ``from_height``.. again, raw, one transaction per
    block, into trigger-less copies of the tables (same engine, same durability settings)."""
    batches = [
        (
            [
                ("raw", s, d, n)
                for s, d, n in zip(b.entry_seqs, b.entry_data, b.entry_nodes, strict=True)
            ],
            ("raw", b.row_height, b.row_tree_size, b.header_bytes, b.signature),
        )
        for b in store.block_rows("hosp-a", from_height)
    ]
    postgres = store.is_postgres
    mark = "%s" if postgres else "?"
    engine = open_engine(str(store.engine.url.render_as_string(hide_password=False)))
    with engine.begin() as conn:
        for table in ("entries", "blocks"):
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS raw_{table}")
        conn.exec_driver_sql("CREATE TABLE raw_entries AS SELECT * FROM ledger_entries WHERE 1 = 0")
        conn.exec_driver_sql("CREATE TABLE raw_blocks AS SELECT * FROM ledger_blocks WHERE 1 = 0")
    with engine.connect() as conn:
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        cursor = dbapi.cursor()
        started = time.perf_counter()
        for entry_rows, block_row in batches:
            if not postgres:
                cursor.execute("BEGIN IMMEDIATE")
            cursor.executemany(
                f"INSERT INTO raw_entries VALUES ({mark}, {mark}, {mark}, {mark})", entry_rows
            )
            cursor.execute(
                f"INSERT INTO raw_blocks VALUES ({', '.join([mark] * 5)})",
                block_row,
            )
            dbapi.commit()
        elapsed = time.perf_counter() - started
    engine.dispose()
    return elapsed


def bench_appends(
    label: str,
    url: str,
    workdir: Path,
    appends: int,
    rows: list[list[str]],
    writers: tuple[int, ...] = (1, 8, 32),
) -> None:
    store, key, _ = new_ledger(url, workdir)
    with ChainWriter(store, "hosp-a", key) as writer:
        writer.append("access.decided", BODY)  # warm up: first block, statement caches
        for threads in writers:
            total = appends // (4 if threads == 1 else 1)
            first_height = store.heads()["hosp-a"].header["height"] + 1
            seconds = run_appenders(writer, threads, total)
            blocks = store.heads()["hosp-a"].header["height"] + 1 - first_height
            ceiling = raw_ceiling(store, first_height)
            rows.append(
                [
                    f"{label}: durable appends/s, {threads} writer{'s' if threads > 1 else ''}",
                    f"{total / seconds:,.0f}",
                    f"{total / ceiling:,.0f}",
                    f"{ceiling / seconds:.0%}",
                    f"{total} entries in {blocks} blocks ({total / blocks:.1f}/block)",
                ]
            )
            console.print(rows[-1])
    store.close()


def timed(fn: Callable[[], Any], repeat: int) -> float:
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - started) / repeat


def hash_rate(datas: list[bytes], processes: int) -> float:
    """Leaf hashes per second over ``datas`` (each hashed once), in ``processes`` processes at
    once, each a share, one ``merkle.leaf_hash`` at a time (the ceiling)."""

    if processes == 1:
        started = time.perf_counter()
        for data in datas:
            merkle.leaf_hash(data)
        return len(datas) / (time.perf_counter() - started)
    context = multiprocessing.get_context("fork")
    ready = context.Barrier(processes + 1)
    done = context.Queue()

    def share(part: int) -> None:
        mine = datas[part::processes]  # touched before the clock starts (copy-on-write)
        ready.wait()
        for data in mine:
            merkle.leaf_hash(data)
        done.put(part)

    workers = [context.Process(target=share, args=(part,)) for part in range(processes)]
    for worker in workers:
        worker.start()
    ready.wait()
    started = time.perf_counter()
    for _ in workers:
        done.get()
    elapsed = time.perf_counter() - started
    for worker in workers:
        worker.join()
    return len(datas) / elapsed


def compiled_hash_rate(datas: list[bytes]) -> float | None:
    """Leaf hashes per second over ``datas`` through the compiled module (OpenSSL's SHA-256,
    no Python call per hash), a list of 1,000 at a time, on one core; None without it."""
    if _speedups is None:
        return None
    batches = [datas[at : at + 1000] for at in range(0, len(datas), 1000)]
    started = time.perf_counter()
    for batch in batches:
        _speedups.leaf_hashes(batch)
    return len(datas) / (time.perf_counter() - started)


def merkle_floor(blocks: list[list[bytes]]) -> float:
    """Entries per second of the hashing alone that verifying needs: every leaf hash and every
    interior node of each chain's tree, block by block as the verifier computes them."""
    started = time.perf_counter()
    frontier = merkle.Frontier()
    for datas in blocks:
        if datas is None:
            frontier = merkle.Frontier()  # the next chain
            continue
        frontier.extend(merkle.leaf_hashes(datas))
    return sum(len(b) for b in blocks if b is not None) / (time.perf_counter() - started)


def build(store: ChainStore, workdir: Path, entries: int, members: int) -> None:
    per_member = entries // members
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("building the ledger", total=per_member * members)
        for member in store.roster().body["members"]:
            signing = keys.load_private_key(workdir / f"{member['id']}.pem")
            with ChainWriter(store, member["id"], signing) as writer:
                for start in range(0, per_member, 1000):
                    count = min(1000, per_member - start)
                    writer.append_many([("access.decided", BODY)] * count)
                    progress.advance(task, count)


def bench_large(
    entries: int, members: int, jobs: int, workdir: Path, rows: list[list[str]]
) -> None:
    url = f"sqlite:///{workdir / 'large.db'}"
    store, _, authority = new_ledger(url, workdir / "large", members)
    started = time.perf_counter()
    build(store, workdir / "large", entries, members)
    built = time.perf_counter() - started
    entries = entries // members * members
    rows.append(
        [
            f"bulk append of {entries:,} entries on {members} chains (blocks of 1000), entries/s",
            f"{entries / built:,.0f}",
            "",
            "",
            "",
        ]
    )
    console.print(rows[-1])

    export = workdir / "large.jsonl"
    with export.open("wb") as handle:
        for line in store.export_lines():
            handle.write(line + b"\n")
    blocks: list[Any] = []
    for chain in store.chains():
        blocks += [block.entry_data for block in store.block_rows(chain)] + [None]
    canonical = [data for datas in blocks if datas is not None for data in datas]

    # The roster check is once per verification, whatever the size: its BLS proofs of
    # possession run on py_ecc (milagro has no PoP API). Timed on its own, and then cached in
    # this process (and the workers forked from it), so that the rates below are the per-entry
    # work.
    started = time.perf_counter()
    open_roster(*store.rosters()[0], authority.public_key())
    roster_check = time.perf_counter() - started
    rows.append(
        [
            f"roster check, once per verification ({members} members, one BLS key; PoP on py_ecc)",
            f"{roster_check:.2f} s",
            "",
            "",
            "",
        ]
    )
    console.print(rows[-1])

    everywhere = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    for cores in (1, jobs):
        if everywhere is not None:  # one core: this process and its workers on the first
            os.sched_setaffinity(0, {min(everywhere)} if cores == 1 else everywhere)
        ceiling = hash_rate(canonical, cores)
        if cores == 1:
            compiled = compiled_hash_rate(canonical)
            if compiled is not None:
                rows.append(
                    [
                        "SHA-256 leaf hashes of the same bytes, compiled (OpenSSL, no Python "
                        "call per hash), entries/s (one core)",
                        f"{compiled:,.0f}",
                        f"{ceiling:,.0f}",
                        f"{compiled / ceiling:.0%}",
                        "a second reference beside the ceiling (merkle.leaf_hash, one a time)",
                    ]
                )
                console.print(rows[-1])
            floor = merkle_floor(blocks)
            rows.append(
                [
                    "Merkle hashing alone (leaves and interior nodes), entries/s (one core)",
                    f"{floor:,.0f}",
                    f"{ceiling:,.0f}",
                    f"{floor / ceiling:.0%}",
                    "no parsing, no checks: what any verifier computes"
                    + (", compiled" if _speedups is not None else ""),
                ]
            )
            console.print(rows[-1])
        where = "one core" if cores == 1 else f"{cores} processes on {len(everywhere or [1])} cores"
        anchor = authority.public_key()
        verifiers: list[tuple[str, Any, Callable[..., Any]]] = [
            ("export file", export, verify_export_in_parallel),
            ("database", store, verify_database_in_parallel),
        ]
        for label, target, verifying in verifiers:
            started = time.perf_counter()
            summary = verifying(target, anchor, jobs=cores)
            seconds = time.perf_counter() - started
            assert summary.entries == entries
            rows.append(
                [
                    f"verify {entries:,} entries ({members} chains) from the {label}, "
                    f"entries/s ({where})",
                    f"{entries / seconds:,.0f}",
                    f"{ceiling:,.0f}",
                    f"{entries / seconds / ceiling:.0%}",
                    f"{seconds:.2f} s"
                    + (
                        f"; {entries / seconds / compiled:.0%} of the compiled hashes"
                        if cores == 1 and compiled is not None
                        else ""
                    ),
                ]
            )
            console.print(rows[-1])
    del canonical, blocks

    head = store.heads()["hosp-a"]
    size, root = head.tree_size, bytes.fromhex(head.header["tree_root"])
    rng = random.Random(1)
    seqs = [rng.randrange(size) for _ in range(2000)]
    proofs = [store.inclusion_proof("hosp-a", seq) for seq in seqs[:50]]
    make = timed(lambda: store.inclusion_proof("hosp-a", rng.randrange(size)), 2000)
    leaves = [
        merkle.leaf_hash(canonical_bytes(store.entry("hosp-a", p["leaf_index"]))) for p in proofs
    ]
    paths = [[bytes.fromhex(h) for h in p["audit_path"]] for p in proofs]
    counter = iter(range(10**9))

    def check() -> None:
        i = next(counter) % len(proofs)
        merkle.verify_inclusion(leaves[i], proofs[i]["leaf_index"], size, paths[i], root)

    verify = timed(check, 20000)
    hash_ceiling = timed(lambda: merkle.node_hash(root, root), 200000) * len(paths[0])
    rows.append(
        [
            f"inclusion proof made at {size:,} entries (store, with DB reads)",
            f"{make * 1e3:.3f} ms",
            "",
            "",
            f"{len(paths[0])} hashes",
        ]
    )
    rows.append(
        [
            f"inclusion proof checked at {size:,} entries",
            f"{verify * 1e6:.1f} µs",
            f"{hash_ceiling * 1e6:.1f} µs",
            f"{hash_ceiling / verify:.0%}",
            "ceiling: the same number of node hashes",
        ]
    )
    sizes = [b.row_tree_size for b in store.block_rows("hosp-a")]
    pairs = [(rng.choice(sizes[:-1]), size) for _ in range(200)]
    consistency = timed(lambda: store.consistency_proof("hosp-a", *rng.choice(pairs)), 500)
    rows.append(
        [f"consistency proof made at {size:,} entries", f"{consistency * 1e3:.3f} ms", "", "", ""]
    )
    for row in rows[-3:]:
        console.print(row)
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--entries", type=int, default=1_000_000, help="size of the ledger to verify and prove"
    )
    parser.add_argument(
        "--members", type=int, default=8, help="chains the ledger to verify is spread over"
    )
    parser.add_argument(
        "--jobs", type=int, default=available_cores(), help="worker processes for every core"
    )
    parser.add_argument(
        "--appends", type=int, default=24_000, help="appends per 8-writer measurement"
    )
    parser.add_argument("--skip-appends", action="store_true", help="only the large ledger")
    parser.add_argument(
        "--skip-verify",
        action="store_true",
        help="only the appends (no large ledger: no verification or proofs)",
    )
    parser.add_argument(
        "--writers",
        default="1,8,32",
        help="comma-separated counts of concurrent writer threads to measure appends with",
    )
    parser.add_argument(
        "--postgres",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="admin URL; 'none' to skip",
    )
    args = parser.parse_args()
    writers = tuple(int(count) for count in args.writers.split(","))
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory(prefix="hrx-bench-") as tmp:
        workdir = Path(tmp)
        if not args.skip_appends:
            bench_appends(
                "SQLite",
                f"sqlite:///{workdir / 'appends.db'}",
                workdir / "sqlite",
                args.appends,
                rows,
                writers,
            )
        if args.postgres != "none" and not args.skip_appends:
            admin = psycopg.connect(args.postgres, autocommit=True)
            name = f"hrx_bench_{uuid.uuid4().hex[:8]}"
            admin.execute(f'CREATE DATABASE "{name}"')
            try:
                bench_appends(
                    "PostgreSQL",
                    args.postgres.rsplit("/", 1)[0] + "/" + name,
                    workdir / "pg",
                    args.appends,
                    rows,
                    writers,
                )
            finally:
                admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        if not args.skip_verify:
            bench_large(args.entries, args.members, args.jobs, workdir, rows)
    table = Table(
        "figure", "measured", "ceiling", "of ceiling", "notes", title="hrx ledger benchmark"
    )
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(
        f"BLS backend: {bls.BACKEND}; Python {sys.version.split()[0]}; {os.cpu_count()} cores; "
        "one-core figures pinned to one core; load average before the run "
        f"{LOAD_BEFORE}, after {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
