"""The FHIR REST API of a real node process, over HTTP, on SQLite and PostgreSQL: every
interaction, its headers and its errors."""

from __future__ import annotations

import json
import uuid
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

from fhir_adapters.store.resources import RESOURCE_TYPES
from node.base.config import load_config
from tests.helpers.fhir import ids, new_patient, observation, outcome, patient
from tests.helpers.nodes import FHIR_JSON, Node, post


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


def raw_post(node: Node, path: str, text: str, token: str | None = None) -> Any:
    s = node.session(token)
    return s.post(f"{node.fhir}/{path}", data=text.encode(), headers={"Content-Type": FHIR_JSON})


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
    assert "Content-Type" not in minimal.headers  # no body: nothing to name (was text/html)
    oo = post(s, f"{node.fhir}/Patient", patient(), Prefer="return=OperationOutcome")
    assert oo.json()["resourceType"] == "OperationOutcome"


def test_prefer_return_in_transactions_and_batches(node: Node) -> None:
    """Prefer applies to every entry of a transaction or batch as to a write sent alone:
    the resource (default), nothing, or an OperationOutcome in response.outcome."""
    s = node.session()
    for kind in ("transaction", "batch"):
        bundle = {
            "resourceType": "Bundle",
            "type": kind,
            "entry": [{"resource": patient(), "request": {"method": "POST", "url": "Patient"}}],
        }
        answers = {
            prefer: post(s, node.fhir, bundle, Prefer=f"return={prefer}").json()["entry"][0]
            for prefer in ("representation", "minimal", "OperationOutcome")
        }
        assert answers["representation"]["resource"]["resourceType"] == "Patient"
        assert "resource" not in answers["minimal"] and "outcome" not in answers["minimal"]
        assert answers["minimal"]["response"]["status"] == "201 Created"
        assert answers["minimal"]["response"]["etag"] == 'W/"1"'
        assert "resource" not in answers["OperationOutcome"]
        issue = answers["OperationOutcome"]["response"]["outcome"]["issue"][0]
        assert issue["severity"] == "information" and "stored as version 1" in issue["diagnostics"]


def test_summary_and_elements(node: Node) -> None:
    """_summary and _elements on reads and searches: the parts asked for, resourceType, id,
    meta and the mandatory elements, tagged SUBSETTED; kept on later pages; an element the
    type lacks is refused."""
    s = node.session()
    pid = new_patient(node, family="Subset", contact=[{"name": {"family": "Li"}}])
    for _ in range(2):
        assert post(s, f"{node.fhir}/Observation", observation(pid, note=[{"text": "x"}])).ok
    url = f"{node.fhir}/Patient/{pid}"

    def tags(resource: dict[str, Any]) -> list[str]:
        return [t["code"] for t in resource["meta"].get("tag", [])]

    whole = s.get(url).json()
    assert "contact" in whole and tags(whole) == []
    names = s.get(url, params={"_elements": "name"}).json()
    assert set(names) == {"resourceType", "id", "meta", "name"} and tags(names) == ["SUBSETTED"]
    assert set(s.get(url, params={"_elements": "Patient.gender,name"}).json()) == {
        "resourceType",
        "id",
        "meta",
        "name",
        "gender",
    }
    summary = s.get(url, params={"_summary": "true"}).json()
    assert "name" in summary and "birthDate" in summary and "contact" not in summary
    assert tags(summary) == ["SUBSETTED"]
    assert "contact" in s.get(url, params={"_summary": "data"}).json()
    assert "contact" in s.get(url, params={"_summary": "false"}).json()
    assert s.get(f"{url}/_history/1", params={"_elements": "gender"}).json().keys() == {
        "resourceType",
        "id",
        "meta",
        "gender",
    }
    # a search: the mandatory elements (status, code) come too; a choice by its base name
    found = s.get(
        f"{node.fhir}/Observation",
        params={"subject": f"Patient/{pid}", "_elements": "value", "_count": "1"},
    ).json()
    first = found["entry"][0]["resource"]
    assert set(first) == {"resourceType", "id", "meta", "status", "code", "valueQuantity"}
    assert tags(first) == ["SUBSETTED"] and "_elements=value" in found["link"][0]["url"]
    (next_link,) = [link["url"] for link in found["link"] if link["relation"] == "next"]
    second = s.get(next_link).json()["entry"][0]["resource"]
    assert set(second) == {"resourceType", "id", "meta", "status", "code", "valueQuantity"}
    summary = s.get(
        f"{node.fhir}/Observation", params={"subject": f"Patient/{pid}", "_summary": "true"}
    ).json()
    assert all("note" not in e["resource"] and "code" in e["resource"] for e in summary["entry"])
    outcome(s.get(url, params={"_elements": "nonsense"}), 400, "not a root-level element")
    outcome(s.get(url, params={"_summary": "maybe"}), 400, "_summary must be one of")
    outcome(s.get(url, params={"_summary": "true", "_elements": "name"}), 400, "not both")
    searched = s.get(f"{node.fhir}/Patient", params={"_elements": "Observation.code"})
    outcome(searched, 400, "not a root-level element of Patient")


def test_missing_on_id_and_last_updated(node: Node) -> None:
    """Every resource has an id and a lastUpdated: :missing=false matches all, true none
    (the value was once read as a date: 500)."""
    s = node.session()
    new_patient(node)
    total = s.get(f"{node.fhir}/Patient", params={"_summary": "count"}).json()["total"]
    assert total > 0
    for name in ("_id", "_lastUpdated"):
        present = s.get(f"{node.fhir}/Patient", params={f"{name}:missing": "false"})
        assert present.status_code == 200 and present.json()["total"] == total
        absent = s.get(f"{node.fhir}/Patient", params={f"{name}:missing": "true"}).json()
        assert absent["total"] == 0


