"""Back up a running member's SQLite database, let its chain grow, restore the backup and
recover (docs/operations.md): ``hrx node recover`` takes the member's own newer blocks back
from the other member, the auditor verifies the restored database, and the member appends
again without forking its own chain."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from consent.pseudonym import RESIDENT_ID_SYSTEM
from ledger.errors import SigningHeld
from ledger.store import ChainStore
from node.base.config import load_config
from node.consortium.worker import confirm_own_head
from node.demo.harness import Consortium
from tests.helpers.nodes import Node, append_requests, invoke, post


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


def test_a_restored_member_that_skips_recover_signs_nothing(
    group: Consortium, tmp_path: Path
) -> None:
    """Restored, and started without ``hrx node recover``: the node holds its signing — no
    block at a height it already signed, no fork anywhere — and ``/healthz`` says what to do,
    until it recovers."""
    a = group.members["hosp-a"]
    database = a.directory / "hrx.db"
    backup = tmp_path / "hosp-a-backup.db"
    with sqlite3.connect(database) as source, sqlite3.connect(backup) as target:
        source.backup(target)
    backed_up = height(group, "hosp-a", "hosp-a")
    append_requests(a.directory, "after-backup")
    group.wait_converged(20)
    group.stop("hosp-a")
    for suffix in ("", "-wal", "-shm"):
        Path(f"{database}{suffix}").unlink(missing_ok=True)
    database.write_bytes(backup.read_bytes())

    # the first block a process would sign waits for the members, who show the chain longer
    config = load_config(a.directory)
    store = ChainStore(config.database_url)
    try:
        with pytest.raises(SigningHeld, match="hrx node recover"):
            confirm_own_head(config, store, store)
        assert store.signing_hold() is not None
        store.release_signing()  # and the replication worker finds it too, on its own
    finally:
        store.close()
    group.start("hosp-a")
    node = Node(a.directory, a.web_port)
    deadline = time.monotonic() + 30
    while (health := requests.get(f"{node.base}/healthz")).status_code == 200:
        assert time.monotonic() < deadline, health.text
        time.sleep(0.2)
    assert health.status_code == 503 and "hrx node recover" in health.json()["signing"]
    doctor = node.session(node.token("dr-restore", "doctor"))
    patient = post(
        doctor,
        f"{node.fhir}/Patient",
        {
            "resourceType": "Patient",
            "identifier": [{"system": RESIDENT_ID_SYSTEM, "value": "330106198001010011"}],
        },
    ).json()["id"]
    refused = doctor.get(f"{node.fhir}/Patient/{patient}/$prior-results")
    assert refused.status_code == 409 and "hrx node recover" in refused.text, refused.text
    assert height(group, "hosp-a", "hosp-a") == backed_up  # nothing signed
    status = invoke("node", "status", "--dir", str(a.directory))
    assert "held" in status.output and "hrx node recover" in status.output, status.output

    group.stop("hosp-a")
    assert invoke("node", "recover", "--dir", str(a.directory)).exit_code == 0
    group.start("hosp-a")
    assert requests.get(f"{node.base}/healthz").status_code == 200
    answer = doctor.get(f"{node.fhir}/Patient/{patient}/$prior-results")
    assert answer.status_code == 200, answer.text
    group.wait_converged(20)
    for member in ("hosp-a", "hosp-b"):
        other = ChainStore(group.database_url(member))
        try:
            assert other.frozen_chains() == set()  # no fork: nothing signed twice
        finally:
            other.close()
