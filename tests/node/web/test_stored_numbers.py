"""Numbers JSON clients cannot read, already stored: a node whose store holds one (written by an
older version, here straight into its table) still answers ``/peer/access``, searches and
reads for the patient, on SQLite and PostgreSQL (a real node process, a real signed peer
request), and never hands the unreadable resource to another member or into a Bundle."""

from __future__ import annotations

import json
import uuid

from consent.pseudonym import RESIDENT_ID_SYSTEM, pseudonym
from fhir_adapters.store import jsonio
from ledger import keys
from ledger.store import ChainStore
from node.base.config import load_config
from node.consortium.membership import read_secret
from node.consortium.peers import SignedPeers
from tests.helpers.fhir import HUGE, observation, poison
from tests.helpers.nodes import Node, asked, post


def a_patient_with_results(node: Node) -> tuple[str, str, list[str]]:
    """(patient id, pseudonym, ids of three laboratory Observations)."""
    session = node.session()
    resident_id = "3301" + str(uuid.uuid4().int)[:14]
    created = post(
        session,
        f"{node.fhir}/Patient",
        {
            "resourceType": "Patient",
            "identifier": [{"system": RESIDENT_ID_SYSTEM, "value": resident_id}],
        },
    )
    assert created.status_code == 201, created.text
    patient_id = created.json()["id"]
    results = []
    for code in ("718-7", "2823-3", "2160-0"):
        made = post(session, f"{node.fhir}/Observation", observation(patient_id, code))
        assert made.status_code == 201, made.text
        results.append(made.json()["id"])
    secret = read_secret(load_config(node.directory).consortium_key)
    return patient_id, pseudonym(secret, RESIDENT_ID_SYSTEM, resident_id), results


def ask_for_records(node: Node, patient: str) -> bytes:
    """The bytes of the answer to a break-glass access request, signed by the node's own
    member key (it is the one member of its consortium)."""
    config = load_config(node.directory)
    peers = SignedPeers(
        ChainStore(node.database.engine), config.node_id, keys.load_private_key(config.ed25519_key)
    )
    body = {
        "request_id": str(uuid.uuid4()),
        "patient": patient,
        "purpose": "ETREAT",
        "categories": ["laboratory"],
        "reason": "昏迷，无家属，需查既往检验结果",
        "reason_code": "unconscious",
    }
    body = asked(node.directory, body)  # the question on the chain first, as a referral does
    return peers.fetch(config.node_id, "POST", "/peer/access", body)  # PeerUnavailable if not 200


def test_a_stored_unreadable_number_does_not_take_down_peer_access(node: Node) -> None:
    _, patient, results = a_patient_with_results(node)
    poison(node.database, "Observation", results[1])
    answer = ask_for_records(node, patient)
    parsed = json.loads(answer)  # a JSON client reads the whole answer
    assert parsed["decision"] == "permit"
    released = {resource["id"] for resource in parsed["resources"]}
    assert released == {results[0], results[2]}  # the unreadable one is left out


def test_searches_and_reads_of_the_patient_go_on(node: Node) -> None:
    patient_id, _, results = a_patient_with_results(node)
    poison(node.database, "Observation", results[0])
    session = node.session()
    found = session.get(f"{node.fhir}/Observation", params={"patient": patient_id})
    assert found.status_code == 200, found.text[:500]
    bundle = json.loads(found.content)  # readable by a JSON client
    assert bundle["total"] == 3
    matches = [e["resource"]["id"] for e in bundle["entry"] if e["search"]["mode"] == "match"]
    assert sorted(matches) == sorted(results[1:])
    [note] = [e["resource"] for e in bundle["entry"] if e["search"]["mode"] == "outcome"]
    assert "1 resource(s) left out" in note["issue"][0]["diagnostics"]
    everything = session.get(f"{node.fhir}/Patient/{patient_id}/$everything")
    assert everything.status_code == 200 and json.loads(everything.content)
    # the resource itself can still be read, as stored, and indented
    for params in ({}, {"_pretty": "true"}):
        read = session.get(f"{node.fhir}/Observation/{results[0]}", params=params)
        assert read.status_code == 200, read.text[:500]
        assert HUGE in read.text
    # and a corrected version replaces it
    current = jsonio.parse(session.get(f"{node.fhir}/Observation/{results[0]}").content)
    current["valueQuantity"]["value"] = jsonio.parse("13.6")
    fixed = session.put(
        f"{node.fhir}/Observation/{results[0]}",
        data=jsonio.dump(current),
        headers={"Content-Type": "application/fhir+json"},
    )
    assert fixed.status_code == 200, fixed.text[:500]
    again = json.loads(
        session.get(f"{node.fhir}/Observation", params={"patient": patient_id}).content
    )
    assert sorted(e["resource"]["id"] for e in again["entry"]) == sorted(results)
