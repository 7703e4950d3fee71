"""The node's replication worker: :mod:`ledger.replication` over signed HTTP.

``hrx node replicate --dir DIR`` runs it as its own process beside the web workers (never
inside them): a round every ``--interval`` seconds, each pulling from every member what it
shows beyond this node's copy. Requests to peers are signed (:mod:`node.peer_auth`) and go to
the URLs the roster gives; an unreachable or misbehaving member is backed off from.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import requests

from ledger import keys
from ledger.canonical import parse_json
from ledger.errors import LedgerError
from ledger.replication import PeerUnavailable, Replicator, RoundReport
from ledger.store import ChainStore
from node.config import NodeConfig, load_config
from node.consortium import AUTHORITY_SETTING
from node.db import open_database
from node.errors import ConfigError
from node.peer_auth import sign_request

log = logging.getLogger(__name__)

CONNECT_SECONDS = 2.0
READ_SECONDS = 30.0


class SignedPeers:
    """Fetches ledger JSON from members, each request signed with this node's key."""

    def __init__(self, store: ChainStore, own: str, key: Any) -> None:
        self.store = store
        self.own = own
        self.key = key
        self.session = requests.Session()

    def _get(self, member: str, path: str) -> Any:
        try:
            base = self.store.roster().member(member)["url"].rstrip("/")
        except LedgerError as exc:
            raise PeerUnavailable(str(exc)) from None
        url = base + path
        headers = sign_request(self.own, self.key, "GET", url)
        try:
            response = self.session.get(
                url, headers=headers, timeout=(CONNECT_SECONDS, READ_SECONDS)
            )
        except requests.RequestException as exc:
            raise PeerUnavailable(f"{member} at {base}: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise PeerUnavailable(
                f"{member} answered {response.status_code}: {response.text[:200]}"
            )
        try:
            return parse_json(response.content)
        except LedgerError as exc:
            raise PeerUnavailable(f"{member} sent what is not JSON: {exc}") from None

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


def replicator_for(config: NodeConfig, store: ChainStore) -> Replicator:
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
        SignedPeers(store, config.node_id, key),
        keys.parse_public_key(anchor),
    )


def describe(report: RoundReport) -> str:
    parts = [f"{chain} +{count}" for chain, count in sorted(report.pulled.items()) if count]
    parts += [f"FORK {e['chain']}@{e['height']}" for e in report.evidence]
    parts += [f"{member} unreachable" for member in sorted(report.unreachable)]
    parts += [f"{member} refused" for member in sorted(report.refused)]
    return ", ".join(parts) or "up to date"


def run(directory: Path, interval: float, once: bool = False) -> RoundReport:
    """Replicate until SIGTERM/SIGINT (or one round with ``once``); the last round's report."""
    config = load_config(directory)
    database = open_database(config.database_url)
    stop = threading.Event()
    if not once and threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    try:
        store = ChainStore(database.write_engine)
        replicator = replicator_for(config, store)
        while True:
            report = replicator.run_round()
            if report.pulled or report.evidence or report.refused:
                log.info("replication round: %s", describe(report))
            if once or stop.wait(interval):
                return report
    finally:
        database.close()
