"""The patient portal over real HTTP, on both engines: enrollment, sign-in, consents, accesses,
receipts, and its defences (CSRF, sign-in throttle and audit, resets at the desk, isolation
between patients, cookie flags)."""

from __future__ import annotations

import re
import uuid
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import pytest
import requests

from consent.pseudonym import RESIDENT_ID_SYSTEM
from ledger import keys
from ledger.receipt import verify_receipt
from tests.helpers.nodes import Node, hrx, post, running_node
from tests.helpers.portal import PASSWORD, csrf_of, enroll, sign_in

pytestmark = pytest.mark.usefixtures("node")


def new_patient(node: Node, *, resident_id: bool = True) -> str:
    patient: dict[str, Any] = {
        "resourceType": "Patient",
        "name": [{"family": "李", "given": ["四"]}],
    }
    if resident_id:
        value = "3301" + str(uuid.uuid4().int)[:14]
        patient["identifier"] = [{"system": RESIDENT_ID_SYSTEM, "value": value}]
    created = post(node.session(), f"{node.fhir}/Patient", patient)
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def grant(node: Node, browser: requests.Session, **fields: Any) -> requests.Response:
    page = browser.get(f"{node.base}/portal/consents")
    data = {
        "csrf_token": csrf_of(page),
        "grantee": ["*"],
        "category": ["laboratory", "imaging"],
        "purpose": ["TREAT"],
        "start": "2026-01-01",
        "end": "",
        **fields,
    }
    return browser.post(f"{node.base}/portal/consents", data=data)


def consent_ids(page: requests.Response) -> list[str]:
    return re.findall(r'id="consent-([A-Za-z0-9.\-]+)"', page.text)


def test_enroll_sign_in_grant_narrow_and_revoke(node: Node) -> None:
    patient_id = new_patient(node)
    browser = enroll(node, patient_id)
    page = browser.get(f"{node.base}/portal/consents")
    assert page.status_code == 200
    assert '<html lang="zh-CN">' in page.text and "我的授权" in page.text
    answer = grant(node, browser)
    assert answer.status_code == 200 and "已记入医联体账本" in answer.text
    (consent_id,) = consent_ids(answer)
    consent = node.session().get(f"{node.fhir}/Consent/{consent_id}").json()
    assert consent["patient"]["reference"] == f"Patient/{patient_id}"
    assert consent["status"] == "active"
    receipts = re.findall(r'href="(/portal/receipts/[^"]+)"', answer.text)
    assert len(receipts) == 1
    # narrow it to laboratory results only
    edit = browser.get(f"{node.base}/portal/consents/{consent_id}")
    answer = browser.post(
        f"{node.base}/portal/consents/{consent_id}",
        data={
            "csrf_token": csrf_of(edit),
            "version": re.search(r'name="version" value="(\d+)"', edit.text).group(1),  # type: ignore[union-attr]
            "grantee": ["hosp-a"],
            "category": ["laboratory"],
            "purpose": ["TREAT"],
            "start": "2026-01-01",
            "end": "2026-12-31",
        },
    )
    assert answer.status_code == 200, answer.text[:500]
    narrowed = node.session().get(f"{node.fhir}/Consent/{consent_id}").json()
    assert [c["code"] for c in narrowed["provision"]["class"]] == ["laboratory"]
    assert narrowed["provision"]["period"] == {"start": "2026-01-01", "end": "2026-12-31"}
    # revoke
    page = browser.get(f"{node.base}/portal/consents")
    answer = browser.post(
        f"{node.base}/portal/consents/{consent_id}/revoke",
        data={"csrf_token": csrf_of(page), "version": str(narrowed["meta"]["versionId"])},
    )
    assert answer.status_code == 200 and "授权已撤销" in answer.text
    assert node.session().get(f"{node.fhir}/Consent/{consent_id}").json()["status"] == "inactive"
    receipts = re.findall(r'href="(/portal/receipts/[^"]+)"', answer.text)
    assert len(receipts) == 3  # granted, granted again (narrowed), revoked
    # a stale form (the version it showed is gone) does not overwrite
    stale = browser.post(
        f"{node.base}/portal/consents/{consent_id}/revoke",
        data={"csrf_token": csrf_of(page), "version": "1"},
    )
    assert stale.status_code == 409


