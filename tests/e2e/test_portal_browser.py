"""The patient portal in a real headless Chromium (Debian's package, driven by Playwright),
with JavaScript off and a phone-sized screen: enroll, sign in, grant, see an access appear,
revoke, download a receipt and verify it, switch to English, sign out."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from consent.pseudonym import RESIDENT_ID_SYSTEM
from ledger import keys
from ledger.canonical import parse_json
from ledger.receipt import verify_receipt
from tests.helpers.nodes import Node, hrx, post, running_node

pytestmark = pytest.mark.slow

PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def portal_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    with running_node(tmp_path_factory.mktemp("browser") / "hosp-a") as node:
        yield node


def test_a_patient_uses_the_portal_in_a_browser(
    portal_node: Node, browser: object, tmp_path: Path
) -> None:
    from playwright.sync_api import Browser, expect

    assert isinstance(browser, Browser)
    node = portal_node
    resident_id = "3301" + str(uuid.uuid4().int)[:14]
    created = post(
        node.session(),
        f"{node.fhir}/Patient",
        {
            "resourceType": "Patient",
            "name": [{"family": "王", "given": ["小明"]}],
            "identifier": [{"system": RESIDENT_ID_SYSTEM, "value": resident_id}],
        },
    )
    patient_id = created.json()["id"]
    output = hrx("patient", "enroll", "--dir", str(node.directory), "--patient", patient_id)
    code = re.search(r"[A-Z2-9]{4}(?:-[A-Z2-9]{4}){3}", output)
    assert code, output

    context = browser.new_context(
        java_script_enabled=False, viewport=PHONE, accept_downloads=True, locale="zh-CN"
    )
    page = context.new_page()
    try:
        # enroll with the code, then sign in
        page.goto(f"{node.base}/portal/")
        expect(page.locator("h1")).to_have_text("登录")
        page.click("#enroll-link")
        page.fill("input[name=code]", code.group(0))
        page.fill("input[name=username]", "wang.xiaoming")
        page.fill("input[name=password]", "安全的密码 2026")
        page.fill("input[name=password_again]", "安全的密码 2026")
        page.click("#enroll")
        expect(page.locator(".notice")).to_contain_text("账户已开通")
        page.fill("input[name=username]", "wang.xiaoming")
        page.fill("input[name=password]", "安全的密码 2026")
        page.click("#sign-in")
        expect(page.locator("h1")).to_have_text("我的授权")
        expect(page.locator("#no-consents")).to_be_visible()
        # a phone screen: nothing wider than the viewport
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]

        # grant every member laboratory results and imaging for treatment
        page.check("input[name=grantee][value='*']")
        page.fill("input[name=start]", "2026-01-01")
        page.click("#grant")
        expect(page.locator(".notice")).to_contain_text("已记入医联体账本")
        card = page.locator("section.consent").first
        expect(card).to_contain_text("医联体内所有医院")
        expect(card).to_contain_text("检验结果")
        expect(card).to_contain_text("有效")

        # a doctor reads the patient's record: the access appears
        doctor = node.session(node.token("dr-zhao", "doctor"))
        assert doctor.get(f"{node.fhir}/Patient/{patient_id}").status_code == 200
        page.click("#nav-access")
        expect(page.locator("table.reads")).to_contain_text("dr-zhao")

        # revoke
        page.click("#nav-consents")
        page.click("button.revoke")
        expect(page.locator(".notice")).to_contain_text("授权已撤销")
        expect(page.locator("section.consent").first).to_contain_text("已撤销")

        # download a receipt and verify it offline
        links = page.locator("a.receipt")
        expect(links).to_have_count(2)  # granted, revoked
        with page.expect_download() as waiting:
            links.nth(1).click()
        path = tmp_path / "receipt.json"
        waiting.value.save_as(path)
        authority = keys.load_private_key(node.directory.parent / "hosp-a-authority.pem")
        summary = verify_receipt(parse_json(path.read_bytes()), authority.public_key())
        assert summary.entry_type == "consent.revoked"
        verdict = hrx("audit", "receipt", str(path), "--authority", keys.public_key_text(authority))
        assert "VALID" in verdict

        # English, then sign out
        page.click("#switch-language")
        expect(page.locator("h1")).to_have_text("My consents")
        assert page.get_attribute("html", "lang") == "en"
        page.click("#sign-out")
        expect(page.locator(".notice")).to_contain_text("You have signed out")
        page.goto(f"{node.base}/portal/consents")
        expect(page.locator("h1")).to_have_text("Sign in")
    finally:
        context.close()