def test_system_history_and_everything_without_an_id(node: Node) -> None:
    s = node.session()
    pid = new_patient(node)
    assert post(s, f"{node.fhir}/Observation", observation(pid)).ok
    history = s.get(f"{node.fhir}/_history", params={"_count": "5"}).json()
    assert history["type"] == "history" and history["total"] >= 2
    newest = history["entry"][0]
    assert newest["resource"]["resourceType"] == "Observation"
    assert newest["request"]["method"] == "POST"
    outcome(s.get(f"{node.fhir}/Patient/$everything"), 400, "Patient/{id}/$everything")
    mine = node.session(node.token(f"pt-{pid[:8]}", "patient", patient=pid))
    everything = mine.get(f"{node.fhir}/Patient/$everything").json()
    assert {e["resource"]["resourceType"] for e in everything["entry"]} >= {
        "Patient",
        "Observation",
    }
    assert {
        e["resource"]["id"]
        for e in everything["entry"]
        if e["resource"]["resourceType"] == "Patient"
    } == {pid}
    theirs = mine.get(f"{node.fhir}/_history").json()
    assert theirs["total"] > 0
    for entry in theirs["entry"]:  # only what is in the patient's compartment
        resource = entry["resource"]
        if resource["resourceType"] == "Patient":
            assert resource["id"] == pid
        elif resource["resourceType"] == "Observation":
            assert resource["subject"]["reference"] == f"Patient/{pid}"


def test_smart_configuration_says_what_the_token_endpoint_does(node: Node) -> None:
    import requests

    documents = [
        requests.get(f"{base}/.well-known/smart-configuration", timeout=10)
        for base in (node.base, node.fhir)
    ]
    assert all(d.status_code == 200 for d in documents)
    config = documents[0].json()
    assert documents[1].json() == config
    assert config["grant_types_supported"] == ["password"]
    assert "authorization_endpoint" not in config  # no app launch, and it says so
    metadata = node.session().get(f"{node.fhir}/metadata").json()
    security = metadata["rest"][0]["security"]
    uris = {e["url"]: e["valueUri"] for e in security["extension"][0]["extension"]}
    assert uris == {"token": config["token_endpoint"]}
    # the advertised endpoint does what is advertised: a password grant with SMART scopes
    answer = requests.post(
        config["token_endpoint"],
        data={"grant_type": "authorization_code", "code": "x"},
        timeout=10,
    )
    assert answer.status_code == 400 and answer.json()["error"] == "unsupported_grant_type"


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
    bad["subject"] = {"reference": "Encounters/1"}
    outcome(post(s, f"{node.fhir}/Observation", bad), 422, "does not host Encounters")


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
    for accept, status in [
        ("application/fhir+json; fhirVersion=4.0", 200),
        ("application/fhir+json;fhirVersion=4.0.1", 200),
        ("application/fhir+json; fhirVersion=3.0", 406),
        ("application/fhir+json; fhirVersion=4.3", 406),
    ]:
        assert s.get(f"{node.fhir}/Patient/{pid}", headers={"Accept": accept}).status_code == status
    # the R4 types R4B dropped are checked by fhirclient's R4 models
    product = {"resourceType": "MedicinalProduct", "name": [{"productName": "阿司匹林肠溶片"}]}
    made = post(s, f"{node.fhir}/MedicinalProduct", product)
    assert made.status_code == 201, made.text
    read = s.get(f"{node.fhir}/MedicinalProduct/{made.json()['id']}", params={"_summary": "true"})
    assert read.json()["name"] == product["name"]  # a summary element in R4's definition
    for body, words in [
        ({"resourceType": "MedicinalProduct"}, "MedicinalProduct.name: required element missing"),
        ({**product, "colour": "red"}, "MedicinalProduct.colour: unknown element"),
        (
            {"resourceType": "MedicinalProduct", "name": [{"productName": 5}]},
            "MedicinalProduct.name[0].productName: must be a JSON string, not integer",
        ),
        (
            {**product, "identifier": [{"period": {"start": "yesterday"}}]},
            "MedicinalProduct.identifier[0].period.start",
        ),
    ]:
        outcome(post(s, f"{node.fhir}/MedicinalProduct", body), 400, words)
    outcome(s.get(f"{node.fhir}/MedicinalProduct/nothing"), 404)
    # their decimals are checked and kept as written, as every type's are
    text = (
        '{"resourceType":"SubstanceSpecification","moiety":[{"amountQuantity":'
        '{"value":1.50,"unit":"mg"}}]}'
    )
    kept = raw_post(node, "SubstanceSpecification", text)
    assert kept.status_code == 201, kept.text
    read_back = s.get(f"{node.fhir}/SubstanceSpecification/{kept.json()['id']}")
    assert '"value":1.50' in read_back.text.replace(" ", "")
    outcome(s.get(f"{node.fhir}/Encounters/1"), 404, "not a FHIR R4 resource type")
    outcome(s.patch(f"{node.fhir}/Patient/{pid}", json={}), 415, "JSON Patch")
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
    assert set(resources) == set(RESOURCE_TYPES) and len(resources) == 146
    assert {"Encounter", "Condition", "MedicationRequest", "Immunization"} <= set(resources)
    observation_params = {p["name"] for p in resources["Observation"]["searchParam"]}
    assert {"_id", "_lastUpdated", "patient", "code", "date", "category", "status"} <= (
        observation_params
    )
    assert "DiagnosticReport:result" in resources["DiagnosticReport"]["searchInclude"]
    assert "Provenance:target" in resources["Observation"]["searchRevInclude"]
    assert "create" not in {i["code"] for i in resources["AuditEvent"]["interaction"]}
    assert "patch" in {i["code"] for i in resources["Condition"]["interaction"]}
    kinds = {p["name"]: p["type"] for p in resources["Observation"]["searchParam"]}
    assert kinds["component-code-value-quantity"] == "composite" and kinds["_text"] == "string"
    assert {p["name"]: p["type"] for p in resources["Location"]["searchParam"]}["near"] == "special"
    # the Bulk Data export, as the Bulk Data Access IG names it, at the three levels it runs at
    bulk = "http://hl7.org/fhir/uv/bulkdata/"
    assert statement["instantiates"] == [bulk + "CapabilityStatement/bulk-data"]
    exports = {
        "system": statement["rest"][0]["operation"],
        "Patient": [op for op in resources["Patient"]["operation"] if op["name"] == "export"],
        "Group": resources["Group"]["operation"],
    }
    assert exports == {
        "system": [{"name": "export", "definition": bulk + "OperationDefinition/export"}],
        "Patient": [{"name": "export", "definition": bulk + "OperationDefinition/patient-export"}],
        "Group": [{"name": "export", "definition": bulk + "OperationDefinition/group-export"}],
    }
    assert [t for t, r in resources.items() if "operation" in r] == ["Group", "Patient"]
    exporter = node.session(node.token("capability-exporter", "admin", scope="system/*.rs"))
    group = post(
        node.session(),
        f"{node.fhir}/Group",
        {"resourceType": "Group", "type": "person", "actual": True},
    ).json()["id"]
    for url in (
        f"{node.fhir}/$export",
        f"{node.fhir}/Patient/$export",
        f"{node.fhir}/Group/{group}/$export",
    ):
        kicked = exporter.get(url, params={"_type": "Patient"}, headers={"Prefer": "respond-async"})
        assert kicked.status_code == 202, kicked.text  # each declared operation is served
        assert exporter.delete(kicked.headers["Content-Location"]).status_code == 202
    # every advertised parameter is accepted by the server
    s = node.session()
    every = {"Patient", "Observation", "Encounter", "Condition", "DocumentReference", "Consent"}
    for resource_type, entry in resources.items():
        if resource_type == "AuditEvent":
            continue
        params = entry["searchParam"] if resource_type in every else entry["searchParam"][-1:]
        for param in params:
            value = {
                "token": "x",
                "string": "x",
                "date": "2024",
                "reference": "x",
                "uri": "x",
                "quantity": "5",
                "number": "5",
                "composite": "x$2024",  # a token, then a date, token, quantity or string
                "special": "23|113" if param["name"] == "near" else "x",
            }[param["type"]]
            response = s.get(f"{node.fhir}/{resource_type}", params={param["name"]: value})
            assert response.status_code == 200, (resource_type, param, response.text)


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
    outcome(s.get(f"{node.fhir}/Observation?date=xx2024"), 400, "prefix")
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
    every = "&_count=1000"  # the module's other tests add patients: one page holds them all
    assert pid not in ids(s.get(f"{node.fhir}/Patient?birthdate:missing=true{every}").json())
    assert pid in ids(s.get(f"{node.fhir}/Patient?birthdate:missing=false{every}").json())
    assert pid in ids(s.get(f"{node.fhir}/Patient?birthdate=1980{every}").json())


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


