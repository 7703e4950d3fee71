"""Remote reading across real member processes and a real Orthanc: the township (hosp-a) asks
the county (hosp-b) to read a CT; the county's radiologist claims it in the worklist, reads the
images through DICOMweb under the consult, and sends a signed report that the township
verifies; an amendment is a new version; the turnaround comes from the ledger. And the faults:
a study not held, a reader that is no member or does not read the modality, a reader cut off
while the consult waits, a report for a cancelled consult, a PACS that is down."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from consent.pseudonym import RESIDENT_ID_SYSTEM
from exchange.reading import report_hash
from ledger.store import ChainStore
from node.demo import orthanc
from node.demo.harness import Consortium
from node.identity.users import set_password
from tests.helpers.dicom import chest_ct, hrx, read
from tests.helpers.nodes import Node, member_node
from tests.helpers.nodes import hrx as hrx_out
from tests.helpers.portal import csrf_of

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(orthanc.missing() is not None, reason=str(orthanc.missing())),
]

RESIDENT_ID = "33010619850315" + str(uuid.uuid4().int)[:3] + "X"
PASSWORD = "clinic password 1"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[orthanc.OrthancServer]:
    with orthanc.running_orthanc(tmp_path_factory.mktemp("pacs")) as server:
        yield server


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return chest_ct(tmp_path_factory.mktemp("ct"), RESIDENT_ID)


@pytest.fixture(scope="module")
def group(
    tmp_path_factory: pytest.TempPathFactory, pacs: orthanc.OrthancServer, ct: list[Path]
) -> Iterator[Consortium]:
    consortium = Consortium(
        tmp_path_factory.mktemp("consults"),
        3,
        epoch_seconds=2,
        replicate_interval=0.2,
        display_names={"hosp-a": "乡镇卫生院", "hosp-b": "县人民医院", "hosp-c": "县中医院"},
    )
    try:
        settings = {
            "hosp-a": f'[dicomweb]\nurl = "{pacs.dicomweb_url}"\n[consults]\nurgent_minutes = 45\n',
            "hosp-b": '[consults]\nmodalities = "CT,DX"\n',
            "hosp-c": '[consults]\nmodalities = "MR"\n',
        }
        for name, text in settings.items():
            config = consortium.members[name].directory / "node.toml"
            config.write_text(config.read_text() + "\n" + text)
        for path in ct:
            orthanc.upload(pacs.rest_base, path)
        synced = hrx(
            "adapters",
            "dicomweb-sync",
            "--dir",
            str(consortium.members["hosp-a"].directory),
            "--url",
            pacs.dicomweb_url,
        )
        assert synced.exit_code == 0, synced.output
        consortium.start_all()
        yield consortium
    finally:
        consortium.close()


def clinic(at: Node, username: str) -> requests.Session:
    """A doctor's browser session in a member's clinic."""
    at.user(username, "doctor")
    set_password(at.database.write_engine, username, PASSWORD)
    browser = requests.Session()
    form = browser.get(f"{at.base}/clinic/signin")
    signed = browser.post(
        f"{at.base}/clinic/signin",
        data={"username": username, "password": PASSWORD, "csrf_token": csrf_of(form)},
    )
    assert signed.status_code == 200, signed.text[:300]
    return browser


def submit(browser: requests.Session, page: str, action: str, data: dict[str, str]) -> Any:
    """Fill in and send a form of ``page`` (its CSRF token) to ``action``."""
    token = csrf_of(browser.get(page))
    return browser.post(action, data={**data, "csrf_token": token})


def patient_a(group: Consortium) -> str:
    a = member_node(group, "hosp-a")
    found = a.session().get(
        f"{a.fhir}/Patient", params={"identifier": f"{RESIDENT_ID_SYSTEM}|{RESIDENT_ID}"}
    )
    return str(found.json()["entry"][0]["resource"]["id"])


def ask(group: Consortium, browser: requests.Session, study: str, reader: str, **more: str) -> Any:
    a = member_node(group, "hosp-a")
    page = f"{a.base}/clinic/patients/{patient_a(group)}/consult"
    data = {
        "study": study,
        "reader": reader,
        "priority": "urgent",
        "question": "咳嗽两周，排除肺炎",
    }
    return submit(browser, page, page, {**data, **more})


def chain(group: Consortium, member: str, types: list[str]) -> list[dict[str, Any]]:
    store = ChainStore(group.database_url(member))
    try:
        return [e for e in store.entries_about(None, types) if e["chain"] == member]
    finally:
        store.close()


def consult_ids(page: str) -> list[str]:
    return re.findall(r'id="consult-([0-9a-f\-]{36})"', page)


def test_a_consult_from_request_to_signed_report(group: Consortium, ct: list[Path]) -> None:
    a, b = member_node(group, "hosp-a"), member_node(group, "hosp-b")
    study = read(ct[0]).StudyInstanceUID
    township = clinic(a, "dr-li")
    asked = ask(group, township, study, "hosp-b")
    assert asked.status_code == 200 and "已发送远程阅片申请" in asked.text, asked.text[
        asked.text.find("<main>") :
    ][:800]
    (consult_id,) = consult_ids(asked.text)
    (requested,) = [
        e
        for e in chain(group, "hosp-a", ["consult.requested"])
        if e["body"]["consult_id"] == consult_id
    ]
    body = requested["body"]
    assert (body["requester_org"], body["reader_org"], body["priority"]) == (
        "hosp-a",
        "hosp-b",
        "urgent",
    )
    assert "咳嗽" not in str(requested) and RESIDENT_ID not in str(requested)
    # the county's worklist: the consult with its countdown (the township's urgent: 45 min)
    county = clinic(b, "dr-wang")
    worklist = county.get(f"{b.base}/clinic/reading").text
    assert f'id="consult-{consult_id}"' in worklist and "乡镇卫生院" in worklist
    assert re.search(r"还剩 4[45] 分钟", worklist), worklist
    page = f"{b.base}/clinic/reading/{consult_id}"
    claimed = submit(county, page, page, {"action": "claim"})
    assert claimed.status_code == 200 and "阅片中" in claimed.text
    assert [e["body"]["consult_id"] for e in chain(group, "hosp-b", ["consult.accepted"])] == [
        consult_id
    ]
    # the images through the county's node, granted by the consult
    viewer = county.get(f"{b.base}/clinic/viewer/hosp-a/{study}")
    assert viewer.status_code == 200, viewer.text[:500]
    frame = re.search(r'id="frame" src="([^"]+)"', viewer.text)
    assert frame
    image = county.get(b.base + frame.group(1).replace("&amp;", "&"))
    assert image.status_code == 200 and image.content[:2] == b"\xff\xd8"
    reads = chain(group, "hosp-a", ["images.read"])
    assert [r["body"]["basis"] for r in reads] == [{"consult": consult_id}]
    # the signed report, back at the township
    reported = submit(
        county,
        page,
        page,
        {"action": "report", "findings": "右下肺见斑片状高密度影。", "impression": "右下肺炎。"},
    )
    assert reported.status_code == 200 and "报告已签名并送达" in reported.text, reported.text[:800]
    (entry,) = [
        e
        for e in chain(group, "hosp-b", ["consult.reported"])
        if e["body"]["consult_id"] == consult_id
    ]
    shown = township.get(f"{a.base}/clinic/consults/{consult_id}").text
    assert "签名有效：由县人民医院签发" in shown and "右下肺炎。" in shown, shown
    stored = (
        a.session()
        .get(f"{a.fhir}/DiagnosticReport", params={"identifier": f"urn:hrx:consult|{consult_id}"})
        .json()["entry"][0]["resource"]
    )
    assert report_hash(stored) == entry["body"]["report_hash"]
    # an amendment: signed again, a new version at both, the old one kept
    amended = submit(
        county,
        page,
        page,
        {
            "action": "report",
            "findings": "右下肺见斑片状高密度影。",
            "impression": "右下肺炎，建议复查。",
        },
    )
    assert "报告已签名并送达" in amended.text
    versions = a.session().get(f"{a.fhir}/DiagnosticReport/{stored['id']}/_history").json()
    assert versions["total"] == 2
    assert "建议复查" in township.get(f"{a.base}/clinic/consults/{consult_id}").text
    reports = chain(group, "hosp-b", ["consult.reported"])
    assert reports[-1]["body"]["amends"] == entry["body"]["report_hash"]
    # the turnaround, from the ledger, at any member holding the chains
    group.wait_converged(20)
    output = hrx_out("report", "consults", "--dir", str(group.members["hosp-c"].directory))
    assert "县人民医院 (hosp-b) urgent" in output and "1/1 within deadline" in output, output
    chart = township.get(f"{a.base}/clinic/consults/turnaround").text
    assert "<svg" in chart and "县人民医院" in chart


def test_bad_requests_and_refusals_lose_nothing(group: Consortium, ct: list[Path]) -> None:
    a = member_node(group, "hosp-a")
    study = read(ct[0]).StudyInstanceUID
    township = clinic(a, "dr-zhao")
    for reader, wanted_study, status, said in (
        ("hosp-b", "1.2.3.4.5", 422, "is not held here"),
        ("hosp-x", study, 400, "is not a member"),
        ("hosp-a", study, 400, "this node is the requester"),
    ):
        answer = ask(group, township, wanted_study, reader)
        assert answer.status_code == status and said in answer.text, answer.text[:500]
    # hosp-c reads only MR: the consult is refused, said, and cancelled on the ledger
    before = {e["body"]["consult_id"] for e in chain(group, "hosp-a", ["consult.cancelled"])}
    refused = ask(group, township, study, "hosp-c")
    assert "已拒绝" in refused.text, refused.text[:800]
    assert "县中医院不开展 CT 阅片（可阅：MR）" in refused.text, refused.text[:800]
    cancelled = chain(group, "hosp-a", ["consult.cancelled"])
    assert {e["body"]["reason"] for e in cancelled if e["body"]["consult_id"] not in before} == {
        "refused-by-reader"
    }


def test_a_reader_cut_off_gets_the_consult_when_it_returns(
    group: Consortium, ct: list[Path]
) -> None:
    a, b = member_node(group, "hosp-a"), member_node(group, "hosp-b")
    study = read(ct[0]).StudyInstanceUID
    township = clinic(a, "dr-sun")
    group.cut("hosp-b")
    try:
        asked = ask(group, township, study, "hosp-b", priority="stat")
        assert "对方暂时无法联系" in asked.text, asked.text[:800]
        consult_id = consult_ids(asked.text)[0]
    finally:
        group.heal("hosp-b")
    county = clinic(b, "dr-qian")
    deadline = time.monotonic() + 30
    while f'id="consult-{consult_id}"' not in county.get(f"{b.base}/clinic/reading").text:
        assert time.monotonic() < deadline, (
            "the consult was not delivered after the reader returned"
        )
        time.sleep(0.5)
    requested = next(
        e
        for e in chain(group, "hosp-a", ["consult.requested"])
        if e["body"]["consult_id"] == consult_id
    )
    task = (
        b.session()
        .get(f"{b.fhir}/Task", params={"identifier": f"urn:hrx:consult|{consult_id}"})
        .json()["entry"][0]["resource"]
    )
    assert task["restriction"]["period"]["end"] == requested["body"]["deadline"]  # still counts


def test_a_report_for_a_cancelled_consult_is_kept_not_sent(
    group: Consortium, ct: list[Path]
) -> None:
    a, b = member_node(group, "hosp-a"), member_node(group, "hosp-b")
    study = read(ct[0]).StudyInstanceUID
    township = clinic(a, "dr-zhou")
    consult_id = consult_ids(ask(group, township, study, "hosp-b", priority="routine").text)[0]
    county = clinic(b, "dr-he")
    page = f"{b.base}/clinic/reading/{consult_id}"
    submit(county, page, page, {"action": "claim"})
    cancelled = submit(
        township,
        f"{a.base}/clinic/consults/{consult_id}",
        f"{a.base}/clinic/consults/{consult_id}/cancel",
        {"reason": "患者已转上级医院"},
    )
    assert "已撤销远程阅片申请" in cancelled.text
    kept = submit(
        county, page, page, {"action": "report", "findings": "未见异常。", "impression": "正常。"}
    )
    assert kept.status_code == 200 and "报告已签名保存" in kept.text, kept.text[:800]
    reports = (
        b.session()
        .get(f"{b.fhir}/DiagnosticReport", params={"identifier": f"urn:hrx:consult|{consult_id}"})
        .json()
    )
    assert reports["total"] == 1  # kept at the reader
    at_a = (
        a.session()
        .get(f"{a.fhir}/DiagnosticReport", params={"identifier": f"urn:hrx:consult|{consult_id}"})
        .json()
    )
    assert at_a["total"] == 0
    assert consult_id not in [  # and nothing about it went on the reader's chain
        e["body"]["consult_id"] for e in chain(group, "hosp-b", ["consult.reported"])
    ]


def test_the_worklist_and_the_report_in_the_browser(
    group: Consortium, ct: list[Path], browser: object
) -> None:
    """The county radiologist in Chromium: the worklist with the consult's priority and
    countdown, claim, the images, the report signed and sent."""
    from playwright.sync_api import Browser, expect

    assert isinstance(browser, Browser)
    a, b = member_node(group, "hosp-a"), member_node(group, "hosp-b")
    study = read(ct[0]).StudyInstanceUID
    consult_id = consult_ids(ask(group, clinic(a, "dr-ma"), study, "hosp-b", priority="stat").text)[
        0
    ]
    b.user("dr-luo", "doctor")
    set_password(b.database.write_engine, "dr-luo", PASSWORD)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        page.goto(f"{b.base}/clinic/signin")
        page.fill("input[name=username]", "dr-luo")
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.click("#nav-reading")
        row = page.locator(f"#consult-{consult_id}")
        expect(row.locator(".badge.priority.stat")).to_have_text("危急")
        expect(row.locator(".countdown")).to_contain_text("还剩")
        # the most pressing first: stat, then urgent, then routine
        ranks = {"priority-stat": 0, "priority-urgent": 1, "priority-routine": 2}
        shown = [
            ranks[str(c).split()[0]]
            for c in page.eval_on_selector_all(
                "table.worklist tbody tr", "rows => rows.map(r => r.className)"
            )
        ]
        assert shown == sorted(shown) and shown[0] == 0, shown
        row.locator("a.open-consult").click()
        page.click("#claim")
        expect(page.locator("#consult-status")).to_have_text("阅片中")
        page.click("a.view-images")
        deadline = time.monotonic() + 20
        while not page.eval_on_selector("#frame", "i => i.complete && i.naturalWidth > 0"):
            assert time.monotonic() < deadline, "the frame did not load"
            time.sleep(0.1)
        page.goto(f"{b.base}/clinic/reading/{consult_id}")
        page.fill("textarea[name=findings]", "双肺纹理清晰，未见实变。")
        page.fill("textarea[name=impression]", "胸部CT未见明显异常。")
        page.click("#send-report")
        expect(page.locator("p.notice")).to_contain_text("报告已签名并送达申请医院")
    finally:
        page.close()
    shown = clinic(a, "dr-ma").get(f"{a.base}/clinic/consults/{consult_id}").text
    assert "签名有效" in shown and "胸部CT未见明显异常。" in shown


def test_a_pacs_that_is_down_is_said_and_loses_no_consult(
    group: Consortium, ct: list[Path], pacs: orthanc.OrthancServer
) -> None:
    a, b = member_node(group, "hosp-a"), member_node(group, "hosp-b")
    study = read(ct[0]).StudyInstanceUID
    consult_id = consult_ids(ask(group, clinic(a, "dr-yu"), study, "hosp-b").text)[0]
    pacs.stop()
    county = clinic(b, "dr-fang")
    down = county.get(f"{b.base}/clinic/viewer/hosp-a/{study}")
    assert down.status_code == 503 and "影像系统暂时无法访问" in down.text, down.text[:800]
    assert f'id="consult-{consult_id}"' in county.get(f"{b.base}/clinic/reading").text
    # the report can still be written, signed and delivered: it needs no image
    page = f"{b.base}/clinic/reading/{consult_id}"
    submit(county, page, page, {"action": "claim"})
    sent = submit(
        county, page, page, {"action": "report", "findings": "见前。", "impression": "同前。"}
    )
    assert "报告已签名并送达" in sent.text
