"""FHIR Bulk Data export (``$export``) from a real node, followed step by step as the Bulk Data
Access IG 2.0 tells a client to: kick-off with ``Prefer: respond-async``, poll the status URL
until the manifest, fetch each file with the token, or cancel with DELETE. Resources imported
in bulk come out the same; compartments, ``_type``, ``_since`` and ``_typeFilter`` hold."""

from __future__ import annotations

import json
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import requests

from fhir_adapters.store import jsonio, now_micros
from fhir_adapters.store.resources import RESOURCE_TYPES
from node.db.schema import bulk_jobs_table
from node.flows import bulk_jobs
from node.flows.bulk_export import SETTLE_SECONDS
from node.flows.bulk_import import COUNTS_EXTENSION
from tests.helpers.minimal import minimal
from tests.helpers.ndjson import cohort_resources, without_server_meta, write_ndjson
from tests.helpers.nodes import Node, invoke

ASYNC = {"Prefer": "respond-async", "Accept": "application/fhir+json"}


def exporter(node: Node) -> requests.Session:
    session = requests.Session()
    token = node.token("bulk-admin", "admin", scope="system/*.rs")
    session.headers["Authorization"] = f"Bearer {token}"
    return session


def kick_off(session: requests.Session, url: str, **params: str) -> str:
    answer = session.get(url, params=params, headers=ASYNC, timeout=30)
    assert answer.status_code == 202, answer.text
    return answer.headers["Content-Location"]


