"""Bulk import under a caller's rules (what ``$import`` runs): a line is stored only when the
caller's token may write its type, a file declared to hold one type refuses lines of another,
and every run leaves one AuditEvent with the counts reached, whether it finished, was cancelled
or failed; on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from fhir_adapters.store import bulk_import as engine
from fhir_adapters.store import jsonio, tables
from fhir_adapters.store.bulk_import import Counts
from node.base.config import load_config
from node.flows import bulk_jobs
from node.flows.bulk_import import run_import, run_import_job, write_rights
from node.identity.tokens import Principal, parse_scopes
from node.records.audit_trail import Caller
from node.services import Services, open_services
from tests.helpers.nodes import joined_node_dir
from tests.node.flows.test_bulk_import import glucose, lines_file, patient, stored


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def node_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    with joined_node_dir(tmp_path / "hosp-a", "hosp-a", request.param) as directory:
        yield directory


@pytest.fixture
def services(node_dir: Path) -> Iterator[Services]:
    opened = open_services(load_config(node_dir))
    try:
        yield opened
    finally:
        opened.close()


def loader(scopes: str) -> Principal:
    """An admin's token with ``scopes``."""
    return Principal("loader", "admin", tuple(parse_scopes(scopes)), None, "token-1")


def import_events(services: Services) -> list[dict[str, Any]]:
    """The AuditEvents of bulk imports, oldest first."""
    R, V = tables.resources, tables.versions
    with services.store.engine.connect() as conn:
        bodies = conn.execute(
            sa.select(V.c.body)
            .select_from(R.join(V, V.c.res_pk == R.c.res_pk))
            .where(R.c.type == "AuditEvent")
            .order_by(R.c.res_pk)
        ).scalars()
        events = [jsonio.parse(body) for body in bodies]
    return [e for e in events if e.get("outcomeDesc", "").startswith("$import")]


def test_a_line_is_stored_only_when_the_token_may_write_its_type(
    node_dir: Path, services: Services, tmp_path: Path
) -> None:
    before = lines_file(tmp_path / "before.ndjson", patient("p-old"))
    assert run_import(services, Caller(None), [before], workers=0).counts.created == 1
    source = lines_file(
        tmp_path / "mixed.ndjson",
        patient("p-new"),
        patient("p-old", gender="female"),  # an update: the token may only create Patients
        glucose("g1", "Patient/p-new", "5.6"),  # a type the token may not create at all
        glucose("g2", "Patient/p-new", "5.7"),
    )
    creator = loader("system/Patient.c")
    outcome = run_import(
        services, Caller(creator), [source], workers=0, forbidden=write_rights(creator)
    )
    assert outcome.counts == Counts(created=1, refused=3)
    assert outcome.refused_reasons is not None and outcome.refused_lines is not None
    reasons = outcome.refused_reasons.read_text(encoding="utf-8").splitlines()
    assert reasons[0].startswith(f"{source}:2: loader (admin) may not update Patient")
    assert reasons[1].startswith(f"{source}:3: loader (admin) may not create Observation")
    assert reasons[2].startswith(f"{source}:4: loader (admin) may not create Observation")
    kept = outcome.refused_lines.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["id"] for line in kept] == ["p-old", "g1", "g2"]
    found = stored(node_dir)
    assert set(found) == {("Patient", "p-old"), ("Patient", "p-new")}
    assert [v.get("gender") for v in found[("Patient", "p-old")]] == [None]
    # a token that may do it all stores the same lines
    writer = loader("system/Patient.cu system/Observation.c")
    again = run_import(
        services, Caller(writer), [source], job="again", workers=0, forbidden=write_rights(writer)
    )
    assert again.counts == Counts(created=2, updated=1, unchanged=1)
    assert ("Observation", "g2") in stored(node_dir)


def test_a_file_declared_to_hold_one_type_refuses_lines_of_another(
    node_dir: Path, services: Services, tmp_path: Path
) -> None:
    source = lines_file(
        tmp_path / "patients.ndjson",
        patient("p1"),
        glucose("g1", "Patient/p1", "5.6"),
        patient("p2"),
    )
    other = lines_file(tmp_path / "any.ndjson", glucose("g2", "Patient/p1", "6.1"))
    outcome = run_import(
        services, Caller(None), [source, other], workers=0, types=["Patient", None]
    )
    assert outcome.counts == Counts(created=3, refused=1)
    assert outcome.per_file == (Counts(created=2, refused=1), Counts(created=1))
    assert outcome.refused_reasons is not None
    [reason] = outcome.refused_reasons.read_text(encoding="utf-8").splitlines()
    assert reason == (
        f"{source}:2: the input is declared to hold Patient resources, not Observation"
    )
    assert ("Observation", "g1") not in stored(node_dir)


