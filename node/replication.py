"""The node's replication worker: :mod:`ledger.replication` over signed HTTP.

``hrx node replicate --dir DIR`` runs it as its own process beside the web workers (never
inside them): a round every ``--interval`` seconds, each pulling from every member what it
shows beyond this node's copy. Requests to peers are signed (:mod:`node.peer_auth`) and go to
the URLs the roster gives; an unreachable or misbehaving member is backed off from.

Each round (and each checkpoint proposal) has a request ID of its own, on its log lines and on
every request it sends (``X-Request-ID``), as a web request's ID is on the requests it makes
(:mod:`node.logs`).
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

import requests

from ledger import keys
from ledger.canonical import canonical_bytes, parse_json
from ledger.checkpoint import (
    make_certificate,
    make_checkpoint,
    verify_certificate,
    verify_signature,
)
from ledger.checkpoint import sign as sign_checkpoint
from ledger.errors import LedgerError, SigningHeld, StoreError
from ledger.model import parse_time
from ledger.replication import PeerTimeout, PeerUnavailable, Replicator, RoundReport
from ledger.store import ChainStore, Head
from node.config import NodeConfig, load_config
from node.consortium import AUTHORITY_SETTING
from node.db import open_database, require_current
from node.errors import ConfigError
from node.logs import REQUEST_ID_HEADER, current_request_id, new_request_id, request_scope
from node.peer_auth import sign_request

log = logging.getLogger(__name__)

CONNECT_SECONDS = 2.0
READ_SECONDS = 30.0
MAX_RESPONSE_BYTES = 256 * 1024 * 1024  # a page of 200 full blocks is about 60 MB


def _read_capped(response: requests.Response) -> bytes:
    """The body, refused beyond MAX_RESPONSE_BYTES (a peer cannot exhaust our memory)."""
    chunks, size = [], 0
    for chunk in response.iter_content(1 << 20):
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            response.close()
            raise requests.RequestException(f"answer over {MAX_RESPONSE_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class SignedPeers:
    """Fetches ledger JSON from members, each request signed with this node's key."""

    def __init__(
        self, store: ChainStore, own: str, key: Any, *, timeout: float = READ_SECONDS
    ) -> None:
        self.store = store
        self.own = own
        self.key = key
        self.timeout = timeout  # for each request
        self.session = requests.Session()

    def _request(self, member: str, method: str, path: str, value: Any = None) -> Any:
        """A signed request to a member; its JSON answer, or PeerUnavailable saying why
        (the member's own message included)."""
        content = self.fetch(member, method, path, value, self.timeout)
        try:
            return parse_json(content)
        except LedgerError as exc:
            raise PeerUnavailable(f"{member} sent what is not JSON: {exc}") from None

    def fetch(
        self,
        member: str,
        method: str,
        path: str,
        value: Any = None,
        timeout: float = READ_SECONDS,
        session: requests.Session | None = None,
        request_id: str | None = None,
    ) -> bytes:
        """A signed request to a member; the bytes of its 200 answer, or PeerUnavailable
        saying why. ``session``: another than this object's (one per thread). ``request_id``:
        sent as ``X-Request-ID`` (default: the ID of the request or round this thread is
        handling; a thread of a pool handles none, so work handed to one must pass it)."""
        try:
            base = self.store.roster().member(member)["url"].rstrip("/")
        except LedgerError as exc:
            raise PeerUnavailable(str(exc)) from None
        url = base + path
        body = b"" if value is None else canonical_bytes(value)
        headers = sign_request(
            self.own, self.key, method, url, body, {"Content-Type": "application/json"}
        )
        request_id = request_id or current_request_id()
        if request_id is not None:  # not signed (nor need it be): it only links the logs
            headers[REQUEST_ID_HEADER] = request_id
        try:
            response = (session or self.session).request(
                method,
                url,
                data=body or None,
                headers=headers,
                timeout=(min(CONNECT_SECONDS, timeout), timeout),
                stream=True,
            )
            content = _read_capped(response)
        except requests.Timeout:
            raise PeerTimeout(f"{member} at {base} did not answer within {timeout:g} s") from None
        except requests.RequestException as exc:
            raise PeerUnavailable(f"{member} at {base}: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise PeerUnavailable(
                f"{member} answered {response.status_code}: "
                + content[:300].decode("utf-8", "replace")
            )
        return content

    def _get(self, member: str, path: str) -> Any:
        return self._request(member, "GET", path)

    def post(self, member: str, path: str, value: Any) -> Any:
        """POST canonical JSON to a member; its JSON answer."""
        return self._request(member, "POST", path, value)

    def heads(self, member: str) -> dict[str, Any]:
        heads = self._get(member, "/ledger/heads")
        if not isinstance(heads, dict):
            raise PeerUnavailable(f"{member}: /ledger/heads is not a JSON object")
        return heads

    def blocks(self, member: str, chain: str, start: int, limit: int) -> list[dict[str, Any]]:
        blocks = self._get(member, f"/ledger/chains/{chain}/blocks?from={start}&limit={limit}")
        if not isinstance(blocks, list):
            raise PeerUnavailable(f"{member}: blocks are not a JSON array")
        return blocks