def test_research_and_public_health_are_granted_only_when_ticked(node: Node) -> None:
    browser = enroll(node, new_patient(node))
    form = browser.get(f"{node.base}/portal/consents").text
    for code, words in [("HRESCH", "医学研究"), ("PUBHLTH", "公共卫生与统计")]:
        (box,) = re.findall(rf'<input type="checkbox" name="purpose" value="{code}"[^>]*>', form)
        assert "checked" not in box and words in form
    assert "只在您勾选时" in form
    answer = grant(node, browser, purpose=["TREAT", "HRESCH"])
    assert answer.status_code == 200, answer.text[:500]
    (consent_id,) = consent_ids(answer)
    assert "医学研究" in answer.text.split(f'id="consent-{consent_id}"')[1]
    consent = node.session().get(f"{node.fhir}/Consent/{consent_id}").json()
    assert [p["code"] for p in consent["provision"]["purpose"]] == ["HRESCH", "TREAT"]


def test_a_receipt_downloads_and_verifies(node: Node, tmp_path: Path) -> None:
    browser = enroll(node, new_patient(node))
    answer = grant(node, browser)
    (link,) = re.findall(r'href="(/portal/receipts/[^"]+)"', answer.text)
    download = browser.get(f"{node.base}{link}")
    assert download.status_code == 200
    assert "attachment" in download.headers["Content-Disposition"]
    authority = keys.load_private_key(node.directory.parent / "hosp-a-authority.pem")
    summary = verify_receipt(download.json(), authority.public_key())
    assert summary.chain == "hosp-a" and summary.entry_type == "consent.granted"
    path = tmp_path / "receipt.json"
    path.write_bytes(download.content)
    output = hrx("audit", "receipt", str(path), "--authority", keys.public_key_text(authority))
    assert "VALID" in output


def test_forms_without_their_csrf_token_are_refused(node: Node) -> None:
    browser = requests.Session()
    browser.get(f"{node.base}/portal/signin")  # the double-submit cookie is set
    refused = browser.post(
        f"{node.base}/portal/signin", data={"username": "x", "password": "y" * 8}
    )
    assert refused.status_code == 400 and "表单已失效" in refused.text
    patient = enroll(node, new_patient(node))
    other = enroll(node, new_patient(node))
    data = {"grantee": ["*"], "category": ["laboratory"], "purpose": ["TREAT"]}
    assert patient.post(f"{node.base}/portal/consents", data=data).status_code == 400
    stolen = csrf_of(other.get(f"{node.base}/portal/consents"))
    assert (
        patient.post(
            f"{node.base}/portal/consents", data={**data, "csrf_token": stolen}
        ).status_code
        == 400
    )
    assert consent_ids(patient.get(f"{node.base}/portal/consents")) == []


def test_one_patient_cannot_reach_anothers_consents_or_receipts(node: Node) -> None:
    alice = enroll(node, new_patient(node))
    bob = enroll(node, new_patient(node))
    answer = grant(node, alice)
    (consent_id,) = consent_ids(answer)
    (receipt,) = re.findall(r'href="(/portal/receipts/[^"]+)"', answer.text)
    assert bob.get(f"{node.base}/portal/consents/{consent_id}").status_code == 404
    page = bob.get(f"{node.base}/portal/consents")
    assert consent_id not in page.text
    revoke = bob.post(
        f"{node.base}/portal/consents/{consent_id}/revoke",
        data={"csrf_token": csrf_of(page), "version": "1"},
    )
    assert revoke.status_code == 404
    assert bob.get(f"{node.base}{receipt}").status_code == 404
    assert bob.get(f"{node.base}/portal/receipts/hosp-a/0").status_code == 404
    assert node.session().get(f"{node.fhir}/Consent/{consent_id}").json()["status"] == "active"
    signed_out = requests.Session()
    assert signed_out.get(f"{node.base}{receipt}").url.endswith("/portal/signin")


