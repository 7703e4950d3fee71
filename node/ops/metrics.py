"""The node's metrics for Prometheus (docs/operations.md lists every metric and what to alert
on); :mod:`node.web.metrics` serves them at ``GET /metrics``.

Two kinds of value:

- **read from the database when scraped**: ledger blocks and entries per chain, the sizes of
  this node's blocks, how long since each member's chain was last found current with its
  author, the newest checkpoint, frozen chains, and what the adapters stored and refused
  (their messages and quarantine tables). These are
  exact whichever process answers and whatever process did the work (the replication worker,
  an adapter, another gunicorn worker), and survive restarts. Nothing is read from the
  database per request: only at scrape time.
- **counted in memory as things happen**: requests by route and status with their latency,
  consent decisions made for other members.
  Under gunicorn each worker counts its own; with ``PROMETHEUS_MULTIPROC_DIR`` set (as
  :mod:`node.ops.gunicorn_conf` and :mod:`node.web.wsgi` do) every process writes its counts
  to files there and a scrape adds them all up. Without it (``hrx node serve``) they are this
  process's own.

Who may scrape: with ``metrics.token`` set, whoever sends ``Authorization: Bearer <token>``;
without one, only a client connected straight from the loopback (127.0.0.0/8 or ::1, and no
``Forwarded``/``X-Forwarded-For`` header, so nothing relayed by a proxy on the same host).
``metrics.enabled = false`` removes the route. No label holds a patient's id: routes are URL
rules, not paths.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from ledger.errors import LedgerError
from ledger.model import parse_time
from ledger.roster import is_witness
from ledger.store import ChainStore
from ledger.store.schema import blocks_table
from node.consortium.worker import synced_age
from node.db.schema import messages_table, quarantine_table

log = logging.getLogger(__name__)

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
# read when this module is first imported, as prometheus_client itself does: a process counts
# in files or in memory for its whole life
MULTIPROCESS_DIRECTORY = os.environ.get(MULTIPROCESS_ENV) or None
if MULTIPROCESS_DIRECTORY:  # the first count must not fail for want of the directory
    Path(MULTIPROCESS_DIRECTORY).mkdir(parents=True, exist_ok=True)

# no *_created series: Prometheus notices a counter's restart by itself
disable_created_metrics()  # type: ignore[no-untyped-call]

KNOWN_ADAPTERS = ("hl7", "dicom", "csv")  # always reported, 0 when quiet
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BLOCK_ENTRY_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
BLOCK_SCAN_LIMIT = 200_000  # blocks sized per scrape (the first scrape of a big chain catches up)

# -- counted as things happen ---------------------------------------------------------------

_instruments = CollectorRegistry(auto_describe=True)
http_requests = Counter(
    "hrx_http_requests",
    "HTTP requests answered, by method, route (the URL rule, never the path) and status.",
    ["method", "route", "status"],
    registry=_instruments,
)
http_request_duration = Histogram(
    "hrx_http_request_duration_seconds",
    "Time from a request's arrival to its response, by method and route.",
    ["method", "route"],
    buckets=LATENCY_BUCKETS,
    registry=_instruments,
)
access_decisions = Counter(
    "hrx_access_decisions",
    "Members' requests for a patient's records decided here (POST /peer/access), by decision "
    "(permit or deny), emergency (break-glass: true or false) and requesting member.",
    ["decision", "emergency", "requester"],
    registry=_instruments,
)


def observe_request(method: str, route: str, status: int, seconds: float) -> None:
    """Count one answered request (called by the request hooks, :mod:`node.base.logs`)."""
    method = method if method in KNOWN_METHODS else "other"
    http_requests.labels(method, route, str(status)).inc()
    http_request_duration.labels(method, route).observe(seconds)


def count_access_decision(decision: str, emergency: bool, requester: str) -> None:
    """Count one decision on a member's access request, once it is on the ledger."""
    access_decisions.labels(decision, "true" if emergency else "false", requester).inc()


# -- read from the database when scraped ------------------------------------------------------