def manifest_of(session: requests.Session, status_url: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while True:
        answer = session.get(status_url, timeout=30)
        if answer.status_code == 200:
            assert answer.headers["Content-Type"].startswith("application/json")
            manifest: dict[str, Any] = answer.json()
            return manifest
        assert answer.status_code == 202, answer.text
        assert "X-Progress" in answer.headers and "Retry-After" in answer.headers
        assert time.monotonic() < deadline, "the export did not finish"
        time.sleep(0.2)


def exported(session: requests.Session, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    resources = []
    for item in manifest["output"]:
        answer = session.get(item["url"], timeout=30)
        assert answer.status_code == 200
        assert answer.headers["Content-Type"].startswith("application/fhir+ndjson")
        lines = answer.content.decode("utf-8").splitlines()
        assert len(lines) == item["count"]
        for line in lines:
            resource = jsonio.parse(line)
            assert resource["resourceType"] == item["type"]
            resources.append(resource)
    return resources


def test_what_was_imported_comes_out_the_same(node: Node, tmp_path: Path) -> None:
    resources = cohort_resources(6, seed=20)
    files = write_ndjson(resources, tmp_path / "in")
    result = invoke(
        "adapters", "bulk-import", "--dir", str(node.directory), "--workers", "0", *map(str, files)
    )
    assert result.exit_code == 0, result.output
    time.sleep(SETTLE_SECONDS + 0.1)  # an export holds what was written before it, settled
    session = exporter(node)
    types = sorted({r["resourceType"] for r in resources})
    manifest = manifest_of(
        session, kick_off(session, f"{node.fhir}/$export", _type=",".join(types))
    )
    assert manifest["requiresAccessToken"] is True and manifest["error"] == []
    assert (
        manifest["request"].endswith("$export?_type=" + "%2C".join(types))
        or "_type=" in manifest["request"]
    )
    out = {(r["resourceType"], r["id"]): r for r in exported(session, manifest)}
    for resource in resources:
        mine = without_server_meta(jsonio.parse(json.dumps(resource, ensure_ascii=False)))
        assert without_server_meta(out[(resource["resourceType"], resource["id"])]) == mine
    values = [r["valueQuantity"]["value"] for r in out.values() if "valueQuantity" in r]
    assert values and all(isinstance(v, Decimal | int) for v in values)


def test_every_type_round_trips_and_references_resolve_in_any_order(
    node: Node, tmp_path: Path
) -> None:
    patient = {
        "resourceType": "Patient",
        "id": "rt-p0",
        "name": [{"family": "王", "given": ["小明"], "text": "王小明"}],
        "extension": [
            {"url": "urn:x:weight", "valueDecimal": Decimal("70.250")},
            {"url": "urn:x:tiny", "valueDecimal": Decimal("1.0E-7")},
        ],
    }
    lines = []
    for resource_type in RESOURCE_TYPES:
        if resource_type in ("Patient", "AuditEvent"):
            continue
        resource = minimal(resource_type, "Patient/rt-p0")
        resource["id"] = f"rt-{resource_type}"[:64]
        lines.append(resource)
    lines.append(patient)  # last: the others wait for it
    source = tmp_path / "every-type.ndjson"
    source.write_bytes(b"".join(jsonio.dump(r) + b"\n" for r in lines))
    result = invoke("adapters", "bulk-import", "--dir", str(node.directory), str(source))
    assert result.exit_code == 0, result.output
    assert f"{len(lines)} created" in result.output, result.output
    time.sleep(SETTLE_SECONDS + 0.1)
    session = exporter(node)
    out = {
        (r["resourceType"], r["id"]): r
        for r in exported(session, manifest_of(session, kick_off(session, f"{node.fhir}/$export")))
    }
    for resource in lines:
        assert without_server_meta(
            out[(resource["resourceType"], resource["id"])]
        ) == without_server_meta(resource)
    weight = out[("Patient", "rt-p0")]["extension"][0]["valueDecimal"]
    assert str(weight) == "70.250"
    # an AuditEvent cannot be imported: the node writes its own audit trail
    forged = tmp_path / "forged.ndjson"
    forged.write_bytes(jsonio.dump(minimal("AuditEvent", "Patient/rt-p0") | {"id": "f1"}) + b"\n")
    refused = invoke("adapters", "bulk-import", "--dir", str(node.directory), str(forged))
    assert refused.exit_code == 1 and "not imported" in refused.output, refused.output


def test_levels_type_since_and_filters(node: Node) -> None:
    session = exporter(node)
    doctor = node.session()

    def create(resource: dict[str, Any]) -> str:
        answer = doctor.post(f"{node.fhir}/{resource['resourceType']}", json=resource, timeout=30)
        assert answer.status_code == 201, answer.text
        return str(answer.json()["id"])

    inside = create({"resourceType": "Patient", "name": [{"text": "组内"}]})
    outside = create({"resourceType": "Patient", "name": [{"text": "组外"}]})
    for patient, code in ((inside, "2345-7"), (outside, "2345-7"), (inside, "718-7")):
        create(
            {
                "resourceType": "Observation",
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                "subject": {"reference": f"Patient/{patient}"},
            }
        )
    organization = create({"resourceType": "Organization", "name": "导出医院"})
    group = create(
        {
            "resourceType": "Group",
            "type": "person",
            "actual": True,
            "member": [{"entity": {"reference": f"Patient/{inside}"}}],
        }
    )
    time.sleep(SETTLE_SECONDS + 0.1)
    grouped = exported(
        session,
        manifest_of(
            session,
            kick_off(session, f"{node.fhir}/Group/{group}/$export", _type="Patient,Observation"),
        ),
    )
    assert {r["id"] for r in grouped if r["resourceType"] == "Patient"} == {inside}
    subjects = {r["subject"]["reference"] for r in grouped if r["resourceType"] == "Observation"}
    assert subjects == {f"Patient/{inside}"}
    # the Group's patient sees, in their audit trail, that the export was about them
    auditor = node.session(node.token("bulk-auditor", "auditor"))

    def exports_about(patient: str) -> list[dict[str, Any]]:
        found = auditor.get(f"{node.fhir}/AuditEvent", params={"patient": patient}, timeout=30)
        assert found.status_code == 200, found.text
        return [
            e["resource"]
            for e in found.json().get("entry", [])
            if "$export" in e["resource"].get("outcomeDesc", "")
            and f"Group/{group}/_history/1" in str(e["resource"].get("entity"))
        ]

    deadline = time.monotonic() + 10
    while not exports_about(inside) and time.monotonic() < deadline:
        time.sleep(0.2)  # AuditEvents are written in batches, a moment later
    (event,) = exports_about(inside)
    assert event["outcome"] == "0" and event["agent"][0]["who"]["display"] == "bulk-admin"
    assert exports_about(outside) == []
    # a patient-level export has no Organizations; a system one has
    everyone = exported(
        session, manifest_of(session, kick_off(session, f"{node.fhir}/Patient/$export"))
    )
    assert organization not in {r["id"] for r in everyone if r["resourceType"] == "Organization"}
    assert {inside, outside} <= {r["id"] for r in everyone if r["resourceType"] == "Patient"}
    # _typeFilter: only glucose
    filtered = exported(
        session,
        manifest_of(
            session,
            kick_off(
                session,
                f"{node.fhir}/$export",
                _type="Observation",
                _typeFilter="Observation?code=http://loinc.org|2345-7",
            ),
        ),
    )
    assert filtered and {r["code"]["coding"][0]["code"] for r in filtered} == {"2345-7"}
    # _since: the manifest's transactionTime of one export, given to the next, brings only
    # what changed after it
    doomed = {
        patient: create(
            {
                "resourceType": "Observation",
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
                "subject": {"reference": f"Patient/{patient}"},
            }
        )
        for patient in (inside, outside)
    }
    time.sleep(SETTLE_SECONDS + 0.1)
    first = manifest_of(session, kick_off(session, f"{node.fhir}/$export", _type="Patient"))
    assert "deleted" not in first  # without _since there is nothing to say
    later = create({"resourceType": "Patient", "name": [{"text": "后来"}]})
    for observation in doomed.values():
        assert doctor.delete(f"{node.fhir}/Observation/{observation}").status_code in (200, 204)
    time.sleep(SETTLE_SECONDS + 0.1)
    since = first["transactionTime"]
    changed = manifest_of(
        session, kick_off(session, f"{node.fhir}/$export", _type="Patient", _since=since)
    )
    assert [r["id"] for r in exported(session, changed)] == [later]
    assert changed["deleted"] == []
    # with _since, what was deleted since is listed as transaction Bundles of DELETEs; a Group
    # export lists only what was in its patients' compartments
    for url, gone in [
        (f"{node.fhir}/$export", set(doomed.values())),
        (f"{node.fhir}/Patient/$export", set(doomed.values())),
        (f"{node.fhir}/Group/{group}/$export", {doomed[inside]}),
    ]:
        manifest = manifest_of(session, kick_off(session, url, _type="Observation", _since=since))
        deleted = set()
        for item in manifest["deleted"]:
            assert item["type"] == "Bundle"
            for line in session.get(item["url"], timeout=30).text.splitlines():
                bundle = json.loads(line)
                assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction"
                for entry in bundle["entry"]:
                    assert entry["request"]["method"] == "DELETE"
                    deleted.add(entry["request"]["url"].removeprefix("Observation/"))
        assert deleted == gone, url


def test_bad_kick_offs_are_refused_clearly(node: Node) -> None:
    session = exporter(node)
    cases = [
        ({}, {"Accept": "application/fhir+json"}, 400, "respond-async"),
        ({"_outputFormat": "text/csv"}, ASYNC, 400, "_outputFormat"),
        ({"_type": "Banana"}, ASYNC, 400, "Banana"),
        ({"_since": "yesterday"}, ASYNC, 400, "instant"),
        ({"_elements": "id"}, ASYNC, 400, "_elements"),
        ({"_typeFilter": "Observation?nonsense=1", "_type": "Observation"}, ASYNC, 400, "nonsense"),
    ]
    for params, headers, status, text in cases:
        answer = session.get(f"{node.fhir}/$export", params=params, headers=headers, timeout=30)
        assert answer.status_code == status, (params, answer.text)
        assert answer.json()["resourceType"] == "OperationOutcome" and text in answer.text
    doctor = node.session()  # a user/ token: no bulk export
    answer = doctor.get(f"{node.fhir}/$export", headers=ASYNC, timeout=30)
    assert answer.status_code == 403 and "system/" in answer.text
    assert requests.get(f"{node.fhir}/$export", headers=ASYNC, timeout=30).status_code == 401
    missing = session.get(f"{node.fhir}/Group/nope/$export", headers=ASYNC, timeout=30)
    assert missing.status_code == 404


def test_a_job_is_its_owners_and_delete_cancels_it(node: Node) -> None:
    session = exporter(node)
    status_url = kick_off(session, f"{node.fhir}/$export", _type="Patient")
    other = requests.Session()
    other.headers["Authorization"] = "Bearer " + node.token(
        "other-admin", "admin", scope="system/*.rs"
    )
    assert other.get(status_url, timeout=30).status_code == 404
    manifest = manifest_of(session, status_url)
    file_url = manifest["output"][0]["url"]
    assert other.get(file_url, timeout=30).status_code == 404
    assert requests.get(file_url, timeout=30).status_code == 401
    assert session.delete(status_url, timeout=30).status_code == 202
    assert session.get(status_url, timeout=30).status_code == 404
    assert session.get(file_url, timeout=30).status_code == 404


def import_parameters(*files: Path) -> dict[str, Any]:
    """Each file's input; declared of the type it is named after, if any (``Patient.ndjson``)."""
    inputs = [
        {
            "name": "input",
            "part": [
                *(
                    [{"name": "type", "valueCode": path.stem}]
                    if path.stem in RESOURCE_TYPES
                    else []
                ),
                {"name": "url", "valueUri": path.as_uri()},
            ],
        }
        for path in files
    ]
    return {
        "resourceType": "Parameters",
        "parameter": [{"name": "inputFormat", "valueCode": "application/fhir+ndjson"}, *inputs],
    }


def test_import_over_fhir_runs_as_a_job_and_reports_refused_lines(node: Node) -> None:
    folder = node.directory / "import"
    resources = cohort_resources(3, seed=31)
    files = write_ndjson(resources, folder / "cohort")
    bad = folder / "bad.ndjson"
    bad.write_text('{"resourceType":"Patient","id":"x1","gender":"sometimes"}\nnot json\n')
    admin = requests.Session()
    admin.headers["Authorization"] = "Bearer " + node.token(
        "bulk-loader", "admin", scope="system/*.cruds"
    )
    answer = admin.post(
        f"{node.fhir}/$import",
        json=import_parameters(*files, bad),
        headers={"Prefer": "respond-async"},
        timeout=30,
    )
    assert answer.status_code == 202, answer.text
    manifest = manifest_of(admin, answer.headers["Content-Location"])
    created = [item["extension"][COUNTS_EXTENSION]["created"] for item in manifest["output"]]
    assert sum(created) == len(resources)
    assert [item["inputUrl"] for item in manifest["output"]] == [
        path.as_uri() for path in (*files, bad)
    ]
    [error] = manifest["error"]
    assert error["count"] == 2
    outcomes = admin.get(error["url"], timeout=30)
    assert outcomes.status_code == 200
    reasons = [jsonio.parse(line)["issue"][0]["diagnostics"] for line in outcomes.text.splitlines()]
    # named by the file's name in the import directory, not by the server's path
    assert reasons[0].startswith("bad.ndjson:1: ") and "gender" in reasons[0]
    assert reasons[1].startswith("bad.ndjson:2: ") and "not JSON" in reasons[1]
    assert str(node.directory) not in outcomes.text
    patient = next(r for r in resources if r["resourceType"] == "Patient")
    read = node.session().get(f"{node.fhir}/Patient/{patient['id']}", timeout=30)
    assert read.status_code == 200 and read.json()["name"] == patient["name"]
    # what a request may not name: a file elsewhere, or a URL the node would fetch
    for url in ("file:///etc/passwd", "http://127.0.0.1:1/x.ndjson"):
        refused = admin.post(
            f"{node.fhir}/$import",
            json={
                "resourceType": "Parameters",
                "parameter": [{"name": "input", "part": [{"name": "url", "valueUri": url}]}],
            },
            headers={"Prefer": "respond-async"},
            timeout=30,
        )
        assert refused.status_code == 400 and "import directory" in refused.text, refused.text
    doctor = node.session().post(
        f"{node.fhir}/$import",
        json=import_parameters(bad),
        headers={"Prefer": "respond-async"},
        timeout=30,
    )
    assert doctor.status_code == 403


def lost_export_job(node: Node, job_id: str, owner: str) -> None:
    """A running system export of Patients whose process was lost (its heartbeat stale), as a
    process that died leaves it."""
    request = {
        "level": "system",
        "group": None,
        "types": ["Patient"],
        "since": None,
        "type_filters": {},
        "url": f"{node.fhir}/$export?_type=Patient",
    }
    with node.database.write_engine.begin() as conn:
        conn.execute(
            bulk_jobs_table.insert().values(
                id=job_id,
                kind="export",
                owner=owner,
                request=json.dumps(request),
                state=bulk_jobs.RUNNING,
                created=now_micros(),
                heartbeat=now_micros() - (bulk_jobs.STALE_SECONDS + 5) * 10**6,
                progress="{}",
            )
        )


def test_a_job_whose_process_was_lost_runs_again_at_the_next_poll(node: Node) -> None:
    session = exporter(node)
    made = node.session().post(
        f"{node.fhir}/Patient", json={"resourceType": "Patient", "gender": "female"}, timeout=30
    )
    assert made.status_code == 201
    time.sleep(SETTLE_SECONDS + 0.1)
    lost_export_job(node, "lost-job", "bulk-admin")
    manifest = manifest_of(session, f"{node.fhir}/$bulk-status/lost-job")
    assert {item["type"] for item in manifest["output"]} == {"Patient"}
    names = [Path(item["url"]).name for item in manifest["output"]]
    ids = [r["id"] for r in exported(session, manifest)]
    assert names == ["Patient-1.ndjson"] and made.json()["id"] in ids
