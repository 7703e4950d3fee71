"""A whole health record (issue 18): a US Core-shaped cohort, as a standard feed sends it,
loads unchanged into a real node on both engines — every R4 type it uses hosted, conditional
references resolved, conditional creates not repeated — and is searched by the official R4
parameters of each type, a patient's token seeing their own compartment and nothing else."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from tests.helpers.cohort import cohort, shared
from tests.helpers.nodes import Node, post

PATIENTS = 12


def _load(node: Node, bundle: dict[str, Any]) -> dict[str, Any]:
    answer = post(node.session(), node.fhir, bundle)
    assert answer.status_code == 200, answer.text[:2000]
    return dict(answer.json())


@pytest.fixture(scope="module")
def loaded(node: Node) -> dict[str, Any]:
    first = _load(node, shared(7))
    again = _load(node, shared(7))  # loading the shared ones twice creates nothing new
    assert [e["response"]["status"] for e in first["entry"]] == ["201 Created"] * len(
        first["entry"]
    )
    assert [e["response"]["status"] for e in again["entry"]] == ["200 OK"] * len(again["entry"])
    bundles = cohort(PATIENTS, seed=7)
    answers = [_load(node, bundle) for bundle in bundles]
    return {"bundles": bundles, "answers": answers}


def test_a_us_core_shaped_cohort_loads_unchanged(node: Node, loaded: dict[str, Any]) -> None:
    sent = Counter(e["resource"]["resourceType"] for b in loaded["bundles"] for e in b["entry"])
    assert {
        "Encounter",
        "Condition",
        "MedicationRequest",
        "AllergyIntolerance",
        "Procedure",
    } <= set(sent) and {"Immunization", "DocumentReference", "DiagnosticReport"} <= set(sent)
    stored = Counter(e["resource"]["resourceType"] for a in loaded["answers"] for e in a["entry"])
    assert stored == sent
    s = node.session()
    for resource_type, count in sent.items():
        if resource_type == "Patient":
            continue
        total = s.get(f"{node.fhir}/{resource_type}", params={"_summary": "count"}).json()
        assert total["total"] >= count, resource_type
    # the conditional references name the shared Organization, not a copy
    organizations = s.get(f"{node.fhir}/Organization", params={"_summary": "count"}).json()
    assert organizations["total"] == len(
        [e for e in shared(7)["entry"] if e["resource"]["resourceType"] == "Organization"]
    )
    encounter = next(
        e["resource"]
        for a in loaded["answers"]
        for e in a["entry"]
        if e["resource"]["resourceType"] == "Encounter"
    )
    provider = encounter["serviceProvider"]["reference"]
    assert provider.startswith("Organization/") and "?" not in provider
    assert s.get(f"{node.fhir}/{provider}").status_code == 200


def _ids(bundle: dict[str, Any]) -> set[str]:
    return {e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"}


def _brute(loaded: dict[str, Any], resource_type: str, keep: Any) -> set[str]:
    return {
        e["resource"]["id"]
        for a in loaded["answers"]
        for e in a["entry"]
        if e["resource"]["resourceType"] == resource_type and keep(e["resource"])
    }


def test_new_types_are_searched_by_their_r4_parameters(node: Node, loaded: dict[str, Any]) -> None:
    """Each search against a brute-force filter of what was loaded."""
    s = node.session()
    answers = loaded["answers"]
    patient = next(
        e["resource"] for e in answers[0]["entry"] if e["resource"]["resourceType"] == "Patient"
    )
    pid = patient["id"]
    every = {"_count": "1000"}

    def found(resource_type: str, **params: str) -> set[str]:
        answer = s.get(f"{node.fhir}/{resource_type}", params={**params, **every})
        assert answer.status_code == 200, answer.text
        return _ids(answer.json())

    def of_patient(r: dict[str, Any]) -> bool:
        ref = (r.get("subject") or r.get("patient") or {}).get("reference")
        return ref == f"Patient/{pid}"

    for resource_type in (
        "Condition",
        "Encounter",
        "MedicationRequest",
        "Immunization",
        "AllergyIntolerance",
        "Procedure",
        "DocumentReference",
    ):
        expected = _brute(loaded, resource_type, of_patient)
        assert found(resource_type, patient=pid) == expected, resource_type
    # token: a Condition's code (ICD-10), an Encounter's class, a document's type
    condition = next(
        e["resource"]
        for a in answers
        for e in a["entry"]
        if e["resource"]["resourceType"] == "Condition"
    )
    coding = condition["code"]["coding"][0]
    assert found("Condition", code=f"{coding['system']}|{coding['code']}") == _brute(
        loaded,
        "Condition",
        lambda r: any(
            c["code"] == coding["code"] and c["system"] == coding["system"]
            for c in r["code"]["coding"]
        ),
    )
    assert found("Encounter", **{"class": "AMB"}) == _brute(
        loaded, "Encounter", lambda r: r["class"]["code"] == "AMB"
    )
    # reference through a choice of types: an Observation's encounter
    observation = next(
        e["resource"]
        for a in answers
        for e in a["entry"]
        if e["resource"]["resourceType"] == "Observation" and "encounter" in e["resource"]
    )
    encounter_ref = observation["encounter"]["reference"]
    assert found("Observation", encounter=encounter_ref) == _brute(
        loaded, "Observation", lambda r: r.get("encounter", {}).get("reference") == encounter_ref
    )
    # date: Immunizations given on or after a day
    day = "2020-01-01"
    assert found("Immunization", date=f"ge{day}") == _brute(
        loaded, "Immunization", lambda r: r["occurrenceDateTime"][:10] >= day
    )
    # a parameter of a kind that is not searched is refused, saying so
    refused = s.get(
        f"{node.fhir}/MolecularSequence", params={"chromosome-window-coordinate": "1$gt5$lt9"}
    )
    assert refused.status_code == 400 and "composite of token, number, number" in refused.text


def test_a_patients_token_sees_their_compartment_across_types(
    node: Node, loaded: dict[str, Any]
) -> None:
    answers = loaded["answers"]
    mine = next(
        e["resource"]["id"]
        for e in answers[0]["entry"]
        if e["resource"]["resourceType"] == "Patient"
    )
    theirs_entries = answers[1]["entry"]
    patient = node.session(node.token(f"pt-{mine[:8]}", "patient", patient=mine))
    everything = patient.get(f"{node.fhir}/Patient/{mine}/$everything", params={"_count": "1000"})
    assert everything.status_code == 200
    shown = {
        (e["resource"]["resourceType"], e["resource"]["id"]) for e in everything.json()["entry"]
    }
    own = {
        (e["resource"]["resourceType"], e["resource"]["id"])
        for e in answers[0]["entry"]
        if e["resource"]["resourceType"] not in ("Practitioner", "Organization")
    }
    assert own <= shown
    for entry in theirs_entries:  # another patient's records: found by no way of asking
        resource = entry["resource"]
        resource_type, rid = resource["resourceType"], resource["id"]
        assert (resource_type, rid) not in shown
        assert patient.get(f"{node.fhir}/{resource_type}/{rid}").status_code == 404
        listed = patient.get(f"{node.fhir}/{resource_type}", params={"_id": rid}).json()
        assert listed.get("total", 0) == 0, (resource_type, listed)


NOT_POSTED = ("Patient", "AuditEvent", "Consent")  # written by the node, or the ledger's


def _in_compartment(resource: dict[str, Any], patient: str) -> bool:
    """Whether a compartment parameter of R4's definition names ``Patient/patient``, by
    fhirpathpy (not the index's own walk); ``resolve() is X`` read from the reference."""
    import re

    from fhirpathpy import evaluate
    from fhirpathpy.models import models

    from fhir_adapters import definitions

    resource_type = resource["resourceType"]
    for param in definitions.patient_compartment(resource_type):
        expression = definitions.search_parameters(resource_type)[param].expression or ""
        for branch in definitions.union_branches(expression):
            wanted = re.search(r"\.where\(resolve\(\) is (\w+)\)", branch)
            path = re.sub(r"\.where\(resolve\(\) is \w+\)", "", branch)
            if wanted and wanted.group(1) != "Patient":
                continue
            for value in evaluate(resource, path, {}, models["r4"]):
                if isinstance(value, dict) and value.get("reference") == f"Patient/{patient}":
                    return True
    return False


def test_a_patients_token_is_held_to_their_compartment_in_every_type(node: Node) -> None:
    """A minimal valid resource of every hosted type (generated from its model, every
    reference naming one patient) for each of two patients: the first patient's token finds,
    by search, read, $everything and history, exactly their own resources of each type that
    R4's compartment definition puts in their compartment, and nothing of the other's (by
    ``_content`` either)."""
    import re

    from fhir_adapters import definitions
    from fhir_adapters.store.resources import RESOURCE_TYPES
    from tests.helpers.minimal import with_references

    def roots(resource_type: str) -> list[str]:  # the paths of its compartment params
        found = []
        for param in definitions.patient_compartment(resource_type):
            expression = definitions.search_parameters(resource_type)[param].expression or ""
            for branch in definitions.union_branches(expression):
                match = re.fullmatch(
                    rf"{resource_type}\.(\w+(?:\.\w+)?)(\.where\(resolve\(\) is Patient\))?", branch
                )
                found += [match.group(1)] if match else []
        return found

    s = node.session()
    mine, theirs = (
        post(s, f"{node.fhir}/Patient", {"resourceType": "Patient"}).json()["id"] for _ in range(2)
    )
    posted = [t for t in RESOURCE_TYPES if t not in NOT_POSTED]
    made: dict[str, dict[str, dict[str, Any]]] = {}
    for patient in (mine, theirs):
        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "resource": with_references(t, f"Patient/{patient}", roots(t)),
                    "request": {"method": "POST", "url": t},
                }
                for t in posted
            ],
        }
        answer = _load(node, bundle)  # every type is written (each entry 201)
        assert all("resource" in e for e in answer["entry"]), [
            e for e in answer["entry"] if "resource" not in e
        ][:3]
        made[patient] = {e["resource"]["resourceType"]: e["resource"] for e in answer["entry"]}
    own = {t for t, r in made[mine].items() if _in_compartment(r, mine)}
    compartment_types = {t for t in posted if definitions.patient_compartment(t)}
    assert own == compartment_types, sorted(compartment_types - own)
    patient = node.session(node.token(f"pt-{mine[:8]}", "patient", patient=mine))
    everything = patient.get(f"{node.fhir}/Patient/{mine}/$everything", params={"_count": "1000"})
    assert everything.status_code == 200, everything.text
    shown = {
        (e["resource"]["resourceType"], e["resource"]["id"]) for e in everything.json()["entry"]
    }
    history = patient.get(f"{node.fhir}/_history", params={"_count": "1000"})
    assert history.status_code == 200, history.text
    in_history = {
        (e["resource"]["resourceType"], e["resource"]["id"])
        for e in history.json().get("entry", [])
        if "resource" in e
    }
    for resource_type in posted:
        ours, other = made[mine][resource_type]["id"], made[theirs][resource_type]["id"]
        searched = patient.get(f"{node.fhir}/{resource_type}", params={"_count": "1000"})
        assert searched.status_code in (200, 403), (resource_type, searched.text)
        found = _ids(searched.json()) if searched.status_code == 200 else set()
        expected = {ours} if resource_type in own else set()
        assert found & {ours, other} == expected, resource_type
        # the words of every string ("x" in both patients' resources): only their own
        worded = patient.get(f"{node.fhir}/{resource_type}", params={"_content": "x"})
        if worded.status_code == 200:
            assert other not in _ids(worded.json()), resource_type
        assert ((resource_type, ours) in shown) is (resource_type in own), resource_type
        assert (resource_type, other) not in shown and (resource_type, other) not in in_history
        assert patient.get(f"{node.fhir}/{resource_type}/{other}").status_code in (403, 404)
        read = patient.get(f"{node.fhir}/{resource_type}/{ours}")
        assert (read.status_code == 200) is (resource_type in own), (resource_type, read.text)


