"""``POST [base]/$import`` on a real node: the request as the SMART/HL7 ``$import`` proposal
words it (``inputFormat``, ``input`` with ``type`` and ``url``), each line stored only when the
token may write its type, a declared ``type`` held to, ``mode`` refused rather than ignored,
the completion manifest shaped as the proposal says (nothing outside ``extension`` that it
does not name), and a job followed with the kick-off's authorization and deleted whole (its
record, held and refused lines, folder; not what it stored) by ``DELETE`` or at ``Expires``."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import requests
import sqlalchemy as sa

from fhir_adapters.store import jsonio, tables
from node.flows.bulk_import import COUNTS_EXTENSION
from node.flows.bulk_jobs import RETENTION_SECONDS
from tests.helpers.nodes import Node
from tests.node.flows.test_bulk_import import glucose, lines_file, patient
from tests.node.web.test_bulk_data import manifest_of
from tests.node.web.test_bulk_export_rules import ended_a_day_ago, job_id, job_row

MANIFEST_KEYS = {"transactionTime", "request", "requiresAccessToken", "output", "error"}
ITEM_KEYS = {"type", "url", "count", "inputUrl", "extension"}  # of output and error items


def importer(node: Node, scope: str) -> requests.Session:
    session = requests.Session()
    session.headers["Authorization"] = "Bearer " + node.token("importer", "admin", scope=scope)
    return session


def parameters(*inputs: tuple[Path, str | None], **extra: str) -> dict[str, Any]:
    """A $import Parameters: one input per (file, declared type or None)."""
    parameter: list[dict[str, Any]] = [
        {"name": "inputFormat", "valueCode": "application/fhir+ndjson"},
        {"name": "inputSource", "valueUri": "https://his.example/fhir"},
    ]
    parameter += [{"name": name, "valueCode": value} for name, value in extra.items()]
    for path, declared in inputs:
        parts: list[dict[str, Any]] = [{"name": "url", "valueUri": path.as_uri()}]
        if declared is not None:
            parts.insert(0, {"name": "type", "valueCode": declared})
        parameter.append({"name": "input", "part": parts})
    return {"resourceType": "Parameters", "parameter": parameter}


def kick_off(session: requests.Session, node: Node, body: dict[str, Any]) -> requests.Response:
    return session.post(
        f"{node.fhir}/$import", json=body, headers={"Prefer": "respond-async"}, timeout=30
    )


def folder_of(node: Node) -> tuple[Path, str]:
    """A fresh folder in the node's import directory, and a prefix for unique ids."""
    tag = uuid.uuid4().hex[:8]
    folder = node.directory / "import" / tag
    folder.mkdir(parents=True)
    return folder, tag


def test_only_the_types_the_token_may_write_are_stored_and_the_manifest_says_so(
    node: Node,
) -> None:
    folder, tag = folder_of(node)
    mixed = lines_file(
        folder / "mixed.ndjson",
        patient(f"{tag}-p1"),
        glucose(f"{tag}-g1", f"Patient/{tag}-p1", "5.6"),  # the token may not create these
        patient(f"{tag}-p2"),
    )
    patients = lines_file(folder / "patients.ndjson", patient(f"{tag}-p3"))
    session = importer(node, "system/Patient.c")
    answer = kick_off(session, node, parameters((mixed, None), (patients, "Patient")))
    assert answer.status_code == 202, answer.text
    manifest = manifest_of(session, answer.headers["Content-Location"])
    assert set(manifest) <= MANIFEST_KEYS | {"extension"}
    assert manifest["requiresAccessToken"] is True
    assert manifest["request"] == f"{node.fhir}/$import"
    for item in manifest["output"] + manifest["error"]:
        assert set(item) <= ITEM_KEYS and item["type"] == "OperationOutcome", item
    first, second = manifest["output"]
    assert first["inputUrl"] == mixed.as_uri() and second["inputUrl"] == patients.as_uri()
    assert first["count"] == 2 and second["count"] == 1
    assert first["extension"][COUNTS_EXTENSION] == {
        "created": 2,
        "updated": 0,
        "unchanged": 0,
        "refused": 1,
    }
    [error] = manifest["error"]
    assert error["count"] == 1
    outcomes = session.get(error["url"], timeout=30)
    assert outcomes.status_code == 200
    [line] = outcomes.text.splitlines()
    diagnostics = jsonio.parse(line)["issue"][0]["diagnostics"]
    named = mixed.relative_to(node.directory / "import")  # not the server's path
    assert diagnostics.startswith(f"{named}:2: importer (admin) may not create Observation")
    reader = node.session()
    assert reader.get(f"{node.fhir}/Observation/{tag}-g1", timeout=30).status_code == 404
    assert reader.get(f"{node.fhir}/Patient/{tag}-p2", timeout=30).status_code == 200


