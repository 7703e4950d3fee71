"""A source deciding members' access requests with the consent policy (real member processes):
each decision, and break-glass, recorded on the source's chain; the auditor's replay reaches the
same decision; the patient sees it in the portal and the auditor in hrx audit verify."""

from __future__ import annotations

import json
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
from ledger.errors import PeerUnavailable
from ledger.store import ChainStore
from node.base.config import load_config
from node.cli import main
from node.consortium.membership import read_secret
from node.consortium.peers import SignedPeers
from node.demo.harness import Consortium
from tests.helpers.nodes import Node, a_patient, ask_access, post
from tests.helpers.portal import csrf_of, enroll

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


def ask(
    group: Consortium,
    patient: str,
    categories: list[str],
    purpose: str = "TREAT",
    reason: str | None = None,
    reason_code: str = "unconscious",
) -> dict[str, Any]:
    """hosp-b asks hosp-a, as a referral does: the question on hosp-b's chain first."""
    body: dict[str, Any] = {
        "request_id": str(uuid.uuid4()),
        "patient": patient,
        "purpose": purpose,
        "categories": categories,
    }
    if reason is not None:
        body["reason"], body["reason_code"] = reason, reason_code
    return ask_access(group.members["hosp-b"].directory, "hosp-a", body)


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
    emergency = ask(group, patient, ["laboratory"], "ETREAT", "车祸昏迷，无家属陪同，需查既往检查")
    assert emergency["decision"] == "permit" and emergency["emergency"]
    store = ChainStore(source.database.engine)
    flagged = store.entry("hosp-a", emergency["decided"]["seq"] + 1)
    assert flagged["type"] == "emergency.access"
    assert flagged["body"]["requester_org"] == "hosp-b"
    assert "车祸" not in str(flagged) and len(flagged["body"]["reason_hash"]) == 64
    assert flagged["body"]["reason_code"] == "unconscious"
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
        (
            {"request_id": "r" * 10, "patient": patient, "purpose": "HRESCH", "categories": ["x"]},
            "for care",  # research and public health are asked for a cohort
        ),
    ]:
        with pytest.raises(PeerUnavailable, match=words):  # checked before the proof
            peers.post("hosp-a", "/peer/access", {**bad, "asked": {}})


def test_no_member_learns_who_is_treated_without_a_recorded_question(
    source: Node, group: Consortium
) -> None:
    """A question without the proof that it is on the asker's chain gets the same refusal
    whether or not the source holds the patient; a proof of another question is refused; an
    answer ("holds" or not) comes only to a recorded question; nothing is recorded at the
    source for a refused one."""
    _, held = a_patient(source)
    unknown = ("8" if held[0] == "9" else "9") + held[1:]  # another pseudonym, always
    peers = peers_of(group, "hosp-b")
    store = ChainStore(source.database.engine)
    before = store.heads()["hosp-a"].tree_size
    refusals = []
    for patient in (held, unknown):
        body = {
            "request_id": str(uuid.uuid4()),
            "patient": patient,
            "purpose": "TREAT",
            "categories": ["laboratory"],
        }
        with pytest.raises(PeerUnavailable) as refused:
            peers.post("hosp-a", "/peer/access", body)
        refusals.append(str(refused.value).replace(patient, "?"))
    assert refusals[0] == refusals[1] and "proof that the question is on" in refusals[0]

    # a real question about one patient does not open another: 403, identical either way
    b = group.members["hosp-b"].directory
    from node.flows.prior_results import record_question
    from node.services import open_services

    services = open_services(load_config(b))
    try:
        proof = record_question(services, "q-" + "1" * 10, held, "dr-x", "TREAT", ["laboratory"])
    finally:
        services.close()
    for patient in (held, unknown):
        with pytest.raises(PeerUnavailable, match="another request or another patient"):
            peers.post(
                "hosp-a",
                "/peer/access",
                {
                    "request_id": "q-" + "2" * 10,
                    "patient": patient,
                    "purpose": "TREAT",
                    "categories": ["laboratory"],
                    "asked": proof,
                },
            )
    assert store.heads()["hosp-a"].tree_size == before  # nothing decided, nothing recorded

    # the recorded questions are answered: a decision for the one held, a "no" for the other
    assert ask(group, held, ["laboratory"])["decision"] == "deny"
    answer = ask(group, unknown, ["laboratory"])
    assert answer["holds"] is False and set(answer) == {"request_id", "holds"}
    # and each is on the asker's chain, where the auditor and the patient's portal read it
    asker = ChainStore(load_config(b).database_url)
    questions = [e["body"] for e in asker.entries_about(unknown, ("access.requested",))]
    assert [q["request_id"] for q in questions] == [answer["request_id"]]
    assert questions[0]["purpose"] == "TREAT" and questions[0]["requester"]["org"] == "hosp-b"