def _resources(loaded: dict[str, Any], resource_type: str) -> list[dict[str, Any]]:
    return [
        e["resource"]
        for a in loaded["answers"]
        for e in a["entry"]
        if e["resource"]["resourceType"] == resource_type
    ]


def test_chained_searches_and_has(node: Node, loaded: dict[str, Any]) -> None:
    """Chains (one level and two, typed and untyped) and _has (nested too), each against a
    brute-force walk of what was loaded."""
    s = node.session()
    every = {"_count": "1000"}

    def found(resource_type: str, name: str, value: str) -> set[str]:
        answer = s.get(f"{node.fhir}/{resource_type}", params={name: value, **every})
        assert answer.status_code == 200, answer.text
        return _ids(answer.json())

    patients = {p["id"]: p for p in _resources(loaded, "Patient")}
    encounters = {e["id"]: e for e in _resources(loaded, "Encounter")}
    someone = next(iter(patients.values()))
    card = next(i for i in someone["identifier"] if i["system"].endswith("1.3"))
    token = f"{card['system']}|{card['value']}"

    def subject_is(r: dict[str, Any]) -> bool:
        return r["subject"]["reference"] == f"Patient/{someone['id']}"

    expected = {o["id"] for o in _resources(loaded, "Observation") if subject_is(o)}
    assert expected
    assert found("Observation", "subject:Patient.identifier", token) == expected
    assert found("Observation", "patient.identifier", token) == expected
    assert found("Observation", "subject.identifier", token) == expected  # untyped
    family = someone["name"][0]["family"]
    assert found("Condition", "subject:Patient.family", family) == {
        c["id"]
        for c in _resources(loaded, "Condition")
        if patients[c["subject"]["reference"].split("/")[1]]["name"][0]["family"] == family
    }
    # two links: Observations made during an Encounter at a given hospital
    organization = encounters[next(iter(encounters))]["serviceProvider"]["reference"]
    org_id = organization.split("/")[1]
    at_org = {e for e, r in encounters.items() if r["serviceProvider"]["reference"] == organization}
    assert found("Observation", "encounter.service-provider", org_id) == {
        o["id"]
        for o in _resources(loaded, "Observation")
        if o.get("encounter", {}).get("reference", "/").split("/")[1] in at_org
    }
    names = {
        e["resource"]["id"]: e["resource"].get("name")  # (an earlier test adds nameless ones)
        for e in s.get(f"{node.fhir}/Organization", params=every).json()["entry"]
    }
    name = names[org_id]
    assert found("Observation", "encounter.service-provider.name:exact", name) == {
        o["id"]
        for o in _resources(loaded, "Observation")
        if "encounter" in o
        and names[
            encounters[o["encounter"]["reference"].split("/")[1]]["serviceProvider"][
                "reference"
            ].split("/")[1]
        ]
        == name
    }
    # _has: Patients with an Immunization of a vaccine code; nested: with a Condition recorded
    # in an Encounter of class EMER
    immunization = _resources(loaded, "Immunization")[0]
    vaccine = immunization["vaccineCode"]["coding"][0]
    assert found(
        "Patient",
        "_has:Immunization:patient:vaccine-code",
        f"{vaccine['system']}|{vaccine['code']}",
    ) == {
        i["patient"]["reference"].split("/")[1]
        for i in _resources(loaded, "Immunization")
        if any(c["code"] == vaccine["code"] for c in i["vaccineCode"]["coding"])
    }
    emergency = {e for e, r in encounters.items() if r["class"]["code"] == "EMER"}
    assert found("Patient", "_has:Condition:subject:encounter.class", "EMER") == {
        c["subject"]["reference"].split("/")[1]
        for c in _resources(loaded, "Condition")
        if c.get("encounter", {}).get("reference", "/").split("/")[1] in emergency
    }
    # what cannot be searched is refused, saying why
    for name, value, words in [
        ("status.x", "1", "no reference parameter 'status'"),
        ("patient:Device.device-name", "x", "does not point to 'Device'"),
        ("subject.nothing", "x", "has a parameter 'nothing'"),
        ("_has:Observation:code:status", "final", "no reference parameter 'code'"),
        ("_has:Nothing:subject:code", "x", "does not host"),
        ("_has:Observation", "x", "_has:Type:reference-parameter"),
        ("a.b.c.d.e", "x", "no reference parameter"),
        ("encounter.subject.organization.partof.name", "x", "at most 3"),
    ]:
        refused = s.get(f"{node.fhir}/Observation", params={name: value})
        assert refused.status_code == 400 and words in refused.text, (name, refused.text)


