"""The rules of ``$export`` beyond its happy path, on a real node: the status, files and DELETE
of a job ask the kick-off's authorization again (its owner, and ``system/`` scopes covering
every exported type); a DELETE of a running export stops its thread cleanly and leaves no
file; ``_typeFilter`` lists and result parameters; a Group's inactive or past members;
``Expires`` and the deletion of expired jobs; ``POST`` kick-off with ``patient``; the cap on
running exports (429); 202s without a Content-Type; no server path in a failed job's
OperationOutcome. These are the views' and the flow's, the same on either engine: they run on
SQLite; what the export adds to its queries runs on both (test_bulk_export_queries.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from fhir_adapters.store import now_micros
from node.db.schema import bulk_jobs_table
from node.flows import bulk_jobs
from node.flows.bulk_export import MOST_RUNNING, SETTLE_SECONDS
from node.flows.bulk_jobs import RETENTION_SECONDS
from tests.helpers.nodes import Node, running_node
from tests.node.web.test_bulk_data import (
    ASYNC,
    exported,
    kick_off,
    lost_export_job,
    manifest_of,
)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """One node, on SQLite."""
    with running_node(tmp_path_factory.mktemp("node") / "hosp-a") as server:
        yield server


def session_of(node: Node, username: str, scope: str, role: str = "admin") -> requests.Session:
    session = requests.Session()
    session.headers["Authorization"] = "Bearer " + node.token(username, role, scope=scope)
    return session


def create(node: Node, resource: dict[str, Any]) -> str:
    answer = node.session().post(
        f"{node.fhir}/{resource['resourceType']}", json=resource, timeout=30
    )
    assert answer.status_code == 201, answer.text
    return str(answer.json()["id"])


def observation(patient: str, code: str, status: str = "final") -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": status,
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": f"Patient/{patient}"},
    }


def job_id(status_url: str) -> str:
    return status_url.rsplit("/", 1)[1]


def job_row(node: Node, job: str) -> Any:
    with node.database.engine.connect() as conn:
        return conn.execute(sa.select(bulk_jobs_table).where(bulk_jobs_table.c.id == job)).first()


def ended_a_day_ago(node: Node, job: Any) -> None:
    """Move a finished job's end back past its retention, as if a day had passed."""
    with node.database.write_engine.begin() as conn:
        conn.execute(
            bulk_jobs_table.update()
            .where(bulk_jobs_table.c.id == job.id)
            .values(finished=job.finished - RETENTION_SECONDS * 10**6 - 1)
        )


def is_outcome(answer: requests.Response) -> bool:
    return bool(
        answer.headers.get("Content-Type", "").startswith("application/fhir+json")
        and answer.json()["resourceType"] == "OperationOutcome"
    )


def test_status_files_and_delete_ask_the_kick_offs_scopes(node: Node) -> None:
    patient = create(node, {"resourceType": "Patient", "gender": "male"})
    create(node, observation(patient, "2345-7"))
    time.sleep(SETTLE_SECONDS + 0.1)
    owner = session_of(node, "scoped-admin", "system/*.rs")
    status_url = kick_off(owner, f"{node.fhir}/$export", _type="Patient,Observation")
    manifest = manifest_of(owner, status_url)
    file_url = next(item["url"] for item in manifest["output"] if item["type"] == "Patient")
    # the same user, with tokens that do not cover both types through system/ scopes
    for scope in ("user/*.cruds", "system/Patient.rs", "system/Patient.rs user/Observation.rs"):
        narrower = session_of(node, "scoped-admin", scope)
        for answer in (
            narrower.get(status_url, timeout=30),
            narrower.get(file_url, timeout=30),
            narrower.delete(status_url, timeout=30),
        ):
            assert answer.status_code == 403, (scope, answer.text)
            assert is_outcome(answer) and "Observation" in answer.text
    # a token covering them through other system/ scopes will do
    covering = session_of(node, "scoped-admin", "system/Patient.rs system/Observation.rs")
    assert covering.get(file_url, timeout=30).status_code == 200
    # another user's job does not exist for them, whatever their scopes
    stranger = session_of(node, "scoped-other", "system/*.rs")
    assert stranger.get(status_url, timeout=30).status_code == 404
    assert stranger.get(file_url, timeout=30).status_code == 404
    # at kick-off, a user/ scope does not widen what a system/ scope exports
    mixed = session_of(node, "scoped-admin", "system/Patient.rs user/*.rs")
    manifest = manifest_of(mixed, kick_off(mixed, f"{node.fhir}/$export"))
    assert {item["type"] for item in manifest["output"]} == {"Patient"}
    refused = mixed.get(f"{node.fhir}/$export", params={"_type": "Observation"}, headers=ASYNC)
    assert refused.status_code == 403 and is_outcome(refused)


