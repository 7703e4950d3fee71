"""Bulk import (``hrx adapters bulk-import``): every line stored as the API would store it or
reported and kept aside, references resolved in any order, and a crash in the middle resumed
with nothing stored twice, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from consent.model import consent_resource
from consent.pseudonym import RESIDENT_ID_SYSTEM
from fhir_adapters.store import jsonio, tables
from ledger.store import ChainStore
from node.base.config import load_config
from node.db.engines import open_database
from tests.helpers.ndjson import cohort_resources, without_server_meta, write_ndjson
from tests.helpers.nodes import invoke, joined_node_dir


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def node_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    with joined_node_dir(tmp_path / "hosp-a", "hosp-a", request.param) as directory:
        yield directory


def stored(directory: Path) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Every stored version of every resource, by type and id (AuditEvents left out)."""
    database = open_database(load_config(directory).database_url)
    R, V = tables.resources, tables.versions
    found: dict[tuple[str, str], list[dict[str, Any]]] = {}
    try:
        with database.engine.connect() as conn:
            rows = conn.execute(
                sa.select(R.c.type, R.c.id, V.c.body)
                .select_from(R.join(V, V.c.res_pk == R.c.res_pk))
                .where(R.c.type != "AuditEvent")
                .order_by(V.c.version)
            )
            for resource_type, resource_id, body in rows:
                found.setdefault((resource_type, resource_id), []).append(jsonio.parse(body))
    finally:
        database.close()
    return found


def bulk_import(directory: Path, *files: Path, workers: str = "1") -> Any:
    args = ["adapters", "bulk-import", "--dir", str(directory), "--workers", workers]
    return invoke(*args, *map(str, files))


def patient(resource_id: str, **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": resource_id, "name": [{"text": "张三"}], **extra}


def glucose(resource_id: str, subject: str, value: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": resource_id,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "15074-8"}], "text": "葡萄糖"},
        "subject": {"reference": subject},
        "valueQuantity": {"value": Decimal(value), "unit": "mmol/L"},
    }


def lines_file(path: Path, *items: dict[str, Any] | str) -> Path:
    text = [item if isinstance(item, str) else jsonio.dump(item).decode() for item in items]
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    return path


def test_a_cohort_is_stored_whole_with_its_text_and_decimals(
    node_dir: Path, tmp_path: Path
) -> None:
    resources = cohort_resources(12)
    files = write_ndjson(resources, tmp_path / "in")
    result = bulk_import(node_dir, *files)
    assert result.exit_code == 0, result.output
    assert f"{len(resources):,} created, 0 updated, 0 unchanged, 0 refused" in result.output
    found = stored(node_dir)
    for resource in resources:
        versions = found[(resource["resourceType"], resource["id"])]
        assert len(versions) == 1
        assert versions[0]["meta"]["versionId"] == "1"
        assert versions[0]["meta"]["lastUpdated"] > "2026"  # the time it was stored
        assert without_server_meta(versions[0]) == without_server_meta(
            jsonio.parse(json.dumps(resource, ensure_ascii=False))
        )
    # the search index was built as the API builds it
    database = open_database(load_config(node_dir).database_url)
    try:
        with database.engine.connect() as conn:
            linked = conn.execute(
                sa.select(sa.func.count()).select_from(tables.compartment)
            ).scalar_one()
    finally:
        database.close()
    assert linked >= len([r for r in resources if r["resourceType"] == "Observation"])
    # run again: the same job, finished; a new job over the same content changes nothing
    again = bulk_import(node_dir, *files)
    assert again.exit_code == 0 and "0 created" in again.output, again.output
    assert stored(node_dir) == found


def test_references_resolve_in_any_order_and_unresolvable_lines_are_refused(
    node_dir: Path, tmp_path: Path
) -> None:
    mixed = lines_file(
        tmp_path / "mixed.ndjson",
        glucose("g1", "Patient/p1", "5.60"),  # its patient comes later, in another file
        glucose("g2", "Patient/nobody", "7.1"),  # its patient is nowhere
        glucose("g3", "Patient/p2", "6.0"),  # its patient is refused
    )
    patients = lines_file(
        tmp_path / "b-patients.ndjson",
        patient("p1"),
        patient("p2", gender="somewhere"),  # not a code R4 allows
    )
    result = bulk_import(node_dir, mixed, patients)
    assert result.exit_code == 1, result.output
    assert "1 created" not in result.output and "2 created" in result.output, result.output
    assert "3 refused" in result.output
    found = stored(node_dir)
    assert found[("Observation", "g1")][0]["valueQuantity"]["value"] == Decimal("5.60")
    assert ("Observation", "g2") not in found and ("Observation", "g3") not in found
    job = next((node_dir / "bulk").iterdir())
    reasons = (job / "refused.txt").read_text(encoding="utf-8").splitlines()
    assert len(reasons) == 3
    assert reasons[0].startswith(f"{mixed}:2: refers to Patient/nobody")
    assert reasons[1].startswith(f"{mixed}:3: refers to Patient/p2")
    assert reasons[2].startswith(f"{patients}:2: ") and "gender" in reasons[2]
    kept = (job / "refused.ndjson").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["id"] for line in kept] == ["g2", "g3", "p2"]


