"""Referral across three real members: B fetches a patient's prior results from A and C, each
with its source, a Provenance and a recognition verdict; unreachable and denying members give
OperationOutcome entries; what was released is on the sources' ledgers."""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from consent.model import consent_resource
from consent.pseudonym import RESIDENT_ID_SYSTEM
from exchange.referral import RECOGNITION_URL, resource_hash
from ledger.store import ChainStore
from node.demo.harness import Consortium
from tests.helpers.nodes import Node, member_node, post

pytestmark = pytest.mark.slow

ZONE = timezone(timedelta(hours=8))
LOINC = "http://loinc.org"
LAB = {
    "coding": [
        {
            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
            "code": "laboratory",
        }
    ]
}
ACCREDITED = [
    {"category": "laboratory", "scope": "省HR", "until": "2099-12-31"},
    {"category": "imaging", "scope": "省HR", "until": "2099-12-31"},
]
MEMBERS_INFO = {
    "hosp-a": {"level": "三级甲等", "accreditation": ACCREDITED},
    "hosp-b": {"level": "三级乙等", "accreditation": ACCREDITED},
    "hosp-c": {
        "level": "二级甲等",
        "accreditation": [
            {"category": "laboratory", "scope": "市HR", "until": "2099-12-31"},
            {"category": "imaging", "scope": "市HR", "until": "2020-01-01"},
        ],
    },
}


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Consortium]:
    consortium = Consortium(
        tmp_path_factory.mktemp("referral"),
        3,
        epoch_seconds=2,
        replicate_interval=0.2,
        members_info=MEMBERS_INFO,
        environment={
            "HRX_EXCHANGE_TIMEOUT_MS": "3000",
            "HRX_CONSENT_STALENESS_SECONDS": "3",
            "HRX_CONSENT_SYNC_TIMEOUT_MS": "500",
        },
    )
    try:
        consortium.start_all()
        yield consortium
    finally:
        consortium.close()


def days_ago(days: int) -> str:
    return (datetime.now(ZONE) - timedelta(days=days)).isoformat(timespec="seconds")


def register(at: Node, resident_id: str) -> str:
    created = post(
        at.session(),
        f"{at.fhir}/Patient",
        {
            "resourceType": "Patient",
            "identifier": [{"system": RESIDENT_ID_SYSTEM, "value": resident_id}],
            "name": [{"family": "赵", "given": ["六"]}],
        },
    )
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def lab(patient_id: str, code: str, days: int, value: str = "13.5") -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [LAB],
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": days_ago(days),
        "valueQuantity": {"value": float(value), "unit": "g/dL"},
    }


def ct(patient_id: str, site: str, days: int) -> dict[str, Any]:
    return {
        "resourceType": "ImagingStudy",
        "status": "available",
        "subject": {"reference": f"Patient/{patient_id}"},
        "started": days_ago(days),
        "series": [
            {
                "uid": f"1.2.826.0.1.{uuid.uuid4().int % 10**12}",
                "modality": {
                    "system": "http://dicom.nema.org/resources/ontology/DCM",
                    "code": "CT",
                },
                "bodySite": {"system": "http://snomed.info/sct", "code": site},
            }
        ],
    }


def store_all(at: Node, resources: list[dict[str, Any]]) -> list[str]:
    ids = []
    for resource in resources:
        created = post(at.session(), f"{at.fhir}/{resource['resourceType']}", resource)
        assert created.status_code == 201, created.text
        ids.append(str(created.json()["id"]))
    return ids


