"""Privacy consents through the FHIR API of a real node, on both engines: each grant, narrowing
and revocation goes on the node's chain in the same transaction; who may record what."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path
from typing import Any

import pytest

from consent.model import WITNESS_URL, consent_resource
from consent.pseudonym import RESIDENT_ID_SYSTEM, pseudonym
from ledger.store import ChainStore
from node.base.config import load_config
from node.consortium.membership import read_secret
from tests.helpers.nodes import Node, post, running_node

pytestmark = pytest.mark.usefixtures("node")


def ledger_entries(node: Node) -> list[dict[str, Any]]:
    store = ChainStore(node.database.engine)
    head = store.heads().get("hosp-a")
    return [] if head is None else [store.entry("hosp-a", s) for s in range(head.tree_size)]


def new_patient(node: Node, resident_id: str | None = None) -> tuple[str, str]:
    """A Patient (with a resident ID unless None is given) and a patient user's token."""
    patient: dict[str, Any] = {
        "resourceType": "Patient",
        "name": [{"family": "张", "given": ["三"]}],
    }
    if resident_id is not None:
        patient["identifier"] = [{"system": RESIDENT_ID_SYSTEM, "value": resident_id}]
    created = post(node.session(), f"{node.fhir}/Patient", patient)
    assert created.status_code == 201, created.text
    patient_id = created.json()["id"]
    token = node.token(f"pt-{patient_id[:8]}", "patient", patient=patient_id)
    return patient_id, token


def resident_id() -> str:
    return "3301" + str(uuid.uuid4().int)[:13] + "X"


def their_pseudonym(node: Node, value: str) -> str:
    secret = read_secret(load_config(node.directory).consortium_key)
    return pseudonym(secret, RESIDENT_ID_SYSTEM, value)


def test_a_patient_grants_narrows_and_revokes(node: Node) -> None:
    rid = resident_id()
    patient_id, token = new_patient(node, rid)
    session = node.session(token)
    before = len(ledger_entries(node))
    grant = consent_resource(
        patient_id, ["hosp-a"], ["laboratory", "imaging"], ["TREAT"], "2026-01-01", None
    )
    created = post(session, f"{node.fhir}/Consent", grant)
    assert created.status_code == 201, created.text
    consent_id = created.json()["id"]
    entries = ledger_entries(node)[before:]
    assert [e["type"] for e in entries] == ["consent.granted"]
    body = entries[0]["body"]
    assert body == {
        "consent_id": consent_id,
        "patient": their_pseudonym(node, rid),
        "grantees": ["hosp-a"],
        "categories": ["imaging", "laboratory"],
        "purposes": ["TREAT"],
        "period": {"start": "2025-12-31T16:00:00.000Z", "end": None},
        "resource_hash": hashlib.sha256(created.content).hexdigest(),
    }
    # narrowing is an update: a new grant that supersedes the first
    narrowed = created.json()
    narrowed["provision"]["class"] = [narrowed["provision"]["class"][1]]
    updated = session.put(
        f"{node.fhir}/Consent/{consent_id}",
        json=narrowed,
        headers={"Content-Type": "application/fhir+json"},
    )
    assert updated.status_code == 200, updated.text
    entries = ledger_entries(node)[before:]
    assert [e["type"] for e in entries] == ["consent.granted", "consent.granted"]
    assert entries[1]["body"]["categories"] == ["laboratory"]
    assert entries[1]["body"]["resource_hash"] == hashlib.sha256(updated.content).hexdigest()
    # status inactive revokes
    revoked = updated.json()
    revoked["status"] = "inactive"
    answer = session.put(
        f"{node.fhir}/Consent/{consent_id}",
        json=revoked,
        headers={"Content-Type": "application/fhir+json"},
    )
    assert answer.status_code == 200, answer.text
    entries = ledger_entries(node)[before:]
    assert entries[-1]["type"] == "consent.revoked"
    assert entries[-1]["body"] == {"consent_id": consent_id, "patient": their_pseudonym(node, rid)}
    # an unchanged revoked consent records nothing more
    again = session.put(
        f"{node.fhir}/Consent/{consent_id}",
        json={k: v for k, v in answer.json().items() if k != "meta"},
        headers={"Content-Type": "application/fhir+json"},
    )
    assert again.status_code == 200
    assert len(ledger_entries(node)[before:]) == 3