def test_repeated_wrong_passwords_slow_down_and_are_audited(node: Node) -> None:
    from node.identity.users import FREE_FAILURES

    browser = enroll(node, new_patient(node))
    username = browser.username  # type: ignore[attr-defined]
    stranger = requests.Session()
    stranger.headers["User-Agent"] = "stranger-browser"
    for _ in range(FREE_FAILURES):
        answer = sign_in(node, stranger, username, "wrong password")
        assert answer.status_code == 401 and "用户名或密码错误" in answer.text
    throttled = sign_in(node, stranger, username, PASSWORD)
    assert throttled.status_code == 429 and "分钟后再试" in throttled.text
    assert 0 < int(throttled.headers["Retry-After"]) <= 60
    assert "hrx_portal" not in stranger.cookies
    english = requests.Session()
    english.cookies.set("hrx_lang", "en", path="/portal")
    answer = sign_in(node, english, username, PASSWORD)
    assert answer.status_code == 429 and "try again in 1 minute" in answer.text
    # the patient, already signed in, is not signed out; and every attempt is on record
    assert browser.get(f"{node.base}/portal/consents").url.endswith("/portal/consents")
    auditor = node.session(node.token("auditor", "auditor"))
    bundle = auditor.get(f"{node.fhir}/AuditEvent?subtype=login&_count=1000").json()
    events = [
        e["resource"]
        for e in bundle["entry"]
        if e["resource"]["agent"][0]["who"]["display"] == username
    ]
    outcomes = sorted((e["outcome"], e["outcomeDesc"].split(":")[1].strip()) for e in events)
    assert outcomes == [
        ("0", "signed in with a password"),
        *[("4", "throttled")] * 2,
        *[("4", "wrong password")] * FREE_FAILURES,
    ]
    assert all(e["outcomeDesc"].startswith("portal sign-in: ") for e in events)
    assert PASSWORD not in str(bundle)


def test_a_reset_at_the_desk_voids_the_old_password_tokens_and_sessions(node: Node) -> None:
    patient_id = new_patient(node)
    browser = enroll(node, patient_id)
    username = browser.username  # type: ignore[attr-defined]
    granted = requests.post(
        f"{node.base}/auth/token",
        data={"grant_type": "password", "username": username, "password": PASSWORD},
    )
    assert granted.status_code == 200, granted.text
    token = granted.json()["access_token"]
    assert node.session(token).get(f"{node.fhir}/Patient/{patient_id}").status_code == 200
    # the desk makes a new code: the old password, token and session stop now
    output = hrx("patient", "enroll", "--dir", str(node.directory), "--patient", patient_id)
    assert browser.get(f"{node.base}/portal/consents").url.endswith("/portal/signin")
    assert node.session(token).get(f"{node.fhir}/Patient/{patient_id}").status_code == 401
    assert sign_in(node, requests.Session(), username, PASSWORD).status_code == 401
    assert f"has a portal account, {username}" in output
    code = re.search(r"[A-Z2-9]{4}-[A-Z2-9]{4}-[A-Z2-9]{4}-[A-Z2-9]{4}", output)
    assert code, output
    # a token made meanwhile (by an administrator) stops when the code is used
    between = hrx("token", "issue", "--dir", str(node.directory), "--username", username)
    assert node.session(between.strip()).get(f"{node.fhir}/Patient/{patient_id}").ok
    form = browser.get(f"{node.base}/portal/enroll")
    answer = browser.post(
        f"{node.base}/portal/enroll",
        data={
            "csrf_token": csrf_of(form),
            "code": code.group(0),
            "username": "ignored-for-a-reset",
            "password": "a new password 9",
            "password_again": "a new password 9",
        },
    )
    assert answer.status_code == 200 and answer.url.endswith("done=enrolled"), answer.text[:300]
    assert node.session(between.strip()).get(f"{node.fhir}/Patient/{patient_id}").status_code == 401
    assert sign_in(node, requests.Session(), username, PASSWORD).status_code == 401
    again = requests.Session()
    assert sign_in(node, again, username, "a new password 9").url.endswith("/portal/consents")


