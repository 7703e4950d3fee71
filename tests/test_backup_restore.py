"""Back up a running member's SQLite database, let its chain grow, restore the backup and
recover (docs/operations.md): ``hrx node recover`` takes the member's own newer blocks back
from the other member, the auditor verifies the restored database, and the member appends
again without forking its own chain."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from ledger.store import ChainStore
from node.harness import Consortium
from tests.nodes import append_requests, invoke


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Consortium]:
    consortium = Consortium(tmp_path_factory.mktemp("restore"), 2, quorum=2, epoch_seconds=2)
    try:
        consortium.start_all()
        yield consortium
    finally:
        consortium.close()


def height(group: Consortium, member: str, chain: str) -> int:
    store = ChainStore(group.database_url(member))
    try:
        return int(store.heads()[chain].header["height"])
    finally:
        store.close()


def test_a_restored_member_recovers_its_own_chain(group: Consortium, tmp_path: Path) -> None:
    a = group.members["hosp-a"]
    database = a.directory / "hrx.db"
    append_requests(a.directory, "r-1", "r-2")
    group.wait_converged(20)
    backup = tmp_path / "hosp-a-backup.db"
    with sqlite3.connect(database) as source, sqlite3.connect(backup) as target:
        source.backup(target)  # what `sqlite3 hrx.db ".backup FILE"` does, the node running
    backed_up = height(group, "hosp-a", "hosp-a")
    for number in range(3):
        append_requests(a.directory, f"after-backup-{number}")
    group.wait_converged(20)
    newest = height(group, "hosp-b", "hosp-a")
    assert newest >= backed_up + 3

    group.stop("hosp-a")
    for suffix in ("", "-wal", "-shm"):
        Path(f"{database}{suffix}").unlink(missing_ok=True)
    database.write_bytes(backup.read_bytes())
    assert height(group, "hosp-a", "hosp-a") == backed_up
    # the restored database is a valid ledger by itself
    verdict = invoke("audit", "verify", str(database), "--authority", str(group.authority_key))
    assert verdict.exit_code == 0, verdict.output

    recovered = invoke("node", "recover", "--dir", str(a.directory))
    assert recovered.exit_code == 0, recovered.output
    assert f"own chain at height {backed_up} before, {newest} now" in recovered.output
    assert height(group, "hosp-a", "hosp-a") == newest
    again = invoke("node", "recover", "--dir", str(a.directory))
    assert again.exit_code == 0 and "0 entries taken back" in again.output

    group.start("hosp-a")
    append_requests(a.directory, "after-restore")
    group.wait_converged(20)
    assert height(group, "hosp-b", "hosp-a") == newest + 1
    store = ChainStore(group.database_url("hosp-b"))
    try:
        assert store.frozen_chains() == set()  # no fork: nothing signed twice
    finally:
        store.close()
    verdict = invoke("audit", "verify", group.database_url("hosp-b"))
    assert verdict.exit_code == 0 and "FORK" not in verdict.output, verdict.output


def test_recovering_with_no_member_reachable_says_so(tmp_path: Path) -> None:
    consortium = Consortium(tmp_path, 2, quorum=2)
    try:
        answer = invoke("node", "recover", "--dir", str(consortium.members["hosp-a"].directory))
        assert answer.exit_code == 1
        assert "hosp-b" in answer.output and "could not be asked" in answer.output
    finally:
        consortium.close()