def test_a_bad_line_is_reported_and_nothing_else_is_lost(node_dir: Path, tmp_path: Path) -> None:
    source = lines_file(
        tmp_path / "patients.ndjson",
        patient("p1"),
        '{"resourceType": "Patient", "id": "p2", ',  # cut short
        "",
        patient("p3", birthDate="1990-13-45"),
        {"resourceType": "Patient", "name": [{"text": "无名"}]},  # no id
        {"resourceType": "Banana", "id": "b1"},
        patient("p4", managingOrganization={"reference": "urn:uuid:1234"}),
        patient("p5"),
    )
    result = bulk_import(node_dir, source, workers="0")
    assert result.exit_code == 1, result.output
    assert "2 created" in result.output and "5 refused" in result.output, result.output
    for line in (2, 4, 5, 6, 7):  # line 3 is blank
        assert f"{source}:{line}: " in result.output, result.output
    assert "is not JSON" in result.output and "must carry its id" in result.output
    assert set(stored(node_dir)) == {("Patient", "p1"), ("Patient", "p5")}


def test_a_changed_resource_gets_a_new_version_and_an_unchanged_one_none(
    node_dir: Path, tmp_path: Path
) -> None:
    first = lines_file(tmp_path / "one.ndjson", patient("p1"), patient("p2"))
    assert bulk_import(node_dir, first).exit_code == 0
    second = lines_file(tmp_path / "two.ndjson", patient("p1"), patient("p2", gender="female"))
    result = bulk_import(node_dir, second)
    assert result.exit_code == 0, result.output
    assert "0 created, 1 updated, 1 unchanged, 0 refused" in result.output
    found = stored(node_dir)
    assert len(found[("Patient", "p1")]) == 1
    assert [v.get("gender") for v in found[("Patient", "p2")]] == [None, "female"]


def test_a_crash_in_the_middle_then_a_restart_stores_each_resource_once(
    node_dir: Path, tmp_path: Path
) -> None:
    resources = cohort_resources(150)
    files = write_ndjson(resources, tmp_path / "in")
    command = [sys.executable, "-m", "node.cli", "adapters", "bulk-import", "--dir", str(node_dir)]
    command += ["--workers", "1", *map(str, files)]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL)
    database = open_database(load_config(node_dir).database_url)
    P = tables.import_positions
    try:
        deadline = time.monotonic() + 120
        created = 0
        while created < 2000:
            assert process.poll() is None, "the import ended before it could be stopped"
            assert time.monotonic() < deadline, "the import stored too little too slowly"
            time.sleep(0.05)
            with database.engine.connect() as conn:
                created = conn.execute(sa.select(sa.func.sum(P.c.created))).scalar() or 0
        os.killpg(process.pid, signal.SIGKILL)  # the importer and its workers, at once
        process.wait()
    finally:
        database.close()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert created < len(resources)
    result = bulk_import(node_dir, *files)
    assert result.exit_code == 0, result.output
    assert f"{len(resources):,} created, 0 updated, 0 unchanged, 0 refused" in result.output
    found = stored(node_dir)
    assert len(found) == len(resources)
    assert all(len(versions) == 1 for versions in found.values())


def test_consents_are_recorded_on_the_ledger_and_one_it_cannot_carry_is_refused_alone(
    node_dir: Path, tmp_path: Path
) -> None:
    granted = consent_resource("p1", ["*"], ["laboratory"], ["TREAT"], "2026-01-01", None)
    granted["id"] = "c1"
    denying = consent_resource("p1", ["*"], ["laboratory"], ["TREAT"], "2026-01-01", None)
    denying["id"] = "c2"
    denying["provision"]["type"] = "deny"  # a restriction the ledger entry cannot carry
    resident = {"system": RESIDENT_ID_SYSTEM, "value": "110101199003074514"}
    source = lines_file(
        tmp_path / "consents.ndjson", granted, denying, patient("p1", identifier=[resident])
    )
    result = bulk_import(node_dir, source)
    assert result.exit_code == 1, result.output
    assert "2 created" in result.output and "1 refused" in result.output, result.output
    assert f"{source}:2: " in result.output and "deny" in result.output
    assert set(stored(node_dir)) == {("Patient", "p1"), ("Consent", "c1")}
    database = open_database(load_config(node_dir).database_url)
    try:
        ledger = ChainStore(database.engine)
        head = ledger.head("hosp-a")
        assert head is not None
        types = [ledger.entry("hosp-a", seq)["type"] for seq in range(head.tree_size)]
    finally:
        database.close()
    assert types.count("consent.granted") == 1