def test_signing_out_ends_the_session_on_the_server(node: Node) -> None:
    browser = enroll(node, new_patient(node))
    cookie = browser.cookies["hrx_portal"]
    page = browser.get(f"{node.base}/portal/consents")
    answer = browser.post(f"{node.base}/portal/signout", data={"csrf_token": csrf_of(page)})
    assert answer.url.endswith("/portal/signin?done=out")
    replay = requests.Session()
    replay.cookies.set("hrx_portal", cookie, path="/portal")
    assert replay.get(f"{node.base}/portal/consents").url.endswith("/portal/signin")


def test_session_cookie_flags(node: Node) -> None:
    browser = requests.Session()
    form = browser.get(f"{node.base}/portal/signin")
    assert "default-src 'none'" in form.headers["Content-Security-Policy"]
    patient = enroll(node, new_patient(node))
    form = patient.get(f"{node.base}/portal/signin")
    answer = patient.post(
        f"{node.base}/portal/signin",
        data={"csrf_token": csrf_of(form), "username": patient.username, "password": PASSWORD},  # type: ignore[attr-defined]
        allow_redirects=False,
    )
    cookie = SimpleCookie(answer.headers["Set-Cookie"])["hrx_portal"]
    assert cookie["httponly"] and cookie["samesite"] == "Lax" and cookie["path"] == "/portal"
    assert not cookie["secure"]  # plain HTTP here; behind TLS it is Secure (next test)


def test_cookies_are_secure_behind_tls(tmp_path: Path) -> None:
    env = {"HRX_SERVER_TRUSTED_PROXIES": "1"}
    with running_node(tmp_path / "hosp-a", env=env) as proxied:
        username = enroll(proxied, new_patient(proxied)).username  # type: ignore[attr-defined]
        browser = requests.Session()
        tls = {"X-Forwarded-Proto": "https"}
        form = browser.get(f"{proxied.base}/portal/signin", headers=tls)
        csrf_cookie = SimpleCookie(form.headers["Set-Cookie"])["hrx_portal_csrf"]
        assert csrf_cookie["secure"] and csrf_cookie["httponly"]
        browser.cookies.set("hrx_portal_csrf", csrf_cookie.value, path="/portal")  # requests keeps
        # Secure cookies to itself over http; a browser would send it over https
        answer = browser.post(
            f"{proxied.base}/portal/signin",
            data={
                "csrf_token": csrf_of(form),
                "username": username,
                "password": PASSWORD,
            },
            headers=tls,
            allow_redirects=False,
        )
        assert answer.status_code == 303
        cookie = SimpleCookie(answer.headers["Set-Cookie"])["hrx_portal"]
        assert cookie["secure"] and cookie["httponly"]


def test_english_on_request_and_every_page_in_both_languages(node: Node) -> None:
    browser = enroll(node, new_patient(node))
    consent_id = consent_ids(grant(node, browser))[0]
    pages = ["/portal/consents", f"/portal/consents/{consent_id}", "/portal/access"]
    for page in pages:
        answer = browser.get(f"{node.base}{page}")
        assert answer.status_code == 200 and 'lang="zh-CN"' in answer.text
    english = browser.get(f"{node.base}/portal/consents?lang=en")
    assert english.url.endswith("/portal/consents") and "My consents" in english.text
    for page in pages:
        answer = browser.get(f"{node.base}{page}")
        assert answer.status_code == 200 and '<html lang="en">' in answer.text, page
    assert "Sign in" in requests.get(f"{node.base}/portal/signin?lang=en").text
    assert browser.get(f"{node.base}/portal/nowhere").status_code == 404


def test_local_reads_show_who_looked(node: Node) -> None:
    patient_id = new_patient(node)
    browser = enroll(node, patient_id)
    doctor = node.session(node.token("dr-wang", "doctor"))
    assert doctor.get(f"{node.fhir}/Patient/{patient_id}").status_code == 200
    page = browser.get(f"{node.base}/portal/access")
    assert page.status_code == 200
    assert "dr-wang" in page.text and "doctor" in page.text
    assert browser.username not in page.text.split("<main>")[1]  # type: ignore[attr-defined]


def test_a_patient_without_the_consortium_identifier_is_told(node: Node) -> None:
    browser = enroll(node, new_patient(node, resident_id=False))
    page = browser.get(f"{node.base}/portal/consents")
    assert page.status_code == 200 and 'id="grant-form"' not in page.text
