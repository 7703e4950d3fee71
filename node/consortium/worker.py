"""The node's replication worker: :mod:`ledger.replication` over signed HTTP, push not poll
(docs/spec.md §11).

``hrx node replicate --dir DIR`` runs it as its own process beside the web workers (never
inside them). What it does depends on this node's roles in the roster:

- every member, when its own chain grows, sends the new signed head to every witness
  (``POST /peer/heads``; at most every :data:`HINT_SPACING_SECONDS` while busy), and an
  ordinary member sends it again every ``replication.heartbeat_seconds`` while idle, so a
  witness that missed a notice learns of it; the answers name the witnesses' newest
  certificate, which an ordinary member fetches when it holds none or its own is older than
  ``replication.certificate_seconds`` (certificates are pushed only to witnesses);
- a witness follows every notice at once (the author is asked for what it announced) and
  every ``--interval`` seconds compares heads with the other witnesses, pulling whatever any
  of them holds beyond its copy (so a witness cut off catches up from the others, and an
  author that shows two witnesses two histories is caught); it also proposes and co-signs
  checkpoints (:mod:`node.consortium.checkpoints`);
- an ordinary member replicates nothing else: it fetches another chain only when a decision
  needs it (:mod:`node.flows.access_decision`);
- every member sends the roster's registries what changed in its holdings
  (:class:`node.consortium.locator.Publisher`), every :data:`PUBLISH_SECONDS`.

No member polls all members: an ordinary member's traffic is a constant number of requests to
the witnesses; a witness's grows linearly with the members (their notices and heartbeats).
Requests to peers are signed (:mod:`node.consortium.signing`) and go to the URLs the roster
gives; an unreachable or misbehaving member is backed off from.

Each round (and each checkpoint proposal) has a request ID of its own, on its log lines and on
every request it sends (``X-Request-ID``), as a web request's ID is on the requests it makes
(:mod:`node.base.logs`).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from fhir_adapters.store import ResourceStore
from ledger import keys
from ledger.canonical import parse_json
from ledger.errors import LedgerError, PeerUnavailable, SigningHeld, StoreError
from ledger.replication import Replicator, RoundReport
from ledger.store import ChainStore
from node.base.config import NodeConfig, load_config
from node.base.errors import ConfigError, Refused
from node.base.logs import new_request_id, request_scope
from node.consortium import checkpoints
from node.consortium.checkpoints import CheckpointProposer
from node.consortium.locator import Publisher
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
    """Before a process signs its first block: ask the witnesses (every other member, when
    this node is the only one) whether any holds this node's chain beyond its head here. One
    that does means the database was restored from a backup, and a block signed now would be
    a second block at a height already signed (a fork of the node's own making, which freezes
    its chain everywhere): signing is then held
    (:meth:`ledger.store.ChainStore.hold_signing`) until ``hrx node recover``. StoreError when
    no member could be asked: nothing is signed until one answers. A member holding no copy
    of the chain answers 404, which is as good as "nothing newer"."""
    roster = store.roster()
    others = [m for m in roster.witnesses() if m != config.node_id] or [
        m for m in roster.member_ids() if m != config.node_id
    ]
    if not others:
        return
    head = store.head(config.node_id)
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


def notify_witnesses(store: ChainStore, peers: SignedPeers, own: str) -> dict[str, int]:
    """Send this node's signed head to every witness (best effort); the epoch of the newest
    certificate each witness that answered holds (-1: none)."""
    head = store.head(own)
    if head is None:
        return {}
    notice = {"chain": own, "head": head.to_json()}
    epochs = {}
    for witness in store.roster().witnesses():
        if witness == own:
            continue
        try:
            answer = peers.post(witness, "/peer/heads", notice)
        except PeerUnavailable as exc:  # it hears of the chain again at the next heartbeat
            log.info("%s did not take this node's head: %s", witness, exc)
            continue
        epoch = answer.get("certificate") if isinstance(answer, dict) else None
        epochs[witness] = epoch if type(epoch) is int else -1
    return epochs


def fetch_certificate(
    config: NodeConfig, store: ChainStore, writes: ChainStore, peers: SignedPeers, witness: str
) -> bool:
    """Take ``witness``'s newest certificate (stored once it verifies); whether one was."""
    try:
        certificate = peers.get(witness, "/ledger/checkpoints/latest")
        return checkpoints.receive(config, store, writes, certificate)
    except (LedgerError, Refused) as exc:
        log.warning("the newest certificate of %s was not taken: %s", witness, exc)
        return False


# A busy member's chain grows many times a second; notifying and pulling at most this often
# batches the growth (one notice and one pull carry several blocks) at the cost of at most
# this much replication delay while busy. A quiet member's first block goes out at once.
HINT_SPACING_SECONDS = 0.25
PUBLISH_SECONDS = 2.0  # how often the record locator is sent what changed here


