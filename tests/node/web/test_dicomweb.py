"""``/dicomweb`` across real member processes and a real Orthanc: a standard DICOMweb client
(``dicomweb-client``) reads hosp-a's study through hosp-a's node with a local token, and
through hosp-b's node as a member — refused and recorded without consent, served and
recorded once under a permitted access request, refused again once the patient revokes; the
PACS's address never reaches a client; bad paths, bad tokens and a PACS that is down get clear
answers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from consent.model import consent_resource
from consent.pseudonym import RESIDENT_ID_SYSTEM
from ledger.store import ChainStore
from node.demo import orthanc
from node.demo.harness import Consortium
from node.demo.proxy import offload_site, running_nginx
from node.identity.users import set_password
from tests.helpers.dicom import chest_ct, hrx
from tests.helpers.nodes import Node, free_port, member_node, post, wait_healthy
from tests.helpers.portal import PASSWORD, enroll, sign_in

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(orthanc.missing() is not None, reason=str(orthanc.missing())),
]

RESIDENT_ID = "33010619850315" + str(uuid.uuid4().int)[:3] + "X"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[orthanc.OrthancServer]:
    with orthanc.running_orthanc(tmp_path_factory.mktemp("pacs")) as server:
        yield server


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return chest_ct(tmp_path_factory.mktemp("ct"), RESIDENT_ID)


@pytest.fixture(scope="module")
def ct(ct_series: list[Path]) -> Path:
    """The first slice."""
    return ct_series[0]


@pytest.fixture(scope="module")
def group(
    tmp_path_factory: pytest.TempPathFactory, pacs: orthanc.OrthancServer, ct_series: list[Path]
) -> Iterator[Consortium]:
    consortium = Consortium(
        tmp_path_factory.mktemp("dicomweb"), 2, epoch_seconds=2, replicate_interval=0.2
    )
    try:
        for name, url in (
            ("hosp-a", pacs.dicomweb_url),
            ("hosp-b", f"http://127.0.0.1:{orthanc.free_port()}/dicom-web"),  # a PACS that is down
        ):
            config = consortium.members[name].directory / "node.toml"
            config.write_text(
                config.read_text()
                + f'\n[dicomweb]\nurl = "{url}"\ncors_origins = "https://viewer.example"\n'
            )
        for path in ct_series:
            orthanc.upload(pacs.rest_base, path)
        directory = str(consortium.members["hosp-a"].directory)
        synced = hrx("adapters", "dicomweb-sync", "--dir", directory, "--url", pacs.dicomweb_url)
        assert synced.exit_code == 0, synced.output
        consortium.start_all()
        yield consortium
    finally:
        consortium.close()


def client(url: str, token: str) -> DICOMwebClient:
    return DICOMwebClient(url=url, headers={"Authorization": f"Bearer {token}"})


def uids(path: Path) -> tuple[str, str, str]:
    dataset = pydicom.dcmread(path, stop_before_pixels=True)
    return dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SOPInstanceUID


def images_read(group: Consortium, patient: str | None = None) -> list[dict[str, Any]]:
    """The ``images.read`` entries on hosp-a's chain."""
    store = ChainStore(group.database_url("hosp-a"))
    try:
        return [e for e in store.entries_about(patient, ["images.read"]) if e["chain"] == "hosp-a"]
    finally:
        store.close()


def pacs_address(pacs: orthanc.OrthancServer) -> str:
    """The PACS's host and port as a URL names them (the bare port number may occur in a UID)."""
    return f"127.0.0.1:{pacs.http_port}"