SYNCED_SETTING = "synced:"  # + chain id: when its author's head was last matched (unix s)


class SyncTimes:
    """Records when each chain was last found current with its author (at most once a second
    per chain), for the staleness bound of access decisions (DESIGN §5)."""

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


class CheckpointProposer:
    """Proposes checkpoints in this node's turn, gathers the members' signatures and, at the
    quorum, stores and sends the certificate to every member.

    Time is cut into slots of ``checkpoints.slot_seconds``; the proposer of slot e is witness
    e mod n of the roster's n witnesses, sorted, and a certificate's epoch is its slot; it asks
    the other witnesses to sign. In its slot a member
    proposes when the chains have grown since the newest certificate and either
    ``checkpoints.epoch_seconds`` have passed since it or the chains have ``epoch_blocks``
    new blocks: checkpoints come by time and by blocks, and a member that is down only costs
    its own slots."""

    RETRIES = 6  # rounds of asking members that have not yet verified the heads
    RETRY_SECONDS = 0.5

    def __init__(self, config: NodeConfig, store: ChainStore, peers: SignedPeers) -> None:
        self.config = config
        self.store = store
        self.peers = peers
        self._tried = -1

    def due(self, heads: dict[str, Head], now: float) -> bool:
        """Whether the chains moved enough since the newest certificate to certify them."""
        latest = self.store.certificate()
        if latest is None:
            return True
        certified = latest["checkpoint"]["heads"]
        grown = sum(
            head.header["height"] - certified.get(chain, {"height": -1})["height"]
            for chain, head in heads.items()
        )
        if grown <= 0:
            return False
        age = now - parse_time(latest["checkpoint"]["time"]).timestamp()
        return age >= self.config.epoch_seconds or grown >= self.config.epoch_blocks

    def maybe_propose(self, now: float) -> dict[str, Any] | None:
        slot = int(now // self.config.slot_seconds)
        if slot <= self._tried:
            return None
        roster = self.store.roster()
        witnesses = sorted(roster.witnesses())
        if witnesses[slot % len(witnesses)] != self.config.node_id:
            return None
        self._tried = slot
        frozen = self.store.frozen_chains()
        heads = {c: h for c, h in self.store.heads().items() if c not in frozen}
        if not heads or not self.due(heads, now):
            return None
        return self.propose(slot, make_checkpoint(slot, roster.version, heads))

    def propose(self, epoch: int, checkpoint: dict[str, Any]) -> dict[str, Any] | None:
        from ledger import bls

        roster = self.store.roster()
        signatures: dict[str, str] = {}
        if self.store.vote(checkpoint):
            secret = bls.read_secret_key(self.config.bls_key)
            signatures[self.config.node_id] = sign_checkpoint(checkpoint, secret)
        waiting = [m for m in sorted(roster.witnesses()) if m != self.config.node_id]
        for attempt in range(self.RETRIES):
            still = []
            for member in waiting:
                try:
                    answer = self.peers.post(member, "/peer/checkpoints/sign", checkpoint)
                    signature = answer.get("signature") if isinstance(answer, dict) else None
                    if not isinstance(signature, str):
                        raise LedgerError("its answer holds no signature")
                    verify_signature(checkpoint, roster, member, signature)
                    signatures[member] = signature
                except PeerUnavailable as exc:
                    if "not yet verified" in str(exc):
                        still.append(member)  # it is catching up: ask again shortly
                    else:
                        log.info("epoch %s: %s does not sign: %s", epoch, member, exc)
                except LedgerError as exc:
                    log.warning("epoch %s: %s's signature refused: %s", epoch, member, exc)
            waiting = still
            if not waiting or (len(signatures) >= roster.quorum and attempt):
                break
            time.sleep(self.RETRY_SECONDS)
        if len(signatures) < roster.quorum:
            log.warning(
                "epoch %s: %d of %d signatures needed; no certificate",
                epoch,
                len(signatures),
                roster.quorum,
            )
            return None
        certificate = make_certificate(checkpoint, signatures)
        verify_certificate(certificate, {roster.version: roster})
        self.store.add_certificate(certificate)
        for member in sorted(roster.member_ids()):
            if member != self.config.node_id:
                try:
                    self.peers.post(member, "/peer/checkpoints", certificate)
                except PeerUnavailable as exc:
                    log.info("epoch %s: certificate not delivered to %s: %s", epoch, member, exc)
        log.info("epoch %s certified by %s", epoch, ", ".join(certificate["signers"]))
        return certificate


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
