"""The patient portal as a patient's browser uses it: a form's CSRF token, enrollment with a
code from the desk (``hrx patient enroll``), and signing in."""

from __future__ import annotations

import re
import uuid

import requests

from tests.helpers.nodes import Node, hrx

PASSWORD = "correct horse 42"


def csrf_of(page: requests.Response) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert match, page.text[:500]
    return match.group(1)


def enroll(node: Node, patient_id: str, username: str | None = None) -> requests.Session:
    """A browser-like session of a patient who enrolled with a code and signed in."""
    output = hrx("patient", "enroll", "--dir", str(node.directory), "--patient", patient_id)
    code = re.search(r"[A-Z2-9]{4}-[A-Z2-9]{4}-[A-Z2-9]{4}-[A-Z2-9]{4}", output)
    assert code, output
    browser = requests.Session()
    form = browser.get(f"{node.base}/portal/enroll")
    username = username or f"p{uuid.uuid4().hex[:10]}"
    answer = browser.post(
        f"{node.base}/portal/enroll",
        data={
            "csrf_token": csrf_of(form),
            "code": code.group(0).lower(),  # codes are read out loud: case and dashes do not matter
            "username": username,
            "password": PASSWORD,
            "password_again": PASSWORD,
        },
    )
    assert answer.status_code == 200 and "/portal/signin" in answer.url, answer.text[:500]
    sign_in(node, browser, username, PASSWORD)
    browser.username = username  # type: ignore[attr-defined]
    return browser


def sign_in(
    node: Node, browser: requests.Session, username: str, password: str
) -> requests.Response:
    form = browser.get(f"{node.base}/portal/signin")
    return browser.post(
        f"{node.base}/portal/signin",
        data={"csrf_token": csrf_of(form), "username": username, "password": password},
    )