def test_chains_and_has_stay_inside_a_patients_compartment(
    node: Node, loaded: dict[str, Any]
) -> None:
    """A patient's token reaches through a chain or _has only what it may read: another
    patient's Conditions do not make that patient's Encounters match, nor the reverse."""
    answers = loaded["answers"]
    mine = next(
        e["resource"] for e in answers[0]["entry"] if e["resource"]["resourceType"] == "Patient"
    )
    theirs = next(
        e["resource"] for e in answers[1]["entry"] if e["resource"]["resourceType"] == "Patient"
    )
    me = node.session(node.token(f"pt-{mine['id'][:8]}", "patient", patient=mine["id"]))
    their_card = next(i for i in theirs["identifier"] if i["system"].endswith("1.3"))
    answer = me.get(
        f"{node.fhir}/Observation",
        params={"subject:Patient.identifier": f"{their_card['system']}|{their_card['value']}"},
    ).json()
    assert answer["total"] == 0
    mine_card = next(i for i in mine["identifier"] if i["system"].endswith("1.3"))
    own = me.get(
        f"{node.fhir}/Observation",
        params={
            "subject:Patient.identifier": f"{mine_card['system']}|{mine_card['value']}",
            "_count": "1000",
        },
    ).json()
    assert own["total"] == len(
        [e for e in answers[0]["entry"] if e["resource"]["resourceType"] == "Observation"]
    )
    # _has cannot tell a patient whether anyone else has an Immunization
    anybody = me.get(
        f"{node.fhir}/Patient", params={"_has:Immunization:patient:status": "completed"}
    )
    assert {e["resource"]["id"] for e in anybody.json().get("entry", [])} <= {mine["id"]}