class NodeCollector(Collector):
    """The metrics a scrape reads from the node's database (see the module's docstring)."""

    def __init__(self, services: Any) -> None:
        self.services = services
        self.config = services.config
        self.store = ChainStore(services.database.engine)
        self._lock = threading.Lock()
        # the sizes of this node's blocks up to ``_sized_height``: blocks never change, so
        # each scrape reads only the blocks made since the last one
        self._sized_height = -1
        self._sizes: dict[int, int] = {}  # entries in a block -> how many blocks

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            "hrx_database_up", "1 when the scrape could read the node's database, else 0."
        )
        try:
            families = list(self._read())
        except Exception:  # the process metrics are still worth serving
            log.warning("metrics: the database could not be read", exc_info=True)
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        return [up, *families]

    def _read(self) -> Iterable[Metric]:
        store, config, now = self.store, self.config, time.time()
        own = config.node_id
        info = GaugeMetricFamily(
            "hrx_node_info", "Always 1; the node's member id (its chain).", labels=["node"]
        )
        info.add_metric([own], 1)
        yield info

        members: list[str] = []  # of the newest roster
        ever: set[str] = set()  # of any roster version: chains this node may hold
        try:
            rosters = store.rosters()
        except LedgerError:  # not joined yet: its own chain is all there is
            rosters = []
        if rosters:
            roster_version = GaugeMetricFamily(
                "hrx_roster_version", "The newest roster version this node holds."
            )
            roster_version.add_metric([], rosters[-1][0]["version"])
            yield roster_version
            members = sorted(m["id"] for m in rosters[-1][0]["members"])
            ever = {m["id"] for body, _ in rosters for m in body["members"]}
        chains = sorted({own, *ever})
        heads = self._heads(chains)

        blocks = CounterMetricFamily(
            "hrx_ledger_blocks",
            "Blocks held of each chain (for this node's own chain: the blocks it appended).",
            labels=["chain"],
        )
        entries = CounterMetricFamily(
            "hrx_ledger_entries",
            "Entries held of each chain (for this node's own chain: the entries it appended).",
            labels=["chain"],
        )
        for chain, (height, tree_size) in sorted(heads.items()):
            blocks.add_metric([chain], height + 1)
            entries.add_metric([chain], tree_size)
        yield blocks
        yield entries
        yield self._block_sizes(own, heads.get(own, (-1, 0))[0])

        frozen = store.frozen_chains()
        frozen_family = GaugeMetricFamily(
            "hrx_ledger_chain_frozen",
            "1 for a chain this node holds fork evidence of (it accepts no more of its blocks).",
            labels=["chain"],
        )
        for chain in chains:
            frozen_family.add_metric([chain], 1 if chain in frozen else 0)
        yield frozen_family
        held = GaugeMetricFamily(
            "hrx_signing_held",
            "1 while this node signs no block of its own chain: a member holds the chain beyond "
            "its head here (restored from a backup); run hrx node recover.",
        )
        held.add_metric([], 0 if store.signing_hold() is None else 1)
        yield held

        if rosters:
            newest = {m["id"]: m for m in rosters[-1][0]["members"]}
            if own in newest and not is_witness(newest[own]):
                # an ordinary member follows only the chains it fetched for decisions
                members = [m for m in members if m in heads]
                chains = [c for c in chains if c in heads]
            yield from self._replication(own, members)
            yield from self._checkpoints(chains, heads, frozen, now)
        yield from self._adapters()
        for name, value, text in (
            (
                "hrx_config_checkpoint_epoch_seconds",
                config.epoch_seconds,
                "checkpoints.epoch_seconds: how often checkpoints are due while chains grow.",
            ),
            (
                "hrx_config_consent_staleness_seconds",
                config.staleness_seconds,
                "consent.staleness_seconds: the oldest copy of a consent chain this node "
                "decides on when the chain's author cannot be reached.",
            ),
        ):
            setting = GaugeMetricFamily(name, text)
            setting.add_metric([], value)
            yield setting

    def _heads(self, chains: Sequence[str]) -> dict[str, tuple[int, int]]:
        """``{chain: (height, tree size)}`` of each chain's newest block held (one indexed
        lookup per chain: no scan of the blocks)."""
        heads = {}
        with self.store.engine.connect() as conn:
            for chain in chains:
                row = conn.execute(
                    sa.select(blocks_table.c.height, blocks_table.c.tree_size)
                    .where(blocks_table.c.chain == chain)
                    .order_by(blocks_table.c.height.desc())
                    .limit(1)
                ).first()
                if row is not None:
                    heads[chain] = (int(row.height), int(row.tree_size))
        return heads

    def _block_sizes(self, own: str, head_height: int) -> Metric:
        """A histogram of the entries in each block of this node's own chain."""
        with self._lock:
            if head_height > self._sized_height:
                upto = min(head_height, self._sized_height + BLOCK_SCAN_LIMIT)
                block, before = blocks_table.alias("block"), blocks_table.alias("before")
                size = (block.c.tree_size - sa.func.coalesce(before.c.tree_size, 0)).label("size")
                query = (
                    sa.select(size, sa.func.count())
                    .select_from(
                        block.outerjoin(
                            before,
                            sa.and_(
                                before.c.chain == block.c.chain,
                                before.c.height == block.c.height - 1,
                            ),
                        )
                    )
                    .where(
                        block.c.chain == own,
                        block.c.height > self._sized_height,
                        block.c.height <= upto,
                    )
                    .group_by(size)
                )
                with self.store.engine.connect() as conn:
                    for entries_in_block, count in conn.execute(query):
                        key = int(entries_in_block)
                        self._sizes[key] = self._sizes.get(key, 0) + int(count)
                self._sized_height = upto
            sizes = dict(self._sizes)
        buckets = []
        for bound in BLOCK_ENTRY_BUCKETS:
            buckets.append((str(bound), sum(n for size, n in sizes.items() if size <= bound)))
        buckets.append(("+Inf", sum(sizes.values())))
        return HistogramMetricFamily(
            "hrx_ledger_block_entries",
            "Entries per block of this node's own chain.",
            buckets=buckets,
            sum_value=sum(size * n for size, n in sizes.items()),
        )

    def _replication(self, own: str, members: Sequence[str]) -> Iterable[Metric]:
        age = GaugeMetricFamily(
            "hrx_replication_synced_age_seconds",
            "Seconds since this node last found each member's chain current with its author "
            "(+Inf: never).",
            labels=["chain"],
        )
        for member in members:
            if member != own:
                seconds = synced_age(self.store, member)
                age.add_metric([member], float("inf") if seconds is None else seconds)
        yield age

    def _checkpoints(
        self,
        chains: Sequence[str],
        heads: dict[str, tuple[int, int]],
        frozen: set[str],
        now: float,
    ) -> Iterable[Metric]:
        certificate = self.store.certificate()
        certified: dict[str, Any] = {}
        age = GaugeMetricFamily(
            "hrx_checkpoint_age_seconds",
            "Seconds since the time of the newest certified checkpoint (+Inf: none yet).",
        )
        if certificate is None:
            age.add_metric([], float("inf"))
        else:
            checkpoint = certificate["checkpoint"]
            certified = checkpoint["heads"]
            epoch = GaugeMetricFamily(
                "hrx_checkpoint_epoch", "The epoch of the newest certified checkpoint."
            )
            epoch.add_metric([], checkpoint["epoch"])
            yield epoch
            age.add_metric([], max(0.0, now - parse_time(checkpoint["time"]).timestamp()))
        yield age
        uncertified = GaugeMetricFamily(
            "hrx_checkpoint_uncertified_blocks",
            "Blocks held beyond the newest certified checkpoint, over the chains not frozen.",
        )
        waiting = 0
        for chain, (height, _size) in heads.items():
            if chain not in frozen:
                waiting += max(0, height - int(certified.get(chain, {"height": -1})["height"]))
        uncertified.add_metric([], waiting)
        yield uncertified
        behind = GaugeMetricFamily(
            "hrx_replication_certified_blocks_behind",
            "Blocks of each chain that the newest certified checkpoint covers and this node "
            "does not hold yet (a quorum verified them: this node should catch up).",
            labels=["chain"],
        )
        for chain in chains:
            if chain in certified:
                held = heads.get(chain, (-1, 0))[0]
                behind.add_metric([chain], max(0, int(certified[chain]["height"]) - held))
        yield behind

    def _adapters(self) -> Iterator[Metric]:
        """What the adapters took in and refused, from their tables: exact whichever process
        (MLLP listener, import, PACS sync) did the work."""
        stored = CounterMetricFamily(
            "hrx_adapter_messages_stored",
            "HL7 v2 messages stored (each once, however often it was sent), by adapter.",
            labels=["adapter"],
        )
        refused = CounterMetricFamily(
            "hrx_adapter_quarantined",
            "Messages, rows and files an adapter refused and kept in the quarantine.",
            labels=["adapter"],
        )
        open_rows = GaugeMetricFamily(
            "hrx_adapter_quarantine_open",
            "Messages and files an adapter refused and that no replay has stored yet.",
            labels=["adapter"],
        )
        taken = dict.fromkeys(KNOWN_ADAPTERS, 0)
        quarantined = dict.fromkeys(KNOWN_ADAPTERS, 0)
        waiting = dict.fromkeys(KNOWN_ADAPTERS, 0)
        Q, M = quarantine_table, messages_table
        with self.store.engine.connect() as conn:
            for adapter, count in conn.execute(
                sa.select(M.c.adapter, sa.func.count()).group_by(M.c.adapter)
            ):
                taken[str(adapter)] = int(count)
            for adapter, still_open, count in conn.execute(
                sa.select(Q.c.adapter, Q.c.replayed_at.is_(None), sa.func.count()).group_by(
                    Q.c.adapter, Q.c.replayed_at.is_(None)
                )
            ):
                quarantined[str(adapter)] = quarantined.get(str(adapter), 0) + int(count)
                if still_open:
                    waiting[str(adapter)] = int(count)
        for family, counts in ((stored, taken), (refused, quarantined), (open_rows, waiting)):
            for adapter, count in sorted(counts.items()):
                family.add_metric([adapter], count)
            yield family