def test_delete_of_a_running_export_stops_it_cleanly(node: Node) -> None:
    for number in range(30):
        create(node, {"resourceType": "Patient", "gender": "female"})
        if number % 10 == 0:
            create(node, {"resourceType": "Organization", "active": True})
    time.sleep(SETTLE_SECONDS + 0.1)
    session = session_of(node, "cancelling-admin", "system/*.rs")
    jobs = []
    for _ in range(10):
        kicked = session.get(f"{node.fhir}/$export", headers=ASYNC, timeout=30)
        assert kicked.status_code == 202 and "Content-Type" not in kicked.headers
        status_url = kicked.headers["Content-Location"]
        cancelled = session.delete(status_url, timeout=30)
        assert cancelled.status_code == 202 and "Content-Type" not in cancelled.headers
        gone = session.get(status_url, timeout=30)
        assert gone.status_code == 404 and is_outcome(gone)
        jobs.append(job_id(status_url))
    deadline = time.monotonic() + 60
    while any(job_row(node, job) is not None for job in jobs):  # each thread forgets its job
        assert time.monotonic() < deadline, "a cancelled export's thread did not stop"
        time.sleep(0.1)
    for job in jobs:
        assert not (node.directory / "bulk" / f"export-{job}").exists()
    log = (node.directory / "server.log").read_text().splitlines()
    lines = [json.loads(line) for line in log if line.startswith("{")]  # JSON: the node's lines
    about = [line for line in lines if any(job in json.dumps(line) for job in jobs)]
    assert about and all(line["level"] in ("INFO", "DEBUG") for line in about), about
    assert not any("exception" in line for line in about)


def test_type_filter_lists_and_result_parameters(node: Node) -> None:
    patient = create(node, {"resourceType": "Patient", "gender": "other"})
    wanted = {
        create(node, observation(patient, "1920-8")),
        create(node, observation(patient, "1742-6", status="preliminary")),
    }
    create(node, observation(patient, "1742-6"))  # neither: final, another code
    time.sleep(SETTLE_SECONDS + 0.1)
    session = session_of(node, "filtering-admin", "system/*.rs")

    def exported_ids(type_filter: str) -> set[str]:
        status_url = kick_off(
            session,
            f"{node.fhir}/Patient/$export",
            _type="Observation",
            _typeFilter=type_filter,
        )
        return {r["id"] for r in exported(session, manifest_of(session, status_url))}

    # a comma before "Type?" starts the next query: the two are OR-ed
    assert (
        exported_ids(
            f"Observation?code=1920-8&subject=Patient/{patient},"
            f"Observation?status=preliminary&subject=Patient/{patient}"
        )
        == wanted
    )
    # an escaped comma is part of the value: one query, a code nothing has
    assert exported_ids(f"Observation?subject=Patient/{patient}&code=1920-8\\,Observation?") == (
        set()
    )
    for name, value in [
        ("_sort", "date"),
        ("_include", "Observation:subject"),
        ("_revinclude", "Provenance:target"),
        ("_count", "10"),
        ("_summary", "true"),
        ("_elements", "id"),
        ("_total", "accurate"),
        ("_contained", "true"),
        ("_containedType", "contained"),
        ("_include:iterate", "Observation:subject"),
    ]:
        answer = session.get(
            f"{node.fhir}/$export",
            params={
                "_type": "Observation",
                "_typeFilter": f"Observation?status=final&{name}={value}",
            },
            headers=ASYNC,
            timeout=30,
        )
        assert answer.status_code == 400 and is_outcome(answer), (name, answer.text)
        assert name in answer.text