def test_a_standard_client_reads_the_pacs_through_the_node(
    group: Consortium, pacs: orthanc.OrthancServer, ct: Path
) -> None:
    a = member_node(group, "hosp-a")
    reader = client(f"{a.base}/dicomweb", a.token("dr-li", "doctor"))
    study, series, instance = uids(ct)
    found = reader.search_for_studies(search_filters={"StudyInstanceUID": study})
    assert [s["0020000D"]["Value"][0] for s in found] == [study]
    # the PACS's address is rewritten to the node's: a client never learns it
    retrieve_url = found[0]["00081190"]["Value"][0]
    assert retrieve_url == f"{group.members['hosp-a'].url}/dicomweb/studies/{study}"
    assert pacs_address(pacs) not in str(found)
    (listed,) = reader.search_for_series(study_instance_uid=study)
    assert listed["0020000E"]["Value"][0] == series
    metadata = reader.retrieve_study_metadata(study)
    assert instance in {m["00080018"]["Value"][0] for m in metadata}
    assert pacs_address(pacs) not in str(metadata)
    (frame,) = reader.retrieve_instance_frames(study, series, instance, frame_numbers=[1])
    assert frame == pydicom.dcmread(ct).PixelData  # the pixels as the modality wrote them
    jpeg = reader.retrieve_instance_rendered(study, series, instance, media_types=("image/jpeg",))
    assert jpeg[:2] == b"\xff\xd8"
    datasets = reader.retrieve_study(study)  # streamed, three instances
    assert sorted(d.InstanceNumber for d in datasets) == [1, 2, 3]
    assert all(d.PixelData for d in datasets)
    thumbnail = requests.get(
        f"{a.base}/dicomweb/studies/{study}/series/{series}/thumbnail",
        headers={"Authorization": f"Bearer {a.token('dr-li', 'doctor')}", "Accept": "image/jpeg"},
        timeout=10,
    )
    assert thumbnail.status_code == 200 and thumbnail.content[:2] == b"\xff\xd8"
    windowed = requests.get(
        f"{a.base}/dicomweb/studies/{study}/series/{series}/instances/{instance}/rendered",
        params={"window": "40,400,linear"},
        headers={"Authorization": f"Bearer {a.token('dr-li', 'doctor')}", "Accept": "image/png"},
        timeout=10,
    )
    assert windowed.status_code == 200 and windowed.content[:4] == b"\x89PNG"
    # one AuditEvent for the reads of the study, in its patient's compartment
    auditor = a.session(a.token("aud-a", "auditor"))
    events = auditor.get(f"{a.fhir}/AuditEvent", params={"outcome": "0", "_count": "100"}).json()
    reads = [
        e["resource"]
        for e in events.get("entry", [])
        if f"study {study} by dr-li" in e["resource"].get("outcomeDesc", "")
    ]
    assert len(reads) == 1, reads
    assert any(x["what"].get("reference", "").startswith("Patient/") for x in reads[0]["entity"])


def test_bad_requests_get_clear_answers(group: Consortium, ct: Path) -> None:
    a = member_node(group, "hosp-a")
    token = a.token("dr-li", "doctor")
    study, _, _ = uids(ct)
    cases = [
        (f"studies/{study}/metadata", None, 401, "bearer token"),
        ("studies/1.2.x/metadata", token, 400, "not a DICOM UID"),
        ("tools/find", token, 404, "no DICOMweb resource"),
        (f"studies/{study}/series/1.2/instances/1.3/frames/0", token, 400, "frame numbers"),
        ("studies/1.2.3.4/metadata", token, 404, "not held here"),
    ]
    for path, bearer, status, said in cases:
        headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
        answer = requests.get(f"{a.base}/dicomweb/{path}", headers=headers, timeout=10)
        assert answer.status_code == status, (path, answer.text)
        assert said in answer.json()["error"], (path, answer.text)
        assert said in answer.headers.get("Warning", "") or status == 401
    # a patient's token reads its own studies by UID, and may not search across studies
    patient = a.token("pt-other", "patient", patient="someone-else")
    assert (
        requests.get(
            f"{a.base}/dicomweb/studies/{study}/metadata",
            headers={"Authorization": f"Bearer {patient}"},
            timeout=10,
        ).status_code
        == 404
    )
    assert (
        requests.get(
            f"{a.base}/dicomweb/studies", headers={"Authorization": f"Bearer {patient}"}, timeout=10
        ).status_code
        == 403
    )
    # hosp-b's PACS is down: said, with when to try again
    b = member_node(group, "hosp-b")
    down = requests.get(
        f"{b.base}/dicomweb/studies",
        headers={"Authorization": f"Bearer {b.token('dr-qian', 'doctor')}"},
        timeout=10,
    )
    assert down.status_code == 503 and "cannot be reached" in down.json()["error"]
    assert down.headers["Retry-After"] == "30"