# -- processes ----------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    """The processes ``pid`` started (Linux; empty when /proc does not say)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(part) for part in text.split()]


class GunicornProcessesCollector(Collector):
    """prometheus-client's ``process_*`` metrics for the gunicorn master and each of its
    workers, told apart by a ``pid`` label (in a worker, its parent is the master)."""

    def collect(self) -> Iterable[Metric]:
        master = os.getppid()
        merged: dict[str, Metric] = {}
        for pid in [master, *_children(master)]:
            collector = ProcessCollector(pid=lambda pid=pid: pid, registry=None)  # type: ignore[misc]
            for family in collector.collect():
                into = merged.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                for sample in family.samples:
                    into.add_sample(sample.name, {**sample.labels, "pid": str(pid)}, sample.value)
        return list(merged.values())


class _Instruments(Collector):
    """This process's own counters (when nothing is shared through files)."""

    def collect(self) -> Iterable[Metric]:
        return _instruments.collect()


def scrape_registry(services: Any) -> CollectorRegistry:
    """What a scrape of this app reports: the counters (every process's, through the files,
    in multiprocess mode), the process basics, and the database's metrics."""
    registry = CollectorRegistry()
    if MULTIPROCESS_DIRECTORY:
        MultiProcessCollector(registry, path=MULTIPROCESS_DIRECTORY)  # type: ignore[no-untyped-call]
        if "gunicorn.arbiter" in sys.modules:  # a gunicorn worker
            registry.register(GunicornProcessesCollector())
        else:
            ProcessCollector(registry=registry)
    else:
        registry.register(_Instruments())
        ProcessCollector(registry=registry)
        GCCollector(registry=registry)
    PlatformCollector(registry=registry)
    registry.register(NodeCollector(services))
    return registry


def clear_dead_process_files(directory: Path) -> list[Path]:
    """Remove the count files of processes that no longer run (gunicorn's master does this
    when it starts): what the previous run counted is gone, what a process that still runs
    beside it (an adapter sharing the directory) counts is kept. The removed files."""
    removed = []
    for path in directory.glob("*.db"):
        pid = path.stem.rsplit("_", 1)[-1]
        if pid.isdigit() and not _running(int(pid)):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
