"""Several processes append to one chain at once, and some are killed with SIGKILL mid-way:
the chain stays linear, every acknowledged entry is present exactly once, and it verifies."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ledger.verify import verify_database
from tests.helpers import ROOT
from tests.helpers.ledgers import Ledger


def _start(
    ledger: Ledger, worker: int, count: int, acks: Path, threads: int = 1
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.ledger.append_worker",
            ledger.url,
            str(ledger.key_path),
            str(worker),
            str(count),
            str(acks),
            str(threads),
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
    )


def _acknowledged(acks: Path) -> dict[int, int]:
    """``{n: seq}`` of every whole acknowledgement line (a killed worker may leave half a line)."""
    found = {}
    if acks.exists():
        for line in acks.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:
                found[int(parts[0])] = int(parts[1])
    return found


def _chain_entries(ledger: Ledger) -> dict[tuple[int, int], int]:
    """``{(worker, n): seq}`` of the whole chain, failing on any duplicate."""
    seen: dict[tuple[int, int], int] = {}
    for block in ledger.store.block_rows("hosp-a"):
        for seq, data in zip(block.entry_seqs, block.entry_data, strict=True):
            import json

            body = json.loads(data)["body"]
            key = (body["worker"], body["n"])
            assert key not in seen, f"entry {key} appended twice (seq {seen[key]} and {seq})"
            seen[key] = seq
    return seen


def test_eight_processes_append_one_linear_chain(ledger_db: Ledger, tmp_path: Path) -> None:
    count = 60
    workers = [_start(ledger_db, w, count, tmp_path / f"acks-{w}", threads=2) for w in range(8)]
    for process in workers:
        _, stderr = process.communicate(timeout=240)
        assert process.returncode == 0, stderr.decode()
    summary = verify_database(ledger_db.store, ledger_db.authority.public_key())
    entries = _chain_entries(ledger_db)
    assert summary.entries == len(entries) == 8 * count
    for w in range(8):
        acked = _acknowledged(tmp_path / f"acks-{w}")
        assert len(acked) == count
        for n, seq in acked.items():
            assert entries[(w, n)] == seq


@pytest.mark.slow
def test_killed_appenders_lose_no_acknowledged_entry(ledger_db: Ledger, tmp_path: Path) -> None:
    rng = random.Random(20261124)
    rounds = 8
    for round_ in range(rounds):
        workers = {
            w: _start(
                ledger_db, round_ * 10 + w, 100_000, tmp_path / f"acks-{round_}-{w}", threads=4
            )
            for w in range(3)
        }
        # killed once each has appended (its imports can take seconds on a busy machine)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(
            _acknowledged(tmp_path / f"acks-{round_}-{w}") for w in workers
        ):
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.5))
        for process in workers.values():
            time.sleep(rng.uniform(0, 0.05))
            os.kill(process.pid, signal.SIGKILL)
        for process in workers.values():
            process.wait(timeout=30)
            assert process.returncode == -signal.SIGKILL
    entries = _chain_entries(ledger_db)
    acknowledged = 0
    for round_ in range(rounds):
        for w in range(3):
            for n, seq in _acknowledged(tmp_path / f"acks-{round_}-{w}").items():
                assert entries.get((round_ * 10 + w, n)) == seq, (
                    f"acknowledged entry lost: {(round_, w, n)}"
                )
                acknowledged += 1
    assert acknowledged > rounds * 10, "the workers were killed before they appended anything"
    summary = verify_database(ledger_db.store, ledger_db.authority.public_key())
    assert summary.entries == len(entries)
