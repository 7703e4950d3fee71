"""Benchmark a consortium of real node processes on this machine.

- catch-up: a member pulls, verifies and stores N entries (default 100,000) of another
  member's chain over signed HTTP, beside the ceiling of only downloading the same blocks;
- replication lag: under steady appends to one member (default 200/s), how long until each
  entry is stored by another member (p50, p95), beside the replication interval;
- convergence after healing: a member cut off (default 60 s) while appending, time until
  every member holds the same heads again;
- checkpoints: sign one checkpoint, aggregate 5 signatures, verify a certificate, with each
  BLS backend (py_ecc, the reference; milagro, the fast one).

    python3 scripts/bench_consortium.py [--entries 100000] [--rate 200] [--seconds 10]
        [--cut-seconds 60]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console

from ledger import keys
from ledger.store import ChainStore, ChainWriter
from node.base.config import load_config
from node.demo.harness import Consortium

console = Console()
ROOT = Path(__file__).resolve().parent.parent

CHECKPOINT_SCRIPT = r"""
import sys, time, json
from ledger import bls
from ledger.checkpoint import make_certificate, sign, verify_certificate
from ledger.roster import make_member, make_roster, open_roster
from ledger import keys
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

secrets = [bls.generate_secret_key(bytes([n]) * 32) for n in range(5)]
members = [make_member(f"hosp-{n}", "x", "http://x", Ed25519PrivateKey.generate(), s)
           for n, s in enumerate(secrets)]
roster = open_roster(
    make_roster("bench", members, quorum=4), "A" * 86, None, check_possession=False
)
heads = {f"hosp-{n}": {"height": 10, "hash": "ab" * 32, "tree_size": 1000, "tree_root": "cd" * 32}
         for n in range(5)}
checkpoint = {"v": 1, "epoch": 7, "time": "2026-11-25T00:00:00.000Z", "roster": 1, "heads": heads}
def best(f, n):
    times = []
    for _ in range(n):
        t = time.perf_counter(); f(); times.append(time.perf_counter() - t)
    return min(times) * 1000
sign_ms = best(lambda: sign(checkpoint, secrets[0]), 3)
signatures = {f"hosp-{n}": sign(checkpoint, s) for n, s in enumerate(secrets)}
aggregate_ms = best(lambda: make_certificate(checkpoint, signatures), 3)
certificate = make_certificate(checkpoint, signatures)
verify_ms = best(lambda: verify_certificate(certificate, {1: roster}), 3)
print(json.dumps({"backend": bls.BACKEND,
                  "sign": sign_ms, "aggregate": aggregate_ms, "verify": verify_ms}))