def test_a_patient_records_only_their_own_consents(node: Node) -> None:
    mine, token = new_patient(node, resident_id())
    theirs, their_token = new_patient(node, resident_id())
    session = node.session(token)
    before = len(ledger_entries(node))
    refused = post(
        session,
        f"{node.fhir}/Consent",
        consent_resource(theirs, ["*"], ["laboratory"], ["TREAT"], None, None),
    )
    assert refused.status_code == 403
    assert refused.json()["resourceType"] == "OperationOutcome"
    granted = post(
        node.session(their_token),
        f"{node.fhir}/Consent",
        consent_resource(theirs, ["*"], ["laboratory"], ["TREAT"], None, None),
    )
    assert granted.status_code == 201
    hijack = granted.json()
    hijack["status"] = "inactive"
    answer = session.put(
        f"{node.fhir}/Consent/{hijack['id']}",
        json=hijack,
        headers={"Content-Type": "application/fhir+json"},
    )
    assert answer.status_code in (403, 404)
    research = consent_resource(mine, ["*"], ["laboratory"], ["TREAT"], None, None)
    research["scope"]["coding"][0]["code"] = "research"
    assert post(session, f"{node.fhir}/Consent", research).status_code == 403
    # a patient still writes nothing else
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "x"},
        "subject": {"reference": f"Patient/{mine}"},
    }
    assert post(session, f"{node.fhir}/Observation", observation).status_code == 403
    assert [e["type"] for e in ledger_entries(node)[before:]] == ["consent.granted"]


def test_staff_record_a_paper_consent_with_a_witness(node: Node) -> None:
    patient_id, _ = new_patient(node, resident_id())
    doctor = node.session(node.token("dr-li", "doctor"))
    before = len(ledger_entries(node))
    paper = consent_resource(patient_id, ["*"], ["imaging"], ["TREAT"], "2026-11-01", "2027-10-31")
    missing = post(doctor, f"{node.fhir}/Consent", paper)
    assert missing.status_code == 422
    assert "witness" in missing.json()["issue"][0]["diagnostics"]
    assert len(ledger_entries(node)) == before
    paper["extension"] = [
        {"url": WITNESS_URL, "valueReference": {"display": "王护士 (nurse, ward 3)"}}
    ]
    created = post(doctor, f"{node.fhir}/Consent", paper)
    assert created.status_code == 201, created.text
    consent_id = created.json()["id"]
    provenance = doctor.get(
        f"{node.fhir}/Provenance", params={"target": f"Consent/{consent_id}"}
    ).json()
    agents = [e["resource"]["agent"][0] for e in provenance.get("entry", [])]
    assert [a["who"]["identifier"]["value"] for a in agents] == ["dr-li"]
    assert agents[0]["type"]["coding"][0]["code"] == "enterer"
    assert [e["type"] for e in ledger_entries(node)[before:]] == ["consent.granted"]


def test_a_granted_consent_is_revoked_not_deleted(node: Node) -> None:
    patient_id, token = new_patient(node, resident_id())
    created = post(
        node.session(token),
        f"{node.fhir}/Consent",
        consent_resource(patient_id, ["*"], ["laboratory"], ["TREAT"], None, None),
    )
    admin = node.session(node.token("admin", "admin"))
    url = f"{node.fhir}/Consent/{created.json()['id']}"
    refused = admin.delete(url)
    assert refused.status_code == 409
    assert "revoke it" in refused.json()["issue"][0]["diagnostics"]
    revoked = {**created.json(), "status": "inactive"}
    assert (
        node.session(token)
        .put(url, json=revoked, headers={"Content-Type": "application/fhir+json"})
        .status_code
        == 200
    )
    assert admin.delete(url).status_code == 204