def test_a_cancelled_import_keeps_what_it_stored_and_says_so_in_its_audit_event(
    services: Services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine, "GROUP", 2)  # the engine asks cancelled() after each group
    source = lines_file(tmp_path / "p.ndjson", *(patient(f"p{i}") for i in range(5)))
    outcome = run_import(services, Caller(None), [source], workers=0, cancelled=lambda: True)
    assert not outcome.finished and outcome.counts.created == 2
    [event] = import_events(services)
    assert event["outcome"] == "4"
    assert "2 created" in event["outcomeDesc"] and "stopped before the end" in event["outcomeDesc"]
    # resumed and finished: a second AuditEvent, for the second run
    finished = run_import(services, Caller(None), [source], workers=0)
    assert finished.finished and finished.counts.created == 5
    assert [e["outcome"] for e in import_events(services)] == ["4", "0"]


def test_an_import_job_cancelled_between_two_groups_leaves_its_audit_event(
    services: Services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine, "GROUP", 2)
    monkeypatch.setattr(bulk_jobs, "HEARTBEAT_SECONDS", 0)  # a heartbeat after every group
    real_beat = bulk_jobs.beat

    def beat(svc: Services, job_id: str, progress: dict[str, Any]) -> None:
        if progress["lines"] >= 2:  # a DELETE arrives once the first group is stored
            bulk_jobs.cancel(svc, job_id)
        real_beat(svc, job_id, progress)

    monkeypatch.setattr(bulk_jobs, "beat", beat)
    source = lines_file(tmp_path / "p.ndjson", *(patient(f"q{i}") for i in range(5)))
    asker = loader("system/*.cruds")
    request = {"files": [str(source)], "url": "http://127.0.0.1/fhir/$import"}
    job = bulk_jobs.new_job(services, "import", asker.username, request)
    with pytest.raises(bulk_jobs.Cancelled):
        run_import_job(services, Caller(asker), job)
    [event] = import_events(services)
    assert event["outcome"] == "4" and "2 created" in event["outcomeDesc"]
    assert "stopped before the end" in event["outcomeDesc"]
    assert any(agent.get("who", {}).get("display") == "loader" for agent in event["agent"])


def test_a_failed_import_leaves_its_audit_event_with_the_counts_reached(
    services: Services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine, "GROUP", 2)
    source = lines_file(tmp_path / "p.ndjson", *(patient(f"r{i}") for i in range(5)))

    def progress(where: engine.Progress) -> None:
        if where.counts.settled >= 2:
            raise OSError("the disk went away")

    with pytest.raises(OSError, match="disk went away"):
        run_import(services, Caller(None), [source], workers=0, progress=progress)
    [event] = import_events(services)
    assert event["outcome"] == "8"
    assert "2 created" in event["outcomeDesc"] and "failed: OSError" in event["outcomeDesc"]
    assert "disk" not in event["outcomeDesc"]  # the kind only: a message may name anything


def test_a_resumed_import_job_runs_with_the_rights_of_the_token_that_asked(
    node_dir: Path, services: Services, tmp_path: Path
) -> None:
    source = lines_file(
        tmp_path / "mixed.ndjson", patient("s1"), glucose("s-g1", "Patient/s1", "5.6")
    )
    request = {
        "files": [str(source)],
        "types": [None],
        "urls": [source.as_uri()],
        "scopes": ["system/Patient.c"],  # what the kick-off's token held
        "url": "http://127.0.0.1/fhir/$import",
    }
    job = bulk_jobs.new_job(services, "import", "loader", request)
    poller = loader("system/*.cruds")  # the same user polls with a broader token
    manifest = run_import_job(services, Caller(poller), job)
    assert manifest["output"][0]["extension"]["urn:hrx:import-counts"]["refused"] == 1
    assert set(stored(node_dir)) == {("Patient", "s1")}
