"""Who may do what on a node: tokens (missing, expired, forged, wrong audience, of a disabled
user), SMART scopes, roles, the patient compartment through every way in, the password token
endpoint, its throttle and its audit trail."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node.identity.users import set_active
from tests.helpers.fhir import ids, new_patient, observation, outcome
from tests.helpers.nodes import FHIR_JSON, Node, post


@pytest.fixture(scope="module")
def world(node: Node) -> dict[str, Any]:
    """Two patients with results, a report and its provenance, each patient with a user."""
    s = node.session()
    made: dict[str, Any] = {}
    for name in ("alice", "bob"):
        pid = new_patient(node, identifier=f"auth-{name}")
        obs = post(s, f"{node.fhir}/Observation", observation(pid)).json()["id"]
        report = post(
            s,
            f"{node.fhir}/DiagnosticReport",
            {
                "resourceType": "DiagnosticReport",
                "status": "final",
                "code": {"text": "CBC"},
                "subject": {"reference": f"Patient/{pid}"},
                "result": [{"reference": f"Observation/{obs}"}],
            },
        ).json()["id"]
        made[name] = {
            "patient": pid,
            "observation": obs,
            "report": report,
            "token": node.token(f"patient-{name}", "patient", patient=pid),
        }
    # bob's report also cites alice's observation (a mistake a patient must not see through)
    bob_report = s.get(f"{node.fhir}/DiagnosticReport/{made['bob']['report']}").json()
    bob_report["result"].append({"reference": f"Observation/{made['alice']['observation']}"})
    assert (
        s.put(
            f"{node.fhir}/DiagnosticReport/{made['bob']['report']}",
            json=bob_report,
            headers={"Content-Type": FHIR_JSON},
        ).status_code
        == 200
    )
    return made


def test_no_or_bad_token_is_401(node: Node) -> None:
    import requests

    bare = requests.get(f"{node.fhir}/Patient")
    outcome(bare, 401, "bearer token")
    for header in ("Basic abc", "Bearer", "Bearer not.a.token"):
        outcome(requests.get(f"{node.fhir}/Patient", headers={"Authorization": header}), 401)
    forged = jwt.encode(
        {
            "sub": "doctor",
            "scope": "user/*.cruds",
            "role": "doctor",
            "iat": int(time.time()),
            "exp": int(time.time()) + 60,
            "jti": "x",
            "iss": node.fhir,
            "aud": node.fhir,
        },
        Ed25519PrivateKey.generate(),
        algorithm="EdDSA",
    )
    outcome(node.session(forged).get(f"{node.fhir}/Patient"), 401, "not valid")
    expired = node.token("doctor-expiring", "doctor", ttl=1)
    time.sleep(2.1)
    outcome(node.session(expired).get(f"{node.fhir}/Patient"), 401, "expired")
    # the metadata and health endpoints are public
    assert requests.get(f"{node.fhir}/metadata").status_code == 200


def test_disabled_user_loses_access(node: Node) -> None:
    token = node.token("doctor-leaving", "doctor")
    assert node.session(token).get(f"{node.fhir}/Patient").status_code == 200
    set_active(node.database.write_engine, "doctor-leaving", False)
    outcome(node.session(token).get(f"{node.fhir}/Patient"), 401, "disabled")  # at once


def test_scopes_bound_what_a_token_does(node: Node, world: dict[str, Any]) -> None:
    pid = world["alice"]["patient"]
    reader = node.session(node.token("doctor-ro", "doctor", scope="user/Patient.rs"))
    assert reader.get(f"{node.fhir}/Patient/{pid}").status_code == 200
    outcome(reader.get(f"{node.fhir}/Observation?patient={pid}"), 403, "may not search Observation")
    outcome(
        post(reader, f"{node.fhir}/Patient", {"resourceType": "Patient"}), 403, "may not create"
    )
    no_search = node.session(node.token("doctor-r", "doctor", scope="user/*.r"))
    assert no_search.get(f"{node.fhir}/Patient/{pid}").status_code == 200
    outcome(no_search.get(f"{node.fhir}/Patient"), 403)


def test_roles(node: Node, world: dict[str, Any]) -> None:
    pid = world["alice"]["patient"]
    doctor = node.session()
    auditor = node.session(node.token("auditor", "auditor"))
    assert auditor.get(f"{node.fhir}/Patient/{pid}").status_code == 200
    outcome(post(auditor, f"{node.fhir}/Patient", {"resourceType": "Patient"}), 403)
    assert auditor.get(f"{node.fhir}/AuditEvent?_count=1").status_code == 200
    outcome(doctor.get(f"{node.fhir}/AuditEvent"), 403, "AuditEvent")
    outcome(post(doctor, f"{node.fhir}/AuditEvent", {"resourceType": "AuditEvent"}), 403)
    admin = node.session(node.token("admin", "admin"))
    outcome(admin.get(f"{node.fhir}/AuditEvent"), 403)


def test_patient_sees_only_their_compartment(node: Node, world: dict[str, Any]) -> None:
    alice, bob = world["alice"], world["bob"]
    s = node.session(alice["token"])
    assert s.get(f"{node.fhir}/Patient/{alice['patient']}").status_code == 200
    assert s.get(f"{node.fhir}/Observation/{alice['observation']}").status_code == 200
    # read: another patient's resources do not exist for her
    for path in (
        f"Patient/{bob['patient']}",
        f"Observation/{bob['observation']}",
        f"DiagnosticReport/{bob['report']}",
        f"Observation/{bob['observation']}/_history/1",
        f"Observation/{bob['observation']}/_history",
    ):
        outcome(s.get(f"{node.fhir}/{path}"), 404)
    # search: only hers, totals included
    everything = s.get(f"{node.fhir}/Observation").json()
    assert set(ids(everything)) == {alice["observation"]} and everything["total"] == 1
    assert s.get(f"{node.fhir}/Observation?patient={bob['patient']}").json()["total"] == 0
    assert s.get(f"{node.fhir}/Patient").json()["total"] == 1
    # includes do not reach outside: bob's report cites her observation, not the reverse
    bundle = s.get(f"{node.fhir}/DiagnosticReport?_include=DiagnosticReport:result").json()
    assert ids(bundle) == [alice["report"]]
    assert set(ids(bundle, "include")) == {alice["observation"]}
    bob_session = node.session(bob["token"])
    bob_bundle = bob_session.get(
        f"{node.fhir}/DiagnosticReport?_include=DiagnosticReport:result"
    ).json()
    assert alice["observation"] not in ids(bob_bundle, "include")
    assert ids(bob_bundle, "include") == [bob["observation"]]
    # history and $everything
    history = s.get(f"{node.fhir}/Observation/_history").json()
    assert {e["resource"]["id"] for e in history["entry"]} == {alice["observation"]}
    outcome(s.get(f"{node.fhir}/Patient/{bob['patient']}/$everything"), 404)
    mine = s.get(f"{node.fhir}/Patient/{alice['patient']}/$everything").json()
    assert bob["observation"] not in ids(mine) and alice["observation"] in ids(mine)
    # and she writes nothing
    outcome(post(s, f"{node.fhir}/Observation", observation(alice["patient"])), 403)


def test_patient_cannot_hold_user_scopes(node: Node, world: dict[str, Any]) -> None:
    from node.base.errors import UserError

    with pytest.raises(UserError, match="cannot hold user"):
        node.token(
            "patient-greedy", "patient", scope="user/*.rs", patient=world["alice"]["patient"]
        )


def test_token_endpoint_throttle_and_audit(node: Node) -> None:
    import requests

    from node.identity.users import FREE_FAILURES, add_user

    add_user(node.database.write_engine, "dr-pw", "doctor", password="correct horse 1")

    def grant(password: str, **extra: str) -> requests.Response:
        return requests.post(
            f"{node.base}/auth/token",
            data={"grant_type": "password", "username": "dr-pw", "password": password, **extra},
            headers={"User-Agent": "hrx-test-client"},
        )

    ok = grant("correct horse 1")
    assert ok.status_code == 200, ok.text
    token = ok.json()["access_token"]
    assert ok.json()["scope"] == "user/*.cruds"
    assert node.session(token).get(f"{node.fhir}/Patient?_count=1").status_code == 200
    assert grant("correct horse 1", scope="patient/*.rs").status_code == 400  # invalid_scope
    for _ in range(FREE_FAILURES):
        bad = grant("wrong")
        assert bad.status_code == 401 and bad.json()["error"] == "invalid_grant"
    throttled = grant("correct horse 1")
    assert throttled.status_code == 429 and throttled.json()["error"] == "temporarily_unavailable"
    assert 0 < int(throttled.headers["Retry-After"]) <= 60
    # every attempt is an AuditEvent the auditor reads: who, from where, with what, why
    auditor = node.session(node.token("auditor", "auditor"))
    bundle = auditor.get(f"{node.fhir}/AuditEvent?subtype=login&outcome=4&_count=1000").json()
    refused = [
        e["resource"]
        for e in bundle["entry"]
        if e["resource"]["agent"][0]["who"]["display"] == "dr-pw"
    ]
    reasons = sorted(e["outcomeDesc"] for e in refused)
    assert reasons[0] == (
        "POST /auth/token: the password was right, but a doctor cannot hold patient/*.rs: "
        "doctor scopes are user/..."
    )
    assert reasons[1].startswith("POST /auth/token: throttled: ")
    assert reasons[2:] == ["POST /auth/token: wrong password"] * FREE_FAILURES
    assert {e["agent"][0]["network"]["address"] for e in refused} == {"127.0.0.1"}
    assert {e["agent"][1]["who"]["display"] for e in refused} == {"hrx-test-client"}
    token_id = jwt.decode(token, options={"verify_signature": False})["jti"]
    signed_in = auditor.get(f"{node.fhir}/AuditEvent?subtype=login&altid={token_id}").json()
    (event,) = [e["resource"] for e in signed_in["entry"]]
    assert event["agent"][0]["who"]["display"] == "dr-pw"
    assert event["agent"][0]["role"] == [{"text": "doctor"}]
    assert event["outcomeDesc"] == "POST /auth/token: signed in with a password"
    assert "correct horse" not in str(bundle) + str(signed_in)


def test_system_scopes_for_service_accounts(node: Node, world: dict[str, Any]) -> None:
    from node.base.errors import UserError

    service = node.session(node.token("lis-export", "auditor", scope="system/Observation.rs"))
    assert service.get(f"{node.fhir}/Observation?_count=1").status_code == 200
    outcome(service.get(f"{node.fhir}/Patient?_count=1"), 403)
    with pytest.raises(UserError, match="cannot hold system"):
        node.token("doctor-system", "doctor", scope="system/*.rs")


def test_includes_reach_only_readable_types(node: Node, world: dict[str, Any]) -> None:
    s = node.session()
    pid = world["alice"]["patient"]
    post(
        s,
        f"{node.fhir}/Provenance",
        {
            "resourceType": "Provenance",
            "recorded": "2024-01-02T10:00:00+08:00",
            "target": [{"reference": f"Patient/{pid}"}],
            "agent": [{"who": {"reference": f"Patient/{pid}"}}],
        },
    )
    only_provenance = node.session(node.token("dr-prov", "doctor", scope="user/Provenance.rs"))
    bundle = only_provenance.get(
        f"{node.fhir}/Provenance?target=Patient/{pid}&_include=Provenance:target"
    ).json()
    assert ids(bundle) and ids(bundle, "include") == []  # the Patient is not theirs to read
    assert ids(
        s.get(f"{node.fhir}/Provenance?target=Patient/{pid}&_include=Provenance:target").json(),
        "include",
    ) == [pid]
