"""Local audit: every read, search and write of patient data leaves an AuditEvent shaped after
IHE BALP, listing exactly the resources returned; auditors can search them."""

from __future__ import annotations

import base64
from typing import Any

from fhir_adapters.store.resources import validate
from tests.helpers.fhir import new_patient, observation
from tests.helpers.nodes import Node, post


def events(node: Node, query: str) -> list[dict[str, Any]]:
    auditor = node.session(node.token("auditor", "auditor"))
    bundle = auditor.get(f"{node.fhir}/AuditEvent?{query}&_sort=-date&_count=50").json()
    return [entry["resource"] for entry in bundle.get("entry", [])]


def entity_refs(event: dict[str, Any], role: str) -> list[str]:
    return [e["what"]["reference"] for e in event.get("entity", []) if e["role"]["code"] == role]


def test_search_event_lists_what_was_returned(node: Node) -> None:
    s = node.session(node.token("dr-audit", "doctor"))
    pid = new_patient(node, identifier="audit-1")
    for _ in range(3):
        post(s, f"{node.fhir}/Observation", observation(pid))
    bundle = s.get(f"{node.fhir}/Observation?patient={pid}&_count=2").json()
    assert bundle["total"] == 3
    found = [
        e
        for e in events(node, f"patient={pid}&subtype=search-type")
        if e["agent"][0]["who"]["identifier"]["value"] == "dr-audit"
    ]
    assert len(found) == 1
    event = found[0]
    returned = [f"Observation/{e['resource']['id']}/_history/1" for e in bundle["entry"]]
    assert entity_refs(event, "4") == returned  # the two on the page, not all three
    assert entity_refs(event, "1") == [f"Patient/{pid}"]
    query = next(e for e in event["entity"] if e["role"]["code"] == "24")["query"]
    assert f"patient={pid}" in base64.b64decode(query).decode()
    assert event["action"] == "E" and event["outcome"] == "0"
    assert event["source"]["observer"]["identifier"]["value"] == "hosp-a"
    validate(event, "AuditEvent")  # a valid R4 AuditEvent, code values included


def test_read_write_and_refusal_are_recorded(node: Node) -> None:
    s = node.session(node.token("dr-audit-2", "doctor"))
    pid = new_patient(node, identifier="audit-2")
    obs = post(s, f"{node.fhir}/Observation", observation(pid)).json()
    s.get(f"{node.fhir}/Observation/{obs['id']}")
    mine = [
        e
        for e in events(node, f"patient={pid}")
        if e["agent"][0]["who"]["identifier"]["value"] == "dr-audit-2"
    ]
    kinds = [(e["subtype"][0]["code"], e["action"]) for e in mine]
    assert ("read", "R") in kinds and ("create", "C") in kinds
    read = next(e for e in mine if e["subtype"][0]["code"] == "read")
    assert entity_refs(read, "4") == [f"Observation/{obs['id']}/_history/1"]
    # a refused call leaves a record with outcome 4 and the reason
    limited = node.session(node.token("dr-limited", "doctor", scope="user/Patient.rs"))
    assert limited.get(f"{node.fhir}/Observation/{obs['id']}").status_code == 403
    refused = [
        e
        for e in events(node, "outcome=4")
        if e["agent"][0]["who"]["identifier"]["value"] == "dr-limited"
    ]
    assert refused and "may not read Observation" in refused[0]["outcomeDesc"]


def test_a_patient_sees_who_read_their_records(node: Node) -> None:
    s = node.session(node.token("dr-audit-3", "doctor"))
    pid = new_patient(node, identifier="audit-3")
    s.get(f"{node.fhir}/Patient/{pid}")
    patient = node.session(node.token("patient-audit-3", "patient", patient=pid))
    bundle = patient.get(f"{node.fhir}/AuditEvent?patient={pid}").json()
    readers = {e["resource"]["agent"][0]["who"]["identifier"]["value"] for e in bundle["entry"]}
    assert "dr-audit-3" in readers
    # and only events about them
    other = new_patient(node, identifier="audit-4")
    s.get(f"{node.fhir}/Patient/{other}")
    assert patient.get(f"{node.fhir}/AuditEvent?patient={other}").json()["total"] == 0


def test_each_patient_sees_only_their_own_part_of_a_search(node: Node) -> None:
    doctor = node.session(node.token("dr-audit-5", "doctor"))
    alice = new_patient(node, identifier="audit-5a")
    bob = new_patient(node, identifier="audit-5b")
    for pid in (alice, bob):
        post(doctor, f"{node.fhir}/Observation", observation(pid, code="94500-6"))
    found = doctor.get(f"{node.fhir}/Observation?code=94500-6").json()
    assert found["total"] >= 2
    as_alice = node.session(node.token("patient-audit-5a", "patient", patient=alice))
    for entry in as_alice.get(f"{node.fhir}/AuditEvent?patient={alice}&_count=100").json()["entry"]:
        text = str(entry["resource"])
        assert bob not in text, "alice's audit trail shows bob"
    mine = [
        e["resource"]
        for e in as_alice.get(f"{node.fhir}/AuditEvent?patient={alice}&subtype=search-type").json()[
            "entry"
        ]
        if e["resource"]["agent"][0]["who"]["identifier"]["value"] == "dr-audit-5"
    ]
    assert mine and entity_refs(mine[0], "1") == [f"Patient/{alice}"]


def test_a_deletion_shows_in_the_patients_trail(node: Node) -> None:
    doctor = node.session(node.token("dr-audit-6", "doctor"))
    pid = new_patient(node, identifier="audit-6")
    obs = post(doctor, f"{node.fhir}/Observation", observation(pid)).json()
    assert doctor.delete(f"{node.fhir}/Observation/{obs['id']}").status_code == 204
    deletions = [e for e in events(node, f"patient={pid}&action=D")]
    assert deletions and entity_refs(deletions[0], "4") == [f"Observation/{obs['id']}/_history/2"]
