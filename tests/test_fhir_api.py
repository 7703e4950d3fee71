"""The FHIR REST API of a real node process, over HTTP, on SQLite and PostgreSQL: every
interaction, its headers and its errors."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from tests.nodes import FHIR_JSON, Node, post


def patient(
    family: str = "张", identifier: str = "330102198001020011", **extra: Any
) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:oid:2.16.156.10011.1.1", "value": identifier}],
        "name": [{"family": family, "given": ["三"]}],
        "gender": "male",
        "birthDate": "1980-01-02",
        **extra,
    }


def test_create_read_and_headers(node: Node) -> None:
    s = node.session()
    created = post(s, f"{node.fhir}/Patient", patient())
    assert created.status_code == 201, created.text
    assert created.headers["Content-Type"].startswith(FHIR_JSON)
    body = created.json()
    assert body["meta"]["versionId"] == "1"
    assert created.headers["ETag"] == 'W/"1"'
    assert created.headers["Location"] == f"{node.fhir}/Patient/{body['id']}/_history/1"
    read = s.get(f"{node.fhir}/Patient/{body['id']}")
    assert read.status_code == 200
    assert read.content == created.content
    assert read.headers["ETag"] == 'W/"1"' and "Last-Modified" in read.headers


def observation(
    patient_id: str,
    code: str = "718-7",
    when: str = "2024-01-02T10:00:00+08:00",
    value: str = "13.50",  # a decimal, written digit for digit
    **extra: Any,
) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "laboratory",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": when,
        "valueQuantity": {
            "value": Decimal(value),
            "unit": "g/dL",
            "system": "http://unitsofmeasure.org",
            "code": "g/dL",
        },
        **extra,
    }


def raw_post(node: Node, path: str, text: str, token: str | None = None) -> Any:
    s = node.session(token)
    return s.post(f"{node.fhir}/{path}", data=text.encode(), headers={"Content-Type": FHIR_JSON})


def new_patient(node: Node, **extra: Any) -> str:
    response = post(node.session(), f"{node.fhir}/Patient", patient(**extra))
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def outcome(response: Any, status: int, text: str = "") -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["Content-Type"].startswith(FHIR_JSON)
    body: dict[str, Any] = response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert text in response.text, response.text
    return body


def test_decimal_precision_and_unicode_kept(node: Node) -> None:
    pid = new_patient(node, family="欧阳")
    text = (
        '{"resourceType":"Observation","status":"final","code":{"text":"血红蛋白"},'
        f'"subject":{{"reference":"Patient/{pid}"}},'
        '"valueQuantity":{"value":13.50,"unit":"g/dL"}}'
    )
    created = raw_post(node, "Observation", text)
    assert created.status_code == 201, created.text
    assert b'"value":13.50' in created.content and "血红蛋白".encode() in created.content


def test_update_versions_if_match_and_history(node: Node) -> None:
    s = node.session()
    pid = new_patient(node)
    body = s.get(f"{node.fhir}/Patient/{pid}").json()
    body["gender"] = "female"
    headers = {"Content-Type": FHIR_JSON, "If-Match": 'W/"1"'}
    updated = s.put(f"{node.fhir}/Patient/{pid}", json=body, headers=headers)
    assert updated.status_code == 200 and updated.json()["meta"]["versionId"] == "2"
    stale = s.put(f"{node.fhir}/Patient/{pid}", json=body, headers=headers)
    outcome(stale, 412, "version 2")
    assert s.get(f"{node.fhir}/Patient/{pid}/_history/1").json()["gender"] == "male"
    assert s.get(f"{node.fhir}/Patient/{pid}/_history/2").json()["gender"] == "female"
    outcome(s.get(f"{node.fhir}/Patient/{pid}/_history/3"), 404)
    history = s.get(f"{node.fhir}/Patient/{pid}/_history").json()
    assert history["type"] == "history" and history["total"] == 2
    assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == ["2", "1"]
    assert [e["request"]["method"] for e in history["entry"]] == ["PUT", "POST"]
    paged = s.get(f"{node.fhir}/Patient/{pid}/_history?_count=1").json()
    second = s.get(next(x["url"] for x in paged["link"] if x["relation"] == "next")).json()
    assert second["type"] == "history" and second["entry"][0]["request"]["method"] == "POST"
    # the id in the body must be the URL's
    body["id"] = "other"
    outcome(
        s.put(f"{node.fhir}/Patient/{pid}", json=body, headers={"Content-Type": FHIR_JSON}),
        400,
        "is not the URL's",
    )


def test_update_as_create_with_client_id(node: Node) -> None:
    s = node.session()
    body = patient(identifier="client-id-1")
    body["id"] = "pat-client-1"
    created = s.put(
        f"{node.fhir}/Patient/pat-client-1", json=body, headers={"Content-Type": FHIR_JSON}
    )
    assert created.status_code == 201, created.text
    assert s.get(f"{node.fhir}/Patient/pat-client-1").json()["id"] == "pat-client-1"


def test_prefer_return(node: Node) -> None:
    s = node.session()
    minimal = post(s, f"{node.fhir}/Patient", patient(), Prefer="return=minimal")
    assert minimal.status_code == 201 and minimal.content == b"" and minimal.headers["Location"]
    oo = post(s, f"{node.fhir}/Patient", patient(), Prefer="return=OperationOutcome")
    assert oo.json()["resourceType"] == "OperationOutcome"


def test_conditional_create(node: Node) -> None:
    s = node.session()
    condition = "identifier=urn:oid:2.16.156.10011.1.1|cond-create-1"
    first = post(
        s,
        f"{node.fhir}/Patient",
        patient(identifier="cond-create-1"),
        **{"If-None-Exist": condition},
    )
    assert first.status_code == 201
    again = post(
        s,
        f"{node.fhir}/Patient",
        patient(identifier="cond-create-1"),
        **{"If-None-Exist": condition},
    )
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    post(s, f"{node.fhir}/Patient", patient(identifier="cond-create-1"))  # a duplicate
    outcome(
        post(
            s,
            f"{node.fhir}/Patient",
            patient(identifier="cond-create-1"),
            **{"If-None-Exist": condition},
        ),
        412,
        "more than one",
    )


def test_delete_gone_and_referential_integrity(node: Node) -> None:
    s = node.session()
    pid = new_patient(node)
    obs = post(s, f"{node.fhir}/Observation", observation(pid)).json()
    outcome(s.delete(f"{node.fhir}/Patient/{pid}"), 409, f"Observation/{obs['id']}")
    assert s.delete(f"{node.fhir}/Observation/{obs['id']}").status_code == 204
    outcome(s.get(f"{node.fhir}/Observation/{obs['id']}"), 410)
    assert s.delete(f"{node.fhir}/Observation/{obs['id']}").status_code == 204  # idempotent
    history = s.get(f"{node.fhir}/Observation/{obs['id']}/_history").json()
    assert [e["request"]["method"] for e in history["entry"]] == ["DELETE", "POST"]
    assert "resource" not in history["entry"][0]
    assert s.delete(f"{node.fhir}/Patient/{pid}").status_code == 204
    outcome(s.delete(f"{node.fhir}/Patient/never-was"), 404)
    # writing a reference to a deleted or unknown resource
    outcome(post(s, f"{node.fhir}/Observation", observation(pid)), 422, "does not exist")
    bad = observation("x")
    bad["subject"] = {"reference": "Encounter/1"}
    outcome(post(s, f"{node.fhir}/Observation", bad), 422, "does not host Encounter")


def test_validation_errors_are_operation_outcomes(node: Node) -> None:
    s = node.session()
    pid = new_patient(node)
    wrong = observation(pid, status="bogus")
    wrong["status"] = "bogus"
    body = outcome(post(s, f"{node.fhir}/Observation", wrong), 400, "'bogus' is not one of")
    assert body["issue"][0]["expression"] == ["Observation.status"]
    unknown = observation(pid)
    unknown["colour"] = "red"
    outcome(post(s, f"{node.fhir}/Observation", unknown), 400, "Observation.colour: unknown")
    missing = observation(pid)
    del missing["code"]
    outcome(post(s, f"{node.fhir}/Observation", missing), 400, "required element missing")
    outcome(raw_post(node, "Patient", '{"resourceType":"Patient","gender":null}'), 400, "null")
    outcome(raw_post(node, "Patient", '{"resourceType":"Patient","a":1,"a":2}'), 400, "twice")
    outcome(raw_post(node, "Patient", "{not json"), 400, "not JSON")
    outcome(raw_post(node, "Patient", '{"resourceType":"Observation"}'), 400, "URL names")
    outcome(
        s.post(
            f"{node.fhir}/Patient",
            data=b"<Patient/>",
            headers={"Content-Type": "application/fhir+xml"},
        ),
        415,
    )
    outcome(s.get(f"{node.fhir}/Patient?_format=xml"), 406)
    outcome(s.get(f"{node.fhir}/Patient", headers={"Accept": "application/fhir+xml"}), 406)
    outcome(s.get(f"{node.fhir}/Encounter/1"), 404, "does not host")
    outcome(s.patch(f"{node.fhir}/Patient/{pid}", json={}), 405)
    outcome(s.get(f"{node.fhir}/nothing-here"), 404)
    # search parameters on a create would be silently ignored: refused instead
    outcome(post(s, f"{node.fhir}/Patient?identifier=x", patient()), 400, "If-None-Exist")
    assert s.get(f"{node.fhir}/Patient?_format=json").status_code == 200


def test_if_none_match_gives_304(node: Node) -> None:
    s = node.session()
    pid = new_patient(node)
    assert (
        s.get(f"{node.fhir}/Patient/{pid}", headers={"If-None-Match": 'W/"1"'}).status_code == 304
    )
    assert (
        s.get(f"{node.fhir}/Patient/{pid}", headers={"If-None-Match": 'W/"9"'}).status_code == 200
    )


def test_capability_statement_lists_what_is_served(node: Node) -> None:
    statement = node.session().get(f"{node.fhir}/metadata").json()
    assert (
        statement["resourceType"] == "CapabilityStatement" and statement["fhirVersion"] == "4.0.1"
    )
    resources = {r["type"]: r for r in statement["rest"][0]["resource"]}
    assert set(resources) == {
        "Patient",
        "Practitioner",
        "Organization",
        "Observation",
        "DiagnosticReport",
        "ImagingStudy",
        "ServiceRequest",
        "Consent",
        "AuditEvent",
        "Provenance",
    }
    observation_params = {p["name"] for p in resources["Observation"]["searchParam"]}
    assert {"_id", "_lastUpdated", "patient", "code", "date", "category", "status"} <= (
        observation_params
    )
    assert "DiagnosticReport:result" in resources["DiagnosticReport"]["searchInclude"]
    assert "Provenance:target" in resources["Observation"]["searchRevInclude"]
    assert "create" not in {i["code"] for i in resources["AuditEvent"]["interaction"]}
    # every advertised parameter is accepted by the server
    s = node.session()
    for resource_type, entry in resources.items():
        if resource_type == "AuditEvent":
            continue
        for param in entry["searchParam"]:
            value = {"token": "x", "string": "x", "date": "2024", "reference": "x"}[param["type"]]
            response = s.get(f"{node.fhir}/{resource_type}", params={param["name"]: value})
            assert response.status_code == 200, (resource_type, param, response.text)


def ids(bundle: dict[str, Any], mode: str = "match") -> list[str]:
    return [
        e["resource"]["id"]
        for e in bundle.get("entry", [])
        if e.get("search", {}).get("mode") == mode
    ]


def test_search_by_token_reference_and_date(node: Node) -> None:
    s = node.session()
    pid = new_patient(node, identifier="search-1")
    other = new_patient(node, identifier="search-2")
    made = {}
    for code, when in [
        ("718-7", "2024-01-02T10:00:00+08:00"),
        ("2345-7", "2024-02-10"),
        ("718-7", "2024-03-05T23:30:00Z"),
    ]:
        made[(code, when)] = post(
            s, f"{node.fhir}/Observation", observation(pid, code, when)
        ).json()["id"]
    post(s, f"{node.fhir}/Observation", observation(other, "718-7", "2024-01-02"))

    def found(query: str) -> set[str]:
        response = s.get(f"{node.fhir}/Observation?patient={pid}&{query}")
        assert response.status_code == 200, response.text
        bundle = response.json()
        assert bundle["total"] == len(ids(bundle))
        return set(ids(bundle))

    hb = {made[("718-7", "2024-01-02T10:00:00+08:00")], made[("718-7", "2024-03-05T23:30:00Z")]}
    assert found("code=http://loinc.org|718-7") == hb
    assert found("code=718-7") == hb
    assert found("code=http://other|718-7") == set()
    assert found("code=http://loinc.org|") == set(made.values())
    assert found("code=718-7,2345-7") == set(made.values())
    assert found("code:not=718-7") == {made[("2345-7", "2024-02-10")]}
    assert found("category=laboratory") == set(made.values())
    assert found("status=final") == set(made.values())
    # dates: the day 2024-03-05 in UTC+8 runs from 03-04T16:00Z to 03-05T16:00Z
    assert found("date=2024-01-02") == {made[("718-7", "2024-01-02T10:00:00+08:00")]}
    assert found("date=2024-03-06") == {made[("718-7", "2024-03-05T23:30:00Z")]}
    assert found("date=2024-02") == {made[("2345-7", "2024-02-10")]}
    assert found("date=ge2024-02-10") == {
        made[("2345-7", "2024-02-10")],
        made[("718-7", "2024-03-05T23:30:00Z")],
    }
    assert found("date=gt2024-02-10") == {made[("718-7", "2024-03-05T23:30:00Z")]}
    assert found("date=lt2024-02-10") == {made[("718-7", "2024-01-02T10:00:00+08:00")]}
    assert found("date=le2024-02-10") == {
        made[("718-7", "2024-01-02T10:00:00+08:00")],
        made[("2345-7", "2024-02-10")],
    }
    assert found("date=ne2024-02-10") == hb
    assert found("date=ge2024-01-01&date=lt2024-03-01") == {
        made[("718-7", "2024-01-02T10:00:00+08:00")],
        made[("2345-7", "2024-02-10")],
    }
    assert found("subject=Patient/" + pid + "&code=2345-7") == {made[("2345-7", "2024-02-10")]}
    assert found(f"_id={made[('2345-7', '2024-02-10')]}") == {made[("2345-7", "2024-02-10")]}
    outcome(s.get(f"{node.fhir}/Observation?date=ap2024"), 400, "prefix")
    outcome(s.get(f"{node.fhir}/Observation?date=2024-13"), 400)
    outcome(s.get(f"{node.fhir}/Observation?code:below=x"), 400, "modifier")


def test_search_strings_identifier_and_missing(node: Node) -> None:
    s = node.session()
    pid = new_patient(node, family="Müller", identifier="string-1")
    assert pid in ids(s.get(f"{node.fhir}/Patient?family=muller").json())
    assert pid in ids(s.get(f"{node.fhir}/Patient?name=MÜL").json())
    assert pid not in ids(s.get(f"{node.fhir}/Patient?family:exact=mul").json())
    assert pid in ids(s.get(f"{node.fhir}/Patient?family:contains=ülle").json())
    assert ids(
        s.get(f"{node.fhir}/Patient?identifier=urn:oid:2.16.156.10011.1.1|string-1").json()
    ) == [pid]
    assert pid not in ids(s.get(f"{node.fhir}/Patient?birthdate:missing=true").json())
    assert pid in ids(s.get(f"{node.fhir}/Patient?birthdate:missing=false").json())
    assert pid in ids(s.get(f"{node.fhir}/Patient?birthdate=1980").json())


def test_search_unknown_parameter_strict_and_lenient(node: Node) -> None:
    s = node.session()
    outcome(s.get(f"{node.fhir}/Patient?colour=red"), 400, "unknown search parameter")
    lenient = s.get(
        f"{node.fhir}/Patient?colour=red&_count=1", headers={"Prefer": "handling=lenient"}
    )
    assert lenient.status_code == 200
    bundle = lenient.json()
    assert "colour" not in bundle["link"][0]["url"]
    assert bundle["entry"][-1]["search"]["mode"] == "outcome"


def test_paging_is_stable_and_total_exact(node: Node) -> None:
    s = node.session()
    pid = new_patient(node, identifier="paging-1")
    made = [
        post(
            s, f"{node.fhir}/Observation", observation(pid, "2345-7", f"2023-05-{day:02d}")
        ).json()["id"]
        for day in range(1, 26)
    ]
    first = s.get(f"{node.fhir}/Observation?patient={pid}&_count=10&_sort=date").json()
    assert first["total"] == 25
    seen = ids(first)
    assert seen == made[:10]
    # a change meanwhile moves nothing between pages
    post(s, f"{node.fhir}/Observation", observation(pid, "2345-7", "2023-04-30"))
    link = {x["relation"]: x["url"] for x in first["link"]}
    while "next" in link:
        page = s.get(link["next"]).json()
        assert page["total"] == 25
        seen += ids(page)
        link = {x["relation"]: x["url"] for x in page["link"]}
    assert seen == made
    assert "previous" in link
    # newest first
    descending = s.get(f"{node.fhir}/Observation?patient={pid}&_sort=-date&_count=3").json()
    assert ids(descending) == list(reversed(made))[:3]
    assert "total" not in s.get(f"{node.fhir}/Observation?patient={pid}&_total=none").json()
    count_only = s.get(f"{node.fhir}/Observation?patient={pid}&_summary=count").json()
    assert count_only["total"] == 26 and "entry" not in count_only
    # a page belongs to whoever searched
    other = node.session(node.token("auditor-paging", "auditor"))
    outcome(other.get(link["first"]), 404, "not yours")


def test_include_and_revinclude(node: Node) -> None:
    s = node.session()
    pid = new_patient(node, identifier="include-1")
    results = [
        post(s, f"{node.fhir}/Observation", observation(pid, code)).json()["id"]
        for code in ("718-7", "789-8")
    ]
    report = post(
        s,
        f"{node.fhir}/DiagnosticReport",
        {
            "resourceType": "DiagnosticReport",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "58410-2"}]},
            "subject": {"reference": f"Patient/{pid}"},
            "result": [{"reference": f"Observation/{i}"} for i in results],
        },
    ).json()
    provenance = post(
        s,
        f"{node.fhir}/Provenance",
        {
            "resourceType": "Provenance",
            "recorded": "2024-01-02T10:00:00+08:00",
            "target": [{"reference": f"DiagnosticReport/{report['id']}"}],
            "agent": [{"who": {"reference": f"Patient/{pid}"}}],
        },
    ).json()
    bundle = s.get(
        f"{node.fhir}/DiagnosticReport?patient={pid}"
        "&_include=DiagnosticReport:result&_revinclude=Provenance:target"
    ).json()
    assert ids(bundle) == [report["id"]]
    assert set(ids(bundle, "include")) == {*results, provenance["id"]}
    assert bundle["total"] == 1
    outcome(s.get(f"{node.fhir}/DiagnosticReport?_include=Observation:patient"), 400)


def test_everything(node: Node) -> None:
    s = node.session()
    pid = new_patient(node, identifier="everything-1")
    practitioner = post(
        s,
        f"{node.fhir}/Practitioner",
        {"resourceType": "Practitioner", "name": [{"family": "王", "given": ["医生"]}]},
    ).json()
    obs = post(
        s,
        f"{node.fhir}/Observation",
        observation(pid, performer=[{"reference": f"Practitioner/{practitioner['id']}"}]),
    ).json()
    other = new_patient(node, identifier="everything-2")
    post(s, f"{node.fhir}/Observation", observation(other))
    bundle = s.get(f"{node.fhir}/Patient/{pid}/$everything").json()
    assert ids(bundle)[0] == pid
    assert set(ids(bundle)) == {pid, obs["id"], practitioner["id"]}
    outcome(s.get(f"{node.fhir}/Patient/nobody/$everything"), 404)


def test_transaction_all_or_nothing(node: Node) -> None:
    s = node.session()
    full_url = "urn:uuid:6f1a7c44-5b0e-4d0a-9c1e-2f1f7f0a0a01"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "request": {"method": "POST", "url": "Observation"},
                "resource": observation("placeholder") | {"subject": {"reference": full_url}},
            },
            {
                "fullUrl": full_url,
                "request": {"method": "POST", "url": "Patient"},
                "resource": patient(identifier="tx-1"),
            },
        ],
    }
    response = post(s, node.fhir, bundle)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["type"] == "transaction-response"
    assert [e["response"]["status"] for e in result["entry"]] == ["201 Created"] * 2
    patient_id = result["entry"][1]["resource"]["id"]
    assert result["entry"][0]["resource"]["subject"]["reference"] == f"Patient/{patient_id}"
    # one bad entry: nothing of the bundle stays
    bad = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "request": {"method": "POST", "url": "Patient"},
                "resource": patient(identifier="tx-2"),
            },
            {
                "request": {"method": "POST", "url": "Observation"},
                "resource": observation(patient_id) | {"status": "bogus"},
            },
        ],
    }
    body = outcome(post(s, node.fhir, bad), 400, "Bundle.entry[1]")
    assert body["issue"][0]["expression"] == ["Bundle.entry[1].resource.status"]
    assert s.get(f"{node.fhir}/Patient?identifier=tx-2").json()["total"] == 0


def test_batch_entries_stand_alone(node: Node) -> None:
    s = node.session()
    pid = new_patient(node, identifier="batch-1")
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "POST", "url": "Observation"}, "resource": observation(pid)},
            {
                "request": {"method": "POST", "url": "Observation"},
                "resource": observation(pid) | {"status": "bogus"},
            },
            {"request": {"method": "GET", "url": f"Patient/{pid}"}},
            {"request": {"method": "GET", "url": f"Observation?patient={pid}"}},
        ],
    }
    result = post(s, node.fhir, bundle).json()
    assert result["type"] == "batch-response"
    statuses = [e["response"]["status"].split()[0] for e in result["entry"]]
    assert statuses == ["201", "400", "200", "200"]
    assert result["entry"][1]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert result["entry"][3]["resource"]["total"] == 1


def test_transaction_reference_to_a_conditional_create_that_matches(node: Node) -> None:
    s = node.session()
    pid = new_patient(node, identifier="tx-cond-1")
    full_url = "urn:uuid:0d4a3c1e-1111-4a5b-9c1e-2f1f7f0a0a09"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {  # refers to the entry below, which matches an existing patient
                "request": {"method": "POST", "url": "Observation"},
                "resource": observation("placeholder") | {"subject": {"reference": full_url}},
            },
            {
                "fullUrl": full_url,
                "request": {
                    "method": "POST",
                    "url": "Patient",
                    "ifNoneExist": "identifier=urn:oid:2.16.156.10011.1.1|tx-cond-1",
                },
                "resource": patient(identifier="tx-cond-1"),
            },
        ],
    }
    result = post(s, node.fhir, bundle)
    assert result.status_code == 200, result.text
    entries = result.json()["entry"]
    assert entries[1]["response"]["status"] == "200 OK" and entries[1]["resource"]["id"] == pid
    assert entries[0]["resource"]["subject"]["reference"] == f"Patient/{pid}"
