"""What each member of a consortium costs a witness, and what each checkpoint costs a member:
the unit costs docs/scale.md projects a province from, each beside its ceiling in the same run.

    python3 scripts/bench_witness.py [--sizes 30,200,1200] [--notices 500] [--entries 20000]

- **a heartbeat** (an idle ordinary member's signed head, ``POST /peer/heads``) at a real witness
  (web server and replication worker as processes): CPU of the witness's processes per notice,
  when the head is the one it holds (the steady state); ceiling: a signed ``GET /ledger/roster``
  of the same member, CPU per request;
- **comparing heads** with another witness, per chain: the heads document of N chains (bytes),
  parsing it and finding every head equal to the one held; ceiling: parsing alone;
- **a certificate** of N chain heads, 3 signers (bytes), as a member takes it in: parse and
  verify; ceiling: the BLS aggregate verification alone;
- **an entry stored**: bytes per entry of a chain of ``--entries`` access.decided entries in
  blocks of 10, on SQLite (file size) and PostgreSQL (the ledger tables' total size);
- **joining**: a new ordinary member started beside 3 witnesses that hold ``--join-entries``
  entries (and none): seconds until it holds the newest certificate; ceiling: until its web
  server answers (the process start).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ledger import bls, keys  # noqa: E402
from ledger.canonical import canonical_bytes, parse_json  # noqa: E402
from ledger.checkpoint import make_certificate, sign, verify_certificate  # noqa: E402
from ledger.model import block_hash, format_time  # noqa: E402
from ledger.roster import make_member, make_roster, open_roster, sign_roster  # noqa: E402
from ledger.store import ChainStore, ChainWriter  # noqa: E402
from node.base.config import load_config  # noqa: E402
from node.consortium.peers import SignedPeers  # noqa: E402
from node.demo.harness import Consortium  # noqa: E402
from tests.helpers.databases import postgres_database  # noqa: E402

console = Console(highlight=False)
TICKS = os.sysconf("SC_CLK_TCK")
DECIDED = {
    "request_id": "0f8e2a6c-1b1f-4a59-b7a2-6a6b4a7e5d11",
    "requester_org": "hosp-b",
    "patient": "ab" * 32,
    "purpose": "TREAT",
    "categories": ["laboratory"],
    "decided_at": "2026-12-06T08:00:00.000Z",
    "reason_stated": False,
    "decision": "permit",
    "reason": "consent c1 (hosp-a seq 12) permits it",
    "consent": {"chain": "hosp-a", "seq": 12},
    "view": {"hosp-a": 40, "hosp-b": 17, "hosp-c": 9},
    "stale": [],
    "released": ["9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"] * 3,
}


ENTRY = {
    "v": 1,
    "chain": "hosp-a",
    "seq": 123456,
    "time": "2026-12-06T08:00:00.000Z",
    "type": "access.decided",
    "body": DECIDED,
}


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / TICKS


def heartbeat_cost(notices: int) -> dict[str, float]:
    """CPU of a witness's processes per notice of an unchanged head, and per signed read."""
    with tempfile.TemporaryDirectory(prefix="hrx-bench-witness-") as tmp:
        group = Consortium(Path(tmp), 2, quorum=1, witnesses=["hosp-a"])
        try:
            group.start_all()
            witness = group.members["hosp-a"]
            config = load_config(group.members["hosp-b"].directory)
            store = ChainStore(config.database_url)
            with ChainWriter(store, "hosp-b", keys.load_private_key(config.ed25519_key)) as w:
                w.append("access.requested", {"request_id": "bench-0", "patient": "cd" * 32})
            deadline = time.monotonic() + 20
            while group.heads("hosp-a").get("hosp-b") != group.heads("hosp-b").get("hosp-b"):
                if time.monotonic() > deadline:
                    raise RuntimeError("the witness never took hosp-b's chain")
                time.sleep(0.1)
            peers = SignedPeers(store, "hosp-b", keys.load_private_key(config.ed25519_key))
            notice = {"chain": "hosp-b", "head": store.head("hosp-b").to_json()}  # type: ignore[union-attr]
            pids = [p.pid for p in (witness.web, witness.replicator) if p is not None]
            time.sleep(2)
            figures = {}
            for label, send in (
                ("notice", lambda: peers.post("hosp-a", "/peer/heads", notice)),
                ("read", lambda: peers.get("hosp-a", "/ledger/roster")),
            ):
                idle_start = cpu_seconds(pids)
                time.sleep(3)
                idle_rate = (cpu_seconds(pids) - idle_start) / 3
                started, before = time.monotonic(), cpu_seconds(pids)
                for _ in range(notices):
                    send()
                time.sleep(1)  # the worker takes the last notices in
                wall = time.monotonic() - started
                used = cpu_seconds(pids) - before - idle_rate * wall
                figures[label] = used / notices * 1000
            store.close()
            return figures
        finally:
            group.close()