def test_break_glass_needs_a_coded_reason_in_words(source: Node, group: Consortium) -> None:
    _, patient = a_patient(source)
    for reason, code, words in [
        ("x", "unconscious", "10-500 characters"),
        ("..........", "unconscious", "10-500 characters"),
        ("车祸昏迷，无家属陪同，需查既往检查", "because", "needs a reason code"),
        ("车祸昏迷，无家属陪同，需查既往检查", None, "needs a reason code"),
    ]:
        body: dict[str, Any] = {
            "request_id": str(uuid.uuid4()),
            "patient": patient,
            "purpose": "ETREAT",
            "categories": ["laboratory"],
            "reason": reason,
        }
        if code is not None:
            body["reason_code"] = code
        with pytest.raises(PeerUnavailable, match=words):
            ask_access(group.members["hosp-b"].directory, "hosp-a", body)


def test_nothing_identifying_reaches_the_ledger(
    source: Node, group: Consortium, tmp_path: Path
) -> None:
    """After the whole consent and portal flow, every member's ledger export holds none of the
    patients' names, identifiers, phone numbers or birth dates (nor the witness's name or a
    break-glass reason)."""
    people = [
        ("欧阳", "娜娜", "330106198503120027", "13812345678", "1985-03-12"),
        ("Smith", "Alice", "110105197701015432", "+86 139 0000 1111", "1977-01-01"),
    ]
    secrets_: list[str] = []
    doctor = source.session(source.token("dr-li", "doctor"))
    for family, given, resident_id, phone, birth in people:
        created = post(
            doctor,
            f"{source.fhir}/Patient",
            {
                "resourceType": "Patient",
                "identifier": [
                    {"system": RESIDENT_ID_SYSTEM, "value": resident_id},
                    {"system": "urn:oid:2.16.156.10011.1.11", "value": f"MRN-{resident_id[-6:]}"},
                ],
                "name": [{"family": family, "given": [given], "text": f"{family}{given}"}],
                "telecom": [{"system": "phone", "value": phone}],
                "birthDate": birth,
            },
        )
        assert created.status_code == 201, created.text
        patient_id = created.json()["id"]
        secrets_ += [
            family,
            given,
            f"{family}{given}",
            resident_id,
            f"MRN-{resident_id[-6:]}",
            phone,
            phone.replace(" ", ""),
            birth,
            birth.replace("-", ""),
            patient_id,
        ]
        # the patient grants, narrows and revokes in the portal
        browser = enroll(source, patient_id, username=f"u{uuid.uuid4().hex[:8]}")
        page = browser.get(f"{source.base}/portal/consents")
        answer = browser.post(
            f"{source.base}/portal/consents",
            data={
                "csrf_token": csrf_of(page),
                "grantee": ["hosp-b"],
                "category": ["laboratory", "imaging"],
                "purpose": ["TREAT"],
                "start": "2026-01-01",
            },
        )
        (consent_id,) = re.findall(r'id="consent-([A-Za-z0-9.\-]+)"', answer.text)
        edit = browser.get(f"{source.base}/portal/consents/{consent_id}")
        browser.post(
            f"{source.base}/portal/consents/{consent_id}",
            data={
                "csrf_token": csrf_of(edit),
                "version": "1",
                "grantee": ["hosp-b"],
                "category": ["laboratory"],
                "purpose": ["TREAT"],
                "start": "2026-01-01",
                "end": "2026-12-31",
            },
        )
        # staff record a paper consent, with a named witness
        witness = f"见证人{given}"
        secrets_.append(witness)
        paper = consent_resource(patient_id, ["*"], ["imaging"], ["TREAT", "ETREAT"], None, None)
        paper["extension"] = [
            {
                "url": "http://hl7.org/fhir/StructureDefinition/consent-Witness",
                "valueReference": {"display": witness},
            }
        ]
        assert post(doctor, f"{source.fhir}/Consent", paper).status_code == 201
        # accesses, one of them break-glass with a reason naming the patient
        secrets_.append(f"{family}{given}昏迷，送急诊抢救中")
        pseudonym_ = pseudonym(
            read_secret(load_config(source.directory).consortium_key),
            RESIDENT_ID_SYSTEM,
            resident_id,
        )
        assert ask(group, pseudonym_, ["laboratory"])["decision"] == "permit"
        ask(group, pseudonym_, ["laboratory"], "ETREAT", f"{family}{given}昏迷，送急诊抢救中")
        page = browser.get(f"{source.base}/portal/consents")
        browser.post(
            f"{source.base}/portal/consents/{consent_id}/revoke",
            data={"csrf_token": csrf_of(page), "version": "2"},
        )
    group.wait_converged(30)
    for name in group.members:
        export = tmp_path / f"{name}.jsonl"
        result = CliRunner().invoke(
            main, ["ledger", "export", "--db", group.database_url(name), "--out", str(export)]
        )
        assert result.exit_code == 0, result.output
        text = export.read_text(encoding="utf-8")
        assert '"consent.granted"' in text and '"emergency.access"' in text
        strings = "\n".join(
            value for line in text.splitlines() for value in _strings(json.loads(line))
        )  # every string, unescaped, keys included
        for secret in secrets_:
            assert secret not in text and secret not in strings, f"{secret!r} on {name}'s ledger"


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
