"""Bulk export driven by an independent client: SMART Fetch (``smart-fetch``, from the SMART
Health IT team, on PyPI), run as its own process from its own virtual environment
(``scripts/test-deps.sh`` installs it), against a real node. It kicks off, polls, downloads,
and, asked again with ``--since auto``, takes the previous export's ``transactionTime`` as
``_since``: the second export holds exactly what changed in between."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from fhir_adapters.store import jsonio
from node.flows.bulk_export import SETTLE_SECONDS
from tests.helpers.fhir import observation
from tests.helpers.ndjson import cohort_resources, without_server_meta, write_ndjson
from tests.helpers.nodes import Node, invoke, post

# the types SMART Fetch exports (it was made for research cohorts: patient data only)
CLIENT_TYPES = {
    "Patient",
    "Encounter",
    "AllergyIntolerance",
    "Condition",
    "Device",
    "DiagnosticReport",
    "DocumentReference",
    "EpisodeOfCare",
    "Immunization",
    "MedicationDispense",
    "MedicationRequest",
    "Observation",
    "Procedure",
    "ServiceRequest",
    "Specimen",
}


def smart_fetch() -> str:
    """The client's command, where scripts/test-deps.sh installs it (or $HRX_SMART_FETCH)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    command = os.environ.get("HRX_SMART_FETCH") or str(
        cache / "hrx-test-clients" / "smart-fetch" / "bin" / "smart-fetch"
    )
    assert Path(command).is_file(), f"{command} is missing: run scripts/test-deps.sh"
    return command


def fetch(node: Node, out: Path, token: Path, *options: str) -> str:
    answer = subprocess.run(
        [
            smart_fetch(),
            "export",
            "--fhir-url",
            node.fhir,
            "--bearer-token",
            str(token),
            "--no-compression",
            "--hydration-tasks",
            "none",
            "--no-default-filters",
            *options,
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
    )
    assert answer.returncode == 0, answer.stdout[-3000:] + answer.stderr[-3000:]
    return answer.stdout


def resources_in(folder: Path) -> dict[tuple[str, str], dict[str, Any]]:
    found = {}
    for path in sorted(folder.glob("*.*.ndjson")):  # <Type>.<n>.ndjson (log.ndjson is its log)
        for line in path.read_text(encoding="utf-8").splitlines():
            resource = jsonio.parse(line)
            found[(resource["resourceType"], resource["id"])] = resource
    return found


def test_an_independent_client_exports_and_follows_up_with_since(
    node: Node, tmp_path: Path
) -> None:
    everything = cohort_resources(4, seed=31)
    files = write_ndjson(everything, tmp_path / "in")
    loaded = invoke(
        "adapters", "bulk-import", "--dir", str(node.directory), "--workers", "0", *map(str, files)
    )
    assert loaded.exit_code == 0, loaded.output
    time.sleep(SETTLE_SECONDS + 0.1)
    resources = [r for r in everything if r["resourceType"] in CLIENT_TYPES]
    token = tmp_path / "token"
    token.write_text(node.token("bulk-admin", "admin", scope="system/*.rs"))
    types = sorted({r["resourceType"] for r in resources})
    out = tmp_path / "out"
    fetch(node, out, token, "--type", ",".join(types))
    (first,) = [p for p in out.iterdir() if p.is_dir()]
    got = resources_in(first)
    for resource in resources:
        key = (resource["resourceType"], resource["id"])
        assert key in got, key
        assert without_server_meta(got[key]) == jsonio.parse(json.dumps(resource)), key
    assert set(got) == {(r["resourceType"], r["id"]) for r in resources}

    patient = next(r["id"] for r in resources if r["resourceType"] == "Patient")
    created = post(node.session(), f"{node.fhir}/Observation", observation(patient, value="7.25"))
    assert created.status_code == 201, created.text
    time.sleep(SETTLE_SECONDS + 0.1)
    fetch(node, out, token, "--type", ",".join(types), "--since", "auto")
    (second,) = [p for p in out.iterdir() if p.is_dir() and p != first]
    changed = resources_in(second)
    assert list(changed) == [("Observation", created.json()["id"])]
    assert str(changed[("Observation", created.json()["id"])]["valueQuantity"]["value"]) == "7.25"