def signed_heads(size: int) -> tuple[dict[str, Any], dict[str, str]]:
    """A heads document of ``size`` chains, each head signed by its member's key, and the
    hashes a witness holding the same heads has."""
    document, held = {}, {}
    for n in range(size):
        chain = f"hosp-{n:04d}"
        key = Ed25519PrivateKey.generate()
        header = {
            "v": 1,
            "chain": chain,
            "height": 1000 + n,
            "prev": "ab" * 32,
            "time": format_time(),
            "first_seq": 5000 + n,
            "count": 3,
            "tree_size": 5003 + n,
            "tree_root": "cd" * 32,
            "roster": 7,
        }
        digest = block_hash(header)
        document[chain] = {
            "header": header,
            "signature": keys.sign(key, keys.BLOCK_DOMAIN, digest),
        }
        held[chain] = digest.hex()
    return document, held


def comparison_cost(size: int) -> dict[str, float]:
    document, held = signed_heads(size)
    data = canonical_bytes(document)

    def compare() -> int:
        parsed = parse_json(data)
        return sum(block_hash(h["header"]).hex() == held[c] for c, h in parsed.items())

    repeat = max(3, 3000 // size)
    started = time.perf_counter()
    for _ in range(repeat):
        assert compare() == size
    full = (time.perf_counter() - started) / repeat
    started = time.perf_counter()
    for _ in range(repeat):
        parse_json(data)
    parse = (time.perf_counter() - started) / repeat
    return {"bytes": len(data), "ms": full * 1000, "ceiling_ms": parse * 1000}


def certificate_cost(size: int) -> dict[str, float]:
    secrets = [bls.generate_secret_key(bytes([n + 1]) * 32) for n in range(3)]
    members = [
        make_member(f"hosp-{n:04d}", "x", "https://x", Ed25519PrivateKey.generate(), secret)
        for n, secret in enumerate(secrets)
    ]
    authority = Ed25519PrivateKey.generate()
    body = make_roster("bench", members, quorum=3)
    roster = open_roster(body, sign_roster(body, authority), authority.public_key())
    document, _ = signed_heads(size)
    checkpoint = {
        "v": 1,
        "epoch": 1_000_000,
        "time": format_time(),
        "roster": 1,
        "heads": {
            chain: {
                "height": h["header"]["height"],
                "hash": block_hash(h["header"]).hex(),
                "tree_size": h["header"]["tree_size"],
                "tree_root": h["header"]["tree_root"],
            }
            for chain, h in document.items()
        },
    }
    certificate = make_certificate(
        checkpoint, {m["id"]: sign(checkpoint, s) for m, s in zip(members, secrets, strict=True)}
    )
    data = canonical_bytes(certificate)
    rosters = {1: roster}
    repeat = max(3, 1000 // size)
    started = time.perf_counter()
    for _ in range(repeat):
        verify_certificate(parse_json(data), rosters)
    full = (time.perf_counter() - started) / repeat
    public = [bytes.fromhex(m["bls"]) for m in members]
    from ledger.checkpoint import message

    signed, aggregate = message(checkpoint), bytes.fromhex(certificate["signature"])
    started = time.perf_counter()
    for _ in range(repeat):
        assert bls.fast_aggregate_verify(public, signed, aggregate)
    ceiling = (time.perf_counter() - started) / repeat
    return {"bytes": len(data), "ms": full * 1000, "ceiling_ms": ceiling * 1000}


def storage_cost(url: str, directory: Path, entries: int) -> float:
    key_path = directory / "hosp-a.pem"
    key = keys.load_or_create_private_key(key_path)
    authority = Ed25519PrivateKey.generate()
    member = make_member("hosp-a", "A", "https://a", key, bls.generate_secret_key(b"s" * 32))
    body = make_roster("bench", [member], quorum=1)
    store = ChainStore(url)
    store.initialise(body, sign_roster(body, authority), chain="hosp-a", key_path=key_path)
    with ChainWriter(store, "hosp-a", key) as writer:
        for _ in range(0, entries, 10):
            writer.append_many([("access.decided", DECIDED)] * 10)
    if url.startswith("sqlite"):
        with store.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        size = sum(f.stat().st_size for f in directory.glob("ledger.db*"))
    else:
        with store.engine.connect() as conn:
            size = int(
                conn.execute(
                    sa.text(
                        "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c "
                        "WHERE c.relkind = 'r' AND c.relname LIKE 'ledger_%'"
                    )
                ).scalar()
                or 0
            )
    store.close()
    return size / entries


def join_cost(entries: int) -> dict[str, float]:
    """Seconds from starting an ordinary member until its web server answers, and until it
    holds the witnesses' newest certificate, with ``entries`` entries in the consortium."""
    with tempfile.TemporaryDirectory(prefix="hrx-bench-join-") as tmp:
        group = Consortium(
            Path(tmp),
            4,
            quorum=2,
            epoch_seconds=1,
            witnesses=["hosp-a", "hosp-b", "hosp-c"],
        )
        try:
            for name in ("hosp-a", "hosp-b", "hosp-c"):
                group.start(name)
            config = load_config(group.members["hosp-a"].directory)
            store = ChainStore(config.database_url)
            with ChainWriter(store, "hosp-a", keys.load_private_key(config.ed25519_key)) as w:
                for start in range(0, max(entries, 1), 1000):
                    count = min(1000, max(entries, 1) - start)
                    w.append_many([("access.requested", {"request_id": f"j-{start}"})] * count)
            head = store.head("hosp-a")
            store.close()
            deadline = time.monotonic() + 600
            while True:  # every witness holds it, and a certificate names it
                stores = [ChainStore(group.database_url(n)) for n in ("hosp-b", "hosp-c")]
                done = all(
                    (c := s.certificate()) is not None
                    and c["checkpoint"]["heads"].get("hosp-a", {}).get("hash") == head.hash  # type: ignore[union-attr]
                    for s in stores
                )
                for s in stores:
                    s.close()
                if done:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("the witnesses never certified hosp-a's chain")
                time.sleep(0.2)
            started = time.monotonic()
            group.start("hosp-d")
            serving = time.monotonic() - started
            joined = ChainStore(group.database_url("hosp-d"))
            while joined.certificate_epoch() is None:
                if time.monotonic() - started > 120:
                    raise RuntimeError("hosp-d never took a certificate")
                time.sleep(0.05)
            held = time.monotonic() - started
            chains = sorted(joined.heads())
            joined.close()
            return {"serving": serving, "certificate": held, "chains": len(chains)}
        finally:
            group.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="30,200,1200")
    parser.add_argument("--notices", type=int, default=500)
    parser.add_argument("--entries", type=int, default=20000)
    parser.add_argument("--join-entries", type=int, default=100000)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    table = Table(title="what a witness pays per member, and a member per checkpoint")
    for column in ("figure", "value", "ceiling (same run)"):
        table.add_column(column)
    beat = heartbeat_cost(args.notices)
    table.add_row(
        "CPU per heartbeat at a witness (ms)",
        f"{beat['notice']:.2f}",
        f"signed GET /ledger/roster: {beat['read']:.2f}",
    )
    for size in sizes:
        compared = comparison_cost(size)
        table.add_row(
            f"heads of {size:,} chains: bytes; parse and compare (ms)",
            f"{compared['bytes']:,}; {compared['ms']:.1f}",
            f"parse only: {compared['ceiling_ms']:.1f}",
        )
    for size in sizes:
        cert = certificate_cost(size)
        table.add_row(
            f"certificate of {size:,} chains: bytes; parse and verify (ms)",
            f"{cert['bytes']:,}; {cert['ms']:.1f}",
            f"aggregate verify only: {cert['ceiling_ms']:.1f}",
        )
    with tempfile.TemporaryDirectory(prefix="hrx-bench-storage-") as tmp:
        sqlite = storage_cost(f"sqlite:///{tmp}/ledger.db", Path(tmp), args.entries)
    with postgres_database() as url, tempfile.TemporaryDirectory() as tmp:
        postgres = storage_cost(url, Path(tmp), args.entries)
    table.add_row(
        f"bytes per entry stored ({args.entries:,} access.decided, blocks of 10)",
        f"SQLite {sqlite:,.0f}; PostgreSQL {postgres:,.0f}",
        f"its canonical bytes alone: {len(canonical_bytes(ENTRY))}",
    )
    for entries in (0, args.join_entries):
        joined = join_cost(entries)
        table.add_row(
            f"a new ordinary member beside {entries:,} entries: s until it holds the newest "
            "certificate (chains it holds)",
            f"{joined['certificate']:.2f} ({joined['chains']:.0f})",
            f"its web server answering: {joined['serving']:.2f}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