# -- hostile input: each was a 500, or stored what should have been refused ----------------------


def observation_text(patient_id: str, element: str, literal: str) -> str:
    """An Observation as JSON text with ``literal`` written as is where ``element`` says."""
    extra = {
        "value": f'"valueQuantity":{{"value":{literal},"unit":"g/dL"}}',
        "range": f'"referenceRange":[{{"low":{{"value":{literal}}}}}]',
        "extension": f'"extension":[{{"url":"http://example.org/x","valueDecimal":{literal}}}]',
        "component": '"component":[{"code":{"text":"x"},'
        f'"valueQuantity":{{"value":{literal}}}}}]',
    }[element]
    return (
        '{"resourceType":"Observation","status":"final","code":{"text":"血红蛋白"},'
        f'"subject":{{"reference":"Patient/{patient_id}"}},{extra}}}'
    )


NUMBER_EXPRESSIONS = {
    "value": "Observation.valueQuantity.value",
    "range": "Observation.referenceRange[0].low.value",
    "extension": "Observation.extension[0].valueDecimal",
    "component": "Observation.component[0].valueQuantity.value",
}
UNREADABLE_NUMBERS = [
    ("value", "9" * 10_000, "has 10000 significant digits"),  # was 500
    ("value", "1e999999", "too large"),  # was stored
    ("value", "-1E+309", "too large"),
    ("value", "1e-999999", "too small"),
    ("value", "1e99999999999999999999999", "out of range"),
    ("value", "1." + "0" * 32, "has 33 significant digits"),
    ("range", "9" * 5_000, "has 5000 significant digits"),
    ("extension", "1e999999", "too large"),
    ("component", "9" * 10_000, "has 10000 significant digits"),
]


def test_numbers_json_clients_cannot_read_are_refused(node: Node) -> None:
    s = node.session()
    pid = new_patient(node, identifier=f"numbers-{uuid.uuid4()}")
    for element, literal, problem in UNREADABLE_NUMBERS:
        text = observation_text(pid, element, literal)
        body = outcome(raw_post(node, "Observation", text), 400, problem)
        assert "at most 32 significant digits" in body["issue"][0]["diagnostics"]
        if problem != "out of range":  # refused by the parser, before any element is known
            assert body["issue"][0]["expression"] == [NUMBER_EXPRESSIONS[element]], body
        assert len(body["issue"][0]["diagnostics"]) < 1000  # the number is not echoed
        for kind in ("batch", "transaction"):
            bundle = (
                f'{{"resourceType":"Bundle","type":"{kind}","entry":[{{"request":'
                f'{{"method":"POST","url":"Observation"}},"resource":{text}}}]}}'
            )
            answer = raw_post(node, "", bundle)
            if kind == "transaction" or problem == "out of range":
                outcome(answer, 400, problem)
            else:
                entry = answer.json()["entry"][0]["response"]
                assert entry["status"].startswith("400") and problem in str(entry["outcome"])
    patient_with = f'{{"resourceType":"Patient","multipleBirthInteger":{"9" * 5_000}}}'
    outcome(raw_post(node, "Patient", patient_with), 400, "Patient.multipleBirthInteger")
    found = s.get(f"{node.fhir}/Observation", params={"subject": f"Patient/{pid}"}).json()
    assert found["total"] == 0  # nothing of it was stored


