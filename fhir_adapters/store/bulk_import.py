"""Bulk import: FHIR NDJSON files into the store, validated and indexed as the API would, in
groups of a thousand resources per transaction, restartable after a crash.

Each line is one resource of any hosted type. It keeps its ``id`` (the files' references name
resources by it, so a line without one is refused): a resource not yet stored is created, one
stored with other content gets a new version (an update, as ``PUT`` would), one stored with
the same content is left as it is. A line is refused, with its file, line number and reason,
when it is not JSON, fails validation as the API's create would (the same checks, the same
messages), or refers to a resource that is neither stored nor in the import. References need
not come in order: a resource whose target is not stored yet is *held* (kept in the database)
and stored as soon as the target is; what is still held when every file is read is refused.
Files are read in the order their first lines' types usually refer to each other
(Organizations and Patients before Encounters before Observations...), so that with one
type per file, as Bulk Data exports are written, hardly anything is held.

Two rules of the caller's may refuse more lines: a file declared to hold one type refuses a
line of another (``source_types``), and ``forbidden`` (the caller's write rights) refuses a
line whose type the caller may not create, or update when it is stored already. Such a line
is refused as any other is: reported, kept aside, never stored.

Restartable: every group's transaction also records, per file, how many lines and bytes are
settled (stored, held or refused) and the counts; a job run again with the same id resumes
after the last settled line, and since ids are kept a line read twice is never stored twice.

Parsing, validation and indexing (almost all the CPU) run in ``workers`` processes, the
database work in the caller's; at most ``IN_FLIGHT`` chunks per worker are read ahead, so
memory is bounded whatever the files' size. Cost per resource is constant: nothing grows with
the number of resources already stored or imported but the held lines themselves.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from fhir_adapters.errors import FhirError, Unprocessable
from fhir_adapters.store import jsonio, tables
from fhir_adapters.store.repository import (
    SERVER_META,
    UNSTAMPED,
    IndexBatch,
    ResourceStore,
    Writer,
    insert_first_versions,
    keys_clause,
    local_targets,
    now_micros,
    stamped,
    stored_form,
)
from fhir_adapters.store.resources import validate
from fhir_adapters.store.search_params import IndexRows, index_values

GROUP = 1000  # resources per transaction
NOT_IMPORTED = ("AuditEvent",)
CHUNK = 200  # lines per task sent to a worker
IN_FLIGHT = 4  # chunks per worker read ahead
COLLECT_CHUNKS = 50  # chunks a worker prepares between two garbage collections
COLLECT_GROUPS = 20  # groups the importing process settles between two garbage collections
MAX_LINE = 16 * 1024 * 1024  # bytes of one NDJSON line, at most
# Types other resources usually refer to come first; any other type after these, by name.
TYPE_ORDER = (
    "Organization",
    "Location",
    "Practitioner",
    "PractitionerRole",
    "HealthcareService",
    "Endpoint",
    "Patient",
    "RelatedPerson",
    "Group",
    "Device",
    "Medication",
    "Substance",
    "Specimen",
    "EpisodeOfCare",
    "Encounter",
    "Appointment",
    "ServiceRequest",
    "Condition",
    "Procedure",
    "Observation",
    "ImagingStudy",
    "Media",
    "DiagnosticReport",
)
KEY_SEPARATOR = "/"

WriteRights = Callable[[str, bool], str | None]
"""The caller's write rights, as ``forbidden(resource type, creating)``: None when a line of
that type may be stored (created when ``creating``, else a new version of a stored resource),
else why not. A resource stored but deleted is created again, as ``PUT`` would."""


def nothing_forbidden(resource_type: str, creating: bool) -> str | None:
    """Every hosted type may be written (the node's operator importing on the command line)."""
    return None


@dataclass(frozen=True)
class Prepared:
    """A line that passed validation, in its stored form (as version 1, stored at ``now``)."""

    line: int
    offset: int  # bytes of the file up to the end of this line
    type: str
    id: str
    body: bytes
    rows: IndexRows
    targets: tuple[tuple[str, str], ...]  # the local resources it refers to
    text: bytes

    @property
    def key(self) -> tuple[str, str]:
        return (self.type, self.id)


@dataclass(frozen=True)
class Refused:
    """A line that cannot be stored, and why."""

    line: int
    offset: int
    reason: str
    text: bytes


@dataclass(frozen=True)
class Refusal:
    """A refused line as reported: where it was and why."""

    source: str
    line: int
    reason: str
    text: bytes


@dataclass
class Counts:
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    refused: int = 0
    held: int = 0

    @property
    def settled(self) -> int:
        return self.created + self.updated + self.unchanged + self.refused


@dataclass(frozen=True)
class Progress:
    """Where an import stands: bytes read of all files, and what became of the lines."""

    bytes_done: int
    bytes_total: int
    counts: Counts


def prepare_lines(base_url: str, lines: Sequence[tuple[int, int, bytes | None]]) -> list[Any]:
    """Parse, validate and index lines ``(number, end offset, bytes)``; a worker's task. A line
    of None was too long to read. The body's ``lastUpdated`` is :data:`UNSTAMPED` until the
    transaction that stores it sets it (:func:`stamped`)."""
    prepared: list[Any] = []
    for number, offset, text in lines:
        if text is None:
            reason = f"the line is longer than {MAX_LINE:,} bytes"
            prepared.append(Refused(number, offset, reason, b""))
            continue
        try:
            prepared.append(_prepare(base_url, number, offset, text))
        except FhirError as exc:
            prepared.append(Refused(number, offset, str(exc), text))
    return prepared


def _prepare(base_url: str, number: int, offset: int, text: bytes) -> Prepared:
    resource = validate(jsonio.parse(text, "the line"))
    if resource["resourceType"] in NOT_IMPORTED:
        raise Unprocessable(
            f"{resource['resourceType']} resources are not imported: this server writes its "
            "own audit trail, and an import must not forge it",
            expression="resourceType",
        )
    if not isinstance(resource.get("id"), str):
        raise Unprocessable(
            "a bulk-imported resource must carry its id (other lines refer to it by it)",
            expression="id",
        )
    stored = stored_form(resource, resource["id"], "1", UNSTAMPED)
    targets = tuple(local_targets(stored, base_url))
    rows = index_values(stored, base_url)
    body = jsonio.dump(stored)
    return Prepared(number, offset, stored["resourceType"], stored["id"], body, rows, targets, text)


def _source_rank(path: Path) -> tuple[int, str]:
    """Where a file comes in the reading order, by its first line's resourceType."""
    with path.open("rb") as handle:
        first = handle.readline(4096)
    resource_type = ""
    marker = first.find(b'"resourceType"')
    if marker >= 0:
        rest = first[marker + len(b'"resourceType"') :].lstrip(b" \t:").lstrip()
        if rest.startswith(b'"'):
            resource_type = rest[1 : rest.find(b'"', 1)].decode("utf-8", "replace")
    if resource_type in TYPE_ORDER:
        return (TYPE_ORDER.index(resource_type), resource_type)
    return (len(TYPE_ORDER), resource_type)


def reading_order(sources: Sequence[Path]) -> list[int]:
    """The indexes of ``sources`` in the order they are read."""
    return sorted(range(len(sources)), key=lambda i: (_source_rank(sources[i]), i))


def _lines(handle: BinaryIO, line: int, offset: int) -> Iterator[tuple[int, int, bytes | None]]:
    """``(number, end offset, bytes)`` of every non-blank line after ``line``/``offset``
    (bytes None: a line longer than :data:`MAX_LINE`, skipped)."""
    handle.seek(offset)
    while True:
        text = handle.readline(MAX_LINE + 1)
        if not text:
            return
        line += 1
        offset += len(text)
        if len(text) > MAX_LINE:
            while not text.endswith(b"\n"):
                text = handle.readline(MAX_LINE)
                if not text:
                    break
                offset += len(text)
            yield line, offset, None
            continue
        stripped = text.strip()
        if stripped:
            yield line, offset, stripped


class BulkImport:
    """One import job over ``sources``; :meth:`run` it (again, after a crash, to resume)."""

    def __init__(
        self,
        store: ResourceStore,
        job: str,
        sources: Sequence[Path],
        *,
        workers: int | None = None,
        actor: Any = None,
        progress: Callable[[Progress], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
        source_types: Sequence[str | None] | None = None,
        forbidden: WriteRights = nothing_forbidden,
    ) -> None:
        """``source_types``: per source, the one type its lines must have (None: any);
        ``forbidden``: the caller's write rights (:data:`WriteRights`)."""
        self.store = store
        self.job = job
        self.sources = list(sources)
        self.source_types = list(source_types or [None] * len(self.sources))
        if len(self.source_types) != len(self.sources):
            raise ValueError("one declared type (or None) per source")
        self.forbidden = forbidden
        self.workers = (os.cpu_count() or 1) if workers is None else workers
        self.actor = actor
        self.progress = progress
        self.cancelled = cancelled or (lambda: False)
        self.counts = Counts()
        self._offsets: dict[int, int] = {}
        self._settled: Callable[[], None] = lambda: None  # after each group (garbage collection)
        self._bytes_total = sum(path.stat().st_size for path in self.sources)

    # -- the job -------------------------------------------------------------------------

    def run(self) -> Counts:
        """Read every file from where the job stopped, then settle what was held; the counts
        of the whole job (earlier runs included). Stops early when ``cancelled()``."""
        positions = self._positions()
        self._offsets = {source: offset for source, (_, offset) in positions.items()}
        self.counts = self._counts_so_far()
        self._report()
        pool = preparing_pool(self.workers) if self.workers else None
        try:
            with collecting_rarely(COLLECT_GROUPS) as self._settled:
                for source in reading_order(self.sources):
                    line, offset = positions.get(source, (0, 0))
                    if not self._read(pool, source, line, offset):
                        return self.counts
                self._settle_held()
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
        return self.counts

    def refusals(self) -> Iterator[Refusal]:
        """Every refused line of the job, in file and line order."""
        L = tables.import_lines
        with self.store.engine.connect() as conn:
            rows = conn.execute(
                sa.select(L.c.source, L.c.line, L.c.reason, L.c.text)
                .where(L.c.job == self.job, L.c.state == "refused")
                .order_by(L.c.source, L.c.line)
                .execution_options(yield_per=500)
            )
            for source, line, reason, text in rows:
                yield Refusal(str(self.sources[source]), line, reason, bytes(text))

    def source_counts(self) -> list[Counts]:
        """What became of each source's lines, in the order of :attr:`sources` (earlier runs
        of the job included)."""
        P, L = tables.import_positions, tables.import_lines
        counts = [Counts() for _ in self.sources]
        with self.store.engine.connect() as conn:
            for source, created, updated, unchanged, refused in conn.execute(
                sa.select(P.c.source, P.c.created, P.c.updated, P.c.unchanged, P.c.refused).where(
                    P.c.job == self.job
                )
            ):
                counts[source] = Counts(int(created), int(updated), int(unchanged), int(refused))
            for source, held in conn.execute(
                sa.select(L.c.source, sa.func.count())
                .where(L.c.job == self.job, L.c.state == "held")
                .group_by(L.c.source)
            ):
                counts[source].held = int(held)
        return counts

    # -- reading -------------------------------------------------------------------------

    def _read(self, pool: Any, source: int, line: int, offset: int) -> bool:
        """Read one file from ``line``/``offset``; False when the job was cancelled."""
        base_url = self.store.base_url
        waiting: deque[Any] = deque()
        with self.sources[source].open("rb") as handle:
            chunks = _chunks(_lines(handle, line, offset))
            exhausted = False

            def prepared() -> Iterator[Any]:
                nonlocal exhausted
                while True:
                    while not exhausted and len(waiting) < max(1, self.workers) * IN_FLIGHT:
                        chunk = next(chunks, None)
                        if chunk is None:
                            exhausted = True
                        elif pool is None:
                            waiting.append(_Done(prepare_lines(base_url, chunk)))
                        else:
                            waiting.append(pool.apply_async(prepare_in_worker, (base_url, chunk)))
                    if not waiting:
                        return
                    yield from waiting.popleft().get()

            for group in _groups(prepared()):
                self._settle(source, group)
                if self.cancelled():
                    return False
        return True

    # -- settling ------------------------------------------------------------------------

    def _settle(self, source: int, group: list[Any], *, held: bool = False) -> None:
        """Store, hold or refuse one group of lines of one file in one transaction; ``held``:
        lines held before (the file's position stays where it is)."""
        counts = Counts()
        lines: list[dict[str, Any]] = []
        prepared: list[Prepared] = []
        declared = self.source_types[source]
        for item in group:
            if isinstance(item, Refused):
                lines.append(_line_row(self.job, source, item, "refused", item.reason))
            elif declared is not None and item.type != declared:
                reason = f"the input is declared to hold {declared} resources, not {item.type}"
                lines.append(_line_row(self.job, source, item, "refused", reason))
            else:
                prepared.append(item)
        with self.store.writing(self.actor) as writer:
            ready, waiting = self._resolvable(writer.conn, prepared)
            for item, target in waiting:
                lines.append(_line_row(self.job, source, item, "held", _lacking(target)))
            waiting += self._store(writer, source, ready, counts, lines)
            counts.refused = sum(1 for row in lines if row["state"] == "refused")
            counts.held = len(waiting)
            self._write_lines(writer.conn, source, group if held else [], lines)
            last = group[-1]
            self._advance(writer.conn, source, None if held else (last.line, last.offset), counts)
        for name in ("created", "updated", "unchanged", "refused", "held"):
            setattr(self.counts, name, getattr(self.counts, name) + getattr(counts, name))
        if not held:
            self._offsets[source] = last.offset
        self._report()
        self._settled()

    def _resolvable(
        self, conn: Connection, items: list[Prepared]
    ) -> tuple[list[Prepared], list[tuple[Prepared, tuple[str, str]]]]:
        """The items whose targets are all stored or stored with them, and the rest, each
        with a target it lacks."""
        keys = {item.key for item in items}
        stored = _stored_keys(conn, sorted({t for item in items for t in item.targets} - keys))
        waiting: list[tuple[Prepared, tuple[str, str]]] = []
        while True:
            lacking = []
            for item in items:
                missing = next((t for t in item.targets if t not in keys and t not in stored), None)
                if missing is not None:
                    lacking.append((item, missing))
            if not lacking:
                return items, waiting
            waiting.extend(lacking)
            gone = {item.key for item, _ in lacking}
            items = [item for item in items if item.key not in gone]
            keys -= gone

    def _store(
        self,
        writer: Writer,
        source: int,
        items: list[Prepared],
        counts: Counts,
        lines: list[dict[str, Any]],
    ) -> list[tuple[Prepared, tuple[str, str]]]:
        """Store the group's ready items, in waves so that what an item refers to within the
        group is stored before it; the items held after all (what they refer to was refused
        here), each with that target.

        In each wave, what is new and nobody observes is created with a few statements for
        the whole wave; the rest is written one by one in a savepoint, as the API writes it:
        changed resources (a new version), and the types others observe (Patients,
        Consents), so that an observer refusing one (a Consent the ledger cannot carry)
        refuses that line alone. A line the caller may not write (:attr:`forbidden`) is
        refused first."""
        existing = _existing(writer.conn, [item.key for item in items])
        failed: set[tuple[str, str]] = set()
        allowed: list[Prepared] = []
        for item in items:
            reason = self.forbidden(item.type, existing.get(item.key) is None)
            if reason is None:
                allowed.append(item)
            else:
                lines.append(_line_row(self.job, source, item, "refused", reason))
                failed.add(item.key)
        keys = {item.key for item in allowed}
        done: set[tuple[str, str]] = set()
        held: list[tuple[Prepared, tuple[str, str]]] = []
        pending = allowed
        while pending:
            wave = [i for i in pending if all(t not in keys or t in done for t in i.targets)]
            wave = wave or pending  # references in a circle: all at once
            chosen = {id(item) for item in wave}
            pending = [item for item in pending if id(item) not in chosen]
            batched, singles = [], []
            for item in wave:
                lost = next((t for t in item.targets if t in failed), None)
                if lost is not None:
                    held.append((item, lost))
                    failed.add(item.key)
                    lines.append(_line_row(self.job, source, item, "held", _lacking(lost)))
                elif item.key not in existing and item.type not in writer.store.observers:
                    batched.append(item)
                else:
                    singles.append(item)
            self.create_many(writer.conn, batched)
            counts.created += len(batched)
            done.update(item.key for item in batched)
            for item in singles:
                current = existing.get(item.key)
                if current is not None and _content(current) == _content(item.body):
                    counts.unchanged += 1
                    done.add(item.key)
                    continue
                try:
                    with writer.conn.begin_nested():
                        _, created = writer.update(item.type, item.id, jsonio.parse(item.body))
                except FhirError as exc:
                    lines.append(_line_row(self.job, source, item, "refused", str(exc)))
                    failed.add(item.key)
                    continue
                done.add(item.key)
                if created:
                    counts.created += 1
                else:
                    counts.updated += 1
        return held

    @staticmethod
    def create_many(conn: Connection, items: list[Prepared]) -> None:
        """Create new resources with a handful of statements for them all."""
        if not items:
            return
        now = now_micros()  # in the transaction, as every write's time is taken
        res_pks = insert_first_versions(
            conn, [(i.type, i.id, stamped(i.body, now)) for i in items], now
        )
        batch = IndexBatch()
        for pk, item in zip(res_pks, items, strict=True):
            batch.add(pk, item.type, item.rows)
        batch.insert(conn)

    def _write_lines(
        self, conn: Connection, source: int, settled: list[Any], rows: list[dict[str, Any]]
    ) -> None:
        """Record held and refused lines; the rows of ``settled`` lines held before go."""
        L = tables.import_lines
        gone = [item.line for item in settled]
        for start in range(0, len(gone), 500):
            conn.execute(
                L.delete().where(
                    L.c.job == self.job,
                    L.c.source == source,
                    L.c.line.in_(gone[start : start + 500]),
                )
            )
        if rows:
            conn.execute(L.insert(), rows)

    def _advance(
        self, conn: Connection, source: int, position: tuple[int, int] | None, counts: Counts
    ) -> None:
        """Add ``counts`` to the file's record, and move its position (unless None)."""
        P = tables.import_positions
        where = sa.and_(P.c.job == self.job, P.c.source == source)
        if conn.execute(sa.select(P.c.line).where(where)).first() is None:
            conn.execute(
                P.insert().values(
                    job=self.job,
                    source=source,
                    line=0,
                    offset=0,
                    created=0,
                    updated=0,
                    unchanged=0,
                    refused=0,
                )
            )
        values: dict[str, Any] = {
            "created": P.c.created + counts.created,
            "updated": P.c.updated + counts.updated,
            "unchanged": P.c.unchanged + counts.unchanged,
            "refused": P.c.refused + counts.refused,
        }
        if position is not None:
            values.update(line=position[0], offset=position[1])
        conn.execute(P.update().where(where).values(**values))

    def _settle_held(self) -> None:
        """Store what was held, in rounds, while a round stores something; refuse the rest."""
        L = tables.import_lines
        base_url = self.store.base_url
        while True:
            stored_before = self.counts.created + self.counts.updated + self.counts.unchanged
            for source in range(len(self.sources)):
                after = 0
                while True:
                    with self.store.engine.connect() as conn:
                        rows = conn.execute(
                            sa.select(L.c.line, L.c.text)
                            .where(
                                L.c.job == self.job,
                                L.c.source == source,
                                L.c.state == "held",
                                L.c.line > after,
                            )
                            .order_by(L.c.line)
                            .limit(GROUP)
                        ).all()
                    if not rows:
                        break
                    after = rows[-1][0]
                    lines = [(line, 0, bytes(text)) for line, text in rows]
                    for group in _groups(iter(prepare_lines(base_url, lines))):
                        self.counts.held -= len(group)
                        self._settle(source, group, held=True)
            if self.counts.created + self.counts.updated + self.counts.unchanged == stored_before:
                break
        self._refuse_held()

    def _refuse_held(self) -> None:
        """Refuse every line still held: what it refers to is nowhere."""
        L = tables.import_lines
        with self.store.writing(self.actor) as writer:
            per_source = writer.conn.execute(
                sa.select(L.c.source, sa.func.count())
                .where(L.c.job == self.job, L.c.state == "held")
                .group_by(L.c.source)
            ).all()
            writer.conn.execute(
                L.update()
                .where(L.c.job == self.job, L.c.state == "held")
                .values(state="refused", reason="refers to " + L.c.reason)
            )
            for source, count in per_source:
                self._advance(writer.conn, source, None, Counts(refused=count))
                self.counts.refused += count
        self.counts.held = 0
        self._report()

    # -- the job's record ----------------------------------------------------------------

    def _positions(self) -> dict[int, tuple[int, int]]:
        P = tables.import_positions
        with self.store.engine.connect() as conn:
            rows = conn.execute(
                sa.select(P.c.source, P.c.line, P.c.offset).where(P.c.job == self.job)
            ).all()
        return {source: (line, offset) for source, line, offset in rows}

    def _counts_so_far(self) -> Counts:
        P, L = tables.import_positions, tables.import_lines
        with self.store.engine.connect() as conn:
            sums = conn.execute(
                sa.select(
                    sa.func.coalesce(sa.func.sum(P.c.created), 0),
                    sa.func.coalesce(sa.func.sum(P.c.updated), 0),
                    sa.func.coalesce(sa.func.sum(P.c.unchanged), 0),
                    sa.func.coalesce(sa.func.sum(P.c.refused), 0),
                ).where(P.c.job == self.job)
            ).one()
            held = conn.execute(
                sa.select(sa.func.count()).where(L.c.job == self.job, L.c.state == "held")
            ).scalar_one()
        return Counts(int(sums[0]), int(sums[1]), int(sums[2]), int(sums[3]), int(held))

    def _report(self) -> None:
        if self.progress is not None:
            done = sum(self._offsets.values())
            self.progress(Progress(done, self._bytes_total, self.counts))


def forget_job(store: ResourceStore, job: str) -> None:
    """Delete the record of import ``job``: its positions and its held and refused lines (the
    lines' text is what the files held). What it stored stays stored; run again, the job
    would start from the first line, and lines stored before would come out unchanged."""
    P, L = tables.import_positions, tables.import_lines
    with store.write_engine.begin() as conn:
        conn.execute(L.delete().where(L.c.job == job))
        conn.execute(P.delete().where(P.c.job == job))


@contextmanager
def collecting_rarely(every: int) -> Iterator[Callable[[], None]]:
    """Garbage collection for the length of an import: automatic collection off, and a full
    collection at every ``every``-th call of the function given, after which what survived is
    left out of later collections (:func:`gc.freeze`), so each costs what is new since the
    last. The automatic collector scanned every object the process held again and again as
    prepared lines came and went: about a tenth of an import's CPU. Nothing an import makes
    refers to itself in a cycle; the collections bound what other code in the process (a web
    server's requests) might leave meanwhile. At the end everything is collectable again
    (:func:`gc.unfreeze`) and collected."""
    enabled = gc.isenabled()
    gc.disable()
    calls = 0

    def tick() -> None:
        nonlocal calls
        calls += 1
        if calls % every == 0:
            gc.collect()
            gc.freeze()

    try:
        yield tick
    finally:
        gc.unfreeze()
        gc.collect()
        if enabled:
            gc.enable()


_worker_tick: Callable[[], None] | None = None


def _worker_started() -> None:
    """A worker process's start: it collects garbage every :data:`COLLECT_CHUNKS` chunks."""
    global _worker_tick
    _worker_tick = collecting_rarely(COLLECT_CHUNKS).__enter__()


def preparing_pool(workers: int) -> Any:
    """A pool of ``workers`` processes that prepare lines (:func:`prepare_in_worker`), each
    collecting garbage every :data:`COLLECT_CHUNKS` chunks."""
    return multiprocessing.get_context("spawn").Pool(workers, initializer=_worker_started)


def prepare_in_worker(base_url: str, lines: Sequence[Line]) -> list[Any]:
    """:func:`prepare_lines` as a task of a :func:`preparing_pool`."""
    prepared = prepare_lines(base_url, lines)
    if _worker_tick is not None:
        _worker_tick()
    return prepared


@dataclass(frozen=True)
class _Done:
    """A chunk prepared in this process, shaped like a pool's result."""

    value: list[Any]

    def get(self) -> list[Any]:
        return self.value


Line = tuple[int, int, bytes | None]  # number, end offset, bytes (None: too long)


def _chunks(lines: Iterator[Line]) -> Iterator[list[Line]]:
    chunk: list[Line] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) >= CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _groups(items: Iterator[Any]) -> Iterator[list[Any]]:
    """Lines in groups of at most :data:`GROUP`, a group never holding one id twice."""
    group: list[Any] = []
    keys: set[tuple[str, str]] = set()
    for item in items:
        key = item.key if isinstance(item, Prepared) else None
        if len(group) >= GROUP or (key is not None and key in keys):
            yield group
            group, keys = [], set()
        group.append(item)
        if key is not None:
            keys.add(key)
    if group:
        yield group


def _lacking(target: tuple[str, str]) -> str:
    """Why a line is held (and, once refused, why: "refers to " and this)."""
    return f"{target[0]}/{target[1]}, neither stored nor in the import"


def _line_row(job: str, source: int, item: Any, state: str, reason: str) -> dict[str, Any]:
    text = item.text
    return {
        "job": job,
        "source": source,
        "line": item.line,
        "state": state,
        "reason": reason,
        "text": text,
    }


def _stored_keys(conn: Connection, keys: list[tuple[str, str]]) -> set[tuple[str, str]]:
    R = tables.resources
    found: set[tuple[str, str]] = set()
    for start in range(0, len(keys), 500):
        found.update(
            (row[0], row[1])
            for row in conn.execute(
                sa.select(R.c.type, R.c.id).where(
                    keys_clause(R.c.type, R.c.id, keys[start : start + 500]), R.c.deleted.is_(False)
                )
            )
        )
    return found


def _existing(conn: Connection, keys: list[tuple[str, str]]) -> dict[tuple[str, str], bytes | None]:
    """The stored resources among ``keys``: their current body (None when deleted)."""
    R, V = tables.resources, tables.versions
    found: dict[tuple[str, str], bytes | None] = {}
    for start in range(0, len(keys), 500):
        rows = conn.execute(
            sa.select(R.c.type, R.c.id, V.c.body)
            .select_from(R.join(V, sa.and_(V.c.res_pk == R.c.res_pk, V.c.version == R.c.version)))
            .where(keys_clause(R.c.type, R.c.id, keys[start : start + 500]))
        )
        for resource_type, resource_id, body in rows:
            found[(resource_type, resource_id)] = None if body is None else bytes(body)
    return found


def _content(body: bytes) -> Any:
    """A stored body without what the server sets (version, time)."""
    resource = jsonio.parse(body)
    meta = {k: v for k, v in resource.get("meta", {}).items() if k not in SERVER_META}
    if meta:
        resource["meta"] = meta
    else:
        resource.pop("meta", None)
    return resource
