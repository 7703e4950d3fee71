"""Verification on every core: the chains of a ledger are independent, so worker processes
verify them at once, and the verdict, the first fault and the summary are exactly those of
:func:`ledger.verify.verify_export` and :func:`ledger.verify.verify_database` (serial).

Why the result is the serial one. A block is verified against its own chain's state only (the
blocks of that chain before it) and the rosters, which come before every block and which every
worker holds; the rest of :class:`~ledger.verify.Verifier` (caches of valid times, types and
keys) changes no verdict. So each worker verifies its chains, in file order, with the same code
as serial verification (:func:`~ledger.verify.verify_line`), and reaches the same verdict on
every line up to the first faulty one. Serial verification stops at the first faulty line (in
a database: the first faulty chain in chain order); each worker stops at its first, and the
earliest of those is the serial one, since no line before it is faulty for any worker. What
the serial verifier collects across chains in reading order — break-glass entries, the entries
given to ``observe`` — the workers return tagged with their line (or chain) and the parent
merges in that order. Certificates and evidence, which look at every chain, come after the
blocks and are checked by the parent once it has adopted the workers' chains.

From an export file, the parent first verifies the lines before the first block (the rosters),
then reads the rest once (mapped, never parsed) to find each block line's chain by its text as
hrx writes it (``{"entries":[...],"header":{"chain":"..."``), up to the first line that is not
such a block (the certificates). Each chain goes to one worker, the largest first to the least
loaded; each worker reads only its chains' lines. A line whose header, once parsed, names
another chain than its text (only a line spelled otherwise than hrx writes it can) sends the
whole file to serial verification; so does an export whose blocks are not spelled as hrx
writes them, which is verified in one process. The lines from the first that is not a block
on are verified by the parent, after the workers, as serial verification would.
From a database, workers take chains one at a time from a shared queue.

Scaling: with ``m`` members (chains) and ``n`` entries in all, time is about ``n / jobs`` times
the serial time per entry once ``m`` is well above ``jobs`` (a chain is never split, so one
chain as large as all the others together bounds it), plus the scan of the file (about
memchr's speed, a few percent) and a fork per worker. Memory: each worker holds one block at a
time, as serial verification does, and the chains' states (a block hash per block); the
parent holds one (start, end) run of lines per stretch of consecutive lines of one chain —
one per chain in an export hrx writes — and, when ``observe`` is given, the observed entries
until the workers are done (:class:`exchange.decision_replay.DecisionReplay` keeps them all
anyway). Worker processes are forked (Linux): they inherit the rosters and the mapped file.
"""

from __future__ import annotations

import heapq
import mmap
import multiprocessing
import os
import pickle
import queue
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.context import ForkContext
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ledger.errors import LedgerError, VerificationError
from ledger.model import CHAIN_ID
from ledger.store import ChainStore
from ledger.verify import (
    Emergency,
    Misrouted,
    Progress,
    Summary,
    Verifier,
    _collector_paused,
    _hold_to,
    database_verifier,
    finish_database,
    verify_chain_rows,
    verify_database,
    verify_export,
    verify_line,
)

NO_FAULT = sys.maxsize
PROGRESS_EVERY = 20_000  # entries a worker verifies between two reports of progress

# A block line as hrx writes it: canonical JSON, whose members come sorted.
_BLOCK_START = b'{"entries":['
_HEADER_CHAIN = b'],"header":{"chain":"'
_NEWLINE = ord("\n")


def available_cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass
class _Outcome:
    """What a worker found: the first fault (its line in an export, its chain's index in a
    database) or a misrouted line, the chains it verified, and what it collected, tagged with
    where it was found."""

    fault: tuple[int, BaseException] | None = None
    misrouted: int = NO_FAULT
    chains: list[tuple[int, str, Any]] = field(default_factory=list)  # (where, chain, state)
    emergencies: list[tuple[int, Emergency]] = field(default_factory=list)
    observed: list[tuple[int, dict[str, Any]]] = field(default_factory=list)


class _Collecting:
    """A worker's verifier and what it collects, each tagged with ``self.at`` (the line or
    chain being verified)."""

    def __init__(self, verifier: Verifier) -> None:
        self.at = 0
        self.outcome = _Outcome()
        self.verifier = verifier.for_chains(self._observe)

    def _observe(self, entry: dict[str, Any]) -> None:
        self.outcome.observed.append((self.at, entry))

    def tag_emergencies(self) -> None:
        emergencies = self.verifier.summary.emergencies
        self.outcome.emergencies.extend((self.at, e) for e in emergencies)
        emergencies.clear()


