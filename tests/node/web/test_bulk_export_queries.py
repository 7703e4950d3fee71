"""What ``$export`` adds to its queries, on a real node on each engine: the Provenance of the
exported resources at Patient and Group level (one more condition in the rows' query), and,
on PostgreSQL, the wait for every write begun before the export's ``transactionTime`` (on
SQLite the kick-off's own write waits for them). The rules that are the views' and the flow's
alone are in test_bulk_export_rules.py, on one engine."""

from __future__ import annotations

import threading
import time

import pytest

from fhir_adapters.store import ResourceStore
from node.flows.bulk_export import SETTLE_SECONDS
from tests.helpers.nodes import Node
from tests.node.web.test_bulk_data import exported, kick_off, manifest_of
from tests.node.web.test_bulk_export_rules import create, observation, session_of


def test_the_provenance_of_exported_resources_comes_along(node: Node) -> None:
    member, other = (create(node, {"resourceType": "Patient", "gender": "male"}) for _ in "ab")
    mine, theirs = create(node, observation(member, "718-7")), create(node, observation(other, "x"))
    organization = create(node, {"resourceType": "Organization", "name": "来源医院"})

    def provenance(*targets: str) -> str:
        return create(
            node,
            {
                "resourceType": "Provenance",
                "target": [{"reference": t} for t in targets],
                "recorded": "2024-01-01T00:00:00Z",
                "agent": [{"who": {"reference": f"Organization/{organization}"}}],
            },
        )

    of_mine = provenance(f"Organization/{organization}", f"Observation/{mine}")
    of_theirs = provenance(f"Observation/{theirs}")
    of_the_organization = provenance(f"Organization/{organization}")
    of_the_member = provenance(f"Patient/{member}")  # in the compartment already
    group = create(
        node,
        {
            "resourceType": "Group",
            "type": "person",
            "actual": True,
            "member": [{"entity": {"reference": f"Patient/{member}"}}],
        },
    )
    time.sleep(SETTLE_SECONDS + 0.1)
    session = session_of(node, "provenance-admin", "system/*.rs")

    def provenances(url: str, **params: str) -> set[str]:
        out = exported(session, manifest_of(session, kick_off(session, url, **params)))
        return {r["id"] for r in out if r["resourceType"] == "Provenance"}

    everyone = provenances(f"{node.fhir}/Patient/$export")
    assert {of_mine, of_theirs, of_the_member} <= everyone
    assert of_the_organization not in everyone
    grouped = provenances(f"{node.fhir}/Group/{group}/$export", _type="Observation,Provenance")
    assert grouped == {of_mine, of_the_member}
    # the Observations are not exported: neither is their Provenance
    alone = provenances(f"{node.fhir}/Group/{group}/$export", _type="Patient,Provenance")
    assert alone == {of_the_member}


def test_an_export_waits_for_a_write_begun_before_its_transaction_time(node: Node) -> None:
    """PostgreSQL: a write that stamped its rows before ``transactionTime`` but commits after
    the export started is in the export (it waits for the write to end), not lost to this
    export and to the next one given ``_since`` (SQLite: the kick-off's own write waits for
    it, one writer at a time, so there the kick-off could not be answered meanwhile)."""
    if node.database.engine.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer at a time: the kick-off itself waits for the write")
    store = ResourceStore(node.database.engine, node.database.write_engine, node.fhir)
    written, release = threading.Event(), threading.Event()
    created: list[str] = []

    def slow_write() -> None:
        with store.writing() as writer:
            created.append(writer.create({"resourceType": "Patient", "gender": "other"}).id)
            written.set()
            release.wait(60)

    thread = threading.Thread(target=slow_write)
    thread.start()
    try:
        assert written.wait(30)
        time.sleep(SETTLE_SECONDS + 0.5)  # the patient was stamped before transactionTime
        owner = session_of(node, "waiting-admin", "system/*.rs")
        status_url = kick_off(owner, f"{node.fhir}/$export", _type="Patient")
        time.sleep(1.0)  # the export has begun (and, but for the wait, would have read)
    finally:
        release.set()
        thread.join(30)
    manifest = manifest_of(owner, status_url)
    assert created[0] in {r["id"] for r in exported(owner, manifest)}