def test_numbers_at_the_edges_of_the_rule_are_kept(node: Node) -> None:
    pid = new_patient(node, identifier=f"edges-{uuid.uuid4()}")
    for literal in ("1.7976931348623157E+308", "5E-324", "1" * 32, "-0." + "0" * 300 + "1"):
        created = raw_post(node, "Observation", observation_text(pid, "value", literal))
        assert created.status_code == 201, created.text[:300]
        stored = json.loads(created.content, parse_float=Decimal)["valueQuantity"]["value"]
        assert Decimal(stored) == Decimal(literal)
        assert json.loads(created.content)  # and a JSON client reads it


def test_search_limits_are_answered_400_naming_them(node: Node) -> None:
    """Were 500: 1,100 or more repeated parameters went past SQLite's expression depth; a
    60 KB value made a LIKE pattern too complex."""
    s = node.session()
    for query in (
        [("family", "x")] * 1_100,
        [("family", "x")] * 2_000,
        [("family", "x")] * 51,
        [("family", "x" * 60_000)],
        [("family", "x" * 513)],
        [("_id", ",".join(["a"] * 201))],
        [("_sort", ",".join(["_id"] * 201))],
        [("x" * 600, "1")],
    ):
        for answer in (
            s.get(f"{node.fhir}/Patient", params=query),
            s.post(f"{node.fhir}/Patient/_search", data=query),
            post(s, f"{node.fhir}/Patient", patient(), **{"If-None-Exist": urlencode(query)}),
        ):
            body = outcome(answer, 400, "a search takes at most 50 parameters and 200 values")
            assert body["issue"][0]["code"] == "too-costly"
    # at the limits: answered, on both databases
    many = ",".join(f"张{n}" * 100 for n in range(4))[:2000]
    for query in (
        [("family", "x" * 512)] * 50,
        [("family", ",".join(["x" * 512] * 200))],
        [("family:contains", "%_\\" * 170)] * 50,
        [("name:exact", many)] * 50,
        [("birthdate", "ne2024-01-01,lt1900,gt2100,eq2000")] * 50,
        [("_sort", ",".join(["-_lastUpdated", "_id"] * 100))],
        [("identifier", ",".join([f"{'s' * 255}|{'c' * 255}"] * 4))] * 50,
        [("general-practitioner:Practitioner", ",".join(["x" * 64] * 4))] * 50,
        [("_id:not", ",".join(["x" * 64] * 4))] * 50,
    ):
        answer = s.post(f"{node.fhir}/Patient/_search", data=query)
        assert answer.status_code == 200, answer.text[:500]


def test_capability_statement_states_the_limits(node: Node) -> None:
    statement = node.session().get(f"{node.fhir}/metadata").json()
    documentation = statement["rest"][0]["documentation"]
    for limit in (
        "at most 8 MiB",
        "at most 200 entries",
        "at most 50 parameters and 200 values",
        "each value at most 512 characters",
        "at most 32 significant digits",
        "UTF-8 (415 for another charset)",
    ):
        assert limit in documentation, documentation
    interactions = {i["code"]: i for i in statement["rest"][0]["interaction"]}
    assert interactions["batch"]["documentation"] == "at most 200 entries"


def test_bundles_of_more_entries_than_the_limit_are_refused_whole(node: Node) -> None:
    """Was run entry by entry: 4,000 GET entries took 97 s and wrote 4,000 AuditEvents."""
    s = node.session()
    marker = f"too-many-{uuid.uuid4()}"
    for kind in ("batch", "transaction"):
        for count in (201, 4_000):
            entry = {
                "request": {"method": "POST", "url": "Patient"},
                "resource": patient(identifier=marker),
            }
            bundle = {"resourceType": "Bundle", "type": kind, "entry": [entry] * count}
            body = outcome(post(s, node.fhir, bundle), 413, f"a {kind} takes at most 200")
            assert body["issue"][0]["code"] == "too-costly"
    assert s.get(f"{node.fhir}/Patient", params={"identifier": marker}).json()["total"] == 0
    reads = [{"request": {"method": "GET", "url": "Patient?_count=1"}}] * 200
    answer = post(s, node.fhir, {"resourceType": "Bundle", "type": "batch", "entry": reads})
    assert answer.status_code == 200, answer.text[:300]
    assert len(answer.json()["entry"]) == 200


def test_a_body_over_8_mib_is_refused(node: Node) -> None:
    s = node.session()
    marker = f"big-{uuid.uuid4()}"
    text = json.dumps(patient(identifier=marker, family="x" * (9 * 1024 * 1024)))
    answer = raw_post(node, "Patient", text)
    body = outcome(answer, 413, "at most 8 MiB")
    assert body["issue"][0]["code"] == "too-costly"
    assert s.get(f"{node.fhir}/Patient", params={"identifier": marker}).json()["total"] == 0
    fits = json.dumps(patient(identifier=marker, family="x" * (7 * 1024 * 1024)))
    assert raw_post(node, "Patient", fits).status_code == 201