def sign_in_as(at: Node, username: str) -> requests.Session:
    browser = requests.Session()
    assert sign_in(at, browser, username, PASSWORD).status_code == 200
    return browser


def test_a_viewer_of_a_named_origin_may_call_from_its_pages(group: Consortium, ct: Path) -> None:
    a = member_node(group, "hosp-a")
    study, _, _ = uids(ct)
    url = f"{a.base}/dicomweb/studies/{study}/metadata"
    preflight = requests.options(
        url,
        headers={
            "Origin": "https://viewer.example",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        },
        timeout=10,
    )
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://viewer.example"
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    token = a.token("dr-li", "doctor")
    for origin, allowed in (("https://viewer.example", True), ("https://evil.example", False)):
        answer = requests.get(
            url, headers={"Origin": origin, "Authorization": f"Bearer {token}"}, timeout=10
        )
        assert answer.status_code == 200
        assert ("Access-Control-Allow-Origin" in answer.headers) is allowed
        assert "Origin" in answer.headers["Vary"]


def patient_at(at: Node) -> str:
    """The patient's id at a member (registered there when new)."""
    identifier = f"{RESIDENT_ID_SYSTEM}|{RESIDENT_ID}"
    found = at.session().get(f"{at.fhir}/Patient", params={"identifier": identifier}).json()
    if found.get("entry"):
        return str(found["entry"][0]["resource"]["id"])
    created = post(
        at.session(),
        f"{at.fhir}/Patient",
        {
            "resourceType": "Patient",
            "identifier": [{"system": RESIDENT_ID_SYSTEM, "value": RESIDENT_ID}],
            "name": [{"family": "张", "given": ["三"]}],
        },
    )
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def grant_imaging(a: Node, to: str, *also: str) -> dict[str, Any]:
    """The patient, signed in at hosp-a, grants member ``to`` her imaging (and the categories
    ``also``); the Consent."""
    at_a = patient_at(a)
    granted = post(
        a.session(a.token("pt-zhang", "patient", patient=at_a)),
        f"{a.fhir}/Consent",
        consent_resource(at_a, [to], ["imaging", *also], ["TREAT"], None, None),
    )
    assert granted.status_code == 201, granted.text
    return dict(granted.json())