class _Reporter:
    """Progress from a worker, sent a batch of entries at a time."""

    def __init__(self, results: Any) -> None:
        self.results = results
        self.pending = 0

    def __call__(self, entries: int) -> None:
        self.pending += entries
        if self.pending >= PROGRESS_EVERY:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.results.put(("progress", self.pending))
            self.pending = 0


def _lower(stop: Any, where: int) -> None:
    """Tell every worker that nothing after ``where`` matters any more."""
    with stop.get_lock():
        stop.value = min(stop.value, where)


# -- export files -----------------------------------------------------------------------------


def _lines(mapped: mmap.mmap, start: int, end: int, number: int) -> Iterator[tuple[int, int, int]]:
    """``(number, start, end)`` of each line in ``[start, end)``, the first numbered
    ``number``; a line's end includes its newline, as a file's lines do."""
    while start < end:
        newline = mapped.find(b"\n", start, end)
        stop = end if newline < 0 else newline + 1
        yield number, start, stop
        start, number = stop, number + 1


def _routed_chain(mapped: mmap.mmap, start: int, end: int) -> str | None:
    """The chain a block line names, read from its text as hrx writes it; None for any other
    line. Only a route: the worker checks it against the parsed header."""
    if mapped[start : start + len(_BLOCK_START)] != _BLOCK_START:
        return None
    at = mapped.rfind(_HEADER_CHAIN, start, end)
    if at < 0:
        return None
    first = at + len(_HEADER_CHAIN)
    close = mapped.find(b'"', first, end)
    chain = mapped[first:close].decode("ascii", "replace") if close > 0 else ""
    return chain if CHAIN_ID.fullmatch(chain) else None


@dataclass
class _Runs:
    """The block lines of the parallel part of an export, by chain: runs of consecutive lines
    ``(first number, start, end)``, and where the part ends."""

    by_chain: dict[str, list[tuple[int, int, int]]] = field(default_factory=dict)
    size: dict[str, int] = field(default_factory=dict)
    end: tuple[int, int] | None = None  # (number, start) of the first line after the part


def _scan(mapped: mmap.mmap, number: int, start: int) -> _Runs:
    """Route every line from ``start`` on, up to the first that is neither a routed block nor
    blank."""
    runs = _Runs()
    previous = ""
    for at, begin, end in _lines(mapped, start, len(mapped), number):
        chain = _routed_chain(mapped, begin, end)
        if chain is None:
            if mapped[begin:end].strip():
                runs.end = (at, begin)
                return runs
            continue
        chain_runs = runs.by_chain.setdefault(chain, [])
        if chain == previous and chain_runs[-1][2] == begin:
            chain_runs[-1] = (chain_runs[-1][0], chain_runs[-1][1], end)
        else:
            chain_runs.append((at, begin, end))
        runs.size[chain] = runs.size.get(chain, 0) + end - begin
        previous = chain
    return runs


def _assign(runs: _Runs, jobs: int) -> list[list[tuple[str, int, int, int]]]:
    """Each chain to one of ``jobs`` workers, the largest first to the least loaded; each
    worker's runs in file order, ``(chain, first number, start, end)``."""
    loads: list[tuple[int, int]] = [(0, worker) for worker in range(jobs)]
    work: list[list[tuple[str, int, int, int]]] = [[] for _ in range(jobs)]
    for chain in sorted(runs.size, key=lambda c: (-runs.size[c], c)):
        load, worker = heapq.heappop(loads)
        work[worker].extend((chain, *run) for run in runs.by_chain[chain])
        heapq.heappush(loads, (load + runs.size[chain], worker))
    for assigned in work:
        assigned.sort(key=lambda run: run[1])
    return work