def test_bodies_in_another_charset_are_refused(node: Node) -> None:
    """Was 201: a latin-1 body was read as UTF-8."""
    s = node.session()
    marker = f"charset-{uuid.uuid4()}"
    # "MÃ¼ller" in latin-1 is the bytes of "Müller" in UTF-8: read as UTF-8, another name
    resource = patient(identifier=marker) | {"name": [{"family": "MÃ¼ller"}]}
    text = json.dumps(resource, ensure_ascii=False)
    for charset, codec in (
        ("latin-1", "latin-1"),
        ("ISO-8859-1", "latin-1"),
        ("gb18030", "gb18030"),
        ("utf-16", "utf-16"),
        ("utf8", "utf-8"),
        ("us-ascii", "ascii"),
    ):
        data = (text if codec != "ascii" else json.dumps(resource)).encode(codec)
        answer = s.post(
            f"{node.fhir}/Patient",
            data=data,
            headers={"Content-Type": f"{FHIR_JSON}; charset={charset}"},
        )
        outcome(answer, 415, f"charset='{charset}'")
        search = s.post(
            f"{node.fhir}/Patient/_search",
            data=b"identifier=" + marker.encode(),
            headers={"Content-Type": f"application/x-www-form-urlencoded; charset={charset}"},
        )
        outcome(search, 415, "UTF-8")
    assert s.get(f"{node.fhir}/Patient", params={"identifier": marker}).json()["total"] == 0
    for charset in ("utf-8", "UTF-8", "Utf-8", '"utf-8"'):
        answer = s.post(
            f"{node.fhir}/Patient",
            data=text.encode("utf-8"),
            headers={"Content-Type": f"{FHIR_JSON}; charset={charset}"},
        )
        assert answer.status_code == 201, (charset, answer.text)
        assert answer.json()["name"][0]["family"] == "MÃ¼ller"


def test_bundle_entries_naming_another_server_are_refused(node: Node) -> None:
    """Were run against this server."""
    s = node.session()
    base = load_config(node.directory).fhir_base
    marker = f"elsewhere-{uuid.uuid4()}"
    pid = new_patient(node, identifier=f"{marker}-0")
    others = (
        "http://elsewhere.example/fhir/Patient",
        f"https://elsewhere.example/fhir/Patient/{pid}",
        f"//elsewhere.example/fhir/Patient/{pid}",
        f"{base}evil/Patient",
        base.replace("http://", "https://") + "/Patient",
    )
    for url in others:
        method = "GET" if pid in url else "POST"
        entry: dict[str, Any] = {"request": {"method": method, "url": url}}
        if method == "POST":
            entry["resource"] = patient(identifier=marker)
        batch = post(s, node.fhir, {"resourceType": "Bundle", "type": "batch", "entry": [entry]})
        assert batch.status_code == 200, batch.text
        response = batch.json()["entry"][0]["response"]
        assert response["status"].startswith("400"), (url, response)
        assert "names another server" in str(response["outcome"])
        transaction = {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}
        outcome(post(s, node.fhir, transaction), 400, "names another server")
    assert s.get(f"{node.fhir}/Patient", params={"identifier": marker}).json()["total"] == 0
    own = {"request": {"method": "POST", "url": f"{base}/Patient"}, "resource": patient()}
    for kind in ("batch", "transaction"):
        answer = post(s, node.fhir, {"resourceType": "Bundle", "type": kind, "entry": [own]})
        assert answer.status_code == 200, answer.text
        assert answer.json()["entry"][0]["response"]["status"].startswith("201")
    read = {"request": {"method": "GET", "url": f"{base}/Patient/{pid}"}}
    answer = post(s, node.fhir, {"resourceType": "Bundle", "type": "batch", "entry": [read]})
    assert answer.json()["entry"][0]["resource"]["id"] == pid


def test_conditional_update_and_delete(node: Node) -> None:
    """Upsert by MRN: PUT Type?search updates the one match, creates when none, refuses
    several (412) and a body naming another id (400); DELETE Type?search deletes the one
    match, does nothing for none, refuses several."""
    s = node.session()
    mrn = f"urn:oid:2.16.156.10011.1.11|mrn-{uuid.uuid4().hex[:8]}"
    url = f"{node.fhir}/Patient?identifier={mrn}"
    body = patient(identifier=mrn.split("|")[1])
    body["identifier"][0]["system"] = mrn.split("|")[0]
    first = s.put(url, json=body, headers={"Content-Type": FHIR_JSON})
    assert first.status_code == 201, first.text
    pid = first.json()["id"]
    body["gender"] = "female"
    second = s.put(url, json=body, headers={"Content-Type": FHIR_JSON})
    assert second.status_code == 200 and second.json()["id"] == pid
    assert second.json()["meta"]["versionId"] == "2"
    assert s.get(f"{node.fhir}/Patient/{pid}").json()["gender"] == "female"
    outcome(
        s.put(url, json={**body, "id": "someone-else"}, headers={"Content-Type": FHIR_JSON}),
        400,
        "not that of the resource the search matched",
    )
    stale = s.put(url, json=body, headers={"Content-Type": FHIR_JSON, "If-Match": 'W/"1"'})
    outcome(stale, 412)
    outcome(s.put(f"{node.fhir}/Patient", json=body, headers={"Content-Type": FHIR_JSON}), 400)
    # two patients under one search: neither is touched
    twin = post(s, f"{node.fhir}/Patient", {**body, "name": [{"family": "Twin"}]})
    assert twin.status_code == 201
    outcome(s.put(url, json=body, headers={"Content-Type": FHIR_JSON}), 412, "more than one")
    outcome(s.delete(url), 412, "more than one")
    assert s.delete(f"{node.fhir}/Patient/{twin.json()['id']}").status_code == 204
    gone = s.delete(url)
    assert gone.status_code == 204
    outcome(s.get(f"{node.fhir}/Patient/{pid}"), 410)
    assert s.delete(url).status_code == 204  # nothing matches now: nothing to do
    # the same inside a transaction: a conditional update creates, then updates
    entry = {
        "fullUrl": "urn:uuid:6f1c1c36-0000-4000-8000-000000000001",
        "resource": body,
        "request": {"method": "PUT", "url": f"Patient?identifier={mrn}"},
    }
    observation_entry = {
        "resource": observation("x") | {"subject": {"reference": entry["fullUrl"]}},
        "request": {"method": "POST", "url": "Observation"},
    }
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [entry, observation_entry]}
    made = post(s, node.fhir, bundle)
    assert made.status_code == 200, made.text
    created = made.json()["entry"]
    assert created[0]["response"]["status"] == "201 Created"
    new_id = created[0]["resource"]["id"]
    assert created[1]["resource"]["subject"]["reference"] == f"Patient/{new_id}"
    again = post(s, node.fhir, {**bundle, "entry": [entry]}).json()["entry"][0]
    assert again["response"]["status"] == "200 OK" and again["resource"]["id"] == new_id
    deleted = post(
        s,
        node.fhir,
        {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {"request": {"method": "DELETE", "url": f"Observation?subject=Patient/{new_id}"}},
                {"request": {"method": "DELETE", "url": f"Patient?identifier={mrn}"}},
            ],
        },
    )
    assert deleted.status_code == 200, deleted.text
    assert [e["response"]["status"] for e in deleted.json()["entry"]] == ["204 No Content"] * 2
    outcome(s.get(f"{node.fhir}/Patient/{new_id}"), 410)