def problems(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    """The Bundle's outcome entries that report a member's failure or refusal (not the note
    on how the members asked were found)."""
    return [
        e
        for e in bundle["entry"]
        if e["search"]["mode"] == "outcome"
        and e["resource"]["issue"][0]["severity"] != "information"
    ]


def verdict_of(resource: dict[str, Any]) -> dict[str, Any]:
    (extension,) = [e for e in resource["extension"] if e["url"] == RECOGNITION_URL]
    parts = extension["extension"]
    return {
        "recognised": next(p["valueBoolean"] for p in parts if p["url"] == "recognised"),
        "mark": next((p["valueCode"] for p in parts if p["url"] == "mark"), None),
        "failed": {
            next(x["valueCode"] for x in p["extension"] if x["url"] == "code")
            for p in parts
            if p["url"] == "reason"
            and not next(x["valueBoolean"] for x in p["extension"] if x["url"] == "met")
        },
    }


@pytest.fixture(scope="module")
def patient(group: Consortium) -> dict[str, Any]:
    """One patient known at A, B and C, with results at A and C and consent recorded at A."""
    resident_id = "3301" + str(uuid.uuid4().int)[:14]
    a, b, c = (member_node(group, n) for n in ("hosp-a", "hosp-b", "hosp-c"))
    at_a, at_b, at_c = (register(n, resident_id) for n in (a, b, c))
    results_a = store_all(
        a,
        [
            lab(at_a, "718-7", 2),  # haemoglobin, 7-day window: recognised
            lab(at_a, "2823-3", 5),  # potassium, 3-day window: expired
            lab(at_a, "12345-6", 1),  # not on the list
            ct(at_a, "51185008", 5),  # CT chest, 30 days: recognised
        ],
    )
    results_c = store_all(
        c,
        [
            lab(at_c, "718-7", 1),  # from a lower level: lab refused
            ct(at_c, "69536005", 3),  # CT head, imaging accreditation lapsed
        ],
    )
    token = a.token(f"pt-{at_a[:8]}", "patient", patient=at_a)
    granted = post(
        a.session(token),
        f"{a.fhir}/Consent",
        consent_resource(at_a, ["hosp-b"], ["laboratory", "imaging"], ["TREAT"], None, None),
    )
    assert granted.status_code == 201, granted.text
    group.wait_converged(20)  # C holds A's chain, and with it the consent
    return {"b": at_b, "results_a": results_a, "results_c": results_c}


def test_b_fetches_prior_results_from_a_and_c(group: Consortium, patient: dict[str, Any]) -> None:
    b = member_node(group, "hosp-b")
    doctor = b.session(b.token("dr-qian", "doctor"))
    answer = doctor.get(f"{b.fhir}/Patient/{patient['b']}/$prior-results")
    assert answer.status_code == 200, answer.text
    bundle = answer.json()
    assert bundle["type"] == "searchset"
    matches = [e for e in bundle["entry"] if e["search"]["mode"] == "match"]
    outcomes = problems(bundle)
    provenances = [e["resource"] for e in bundle["entry"] if e["search"]["mode"] == "include"]
    assert outcomes == [], outcomes
    # no record locator in this roster: every member was asked, and the Bundle says so
    assert [o["resource"]["issue"][0] for o in bundle["entry"][-1:]] == [
        {
            "severity": "information",
            "code": "informational",
            "diagnostics": "no record locator in the roster: every member was asked",
        }
    ]
    assert bundle["total"] == len(matches) == 6
    by_source: dict[str, dict[str, Any]] = {}
    for entry in matches:
        resource = entry["resource"]
        source = resource["meta"]["source"]
        assert entry["fullUrl"] == source
        member = next(m for m in ("hosp-a", "hosp-c") if group.members[m].url in source)
        by_source[f"{member}/{resource['id']}"] = verdict_of(resource)
    ra, rc = patient["results_a"], patient["results_c"]
    assert by_source[f"hosp-a/{ra[0]}"] == {"recognised": True, "mark": "HR", "failed": set()}
    assert by_source[f"hosp-a/{ra[1]}"]["failed"] == {"expired"}
    assert by_source[f"hosp-a/{ra[2]}"]["failed"] == {"not-on-list"}
    assert by_source[f"hosp-a/{ra[3]}"] == {"recognised": True, "mark": "HR", "failed": set()}
    assert by_source[f"hosp-c/{rc[0]}"]["failed"] == {"level-refused"}
    assert by_source[f"hosp-c/{rc[1]}"]["failed"] == {"not-accredited"}
    # every result has a Provenance naming its source and the ledger entry that released it
    assert len(provenances) == 6
    for provenance in provenances:
        chain, seq = provenance["policy"][0].rsplit(":", 2)[1:]
        member = provenance["agent"][0]["who"]["identifier"]["value"]
        assert chain == member
        entry = ChainStore(group.database_url(member)).entry(chain, int(seq))
        assert entry["type"] == "access.decided" and entry["body"]["requester_org"] == "hosp-b"
        digest = provenance["entity"][0]["what"]["identifier"]["value"].removeprefix("urn:sha256:")
        assert digest in entry["body"]["released"]
    # the decimals and every element came through as stored at the source
    a = member_node(group, "hosp-a")
    stored = a.session().get(f"{a.fhir}/Observation/{ra[0]}").json()
    shown = next(e["resource"] for e in matches if e["resource"]["id"] == ra[0])
    assert shown["valueQuantity"] == stored["valueQuantity"]
    (released_by,) = [p for p in provenances if ra[0] in p["target"][0]["reference"]]
    seq = int(released_by["policy"][0].rsplit(":", 1)[1])
    decided = ChainStore(group.database_url("hosp-a")).entry("hosp-a", seq)
    assert resource_hash(stored) in decided["body"]["released"]  # the hash of the stored bytes
    # the request is on B's chain, under the same pseudonym the sources decided for
    chain_b = ChainStore(group.database_url("hosp-b"))
    requests_ = chain_b.entries_about(decided["body"]["patient"], ["access.requested"])
    assert requests_ and requests_[0]["chain"] == "hosp-b"
    assert requests_[0]["body"]["requester"]["org"] == "hosp-b"
    assert requests_[0]["body"]["categories"] == ["laboratory", "imaging"]
    assert "dr-qian" not in str(requests_[0])  # the doctor appears as a pseudonym
    # B's AuditEvent of the request names each received result by its source and hash
    auditor = b.session(b.token("aud-b", "auditor"))
    events = auditor.get(
        f"{b.fhir}/AuditEvent", params={"patient": patient["b"], "_count": "50"}
    ).json()
    received = {
        e["what"]["identifier"]["value"]
        for event in events.get("entry", [])
        for e in event["resource"].get("entity", [])
        if e.get("what", {}).get("identifier", {}).get("value", "").startswith("urn:sha256:")
    }
    assert {p["entity"][0]["what"]["identifier"]["value"] for p in provenances} <= received
    filtered = doctor.get(
        f"{b.fhir}/Patient/{patient['b']}/$prior-results", params={"category": "imaging"}
    ).json()
    assert {
        e["resource"]["resourceType"] for e in filtered["entry"] if e["search"]["mode"] == "match"
    } == {"ImagingStudy"}
    coded = doctor.get(
        f"{b.fhir}/Patient/{patient['b']}/$prior-results", params={"code": f"{LOINC}|718-7"}
    ).json()
    assert len([e for e in coded["entry"] if e["search"]["mode"] == "match"]) == 2


def test_unreachable_and_denying_members_are_outcomes(
    group: Consortium, patient: dict[str, Any]
) -> None:
    b = member_node(group, "hosp-b")
    doctor = b.session(b.token("dr-qian", "doctor"))
    group.cut("hosp-c")
    try:
        bundle = doctor.get(f"{b.fhir}/Patient/{patient['b']}/$prior-results").json()
    finally:
        group.heal("hosp-c")
    outcomes = [e["resource"] for e in problems(bundle)]
    assert len(outcomes) == 1 and outcomes[0]["issue"][0]["diagnostics"].startswith("hosp-c")
    assert outcomes[0]["issue"][0]["code"] in ("transient", "timeout")
    assert bundle["total"] == 4  # A's results only
    # a patient who consented to nothing: A denies, with its reasons
    resident_id = "3301" + str(uuid.uuid4().int)[:14]
    a = member_node(group, "hosp-a")
    at_a = register(a, resident_id)
    store_all(a, [lab(at_a, "718-7", 1)])
    at_b = register(b, resident_id)
    bundle = doctor.get(f"{b.fhir}/Patient/{at_b}/$prior-results").json()
    outcomes = [e["resource"] for e in problems(bundle)]
    assert [o["issue"][0]["code"] for o in outcomes] == ["forbidden"]
    assert "no consent" in outcomes[0]["issue"][0]["diagnostics"]
    assert bundle["total"] == 0
    # which member, what happened and each reason, for a page to show in its own words
    issue = outcomes[0]["issue"][0]
    assert {(c["system"], c["code"]) for c in issue["details"]["coding"]} == {
        ("urn:hrx:member", "hosp-a"),
        ("urn:hrx:prior-results-outcome", "denied"),
    }
    assert [e["valueString"] for e in issue["extension"]] == [
        "no consent of this patient is recorded"
    ]


def test_requests_are_checked(group: Consortium, patient: dict[str, Any]) -> None:
    b = member_node(group, "hosp-b")
    doctor = b.session(b.token("dr-qian", "doctor"))
    url = f"{b.fhir}/Patient/{patient['b']}/$prior-results"
    for params, status in [
        ({"purpose": "ETREAT"}, 400),
        ({"purpose": "ETREAT", "reason": "急诊", "reason-code": "unconscious"}, 400),
        ({"purpose": "ETREAT", "reason": "车祸昏迷，无家属陪同，需查既往检查"}, 400),
        ({"purpose": "TREAT", "reason": "车祸昏迷，无家属陪同，需查既往检查"}, 400),
        (
            {
                "purpose": "ETREAT",
                "reason": "车祸昏迷，无家属陪同，需查既往检查",
                "reason-code": "unconscious",
            },
            200,
        ),
        ({"category": "genetics"}, 400),
        ({"purpose": "HMARKT"}, 400),
        ({"sort": "x"}, 400),
    ]:
        answer = doctor.get(url, params=params)
        assert answer.status_code == status, (params, answer.text)
        assert answer.json()["resourceType"] == ("Bundle" if status == 200 else "OperationOutcome")
    auditor = b.session(b.token("aud", "auditor"))
    assert auditor.get(url).status_code == 403


def outcome_of(bundle: dict[str, Any], member: str) -> str | None:
    for entry in bundle["entry"]:
        if entry in problems(bundle):
            diagnostics = entry["resource"]["issue"][0]["diagnostics"]
            if diagnostics.startswith(member):
                return str(diagnostics)
    return None


def test_a_source_syncs_the_consent_chain_and_respects_the_staleness_bound(
    group: Consortium,
) -> None:
    """The consent lives at C; A holds the results. A's replication worker is paused, so A
    learns of C's revocation only by syncing C's chain when it decides; once C is cut off
    and A's copy is older than the bound (3 s here), A denies."""
    resident_id = "3301" + str(uuid.uuid4().int)[:14]
    a, b, c = (member_node(group, n) for n in ("hosp-a", "hosp-b", "hosp-c"))
    at_a, at_b, at_c = (register(n, resident_id) for n in (a, b, c))
    store_all(a, [lab(at_a, "718-7", 1)])
    token = c.token(f"pt-{at_c[:8]}", "patient", patient=at_c)
    granted = post(
        c.session(token),
        f"{c.fhir}/Consent",
        consent_resource(at_c, ["hosp-b"], ["laboratory"], ["TREAT"], None, None),
    )
    assert granted.status_code == 201, granted.text
    group.wait_converged(20)
    doctor = b.session(b.token("dr-sun", "doctor"))
    url = f"{b.fhir}/Patient/{at_b}/$prior-results"
    params = {"category": "laboratory"}
    worker = group.members["hosp-a"].replicator
    assert worker is not None
    worker.send_signal(signal.SIGSTOP)
    try:
        bundle = doctor.get(url, params=params).json()
        assert bundle["total"] == 1, outcome_of(bundle, "hosp-a")  # permitted by C's consent
        revoked = {**granted.json(), "status": "inactive"}
        answer = c.session(token).put(
            f"{c.fhir}/Consent/{revoked['id']}",
            json=revoked,
            headers={"Content-Type": "application/fhir+json"},
        )
        assert answer.status_code == 200
        bundle = doctor.get(url, params=params).json()  # A syncs C's chain before deciding
        assert bundle["total"] == 0
        assert "revoked" in (outcome_of(bundle, "hosp-a") or ""), bundle
        group.cut("hosp-c")
        try:
            bundle = doctor.get(url, params=params).json()  # A's copy is fresh: it decides
            assert "revoked" in (outcome_of(bundle, "hosp-a") or ""), bundle
            time.sleep(3.5)
            bundle = doctor.get(url, params=params).json()  # now too old: A denies
            assert "staleness bound" in (outcome_of(bundle, "hosp-a") or ""), bundle
        finally:
            group.heal("hosp-c")
    finally:
        worker.send_signal(signal.SIGCONT)


def order(patient_id: str, code: dict[str, Any], site: str | None = None) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "code": {"coding": [code]},
        "subject": {"reference": f"Patient/{patient_id}"},
    }
    if site:
        resource["bodySite"] = [{"coding": [{"system": "http://snomed.info/sct", "code": site}]}]
    return resource