def _export_worker(
    verifier: Verifier,
    path: Path,
    mapped: mmap.mmap,
    runs: list[tuple[str, int, int, int]],
    results: Any,
    stop: Any,
) -> _Outcome:
    """Verify ``runs`` in file order, until the first fault (or a line after the first fault
    any worker found)."""
    collecting = _Collecting(verifier)
    reporter = _Reporter(results)
    firsts: dict[str, int] = {}
    lines = (
        (chain, line)
        for chain, number, start, end in runs
        for line in _lines(mapped, start, end, number)
    )
    try:
        for chain, (number, start, end) in lines:
            if number > stop.value:
                break
            firsts.setdefault(chain, number)
            collecting.at = number
            # (without its newline: the line is not copied again to strip it)
            stop_at = end - 1 if mapped[end - 1] == _NEWLINE else end
            verify_line(collecting.verifier, path, number, mapped[start:stop_at], reporter, chain)
            collecting.tag_emergencies()
    except Misrouted as exc:
        collecting.outcome.misrouted = exc.number
        _lower(stop, exc.number)
    except Exception as exc:  # the serial verification would raise it at this line
        collecting.outcome.fault = (collecting.at, exc)
        _lower(stop, collecting.at)
    finally:
        reporter.flush()
    collecting.outcome.chains = [
        (firsts[chain], chain, state) for chain, state in collecting.verifier.chain_states().items()
    ]
    return collecting.outcome


def _serially(
    verifier: Verifier,
    path: Path,
    mapped: mmap.mmap,
    number: int,
    start: int,
    progress: Progress | None,
) -> tuple[int, int] | None:
    """Verify the lines from line ``number`` (at ``start``) on, one after another, up to the
    first block line hrx wrote while no chain is verified yet; return where that line is."""
    for at, begin, end in _lines(mapped, start, len(mapped), number):
        if not verifier.summary.chains and _routed_chain(mapped, begin, end):
            return at, begin
        verify_line(verifier, path, at, mapped[begin:end], progress)
    return None


def _mapped(path: Path) -> mmap.mmap | None:
    """The file mapped for reading; None when it cannot be (missing, empty, not a file)."""
    try:
        with path.open("rb") as handle:
            return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None


def verify_export_in_parallel(
    path: Path,
    authority: Ed25519PublicKey | None,
    progress: Progress | None = None,
    *,
    jobs: int,
    given: Any = (),
    **watching: Any,
) -> Summary:
    """:func:`~ledger.verify.verify_export` with the chains verified by up to ``jobs``
    worker processes; the same summary, or the same first fault."""
    context = _fork_context()
    mapped = _mapped(path) if jobs > 1 and context is not None else None
    if context is None or mapped is None:  # one process, or no file to map: the serial verdict
        return verify_export(path, authority, progress, given=given, **watching)
    verifier = Verifier(authority, **watching)
    with mapped, _collector_paused():
        blocks = _serially(verifier, path, mapped, 1, 0, progress)
        if blocks is not None:  # the blocks, each chain in a worker
            runs = _scan(mapped, *blocks)
            workers = _assign(runs, min(jobs, len(runs.by_chain)))
            targets = [(_export_worker, (verifier, path, mapped, work)) for work in workers]
            outcomes = _run(context, targets, progress)
            if _misrouted_first(outcomes):  # verify it all in one process
                return verify_export(path, authority, progress, given=given, **watching)
            _adopt(verifier, outcomes, watching.get("observe"))
            if runs.end is not None:  # then what follows the blocks, in this process
                number, start = runs.end
                for at, begin, end in _lines(mapped, start, len(mapped), number):
                    verify_line(verifier, path, at, mapped[begin:end], progress)
    if not verifier.rosters:
        raise VerificationError(f"{path} holds no roster")
    _hold_to(verifier, given)
    return verifier.finish()


# -- databases --------------------------------------------------------------------------------


def _database_worker(
    verifier: Verifier,
    store: ChainStore,
    chains: list[str],
    taken: Any,
    results: Any,
    stop: Any,
) -> _Outcome:
    """Verify chains one at a time, each the next one no worker took yet (``taken`` counts
    them), until none is left or the next comes after the first faulty chain any worker
    found."""
    store.engine.dispose(close=False)  # the parent's connections are the parent's
    collecting = _Collecting(verifier)
    reporter = _Reporter(results)
    try:
        while True:
            with taken.get_lock():
                index = taken.value
                taken.value += 1
            if index >= len(chains) or index > stop.value:
                break
            collecting.at = index
            verify_chain_rows(collecting.verifier, store, chains[index], reporter)
            collecting.tag_emergencies()
            states = collecting.verifier.chain_states()
            collecting.outcome.chains.append((index, chains[index], states[chains[index]]))
    except Exception as exc:  # the serial verification would raise it in this chain
        collecting.outcome.fault = (collecting.at, exc)
        _lower(stop, collecting.at)
    finally:
        reporter.flush()
    return collecting.outcome