def test_json_patch(node: Node) -> None:
    s = node.session()
    pid = new_patient(node)
    url = f"{node.fhir}/Patient/{pid}"
    patch_type = {"Content-Type": "application/json-patch+json"}
    ops = [
        {"op": "test", "path": "/gender", "value": "male"},
        {"op": "replace", "path": "/gender", "value": "female"},
        {"op": "add", "path": "/name/0/given", "value": ["小明"]},
    ]
    patched = s.patch(url, json=ops, headers={**patch_type, "If-Match": 'W/"1"'})
    assert patched.status_code == 200, patched.text
    body = patched.json()
    assert body["gender"] == "female" and body["name"][0]["given"] == ["小明"]
    assert body["meta"]["versionId"] == "2" and patched.headers["ETag"] == 'W/"2"'
    assert s.get(f"{url}/_history/1").json()["gender"] == "male"
    # each refusal leaves the resource as it was
    outcome(s.patch(url, json=ops, headers={**patch_type, "If-Match": 'W/"1"'}), 412)
    outcome(s.patch(url, json=ops[:1], headers=patch_type), 422, "cannot be applied")
    outcome(s.patch(url, json=[{"op": "remove", "path": "/nothing"}], headers=patch_type), 422)
    outcome(s.patch(url, json=[{"op": "jump"}], headers=patch_type), 400)
    # a "from" at the end of a list names no value (jsonpatch fails with TypeError there)
    from_end = [{"op": "move", "path": "/id", "from": "/identifier/-"}]
    outcome(s.patch(url, json=from_end, headers=patch_type), 422, "names no value")
    outcome(s.patch(url, json={"op": "add"}, headers=patch_type), 400, "list of operations")
    outcome(
        s.patch(
            url, json=[{"op": "replace", "path": "/gender", "value": "robot"}], headers=patch_type
        ),
        400,
    )
    outcome(
        s.patch(url, json=[{"op": "replace", "path": "/id", "value": "other"}], headers=patch_type),
        400,
        "is not the URL's",
    )
    outcome(s.patch(url, json=ops, headers={"Content-Type": FHIR_JSON}), 415, "JSON Patch")
    outcome(s.patch(f"{node.fhir}/Patient/nobody", json=ops, headers=patch_type), 404)
    assert s.get(url).json()["meta"]["versionId"] == "2"


def _patch_entry(url: str, ops: Any, if_match: str | None = None) -> dict[str, Any]:
    import base64

    binary = {
        "resourceType": "Binary",
        "contentType": "application/json-patch+json",
        "data": base64.b64encode(json.dumps(ops).encode()).decode(),
    }
    request = {"method": "PATCH", "url": url, **({"ifMatch": if_match} if if_match else {})}
    return {"resource": binary, "request": request}


def test_json_patch_in_bundles(node: Node) -> None:
    """A PATCH entry holds its JSON Patch in a Binary: applied in a batch as alone, in a
    transaction after the creates (a urn:uuid in the patch names what the transaction made),
    all or nothing; FHIRPath Patch (Parameters) and other content types are refused."""
    s = node.session()
    pid = new_patient(node)
    url = f"{node.fhir}/Patient/{pid}"
    replace = [{"op": "replace", "path": "/gender", "value": "female"}]
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            _patch_entry(f"Patient/{pid}", replace, 'W/"1"'),
            _patch_entry(f"Patient/{pid}", replace, 'W/"1"'),  # stale by then: 412
            _patch_entry("Patient/nobody", replace),
            {
                "resource": {"resourceType": "Parameters", "parameter": []},
                "request": {"method": "PATCH", "url": f"Patient/{pid}"},
            },
        ],
    }
    answer = post(s, node.fhir, batch)
    assert answer.status_code == 200, answer.text
    statuses = [e["response"]["status"] for e in answer.json()["entry"]]
    assert statuses == [
        "200 OK",
        "412 Precondition Failed",
        "404 Not Found",
        "415 Unsupported Media Type",
    ]
    assert answer.json()["entry"][0]["resource"]["gender"] == "female"
    assert "FHIRPath Patch" in json.dumps(answer.json()["entry"][3])
    # a transaction: create an Organization and point the Patient at it by a patch
    org = "urn:uuid:" + str(uuid.uuid4())
    link = [{"op": "add", "path": "/managingOrganization", "value": {"reference": org}}]
    transaction = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            _patch_entry(f"Patient/{pid}", link, 'W/"2"'),
            {
                "fullUrl": org,
                "resource": {"resourceType": "Organization", "name": "佛山市第一人民医院"},
                "request": {"method": "POST", "url": "Organization"},
            },
        ],
    }
    answer = post(s, node.fhir, transaction)
    assert answer.status_code == 200, answer.text
    first = answer.json()["entry"][0]
    assert first["response"]["status"] == "200 OK"
    made = answer.json()["entry"][1]["response"]["location"].split("/_history")[0]
    assert first["resource"]["managingOrganization"]["reference"] == made
    assert s.get(url).json()["meta"]["versionId"] == "3"
    # a failing patch undoes the whole transaction
    failing = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {"resourceType": "Organization", "name": "不应留下"},
                "request": {"method": "POST", "url": "Organization"},
            },
            _patch_entry(f"Patient/{pid}", [{"op": "remove", "path": "/nothing"}]),
        ],
    }
    outcome(post(s, node.fhir, failing), 422, "Bundle.entry[1]")
    assert s.get(f"{node.fhir}/Organization", params={"name": "不应留下"}).json()["total"] == 0
    assert s.get(url).json()["meta"]["versionId"] == "3"
    for entry, status, words in [
        ({**_patch_entry("Patient", replace)}, 400, "PATCH needs Type/id"),
        (
            {
                "resource": {"resourceType": "Binary", "contentType": "text/plain", "data": "eA=="},
                "request": {"method": "PATCH", "url": f"Patient/{pid}"},
            },
            415,
            "application/json-patch+json",
        ),
        (
            {
                "resource": {
                    "resourceType": "Binary",
                    "contentType": "application/json-patch+json",
                    "data": "not base64!",
                },
                "request": {"method": "PATCH", "url": f"Patient/{pid}"},
            },
            400,
            "not base64",
        ),
        ({"request": {"method": "PATCH", "url": f"Patient/{pid}"}}, 400, "needs a resource"),
    ]:
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}
        outcome(post(s, node.fhir, bundle), status, words)
    assert s.get(url).json()["meta"]["versionId"] == "3"


