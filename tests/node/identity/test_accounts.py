"""Accounts over real node processes, on both engines: ``hrx user disable|enable|remove|
reset-password`` and ``hrx token revoke`` refused by every gunicorn worker from the next
request on; guesses in flight held to the throttle's limit; an attacker's guesses elsewhere
not holding up the owner at their usual address; every sign-in an AuditEvent."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from node.identity.users import FREE_ADDRESS_FAILURES, FREE_FAILURES
from tests.helpers.databases import postgres_database
from tests.helpers.nodes import FHIR_JSON, Node, invoke, running_node

WORKERS = 3
PASSWORD = "correct horse 77"


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def workers(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Node]:
    """A node under gunicorn with several worker processes, behind one trusted proxy (so that
    X-Forwarded-For stands for the client's address)."""
    directory = tmp_path_factory.mktemp("accounts") / "hosp-a"
    env = {"HRX_SERVER_TRUSTED_PROXIES": "1"}
    if request.param == "sqlite":
        with running_node(directory, gunicorn_workers=WORKERS, env=env) as node:
            yield node
    else:
        with (
            postgres_database() as url,
            running_node(directory, url, gunicorn_workers=WORKERS, env=env) as node,
        ):
            yield node


def hrx(node: Node, *args: str, stdin: str | None = None) -> str:
    """``hrx ARGS --dir NODE`` (in this process); its output, which must be a success."""
    result = invoke(*args, "--dir", str(node.directory), stdin=stdin)
    assert result.exit_code == 0, result.output
    return str(result.output)


def add_user(node: Node, username: str, role: str = "doctor") -> None:
    hrx(node, "user", "add", "--username", username, "--role", role, "--password-stdin",
        stdin=PASSWORD + "\n")  # fmt: skip


def issued_token(node: Node, username: str) -> str:
    return hrx(node, "token", "issue", "--username", username).strip()


def served_by(node: Node, request_ids: set[str]) -> set[int]:
    """The worker processes that logged these requests (the node's JSON access lines)."""
    pids = set()
    for line in (node.directory / "server.log").read_text(errors="replace").splitlines():
        if line.startswith("{") and '"request_id"' in line:
            entry = json.loads(line)
            if entry.get("request_id") in request_ids:
                pids.add(entry["pid"])
    return pids


def from_every_worker(node: Node, send: Callable[[str], requests.Response]) -> list[int]:
    """Send the request again and again, a few at once, until every worker has answered it;
    the statuses of all the answers."""
    statuses: list[int] = []
    request_ids: set[str] = set()
    lock = threading.Lock()

    def one() -> None:
        request_id = uuid.uuid4().hex
        status = send(request_id).status_code
        with lock:
            statuses.append(status)
            request_ids.add(request_id)

    for _ in range(40):
        threads = [threading.Thread(target=one) for _ in range(2 * WORKERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if len(served_by(node, request_ids)) == WORKERS:
            return statuses
        time.sleep(0.05)  # (the access lines are written as the answers go)
    raise AssertionError(f"only workers {served_by(node, request_ids)} answered")


def fhir_read(node: Node, token: str) -> Callable[[str], requests.Response]:
    def send(request_id: str) -> requests.Response:
        return requests.get(
            f"{node.fhir}/Patient?_count=1",
            headers={
                "Authorization": f"Bearer {token}",
                "Accept": FHIR_JSON,
                "X-Request-ID": request_id,
                "Connection": "close",
            },
        )

    return send


def password_grant(
    node: Node, username: str, password: str, address: str = "198.51.100.1"
) -> requests.Response:
    return requests.post(
        f"{node.base}/auth/token",
        data={"grant_type": "password", "username": username, "password": password},
        headers={"X-Forwarded-For": address},
    )


def sign_ins(node: Node, username: str, at_least: int = 1) -> list[dict[str, Any]]:
    """The sign-in AuditEvents of a username, read through the FHIR API as an auditor (each
    worker stores what it queued within milliseconds: read again until ``at_least`` are)."""
    auditor = node.session(node.token("auditor", "auditor"))
    deadline = time.monotonic() + 30
    while True:
        bundle = auditor.get(f"{node.fhir}/AuditEvent?subtype=login&_count=1000").json()
        events = [entry["resource"] for entry in bundle.get("entry", [])]
        mine = [e for e in events if e["agent"][0]["who"]["display"] == username]
        if len(mine) >= at_least or time.monotonic() > deadline:
            return mine
        time.sleep(0.05)


def test_revocations_hold_at_once_in_every_worker(workers: Node) -> None:
    node = workers
    add_user(node, "dr-li")
    add_user(node, "dr-ma")
    one, other = issued_token(node, "dr-li"), issued_token(node, "dr-li")
    ma = issued_token(node, "dr-ma")
    for token in (one, other, ma):  # every worker has checked (and cached) each token
        assert set(from_every_worker(node, fhir_read(node, token))) == {200}

    import jwt

    one_id = jwt.decode(one, options={"verify_signature": False})["jti"]
    assert f"revoked token {one_id} of dr-li" in hrx(node, "token", "revoke", "--id", one_id)
    assert set(from_every_worker(node, fhir_read(node, one))) == {401}
    assert set(from_every_worker(node, fhir_read(node, other))) == {200}  # only that one

    assert "every token and session of dr-li" in hrx(node, "token", "revoke", "--username", "dr-li")
    assert set(from_every_worker(node, fhir_read(node, other))) == {401}
    fresh = issued_token(node, "dr-li")  # a revocation does not stop new ones
    assert set(from_every_worker(node, fhir_read(node, fresh))) == {200}

    assert "disabled dr-ma" in hrx(node, "user", "disable", "--username", "dr-ma")
    assert set(from_every_worker(node, fhir_read(node, ma))) == {401}
    assert password_grant(node, "dr-ma", PASSWORD).status_code == 401
    hrx(node, "user", "enable", "--username", "dr-ma")
    assert set(from_every_worker(node, fhir_read(node, ma))) == {401}  # void for good
    granted = password_grant(node, "dr-ma", PASSWORD)
    assert granted.status_code == 200, granted.text
    ma = granted.json()["access_token"]
    assert set(from_every_worker(node, fhir_read(node, ma))) == {200}

    # a new password: the tokens had before stop, in every worker
    hrx(node, "user", "reset-password", "--username", "dr-ma", stdin="another password 1\n")
    assert set(from_every_worker(node, fhir_read(node, ma))) == {401}
    assert password_grant(node, "dr-ma", PASSWORD).status_code == 401
    assert password_grant(node, "dr-ma", "another password 1").status_code == 200

    assert "removed doctor dr-li" in hrx(node, "user", "remove", "--username", "dr-li")
    assert set(from_every_worker(node, fhir_read(node, fresh))) == {401}
    again = invoke("user", "add", "--dir", str(node.directory), "--username", "dr-li",
                   "--role", "doctor")  # fmt: skip
    assert again.exit_code == 1 and "never given to anyone else" in again.output
    refused = node.session(fresh).get(f"{node.fhir}/Patient?_count=1")
    assert refused.status_code == 401 and "removed" in refused.text


def test_guesses_in_flight_get_no_more_checks_than_the_limit(workers: Node) -> None:
    node = workers
    add_user(node, "dr-race")
    start = threading.Barrier(20)
    answers: list[int] = []

    def guess(number: int) -> None:
        start.wait()
        answer = password_grant(node, "dr-race", f"wrong guess {number}", "203.0.113.5")
        answers.append(answer.status_code)

    threads = [threading.Thread(target=guess, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60  # the right password, once the limit is reached: when
    while len(answers) < FREE_FAILURES:  # as many answers came back, as many were counted
        assert time.monotonic() < deadline
        time.sleep(0.01)
    right = password_grant(node, "dr-race", PASSWORD, "203.0.113.5")
    for thread in threads:
        thread.join()
    # no more than the limit were checked against the hash; the others waited unchecked
    assert sorted(answers) == [401] * FREE_FAILURES + [429] * (20 - FREE_FAILURES)
    assert right.status_code == 429, right.text
    assert int(right.headers["Retry-After"]) > 0
    assert right.json()["error"] == "temporarily_unavailable"
    # the audit trail: only the first FREE_FAILURES attempts were checked against the hash
    events = sign_ins(node, "dr-race", at_least=21)
    reasons = [e["outcomeDesc"] for e in events]
    assert len(events) == 21 and {e["outcome"] for e in events} == {"4"}
    assert reasons.count("POST /auth/token: wrong password") == FREE_FAILURES
    throttled = [r for r in reasons if r.startswith("POST /auth/token: throttled")]
    assert len(throttled) == 21 - FREE_FAILURES
    assert {e["agent"][0]["network"]["address"] for e in events} == {"203.0.113.5"}
    assert all("wrong guess" not in json.dumps(e) for e in events)  # never the password


def test_an_attacker_elsewhere_does_not_hold_up_the_owner(workers: Node) -> None:
    node = workers
    add_user(node, "dr-zhao")
    home, attacker, new_place = "198.51.100.20", "203.0.113.66", "192.0.2.30"
    assert password_grant(node, "dr-zhao", PASSWORD, home).status_code == 200  # known now
    tried = [password_grant(node, "dr-zhao", f"guess {n}", attacker) for n in range(12)]
    owner = password_grant(node, "dr-zhao", PASSWORD, home)
    assert owner.status_code == 200, owner.text  # the owner, at home, is not held up
    assert [r.status_code for r in tried] == [401] * FREE_FAILURES + [429] * (12 - FREE_FAILURES)
    # the attacker moves from address to address: the account is held from all of them
    for n in range(5):
        moved = password_grant(node, "dr-zhao", f"guess {n}", f"203.0.113.{100 + n}")
        assert moved.status_code == 429
    # the owner, from home, is not held up, even after a typo of their own
    assert password_grant(node, "dr-zhao", "a typo", home).status_code == 401
    owner = password_grant(node, "dr-zhao", PASSWORD, home)
    assert owner.status_code == 200, owner.text
    # from an address the account never signed in from, the owner waits like the attacker
    # (or asks for hrx user unlock)
    assert password_grant(node, "dr-zhao", PASSWORD, new_place).status_code == 429
    assert "lifted" in hrx(node, "user", "unlock", "--username", "dr-zhao")
    assert password_grant(node, "dr-zhao", PASSWORD, new_place).status_code == 200
    events = sign_ins(node, "dr-zhao", at_least=1 + 12 + 1 + 5 + 2 + 1 + 1)
    checked = [e for e in events if e["outcomeDesc"].endswith("wrong password")]
    assert len(checked) == FREE_FAILURES + 1  # the attacker's few, and the owner's typo
    signed_in = [e for e in events if e["outcome"] == "0"]
    assert [e["agent"][0]["network"]["address"] for e in signed_in].count(home) == 3
    assert all(e["agent"][0]["role"] == [{"text": "doctor"}] for e in signed_in)


def test_one_address_against_many_accounts(workers: Node) -> None:
    node = workers
    sprayer = "203.0.113.200"
    answers = [
        password_grant(node, f"someone{n}", "password1", sprayer).status_code
        for n in range(FREE_ADDRESS_FAILURES + 3)
    ]
    assert answers == [401] * FREE_ADDRESS_FAILURES + [429] * 3
    add_user(node, "dr-qian")  # a real user elsewhere signs in as ever
    assert password_grant(node, "dr-qian", PASSWORD, "198.51.100.99").status_code == 200


def test_the_clinic_pages_sign_in_the_same_way(workers: Node) -> None:
    import re

    node = workers
    add_user(node, "dr-sun")
    patient_id = node.session().post(
        f"{node.fhir}/Patient", json={"resourceType": "Patient"},
        headers={"Content-Type": FHIR_JSON},
    ).json()["id"]  # fmt: skip
    hrx(node, "user", "add", "--username", "pt-sun", "--role", "patient", "--patient", patient_id,
        "--password-stdin", stdin=PASSWORD + "\n")  # fmt: skip
    browser = requests.Session()
    browser.headers["X-Forwarded-For"] = "203.0.113.88"

    def sign_in(username: str, password: str) -> requests.Response:
        form = browser.get(f"{node.base}/clinic/signin")
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
        assert csrf, form.text[:300]
        return browser.post(
            f"{node.base}/clinic/signin",
            data={"csrf_token": csrf.group(1), "username": username, "password": password},
        )

    patient = sign_in("pt-sun", PASSWORD)  # right password, but no doctor
    assert patient.status_code == 401 and "用户名或密码错误" in patient.text
    for n in range(FREE_FAILURES):
        assert sign_in("dr-sun", f"guess {n}").status_code == 401
    throttled = sign_in("dr-sun", PASSWORD)
    assert throttled.status_code == 429 and "分钟后再试" in throttled.text
    assert int(throttled.headers["Retry-After"]) > 0
    assert "lifted" in hrx(node, "user", "unlock", "--username", "dr-sun")
    signed_in = sign_in("dr-sun", PASSWORD)
    assert signed_in.status_code == 200 and signed_in.url.endswith("/clinic/"), signed_in.url
    events = sign_ins(node, "dr-sun", at_least=FREE_FAILURES + 2)
    assert sorted(e["outcomeDesc"].split(":")[1].strip() for e in events) == [
        "signed in with a password",
        "throttled",
        *["wrong password"] * FREE_FAILURES,
    ]
    assert all(e["outcomeDesc"].startswith("clinic sign-in: ") for e in events)
    (refused,) = sign_ins(node, "pt-sun")
    assert refused["outcome"] == "4"
    assert refused["outcomeDesc"] == (
        "clinic sign-in: the password was right, but a patient cannot sign in here"
    )
