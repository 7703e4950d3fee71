"""FHIR resources and answers as the API tests write and read them (a Patient, a laboratory
Observation, an OperationOutcome, the ids of a search Bundle), and a stored Observation spoiled
with a number JSON clients cannot read, as an older version of hrx let one in."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

import sqlalchemy as sa

from fhir_adapters.store import tables
from node.db.engines import Database
from tests.helpers.nodes import FHIR_JSON, Node, post


def patient(
    family: str = "张", identifier: str = "330102198001020011", **extra: Any
) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:oid:2.16.156.10011.1.1", "value": identifier}],
        "name": [{"family": family, "given": ["三"]}],
        "gender": "male",
        "birthDate": "1980-01-02",
        **extra,
    }


def observation(
    patient_id: str,
    code: str = "718-7",
    when: str = "2024-01-02T10:00:00+08:00",
    value: str = "13.50",  # a decimal, written digit for digit
    **extra: Any,
) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "laboratory",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": when,
        "valueQuantity": {
            "value": Decimal(value),
            "unit": "g/dL",
            "system": "http://unitsofmeasure.org",
            "code": "g/dL",
        },
        **extra,
    }


def new_patient(node: Node, **extra: Any) -> str:
    response = post(node.session(), f"{node.fhir}/Patient", patient(**extra))
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def outcome(response: Any, status: int, text: str = "") -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["Content-Type"].startswith(FHIR_JSON)
    body: dict[str, Any] = response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert text in response.text, response.text
    return body


def ids(bundle: dict[str, Any], mode: str = "match") -> list[str]:
    return [
        e["resource"]["id"]
        for e in bundle.get("entry", [])
        if e.get("search", {}).get("mode") == mode
    ]


HUGE = "9" * 10_000  # Python's json refuses integers of more than 4300 digits


def poison(database: Database, resource_type: str, resource_id: str) -> None:
    """Write a 10,000-digit value into the current version's stored body (its
    ``valueQuantity.value``), as an older version of hrx let the HL7 intake do."""
    R, V = tables.resources, tables.versions
    with database.write_engine.begin() as conn:
        res_pk, version = conn.execute(
            sa.select(R.c.res_pk, R.c.version).where(
                R.c.type == resource_type, R.c.id == resource_id
            )
        ).one()
        body = conn.execute(
            sa.select(V.c.body).where(V.c.res_pk == res_pk, V.c.version == version)
        ).scalar_one()
        poisoned, count = re.subn(
            rb'("valueQuantity":\{"value":)[0-9.]+', rb"\g<1>" + HUGE.encode(), bytes(body)
        )
        assert count == 1, body
        conn.execute(
            V.update().where(V.c.res_pk == res_pk, V.c.version == version).values(body=poisoned)
        )