def verify_database_in_parallel(
    store: ChainStore,
    authority: Ed25519PublicKey | None,
    progress: Progress | None = None,
    *,
    jobs: int,
    given: Any = (),
    **watching: Any,
) -> Summary:
    """:func:`~ledger.verify.verify_database` with the chains verified by up to ``jobs``
    worker processes; the same summary, or the same first fault."""
    context = _fork_context()
    if jobs < 2 or context is None:
        return verify_database(store, authority, progress, given=given, **watching)
    verifier = database_verifier(store, authority, **watching)
    with _collector_paused():
        chains = store.chains()
        taken = context.Value("q", 0)
        worker = (_database_worker, (verifier, store, chains, taken))
        outcomes = _run(context, [worker] * min(jobs, len(chains)), progress)
        _misrouted_first(outcomes)  # raises the first fault (rows have no lines to misroute)
        _adopt(verifier, outcomes, watching.get("observe"))
    return finish_database(verifier, store, given)


# -- workers ----------------------------------------------------------------------------------


def _fork_context() -> ForkContext | None:
    """Workers are forked: they inherit the rosters, the mapped file and the store. Where
    processes cannot fork, verification stays in this process."""
    try:
        return multiprocessing.get_context("fork")
    except ValueError:  # pragma: no cover - not on Linux
        return None


def _serve(target: Callable[..., _Outcome], args: tuple[Any, ...], results: Any, stop: Any) -> None:
    """A worker process: run ``target`` and send its outcome, pickled here so that an outcome
    that cannot be sent says so."""
    try:
        results.put(("done", pickle.dumps(target(*args, results, stop))))
    except BaseException as exc:
        results.put(("crashed", f"{type(exc).__name__}: {exc}"))


def _run(
    context: ForkContext,
    targets: list[tuple[Callable[..., _Outcome], tuple[Any, ...]]],
    progress: Progress | None,
) -> list[_Outcome]:
    """Run each target in a worker process of its own, passing on their progress, and return
    their outcomes."""
    results = context.Queue()
    stop = context.Value("q", NO_FAULT)
    processes: list[BaseProcess] = [
        context.Process(target=_serve, args=(target, args, results, stop), daemon=True)
        for target, args in targets
    ]
    for process in processes:
        process.start()
    outcomes: list[_Outcome] = []
    try:
        while len(outcomes) < len(processes):
            try:
                kind, value = results.get(timeout=1)
            except queue.Empty:
                if all(process.exitcode is not None for process in processes):
                    raise LedgerError("a verifying process ended without an answer") from None
                continue
            if kind == "progress":
                if progress:
                    progress(value)
            elif kind == "done":
                outcomes.append(pickle.loads(value))
            else:
                raise LedgerError(f"a verifying process failed: {value}")
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():  # a worker that hangs
                process.kill()
    return outcomes


def _misrouted_first(outcomes: list[_Outcome]) -> bool:
    """Raise the first fault, as serial verification would; True when a misrouted line comes
    before every fault (the outcomes then say nothing of the lines after it)."""
    faults = [outcome.fault for outcome in outcomes if outcome.fault is not None]
    misrouted = min(outcome.misrouted for outcome in outcomes)
    first = min(faults, key=lambda fault: fault[0], default=(NO_FAULT, None))
    if first[1] is not None and first[0] < misrouted:
        raise first[1]
    return misrouted != NO_FAULT


def _adopt(
    verifier: Verifier,
    outcomes: list[_Outcome],
    observe: Callable[[dict[str, Any]], None] | None,
) -> None:
    """Take the workers' chains, break-glass entries and observed entries, in the order serial
    verification meets them."""

    def where(item: tuple[int, Any]) -> int:
        return item[0]

    chains = sorted((c for o in outcomes for c in o.chains), key=lambda c: c[0])
    emergencies = heapq.merge(*(o.emergencies for o in outcomes), key=where)
    verifier.adopt(((chain, state) for _, chain, state in chains), [e for _, e in emergencies])
    if observe is not None:
        for _, entry in heapq.merge(*(o.observed for o in outcomes), key=where):
            observe(entry)