"""


def checkpoint_times() -> None:
    console.print("\n[bold]checkpoints[/] (5 members; best of 3; ms)")
    console.print(f"{'backend':10} {'sign':>10} {'aggregate 5':>12} {'verify cert':>12}")
    import json

    for backend in ("py_ecc", "milagro"):
        env = {**os.environ, "HRX_BLS_BACKEND": backend}
        result = subprocess.run(
            [sys.executable, "-c", CHECKPOINT_SCRIPT],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            console.print(f"{backend:10} unavailable: {result.stderr.strip().splitlines()[-1]}")
            continue
        figures = json.loads(result.stdout)
        console.print(
            f"{backend:10} {figures['sign']:10.2f} {figures['aggregate']:12.2f} "
            f"{figures['verify']:12.2f}"
        )


def append_entries(
    group: Consortium, name: str, count: int, batch: int = 1000, pause: float = 0.0
) -> None:
    config = load_config(group.members[name].directory)
    store = ChainStore(config.database_url)
    with ChainWriter(store, name, keys.load_private_key(config.ed25519_key)) as writer:
        for start in range(0, count, batch):
            writer.append_many(
                [
                    ("access.requested", {"request_id": f"r-{n}", "patient": "ab" * 32})
                    for n in range(start, min(count, start + batch))
                ]
            )
            time.sleep(pause)
    store.close()


def catch_up(entries: int) -> None:
    from node.consortium.peers import SignedPeers
    from node.consortium.worker import replicator_for

    with tempfile.TemporaryDirectory(prefix="hrx-bench-") as scratch:
        group = Consortium(Path(scratch), 2, quorum=2, epoch_seconds=3600)
        try:
            started = time.perf_counter()
            append_entries(group, "hosp-a", entries)
            console.print(
                f"appended {entries:,} entries to hosp-a in {time.perf_counter() - started:.1f} s"
            )
            group.start("hosp-a")
            config = load_config(group.members["hosp-b"].directory)
            store = ChainStore(load_config(group.members["hosp-b"].directory).database_url)
            replicator = replicator_for(config, store)
            peers = replicator.peers
            assert isinstance(peers, SignedPeers)
            # the ceiling: only downloading the same blocks, signed requests included
            started = time.perf_counter()
            height, downloaded = 0, 0
            while True:
                blocks = peers.blocks("hosp-a", "hosp-a", height, 200)
                if not blocks:
                    break
                downloaded += sum(len(b["entries"]) for b in blocks)
                height += len(blocks)
            download = time.perf_counter() - started
            started = time.perf_counter()
            report = replicator.run_round(["hosp-a"])
            full = time.perf_counter() - started
            assert report.pulled.get("hosp-a") == entries, report
            store.close()
            console.print("\n[bold]catch-up[/] (pull, verify every block, store)")
            console.print(
                f"  {entries:,} entries in {full:.2f} s = {entries / full:,.0f} entries/s; "
                f"download only: {downloaded / download:,.0f} entries/s "
                f"({entries / full / (downloaded / download):.0%} of it)"
            )
        finally:
            group.close()


def lag_and_healing(rate: int, seconds: int, cut_seconds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="hrx-bench-") as scratch:
        group = Consortium(Path(scratch), 3, epoch_seconds=2, replicate_interval=0.5)
        try:
            group.start_all()
            config = load_config(group.members["hosp-a"].directory)
            store = ChainStore(config.database_url)
            observer = ChainStore(group.database_url("hosp-b"))
            appended_at: list[float] = []
            seen_at: dict[int, float] = {}
            stop = threading.Event()

            def watch() -> None:
                while not stop.is_set():
                    head = observer.heads().get("hosp-a")
                    size = head.tree_size if head else 0
                    now = time.perf_counter()
                    for seq in range(len(seen_at), min(size, len(appended_at))):
                        seen_at[seq] = now
                    time.sleep(0.005)

            with ChainWriter(store, "hosp-a", keys.load_private_key(config.ed25519_key)) as w:
                # warm up: every worker running, the first entry replicated
                appended_at.append(time.perf_counter())
                w.append("access.requested", {"request_id": "warm-up", "patient": "ab" * 32})
                while "hosp-a" not in observer.heads():
                    time.sleep(0.01)
                watcher = threading.Thread(target=watch, daemon=True)
                watcher.start()
                end = time.perf_counter() + seconds
                while time.perf_counter() < end:
                    appended_at.append(time.perf_counter())
                    w.append("access.requested", {"request_id": "x", "patient": "ab" * 32})
                    time.sleep(max(0.0, 1 / rate - 0.0002))
            time.sleep(3)
            stop.set()
            watcher.join()
            lags = sorted(seen_at[s] - appended_at[s] for s in seen_at if s > 0)
            console.print(
                f"\n[bold]replication lag[/] hosp-a -> hosp-b, {len(appended_at):,} appends at "
                f"~{rate}/s for {seconds} s (replication interval "
                f"{group.replicate_interval} s, notices on)"
            )
            console.print(
                f"  p50 {statistics.median(lags) * 1000:.0f} ms, "
                f"p95 {lags[int(len(lags) * 0.95)] * 1000:.0f} ms, max {lags[-1] * 1000:.0f} ms; "
                f"{len(lags)} of {len(appended_at) - 1} seen (the warm-up entry left out)"
            )
            store.close()
            observer.close()
            # a member cut off under load (appending to its own chain), then healed
            group.cut("hosp-c")
            loader = threading.Thread(
                target=append_entries, args=(group, "hosp-c", 200 * cut_seconds, 10, 0.05)
            )
            loader.start()
            time.sleep(cut_seconds)
            group.heal("hosp-c")
            healed = time.perf_counter()
            loader.join()
            waited = group.wait_converged(60)
            console.print(
                f"\n[bold]healing[/]: hosp-c cut off {cut_seconds} s while appending; every member "
                f"holds the same heads {waited:.2f} s after healing (appends ended "
                f"{time.perf_counter() - healed - waited:+.2f} s from then)"
            )
        finally:
            group.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--rate", type=int, default=200)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--cut-seconds", type=int, default=60)
    args = parser.parse_args()
    catch_up(args.entries)
    lag_and_healing(args.rate, args.seconds, args.cut_seconds)
    checkpoint_times()


if __name__ == "__main__":
    main()