def test_quantity_search_across_units(node: Node, loaded: dict[str, Any]) -> None:
    """value-quantity with a UCUM unit compares across units of one dimension, and across mass
    and substance concentration for analytes of known molar mass (135 mg/dL of glucose is
    7.49 mmol/L); the Bundle says which comparisons it could not make. Each against a
    brute-force conversion of what was loaded."""
    from fhir_adapters.store.quantities import MOLAR_MASS

    s = node.session()
    observations = _resources(loaded, "Observation")

    def found(**params: str) -> tuple[set[str], list[str]]:
        answer = s.get(f"{node.fhir}/Observation", params={**params, "_count": "1000"})
        assert answer.status_code == 200, answer.text
        bundle = answer.json()
        notes = [
            e["resource"]["issue"][0]["diagnostics"]
            for e in bundle.get("entry", [])
            if e["search"]["mode"] == "outcome"
        ]
        return _ids(bundle), notes

    def mmol_per_litre(o: dict[str, Any]) -> float | None:
        q = o.get("valueQuantity")
        if q is None:
            return None
        loinc = o["code"]["coding"][0]["code"]
        if q["code"] == "mmol/L":
            return float(q["value"])
        if q["code"] == "mg/dL" and loinc in MOLAR_MASS:
            return float(q["value"]) * 10 / MOLAR_MASS[loinc]  # mg/dL -> g/L -> mol/L * 1000
        return None

    expected = {o["id"] for o in observations if (mmol_per_litre(o) or 0) > 7}
    matched, notes = found(**{"value-quantity": "gt7|http://unitsofmeasure.org|mmol/L"})
    assert matched == expected and expected
    assert any("only for analytes whose molar mass this server knows" in n for n in notes)
    # a glucose of 135 mg/dL is 7.49 mmol/L: found by a search in mmol/L, precisely
    pid = next(p["id"] for p in _resources(loaded, "Patient"))
    glucose = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
        "subject": {"reference": f"Patient/{pid}"},
        "valueQuantity": {
            "value": 135,
            "unit": "mg/dL",
            "system": "http://unitsofmeasure.org",
            "code": "mg/dL",
        },
    }
    made = post(s, f"{node.fhir}/Observation", glucose).json()["id"]
    ucum = "http://unitsofmeasure.org"
    assert made in found(**{"value-quantity": f"gt7|{ucum}|mmol/L"})[0]
    assert made in found(**{"value-quantity": f"7.5|{ucum}|mmol/L"})[0]  # [7.45, 7.55)
    assert made not in found(**{"value-quantity": f"7.4|{ucum}|mmol/L"})[0]
    assert made in found(**{"value-quantity": f"ap7.3|{ucum}|mmol/L"})[0]  # within 10 %
    assert made in found(**{"value-quantity": f"1.35|{ucum}|g/L"})[0]
    assert made in found(**{"value-quantity": "135||mg/dL"})[0]  # as written, unit for unit
    assert made not in found(**{"value-quantity": "7.49||mmol/L"})[0]  # not derived ones
    assert made in found(**{"value-quantity": "ge135"})[0]  # no unit: as written
    assert made not in found(**{"value-quantity": "lt8"})[0]
    # a hemoglobin in g/dL (no molar mass here) is not compared with mmol/L, and is said so
    hemoglobin = {o["id"] for o in observations if o["code"]["coding"][0]["code"] == "718-7"}
    assert not hemoglobin & found(**{"value-quantity": f"gt0|{ucum}|mmol/L"})[0]

    # components: blood pressure systolic above 140 mm[Hg], also asked in kPa
    def systolic(o: dict[str, Any]) -> float:
        return max(
            (
                float(c["valueQuantity"]["value"])
                for c in o.get("component", [])
                if c["code"]["coding"][0]["code"] == "8480-6"
            ),
            default=0.0,
        )

    high = {o["id"] for o in observations if systolic(o) > 140}  # whole mm[Hg]: 18.67 kPa is 140.04
    assert high and high != {o["id"] for o in observations if systolic(o)}
    assert found(**{"component-value-quantity": f"gt140|{ucum}|mm[Hg]"})[0] == high
    assert found(**{"component-value-quantity": f"gt18.67|{ucum}|kPa"})[0] == high
    # units this server does not convert, and malformed values: 400, saying which
    for value, words in [
        (f"gt7|{ucum}|furlong", "no UCUM unit this server converts"),
        ("gtseven", "is not a number"),
        ("7|mmol/L", "number|system|code"),
    ]:
        refused = s.get(f"{node.fhir}/Observation", params={"value-quantity": value})
        assert refused.status_code == 400 and words in refused.text, refused.text


