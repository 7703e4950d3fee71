"""The JSON walk that indexes a search parameter's FHIRPath agrees with fhirpathpy's own
evaluation of the same expression, branch by branch, on every parameter of the types a US
Core-shaped record holds (fhirpathpy has no ``resolve()``: those branches are compared without
their type test, which the walk's own tests below check)."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from fhirpathpy import evaluate
from fhirpathpy.models import models

from fhir_adapters import definitions
from fhir_adapters.store.expressions import _steps, compile_expression, walks
from tests.helpers.cohort import cohort

RESOURCES = [e["resource"] for bundle in cohort(3, seed=5) for e in bundle["entry"]]
TYPES = sorted({r["resourceType"] for r in RESOURCES})


def _plain(values: list[Any]) -> list[str]:
    """The values as comparable text: numbers by value, whether float or Decimal."""

    def norm(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: norm(v) for k, v in value.items()}
        if isinstance(value, list):
            return [norm(v) for v in value]
        if isinstance(value, Decimal | float | int) and not isinstance(value, bool):
            return str(Decimal(str(value)).normalize())
        return value

    return sorted(json.dumps(norm(v), sort_keys=True, default=str) for v in values)


@pytest.mark.parametrize("resource_type", TYPES)
def test_the_walk_agrees_with_fhirpathpy(resource_type: str) -> None:
    resources = [r for r in RESOURCES if r["resourceType"] == resource_type]
    compared = 0
    for code, definition in definitions.search_parameters(resource_type).items():
        if definition.expression is None or definition.type in ("composite", "special"):
            continue
        for branch in definitions.union_branches(definition.expression):
            if _steps(branch, resource_type) is None:
                continue  # evaluated by fhirpathpy itself
            plain = branch.replace(".where(resolve() is Patient)", "").replace(
                ".where(resolve() is Practitioner)", ""
            )
            if "resolve()" in plain:
                continue
            walk = compile_expression(branch, resource_type)
            for resource in resources:
                expected = evaluate(resource, plain, {}, models["r4"])
                found = walk(resource)
                if "resolve()" in branch:  # the walk kept only references of that type
                    assert all(v in expected for v in found), (code, branch)
                else:
                    assert _plain(found) == _plain(expected), (code, branch, resource)
                compared += 1
    assert compared > 10


def test_the_walk_handles_choices_types_and_references() -> None:
    observation = {
        "resourceType": "Observation",
        "effectivePeriod": {"start": "2024-01-01"},
        "valueQuantity": {"value": 5},
        "subject": {"reference": "Patient/1"},
        "performer": [{"reference": "Practitioner/2"}, {"reference": "Patient/3/_history/1"}],
    }
    assert compile_expression("Observation.effective", "Observation")(observation) == [
        {"start": "2024-01-01"}
    ]
    assert compile_expression("(Observation.value.ofType(Quantity))", "Observation")(
        observation
    ) == [{"value": 5}]
    assert compile_expression("Observation.value.ofType(string)", "Observation")(observation) == []
    patients = compile_expression(
        "Observation.performer.where(resolve() is Patient)", "Observation"
    )
    assert patients(observation) == [{"reference": "Patient/3/_history/1"}]
    telecom = {
        "resourceType": "Patient",
        "telecom": [{"system": "phone", "value": "1"}, {"system": "email", "value": "a@b"}],
    }
    phones = compile_expression("Patient.telecom.where(system='phone')", "Patient")
    assert phones(telecom) == [{"system": "phone", "value": "1"}]
    # what the walk does not take is evaluated by fhirpathpy: the answers still come
    assert not walks("Patient.deceased.exists() and Patient.deceased != false", "Patient")
    deceased = compile_expression(
        "Patient.deceased.exists() and Patient.deceased != false", "Patient"
    )
    assert deceased({"resourceType": "Patient", "deceasedBoolean": True}) == [True]
    assert deceased({"resourceType": "Patient"}) == [False]  # alive: deceased=false finds it
