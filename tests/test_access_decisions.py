"""A source deciding members' access requests with the consent policy (real member processes):
each decision, and break-glass, recorded on the source's chain; the auditor's replay reaches the
same decision; the patient sees it in the portal and the auditor in hrx audit verify."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner

from consent.model import consent_resource
from consent.policy import CONSENT_TYPES
from consent.pseudonym import RESIDENT_ID_SYSTEM, pseudonym
from exchange.decisions import replay
from ledger import keys
from ledger.store import ChainStore
from node.cli import main
from node.config import load_config
from node.consortium import read_secret
from node.harness import Consortium
from node.replication import PeerUnavailable, SignedPeers
from tests.nodes import Node, post
from tests.test_portal import csrf_of, enroll

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Consortium]:
    consortium = Consortium(tmp_path_factory.mktemp("access"), 2, epoch_seconds=2)
    try:
        consortium.start_all()
        yield consortium
    finally:
        consortium.close()


@pytest.fixture(scope="module")
def source(group: Consortium) -> Node:
    member = group.members["hosp-a"]
    return Node(member.directory, member.web_port)


def peers_of(group: Consortium, name: str) -> SignedPeers:
    config = load_config(group.members[name].directory)
    return SignedPeers(
        ChainStore(config.database_url), name, keys.load_private_key(config.ed25519_key)
    )


def a_patient(source: Node) -> tuple[str, str]:
    resident_id = "3301" + str(uuid.uuid4().int)[:14]
    created = post(
        source.session(),
        f"{source.fhir}/Patient",
        {
            "resourceType": "Patient",
            "identifier": [{"system": RESIDENT_ID_SYSTEM, "value": resident_id}],
        },
    )
    assert created.status_code == 201, created.text
    secret = read_secret(load_config(source.directory).consortium_key)
    return created.json()["id"], pseudonym(secret, RESIDENT_ID_SYSTEM, resident_id)


def ask(
    group: Consortium,
    patient: str,
    categories: list[str],
    purpose: str = "TREAT",
    reason: str | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "request_id": str(uuid.uuid4()),
        "patient": patient,
        "purpose": purpose,
        "categories": categories,
    }
    if reason is not None:
        body["reason"] = reason
    answer: dict[str, Any] = peers_of(group, "hosp-b").post("hosp-a", "/peer/access", body)
    return answer


def recorded(source: Node, answer: dict[str, Any]) -> dict[str, Any]:
    store = ChainStore(source.database.engine)
    entry: dict[str, Any] = store.entry("hosp-a", answer["decided"]["seq"])
    return entry


def replayed(source: Node, decided: dict[str, Any]) -> str:
    store = ChainStore(source.database.engine)
    body = decided["body"]
    return replay(body, store.entries_about(body["patient"], CONSENT_TYPES)).decision


def test_decisions_follow_consent_and_are_recorded(source: Node, group: Consortium) -> None:
    patient_id, patient = a_patient(source)
    denied = ask(group, patient, ["laboratory"])
    assert denied["decision"] == "deny" and denied["consent"] is None
    assert "no consent of this patient is recorded" in denied["reasons"][0]
    entry = recorded(source, denied)
    assert entry["type"] == "access.decided"
    body = entry["body"]
    assert body["requester_org"] == "hosp-b" and body["patient"] == patient
    assert body["decision"] == "deny" and body["view"] == denied["view"]
    assert replayed(source, entry) == "deny"

    token = source.token(f"pt-{patient_id[:8]}", "patient", patient=patient_id)
    granted = post(
        source.session(token),
        f"{source.fhir}/Consent",
        consent_resource(patient_id, ["hosp-b"], ["laboratory"], ["TREAT"], None, None),
    )
    assert granted.status_code == 201, granted.text
    permitted = ask(group, patient, ["laboratory"])
    assert permitted["decision"] == "permit" and permitted["consent"]["chain"] == "hosp-a"
    assert replayed(source, recorded(source, permitted)) == "permit"
    imaging = ask(group, patient, ["laboratory", "imaging"])
    assert imaging["decision"] == "deny" and "does not cover imaging" in " ".join(
        imaging["reasons"]
    )

    revoked = {**granted.json(), "status": "inactive"}
    answer = source.session(token).put(
        f"{source.fhir}/Consent/{revoked['id']}",
        json=revoked,
        headers={"Content-Type": "application/fhir+json"},
    )
    assert answer.status_code == 200
    after = ask(group, patient, ["laboratory"])
    assert after["decision"] == "deny" and "revoked" in " ".join(after["reasons"])
    # the permit, replayed over its own view, is still a permit: the revocation came later
    assert replayed(source, recorded(source, permitted)) == "permit"


def test_break_glass_needs_a_reason_and_is_flagged(
    source: Node, group: Consortium, tmp_path: Path
) -> None:
    patient_id, patient = a_patient(source)
    silent = ask(group, patient, ["laboratory"], "ETREAT")
    assert silent["decision"] == "deny" and "needs a stated reason" in silent["reasons"][0]
    emergency = ask(group, patient, ["laboratory"], "ETREAT", "车祸昏迷，无家属")
    assert emergency["decision"] == "permit" and emergency["emergency"]
    store = ChainStore(source.database.engine)
    flagged = store.entry("hosp-a", emergency["decided"]["seq"] + 1)
    assert flagged["type"] == "emergency.access"
    assert flagged["body"]["requester_org"] == "hosp-b"
    assert "车祸" not in str(flagged) and len(flagged["body"]["reason_hash"]) == 64
    assert replayed(source, recorded(source, emergency)) == "permit"
    # the auditor is shown every break-glass access
    verdict = CliRunner().invoke(
        main, ["audit", "verify", load_config(source.directory).database_url]
    )
    assert verdict.exit_code == 0, verdict.output
    assert "emergency (break-glass) access" in verdict.output
    assert f"hosp-b (recorded on hosp-a seq {flagged['seq']})" in verdict.output
    # and the patient, highlighted, in the portal
    browser = enroll(source, patient_id)
    page = browser.get(f"{source.base}/portal/access")
    assert page.status_code == 200
    card = re.search(
        rf'<section class="card access emergency" id="access-{emergency["request_id"]}">(.*?)'
        r"</section>",
        page.text,
        re.S,
    )
    assert card, page.text[:2000]
    assert "急诊紧急调阅" in card.group(1) and "允许" in card.group(1)
    denied = re.search(rf'id="access-{silent["request_id"]}">(.*?)</section>', page.text, re.S)
    assert denied and "拒绝" in denied.group(1)
    assert "车祸" not in page.text.split('id="access-')[1]  # the reason stays with the source
    (receipt,) = re.findall(rf'href="(/portal/receipts/hosp-a/{flagged["seq"]})"', page.text)
    assert browser.get(f"{source.base}{receipt}").json()["entry"]["type"] == "emergency.access"
    assert csrf_of(page)


def test_requests_must_be_signed_and_well_formed(source: Node, group: Consortium) -> None:
    _, patient = a_patient(source)
    unsigned = requests.post(f"{source.base}/peer/access", json={"patient": patient})
    assert unsigned.status_code == 401
    peers = peers_of(group, "hosp-b")
    for bad, words in [
        ({"request_id": "x", "patient": patient, "purpose": "TREAT", "categories": ["x"]}, "8-64"),
        (
            {
                "request_id": "r" * 10,
                "patient": "Zhang San",
                "purpose": "TREAT",
                "categories": ["x"],
            },
            "pseudonym",
        ),
        (
            {"request_id": "r" * 10, "patient": patient, "purpose": "TREAT", "categories": []},
            "1-16",
        ),
        (
            {
                "request_id": "r" * 10,
                "patient": patient,
                "purpose": "TREAT",
                "categories": ["x"],
                "requester": "hosp-c",
            },
            "no field",
        ),
    ]:
        with pytest.raises(PeerUnavailable, match=words):
            peers.post("hosp-a", "/peer/access", bad)