def test_composite_searches(node: Node, loaded: dict[str, Any]) -> None:
    """A composite's two parts hold of one element: diastolic above 90 is not "any pressure
    above 90"; each against a brute-force filter of what was loaded."""
    s = node.session()
    observations = _resources(loaded, "Observation")
    ucum = "http://unitsofmeasure.org"

    def found(**params: str) -> set[str]:
        answer = s.get(f"{node.fhir}/Observation", params={**params, "_count": "1000"})
        assert answer.status_code == 200, answer.text
        return _ids(answer.json())

    def pressures(o: dict[str, Any], code: str) -> list[float]:
        return [
            float(c["valueQuantity"]["value"])
            for c in o.get("component", [])
            if c["code"]["coding"][0]["code"] == code
        ]

    diastolic_high = {o["id"] for o in observations if any(p > 90 for p in pressures(o, "8462-4"))}
    any_high = {
        o["id"]
        for o in observations
        if any(p > 90 for p in pressures(o, "8462-4") + pressures(o, "8480-6"))
    }
    assert diastolic_high and diastolic_high != any_high
    for token in ("http://loinc.org|8462-4", "8462-4"):
        value = f"{token}$gt90|{ucum}|mm[Hg]"
        assert found(**{"component-code-value-quantity": value}) == diastolic_high
        assert found(**{"combo-code-value-quantity": value}) == diastolic_high
    assert found(**{"component-code-value-quantity": f"|8462-4$gt90|{ucum}|mm[Hg]"}) == set()
    # OR-ed values, and units converted as for value-quantity (12 kPa is 90.01 mm[Hg])
    systolic_low = {o["id"] for o in observations if any(p < 110 for p in pressures(o, "8480-6"))}
    either = found(
        **{"component-code-value-quantity": f"8462-4$gt12|{ucum}|kPa,8480-6$lt110|{ucum}|mm[Hg]"}
    )
    assert either == diastolic_high | systolic_low
    # a glucose in mg/dL compared in mmol/L by its code's molar mass, at the Observation's level
    # (against every glucose held: an earlier test adds one)
    held = s.get(f"{node.fhir}/Observation", params={"code": "2345-7", "_count": "1000"}).json()
    glucose = {
        e["resource"]["id"]
        for e in held["entry"]
        if e["resource"]["valueQuantity"]["value"] * 10 / 180.156 > 7
    }
    assert glucose
    assert found(**{"code-value-quantity": f"http://loinc.org|2345-7$gt7|{ucum}|mmol/L"}) == glucose
    assert found(**{"combo-code-value-quantity": f"2345-7$gt7|{ucum}|mmol/L"}) == glucose
    # a patient's token: their own blood pressures only
    mine = next(iter(diastolic_high))
    owner = next(o for o in observations if o["id"] == mine)["subject"]["reference"].split("/")[1]
    patient = node.session(node.token(f"pt-{owner[:8]}", "patient", patient=owner))
    theirs = patient.get(
        f"{node.fhir}/Observation",
        params={"component-code-value-quantity": f"8462-4$gt90|{ucum}|mm[Hg]", "_count": "1000"},
    )
    assert theirs.status_code == 200 and mine in _ids(theirs.json())
    assert {e["resource"]["subject"]["reference"] for e in theirs.json()["entry"]} == {
        f"Patient/{owner}"
    }
    # what cannot be searched: 400 saying why
    for resource_type, params, words in [
        ("Observation", {"code-value-quantity": "2345-7"}, "two parts joined by $"),
        ("Observation", {"code-value-quantity": "http://loinc.org|$gt7"}, "must name a code"),
        ("Observation", {"code-value-quantity:missing": "true"}, ":missing is not supported"),
        ("Observation", {"code-value-quantity": "2345-7$gtx"}, "is not a number"),
        ("DocumentReference", {"relationship": "a$b"}, "composite of reference, token"),
    ]:
        refused = s.get(f"{node.fhir}/{resource_type}", params=params)
        assert refused.status_code == 400 and words in refused.text, refused.text


