"""FHIR creates from many clients at once, under gunicorn (two workers, threads each) on
SQLite and PostgreSQL: every create answered 201 is stored and served, and a create that is
refused (invalid, or naming a patient that does not exist) gets its own OperationOutcome while
the creates sharing its transaction commit."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from fhir_adapters.store import tables
from tests.helpers.databases import postgres_database
from tests.helpers.nodes import FHIR_JSON, Node, running_node

CLIENTS = 16
CREATES = 8  # per client


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Node]:
    directory = tmp_path / "hosp-a"
    if request.param == "sqlite":
        with running_node(directory, gunicorn_workers=2) as node:
            yield node
    else:
        with postgres_database() as url, running_node(directory, url, gunicorn_workers=2) as node:
            yield node


def _observation(patient: str, number: int) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": "2024-01-02T10:00:00+08:00",
        "valueQuantity": {"value": 130 + number, "unit": "g/L"},
    }


def test_concurrent_creates_are_all_stored_and_a_refused_one_fails_alone(served: Node) -> None:
    token = served.token()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": FHIR_JSON}
    patient = requests.post(
        f"{served.fhir}/Patient",
        json={"resourceType": "Patient", "name": [{"family": "王"}]},
        headers=headers,
        timeout=30,
    ).json()["id"]
    answers: list[tuple[str, int, requests.Response]] = []
    lock = threading.Lock()

    def client(number: int) -> None:
        with requests.Session() as session:
            session.headers.update(headers)
            for turn in range(CREATES):
                index = number * CREATES + turn
                if index % 11 == 5:
                    kind, body = "invalid", {**_observation(patient, index), "status": "often"}
                elif index % 11 == 9:
                    kind, body = "dangling", _observation("nobody-here", index)
                else:
                    kind, body = "valid", _observation(patient, index)
                answer = session.post(f"{served.fhir}/Observation", json=body, timeout=60)
                with lock:
                    answers.append((kind, index, answer))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(answers) == CLIENTS * CREATES
    created: dict[str, int] = {}
    for kind, index, answer in answers:
        if kind == "valid":
            assert answer.status_code == 201, answer.text
            body = answer.json()
            assert body["valueQuantity"]["value"] == 130 + index
            created[body["id"]] = index
        else:
            assert answer.status_code == (400 if kind == "invalid" else 422), answer.text
            outcome = answer.json()
            assert outcome["resourceType"] == "OperationOutcome"
            wanted = "often" if kind == "invalid" else "Patient/nobody-here does not exist"
            assert wanted in answer.text
    assert len(created) == sum(1 for kind, _, _ in answers if kind == "valid")
    with requests.Session() as session:
        session.headers.update(headers)
        for resource_id, index in created.items():
            read = session.get(f"{served.fhir}/Observation/{resource_id}", timeout=30)
            assert read.status_code == 200
            assert read.json()["valueQuantity"]["value"] == 130 + index
        found = session.get(
            f"{served.fhir}/Observation",
            params={"subject": f"Patient/{patient}", "_summary": "count"},
            timeout=30,
        ).json()
        assert found["total"] == len(created)
    with served.database.engine.connect() as conn:  # each create's AuditEvent, committed with it
        audited = conn.scalar(
            sa.select(sa.func.count())
            .select_from(tables.resources)
            .where(tables.resources.c.type == "AuditEvent")
        )
    assert audited >= len(created) + 1  # and the patient's
