"""The FHIR resource store: versioned writes with their index rows, reads, and history.

Every write runs in one database transaction that also updates the search indexes, so a
search never sees half a write. Writers of one database never race: on SQLite every write
transaction takes the write lock up front (``BEGIN IMMEDIATE``), on PostgreSQL the resource
row is locked (``SELECT ... FOR UPDATE``) and a conditional create takes an advisory lock on
its condition. Version ids count from 1; a delete is a version with no body.

References are kept whole: a local reference must point to a hosted resource that exists
(422 otherwise), and a resource that others reference cannot be deleted (409). AuditEvents
record history, so their references neither need to resolve nor hold anything in place.
"""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from fhir_adapters.errors import (
    Conflict,
    Gone,
    InvalidRequest,
    NotFound,
    PreconditionFailed,
    Unprocessable,
)
from fhir_adapters.store import jsonio, tables
from fhir_adapters.store.group_commit import GroupCommit
from fhir_adapters.store.resources import RESOURCE_TYPES, check_id, check_type, references, validate
from fhir_adapters.store.search import (
    DEFAULT_COUNT,
    Access,
    Matches,
    SearchRequest,
    match_query,
    match_query_across,
    page,
    paginate,
)
from fhir_adapters.store.search_params import IndexRows, index_values, parse_reference
from fhir_adapters.store.subsetting import Subsetting

log = logging.getLogger(__name__)

R = tables.resources

SERVER_META = ("versionId", "lastUpdated")


def now_micros() -> int:
    """Now, in whole milliseconds (FHIR instants here carry milliseconds), as µs."""
    moment = datetime.now(UTC)
    return int(moment.timestamp() * 1000) * 1000