def test_narrative_content_and_near(node: Node) -> None:
    """``_text`` finds words of the narrative (Chinese within a run of characters),
    ``_content`` any string the index holds, ``near`` Locations within a distance (against
    the great-circle distance, points near the edge left out)."""
    s = node.session()
    pid = post(s, f"{node.fhir}/Patient", {"resourceType": "Patient"}).json()["id"]

    def condition(div: str, text: str) -> str:
        made = post(
            s,
            f"{node.fhir}/Condition",
            {
                "resourceType": "Condition",
                "text": {
                    "status": "generated",
                    "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{div}</div>',
                },
                "code": {"text": text},
                "subject": {"reference": f"Patient/{pid}"},
            },
        )
        assert made.status_code == 201, made.text
        return str(made.json()["id"])

    headache = condition("<p>患者主诉<b>头痛</b>三天，伴恶心。</p>", "Tension headache")
    diabetes = condition(
        "<p>Type 2 diabetes &amp; <i>retinopathy</i>, well controlled.</p>", "糖尿病"
    )
    long_run = condition("<p>" + "病" * 300 + "视网膜病变" + "病" * 300 + "</p>", "Other")

    def found(**params: str) -> set[str]:
        answer = s.get(f"{node.fhir}/Condition", params={**params, "subject": f"Patient/{pid}"})
        assert answer.status_code == 200, answer.text
        return _ids(answer.json())

    assert found(_text="头痛") == {headache}
    assert found(_text="恶心 头痛") == {headache}  # every word
    assert found(_text="retino") == {diabetes}  # a word's beginning
    assert found(_text="etinopathy") == set()  # not the middle of a Latin word
    assert found(_text="DIABETES,头痛") == {diabetes, headache}  # OR
    assert found(_text="视网膜病变") == {long_run}  # whole although the run is cut in passages
    assert found(_text="headache") == set()  # the code's text is no narrative
    assert found(_content="headache") == {headache}  # but it is content
    assert found(_content="糖尿病") == {diabetes}
    assert found(_content="diabetes well") == {diabetes}

    # near: five Locations around Foshan (23.02 N, 113.12 E) at known distances
    def location(name: str, latitude: float, longitude: float) -> str:
        body = {
            "resourceType": "Location",
            "name": name,
            "position": {"latitude": latitude, "longitude": longitude},
        }
        return str(post(s, f"{node.fhir}/Location", body).json()["id"])

    import math

    def km(a: tuple[float, float], b: tuple[float, float]) -> float:
        (la1, lo1), (la2, lo2) = (tuple(map(math.radians, p)) for p in (a, b))
        h = (
            math.sin((la2 - la1) / 2) ** 2
            + math.cos(la1) * math.cos(la2) * math.sin((lo2 - lo1) / 2) ** 2
        )
        return 2 * 6371.0088 * math.asin(math.sqrt(h))

    centre = (23.02, 113.12)
    points = {
        location(f"site {i}", centre[0] + dy, centre[1] + dx): (centre[0] + dy, centre[1] + dx)
        for i, (dy, dx) in enumerate(
            [(0.0, 0.0), (0.05, 0.05), (-0.09, 0.0), (0.0, -0.2), (0.3, 0.3), (0.0, 0.0978)]
        )
    }
    for radius, unit, factor in ((10, "km", 1.0), (10000, "m", 0.001), (6, "[mi_i]", 1.609344)):
        answer = s.get(
            f"{node.fhir}/Location",
            params={"near": f"{centre[0]}|{centre[1]}|{radius}|{unit}", "_count": "1000"},
        )
        assert answer.status_code == 200, answer.text
        within = _ids(answer.json()) & set(points)
        limit = radius * factor
        clear = {i for i, p in points.items() if abs(km(centre, p) - limit) > limit / 100}
        assert within & clear == {i for i in clear if km(centre, points[i]) <= limit}
        assert within & clear and clear - within
    for value, words in [
        ("23.02", "latitude|longitude"),
        ("north|113|5", "are numbers"),
        ("23|113|5|furlong", "is not km, m or [mi_i]"),
        ("95|113|5", "out of range"),
    ]:
        refused = s.get(f"{node.fhir}/Location", params={"near": value})
        assert refused.status_code == 400 and words in refused.text, refused.text
    refused = s.get(f"{node.fhir}/Condition", params={"_text": "，。"})
    assert refused.status_code == 400 and "no word" in refused.text
    refused = s.get(f"{node.fhir}/Condition", params={"_query": "anything"})
    assert refused.status_code == 400 and "defines none" in refused.text