@pytest.mark.parametrize(
    ("change", "status", "words"),
    [
        ({"provision": {"type": "deny"}}, 422, "only permits"),
        (
            {"provision": {"type": "permit", "provision": [{"type": "deny"}]}},
            422,
            "not be enforced",
        ),
        (
            {
                "provision": {
                    "type": "permit",
                    "actor": [
                        {
                            "role": {"text": "x"},
                            "reference": {
                                "identifier": {"system": "urn:hrx:member", "value": "hosp-x"}
                            },
                        }
                    ],
                }
            },
            422,
            "not a member",
        ),
    ],
)
def test_consents_the_ledger_cannot_carry_are_refused(
    node: Node, change: dict[str, Any], status: int, words: str
) -> None:
    patient_id, token = new_patient(node, resident_id())
    before = len(ledger_entries(node))
    resource = {
        **consent_resource(patient_id, ["*"], ["laboratory"], ["TREAT"], None, None),
        **change,
    }
    answer = post(node.session(token), f"{node.fhir}/Consent", resource)
    assert answer.status_code == status, answer.text
    outcome = answer.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert words in outcome["issue"][0]["diagnostics"]
    assert outcome["issue"][0]["expression"][0].startswith("Consent.provision")
    assert len(ledger_entries(node)) == before
    assert (
        node.session(token)
        .get(f"{node.fhir}/Consent", params={"patient": patient_id})
        .json()["total"]
        == 0
    )


def test_a_patient_without_the_consortium_identifier_cannot_consent(node: Node) -> None:
    patient_id, token = new_patient(node, None)
    answer = post(
        node.session(token),
        f"{node.fhir}/Consent",
        consent_resource(patient_id, ["*"], ["laboratory"], ["TREAT"], None, None),
    )
    assert answer.status_code == 422
    assert RESIDENT_ID_SYSTEM in answer.json()["issue"][0]["diagnostics"]


def test_a_failed_transaction_leaves_neither_consent_nor_entry(node: Node) -> None:
    patient_id, _ = new_patient(node, resident_id())
    doctor = node.session(node.token("dr-li", "doctor"))
    before = len(ledger_entries(node))
    consent = consent_resource(patient_id, ["*"], ["laboratory"], ["TREAT"], None, None)
    consent["extension"] = [{"url": WITNESS_URL, "valueReference": {"display": "王"}}]
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": consent, "request": {"method": "POST", "url": "Consent"}},
            {
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"text": "x"},
                    "subject": {"reference": "Patient/does-not-exist"},
                },
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }
    answer = post(doctor, node.fhir, bundle)
    assert answer.status_code in (400, 404, 422), answer.text
    assert len(ledger_entries(node)) == before
    bundle["entry"] = bundle["entry"][:1]
    answer = post(doctor, node.fhir, bundle)
    assert answer.status_code == 200, answer.text
    assert [e["type"] for e in ledger_entries(node)[before:]] == ["consent.granted"]


def test_other_consents_stay_off_the_ledger(node: Node) -> None:
    patient_id, _ = new_patient(node, None)
    doctor = node.session(node.token("dr-li", "doctor"))
    before = len(ledger_entries(node))
    treatment = consent_resource(patient_id, ["*"], ["laboratory"], ["TREAT"], None, None)
    treatment["scope"]["coding"][0]["code"] = "treatment"
    assert post(doctor, f"{node.fhir}/Consent", treatment).status_code == 201
    draft = consent_resource(patient_id, ["*"], ["laboratory"], ["TREAT"], None, None)
    draft["status"] = "draft"
    assert post(doctor, f"{node.fhir}/Consent", draft).status_code == 201
    assert len(ledger_entries(node)) == before


def test_a_node_outside_any_consortium_refuses_privacy_consents(tmp_path: Path) -> None:
    with running_node(tmp_path / "alone", joined=False) as alone:
        patient_id, token = new_patient(alone, resident_id())
        answer = post(
            alone.session(token),
            f"{alone.fhir}/Consent",
            consent_resource(patient_id, ["*"], ["laboratory"], ["TREAT"], None, None),
        )
        assert answer.status_code == 409
        assert "hrx node join" in answer.json()["issue"][0]["diagnostics"]
