"""The authority's way back from a fork of a member's own making (ledger.resolution): members
that hold the kept block follow the chain again, one that holds the other block keeps it
frozen, the member recovers the kept branch, and the auditor reports the fork as resolved."""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledger import keys
from ledger.resolution import make_resolution, open_resolution, sign_resolution
from ledger.store import ChainStore, ChainWriter
from node.base.config import load_config
from node.demo.harness import Consortium
from tests.helpers.ledgers import make_ledger
from tests.helpers.nodes import append_requests, invoke


def test_a_resolution_unfreezes_only_a_member_that_holds_the_kept_block(tmp_path: Path) -> None:
    ledger = make_ledger(f"sqlite:///{tmp_path / 'one.db'}", tmp_path)
    with ChainWriter(ledger.store, "hosp-a", ledger.key) as writer:
        writer.append("consent.revoked", {"consent_id": "c-0", "patient": "ab" * 32})
    ledger.store.close()
    shutil.copy(tmp_path / "one.db", tmp_path / "two.db")
    stores = {}
    for name in ("one", "two"):  # the same key signs another block 1 in each copy
        store = ChainStore(f"sqlite:///{tmp_path / name}.db")
        with ChainWriter(store, "hosp-a", ledger.key) as writer:
            writer.append("consent.revoked", {"consent_id": f"c-{name}", "patient": "ab" * 32})
        stores[name] = store
    one, two = (stores[n].block_at("hosp-a", 1) for n in ("one", "two"))
    assert one is not None and two is not None and one.hash != two.hash
    evidence = {
        "chain": "hosp-a",
        "height": 1,
        "headers": [
            {"header": one.header, "signature": one.signature},
            {"header": two.header, "signature": two.signature},
        ],
        "source": "test",
    }
    store = stores["one"]
    store.add_evidence(evidence)
    assert store.frozen_chains() == {"hosp-a"}
    other = sign_resolution(make_resolution("hosp-a", 1, two.hash), ledger.authority)
    store.add_resolution(other)
    assert store.frozen_chains() == {"hosp-a"}  # it holds the block not kept
    kept = sign_resolution(make_resolution("hosp-a", 1, one.hash), ledger.authority)
    store.add_resolution(kept)  # the authority changed its mind: the newest for that height
    assert store.frozen_chains() == set()
    with pytest.raises(Exception, match="does not verify"):
        open_resolution(kept, Ed25519PrivateKey.generate().public_key())
    for s in stores.values():
        s.close()


def test_a_member_forked_by_a_restore_is_taken_back(tmp_path: Path) -> None:
    group = Consortium(tmp_path, 3, quorum=2, epoch_seconds=2)
    try:
        group.start_all()
        a = group.members["hosp-a"]
        database = a.directory / "hrx.db"
        append_requests(a.directory, "before")
        group.wait_converged(30)
        backup = tmp_path / "backup.db"
        with sqlite3.connect(database) as source, sqlite3.connect(backup) as target:
            source.backup(target)
        append_requests(a.directory, "kept")
        group.wait_converged(30)
        fork_height = int(
            ChainStore(group.database_url("hosp-b")).heads()["hosp-a"].header["height"]
        )
        kept = ChainStore(group.database_url("hosp-b")).block_at("hosp-a", fork_height)
        assert kept is not None

        def restore() -> None:
            group.stop("hosp-a")
            for suffix in ("", "-wal", "-shm"):
                Path(f"{database}{suffix}").unlink(missing_ok=True)
            shutil.copy(backup, database)

        # restored, and a block signed from the old head by hand (the node itself would hold
        # its signing: tests/node/ops/test_backup_restore.py): a fork of its own making
        restore()
        config = load_config(a.directory)
        store = ChainStore(config.database_url)
        with ChainWriter(store, "hosp-a", keys.load_private_key(config.ed25519_key)) as writer:
            writer.append("access.requested", {"request_id": "forked-1", "patient": "ab" * 32})
        store.close()
        group.start("hosp-a")
        deadline = time.monotonic() + 60
        while not all(
            "hosp-a" in ChainStore(group.database_url(m)).frozen_chains()
            for m in ("hosp-b", "hosp-c")
        ):
            assert time.monotonic() < deadline, "the fork was not found"
            time.sleep(0.5)
        status = invoke("node", "status", "--dir", str(group.members["hosp-b"].directory))
        assert status.exit_code == 1 and "fork" in status.output

        # the authority keeps the branch the members hold; they install the resolution
        resolution = tmp_path / "resolution.json"
        signed = invoke(
            "consortium", "resolve-fork", "--authority-key", str(group.authority_key),
            "--chain", "hosp-a", "--height", str(fork_height), "--keep", kept.hash,
            "--out", str(resolution),
        )  # fmt: skip
        assert signed.exit_code == 0, signed.output
        for member in ("hosp-b", "hosp-c"):
            directory = group.members[member].directory
            installed = invoke("node", "resolve-fork", "--dir", str(directory), str(resolution))
            assert installed.exit_code == 0 and "follows the chain again" in installed.output
            assert ChainStore(group.database_url(member)).frozen_chains() == set()
        # the member: the backup again, then recover takes the kept branch back
        restore()
        recovered = invoke("node", "recover", "--dir", str(a.directory))
        assert recovered.exit_code == 0, recovered.output
        assert (
            invoke("node", "resolve-fork", "--dir", str(a.directory), str(resolution)).exit_code
            == 0
        )
        group.start("hosp-a")
        append_requests(a.directory, "after")
        group.wait_converged(30)
        for member in ("hosp-b", "hosp-c"):
            head = ChainStore(group.database_url(member)).heads()["hosp-a"]
            assert head.header["height"] == fork_height + 1

        # the auditor: the fork is proven, and resolved by the authority
        proven = invoke("audit", "verify", group.database_url("hosp-b"))
        assert proven.exit_code == 1 and proven.output.startswith("INVALID: fork proven")
        settled = invoke(
            "audit", "verify", group.database_url("hosp-b"), "--authority",
            str(group.authority_key), "--resolution", str(resolution),
        )  # fmt: skip
        assert settled.exit_code == 0, settled.output
        assert settled.output.startswith("VALID") and "1 fork(s) resolved" in settled.output
        assert "resolved by the authority" in settled.output
    finally:
        group.close()