def test_compartment_search_and_iterating_includes(node: Node, loaded: dict[str, Any]) -> None:
    s = node.session()
    answers = loaded["answers"]
    pid = next(
        e["resource"]["id"]
        for e in answers[0]["entry"]
        if e["resource"]["resourceType"] == "Patient"
    )
    own = {
        e["resource"]["id"]
        for e in answers[0]["entry"]
        if e["resource"]["resourceType"] == "Condition"
    }
    found = s.get(f"{node.fhir}/Patient/{pid}/Condition", params={"_count": "1000"})
    assert found.status_code == 200 and _ids(found.json()) == own
    assert found.json()["link"][0]["url"].startswith(f"{node.fhir}/Patient/{pid}/Condition?")
    coded = s.get(f"{node.fhir}/Patient/{pid}/Observation", params={"code": "29463-7"}).json()
    assert _ids(coded) == {
        e["resource"]["id"]
        for e in answers[0]["entry"]
        if e["resource"]["resourceType"] == "Observation"
        and e["resource"]["code"]["coding"][0]["code"] == "29463-7"
    }
    assert s.get(f"{node.fhir}/Patient/{pid}/Organization").status_code == 400
    # a patient's token reaches only their own compartment this way
    other = next(
        e["resource"]["id"]
        for e in answers[1]["entry"]
        if e["resource"]["resourceType"] == "Patient"
    )
    me = node.session(node.token(f"pt-{pid[:8]}", "patient", patient=pid))
    assert me.get(f"{node.fhir}/Patient/{pid}/Condition").status_code == 200
    assert me.get(f"{node.fhir}/Patient/{other}/Condition").status_code == 404
    # _include:iterate: a DiagnosticReport, its results, and through them their encounters
    report = next(
        e["resource"]
        for e in answers[0]["entry"]
        if e["resource"]["resourceType"] == "DiagnosticReport"
    )
    bundle = s.get(
        f"{node.fhir}/DiagnosticReport",
        params={
            "_id": report["id"],
            "_include": "DiagnosticReport:result",
            "_include:iterate": "Observation:encounter",
        },
    ).json()
    included = {
        (e["resource"]["resourceType"], e["resource"]["id"])
        for e in bundle["entry"]
        if e["search"]["mode"] == "include"
    }
    results = {r["reference"].split("/")[1] for r in report["result"]}
    assert {("Observation", r) for r in results} <= included
    encounters = {
        e["resource"]["encounter"]["reference"].split("/")[1]
        for e in answers[0]["entry"]
        if e["resource"]["id"] in results and "encounter" in e["resource"]
    }
    assert encounters and {("Encounter", e) for e in encounters} <= included
    without = s.get(
        f"{node.fhir}/DiagnosticReport",
        params={"_id": report["id"], "_include": "DiagnosticReport:result"},
    ).json()
    assert not any(e["resource"]["resourceType"] == "Encounter" for e in without["entry"])
    refused = s.get(
        f"{node.fhir}/DiagnosticReport",
        params={"_id": report["id"], "_include": "Observation:encounter"},
    )
    assert refused.status_code == 400 and "_include:iterate" in refused.text
    # _include=*: every reference parameter of the type
    everything = s.get(
        f"{node.fhir}/DiagnosticReport", params={"_id": report["id"], "_include": "*"}
    ).json()
    kinds = {
        e["resource"]["resourceType"]
        for e in everything["entry"]
        if e["search"]["mode"] == "include"
    }
    assert {"Observation", "Patient", "Encounter"} <= kinds
