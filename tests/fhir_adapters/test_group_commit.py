"""Group commit in the resource store, on SQLite and PostgreSQL: concurrent writes share one
transaction and one commit, each durable when its block returns; one that fails fails alone;
when the shared transaction is lost, every write in it says so and none is stored; a create
prepared before its turn stores what a create made in its turn stores."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa

from fhir_adapters.errors import FhirError, Unprocessable
from fhir_adapters.store import ResourceStore, Writer, jsonio, tables
from fhir_adapters.store.group_commit import CommitFailed
from fhir_adapters.store.repository import COPY_FROM, format_instant
from fhir_adapters.store.resources import validate
from ledger.store import open_engine


@pytest.fixture
def store(db_url: str) -> Iterator[ResourceStore]:
    write_engine = open_engine(db_url, immediate=True)
    tables.metadata.create_all(write_engine)
    read_engine = open_engine(db_url)
    yield ResourceStore(read_engine, write_engine, "http://hrx.test/fhir")
    read_engine.dispose()
    write_engine.dispose()


def _patient(number: int) -> dict[str, Any]:
    return {"resourceType": "Patient", "name": [{"family": f"测试{number}"}]}


def _commits(store: ResourceStore) -> list[int]:
    """A list that grows by one at every commit on the store's write engine."""
    seen: list[int] = []
    sa.event.listen(store.write_engine, "commit", lambda _conn: seen.append(1))
    return seen


def _stored_ids(store: ResourceStore) -> set[str]:
    """The Patients stored, read on a connection of their own (what is committed)."""
    with store.engine.connect() as conn:
        return set(
            conn.scalars(
                sa.select(tables.resources.c.id).where(tables.resources.c.type == "Patient")
            )
        )


def _together(store: ResourceStore, writes: list[Callable[[Writer], Any]]) -> list[tuple[str, Any]]:
    """Run each write in a thread of its own so that all of them share one transaction: the
    first holds its turn until every other one waits for its own. Each outcome is ("ok",
    what it returned) or ("error", what it raised), in the order given."""
    release = threading.Event()
    outcomes: list[tuple[str, Any]] = [("", None)] * len(writes)

    def run(index: int) -> None:
        try:
            with store.writing() as writer:
                if index == 0:
                    assert release.wait(30)
                result = writes[index](writer)
            outcomes[index] = ("ok", result)
        except Exception as exc:  # what the write raised, for the test to look at
            outcomes[index] = ("error", exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(writes))]
    threads[0].start()
    while store.group_commit.waiting or not _first_in(store):
        time.sleep(0.001)
    for thread in threads[1:]:
        thread.start()
    deadline = time.monotonic() + 30
    while store.group_commit.waiting < len(writes) - 1 and time.monotonic() < deadline:
        time.sleep(0.001)
    release.set()
    for thread in threads:
        thread.join(30)
    return outcomes


def _first_in(store: ResourceStore) -> bool:
    return store.group_commit._open is not None


def test_concurrent_writes_share_one_commit_and_all_are_durable(store: ResourceStore) -> None:
    commits = _commits(store)
    writes = [lambda w, n=n: w.create(_patient(n)).id for n in range(12)]
    outcomes = _together(store, writes)
    assert [kind for kind, _ in outcomes] == ["ok"] * 12
    assert len(commits) == 1
    assert _stored_ids(store) == {created for _, created in outcomes}


def test_a_write_that_fails_fails_alone(store: ResourceStore) -> None:
    commits = _commits(store)

    def invalid(writer: Writer) -> str:
        writer.create(_patient(99))  # undone with the rest of this write
        return writer.create({"resourceType": "Patient", "gender": "often"}).id

    def dangling(writer: Writer) -> str:
        observation = {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "Hb"},
            "subject": {"reference": "Patient/nobody"},
        }
        return writer.create(observation).id

    writes: list[Callable[[Writer], Any]] = [
        lambda w, n=n: w.create(_patient(n)).id for n in range(6)
    ]
    writes[2] = invalid
    writes[4] = dangling
    outcomes = _together(store, writes)
    assert [kind for kind, _ in outcomes] == ["ok", "ok", "error", "ok", "error", "ok"]
    assert isinstance(outcomes[2][1], FhirError) and outcomes[2][1].status == 400
    assert isinstance(outcomes[4][1], Unprocessable)
    assert "Patient/nobody does not exist" in str(outcomes[4][1].issues[0].diagnostics)
    assert len(commits) == 1
    assert _stored_ids(store) == {outcomes[i][1] for i in (0, 1, 3, 5)}


def test_a_lost_transaction_fails_every_write_in_it(store: ResourceStore) -> None:
    def loses_the_transaction(writer: Writer) -> None:
        writer.create(_patient(7))
        writer.conn.connection.driver_connection.rollback()  # as a failing database would
        raise RuntimeError("the database went away")

    writes: list[Callable[[Writer], Any]] = [
        lambda w: w.create(_patient(1)).id,
        lambda w: w.create(_patient(2)).id,
        loses_the_transaction,
        lambda w: w.create(_patient(3)).id,
    ]
    outcomes = _together(store, writes)
    # the first was in the lost transaction; those whose turn came after it, in a new one
    assert isinstance(outcomes[0][1], CommitFailed)
    assert isinstance(outcomes[2][1], RuntimeError)
    for kind, outcome in (outcomes[1], outcomes[3]):
        assert kind == "ok" or isinstance(outcome, CommitFailed)
    kept = {outcome for kind, outcome in (outcomes[1], outcomes[3]) if kind == "ok"}
    assert _stored_ids(store) == kept
    created = store.create(_patient(4))  # and the store goes on writing
    assert _stored_ids(store) == kept | {created.id}