def parameter(parameters: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [p for p in parameters["parameter"] if p["name"] == name]


def test_recognised_exams_are_accepted_one_is_reordered_and_savings_counted(
    group: Consortium, tmp_path: Any
) -> None:
    """End to end: consent at A; referral to B; B finds a recognised CT and blood count panel
    at A and accepts them instead of ordering; a potassium from C is not recognised (lower
    level) and B orders it again with a reason; the savings report counts it all."""
    from click.testing import CliRunner

    from node.cli import main

    resident_id = "3301" + str(uuid.uuid4().int)[:14]
    a, b, c = (member_node(group, n) for n in ("hosp-a", "hosp-b", "hosp-c"))
    at_a, at_b, at_c = (register(n, resident_id) for n in (a, b, c))
    cbc = {
        "resourceType": "DiagnosticReport",
        "status": "final",
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "LAB"}]}
        ],
        "code": {"coding": [{"system": LOINC, "code": "58410-2"}]},
        "subject": {"reference": f"Patient/{at_a}"},
        "effectiveDateTime": days_ago(2),
    }
    store_all(a, [cbc, ct(at_a, "51185008", 4)])
    store_all(c, [lab(at_c, "2823-3", 0)])
    token = a.token(f"pt-{at_a[:8]}", "patient", patient=at_a)
    granted = post(
        a.session(token),
        f"{a.fhir}/Consent",
        consent_resource(at_a, ["*"], ["laboratory", "imaging"], ["TREAT"], None, None),
    )
    assert granted.status_code == 201
    group.wait_converged(20)
    doctor = b.session(b.token("dr-zhou", "doctor"))
    dicom = {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}
    orders = {
        "ct": order(at_b, dicom, "51185008"),
        "cbc": order(at_b, {"system": LOINC, "code": "58410-2"}),
        "k": order(at_b, {"system": LOINC, "code": "2823-3"}),
    }
    referral = {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "category": [{"coding": [{"system": "http://snomed.info/sct", "code": "3457005"}]}],
        "code": {"text": "转诊"},
        "subject": {"reference": f"Patient/{at_b}"},
    }
    assert post(doctor, f"{b.fhir}/ServiceRequest", referral).status_code == 201
    told = post(doctor, f"{b.fhir}/ServiceRequest", orders["ct"], Prefer="return=OperationOutcome")
    assert told.status_code == 201
    assert told.headers["X-HRX-Recognised-Item"] == "ct-chest"
    assert told.headers["X-HRX-Recognised-Results"] == "1"
    assert "recognised prior result (HR)" in told.json()["issue"][-1]["diagnostics"]
    accepted = {}
    for name in ("ct", "cbc"):
        check = post(doctor, f"{b.fhir}/ServiceRequest/$check-recognition", orders[name])
        assert check.status_code == 200, check.text
        checked = check.json()
        assert parameter(checked, "recognised")[0]["valueBoolean"] is True, checked
        (result,) = parameter(checked, "result")
        reference = next(p["valueUri"] for p in result["part"] if p["name"] == "reference")
        assert reference.startswith(group.members["hosp-a"].url)
        created = post(doctor, f"{b.fhir}/ServiceRequest", orders[name])
        assert created.status_code == 201
        order_id = created.json()["id"]
        accept = post(
            doctor,
            f"{b.fhir}/ServiceRequest/{order_id}/$accept-recognised",
            {
                "resourceType": "Parameters",
                "parameter": [{"name": "result", "valueUri": reference}],
            },
        )
        assert accept.status_code == 200, accept.text
        accepted[name] = parameter(accept.json(), "avoidedCostFen")[0]["valueInteger"]
        closed = doctor.get(f"{b.fhir}/ServiceRequest/{order_id}").json()
        assert closed["status"] == "revoked" and "HR" in closed["note"][-1]["text"]
    assert accepted == {"ct": 30000, "cbc": 2000}
    # potassium from the lower-level C: not recognised; ordered again, fast-changing
    check = post(doctor, f"{b.fhir}/ServiceRequest/$check-recognition", orders["k"]).json()
    assert parameter(check, "recognised")[0]["valueBoolean"] is False
    ordered = post(doctor, f"{b.fhir}/ServiceRequest", orders["k"])
    assert ordered.headers["X-HRX-Recognised-Results"] == "0"
    created = ordered.json()
    refused = post(
        doctor,
        f"{b.fhir}/ServiceRequest/{created['id']}/$reorder",
        {"resourceType": "Parameters", "parameter": [{"name": "reason", "valueCode": "whim"}]},
    )
    assert refused.status_code == 400
    reorder = post(
        doctor,
        f"{b.fhir}/ServiceRequest/{created['id']}/$reorder",
        {
            "resourceType": "Parameters",
            "parameter": [{"name": "reason", "valueCode": "fast-changing"}],
        },
    )
    assert reorder.status_code == 200, reorder.text
    assert doctor.get(f"{b.fhir}/ServiceRequest/{created['id']}").json()["status"] == "active"
    # the savings, from B's ledger
    report = CliRunner().invoke(
        main, ["report", "savings", "--dir", str(group.members["hosp-b"].directory), "--json"]
    )
    assert report.exit_code == 0, report.output
    figures = json.loads(report.output)
    mine = [r for r in figures["rows"] if r["member"] == "hosp-b"]
    assert sum(r["exams_avoided"] for r in mine) == 2
    assert sum(r["fen_saved"] for r in mine) == 32000
    assert {r["item"] for r in mine} == {"ct-chest", "cbc"}
    assert {"member": "hosp-b", "reason": "fast-changing", "exams": 1} in figures["reordered"]
    text = CliRunner().invoke(
        main, ["report", "savings", "--dir", str(group.members["hosp-b"].directory)]
    )
    assert "exam(s) avoided" in text.output and "胸部CT" in text.output
    # and the auditor finds every decision of the consortium as the policy makes it
    verdict = CliRunner().invoke(main, ["audit", "verify", group.database_url("hosp-a")])
    assert verdict.exit_code == 0, verdict.output
    assert "access decision(s) replayed" in verdict.output