def test_a_declared_type_is_held_to(node: Node) -> None:
    folder, tag = folder_of(node)
    source = lines_file(
        folder / "Patient.ndjson",
        patient(f"{tag}-p1"),
        glucose(f"{tag}-g1", f"Patient/{tag}-p1", "5.6"),
    )
    session = importer(node, "system/*.cruds")
    answer = kick_off(session, node, parameters((source, "Patient")))
    assert answer.status_code == 202, answer.text
    manifest = manifest_of(session, answer.headers["Content-Location"])
    assert manifest["output"][0]["count"] == 1
    [error] = manifest["error"]
    outcomes = session.get(error["url"], timeout=30).text.splitlines()
    assert [jsonio.parse(line)["issue"][0]["diagnostics"] for line in outcomes] == [
        f"{source.relative_to(node.directory / 'import')}:2: the input is declared to hold "
        "Patient resources, not Observation"
    ]
    assert node.session().get(f"{node.fhir}/Observation/{tag}-g1").status_code == 404


def test_what_cannot_be_honoured_is_refused_before_anything_is_read(node: Node) -> None:
    folder, tag = folder_of(node)
    source = lines_file(folder / "p.ndjson", patient(f"{tag}-p1"))
    session = importer(node, "system/Patient.c")
    for body, status, words in [
        (parameters((source, "Banana")), 400, "not a resource type this node hosts"),
        (parameters((source, "AuditEvent")), 400, "AuditEvent resources are not imported"),
        (parameters((source, "Observation")), 403, "may not create Observation"),
        (parameters((source, None), mode="InitialLoad"), 400, "takes no mode"),
        (parameters((source, None), mode="IncrementalLoad"), 400, "takes no mode"),
        (parameters((source, None), (source, "Patient")), 400, "given twice"),
    ]:
        answer = kick_off(session, node, body)
        assert answer.status_code == status, answer.text
        outcome = answer.json()
        assert outcome["resourceType"] == "OperationOutcome"
        assert words in outcome["issue"][0]["diagnostics"], outcome
    assert node.session().get(f"{node.fhir}/Patient/{tag}-p1").status_code == 404


def job_record(node: Node, status_url: str) -> tuple[Any, int, bool]:
    """A $import job's row (None once forgotten), how many lines its engine keeps, and whether
    its folder is there."""
    engine_job = f"import-{job_id(status_url)}"
    with node.database.engine.connect() as conn:
        lines = conn.execute(
            sa.select(sa.func.count()).where(tables.import_lines.c.job == engine_job)
        ).scalar_one()
    row = job_row(node, job_id(status_url))
    return row, int(lines), (node.directory / "bulk" / engine_job).exists()


def test_a_job_is_followed_with_the_kick_offs_rights_and_deleted_whole(node: Node) -> None:
    folder, tag = folder_of(node)
    source = lines_file(folder / "p.ndjson", patient(f"{tag}-p1"), "{not json")
    session = importer(node, "system/*.cruds")
    status_url = kick_off(session, node, parameters((source, None))).headers["Content-Location"]
    manifest = manifest_of(session, status_url)
    file_url = manifest["error"][0]["url"]
    done = session.get(status_url, timeout=30)
    row, lines, kept = job_record(node, status_url)
    expires = parsedate_to_datetime(done.headers["Expires"])
    assert expires == datetime.fromtimestamp(row.finished // 10**6 + RETENTION_SECONDS, UTC)
    assert lines == 1 and kept
    # the same user, with a token that may not import: neither status, nor file, nor DELETE
    reader = importer(node, "system/*.rs")
    for answer in (
        reader.get(status_url, timeout=30),
        reader.get(file_url, timeout=30),
        reader.delete(status_url, timeout=30),
    ):
        assert answer.status_code == 403, answer.text
        assert "may not import" in answer.json()["issue"][0]["diagnostics"]
    assert job_record(node, status_url) == (row, 1, True)
    assert session.delete(status_url, timeout=30).status_code == 202
    assert session.get(status_url, timeout=30).status_code == 404
    assert session.get(file_url, timeout=30).status_code == 404
    assert job_record(node, status_url) == (None, 0, False)
    assert node.session().get(f"{node.fhir}/Patient/{tag}-p1").status_code == 200  # stays
    # another job, a day after it ended: the next bulk request of anyone deletes it
    again = lines_file(folder / "again.ndjson", patient(f"{tag}-p2"), "[]")
    status_url = kick_off(session, node, parameters((again, None))).headers["Content-Location"]
    manifest_of(session, status_url)
    row, lines, kept = job_record(node, status_url)
    assert lines == 1 and kept
    ended_a_day_ago(node, row)
    other = importer(node, "system/*.rs")
    assert other.get(f"{node.fhir}/$bulk-status/nothing", timeout=30).status_code == 404
    assert job_record(node, status_url) == (None, 0, False)
    assert node.session().get(f"{node.fhir}/Patient/{tag}-p2").status_code == 200


def test_a_running_job_deleted_stops_and_leaves_no_record(node: Node) -> None:
    folder, tag = folder_of(node)
    many = [patient(f"{tag}-p{number}") for number in range(3000)]
    source = lines_file(folder / "many.ndjson", "{not json", *many)
    session = importer(node, "system/*.cruds")
    status_url = kick_off(session, node, parameters((source, None))).headers["Content-Location"]
    assert session.delete(status_url, timeout=30).status_code == 202
    assert session.get(status_url, timeout=30).status_code == 404  # gone for the client at once
    deadline = time.monotonic() + 60
    while job_record(node, status_url)[0] is not None:  # its thread forgets it
        assert time.monotonic() < deadline, "the cancelled job's thread did not end"
        time.sleep(0.1)
    assert job_record(node, status_url) == (None, 0, False)
