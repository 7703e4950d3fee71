"""Benchmark of a Group export from another member under consent (``Group/[id]/$export?source=``,
docs/spec.md §15.9), printed beside its ceiling measured in the same run.

Two members (the test harness: real node processes, each behind a loopback relay). hosp-a holds
``--patients`` patients with ``--results`` laboratory Observations each; every other patient
has consented to hosp-b. hosp-b holds the same residents and a Group of them, and exports from
hosp-a: each patient asked on hosp-b's chain, decided and recorded on hosp-a's, the released
results streamed back and checked against the recorded hashes. Ceiling: hosp-a exporting the
same Group's Observations locally (``Group/[id]/$export`` at hosp-a, no decisions, no ledger).

    python3 scripts/bench_member_export.py          # --patients 1000 --results 20
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from consent.model import WITNESS_URL, consent_resource
from consent.pseudonym import RESIDENT_ID_SYSTEM
from node.cli import main as hrx
from node.demo.harness import Consortium
from node.demo.nodes import Node

CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
ASYNC = {"Prefer": "respond-async", "Accept": "application/fhir+json"}


def ndjson(folder: Path, resources: list[dict[str, Any]]) -> list[Path]:
    by_type: dict[str, list[str]] = {}
    for resource in resources:
        by_type.setdefault(resource["resourceType"], []).append(
            json.dumps(resource, ensure_ascii=False)
        )
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for resource_type, lines in by_type.items():
        path = folder / f"{resource_type}.ndjson"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def load(directory: Path, files: list[Path]) -> None:
    try:
        hrx(["adapters", "bulk-import", "--dir", str(directory), *map(str, files)])
    except SystemExit as exit:
        if exit.code:
            raise


def source_data(patients: int, results: int) -> list[dict[str, Any]]:
    resources: list[dict[str, Any]] = [
        {"resourceType": "Practitioner", "id": "witness", "name": [{"family": "见证"}]},
        {
            "resourceType": "Group",
            "id": "cohort",
            "type": "person",
            "actual": True,
            "member": [{"entity": {"reference": f"Patient/p{n}"}} for n in range(patients)],
        },
    ]
    for n in range(patients):
        resources.append(
            {
                "resourceType": "Patient",
                "id": f"p{n}",
                "identifier": [{"system": RESIDENT_ID_SYSTEM, "value": f"33010219800101{n:04d}"}],
            }
        )
        for r in range(results):
            resources.append(
                {
                    "resourceType": "Observation",
                    "id": f"o{n}-{r}",
                    "status": "final",
                    "category": [{"coding": [{"system": CATEGORY, "code": "laboratory"}]}],
                    "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
                    "subject": {"reference": f"Patient/p{n}"},
                    "effectiveDateTime": "2026-01-02T10:00:00+08:00",
                    "valueQuantity": {"value": 13.5 + r / 10, "unit": "g/dL"},
                }
            )
        if n % 2 == 0:
            consent = consent_resource(f"p{n}", ["hosp-b"], ["laboratory"], ["TREAT"], None, None)
            consent["id"] = f"c{n}"
            consent["extension"] = [
                {"url": WITNESS_URL, "valueReference": {"reference": "Practitioner/witness"}}
            ]
            resources.append(consent)
    return resources


def asker_data(patients: int) -> list[dict[str, Any]]:
    return [
        {
            "resourceType": "Patient",
            "id": f"q{n}",
            "identifier": [{"system": RESIDENT_ID_SYSTEM, "value": f"33010219800101{n:04d}"}],
        }
        for n in range(patients)
    ] + [
        {
            "resourceType": "Group",
            "id": "cohort",
            "type": "person",
            "actual": True,
            "member": [{"entity": {"reference": f"Patient/q{n}"}} for n in range(patients)],
        }
    ]


def timed_export(node: Node, params: dict[str, str]) -> tuple[float, dict[str, Any]]:
    session = requests.Session()
    token = node.token("bench-admin", "admin", scope="system/*.rs")
    session.headers["Authorization"] = f"Bearer {token}"
    started = time.perf_counter()
    kick = session.get(
        f"{node.fhir}/Group/cohort/$export", params=params, headers=ASYNC, timeout=60
    )
    assert kick.status_code == 202, kick.text
    while True:
        status = session.get(kick.headers["Content-Location"], timeout=60)
        if status.status_code == 200:
            return time.perf_counter() - started, status.json()
        assert status.status_code == 202, status.text
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--results", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        group = Consortium(root / "c", 2, epoch_seconds=5)
        try:
            group.start_all()  # consents go on the ledger: the members must be up
            load(
                group.members["hosp-a"].directory,
                ndjson(root / "a", source_data(args.patients, args.results)),
            )
            load(group.members["hosp-b"].directory, ndjson(root / "b", asker_data(args.patients)))
            source = Node(group.members["hosp-a"].directory, group.members["hosp-a"].web_port)
            asker = Node(group.members["hosp-b"].directory, group.members["hosp-b"].web_port)
            time.sleep(2.5)  # an export holds what was written two seconds before it
            local, local_manifest = timed_export(source, {"_type": "Observation"})
            seconds, manifest = timed_export(asker, {"source": "hosp-a", "category": "laboratory"})
        finally:
            group.close()
    released = sum(item["count"] for item in manifest["output"])
    local_count = sum(item["count"] for item in local_manifest["output"])
    print(f"{args.patients} patients, {args.results} results each, every other one consented")
    print(
        f"export from hosp-a under consent: {seconds:.2f} s, {args.patients / seconds:,.0f} "
        f"patients/s decided and recorded, {released / seconds:,.0f} results/s released "
        f"({released} results)"
    )
    print(
        f"ceiling, hosp-a's own Group export of the same Observations: {local:.2f} s, "
        f"{local_count / local:,.0f} resources/s ({local_count}); share "
        f"{(released / seconds) / (local_count / local):.0%} (results/s)"
    )


if __name__ == "__main__":
    main()