def test_a_groups_inactive_and_out_of_period_members_are_left_out(node: Node) -> None:
    current, inactive, ended, future, begun = (
        create(node, {"resourceType": "Patient", "gender": "unknown"}) for _ in range(5)
    )
    group = create(
        node,
        {
            "resourceType": "Group",
            "type": "person",
            "actual": True,
            "member": [
                {"entity": {"reference": f"Patient/{current}"}},
                {"entity": {"reference": f"Patient/{inactive}"}, "inactive": True},
                {"entity": {"reference": f"Patient/{ended}"}, "period": {"end": "2020-01-01"}},
                {"entity": {"reference": f"Patient/{future}"}, "period": {"start": "2999"}},
                {
                    "entity": {"reference": f"Patient/{begun}"},
                    "period": {"start": "2020-01-01T00:00:00Z", "end": "2999-12-31"},
                },
            ],
        },
    )
    for patient in (current, inactive, ended, future, begun):
        create(node, observation(patient, "2345-7"))
    time.sleep(SETTLE_SECONDS + 0.1)
    session = session_of(node, "group-admin", "system/*.rs")
    out = exported(
        session,
        manifest_of(
            session,
            kick_off(session, f"{node.fhir}/Group/{group}/$export", _type="Patient,Observation"),
        ),
    )
    assert {r["id"] for r in out if r["resourceType"] == "Patient"} == {current, begun}
    subjects = {r["subject"]["reference"] for r in out if r["resourceType"] == "Observation"}
    assert subjects == {f"Patient/{current}", f"Patient/{begun}"}


def test_a_finished_export_expires_and_its_files_go(node: Node) -> None:
    create(node, {"resourceType": "Patient", "gender": "female"})
    time.sleep(SETTLE_SECONDS + 0.1)
    session = session_of(node, "expiring-admin", "system/*.rs")
    status_url = kick_off(session, f"{node.fhir}/$export", _type="Patient")
    manifest_of(session, status_url)
    done = session.get(status_url, timeout=30)
    job = job_row(node, job_id(status_url))
    expires = parsedate_to_datetime(done.headers["Expires"])
    assert expires == datetime.fromtimestamp(job.finished // 10**6 + RETENTION_SECONDS, UTC)
    folder = node.directory / "bulk" / f"export-{job.id}"
    assert any(folder.iterdir())
    ended_a_day_ago(node, job)
    other = session_of(node, "another-expiring-admin", "system/*.rs")
    assert other.get(f"{node.fhir}/$bulk-status/nothing", timeout=30).status_code == 404
    assert not folder.exists() and job_row(node, job.id) is None
    assert session.get(status_url, timeout=30).status_code == 404


def test_a_kick_off_may_be_posted_with_patients(node: Node) -> None:
    asked, left = (create(node, {"resourceType": "Patient", "gender": "male"}) for _ in "ab")
    for patient in (asked, left):
        create(node, observation(patient, "2345-7"))
    group = create(
        node,
        {
            "resourceType": "Group",
            "type": "person",
            "actual": True,
            "member": [{"entity": {"reference": f"Patient/{p}"}} for p in (asked, left)],
        },
    )
    time.sleep(SETTLE_SECONDS + 0.1)
    session = session_of(node, "posting-admin", "system/*.rs")
    body = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "_type", "valueString": "Patient,Observation"},
            {"name": "_outputFormat", "valueString": "application/fhir+ndjson"},
            {"name": "patient", "valueReference": {"reference": f"Patient/{asked}"}},
        ],
    }
    for url in (f"{node.fhir}/Patient/$export", f"{node.fhir}/Group/{group}/$export"):
        kicked = session.post(url, json=body, headers=ASYNC, timeout=30)
        assert kicked.status_code == 202, kicked.text
        manifest = manifest_of(session, kicked.headers["Content-Location"])
        assert manifest["request"] == url
        out = exported(session, manifest)
        assert {r["id"] for r in out if r["resourceType"] == "Patient"} == {asked}
        assert {r["subject"]["reference"] for r in out if "subject" in r} == {f"Patient/{asked}"}
    refusals = [
        (f"{node.fhir}/$export", body, "system-level"),
        (f"{node.fhir}/Patient/$export", {"resourceType": "Patient"}, "Parameters"),
        (
            f"{node.fhir}/Patient/$export",
            {
                "resourceType": "Parameters",
                "parameter": [{"name": "_elements", "valueString": "id"}],
            },
            "_elements",
        ),
    ]
    for url, refused, text in refusals:
        answer = session.post(url, json=refused, headers=ASYNC, timeout=30)
        assert answer.status_code == 400 and is_outcome(answer) and text in answer.text
    by_get = session.get(
        f"{node.fhir}/Patient/$export",
        params={"patient": f"Patient/{asked}"},
        headers=ASYNC,
        timeout=30,
    )
    assert by_get.status_code == 400 and "POST" in by_get.text


