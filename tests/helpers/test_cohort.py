"""The synthetic cohort of :mod:`tests.helpers.cohort` is what it says: the same for a seed, the
stated resources in the stated numbers, every resource valid against its R4B model (and the
node's own validation, for the types it hosts), references that resolve inside the bundle or
are conditional references to :func:`~tests.helpers.cohort.shared`, resident IDs with a valid
check character, glucose in both units."""

from __future__ import annotations

import base64
import importlib
import re
from collections import Counter
from typing import Any

import pytest

from fhir_adapters.store.codes import code_issues
from fhir_adapters.store.resources import RESOURCE_TYPES, references, validate
from tests.helpers.cohort import RESIDENT_ID, check_character, cohort, shared

COUNTS = {  # resource type -> (least, most) per patient bundle
    "Patient": (1, 1),
    "Encounter": (2, 4),
    "Condition": (1, 3),
    "DiagnosticReport": (1, 2),
    "MedicationRequest": (1, 3),
    "AllergyIntolerance": (0, 2),
    "Procedure": (0, 2),
    "Immunization": (1, 3),
    "DocumentReference": (1, 1),
}
# Codes of required bindings that the R4B models do not check, for the types the node does not
# host (fhir_adapters.store.codes checks those of the hosted ones).
REQUIRED: dict[str, dict[str, set[str]]] = {
    "Encounter": {"status": {"finished"}},
    "Condition": {
        "clinicalStatus": {"active", "recurrence", "relapse", "inactive", "remission", "resolved"},
        "verificationStatus": {"unconfirmed", "provisional", "differential", "confirmed"},
    },
    "MedicationRequest": {"status": {"active", "completed"}, "intent": {"order"}},
    "AllergyIntolerance": {
        "clinicalStatus": {"active", "inactive", "resolved"},
        "verificationStatus": {"unconfirmed", "confirmed", "refuted", "entered-in-error"},
        "type": {"allergy", "intolerance"},
        "category": {"food", "medication", "environment", "biologic"},
        "criticality": {"low", "high", "unable-to-assess"},
    },
    "Procedure": {"status": {"completed"}},
    "Immunization": {"status": {"completed"}},
    "DocumentReference": {"status": {"current"}},
}
CONDITIONAL = re.compile(r"(Organization|Practitioner)\?identifier=[^|?&]+\|[^|?&]+")


def model_of(resource_type: str) -> Any:
    module = importlib.import_module(f"fhir.resources.R4B.{resource_type.lower()}")
    return getattr(module, resource_type)


def codes(value: Any) -> set[str]:
    if isinstance(value, str):
        return {value}
    if isinstance(value, list):
        return set().union(*(codes(item) for item in value))
    return {coding["code"] for coding in value["coding"]}


@pytest.fixture(scope="module")
def bundles() -> list[dict[str, Any]]:
    return cohort(40, seed=3)


def test_the_same_for_a_seed() -> None:
    assert cohort(5, seed=11) == cohort(5, seed=11)
    assert cohort(5, seed=11) != cohort(5, seed=12)
    assert cohort(5, seed=11)[:3] == cohort(3, seed=11)
    assert shared(11) == shared(11) != shared(12)


def test_counts_per_patient(bundles: list[dict[str, Any]]) -> None:
    for bundle in bundles:
        assert bundle["type"] == "transaction"
        found = Counter(entry["resource"]["resourceType"] for entry in bundle["entry"])
        for resource_type, (least, most) in COUNTS.items():
            assert least <= found[resource_type] <= most, resource_type
        observations = [e["resource"] for e in bundle["entry"] if "valueQuantity" in e["resource"]]
        labs = [o for o in observations if o["category"][0]["coding"][0]["code"] == "laboratory"]
        assert 4 <= len(labs) <= 10
        vitals = {
            e["resource"]["code"]["coding"][0]["code"]
            for e in bundle["entry"]
            if e["resource"]["resourceType"] == "Observation"
            and e["resource"]["category"][0]["coding"][0]["code"] == "vital-signs"
        }
        assert vitals == {"85354-9", "29463-7", "8867-4"}
        assert set(found) <= set(COUNTS) | {"Observation"}


@pytest.mark.parametrize("conditional", [True, False])
def test_every_resource_is_valid(conditional: bool) -> None:
    bundles = [*cohort(12, seed=5, conditional_references=conditional), shared(5)]
    model_of("Bundle").model_validate(bundles[0])
    for bundle in bundles:
        for entry in bundle["entry"]:
            resource = entry["resource"]
            resource_type = resource["resourceType"]
            if resource_type in RESOURCE_TYPES:
                validate(resource)
            else:
                assert not code_issues(model_of(resource_type).model_validate(resource))
            for element, allowed in REQUIRED.get(resource_type, {}).items():
                assert codes(resource[element]) <= allowed, (resource_type, element)


@pytest.mark.parametrize("conditional", [True, False])
def test_references_resolve(conditional: bool) -> None:
    common = shared(0)
    keys = {
        f"{e['request']['url']}?{e['request']['ifNoneExist']}" for e in common["entry"]
    }  # what the shared bundle creates, as conditional references
    assert all(CONDITIONAL.fullmatch(key) for key in keys)
    for bundle in cohort(15, conditional_references=conditional):
        entries = bundle["entry"]
        full_urls = {entry["fullUrl"] for entry in entries}
        assert len(full_urls) == len(entries)
        assert all(url.startswith("urn:uuid:") for url in full_urls)
        puts = {e["request"]["url"] for e in entries if e["request"]["method"] == "PUT"}
        assert bool(puts) != conditional
        for entry in entries:
            method = "PUT" if entry["request"]["url"] in puts else "POST"
            assert entry["request"]["method"] == method
            if method == "POST":
                assert entry["request"]["url"] == entry["resource"]["resourceType"]
            for _path, target in references(entry["resource"]):
                assert target in full_urls | (keys if conditional else puts), target


def test_resident_ids_have_valid_check_characters(bundles: list[dict[str, Any]]) -> None:
    assert check_character("11010519491231002") == "X"  # the example of GB 11643-1999
    for bundle in bundles:
        patient = bundle["entry"][0]["resource"]
        [resident_id] = [i["value"] for i in patient["identifier"] if i["system"] == RESIDENT_ID]
        assert re.fullmatch(r"\d{17}[\dX]", resident_id)
        assert check_character(resident_id[:17]) == resident_id[17]
        assert int(resident_id[14:17]) % 2 == (patient["gender"] == "male")
        assert resident_id[6:14] == patient["birthDate"].replace("-", "")


def test_glucose_in_both_units_and_documents_in_chinese(bundles: list[dict[str, Any]]) -> None:
    resources = [entry["resource"] for bundle in bundles for entry in bundle["entry"]]
    glucose = {
        (r["code"]["coding"][0]["code"], r["valueQuantity"]["code"])
        for r in resources
        if r["resourceType"] == "Observation" and "glucose" in r["code"]["text"].lower()
    }
    assert glucose == {("2345-7", "mg/dL"), ("15074-8", "mmol/L")}
    documents = [r for r in resources if r["resourceType"] == "DocumentReference"]
    text = base64.b64decode(documents[0]["content"][0]["attachment"]["data"]).decode()
    assert text.startswith("出院小结")