@lru_cache(maxsize=64)  # a batch stamps many bodies with one time
def format_instant(micros: int) -> str:
    moment = datetime.fromtimestamp(micros / 1_000_000, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def http_date(micros: int) -> str:
    moment = datetime.fromtimestamp(micros // 1_000_000, UTC)
    return moment.strftime("%a, %d %b %Y %H:%M:%S GMT")


@dataclass(frozen=True)
class Stored:
    """One stored version of a resource."""

    type: str
    id: str
    version: int
    last_updated: int  # µs since the epoch
    body: bytes | None  # None for the version that deleted the resource
    method: str = "PUT"
    # the patients whose compartments it is in, when the read that found it knew them
    patients: frozenset[str] | None = field(default=None, compare=False)
    res_pk: int | None = field(default=None, compare=False)  # its row, when known

    @property
    def etag(self) -> str:
        return f'W/"{self.version}"'

    @property
    def location(self) -> str:
        return f"{self.type}/{self.id}/_history/{self.version}"

    @property
    def deleted(self) -> bool:
        return self.body is None

    def sha256(self) -> str:
        """The hash that stands for this version on the ledger."""
        return hashlib.sha256(self.body or b"").hexdigest()

    def resource(self) -> dict[str, Any]:
        if self.body is None:
            raise Gone(f"{self.type}/{self.id} was deleted")
        parsed: dict[str, Any] = jsonio.parse(self.body)
        return parsed


WriteObserver = Callable[["Writer", Stored | None, Stored], None]


def parse_etag(value: str) -> int:
    """The version an ``If-Match`` value names: ``W/"3"`` or ``"3"`` or ``3``."""
    text = value.strip()
    if text.startswith("W/"):
        text = text[2:]
    text = text.strip('"')
    if not re.fullmatch(r"[0-9]{1,9}", text):
        raise InvalidRequest(f'If-Match {value[:40]!r} is not a version ETag such as W/"3"')
    return int(text)


class ResourceStore:
    """The resources of one database. ``base_url`` is this server's FHIR base (references
    written with it are local references)."""

    def __init__(self, engine: Engine, write_engine: Engine, base_url: str = "") -> None:
        self.engine = engine
        self.write_engine = write_engine
        self.base_url = base_url.rstrip("/")
        self.observers: dict[str, list[WriteObserver]] = {}
        self.group_commit = GroupCommit(write_engine)

    def observe(self, resource_type: str, observer: WriteObserver) -> None:
        """Call ``observer(writer, before, after)`` inside every write transaction that
        creates, updates or deletes a ``resource_type``, once the new version is written:
        ``before`` is the version it replaces (None on create), ``after`` the new one (its
        body None for a delete). Raising undoes the whole transaction."""
        self.observers.setdefault(resource_type, []).append(observer)

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    # -- reads --------------------------------------------------------------------------

    def read(self, resource_type: str, resource_id: str, conn: Connection | None = None) -> Stored:
        """The current version; NotFound, or Gone when its current version is a delete."""
        stored = self.current(resource_type, resource_id, conn)
        if stored.deleted:
            raise Gone(f"{resource_type}/{resource_id} was deleted")
        return stored

    def current(
        self, resource_type: str, resource_id: str, conn: Connection | None = None
    ) -> Stored:
        """The current version, a delete included (its body None); NotFound when unknown."""
        check_type(resource_type)
        check_id(resource_id)
        with _connection(self.engine, conn) as c:
            row = c.execute(_CURRENT, {"type": resource_type, "id": resource_id}).first()
            if row is None:
                raise NotFound(f"{resource_type}/{resource_id} is not known")
            if row[5] > 1:
                patients = frozenset(
                    r[0]
                    for r in c.execute(
                        sa.select(tables.compartment.c.patient_id).where(
                            tables.compartment.c.res_pk == row[6]
                        )
                    )
                )
            else:
                patients = frozenset(filter(None, [row[4]]))
        return Stored(resource_type, resource_id, row[0], row[1], row[2], row[3], patients, row[6])

    def vread(self, resource_type: str, resource_id: str, version: int) -> Stored:
        check_type(resource_type)
        check_id(resource_id)
        query = (
            sa.select(
                tables.versions.c.last_updated, tables.versions.c.body, tables.versions.c.method
            )
            .select_from(
                tables.resources.join(
                    tables.versions, tables.versions.c.res_pk == tables.resources.c.res_pk
                )
            )
            .where(
                tables.resources.c.type == resource_type,
                tables.resources.c.id == resource_id,
                tables.versions.c.version == version,
            )
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None:
            raise NotFound(f"{resource_type}/{resource_id} has no version {version}")
        stored = Stored(resource_type, resource_id, version, row[0], row[1], row[2])
        if stored.deleted:
            raise Gone(f"version {version} of {resource_type}/{resource_id} is its deletion")
        return stored

    def versions_of(self, res_pks_versions: list[tuple[int, int]]) -> list[Stored]:
        """The stored versions named by (res_pk, version) pairs, in the order given."""
        if not res_pks_versions:
            return []
        found: dict[tuple[int, int], Stored] = {}
        for start in range(0, len(res_pks_versions), 500):
            chunk = res_pks_versions[start : start + 500]
            query = (
                sa.select(
                    tables.versions.c.res_pk,
                    tables.versions.c.version,
                    tables.resources.c.type,
                    tables.resources.c.id,
                    tables.versions.c.last_updated,
                    tables.versions.c.body,
                    tables.versions.c.method,
                )
                .select_from(
                    tables.versions.join(
                        tables.resources, tables.resources.c.res_pk == tables.versions.c.res_pk
                    )
                )
                .where(
                    tables.versions.c.res_pk.in_(sorted({pk for pk, _ in chunk})),
                    tables.versions.c.version.in_(sorted({v for _, v in chunk})),
                )
            )
            wanted = set(chunk)
            with self.engine.connect() as conn:
                for row in conn.execute(query):
                    if (row[0], row[1]) in wanted:
                        found[(row[0], row[1])] = Stored(
                            row[2], row[3], row[1], row[4], row[5], row[6], res_pk=row[0]
                        )
        return [found[key] for key in res_pks_versions if key in found]

    def patients_by_item(self, items: list[Stored]) -> dict[tuple[str, str], frozenset[str]]:
        """The patients in whose compartments each of these resources is (its current
        version's index), by (type, id)."""
        found: dict[tuple[str, str], set[str]] = {}
        unknown = []
        for item in items:
            if item.patients is not None:
                found[(item.type, item.id)] = set(item.patients)
            else:
                found[(item.type, item.id)] = set()
                unknown.append(item)
        keys = sorted({(item.type, item.id) for item in unknown})
        C = tables.compartment
        with self.engine.connect() as conn:
            for start in range(0, len(keys), 500):
                rows = conn.execute(
                    sa.select(R.c.type, R.c.id, C.c.patient_id)
                    .select_from(C.join(R, R.c.res_pk == C.c.res_pk))
                    .where(keys_clause(R.c.type, R.c.id, keys[start : start + 500]))
                )
                for resource_type, resource_id, patient in rows:
                    found[(resource_type, resource_id)].add(patient)
        return {key: frozenset(value) for key, value in found.items()}

    # -- search, history, $everything -----------------------------------------------------

    def search(self, request: SearchRequest, access: Access, owner: str) -> Matches:
        """The first page of a search (see :mod:`fhir_adapters.store.search`)."""
        with self.engine.connect() as conn:
            pairs = [
                (row[0], row[1])
                for row in conn.execute(match_query(request, access, self.base_url)).all()
            ]
            return paginate(
                self.write_engine,
                pairs,
                request.count,
                owner,
                "search",
                {
                    "type": request.resource_type,
                    "query": request.query_string(),
                    **_includes_of([request]),
                    "total": request.total,
                    **_subsetting_of(request.subsetting),
                },
            )

    def search_types(self, requests: list[SearchRequest], access: Access, owner: str) -> Matches:
        """The first page of a search across types (``_type``): with a ``_sort``, every match
        in that order; without, each type's matches, the types in the order given. Every
        request has the same count, sort, total and subsetting; the includes of each apply to
        its type's matches."""
        first = requests[0]
        with self.engine.connect() as conn:
            if first.sort:
                query = match_query_across(requests, access, self.base_url)
                pairs = [(row[0], row[1]) for row in conn.execute(query).all()]
            else:
                pairs = [
                    (row[0], row[1])
                    for request in requests
                    for row in conn.execute(match_query(request, access, self.base_url)).all()
                ]
        return paginate(
            self.write_engine,
            pairs,
            first.count,
            owner,
            "search",
            {
                "type": None,
                "types": [r.resource_type for r in requests],
                "query": first.query_string(),
                **_includes_of(requests),
                "total": first.total,
                **_subsetting_of(first.subsetting),
            },
        )

    def page(self, set_id: str, offset: int, count: int, owner: str) -> Matches:
        with self.engine.connect() as conn:
            return page(conn, set_id, offset, count, owner)

    def count_matches(
        self, request: SearchRequest, access: Access, limit: int, conn: Connection | None = None
    ) -> list[int]:
        """Up to ``limit`` matching res_pks (conditional create)."""
        with _connection(self.engine, conn) as c:
            return [
                row[0]
                for row in c.execute(match_query(request, access, self.base_url, limit=limit))
            ]

    def by_pk(self, res_pk: int, conn: Connection | None = None) -> Stored:
        """The current version of the resource with this row key."""
        with _connection(self.engine, conn) as c:
            row = c.execute(sa.select(R.c.type, R.c.id).where(R.c.res_pk == res_pk)).one()
        return self.read(row[0], row[1], conn)

    def included(
        self, page_items: list[Stored], request: dict[str, Any], access: Access
    ) -> list[Stored]:
        """What ``_include`` and ``_revinclude`` add to a page (current versions, filtered by
        access, none twice and none already on the page); those marked ``:iterate`` applied
        again to what they add, at most :data:`ITERATE_ROUNDS` times and until
        :data:`MOST_INCLUDED` resources."""
        if not page_items or not (request.get("includes") or request.get("revincludes")):
            return []
        keys = {(item.type, item.id) for item in page_items}
        with self.engine.connect() as conn:
            pks = {item.res_pk for item in page_items if item.res_pk is not None}
            if len(pks) < len(keys):  # a page's versions know their rows; else look up
                pks = {
                    row[0]
                    for row in conn.execute(
                        sa.select(R.c.res_pk).where(keys_clause(R.c.type, R.c.id, keys))
                    )
                }
            includes = list(request.get("includes", []))
            revincludes = list(request.get("revincludes", []))
            iterating = set(request.get("iterate", []))
            seen, found = set(pks), list[tuple[int, int]]()
            frontier_pks, frontier_keys = pks, keys
            for _ in range(ITERATE_ROUNDS):
                rows = self._included_once(
                    conn, frontier_pks, frontier_keys, includes, revincludes, seen, access
                )
                rows = rows[: MOST_INCLUDED - len(found)]
                found.extend((row[0], row[1]) for row in rows)
                seen.update(row[0] for row in rows)
                includes = [i for i in includes if f"i:{i}" in iterating]
                revincludes = [i for i in revincludes if f"r:{i}" in iterating]
                if not rows or not (includes or revincludes) or len(found) >= MOST_INCLUDED:
                    break
                frontier_pks = {row[0] for row in rows}
                frontier_keys = {(row[2], row[3]) for row in rows}
        return self.versions_of(sorted(found))

    @staticmethod
    def _included_once(
        conn: Connection,
        pks: set[int],
        keys: set[tuple[str, str]],
        includes: list[str],
        revincludes: list[str],
        seen: set[int],
        access: Access,
    ) -> list[Any]:
        """(res_pk, version, type, id) of what the includes reach from the resources ``pks``
        (``keys`` their types and ids), none of ``seen``."""
        ref = tables.references
        wanted: list[Any] = []
        for text in includes:
            source, param, *target = text.split(":")
            query = sa.select(ref.c.target_type, ref.c.target_id).where(
                ref.c.res_pk.in_(sorted(pks)), ref.c.type == source, ref.c.param == param
            )
            if target:
                query = query.where(ref.c.target_type == target[0])
            targets = sorted({(row[0], row[1]) for row in conn.execute(query)} - keys)
            if targets:
                wanted.append(keys_clause(R.c.type, R.c.id, targets))
        for text in revincludes:
            source, param, *target = text.split(":")
            pointed = sorted(key for key in keys if not target or key[0] == target[0])
            if pointed:
                wanted.append(
                    R.c.res_pk.in_(
                        sa.select(ref.c.res_pk).where(
                            ref.c.type == source,
                            ref.c.param == param,
                            keys_clause(ref.c.target_type, ref.c.target_id, pointed),
                        )
                    )
                )
        if not wanted:
            return []
        conditions = [sa.or_(*wanted), R.c.deleted.is_(False), R.c.res_pk.not_in(sorted(seen))]
        restriction = access.clause(R.c.res_pk)
        if restriction is not None:
            conditions.append(restriction)
        return list(
            conn.execute(
                sa.select(R.c.res_pk, R.c.version, R.c.type, R.c.id)
                .where(*conditions)
                .order_by(R.c.res_pk)
            )
        )

    def history(
        self,
        resource_type: str | None,
        resource_id: str | None,
        access: Access,
        owner: str,
        *,
        since: int | None = None,
        count: int = DEFAULT_COUNT,
        types: Sequence[str] = (),
        at: tuple[int, int] | None = None,
        subsetting: Subsetting | None = None,
    ) -> Matches:
        """Versions newest first: of one resource, of every resource of a type, or (no type)
        of every resource of ``types``."""
        V = tables.versions
        conditions: list[Any] = []
        if resource_type is not None:
            check_type(resource_type)
            conditions.append(V.c.type == resource_type)
        else:
            conditions.append(V.c.type.in_([check_type(t) for t in types]))
        if resource_id is not None:
            assert resource_type is not None
            current = self.current(resource_type, resource_id)  # NotFound when unknown
            del current
            conditions.append(
                V.c.res_pk
                == sa.select(R.c.res_pk)
                .where(R.c.type == resource_type, R.c.id == resource_id)
                .scalar_subquery()
            )
        if since is not None:
            conditions.append(V.c.last_updated >= since)
        if at is not None:  # current at some moment of [low, high): began before its end and
            # was not replaced before its start
            later = tables.versions.alias()
            conditions.append(V.c.last_updated < at[1])
            conditions.append(
                ~sa.exists().where(
                    later.c.res_pk == V.c.res_pk,
                    later.c.version == V.c.version + 1,
                    later.c.last_updated <= at[0],
                )
            )
        restriction = access.clause(V.c.res_pk)
        if restriction is not None:
            conditions.append(restriction)
        with self.engine.connect() as conn:
            pairs = [
                (row[0], row[1])
                for row in conn.execute(
                    sa.select(V.c.res_pk, V.c.version)
                    .where(*conditions)
                    .order_by(V.c.last_updated.desc(), V.c.res_pk.desc(), V.c.version.desc())
                )
            ]
            if not access.unrestricted:
                pairs = self._versions_in_compartment(pairs, access)
            return paginate(
                self.write_engine,
                pairs,
                count,
                owner,
                "history",
                {
                    "type": resource_type,
                    "id": resource_id,
                    "since": since,
                    **_subsetting_of(subsetting),
                },
            )

    def _versions_in_compartment(
        self, pairs: list[tuple[int, int]], access: Access
    ) -> list[tuple[int, int]]:
        """Only the versions that were themselves in an allowed compartment (a resource that
        moved between patients shows neither its old versions to the new patient nor the
        reverse)."""
        assert access.patients is not None
        kept = []
        for stored, pair in zip(self.versions_of(pairs), pairs, strict=True):
            if stored.body is None:
                kept.append(pair)
                continue
            resource = stored.resource()
            if index_values(resource, self.base_url).compartment & access.patients:
                kept.append(pair)
        return kept

    def in_compartments(
        self, patient_ids: Collection[str], resource_types: Collection[str]
    ) -> list[Stored]:
        """The current versions of every resource of ``resource_types`` in the compartment of
        any of ``patient_ids`` (what a member releases about them), by type and age.

        A version holding a number JSON clients cannot read (stored before such numbers were
        refused) is left out, with a log line naming its row: sent to another member, it would
        make the whole answer unreadable there."""
        if not patient_ids:
            return []
        C = tables.compartment
        query = (
            sa.select(R.c.res_pk, R.c.version)
            .where(
                R.c.deleted.is_(False),
                R.c.type.in_(list(resource_types)),
                R.c.res_pk.in_(sa.select(C.c.res_pk).where(C.c.patient_id.in_(list(patient_ids)))),
            )
            .order_by(R.c.type, R.c.res_pk)
        )
        with self.engine.connect() as conn:
            pairs = [(row[0], row[1]) for row in conn.execute(query)]
        return readable_only(self.versions_of(pairs), "released to another member")

    def everything(
        self,
        patient_id: str,
        access: Access,
        owner: str,
        count: int,
        subsetting: Subsetting | None = None,
    ) -> Matches:
        """``Patient/{id}/$everything``: the patient, every resource in the patient's
        compartment, and the practitioners and organizations they reference."""
        self.read("Patient", patient_id)
        C = tables.compartment
        in_compartment = sa.select(C.c.res_pk).where(C.c.patient_id == patient_id)
        L = tables.links
        referenced = (
            sa.select(R.c.res_pk)
            .select_from(L.join(R, sa.and_(R.c.type == L.c.target_type, R.c.id == L.c.target_id)))
            .where(
                L.c.res_pk.in_(in_compartment),
                L.c.target_type.in_(("Practitioner", "Organization")),
            )
        )
        conditions = [
            R.c.deleted.is_(False),
            sa.or_(R.c.res_pk.in_(in_compartment), R.c.res_pk.in_(referenced)),
            R.c.type != "AuditEvent",
        ]
        restriction = access.clause(R.c.res_pk)
        if restriction is not None:
            conditions.append(sa.or_(restriction, R.c.res_pk.in_(referenced)))
        order = [sa.case((R.c.type == "Patient", 0), else_=1), R.c.type, R.c.res_pk]
        with self.engine.connect() as conn:
            pairs = [
                (row[0], row[1])
                for row in conn.execute(
                    sa.select(R.c.res_pk, R.c.version).where(*conditions).order_by(*order)
                )
            ]
            return paginate(
                self.write_engine,
                pairs,
                count,
                owner,
                "everything",
                {"patient": patient_id, **_subsetting_of(subsetting)},
            )

    # -- writes -------------------------------------------------------------------------

    @contextmanager
    def writing(self, actor: Any = None) -> Iterator[Writer]:
        """One write: everything done through the Writer commits or none of it, and leaving
        the block waits until it is committed (durable). Concurrent writes of this process
        share a transaction and its commit, each in a savepoint of its own, so one that fails
        fails alone (:mod:`fhir_adapters.store.group_commit`). ``actor``: who writes (opaque
        here), for the observers (:meth:`observe`) to read."""
        with self.group_commit.write() as conn:
            yield Writer(self, conn, actor)

    def create(self, resource: Any, resource_type: str | None = None) -> Stored:
        with self.writing() as writer:
            return writer.create(resource, resource_type)

    def new_resource(self, resource: dict[str, Any], resource_id: str | None = None) -> NewResource:
        """A validated resource made ready to be created (its id chosen, its stored body and
        index rows made), best before the write begins: work not done while holding the
        write's turn (:meth:`Writer.create` takes it in place of the resource)."""
        resource_id = resource_id or str(uuid.uuid4())
        stored = stored_form(resource, resource_id, "1", UNSTAMPED)
        rows = index_values(stored, self.base_url)
        return NewResource(stored["resourceType"], resource_id, stored, jsonio.dump(stored), rows)

    def update(
        self, resource_type: str, resource_id: str, resource: Any, if_match: str | None = None
    ) -> tuple[Stored, bool]:
        with self.writing() as writer:
            return writer.update(resource_type, resource_id, resource, if_match)

    def delete(self, resource_type: str, resource_id: str) -> Stored | None:
        with self.writing() as writer:
            return writer.delete(resource_type, resource_id)


def _includes_of(requests: list[SearchRequest]) -> dict[str, list[str]]:
    """The includes of a search set (of one type's request, or of several types'), as
    :meth:`ResourceStore.included` reads them."""
    includes = [i for r in requests for i in r.includes]
    revincludes = [i for r in requests for i in r.revincludes]
    return {
        "includes": list(dict.fromkeys(str(i) for i in includes)),
        "revincludes": list(dict.fromkeys(str(i) for i in revincludes)),
        "iterate": list(
            dict.fromkeys(
                f"{kind}:{i}"
                for kind, found in (("i", includes), ("r", revincludes))
                for i in found
                if i.iterate
            )
        ),
    }


def _subsetting_of(subsetting: Subsetting | None) -> dict[str, Any]:
    """What a stored search set keeps of ``_summary``/``_elements``, so later pages keep it."""
    if subsetting is None:
        return {}
    return {"summary": subsetting.summary, "elements": subsetting.elements}


def readable_only(items: list[Stored], left_out: str) -> list[Stored]:
    """The items whose bodies every JSON client can read (:func:`jsonio.readable`); each
    other one is logged (by its row and version, nothing of its content) as ``left_out``."""
    kept = []
    for item in items:
        if item.body is None or jsonio.readable(item.body):
            kept.append(item)
        else:
            log.warning(
                "%s row %s version %s holds a number JSON clients cannot read: not %s; "
                "store a corrected version",
                item.type,
                item.res_pk,
                item.version,
                left_out,
            )
    return kept


def keys_clause(type_column: Any, id_column: Any, keys: Any) -> Any:
    """``(type, id) IN keys`` written so every database uses its (type, id) index: one
    ``type = T AND id IN (...)`` per type. (SQLite scans a table for a row-value IN list.)"""
    by_type: dict[str, list[str]] = {}
    for resource_type, resource_id in keys:
        by_type.setdefault(resource_type, []).append(resource_id)
    if not by_type:
        return sa.false()
    return sa.or_(
        *(
            sa.and_(type_column == resource_type, id_column.in_(sorted(ids)))
            for resource_type, ids in sorted(by_type.items())
        )
    )


_COMPARTMENT_OF = tables.compartment.c.res_pk == tables.resources.c.res_pk
# The current version of a resource, with the first of its patients and how many there are.
_CURRENT = (
    sa.select(
        tables.versions.c.version,
        tables.versions.c.last_updated,
        tables.versions.c.body,
        tables.versions.c.method,
        sa.select(sa.func.min(tables.compartment.c.patient_id))
        .where(_COMPARTMENT_OF)
        .scalar_subquery(),
        sa.select(sa.func.count()).where(_COMPARTMENT_OF).scalar_subquery(),
        tables.resources.c.res_pk,
    )
    .select_from(
        tables.resources.join(
            tables.versions,
            sa.and_(
                tables.versions.c.res_pk == tables.resources.c.res_pk,
                tables.versions.c.version == tables.resources.c.version,
            ),
        )
    )
    .where(
        tables.resources.c.type == sa.bindparam("type"),
        tables.resources.c.id == sa.bindparam("id"),
    )
)


def _insert_sql(table: sa.Table, mark: str) -> str:
    columns = [column.name for column in table.columns]
    return (
        f"INSERT INTO {table.name} ({', '.join(columns)}) "
        f"VALUES ({', '.join([mark] * len(columns))})"
    )


class _Sql:
    """The statements of the common writes as SQL text for the DBAPI cursor of a write's
    connection, in the database's parameter style: SQLAlchemy's work for each statement
    (building, caching, its execution context) was most of what a small write cost."""

    def __init__(self, mark: str) -> None:
        self.mark = mark
        self.insert_resource = (
            "INSERT INTO fhir_resources (type, id, version, last_updated, deleted) "
            f"VALUES ({mark}, {mark}, {mark}, {mark}, {mark}) RETURNING res_pk"
        )
        self.insert_version = _insert_sql(tables.versions, mark)
        self.insert_index = {table.name: _insert_sql(table, mark) for table in tables.INDEX_TABLES}
        self.delete_index = [
            f"DELETE FROM {table.name} WHERE res_pk = {mark}" for table in tables.INDEX_TABLES
        ]
        # the resource's row, locked until the transaction ends (PostgreSQL; on SQLite the
        # transaction already holds the database's write lock)
        self.lock_row = (
            f"SELECT res_pk, version, deleted FROM fhir_resources WHERE type = {mark} "
            f"AND id = {mark}" + (" FOR UPDATE" if mark == "%s" else "")
        )
        self.advance = (
            f"UPDATE fhir_resources SET version = {mark}, last_updated = {mark}, "
            f"deleted = {mark} WHERE res_pk = {mark} AND version = {mark}"
        )

    def existing(self, resource_type: str, count: int) -> str:
        """The (type, id) of the resources, not deleted, of one type among ``count`` ids."""
        marks = ", ".join([self.mark] * count)
        return (
            f"SELECT type, id FROM fhir_resources WHERE type = {self.mark} "
            f"AND id IN ({marks}) AND deleted = {self.mark}"
        )


_SQL = {"sqlite": _Sql("?"), "postgresql": _Sql("%s")}


def _sql_of(conn: Connection) -> _Sql:
    return _SQL[conn.dialect.name]


def stored_form(
    resource: dict[str, Any], resource_id: str, version_id: str, last_updated: str
) -> dict[str, Any]:
    """A resource as stored: ``resourceType``, ``id`` and ``meta`` (the server's
    ``versionId`` and ``lastUpdated`` first, the client's meta after) first."""
    meta = {k: v for k, v in resource.get("meta", {}).items() if k not in SERVER_META}
    stored: dict[str, Any] = {
        "resourceType": resource["resourceType"],
        "id": resource_id,
        "meta": {"versionId": version_id, "lastUpdated": last_updated, **meta},
    }
    for key, value in resource.items():
        if key not in ("resourceType", "id", "meta"):
            stored[key] = value
    return stored


def local_targets(resource: dict[str, Any], base_url: str) -> dict[tuple[str, str], str]:
    """The resources of this server a resource refers to (but itself), each with the path of
    its first reference; 422 for a reference no store could resolve (``urn:``, relative but
    malformed, a type not hosted). Contained and absolute references are not local."""
    wanted: dict[tuple[str, str], str] = {}
    for path, reference in references(resource, resource["resourceType"]):
        if reference.startswith("#"):
            continue  # a contained resource
        if reference.startswith("urn:"):
            raise Unprocessable(
                f"{path}: {reference!r} names no resource here (urn: references resolve "
                "only to entries of the same transaction Bundle)",
                expression=path,
            )
        target = parse_reference(reference, base_url)
        if target is None:
            if "://" in reference:
                continue  # absolute: another server's resource
            raise Unprocessable(
                f"{path}: {reference!r} is not a reference this server can resolve",
                expression=path,
            )
        if target[0] not in RESOURCE_TYPES:
            raise Unprocessable(
                f"{path}: this server does not host {target[0]} resources; use an absolute "
                "URL or a contained resource",
                expression=path,
            )
        wanted.setdefault(target, path)
    wanted.pop((resource["resourceType"], resource["id"]), None)
    return wanted


UNSTAMPED = format_instant(0)  # a prepared body's lastUpdated, until it is stored
_UNSTAMPED = f'"lastUpdated":"{UNSTAMPED}"'.encode()


def stamped(body: bytes, now: int) -> bytes:
    """A prepared body with the time it is stored as its ``lastUpdated`` (the first one in the
    body: ``meta`` comes right after ``resourceType`` and ``id``). The index rows of a resource
    do not depend on its ``meta.lastUpdated``, so they are made before it is known."""
    return body.replace(_UNSTAMPED, f'"lastUpdated":"{format_instant(now)}"'.encode(), 1)


@dataclass(frozen=True)
class NewResource:
    """A validated resource ready to be created: :meth:`ResourceStore.new_resource`."""

    type: str
    id: str
    stored: dict[str, Any]  # its stored form, lastUpdated UNSTAMPED
    body: bytes  # that form's bytes
    rows: IndexRows


def insert_first_versions(
    conn: Connection, entries: Sequence[tuple[str, str, bytes]], now: int
) -> list[int]:
    """Insert new resources ``(type, id, body)`` as their version 1, stored at ``now``, with a
    few statements for them all; their ``res_pk``, in order. SQLite runs the resource rows'
    ``INSERT ... RETURNING`` once per row in compiled code (its multi-row ``RETURNING`` does
    not promise the rows' order); PostgreSQL sends them in a few multi-row statements."""
    if not entries:
        return []
    sql = _sql_of(conn)
    cursor: Any = conn.connection.cursor()  # the DBAPI cursor, in the same transaction
    try:
        if conn.dialect.name == "postgresql":
            res_pks = [
                row[0]
                for row in conn.execute(
                    tables.resources.insert().returning(
                        tables.resources.c.res_pk, sort_by_parameter_order=True
                    ),
                    [
                        {"type": t, "id": i, "version": 1, "last_updated": now, "deleted": False}
                        for t, i, _ in entries
                    ],
                )
            ]
        else:
            res_pks = []
            for resource_type, resource_id, _ in entries:
                cursor.execute(sql.insert_resource, (resource_type, resource_id, 1, now, False))
                res_pks.append(cursor.fetchone()[0])
        rows = [
            (res_pk, 1, resource_type, now, "POST", body)
            for res_pk, (resource_type, _, body) in zip(res_pks, entries, strict=True)
        ]
        if conn.dialect.name == "postgresql" and len(rows) >= COPY_FROM:
            _copy(cursor, tables.versions, rows)
        else:
            cursor.executemany(sql.insert_version, rows)
    finally:
        cursor.close()
    return res_pks


COPY_FROM = 200  # rows of one index table a batch sends by COPY on PostgreSQL, at least


@dataclass
class IndexBatch:
    """Index rows waiting to be inserted, one list of row tuples per table (in the order of
    the table's columns)."""

    rows: dict[str, list[tuple[Any, ...]]] = field(
        default_factory=lambda: {table.name: [] for table in tables.INDEX_TABLES}
    )

    def add(self, res_pk: int, resource_type: str, rows: IndexRows) -> None:
        """A resource's index rows, as rows of the tables."""
        found = self.rows
        found[tables.tokens.name].extend(
            (res_pk, resource_type, p, sy[:255], c[:255]) for p, sy, c in rows.tokens
        )
        found[tables.strings.name].extend(
            (res_pk, resource_type, p, v[:255], e[:255]) for p, v, e in rows.strings
        )
        found[tables.references.name].extend(
            (res_pk, resource_type, p, t, i) for p, t, i in rows.references
        )
        found[tables.dates.name].extend(
            (res_pk, resource_type, p, lo, hi) for p, lo, hi in rows.dates
        )
        found[tables.quantities.name].extend(
            (
                res_pk,
                resource_type,
                p,
                q.system[:255],
                q.code,
                q.value,
                q.dimension,
                q.base,
                q.derived,
            )
            for p, q in rows.quantities
        )
        found[tables.links.name].extend((res_pk, t, i) for t, i in rows.links)
        found[tables.compartment.name].extend((p, res_pk) for p in sorted(rows.compartment))

    def insert(self, conn: Connection) -> None:
        """Insert the rows: on PostgreSQL many rows of a table go by ``COPY``, a few (one
        write's) and every table on SQLite by ``INSERT``."""
        statements = _sql_of(conn).insert_index
        copying = conn.dialect.name == "postgresql"
        cursor = conn.connection.cursor()
        try:
            for table in tables.INDEX_TABLES:
                rows = self.rows[table.name]
                if copying and len(rows) >= COPY_FROM:
                    _copy(cursor, table, rows)
                elif rows:
                    cursor.executemany(statements[table.name], rows)
        finally:
            cursor.close()


def _copy(cursor: Any, table: sa.Table, rows: list[tuple[Any, ...]]) -> None:
    """Rows of ``table`` (in its columns' order) sent by PostgreSQL's ``COPY``."""
    columns = ", ".join(column.name for column in table.columns)
    with cursor.copy(f"COPY {table.name} ({columns}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


ITERATE_ROUNDS = 4  # how often :iterate includes are applied again to what they added
MOST_INCLUDED = 1000  # resources includes add to one page, at most
REINDEX_BATCH = 500  # resources indexed again per transaction


def rebuild_index(
    write_engine: Engine, base_url: str, progress: Callable[[int, int], None] | None = None
) -> int:
    """Index every current resource again by today's search parameters (after an upgrade
    that changed them), ``REINDEX_BATCH`` resources per transaction so that a large store
    neither holds one long transaction nor starts over after an interruption more than one
    batch back; ``progress(done, total)`` after each batch. Returns how many were indexed."""
    R, V = tables.resources, tables.versions
    with write_engine.connect() as conn:
        total = conn.execute(
            sa.select(sa.func.count()).select_from(R).where(R.c.deleted.is_(False))
        ).scalar_one()
    done, after = 0, -1
    while True:
        with write_engine.begin() as conn:
            batch_rows = conn.execute(
                sa.select(R.c.res_pk, R.c.type, V.c.body)
                .select_from(
                    R.join(V, sa.and_(V.c.res_pk == R.c.res_pk, V.c.version == R.c.version))
                )
                .where(R.c.deleted.is_(False), R.c.res_pk > after)
                .order_by(R.c.res_pk)
                .limit(REINDEX_BATCH)
            ).all()
            if not batch_rows:
                return done
            pks = [row[0] for row in batch_rows]
            for table in tables.INDEX_TABLES:
                conn.execute(table.delete().where(table.c.res_pk.in_(pks)))
            batch = IndexBatch()
            for res_pk, resource_type, body in batch_rows:
                batch.add(res_pk, resource_type, index_values(jsonio.parse(bytes(body)), base_url))
            batch.insert(conn)
        done += len(batch_rows)
        after = pks[-1]
        if progress is not None:
            progress(done, total)


@contextmanager
def _connection(engine: Engine, conn: Connection | None) -> Iterator[Connection]:
    if conn is not None:
        yield conn
    else:
        with engine.connect() as fresh:
            yield fresh


class Writer:
    """Writes inside one open transaction (see :meth:`ResourceStore.writing`)."""

    def __init__(self, store: ResourceStore, conn: Connection, actor: Any = None) -> None:
        self.store = store
        self.conn = conn
        self.actor = actor  # who writes: the caller's identity, for the observers
        # Set to a list to check references only at the end (a transaction may refer to what
        # it creates later); ``tag`` names the write each deferred check came from.
        self.deferred: list[tuple[Any, dict[str, Any]]] | None = None
        self.tag: Any = None
        self.sql = _sql_of(conn)
        self._dbapi_cursor: Any = None

    def _cursor(self) -> Any:
        """The DBAPI cursor of the write's connection, for the statements of :class:`_Sql`
        (they run in the same transaction as everything else on ``conn``)."""
        if self._dbapi_cursor is None:
            self._dbapi_cursor = self.conn.connection.cursor()
        return self._dbapi_cursor

    def check_deferred(self) -> None:
        """Check the references of every deferred write; the error carries its ``tag``."""
        for tag, resource in self.deferred or []:
            self.tag = tag
            self._check_references(resource)
        self.deferred = None

    def lock(self, key: str) -> None:
        """Serialise writers on ``key`` until this transaction ends (PostgreSQL; SQLite
        transactions already hold the database's one write lock)."""
        if self.store.is_postgres:
            number = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)
            self.conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": number})

    def create(
        self,
        resource: Any,
        resource_type: str | None = None,
        *,
        resource_id: str | None = None,
        checked: bool = False,
        validated: bool = False,
    ) -> Stored:
        """Store a new resource under a new id (a client's ``id`` is ignored, as FHIR says).

        ``validated``: the caller has validated it (its references are still checked).
        ``checked`` skips validation and reference checks: for resources this node makes
        itself (AuditEvents). ``resource`` may also be a :class:`NewResource` (validated and
        prepared before the write)."""
        if not isinstance(resource, NewResource):
            if not (checked or validated):
                resource = validate(resource, resource_type)
            resource = self.store.new_resource(resource, resource_id)
        if not checked:
            self._check_or_defer(resource.stored)
        now = now_micros()
        resource_type, resource_id = resource.type, resource.id
        body, rows = stamped(resource.body, now), resource.rows
        cursor = self._cursor()
        cursor.execute(self.sql.insert_resource, (resource_type, resource_id, 1, now, False))
        res_pk = cursor.fetchone()[0]
        self._insert_version(res_pk, resource_type, 1, now, "POST", body)
        self._insert_index(res_pk, resource_type, rows)
        patients = frozenset(rows.compartment)
        stored = Stored(resource_type, resource_id, 1, now, body, "POST", patients, res_pk)
        self._notify(None, stored)
        return stored

    def create_many_checked(self, resources: list[dict[str, Any]]) -> list[Stored]:
        """Store resources this node made itself (AuditEvents), unvalidated, with a handful of
        statements for the whole list instead of a handful per resource."""
        if not resources:
            return []
        now = now_micros()
        prepared = []
        for resource in resources:
            resource_id = str(uuid.uuid4())
            body, rows = self._prepare(resource, resource_id, 1, now, True)
            prepared.append((resource["resourceType"], resource_id, body, rows))
        res_pks = insert_first_versions(
            self.conn, [(t, i, body) for t, i, body, _ in prepared], now
        )
        batched = IndexBatch()
        for pk, (t, _, _, rows) in zip(res_pks, prepared, strict=True):
            self._insert_index(pk, t, rows, into=batched)
        self._flush_index(batched)
        return [Stored(t, i, 1, now, body, "POST") for (t, i, body, _) in prepared]

    def update(
        self,
        resource_type: str,
        resource_id: str,
        resource: Any,
        if_match: str | None = None,
        *,
        validated: bool = False,
        prepared: NewResource | None = None,
    ) -> tuple[Stored, bool]:
        """Store a new version (or the first, under the client's id); True when created.
        ``validated``: the caller has validated it as a ``resource_type`` (its references are
        still checked). ``prepared``: the same resource made ready under this type and id by
        :meth:`ResourceStore.new_resource` before the write, taken when it is created (nothing
        of it is made again while the write holds its turn)."""
        check_type(resource_type)
        check_id(resource_id)
        if prepared is not None and (prepared.type, prepared.id) != (resource_type, resource_id):
            raise ValueError(f"{prepared.type}/{prepared.id} was prepared, not this resource")
        if not validated and prepared is None:
            resource = validate(resource, resource_type)
        if "id" not in resource:
            raise InvalidRequest("an update must carry the resource's id", expression="id")
        if resource["id"] != resource_id:
            raise InvalidRequest(
                f"the body's id {resource['id']!r} is not the URL's {resource_id!r}",
                expression=f"{resource_type}.id",
            )
        row = self._lock_row(resource_type, resource_id)
        if row is None:  # serialise creators of this id, then look again
            self.lock(f"create {resource_type}/{resource_id}")
            row = self._lock_row(resource_type, resource_id)
        if row is None:
            if if_match is not None:
                raise PreconditionFailed(
                    f"If-Match given, but {resource_type}/{resource_id} does not exist"
                )
            created = self.create(
                prepared or resource, resource_type, resource_id=resource_id, validated=True
            )
            return created, True
        res_pk, version, deleted = row
        if if_match is not None and parse_etag(if_match) != version:
            raise PreconditionFailed(
                f"{resource_type}/{resource_id} is at version {version}, not "
                f"{parse_etag(if_match)}: read it again and re-apply the change"
            )
        now = now_micros()
        body, rows = self._prepare(resource, resource_id, version + 1, now, False)
        before = self._observed_version(resource_type, resource_id, res_pk, version)
        self._advance(res_pk, version, version + 1, now, deleted=False)
        self._insert_version(res_pk, resource_type, version + 1, now, "PUT", body)
        self._delete_index(res_pk)
        self._insert_index(res_pk, resource_type, rows)
        stored = Stored(resource_type, resource_id, version + 1, now, body, "PUT", res_pk=res_pk)
        self._notify(before, stored)
        return stored, deleted

    def delete(
        self, resource_type: str, resource_id: str, if_match: str | None = None
    ) -> Stored | None:
        """Delete (a new, empty version); None when it was already deleted."""
        check_type(resource_type)
        check_id(resource_id)
        row = self._lock_row(resource_type, resource_id)
        if row is None:
            raise NotFound(f"{resource_type}/{resource_id} is not known")
        res_pk, version, deleted = row
        if if_match is not None and parse_etag(if_match) != version:
            raise PreconditionFailed(
                f"{resource_type}/{resource_id} is at version {version}, not {parse_etag(if_match)}"
            )
        if deleted:
            return None
        referrers = self.conn.execute(
            sa.select(tables.resources.c.type, tables.resources.c.id)
            .select_from(
                tables.links.join(
                    tables.resources, tables.resources.c.res_pk == tables.links.c.res_pk
                )
            )
            .where(
                tables.links.c.target_type == resource_type,
                tables.links.c.target_id == resource_id,
                tables.links.c.res_pk != res_pk,
            )
            .limit(6)
        ).all()
        if referrers:
            names = ", ".join(f"{t}/{i}" for t, i in referrers[:5])
            more = " and more" if len(referrers) > 5 else ""
            raise Conflict(
                f"{resource_type}/{resource_id} is referenced by {names}{more}; delete or "
                "change those first"
            )
        now = now_micros()
        before = self._observed_version(resource_type, resource_id, res_pk, version)
        self._advance(res_pk, version, version + 1, now, deleted=True)
        self._insert_version(res_pk, resource_type, version + 1, now, "DELETE", None)
        self._delete_index(res_pk)
        stored = Stored(resource_type, resource_id, version + 1, now, None, "DELETE", res_pk=res_pk)
        self._notify(before, stored)
        return stored

    # -- helpers ------------------------------------------------------------------------

    def _observed_version(
        self, resource_type: str, resource_id: str, res_pk: int, version: int
    ) -> Stored | None:
        """The version a write replaces, when someone observes writes of its type."""
        if resource_type not in self.store.observers:
            return None
        row = self.conn.execute(
            sa.select(
                tables.versions.c.last_updated, tables.versions.c.body, tables.versions.c.method
            ).where(tables.versions.c.res_pk == res_pk, tables.versions.c.version == version)
        ).one()
        return Stored(resource_type, resource_id, version, row[0], row[1], row[2], res_pk=res_pk)

    def _notify(self, before: Stored | None, after: Stored) -> None:
        for observer in self.store.observers.get(after.type, ()):
            observer(self, before, after)

    def _lock_row(self, resource_type: str, resource_id: str) -> tuple[int, int, bool] | None:
        cursor = self._cursor()
        cursor.execute(self.sql.lock_row, (resource_type, resource_id))
        row = cursor.fetchone()
        return None if row is None else (row[0], row[1], bool(row[2]))

    def _advance(self, res_pk: int, old: int, new: int, now: int, *, deleted: bool) -> None:
        cursor = self._cursor()
        cursor.execute(self.sql.advance, (new, now, deleted, res_pk, old))
        if cursor.rowcount != 1:
            raise Conflict("the resource changed while this write was made; try again")

    def _prepare(
        self, resource: dict[str, Any], resource_id: str, version: int, now: int, checked: bool
    ) -> tuple[bytes, IndexRows]:
        """The stored form (server meta set, ``resourceType``, ``id``, ``meta`` first) and its
        index rows; references checked unless ``checked``."""
        stored = stored_form(resource, resource_id, str(version), format_instant(now))
        rows = index_values(stored, self.store.base_url)
        if not checked:
            self._check_or_defer(stored)
        return jsonio.dump(stored), rows

    def _check_or_defer(self, stored: dict[str, Any]) -> None:
        """Check a stored form's references now, or with the others at the end of a
        transaction Bundle."""
        if self.deferred is not None:
            self.deferred.append((self.tag, stored))
        else:
            self._check_references(stored)

    def _check_references(self, resource: dict[str, Any]) -> None:
        wanted = local_targets(resource, self.store.base_url)
        if not wanted:
            return
        by_type: dict[str, list[str]] = {}
        for target_type, target_id in wanted:
            by_type.setdefault(target_type, []).append(target_id)
        found: set[tuple[str, str]] = set()
        cursor = self._cursor()
        for target_type, ids in by_type.items():
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                cursor.execute(
                    self.sql.existing(target_type, len(chunk)), (target_type, *chunk, False)
                )
                found.update((row[0], row[1]) for row in cursor.fetchall())
        for target, path in wanted.items():
            if target not in found:
                raise Unprocessable(
                    f"{path}: {target[0]}/{target[1]} does not exist on this server",
                    expression=path,
                )

    def _insert_version(
        self,
        res_pk: int,
        resource_type: str,
        version: int,
        now: int,
        method: str,
        body: bytes | None,
    ) -> None:
        self._cursor().execute(
            self.sql.insert_version, (res_pk, version, resource_type, now, method, body)
        )

    def _insert_index(
        self, res_pk: int, resource_type: str, rows: IndexRows, into: IndexBatch | None = None
    ) -> None:
        """Insert a resource's index rows, or add them to ``into`` to insert later at once."""
        batch = into if into is not None else IndexBatch()
        batch.add(res_pk, resource_type, rows)
        if into is None:
            self._flush_index(batch)

    def _flush_index(self, batch: IndexBatch) -> None:
        batch.insert(self.conn)

    def _delete_index(self, res_pk: int) -> None:
        cursor = self._cursor()
        for statement in self.sql.delete_index:
            cursor.execute(statement, (res_pk,))