def test_a_lenient_kick_off_leaves_out_what_is_not_supported_and_says_so(node: Node) -> None:
    patient = create(node, {"resourceType": "Patient", "gender": "unknown"})
    session = session_of(node, "lenient-admin", "system/*.rs")
    time.sleep(SETTLE_SECONDS + 0.1)
    unsupported = {"_elements": "id", "includeAssociatedData": "LatestProvenanceResources"}
    strict = session.get(
        f"{node.fhir}/$export",
        params={"_type": "Patient", **unsupported},
        headers=ASYNC,
        timeout=30,
    )
    assert strict.status_code == 400 and "handling=lenient" in strict.text
    lenient = {**ASYNC, "Prefer": "respond-async, handling=lenient"}
    kicked = session.get(
        f"{node.fhir}/$export",
        params={"_type": "Patient", **unsupported},
        headers=lenient,
        timeout=30,
    )
    assert kicked.status_code == 202, kicked.text
    assert kicked.headers["Content-Type"] == "application/fhir+json"
    issues = kicked.json()["issue"]
    assert [issue["severity"] for issue in issues] == ["warning", "warning"]
    assert "'_elements'" in issues[0]["diagnostics"]
    assert "'includeAssociatedData'" in issues[1]["diagnostics"]
    out = exported(session, manifest_of(session, kicked.headers["Content-Location"]))
    assert patient in {r["id"] for r in out}
    assert all("gender" in r for r in out)  # _elements was left out, not applied
    # lenient leaves out unknown parameters only: a supported one's bad value is still a 400
    bad = session.get(
        f"{node.fhir}/$export",
        params={"_type": "Patient", "_since": "soon"},
        headers=lenient,
        timeout=30,
    )
    assert bad.status_code == 400 and is_outcome(bad) and "_since" in bad.text
    posted = session.post(
        f"{node.fhir}/Patient/$export",
        json={
            "resourceType": "Parameters",
            "parameter": [
                {"name": "_type", "valueString": "Patient"},
                {"name": "allowPartialManifests", "valueBoolean": True},  # not a string
            ],
        },
        headers=lenient,
        timeout=30,
    )
    assert posted.status_code == 202, posted.text
    assert "'allowPartialManifests'" in posted.json()["issue"][0]["diagnostics"]
    assert exported(session, manifest_of(session, posted.headers["Content-Location"]))
    plain = session.get(
        f"{node.fhir}/$export", params={"_type": "Patient"}, headers=lenient, timeout=30
    )
    assert plain.status_code == 202 and not plain.content  # nothing left out: no body
    assert exported(session, manifest_of(session, plain.headers["Content-Location"]))


def test_running_exports_are_capped(node: Node) -> None:
    ids = [f"busy-{n}" for n in range(MOST_RUNNING)]
    with node.database.write_engine.begin() as conn:  # as many running as the node takes
        for busy in ids:
            conn.execute(
                bulk_jobs_table.insert().values(
                    id=busy,
                    kind="export",
                    owner="someone-else",
                    request="{}",
                    state=bulk_jobs.RUNNING,
                    created=now_micros(),
                    heartbeat=now_micros() + 3600 * 10**6,  # alive while the test runs
                    progress="{}",
                )
            )
    session = session_of(node, "capped-admin", "system/*.rs")
    try:
        answer = session.get(f"{node.fhir}/$export", headers=ASYNC, timeout=30)
        assert answer.status_code == 429 and is_outcome(answer)
        assert answer.headers["Retry-After"] == str(bulk_jobs.BUSY_RETRY_SECONDS)
    finally:
        with node.database.write_engine.begin() as conn:
            conn.execute(bulk_jobs_table.delete().where(bulk_jobs_table.c.id.in_(ids)))
    assert session.get(f"{node.fhir}/$export", headers=ASYNC, timeout=30).status_code == 202


def test_a_failed_export_names_no_server_path(node: Node) -> None:
    (node.directory / "bulk").mkdir(exist_ok=True)
    (node.directory / "bulk" / "export-broken-job").write_text("not a folder")  # mkdir fails
    lost_export_job(node, "broken-job", "failing-admin")
    session = session_of(node, "failing-admin", "system/*.rs")
    deadline = time.monotonic() + 60
    while (
        answer := session.get(f"{node.fhir}/$bulk-status/broken-job", timeout=30)
    ).status_code == 202:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert answer.status_code == 500 and is_outcome(answer)
    assert "FileExistsError" in answer.text
    assert str(node.directory) not in answer.text and "/bulk/" not in answer.text