def test_modifiers_exact_text_below_above_and_approximate_dates(node: Node) -> None:
    s = node.session()
    pid = new_patient(node, family="Müller")
    every = "&_count=1000"
    # :exact compares the string as written (case and accents), as R4 says
    assert pid in ids(s.get(f"{node.fhir}/Patient?family:exact=Müller{every}").json())
    assert pid not in ids(s.get(f"{node.fhir}/Patient?family:exact=müller{every}").json())
    assert pid not in ids(s.get(f"{node.fhir}/Patient?family:exact=Muller{every}").json())
    assert pid in ids(s.get(f"{node.fhir}/Patient?family=muller{every}").json())
    # :text searches a code's text and displays (a word's start, Chinese too)
    condition = {
        "resourceType": "Condition",
        "subject": {"reference": f"Patient/{pid}"},
        "code": {
            "coding": [
                {"system": "http://hl7.org/fhir/sid/icd-10", "code": "I10", "display": "高血压"}
            ],
            "text": "Essential Hypertension",
        },
        "meta": {"profile": ["http://hl7.org/fhir/us/core/StructureDefinition/us-core-condition"]},
    }
    cid = post(s, f"{node.fhir}/Condition", condition).json()["id"]
    for words, found in [("hypert", True), ("essential", True), ("高血", True), ("tension", False)]:
        matched = ids(
            s.get(f"{node.fhir}/Condition", params={"code:text": words, "_count": "1000"}).json()
        )
        assert (cid in matched) is found, words
    # :below and :above on a uri (_profile)
    base = "http://hl7.org/fhir/us/core/StructureDefinition"
    for name, value, found in [
        ("_profile", f"{base}/us-core-condition", True),
        ("_profile", base, False),
        ("_profile:below", base, True),
        ("_profile:below", "http://example.org", False),
        ("_profile:above", f"{base}/us-core-condition/x", True),
        ("_profile:above", f"{base}/us-core-condition-other", False),
    ]:
        matched = ids(
            s.get(f"{node.fhir}/Condition", params={name: value, "_count": "1000"}).json()
        )
        assert (cid in matched) is found, (name, value)
    # ap: within 10 % of the gap between now and the date
    observed = post(
        s, f"{node.fhir}/Observation", observation(pid, when="2016-06-15T10:00:00+08:00")
    )
    oid = observed.json()["id"]
    near = ids(
        s.get(f"{node.fhir}/Observation?date=ap2016-03-01&subject=Patient/{pid}{every}").json()
    )
    far = ids(
        s.get(f"{node.fhir}/Observation?date=ap2012-01-01&subject=Patient/{pid}{every}").json()
    )
    assert oid in near and oid not in far