def test_a_member_reads_under_consent_only(group: Consortium, ct: Path) -> None:
    a, b = member_node(group, "hosp-a"), member_node(group, "hosp-b")
    study, series, instance = uids(ct)
    doctor = b.token("dr-qian", "doctor")
    remote = client(f"{b.base}/dicomweb/members/hosp-a", doctor)
    # no consent: refused, and the refusal is on hosp-a's chain where the patient sees it
    with pytest.raises(requests.HTTPError) as refused:
        remote.retrieve_study_metadata(study)
    assert refused.value.response.status_code == 403
    assert "no grant to read study" in refused.value.response.json()["error"]
    (denied,) = [e for e in images_read(group) if e["body"]["decision"] == "deny"]
    assert denied["body"]["requester_org"] == "hosp-b" and denied["body"]["basis"] is None
    assert denied["body"]["reason"] == "no-grant" and study not in str(denied)  # no UID
    # a member may not search across studies
    with pytest.raises(requests.HTTPError) as searched:
        remote.search_for_studies()
    assert searched.value.response.status_code == 403
    # the patient grants hosp-b imaging; hosp-b's doctor asks for the prior results
    granted = grant_imaging(a, "hosp-b")
    a_patient = patient_at(a)
    at_b = patient_at(b)
    prior = b.session(doctor).get(
        f"{b.fhir}/Patient/{at_b}/$prior-results", params={"category": "imaging"}
    )
    assert prior.status_code == 200, prior.text
    studies = [
        e["resource"]
        for e in prior.json()["entry"]
        if e["resource"]["resourceType"] == "ImagingStudy"
    ]
    assert len(studies) == 1, prior.text
    # now the images: metadata, frames, a rendering, through hosp-b's node
    metadata = remote.retrieve_study_metadata(study)
    assert instance in {m["00080018"]["Value"][0] for m in metadata}
    assert group.members["hosp-a"].url not in str(metadata)
    (frame,) = remote.retrieve_instance_frames(study, series, instance, frame_numbers=[1])
    assert frame == pydicom.dcmread(ct).PixelData
    (found,) = remote.search_for_series(study_instance_uid=study)
    assert found["0020000E"]["Value"][0] == series
    rendered = remote.retrieve_instance_rendered(study, series, instance)
    assert rendered[:2] == b"\xff\xd8"
    # recorded once on hosp-a's chain, naming the access request it was granted by
    permitted = [e for e in images_read(group) if e["body"]["decision"] == "permit"]
    assert len(permitted) == 1, permitted
    decided = ChainStore(group.database_url("hosp-a")).entries_about(
        permitted[0]["body"]["patient"], ["access.decided"]
    )
    request_ids = {e["body"]["request_id"] for e in decided if e["body"]["decision"] == "permit"}
    assert permitted[0]["body"]["basis"]["access"] in request_ids
    assert permitted[0]["body"]["study"] in decided[-1]["body"]["released"]
    # the patient revokes: within the decision's lifetime (10 s), reads are refused again
    revoked = a.session(a.token("pt-zhang", "patient", patient=a_patient)).put(
        f"{a.fhir}/Consent/{granted['id']}",
        json={**granted, "status": "inactive"},
        headers={"Content-Type": "application/fhir+json"},
    )
    assert revoked.status_code == 200, revoked.text
    deadline = time.monotonic() + 20
    while True:
        answer = requests.get(
            f"{b.base}/dicomweb/members/hosp-a/studies/{study}/metadata",
            headers={"Authorization": f"Bearer {doctor}"},
            timeout=10,
        )
        if answer.status_code == 403 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert answer.status_code == 403, answer.text
    assert "no longer permitted" in answer.json()["error"] and "revoked" in answer.json()["error"]
    refusals = [e["body"]["reason"] for e in images_read(group) if e["body"]["decision"] == "deny"]
    assert refusals == ["no-grant", "no-longer-permitted"], refusals
    # the patient sees in the portal that hosp-b viewed the images, and was refused before
    enroll(a, a_patient, "pt-zhang")  # her account keeps its name: she signs in with it
    browser = sign_in_as(a, "pt-zhang")
    page = browser.get(f"{a.base}/portal/access", params={"lang": "en"}).text
    assert "医院 hosp-b viewed your images held at 医院 hosp-a" in page, page
    assert "医院 hosp-b asked to view your images held at 医院 hosp-a, and was refused" in page


def test_a_doctor_views_a_remote_study_in_the_browser(
    group: Consortium, ct_series: list[Path], browser: object
) -> None:
    """From hosp-b's clinic: the prior results, the study's "view images" link, the viewer
    with its series thumbnail and frames scrolled in order by wheel and keys, the lung
    preset, every image a real one through both nodes."""
    from playwright.sync_api import Browser, expect

    assert isinstance(browser, Browser)
    a, b = member_node(group, "hosp-a"), member_node(group, "hosp-b")
    grant_imaging(a, "hosp-b", "laboratory")  # the clinic asks for both
    at_b = patient_at(b)
    b.user("dr-zhou", "doctor")
    set_password(b.database.write_engine, "dr-zhou", "clinic password 1")
    instances = [uids(path)[2] for path in ct_series]
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        page.goto(f"{b.base}/clinic/signin?lang=zh")
        page.fill("input[name=username]", "dr-zhou")
        page.fill("input[name=password]", "clinic password 1")
        page.click("button[type=submit]")
        page.goto(f"{b.base}/clinic/patients/{at_b}")
        page.click("form.fetch button")
        page.click("a.view-images")
        expect(page.locator("h1")).to_contain_text("影像浏览 · 医院 hosp-a")

        def loaded(selector: str) -> bool:
            """Whether the image has loaded, waited for (at most 20 s): polled from here, as
            the page's policy refuses the scripts Playwright's own waiting would evaluate."""
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if page.eval_on_selector(selector, "i => i.complete && i.naturalWidth > 0"):
                    return True
                time.sleep(0.1)
            return False

        assert loaded(".series-list img") and loaded("#frame")
        expect(page.locator("#frame-number")).to_have_text("1")
        assert instances[0] in str(page.get_attribute("#frame", "src"))
        page.keyboard.press("ArrowDown")
        expect(page.locator("#frame-number")).to_have_text("2")
        assert instances[1] in str(page.get_attribute("#frame", "src"))
        page.hover("#frame")
        page.mouse.wheel(0, 100)
        expect(page.locator("#frame-number")).to_have_text("3")
        assert instances[2] in str(page.get_attribute("#frame", "src"))
        page.click("#preset-lung")
        expect(page.locator("#preset-lung")).to_have_class("preset chosen")
        assert "window=-600,1500,linear" in str(page.get_attribute("#frame", "src"))
        assert loaded("#frame")
        assert "frame=3" in page.url and "preset=lung" in page.url
        # the same page without the script: by links
        page.goto(page.url.replace("frame=3", "frame=2"))
        expect(page.locator("#frame-number")).to_have_text("2")
    finally:
        page.close()