def test_many_threads_writing_at_once_all_commit(store: ResourceStore) -> None:
    created: list[str] = []
    lock = threading.Lock()

    def writer_thread(start: int) -> None:
        for number in range(start, start + 15):
            stored = store.create(_patient(number))
            with lock:
                created.append(stored.id)

    threads = [threading.Thread(target=writer_thread, args=(i * 100,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(created) == 180
    assert _stored_ids(store) == set(created)


def test_a_create_prepared_before_its_turn_stores_what_a_create_in_it_stores(
    store: ResourceStore,
) -> None:
    R = tables.references
    observation = {
        "resourceType": "Observation",
        "meta": {"lastUpdated": "2020-01-01T00:00:00Z", "tag": [{"code": "t"}]},
        "status": "final",
        "code": {"text": "血红蛋白"},
        "subject": {"reference": "Patient/p1"},
        "valueQuantity": {"value": Decimal("13.50"), "unit": "g/dL"},
    }
    with store.writing() as writer:
        writer.update("Patient", "p1", {**_patient(1), "id": "p1"})
    prepared = store.new_resource(validate(observation, "Observation"))
    with store.writing() as writer:
        stored = writer.create(prepared)
    with store.writing() as writer:
        same = writer.create(observation, "Observation", resource_id="o-2")
    read = store.read("Observation", stored.id)
    assert read.body == stored.body
    body = jsonio.parse(read.body)
    assert body["meta"] == {
        "versionId": "1",
        "lastUpdated": format_instant(stored.last_updated),
        "tag": [{"code": "t"}],
    }
    # byte for byte what the create in its turn writes, but for the id and the time
    assert (
        read.body.replace(stored.id.encode(), b"o-2").replace(
            format_instant(stored.last_updated).encode(), format_instant(same.last_updated).encode()
        )
        == same.body
    )
    assert stored.patients == frozenset({"p1"})
    with store.engine.connect() as conn:  # indexed as the create in its turn indexes
        rows = {
            pk: sorted(
                conn.execute(
                    sa.select(R.c.param, R.c.target_type, R.c.target_id).where(R.c.res_pk == pk)
                ).all()
            )
            for pk in (stored.res_pk, same.res_pk)
        }
    assert rows[stored.res_pk] == rows[same.res_pk]
    assert ("patient", "Patient", "p1") in rows[stored.res_pk]
    # its references are still checked in the turn
    missing = store.new_resource({**observation, "subject": {"reference": "Patient/nobody"}})
    with (
        pytest.raises(Unprocessable, match="Patient/nobody does not exist"),
        store.writing() as writer,
    ):
        writer.create(missing)


def test_many_index_rows_go_by_copy_on_postgres_and_are_the_rows_insert_writes(
    store: ResourceStore,
) -> None:
    """Enough resources at once that each index table and the versions get at least COPY_FROM
    rows (COPY on PostgreSQL), beside the same resources written one at a time (INSERT)."""
    made: list[dict[str, Any]] = []
    for n in range(COPY_FROM + 10):
        made.append({**_patient(n), "gender": "female", "birthDate": f"1980-01-{n % 28 + 1:02d}"})
        made.append(
            {
                "resourceType": "Observation",
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
                "subject": {"reference": "Patient/p1"},
                "effectiveDateTime": "2024-03-01T08:00:00+08:00",
                "valueQuantity": {
                    "value": Decimal(f"{n}.50"),
                    "unit": "mg/dL",
                    "system": "http://unitsofmeasure.org",
                    "code": "mg/dL",
                },
            }
        )
    with store.writing() as writer:
        many = writer.create_many_checked(made)
    alone = []
    for resource in made:
        with store.writing() as writer:
            alone.append(writer.create(resource, resource["resourceType"], checked=True))
    with store.engine.connect() as conn:
        pks = dict(conn.execute(sa.select(tables.resources.c.id, tables.resources.c.res_pk)).all())

        def index_of(resource_id: str) -> dict[str, list[str]]:
            found = {}
            for table in tables.INDEX_TABLES:
                rows = conn.execute(sa.select(table).where(table.c.res_pk == pks[resource_id]))
                found[table.name] = sorted(  # a Patient is in its own compartment
                    repr({k: v for k, v in row._mapping.items() if k != "res_pk"}).replace(
                        resource_id, "itself"
                    )
                    for row in rows
                )
            return found

        def version_of(stored: Any) -> tuple[Any, ...]:
            V = tables.versions
            row = conn.execute(
                sa.select(V.c.version, V.c.type, V.c.last_updated, V.c.method, V.c.body).where(
                    V.c.res_pk == pks[stored.id]
                )
            ).one()
            return (*row[:4], jsonio.parse(bytes(row[4])))

        for first, second in zip(many, alone, strict=True):
            assert index_of(first.id) == index_of(second.id)
            # the version rows (COPY'd on PostgreSQL too) hold what each write returned
            for stored in (first, second):
                expected = (1, stored.type, stored.last_updated, "POST", jsonio.parse(stored.body))
                assert version_of(stored) == expected
        counts = {
            table.name: conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
            for table in tables.INDEX_TABLES
        }
    for name in ("fhir_idx_token", "fhir_idx_string", "fhir_idx_date", "fhir_idx_quantity"):
        assert counts[name] >= 2 * COPY_FROM, counts  # each way wrote COPY_FROM or more