def test_identifier_of_type_tag_and_security(node: Node) -> None:
    s = node.session()
    v2 = "http://terminology.hl7.org/CodeSystem/v2-0203"
    mrn = f"mr-{uuid.uuid4().hex[:8]}"
    person = patient()
    person["identifier"].append(
        {
            "type": {"coding": [{"system": v2, "code": "MR"}]},
            "system": "urn:hosp-a:mrn",
            "value": mrn,
        }
    )
    person["meta"] = {
        "tag": [{"system": "urn:hrx:test", "code": "imported"}],
        "security": [
            {"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}
        ],
    }
    pid = post(s, f"{node.fhir}/Patient", person).json()["id"]
    every = "&_count=1000"
    assert ids(s.get(f"{node.fhir}/Patient?identifier:of-type={v2}|MR|{mrn}{every}").json()) == [
        pid
    ]
    assert ids(s.get(f"{node.fhir}/Patient?identifier:of-type={v2}|PI|{mrn}{every}").json()) == []
    outcome(
        s.get(f"{node.fhir}/Patient?identifier:of-type=MR|{mrn}"),
        400,
        "type-system|type-code|value",
    )
    assert pid in ids(s.get(f"{node.fhir}/Patient?_tag=urn:hrx:test|imported{every}").json())
    assert pid in ids(s.get(f"{node.fhir}/Patient?_security=R{every}").json())
    # :identifier: a reference that names its target by identifier only
    observed = observation(pid)
    observed["performer"] = [{"identifier": {"system": "urn:hosp-a:staff", "value": "dr-7"}}]
    oid = post(s, f"{node.fhir}/Observation", observed).json()["id"]
    found = s.get(f"{node.fhir}/Observation?performer:identifier=urn:hosp-a:staff|dr-7{every}")
    assert ids(found.json()) == [oid]
    assert ids(s.get(f"{node.fhir}/Observation?performer:identifier=dr-8{every}").json()) == []


def test_search_across_types_and_history_at(node: Node) -> None:
    import time as clock

    s = node.session()
    tag = f"t{uuid.uuid4().hex[:8]}"
    meta = {"tag": [{"system": "urn:hrx:test", "code": tag}]}
    pid = post(s, f"{node.fhir}/Patient", {**patient(), "meta": meta}).json()["id"]
    oid = post(s, f"{node.fhir}/Observation", {**observation(pid), "meta": meta}).json()["id"]
    both = s.get(
        f"{node.fhir}", params={"_type": "Patient,Observation", "_tag": f"urn:hrx:test|{tag}"}
    )
    assert both.status_code == 200, both.text
    assert [(e["resource"]["resourceType"], e["resource"]["id"]) for e in both.json()["entry"]] == [
        ("Patient", pid),
        ("Observation", oid),
    ]
    assert both.json()["link"][0]["url"].startswith(f"{node.fhir}?_type=Patient,Observation&")
    only = s.get(f"{node.fhir}", params={"_type": "Observation", "_tag": f"urn:hrx:test|{tag}"})
    assert [e["resource"]["id"] for e in only.json()["entry"]] == [oid]
    every = s.get(f"{node.fhir}", params={"_tag": f"urn:hrx:test|{tag}"}).json()
    assert {e["resource"]["id"] for e in every["entry"]} == {pid, oid}
    outcome(
        s.get(f"{node.fhir}", params={"_type": "Patient,Observation", "family": "x"}),
        400,
        "Observation",
    )
    outcome(s.get(f"{node.fhir}", params={"_type": "Nothing"}), 404)
    # _sort across types merges them in that order; each type's _include applies to its own
    newest = s.get(
        f"{node.fhir}",
        params={
            "_type": "Patient,Observation",
            "_tag": f"urn:hrx:test|{tag}",
            "_sort": "-_lastUpdated",
        },
    ).json()
    assert [e["resource"]["id"] for e in newest["entry"]] == [oid, pid]
    org = post(
        s, f"{node.fhir}/Organization", {"resourceType": "Organization", "name": "x", "meta": meta}
    )
    condition = {
        "resourceType": "Condition",
        "subject": {"reference": f"Patient/{pid}"},
        "code": {"text": "x"},
        "meta": meta,
    }
    cid = post(s, f"{node.fhir}/Condition", condition).json()["id"]
    linked = s.get(f"{node.fhir}/Patient/{pid}").json()
    linked["managingOrganization"] = {"reference": f"Organization/{org.json()['id']}"}
    assert s.put(f"{node.fhir}/Patient/{pid}", json=linked, headers={"Content-Type": FHIR_JSON}).ok
    mixed = s.get(
        f"{node.fhir}",
        params=[
            ("_type", "Observation,Condition"),
            ("_tag", f"urn:hrx:test|{tag}"),
            ("_sort", "_id"),
            ("_include", "Observation:subject"),
            ("_include:iterate", "Patient:organization"),
            ("_revinclude", "Provenance:target"),
        ],
    )
    assert mixed.status_code == 200, mixed.text
    matched = [e["resource"]["id"] for e in mixed.json()["entry"] if e["search"]["mode"] == "match"]
    assert matched == sorted([oid, cid])
    included = {
        (e["resource"]["resourceType"], e["resource"]["id"])
        for e in mixed.json()["entry"]
        if e["search"]["mode"] == "include"
    }
    assert included == {("Patient", pid), ("Organization", org.json()["id"])}
    outcome(
        s.get(f"{node.fhir}", params={"_type": "Observation", "_include": "Condition:subject"}),
        400,
        "does not return",
    )
    outcome(
        s.get(f"{node.fhir}", params={"_type": "Patient,Observation", "_sort": "family"}),
        400,
        "cannot sort Observation",
    )
    outcome(s.get(f"{node.fhir}"), 400, "needs criteria")
    # _at: the versions that were current at that moment
    before = clock.time()
    clock.sleep(0.05)
    changed = s.get(f"{node.fhir}/Patient/{pid}").json()
    changed["gender"] = "female"
    assert s.put(f"{node.fhir}/Patient/{pid}", json=changed, headers={"Content-Type": FHIR_JSON}).ok
    moment = (
        clock.strftime("%Y-%m-%dT%H:%M:%S", clock.gmtime(before))
        + f".{int(before % 1 * 1000):03d}Z"
    )
    then = s.get(f"{node.fhir}/Patient/{pid}/_history", params={"_at": moment}).json()
    assert [e["resource"]["meta"]["versionId"] for e in then["entry"]] == ["2"]  # linked above
    now = s.get(f"{node.fhir}/Patient/{pid}/_history", params={"_at": "2999-01-01"}).json()
    assert [e["resource"]["meta"]["versionId"] for e in now["entry"]] == ["3"]
    outcome(s.get(f"{node.fhir}/Patient/{pid}/_history", params={"_at": "yesterday"}), 400, "_at")


def test_number_parameters(node: Node) -> None:
    s = node.session()
    pid = new_patient(node)
    assessment = {
        "resourceType": "RiskAssessment",
        "status": "final",
        "subject": {"reference": f"Patient/{pid}"},
        "prediction": [{"probabilityDecimal": 0.35}],
    }
    rid = post(s, f"{node.fhir}/RiskAssessment", assessment).json()["id"]
    every = f"&subject=Patient/{pid}"
    for value, found in [
        ("gt0.3", True),
        ("lt0.3", False),
        ("0.35", True),
        ("0.40", False),  # [0.395, 0.405)
        ("0.4", True),  # [0.35, 0.45): a value stands for its precision
        ("ap0.33", True),
    ]:
        matched = ids(s.get(f"{node.fhir}/RiskAssessment?probability={value}{every}").json())
        assert (rid in matched) is found, value
    outcome(s.get(f"{node.fhir}/RiskAssessment?probability=0.3||%25"), 400, "takes no unit")
