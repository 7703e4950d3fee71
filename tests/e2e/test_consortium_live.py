"""A live consortium of real node processes (web server and replication worker each) under
load: members converge, checkpoints are co-signed, a member killed and restarted catches up
with nothing lost, a member cut off for four times the longest backoff converges after healing."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ledger import keys
from ledger.replication import MAX_BACKOFF_SECONDS
from ledger.store import ChainStore, ChainWriter
from node.base.config import load_config
from node.demo.harness import Consortium

pytestmark = pytest.mark.slow


class Load:
    """Appends to members' chains from this process, as their web workers would."""

    def __init__(self, group: Consortium, names: list[str], pause: float = 0.01) -> None:
        self.group, self.pause = group, pause
        self.appended: dict[str, int] = dict.fromkeys(names, 0)
        self._running: dict[str, threading.Event] = {}
        self._threads: list[threading.Thread] = []
        for name in names:
            self.resume(name)

    def _run(self, name: str, running: threading.Event) -> None:
        config = load_config(self.group.members[name].directory)
        store = ChainStore(config.database_url)
        try:
            with ChainWriter(store, name, keys.load_private_key(config.ed25519_key)) as writer:
                while running.is_set():
                    number = self.appended[name]
                    writer.append(
                        "access.requested", {"request_id": f"{name}-{number}", "patient": "cd" * 32}
                    )
                    self.appended[name] = number + 1
                    time.sleep(self.pause)
        finally:
            store.close()

    def pause_member(self, name: str) -> None:
        self._running.pop(name).clear()

    def resume(self, name: str) -> None:
        running = threading.Event()
        running.set()
        self._running[name] = running
        thread = threading.Thread(target=self._run, args=(name, running), daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        for running in self._running.values():
            running.clear()
        for thread in self._threads:
            thread.join(timeout=10)


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Consortium]:
    consortium = Consortium(
        tmp_path_factory.mktemp("live"), 3, epoch_seconds=2, replicate_interval=0.5
    )
    try:
        consortium.start_all()
        yield consortium
    finally:
        consortium.close()


def tree_sizes(group: Consortium, name: str) -> dict[str, int]:
    store = ChainStore(group.database_url(name))
    try:
        return {chain: head.tree_size for chain, head in store.heads().items()}
    finally:
        store.close()


def newest_certificate(group: Consortium, name: str) -> dict[str, object] | None:
    store = ChainStore(group.database_url(name))
    try:
        return store.certificate()
    finally:
        store.close()


def test_converge_under_load_and_certify(group: Consortium) -> None:
    load = Load(group, list(group.members))
    time.sleep(4)
    load.stop()
    group.wait_converged(10)
    for name in group.members:
        assert tree_sizes(group, name) == load.appended
    # checkpoints: within a few epochs every member holds a certificate of the final heads
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        certificates = [newest_certificate(group, name) for name in group.members]
        final = group.heads("hosp-a")
        if all(
            c is not None and {k: v["hash"] for k, v in c["checkpoint"]["heads"].items()} == final  # type: ignore[index]
            for c in certificates
        ):
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"no certificate of the final heads on every member: {certificates}")


def test_killed_member_catches_up_with_nothing_lost(group: Consortium) -> None:
    load = Load(group, list(group.members))
    time.sleep(1)
    load.pause_member("hosp-c")
    group.stop("hosp-c", kill=True)  # SIGKILL, mid-flight
    time.sleep(3)
    group.start("hosp-c")
    load.resume("hosp-c")
    time.sleep(1)
    load.stop()
    group.wait_converged(15)
    expected = tree_sizes(group, "hosp-a")
    for name in group.members:
        assert tree_sizes(group, name) == expected
    for name, count in load.appended.items():
        assert expected[name] >= count  # every append of this test (and the ones before)


def test_member_cut_off_converges_after_healing(group: Consortium) -> None:
    load = Load(group, list(group.members), pause=0.02)
    group.cut("hosp-b")
    # long enough for every member's backoff from hosp-b to reach its ceiling, and for
    # several checkpoint epochs (2 s) to be certified without hosp-b
    time.sleep(4 * MAX_BACKOFF_SECONDS)
    before = newest_certificate(group, "hosp-a")
    group.heal("hosp-b")
    load.stop()
    group.wait_converged(30)  # how fast: scripts/bench_consortium.py measures it
    # checkpoints resume: a newer certificate covering hosp-b's chain as it is now
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        certificate = newest_certificate(group, "hosp-b")
        if (
            certificate is not None
            and before is not None
            and certificate["checkpoint"]["epoch"] > before["checkpoint"]["epoch"]  # type: ignore[index]
            and certificate["checkpoint"]["heads"]["hosp-b"]["hash"]  # type: ignore[index]
            == group.heads("hosp-a")["hosp-b"]
        ):
            break
        time.sleep(0.2)
    else:
        pytest.fail("checkpoints did not resume after healing")


def test_five_members_converge(tmp_path: Path) -> None:
    five = Consortium(tmp_path, 5, epoch_seconds=2, replicate_interval=0.5)
    try:
        five.start_all()
        load = Load(five, list(five.members), pause=0.02)
        time.sleep(3)
        load.stop()
        five.wait_converged(20)
        for name in five.members:
            assert tree_sizes(five, name) == load.appended
    finally:
        five.close()