def test_behind_nginx_the_images_bypass_python(
    group: Consortium, pacs: orthanc.OrthancServer, ct_series: list[Path], tmp_path: Path
) -> None:
    """With ``dicomweb.offload``, a second web server of hosp-a behind the deployment's own
    nginx blocks: the node decides, nginx sends the PACS's bytes (X-Accel-Redirect). The
    frames are the modality's, refusals are still the node's, the internal location cannot be
    asked for, and a PACS error is said in the node's words."""
    a = member_node(group, "hosp-a")
    port = free_port()
    member = group.members["hosp-a"]
    process = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "node", "serve", "--dir", str(member.directory)],
        env={
            **os.environ,
            "HRX_SERVER_PORT": str(port),
            "HRX_DICOMWEB_OFFLOAD": "/_hrx_pacs",
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    http, server = offload_site(
        tmp_path / "nginx", port, pacs.public_dicomweb_url, pacs.username, pacs.password
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process)
        with running_nginx(tmp_path / "nginx", server, http) as base:
            study, series, instance = uids(ct_series[0])
            ct_series_uids = [uids(path)[2] for path in ct_series]
            reader = client(f"{base}/dicomweb", a.token("dr-li", "doctor"))
            (frame,) = reader.retrieve_instance_frames(study, series, instance, frame_numbers=[1])
            assert frame == pydicom.dcmread(ct_series[0]).PixelData
            jpeg = reader.retrieve_instance_rendered(study, series, instance)
            assert jpeg[:2] == b"\xff\xd8"
            assert len(reader.retrieve_study(study)) == 3
            bearer = {"Authorization": f"Bearer {a.token('dr-li', 'doctor')}"}
            prefix = f"{base}/dicomweb/studies/{study}/series/{series}/instances"
            direct = requests.get(f"{base}/_hrx_pacs/studies/{study}", timeout=10)
            assert direct.status_code == 404  # internal: only the node's answer leads there
            anonymous = requests.get(f"{prefix}/{instance}/frames/1", timeout=10)
            assert anonymous.status_code == 401 and "bearer token" in anonymous.headers["Warning"]
            missing = requests.get(f"{prefix}/1.2.3.4/frames/1", headers=bearer, timeout=10)
            assert missing.status_code == 404
            assert missing.json() == {"error": "the PACS holds no such resource"}
            # a study not held here: the node's refusal, its reason in the Warning header
            elsewhere = f"{base}/dicomweb/studies/1.2.3/series/1.2/instances/1.2.4/frames/1"
            refused = requests.get(elsewhere, headers=bearer, timeout=10)
            assert refused.status_code == 403 and "not held here" in refused.headers["Warning"]
            # the node's decision for this token and study is kept 10 s: frames keep coming
            # from the PACS while the node is down (and a revocation holds only after them)
            process.terminate()
            process.wait(timeout=30)
            kept = requests.get(
                f"{prefix}/{ct_series_uids[2]}/frames/1",
                headers={**bearer, "Accept": 'multipart/related; type="*/*"'},
                timeout=10,
            )
            assert kept.status_code == 200, kept.text[:300]
            assert pydicom.dcmread(ct_series[2]).PixelData in kept.content
            down = requests.get(f"{base}/dicomweb/studies/{study}/metadata", headers=bearer)
            assert down.status_code == 502  # what is not a frame still asks the node
    finally:
        process.terminate()
        process.wait(timeout=30)
