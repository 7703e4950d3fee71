"""A Group export from another member (``Group/[id]/$export?source=…``) between real member
processes: each patient's release decided by the source under the patient's consent and
recorded on both chains; what arrives is exactly what was recorded as released; a denied
patient is in the error file; a revoked consent stops the next export; a source refuses a
cohort request whose questions are not proven, and never releases to a forged one."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner

from consent.model import consent_resource
from consent.pseudonym import RESIDENT_ID_SYSTEM
from ledger.errors import PeerUnavailable
from ledger.store import ChainStore
from node.base.config import load_config
from node.cli import main
from node.demo.harness import Consortium
from node.flows import bulk_export, bulk_jobs, member_export
from node.flows.bulk_export import SETTLE_SECONDS, ExportRequest
from node.identity.tokens import Principal
from node.records.audit_trail import Caller
from node.services import open_services
from tests.helpers.fhir import observation
from tests.helpers.nodes import Node, asked, member_node, post
from tests.node.flows.test_access_decisions import peers_of
from tests.node.web.test_bulk_data import ASYNC, exported, manifest_of

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Consortium]:
    consortium = Consortium(tmp_path_factory.mktemp("member-export"), 3, epoch_seconds=2)
    try:
        consortium.start_all()
        yield consortium
    finally:
        consortium.close()


def resident(node: Node, resident_id: str | None) -> str:
    """A Patient at ``node`` with this resident id (none: the Patient has no identifier)."""
    patient: dict[str, Any] = {
        "resourceType": "Patient",
        "name": [{"family": "王", "given": ["芳"]}],
    }
    if resident_id is not None:
        patient["identifier"] = [{"system": RESIDENT_ID_SYSTEM, "value": resident_id}]
    created = post(node.session(), f"{node.fhir}/Patient", patient)
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def group_of(node: Node, patients: list[str]) -> str:
    """The id of a new Group at ``node`` naming these Patients."""
    group: dict[str, Any] = {"resourceType": "Group", "type": "person", "actual": True}
    if patients:
        group["member"] = [{"entity": {"reference": f"Patient/{p}"}} for p in patients]
    return str(stored(node, group)["id"])


def stored(node: Node, resource: dict[str, Any]) -> dict[str, Any]:
    created = post(node.session(), f"{node.fhir}/{resource['resourceType']}", resource)
    assert created.status_code == 201, created.text
    body: dict[str, Any] = created.json()
    return body


def sha256_of(node: Node, resource: dict[str, Any]) -> str:
    """The hash of the bytes ``node`` stores for this version (what the ledger names)."""
    from fhir_adapters.store import ResourceStore

    store = ResourceStore(node.database.engine, node.fhir)
    return store.read(resource["resourceType"], resource["id"]).sha256()


def consented(
    node: Node, patient_id: str, purposes: tuple[str, ...] = ("TREAT",)
) -> tuple[requests.Session, dict[str, Any]]:
    """The patient's own session at ``node`` and the consent they recorded there: laboratory
    results, to hosp-b, for ``purposes``."""
    session = node.session(node.token(f"pt-{patient_id[:8]}", "patient", patient=patient_id))
    consent = consent_resource(patient_id, ["hosp-b"], ["laboratory"], purposes, None, None)
    created = post(session, f"{node.fhir}/Consent", consent)
    assert created.status_code == 201, created.text
    return session, created.json()


def exporter(node: Node) -> requests.Session:
    session = requests.Session()
    token = node.token("platform-admin", "admin", scope="system/*.rs")
    session.headers["Authorization"] = f"Bearer {token}"
    return session


def export(session: requests.Session, asker: Node, group_id: str, **params: str) -> dict[str, Any]:
    answer = session.get(
        f"{asker.fhir}/Group/{group_id}/$export", params=params, headers=ASYNC, timeout=30
    )
    assert answer.status_code == 202, answer.text
    return manifest_of(session, answer.headers["Content-Location"])


def errors_of(session: requests.Session, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    outcomes = []
    for item in manifest["error"]:
        assert item["type"] == "OperationOutcome"
        answer = session.get(item["url"], timeout=30)
        assert answer.status_code == 200
        outcomes += [json.loads(line) for line in answer.text.splitlines()]
    return outcomes


def tree_size(node: Node, chain: str) -> int:
    head = ChainStore(node.database.engine).heads().get(chain)
    return 0 if head is None else head.tree_size


def entries(node: Node, chain: str, entry_type: str, after: int) -> list[dict[str, Any]]:
    store = ChainStore(node.database.engine)
    size = store.heads()[chain].tree_size
    return [
        e
        for e in (store.entry(chain, seq) for seq in range(after, size))
        if e["type"] == entry_type
    ]


def test_a_cohort_is_released_as_each_patient_consented(group: Consortium) -> None:
    source, asker = member_node(group, "hosp-a"), member_node(group, "hosp-b")
    ids = {name: "3301" + str(uuid.uuid4().int)[:14] for name in ("granted", "silent", "elsewhere")}
    granted, silent = resident(source, ids["granted"]), resident(source, ids["silent"])
    released = [
        stored(source, observation(granted, value="13.50", note=[{"text": "复查：血红蛋白偏低"}])),
        stored(source, observation(granted, code="2345-7", value="5.600")),
    ]
    vital = observation(granted, code="8867-4")
    vital["category"][0]["coding"][0]["code"] = "vital-signs"
    stored(source, vital)  # a category the consent does not name: never released
    stored(source, observation(silent))
    patient_session, consent = consented(source, granted)
    cohort = {name: resident(asker, resident_id) for name, resident_id in ids.items()}
    cohort["unmatched"] = resident(asker, None)
    group_id = group_of(asker, list(cohort.values()))
    session = exporter(asker)
    a_before, b_before = tree_size(source, "hosp-a"), tree_size(asker, "hosp-b")

    manifest = export(session, asker, group_id, source="hosp-a", category="laboratory")
    received = exported(session, manifest)
    assert sorted(r["id"] for r in received) == sorted(r["id"] for r in released)
    by_id = {r["id"]: r for r in received}
    assert by_id[released[0]["id"]]["note"][0]["text"] == "复查：血红蛋白偏低"
    assert str(by_id[released[1]["id"]]["valueQuantity"]["value"]) == "5.600"  # digit for digit
    problems = errors_of(session, manifest)
    said = {o["issue"][0]["expression"][0]: o["issue"][0]["diagnostics"] for o in problems}
    assert set(said) == {f"Patient/{cohort['silent']}", f"Patient/{cohort['unmatched']}"}
    assert "hosp-a denied it" in said[f"Patient/{cohort['silent']}"]
    assert "no consent of this patient is recorded" in said[f"Patient/{cohort['silent']}"]
    assert "was not asked for" in said[f"Patient/{cohort['unmatched']}"]

    # the questions on the asker's chain, one a matched patient; the decisions on the source's
    questions = entries(asker, "hosp-b", "access.requested", b_before)
    assert len(questions) == 3 and {q["body"]["purpose"] for q in questions} == {"TREAT"}
    decisions = entries(source, "hosp-a", "access.decided", a_before)
    assert sorted(d["body"]["decision"] for d in decisions) == ["deny", "permit"]
    (permit,) = [d for d in decisions if d["body"]["decision"] == "permit"]
    assert permit["body"]["requester_org"] == "hosp-b"
    assert permit["body"]["released"] == sorted(sha256_of(source, r) for r in released)
    assert {d["body"]["request_id"] for d in decisions} < {
        q["body"]["request_id"] for q in questions
    }
    text = str(decisions) + str(questions)
    assert ids["granted"] not in text and "王" not in text  # pseudonyms only

    # the consent revoked: the next export releases nothing of that patient
    revoked = {**consent, "status": "inactive"}
    answer = patient_session.put(
        f"{source.fhir}/Consent/{consent['id']}",
        json=revoked,
        headers={"Content-Type": "application/fhir+json"},
    )
    assert answer.status_code == 200, answer.text
    again = export(session, asker, group_id, source="hosp-a", category="laboratory")
    assert again["output"] == []
    said = {
        o["issue"][0]["expression"][0]: o["issue"][0]["diagnostics"]
        for o in errors_of(session, again)
    }
    assert "revoked" in said[f"Patient/{cohort['granted']}"]

    # the auditor replays every decision of both exports over its own view and agrees
    for member in (source, asker):
        verdict = CliRunner().invoke(
            main, ["audit", "verify", load_config(member.directory).database_url]
        )
        assert verdict.exit_code == 0, verdict.output


def test_research_and_public_health_are_released_only_where_the_consent_names_them(
    group: Consortium,
) -> None:
    source, asker = member_node(group, "hosp-a"), member_node(group, "hosp-b")
    purposes = {"care": ("TREAT",), "research": ("HRESCH", "TREAT"), "platform": ("PUBHLTH",)}
    ids = {name: "3302" + str(uuid.uuid4().int)[:14] for name in purposes}
    at_source = {name: resident(source, ids[name]) for name in purposes}
    results = {name: stored(source, observation(at_source[name])) for name in purposes}
    for name, granted in purposes.items():
        consented(source, at_source[name], granted)
    cohort = {name: resident(asker, ids[name]) for name in purposes}
    group_id = group_of(asker, list(cohort.values()))
    study = stored(asker, {"resourceType": "ResearchStudy", "status": "approved", "title": "慢病"})
    session = exporter(asker)
    b_before = tree_size(asker, "hosp-b")

    for purpose, study_asked, released in [
        ("HRESCH", f"ResearchStudy/{study['id']}", "research"),
        ("PUBHLTH", None, "platform"),
    ]:
        params = {"source": "hosp-a", "category": "laboratory", "purpose": purpose}
        if study_asked:
            params["study"] = study_asked
        manifest = export(session, asker, group_id, **params)
        assert [r["id"] for r in exported(session, manifest)] == [results[released]["id"]], (
            errors_of(session, manifest)
        )
        said = {
            o["issue"][0]["expression"][0]: o["issue"][0]["diagnostics"]
            for o in errors_of(session, manifest)
        }
        assert set(said) == {f"Patient/{cohort[n]}" for n in purposes if n != released}
        assert all(f"does not cover purpose {purpose}" in words for words in said.values())

    # each question says its purpose; a research question names the study's version
    questions = entries(asker, "hosp-b", "access.requested", b_before)
    assert [q["body"]["purpose"] for q in questions] == ["HRESCH"] * 3 + ["PUBHLTH"] * 3
    assert {q["body"]["referral"] for q in questions[:3]} == {sha256_of(asker, study)}
    assert {q["body"]["referral"] for q in questions[3:]} == {None}
    # the asker's audit trail names the study each research question was asked for
    auditor = asker.session(asker.token("export-auditor", "auditor"))
    wanted = f"HRESCH for ResearchStudy/{study['id']}"
    deadline = time.monotonic() + 10
    while True:  # AuditEvents are written in batches, a moment later
        found = auditor.get(f"{asker.fhir}/AuditEvent", params={"patient": cohort["research"]})
        said = [e["resource"].get("outcomeDesc", "") for e in found.json().get("entry", [])]
        if any(wanted in text for text in said) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert any(wanted in text and "permit" in text for text in said), said
    verdict = CliRunner().invoke(
        main, ["audit", "verify", load_config(source.directory).database_url]
    )
    assert verdict.exit_code == 0, verdict.output

    # a consent naming no purpose is for care only
    unnamed = consent_resource(at_source["care"], ["hosp-b"], ["laboratory"], [], None, None)
    del unnamed["provision"]["purpose"]
    patient = source.session(source.token("pt-care", "patient", patient=at_source["care"]))
    assert post(patient, f"{source.fhir}/Consent", unnamed).status_code == 201
    manifest = export(
        session, asker, group_id, source="hosp-a", category="laboratory", purpose="PUBHLTH"
    )
    assert [r["id"] for r in exported(session, manifest)] == [results["platform"]["id"]]

    # a referral is care: research and public health are not asked for one patient
    doctor = asker.session(asker.token("dr-qian", "doctor"))
    for purpose in ("HRESCH", "PUBHLTH"):
        answer = doctor.get(
            f"{asker.fhir}/Patient/{cohort['research']}/$prior-results", params={"purpose": purpose}
        )
        assert answer.status_code == 400 and "for care" in answer.text, answer.text


def test_a_research_export_names_an_approved_study(group: Consortium) -> None:
    asker = member_node(group, "hosp-b")
    session = exporter(asker)
    group_id = group_of(asker, [])
    withdrawn = stored(asker, {"resourceType": "ResearchStudy", "status": "withdrawn"})
    approved = stored(asker, {"resourceType": "ResearchStudy", "status": "active"})
    url = f"{asker.fhir}/Group/{group_id}/$export"
    base = {"source": "hosp-a", "purpose": "HRESCH"}
    for params, words in [
        (base, "names the approved study"),
        ({**base, "study": "Group/x"}, "names the approved study"),
        ({**base, "study": "ResearchStudy/nowhere"}, "is not held here"),
        ({**base, "study": f"ResearchStudy/{withdrawn['id']}"}, "status 'withdrawn'"),
        ({"source": "hosp-a", "study": f"ResearchStudy/{approved['id']}"}, "only an export for"),
        ({**base, "purpose": "HMARKT"}, "an export from members is for"),
    ]:
        answer = session.get(url, params=params, headers=ASYNC, timeout=30)
        assert answer.status_code == 400 and words in answer.text, (params, answer.text)
    answer = session.get(
        url, params={**base, "study": f"ResearchStudy/{approved['id']}"}, headers=ASYNC, timeout=30
    )
    assert answer.status_code == 202, answer.text
    manifest_of(session, answer.headers["Content-Location"])


def test_only_what_members_release_may_be_asked(group: Consortium) -> None:
    asker = member_node(group, "hosp-b")
    session = exporter(asker)
    group_id = group_of(asker, [])
    url = f"{asker.fhir}/Group/{group_id}/$export"
    for params, words in [
        ({"source": "hosp-z"}, "not another member"),
        ({"source": "hosp-b"}, "not another member"),
        ({"source": "hosp-a", "purpose": "ETREAT"}, "one patient at a time"),
        ({"source": "hosp-a", "category": "social-history"}, "members release"),
        ({"source": "hosp-a", "_type": "Condition"}, "members release"),
        ({"source": "hosp-a", "_typeFilter": "Observation?code=718-7"}, "_typeFilter"),
    ]:
        answer = session.get(url, params=params, headers=ASYNC, timeout=30)
        assert answer.status_code == 400 and words in answer.text, (params, answer.text)
    system = session.get(f"{asker.fhir}/$export", params={"source": "hosp-a"}, headers=ASYNC)
    assert system.status_code == 400 and "Group" in system.text
    auditor = requests.Session()
    auditor.headers["Authorization"] = "Bearer " + asker.token(
        "auditor-1", "auditor", scope="system/*.rs"
    )
    refused = auditor.get(url, params={"source": "hosp-a"}, headers=ASYNC, timeout=30)
    assert refused.status_code == 403, refused.text


def test_a_source_answers_a_cohort_only_with_every_question_proven(group: Consortium) -> None:
    source, b = member_node(group, "hosp-a"), group.members["hosp-b"].directory
    patient_id = resident(source, "3301" + str(uuid.uuid4().int)[:14])
    stored(source, observation(patient_id))
    consented(source, patient_id)
    from node.records.pseudonym_index import pseudonym_of_patient

    pseudonym = pseudonym_of_patient(source.database.engine, patient_id)
    assert pseudonym is not None
    other = ("8" if pseudonym[0] == "9" else "9") + pseudonym[1:]
    proven = asked(
        b,
        {
            "request_id": str(uuid.uuid4()),
            "patient": other,
            "purpose": "TREAT",
            "categories": ["laboratory"],
        },
    )
    peers = peers_of(group, "hosp-b")
    before = tree_size(source, "hosp-a")
    unsigned = requests.post(f"{source.base}/peer/export", json={})
    assert unsigned.status_code == 401
    forged = {
        "purpose": "TREAT",
        "categories": ["laboratory"],
        "requests": [
            {"request_id": proven["request_id"], "patient": other, "asked": proven["asked"]},
            # a proof of another question does not open this patient
            {"request_id": str(uuid.uuid4()), "patient": pseudonym, "asked": proven["asked"]},
        ],
    }
    with pytest.raises(PeerUnavailable, match=r"403.*another request or another patient"):
        list(peers.lines("hosp-a", "/peer/export", forged, 30, 1 << 20))
    assert tree_size(source, "hosp-a") == before  # nothing decided, nothing released
    # nor does a witness say which chains hold the consents of a patient not proven asked
    with pytest.raises(PeerUnavailable, match=r"403.*another request or another patient"):
        peers.post("hosp-a", "/peer/consent-chains/cohort", {**forged, "requester": "hosp-b"})

    good = asked(
        b,
        {
            "request_id": str(uuid.uuid4()),
            "patient": pseudonym,
            "purpose": "TREAT",
            "categories": ["laboratory"],
        },
    )
    body = {
        "purpose": "TREAT",
        "categories": ["laboratory"],
        "requests": [{k: good[k] for k in ("request_id", "patient", "asked")}],
    }
    head, *lines = list(peers.lines("hosp-a", "/peer/export", body, 30, 1 << 20))
    (decision,) = json.loads(head)["decisions"]
    assert decision["decision"] == "permit" and len(lines) == 1
    assert decision["released"] == [hashlib.sha256(lines[0]).hexdigest()]
    for bad, words in [
        ({**body, "purpose": "ETREAT"}, "one patient at a time"),
        ({**body, "requests": []}, "1-200"),
        ({**body, "requests": body["requests"] * 2}, "one request_id"),
        ({**body, "types": ["Patient"]}, "types must be"),
        ({**body, "extra": 1}, "no field"),
    ]:
        with pytest.raises(PeerUnavailable, match=words):
            list(peers.lines("hosp-a", "/peer/export", bad, 30, 1 << 20))


def test_an_unreachable_source_is_an_error_of_the_manifest_not_a_failed_job(
    group: Consortium,
) -> None:
    asker = member_node(group, "hosp-b")
    patient_id = resident(asker, "3301" + str(uuid.uuid4().int)[:14])
    group_id = group_of(asker, [patient_id])
    session = exporter(asker)
    asked_before = export(session, asker, group_id, source="hosp-a")
    assert asked_before["output"] == asked_before["error"] == []  # hosp-a holds nobody
    before = tree_size(asker, "hosp-b")
    group.cut("hosp-a")
    try:
        manifest = export(session, asker, group_id, source="hosp-a")
    finally:
        group.heal("hosp-a")
    assert manifest["output"] == []
    (problem,) = errors_of(session, manifest)
    assert problem["issue"][0]["code"] == "transient"
    assert problem["issue"][0]["diagnostics"].startswith("hosp-a")
    # the question was recorded before the source was asked, and stays
    (question,) = entries(asker, "hosp-b", "access.requested", before)
    assert question["body"]["purpose"] == "TREAT"


def test_since_brings_everything_of_a_patient_who_consented_since(group: Consortium) -> None:
    source, asker = member_node(group, "hosp-a"), member_node(group, "hosp-b")
    resident_id = "3301" + str(uuid.uuid4().int)[:14]
    patient_id = resident(source, resident_id)
    old_result = stored(source, observation(patient_id, value="6.10"))
    group_id = group_of(asker, [resident(asker, resident_id)])
    session = exporter(asker)
    time.sleep(SETTLE_SECONDS + 0.1)  # the result is older than the next transactionTime
    before_consent = export(session, asker, group_id, source="hosp-a", category="laboratory")
    assert before_consent["output"] == [] and len(before_consent["error"]) == 1  # denied
    since = before_consent["transactionTime"]
    consented(source, patient_id)
    time.sleep(SETTLE_SECONDS + 0.1)  # the consent is older than the next transactionTime
    again = export(session, asker, group_id, source="hosp-a", category="laboratory", _since=since)
    assert [r["id"] for r in exported(session, again)] == [old_result["id"]]
    later = export(
        session,
        asker,
        group_id,
        source="hosp-a",
        category="laboratory",
        _since=again["transactionTime"],
    )
    assert later["output"] == [] and later["error"] == []  # permitted, nothing changed since


KILLED_OWNER = Principal("platform-admin", "admin", (), None, "token-of-the-test")


def _export_in_this_process(directory: str, job_id: str) -> dict[str, Any]:
    """Run export job ``job_id`` of the node in ``directory`` here, to its manifest."""
    svc = open_services(load_config(Path(directory)))
    try:
        job = bulk_jobs.get_job(svc, job_id, KILLED_OWNER.username)
        request = ExportRequest.from_json(job.request)
        return bulk_export.export(svc, Caller(KILLED_OWNER), job, request)
    finally:
        svc.close()


def test_an_export_whose_process_was_killed_goes_on_from_its_last_batch(
    group: Consortium,
) -> None:
    asker = member_node(group, "hosp-b")
    ids = ["3303" + str(uuid.uuid4().int)[:14] for _ in range(3)]
    results = []
    for name in ("hosp-a", "hosp-c"):
        source = member_node(group, name)
        for resident_id in ids:
            patient_id = resident(source, resident_id)
            results.append(stored(source, observation(patient_id, value="7.25")))
            consented(source, patient_id)
    group_id = group_of(asker, [resident(asker, resident_id) for resident_id in ids])
    request = ExportRequest(
        "group",
        group_id,
        ("Observation",),
        None,
        url=f"{asker.fhir}/Group/{group_id}/$export?source=hosp-a,hosp-c",
        sources=("hosp-a", "hosp-c"),
        categories=("laboratory",),
    )
    svc = open_services(load_config(asker.directory))
    try:
        job = bulk_jobs.new_job(svc, "export", KILLED_OWNER.username, request.as_json())
        folder = bulk_export.export_folder(svc, job.id)
    finally:
        svc.close()
    checkpoint = folder / member_export.CHECKPOINT
    before = tree_size(asker, "hosp-b")

    # hosp-c answers nothing: the export finishes hosp-a's batch, asks hosp-c and waits, and
    # its process is killed there
    relay = group.members["hosp-c"].relay
    relay.delay = 600
    process = multiprocessing.get_context("spawn").Process(
        target=_export_in_this_process, args=(str(asker.directory), job.id)
    )
    try:
        process.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            questions = tree_size(asker, "hosp-b") and len(
                entries(asker, "hosp-b", "access.requested", before)
            )
            if questions == 6 and json.loads(checkpoint.read_bytes())["done"] == {"hosp-a": 1}:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the export did not get to asking hosp-c")
    finally:
        process.kill()
        process.join()
        relay.delay = 0
        relay.set_cut(True)  # the killed process's connection, held open, is closed
        relay.set_cut(False)

    manifest = _export_in_this_process(str(asker.directory), job.id)
    assert manifest["error"] == []
    lines = [
        json.loads(line)
        for item in manifest["output"]
        for line in (folder / Path(item["url"]).name).read_text().splitlines()
    ]
    assert sorted(r["id"] for r in lines) == sorted(r["id"] for r in results)  # once each
    assert sum(item["count"] for item in manifest["output"]) == 6
    # hosp-a's patients were asked once; hosp-c's twice (the batch under way when killed)
    assert len(entries(asker, "hosp-b", "access.requested", before)) == 9
    assert not checkpoint.exists()
