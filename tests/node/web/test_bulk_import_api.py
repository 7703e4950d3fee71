"""``POST [base]/$import`` on a real node: the request as the SMART/HL7 ``$import`` proposal
words it (``inputFormat``, ``input`` with ``type`` and ``url``), each line stored only when the
token may write its type, a declared ``type`` held to, ``mode`` refused rather than ignored,
and the completion manifest shaped as the proposal says (nothing outside ``extension`` that it
does not name)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import requests

from fhir_adapters.store import jsonio
from node.flows.bulk_import import COUNTS_EXTENSION
from tests.helpers.nodes import Node
from tests.node.flows.test_bulk_import import glucose, lines_file, patient
from tests.node.web.test_bulk_data import manifest_of

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