def test_the_clinic_pages(group: Consortium, patient: dict[str, Any]) -> None:
    """A doctor signs in at /clinic, finds the referred patient, sees the prior results with
    their HR verdicts, accepts a recognised one, orders another again with a reason, and sees
    the savings with a chart."""
    import re

    import requests

    from node.identity.users import set_password

    b = member_node(group, "hosp-b")
    b.user("dr-wu", "doctor")
    set_password(b.database.write_engine, "dr-wu", "clinic password 1")
    referral = {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "category": [{"coding": [{"system": "http://snomed.info/sct", "code": "3457005"}]}],
        "code": {"text": "转诊"},
        "subject": {"reference": f"Patient/{patient['b']}"},
    }
    assert post(b.session(), f"{b.fhir}/ServiceRequest", referral).status_code == 201
    browser = requests.Session()

    def csrf(page: Any) -> str:
        return str(re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1))  # type: ignore[union-attr]

    form = browser.get(f"{b.base}/clinic/signin")
    assert (
        browser.post(
            f"{b.base}/clinic/signin",
            data={"username": "dr-wu", "password": "x" * 9, "csrf_token": csrf(form)},
        ).status_code
        == 401
    )
    listing = browser.post(
        f"{b.base}/clinic/signin",
        data={"username": "dr-wu", "password": "clinic password 1", "csrf_token": csrf(form)},
    )
    assert listing.status_code == 200 and f'id="patient-{patient["b"]}"' in listing.text
    # following a link (GET) asks nobody: asking is a POST with the page's CSRF token
    chain = ChainStore(b.database.engine)

    def entries() -> int:
        head = chain.heads().get("hosp-b")
        return head.tree_size if head else 0

    before = entries()
    page = browser.get(f"{b.base}/clinic/patients/{patient['b']}")
    assert page.status_code == 200 and 'class="badge hr"' not in page.text
    assert entries() == before
    forged = browser.post(f"{b.base}/clinic/patients/{patient['b']}", data={})
    assert forged.status_code == 400 and entries() == before
    page = browser.post(f"{b.base}/clinic/patients/{patient['b']}", data={"csrf_token": csrf(page)})
    assert page.status_code == 200 and entries() == before + 1
    assert page.text.count('class="badge hr"') == 2  # the haemoglobin and the CT from A
    # the reasons in the page's language, hospitals by name
    assert "过期（" in page.text and "不在互认项目目录中" in page.text
    assert "expired on" not in page.text, page.text[page.text.find("expired on") - 300 :][:600]
    result = re.search(
        r'name="item" value="hgb">\s*<input type="hidden" name="result" value="([^"]+)"', page.text
    )
    assert result, page.text[:3000]
    accepted = browser.post(
        f"{b.base}/clinic/patients/{patient['b']}/accept",
        data={"csrf_token": csrf(page), "item": "hgb", "result": result.group(1)},
    )
    assert accepted.status_code == 200 and "已采用互认结果" in accepted.text
    reordered = browser.post(
        f"{b.base}/clinic/patients/{patient['b']}/reorder",
        data={"csrf_token": csrf(page), "item": "k", "reason": "condition-changed", "text": ""},
    )
    assert reordered.status_code == 200 and "已重新开具检查" in reordered.text
    no_csrf = browser.post(f"{b.base}/clinic/patients/{patient['b']}/accept", data={"item": "hgb"})
    assert no_csrf.status_code == 400
    savings_page = browser.get(f"{b.base}/clinic/savings")
    assert savings_page.status_code == 200
    assert "<svg" in savings_page.text and "血红蛋白" in savings_page.text
    assert "病情变化" in savings_page.text
    # hospitals by name, not member id (the accepting member: hosp-b is 医院 hosp-b here)
    assert (
        "<td>医院 hosp-b</td>" in savings_page.text and "<td>hosp-b</td>" not in savings_page.text
    )
    # a patient's portal session is no doctor's
    assert requests.get(f"{b.base}/clinic/", cookies={"hrx_portal": "x"}).url.endswith(
        "/clinic/signin"
    )


def test_one_request_id_follows_a_referral_across_members(
    group: Consortium, patient: dict[str, Any]
) -> None:
    """The doctor's request ID reaches every member asked, so one search finds a referral in
    every member's log."""
    b = member_node(group, "hosp-b")
    doctor = b.session(b.token("dr-qian", "doctor"))
    request_id = f"referral-{uuid.uuid4().hex[:12]}"
    answer = doctor.get(
        f"{b.fhir}/Patient/{patient['b']}/$prior-results", headers={"X-Request-ID": request_id}
    )
    assert answer.status_code == 200 and answer.headers["X-Request-ID"] == request_id
    for name in ("hosp-a", "hosp-c"):
        lines = (group.members[name].directory / "processes.log").read_text(errors="replace")
        asked = [
            json.loads(line)
            for line in lines.splitlines()
            if line.startswith("{") and request_id in line
        ]
        assert any(line.get("route") == "/peer/access" for line in asked), (name, asked)
