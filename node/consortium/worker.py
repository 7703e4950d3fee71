"""The node's replication worker: :mod:`ledger.replication` over signed HTTP.

``hrx node replicate --dir DIR`` runs it as its own process beside the web workers (never
inside them): a round every ``--interval`` seconds, each pulling from every member what it
shows beyond this node's copy. Requests to peers are signed (:mod:`node.consortium.signing`)
and go to the URLs the roster gives; an unreachable or misbehaving member is backed off from.

Each round (and each checkpoint proposal) has a request ID of its own, on its log lines and on
every request it sends (``X-Request-ID``), as a web request's ID is on the requests it makes
(:mod:`node.base.logs`).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ledger import keys
from ledger.errors import PeerUnavailable, SigningHeld, StoreError
from ledger.replication import Replicator, RoundReport
from ledger.store import ChainStore
from node.base.config import NodeConfig, load_config
from node.base.errors import ConfigError
from node.base.logs import new_request_id, request_scope
from node.consortium.checkpoints import CheckpointProposer
from node.consortium.membership import AUTHORITY_SETTING
from node.consortium.peers import READ_SECONDS, SignedPeers
from node.db.engines import open_database, require_current

log = logging.getLogger(__name__)

SYNCED_SETTING = "synced:"  # + chain id: when its author's head was last matched (unix s)


class SyncTimes:
    """Records when each chain was last found current with its author (at most once a second
    per chain), for the staleness bound of access decisions (docs/spec.md §14.4)."""

    def __init__(self, writes: ChainStore) -> None:
        self.writes = writes
        self._written: dict[str, float] = {}

    def record(self, chain: str) -> None:
        now = time.time()
        if now - self._written.get(chain, 0.0) >= 1.0:
            self.writes.set_setting(SYNCED_SETTING + chain, f"{now:.3f}")
            self._written[chain] = now


def synced_age(store: ChainStore, chain: str) -> float | None:
    """Seconds since ``chain`` was last found current with its author; None: never."""
    value = store.setting(SYNCED_SETTING + chain)
    return None if value is None else max(0.0, time.time() - float(value))


def replicator_for(
    config: NodeConfig,
    store: ChainStore,
    writes: ChainStore | None = None,
    *,
    timeout: float = READ_SECONDS,
) -> Replicator:
    anchor = store.setting(AUTHORITY_SETTING)
    if anchor is None:
        raise ConfigError(
            f"{config.node_id} has joined no consortium; run hrx node join --dir "
            f"{config.directory} first"
        )
    key = keys.load_private_key(config.ed25519_key)
    return Replicator(
        store,
        config.node_id,
        SignedPeers(store, config.node_id, key, timeout=timeout),
        keys.parse_public_key(anchor),
        writes=writes,
        on_synced=SyncTimes(writes or store).record,
    )


CONFIRM_SECONDS = 2.0  # how long a process waits for the members before its first block


def confirm_own_head(config: NodeConfig, store: ChainStore, writes: ChainStore) -> None:
    """Before a process signs its first block: ask the other members whether any holds this
    node's chain beyond its head here. One that does means the database was restored from a
    backup, and a block signed now would be a second block at a height already signed (a
    fork of the node's own making, which freezes its chain everywhere): signing is then held
    (:meth:`ledger.store.ChainStore.hold_signing`) until ``hrx node recover``. StoreError when
    no member could be asked: nothing is signed until one answers. A member holding no copy
    of the chain answers 404, which is as good as "nothing newer"."""
    others = [m for m in store.roster().member_ids() if m != config.node_id]
    if not others:
        return
    head = store.heads().get(config.node_id)
    start = head.header["height"] + 1 if head is not None else 0
    peers = SignedPeers(
        store, config.node_id, keys.load_private_key(config.ed25519_key), timeout=CONFIRM_SECONDS
    )

    def newer(member: str) -> list[dict[str, Any]] | None:
        try:
            return peers.blocks(member, config.node_id, start, 1)
        except PeerUnavailable as exc:
            return [] if " answered 404:" in str(exc) else None

    with ThreadPoolExecutor(max_workers=min(16, len(others))) as pool:
        answers = dict(zip(others, pool.map(newer, others), strict=True))
    for member, blocks in sorted(answers.items()):
        if blocks:
            height = blocks[0].get("header", {}).get("height")
            reason = (
                f"{member} holds this node's own chain up to height {height} or beyond, beyond "
                f"its head here at {start - 1} (restored from a backup?): stop the node and run "
                "hrx node recover"
            )
            writes.hold_signing(reason)
            raise SigningHeld(reason)
    if all(blocks is None for blocks in answers.values()):
        raise StoreError(
            f"no member answered whether it holds this node's chain beyond height {start - 1}, "
            "so a block signed now could fork it: nothing is signed until one answers"
        )


def describe(report: RoundReport) -> str:
    parts = [f"{chain} +{count}" for chain, count in sorted(report.pulled.items()) if count]
    parts += [f"FORK {e['chain']}@{e['height']}" for e in report.evidence]
    parts += [f"{member} unreachable" for member in sorted(report.unreachable)]
    parts += [f"{member} refused" for member in sorted(report.refused)]
    return ", ".join(parts) or "up to date"


def push_hints(store: ChainStore, peers: SignedPeers, own: str) -> None:
    """Tell every member this node's chain has new blocks (best effort)."""
    for member in store.roster().member_ids():
        if member != own:
            with contextlib.suppress(PeerUnavailable):  # it pulls on its next round anyway
                peers.post(member, "/peer/heads", {"chain": own})


# A busy member's chain grows many times a second; hinting and pulling at most this often
# batches the growth (one push and one pull carry several blocks) at the cost of at most this
# much replication delay while busy. A quiet member's first block goes out at once.
HINT_SPACING_SECONDS = 0.25


def run(directory: Path, interval: float, once: bool = False) -> RoundReport:
    """Replicate until SIGTERM/SIGINT (or one round with ``once``); the last round's report.

    Between rounds it wakes early for a push hint from a peer (``POST /peer/heads`` touches
    ``DIR/replicate.hint``) and when this node's own chain grows (then it hints its peers)."""
    config = load_config(directory)
    database = open_database(config.database_url)
    stop = threading.Event()
    if not once and threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    hint = directory / "replicate.hint"
    try:
        require_current(database.engine, config.directory)  # as every process of the node
        store = ChainStore(database.write_engine)
        reader = ChainStore(database.engine)  # reads take no write lock
        replicator = replicator_for(config, reader, writes=store)
        peers = replicator.peers
        assert isinstance(peers, SignedPeers)
        # its own store and HTTP session: it runs in a thread of its own
        proposer = CheckpointProposer(
            config,
            ChainStore(database.write_engine),
            SignedPeers(reader, config.node_id, keys.load_private_key(config.ed25519_key)),
        )
        if once:  # one replication round; checkpoints belong to the running worker
            with request_scope(new_request_id()):
                return replicator.run_round()
        # checkpoints in their own thread: gathering signatures must not hold up replication
        proposing = threading.Thread(
            target=_propose_every_epoch, args=(proposer, stop), name="checkpoints", daemon=True
        )
        proposing.start()
        log.info(
            "replication worker of %s started: every %.2f s, and at once on a member's hint",
            config.node_id,
            interval,
        )
        pushed_head = _own_head(reader, config.node_id)
        pushed_at = round_at = 0.0
        hinted: set[str] | None = None  # None: a full round (every member)
        deadline = 0.0
        while True:
            round_at = time.monotonic()
            seen = _mtime(hint)  # a hint that comes during the round brings another round
            with request_scope(new_request_id()):
                try:
                    report = replicator.run_round(hinted)
                except Exception:  # the worker keeps going: the next round may well succeed
                    log.exception("replication round failed")
                    report = RoundReport()
                if report.pulled or report.evidence or report.refused:
                    log.info("replication round: %s", describe(report))
            if hinted is None:
                deadline = time.monotonic() + interval
            hinted = None
            while time.monotonic() < deadline and not stop.is_set():
                now = time.monotonic()
                if now - pushed_at >= HINT_SPACING_SECONDS:
                    head = _own_head(reader, config.node_id)
                    if head != pushed_head:
                        pushed_head, pushed_at = head, now
                        with request_scope(new_request_id()):
                            push_hints(store, peers, config.node_id)
                if _mtime(hint) != seen and now - round_at >= HINT_SPACING_SECONDS:
                    # only the members that spoke up (all that did since the last round): the
                    # interval's full round still comes
                    hinted = _take_hints(hint)
                    for member in hinted:
                        replicator.reset_backoff(member)
                    break
                stop.wait(0.05)
            if stop.is_set():
                log.info("replication worker of %s stopped", config.node_id)
                return report
    finally:
        database.close()


def _propose_every_epoch(proposer: CheckpointProposer, stop: threading.Event) -> None:
    seconds = proposer.config.slot_seconds
    while not stop.is_set():
        try:
            with request_scope(new_request_id()):
                proposer.maybe_propose(time.time())
        except Exception:  # a failed slot is logged; the next one is tried
            log.exception("checkpoint proposal failed")
        stop.wait(seconds - time.time() % seconds + 0.01)  # just after the next slot begins


def _own_head(store: ChainStore, own: str) -> str | None:
    head = store.heads().get(own)
    return None if head is None else head.hash


def _take_hints(path: Path) -> set[str]:
    """The members that sent push hints since the last look (the file is emptied)."""
    try:
        with path.open("r+") as hint:
            members = {line.strip() for line in hint if line.strip()}
            hint.seek(0)
            hint.truncate()
        return members
    except FileNotFoundError:
        return set()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