def run(directory: Path, interval: float, once: bool = False) -> RoundReport:
    """Replicate until SIGTERM/SIGINT (or, with ``once``, one comparison of heads with every
    other member); the last report. See the module docstring."""
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
        if once:  # one comparison with every member; checkpoints belong to the running worker
            with request_scope(new_request_id()):
                return replicator.run_round(reader.roster().member_ids())
        # its own store and HTTP session: it runs in a thread of its own
        proposer = CheckpointProposer(
            config,
            ChainStore(database.write_engine),
            SignedPeers(reader, config.node_id, keys.load_private_key(config.ed25519_key)),
        )
        # checkpoints in their own thread: gathering signatures must not hold up replication
        proposing = threading.Thread(
            target=_propose_every_epoch, args=(proposer, stop), name="checkpoints", daemon=True
        )
        proposing.start()
        log.info(
            "replication worker of %s started: heads compared with the witnesses every %.2f s, "
            "notices followed at once",
            config.node_id,
            interval,
        )
        publisher = Publisher(
            config.node_id,
            reader,
            store,
            ResourceStore(database.engine, database.write_engine),
            database.engine,
            database.write_engine,
            peers,
        )
        report = RoundReport()
        notified_head, notified_at, heartbeat_at, compared_at = None, 0.0, 0.0, 0.0
        published_at = 0.0
        seen = 0.0
        roster, roster_at = reader.roster(), time.monotonic()
        while not stop.is_set():
            now = time.monotonic()
            if now - roster_at >= 1.0:  # a new roster's roles count within a second
                roster, roster_at = reader.roster(), now
            witness = config.node_id in roster.witnesses()
            if witness and now - compared_at >= interval:
                compared_at = now
                others = [w for w in roster.witnesses() if w != config.node_id]
                report = _logged(partial(replicator.run_round, others), "comparing heads")
            if _mtime(hint) != seen:
                seen = _mtime(hint)
                notices = _take_notices(hint)
                if witness:
                    for (source, chain), head in notices.items():
                        replicator.reset_backoff(source)
                        report = _logged(
                            lambda s=source, c=chain, h=head: (
                                replicator.follow_notice(s, c, h)
                                if h is not None
                                else replicator.run_round([s])
                            ),
                            f"following {source}'s notice",
                        )
            if now - notified_at >= HINT_SPACING_SECONDS:
                head = _own_head(reader, config.node_id)
                beat = not witness and now - heartbeat_at >= config.heartbeat_seconds
                if head is not None and (head != notified_head or beat):
                    notified_head, notified_at, heartbeat_at = head, now, now
                    with request_scope(new_request_id()):
                        epochs = notify_witnesses(reader, peers, config.node_id)
                        _take_newer_certificate(config, reader, store, peers, epochs)
                elif head is None and beat:  # nothing to announce yet: a certificate still
                    heartbeat_at = now
                    if reader.certificate_epoch() is None:
                        with request_scope(new_request_id()):
                            _first_certificate(config, reader, store, peers, roster.witnesses())
            if now - published_at >= PUBLISH_SECONDS:
                published_at = now
                with request_scope(new_request_id()):
                    try:
                        publisher.publish(roster.registries())
                    except Exception:  # the next look sends it again
                        log.exception("the record locator could not be updated")
            # a witness follows notices within 50 ms; an ordinary member has only its own
            # chain to watch, and notices its growth within the spacing anyway
            stop.wait(0.05 if witness else HINT_SPACING_SECONDS)
        log.info("replication worker of %s stopped", config.node_id)
        return report
    finally:
        database.close()


def _logged(work: Any, what: str) -> RoundReport:
    """Run one piece of replication under a request ID of its own; log what it did."""
    with request_scope(new_request_id()):
        try:
            report: RoundReport = work()
        except Exception:  # the worker keeps going: the next notice or round may well succeed
            log.exception("replication failed while %s", what)
            return RoundReport()
        if report.pulled or report.evidence or report.refused:
            log.info("%s: %s", what, describe(report))
        return report


def _take_newer_certificate(
    config: NodeConfig,
    store: ChainStore,
    writes: ChainStore,
    peers: SignedPeers,
    epochs: dict[str, int],
) -> None:
    """Fetch the newest certificate a witness named, when this node holds none, or when its
    own is older than ``replication.certificate_seconds`` (a certificate names every chain: at
    1,200 members it is ~240 KB, and every member taking each one would cost the consortium
    members × certificate bytes per epoch)."""
    if not epochs:
        return
    held = store.certificate_epoch()
    witness, newest = max(epochs.items(), key=lambda item: (item[1], item[0]))
    if held is not None and newest <= held:
        return
    if held is not None and (newest - held) * config.slot_seconds < config.certificate_seconds:
        return  # epochs are slots of wall time: the one held is recent enough
    fetch_certificate(config, store, writes, peers, witness)


def _first_certificate(
    config: NodeConfig,
    store: ChainStore,
    writes: ChainStore,
    peers: SignedPeers,
    witnesses: list[str],
) -> None:
    """A member that holds no certificate, and has no chain of its own to announce yet (a new
    member), takes the newest certificate from the first witness that gives one."""
    for witness in witnesses:
        if witness != config.node_id and fetch_certificate(config, store, writes, peers, witness):
            return


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
    head = store.head(own)
    return None if head is None else head.hash


def _take_notices(path: Path) -> dict[tuple[str, str], Any]:
    """The notices members sent since the last look, the newest of each (member, chain): the
    signed head it announced, or None for a bare "my chain grew". The file is renamed before
    it is read, so a notice written meanwhile goes to a new file; one lost in that instant is
    repeated by the member's next notice or heartbeat."""
    taken = path.with_name(path.name + ".taken")
    try:
        os.replace(path, taken)
    except FileNotFoundError:
        return {}
    notices: dict[tuple[str, str], Any] = {}
    for line in taken.read_bytes().splitlines():
        try:
            notice = parse_json(line)
            notices[(str(notice["source"]), str(notice["chain"]))] = notice.get("head")
        except (LedgerError, KeyError, TypeError):
            continue  # a line cut short: the member repeats itself
    return notices


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
