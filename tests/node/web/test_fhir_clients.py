"""A real node driven over HTTP by two independent FHIR clients, on SQLite and PostgreSQL.

- ``fhirpy`` (``SyncFHIRClient``): create, read, update, delete; searches with several
  parameters; paging by ``next`` links; ``_include`` and ``_revinclude``; ``_sort``;
  conditional create (``If-None-Exist``); an update with a stale ``If-Match``; transactions.
- ``fhirclient`` (SMART): its R4 models parse, with ``strict=True``, every resource the node
  returns for each hosted type, the CapabilityStatement and the searchset Bundles; and its
  ``FHIRServer`` reads, searches, pages and creates with the bearer token in its session.

fhirpy has no ``If-Match`` or ``If-None-Exist`` of its own (its conditional create sends the
criteria as a query string, which FHIR R4 does not define), so those headers go through the
client's public ``extra_headers``.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import pytest
import requests
from fhirclient.models import (
    auditevent,
    bundle,
    capabilitystatement,
    consent,
    diagnosticreport,
    imagingstudy,
    observation,
    organization,
    patient,
    practitioner,
    provenance,
    servicerequest,
)
from fhirclient.models.fhirabstractbase import FHIRValidationError
from fhirclient.server import FHIRNotFoundException, FHIRServer, FHIRUnauthorizedException
from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import (
    AuthorizationError,
    MultipleResourcesFound,
    OperationOutcome,
    ResourceNotFound,
)

from fhir_adapters.store.resources import RESOURCE_TYPES
from tests.helpers.nodes import FHIR_JSON, Node, post

RESIDENT_ID = "urn:oid:2.16.156.10011.1.1"  # 居民身份证号
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
SNOMED = "http://snomed.info/sct"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
ORDER_IDS = "urn:oid:2.16.156.10011.1.24"  # the hospital's order numbers (illustrative)
HOSTED_TYPES = (
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
)
MODELS: dict[str, Any] = {
    "Patient": patient.Patient,
    "Practitioner": practitioner.Practitioner,
    "Organization": organization.Organization,
    "Observation": observation.Observation,
    "DiagnosticReport": diagnosticreport.DiagnosticReport,
    "ImagingStudy": imagingstudy.ImagingStudy,
    "ServiceRequest": servicerequest.ServiceRequest,
    "Consent": consent.Consent,
    "AuditEvent": auditevent.AuditEvent,
    "Provenance": provenance.Provenance,
}


# -- resources --------------------------------------------------------------------------------


def resident_id(birth: str = "1980-01-02") -> str:
    """A unique 18-character 居民身份证号-shaped identifier (region, birth date, serial)."""
    serial = uuid.uuid4().int % 10_000
    return f"330102{birth.replace('-', '')}{serial:04d}"


def patient_json(
    family: str,
    given: str,
    gender: str = "male",
    birth: str = "1980-01-02",
    *,
    identifier: str | None = None,
    organization: str | None = None,
    practitioner: str | None = None,
) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Patient",
        "identifier": [{"system": RESIDENT_ID, "value": identifier or resident_id(birth)}],
        "active": True,
        "name": [{"use": "official", "text": family + given, "family": family, "given": [given]}],
        "telecom": [{"system": "phone", "value": "13800138000", "use": "mobile"}],
        "gender": gender,
        "birthDate": birth,
        "address": [
            {
                "use": "home",
                "line": ["西湖区文三路 90 号"],
                "city": "杭州市",
                "state": "浙江省",
                "postalCode": "310012",
                "country": "CN",
            }
        ],
        "communication": [
            {
                "language": {
                    "coding": [{"system": "urn:ietf:bcp:47", "code": "zh-CN", "display": "中文"}]
                },
                "preferred": True,
            }
        ],
    }
    if organization:
        resource["managingOrganization"] = {"reference": f"Organization/{organization}"}
    if practitioner:
        resource["generalPractitioner"] = [{"reference": f"Practitioner/{practitioner}"}]
    return resource


def organization_json(name: str = "杭州市第一人民医院") -> dict[str, Any]:
    return {
        "resourceType": "Organization",
        "identifier": [
            {
                "system": "urn:oid:2.16.156.10011.1.5",
                "value": f"12330100{uuid.uuid4().hex[:10].upper()}",
            }
        ],
        "active": True,
        "type": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/organization-type",
                        "code": "prov",
                        "display": "Healthcare Provider",
                    }
                ]
            }
        ],
        "name": name,
        "alias": ["市一医院"],
        "telecom": [{"system": "phone", "value": "0571-56006000", "use": "work"}],
        "address": [{"line": ["浣纱路 261 号"], "city": "杭州市", "state": "浙江省"}],
    }


def practitioner_json(family: str = "李", given: str = "明") -> dict[str, Any]:
    return {
        "resourceType": "Practitioner",
        "identifier": [
            {"system": "urn:oid:2.16.156.10011.1.4", "value": f"1103301{uuid.uuid4().int % 10**8}"}
        ],
        "active": True,
        "name": [{"text": family + given, "family": family, "given": [given], "prefix": ["主任"]}],
        "gender": "male",
        "qualification": [
            {
                "code": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v2-0360",
                            "code": "MD",
                            "display": "Doctor of Medicine",
                        }
                    ],
                    "text": "执业医师",
                }
            }
        ],
    }


LAB_TESTS = {
    "hemoglobin": ("718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL", "12.0", "16.0"),
    "leukocytes": (
        "6690-2",
        "Leukocytes [#/volume] in Blood by Automated count",
        "10*3/uL",
        "3.5",
        "9.5",
    ),
    "platelets": (
        "777-3",
        "Platelets [#/volume] in Blood by Automated count",
        "10*3/uL",
        "125",
        "350",
    ),
}


def observation_json(
    patient_id: str,
    test: str = "hemoglobin",
    value: str = "13.50",
    when: str = "2024-03-05T08:30:00+08:00",
    *,
    performer: str | None = None,
    identifier: str | None = None,
) -> dict[str, Any]:
    code, display, unit, low, high = LAB_TESTS[test]
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "identifier": [{"system": ORDER_IDS, "value": identifier or uuid.uuid4().hex}],
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "laboratory",
                        "display": "Laboratory",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": LOINC, "code": code, "display": display}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": when,
        "valueQuantity": {"value": Decimal(value), "unit": unit, "system": UCUM, "code": unit},
        "interpretation": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                        "code": "N",
                        "display": "Normal",
                    }
                ]
            }
        ],
        "referenceRange": [
            {
                "low": {"value": Decimal(low), "unit": unit, "system": UCUM, "code": unit},
                "high": {"value": Decimal(high), "unit": unit, "system": UCUM, "code": unit},
            }
        ],
    }
    if performer:
        resource["performer"] = [{"reference": f"Practitioner/{performer}"}]
    return resource


def diagnostic_report_json(
    patient_id: str, results: list[str], organization_id: str
) -> dict[str, Any]:
    return {
        "resourceType": "DiagnosticReport",
        "identifier": [{"system": ORDER_IDS, "value": uuid.uuid4().hex}],
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                        "code": "HM",
                        "display": "Hematology",
                    }
                ]
            }
        ],
        "code": {
            "coding": [
                {
                    "system": LOINC,
                    "code": "58410-2",
                    "display": "CBC panel - Blood by Automated count",
                }
            ],
            "text": "血常规",
        },
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": "2024-03-05T08:30:00+08:00",
        "issued": "2024-03-05T11:02:13.250+08:00",
        "performer": [{"reference": f"Organization/{organization_id}"}],
        "result": [{"reference": f"Observation/{result}"} for result in results],
        "conclusion": "血常规未见明显异常。",
    }


def service_request_json(patient_id: str, practitioner_id: str) -> dict[str, Any]:
    return {
        "resourceType": "ServiceRequest",
        "identifier": [{"system": ORDER_IDS, "value": uuid.uuid4().hex}],
        "status": "active",
        "intent": "order",
        "priority": "routine",
        "category": [{"coding": [{"system": SNOMED, "code": "363679005", "display": "Imaging"}]}],
        "code": {
            "coding": [{"system": LOINC, "code": "24627-2", "display": "Chest CT"}],
            "text": "胸部CT平扫",
        },
        "subject": {"reference": f"Patient/{patient_id}"},
        "occurrenceDateTime": "2024-03-05T10:00:00+08:00",
        "authoredOn": "2024-03-05T09:12:00+08:00",
        "requester": {"reference": f"Practitioner/{practitioner_id}"},
        "reasonCode": [{"text": "咳嗽两周，伴低热"}],
    }


def imaging_study_json(patient_id: str, request_id: str, practitioner_id: str) -> dict[str, Any]:
    study = "1.2.840.113619.2.55.3.604688119.969.1709604720.1"
    ct_image = "urn:oid:1.2.840.10008.5.1.4.1.1.2"
    return {
        "resourceType": "ImagingStudy",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{study}"}],
        "status": "available",
        "modality": [{"system": DCM, "code": "CT"}, {"system": DCM, "code": "SR"}],
        "subject": {"reference": f"Patient/{patient_id}"},
        "started": "2024-03-05T10:12:00+08:00",
        "basedOn": [{"reference": f"ServiceRequest/{request_id}"}],
        "referrer": {"reference": f"Practitioner/{practitioner_id}"},
        "numberOfSeries": 2,
        "numberOfInstances": 3,
        "description": "胸部CT平扫",
        "series": [
            {
                "uid": f"{study}.1",
                "number": 1,
                "modality": {"system": DCM, "code": "CT", "display": "Computed Tomography"},
                "description": "胸部 轴位 1.25mm",
                "numberOfInstances": 2,
                "bodySite": {"system": SNOMED, "code": "51185008", "display": "Thoracic structure"},
                "instance": [
                    {
                        "uid": f"{study}.1.1",
                        "sopClass": {"system": "urn:ietf:rfc:3986", "code": ct_image},
                        "number": 1,
                    },
                    {
                        "uid": f"{study}.1.2",
                        "sopClass": {"system": "urn:ietf:rfc:3986", "code": ct_image},
                        "number": 2,
                    },
                ],
            },
            {
                "uid": f"{study}.2",
                "number": 2,
                "modality": {"system": DCM, "code": "SR", "display": "SR Document"},
                "numberOfInstances": 1,
                "instance": [
                    {
                        "uid": f"{study}.2.1",
                        "sopClass": {
                            "system": "urn:ietf:rfc:3986",
                            "code": "urn:oid:1.2.840.10008.5.1.4.1.1.88.22",
                        },
                        "number": 1,
                        "title": "影像诊断报告",
                    }
                ],
            },
        ],
    }


def consent_json(patient_id: str, organization_id: str, report_id: str) -> dict[str, Any]:
    """A treatment consent with every kind of provision (a privacy consent for the exchange
    could not carry action and data: tests/node/records/test_consent_api.py)."""
    return {
        "resourceType": "Consent",
        "status": "active",
        "scope": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                    "code": "treatment",
                    "display": "Treatment",
                }
            ]
        },
        "category": [
            {"coding": [{"system": LOINC, "code": "59284-0", "display": "Patient Consent"}]}
        ],
        "patient": {"reference": f"Patient/{patient_id}"},
        "dateTime": "2024-03-01T09:00:00+08:00",
        "performer": [{"reference": f"Patient/{patient_id}"}],
        "organization": [{"reference": f"Organization/{organization_id}"}],
        "policyRule": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}
            ]
        },
        "provision": {
            "type": "permit",
            "period": {"start": "2024-03-01", "end": "2025-02-28"},
            "actor": [
                {
                    "role": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                "code": "PRCP",
                                "display": "primary information recipient",
                            }
                        ]
                    },
                    "reference": {"reference": f"Organization/{organization_id}"},
                }
            ],
            "action": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/consentaction",
                            "code": "access",
                        }
                    ]
                }
            ],
            "purpose": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                    "code": "TREAT",
                    "display": "treatment",
                }
            ],
            "data": [
                {"meaning": "related", "reference": {"reference": f"DiagnosticReport/{report_id}"}}
            ],
        },
    }


def provenance_json(target: str, practitioner_id: str, organization_id: str) -> dict[str, Any]:
    return {
        "resourceType": "Provenance",
        "target": [{"reference": target}],
        "recorded": "2024-03-05T11:02:14.000+08:00",
        "activity": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                    "code": "CREATE",
                    "display": "create",
                }
            ]
        },
        "agent": [
            {
                "type": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                            "code": "author",
                        }
                    ]
                },
                "who": {"reference": f"Practitioner/{practitioner_id}"},
                "onBehalfOf": {"reference": f"Organization/{organization_id}"},
            }
        ],
    }


# -- clients and fixtures ----------------------------------------------------------------------


def fhirpy_client(node: Node, token: str | None = None, **headers: str) -> SyncFHIRClient:
    return SyncFHIRClient(
        node.fhir,
        authorization=f"Bearer {token or node.token()}",
        extra_headers=headers or None,
        requests_config={"timeout": 30},
    )


def fhirclient_server(node: Node, token: str | None = None) -> FHIRServer:
    """fhirclient's server object, with the bearer token in its requests session (it signs
    requests only through a SMART auth object, which needs an OAuth2 flow)."""
    server = FHIRServer(None, base_uri=node.fhir)
    server.session.headers["Authorization"] = f"Bearer {token or node.token()}"
    return server


def created(session: requests.Session, node: Node, resource: dict[str, Any]) -> str:
    response = post(session, f"{node.fhir}/{resource['resourceType']}", resource)
    assert response.status_code == 201, response.text
    resource_id: str = response.json()["id"]
    return resource_id


@dataclass
class World:
    """One realistic resource of every writable type, linked as a hospital would link them."""

    organization: str
    practitioner: str
    patient: str
    observations: list[str]
    report: str
    request: str
    study: str
    consent: str
    provenance: str


@pytest.fixture(scope="module")
def world(node: Node) -> World:
    s = node.session()
    org = created(s, node, organization_json())
    doctor = created(s, node, practitioner_json())
    pat = created(s, node, patient_json("张", "伟", organization=org, practitioner=doctor))
    observations = [
        created(s, node, observation_json(pat, "hemoglobin", "13.50", performer=doctor)),
        created(s, node, observation_json(pat, "leukocytes", "6.20")),
        created(s, node, observation_json(pat, "platelets", "250")),
    ]
    report = created(s, node, diagnostic_report_json(pat, observations, org))
    request = created(s, node, service_request_json(pat, doctor))
    study = created(s, node, imaging_study_json(pat, request, doctor))
    agreement = created(s, node, consent_json(pat, org, report))
    origin = created(s, node, provenance_json(f"DiagnosticReport/{report}", doctor, org))
    return World(org, doctor, pat, observations, report, request, study, agreement, origin)


def ids(resources: list[Any]) -> list[str]:
    return [resource["id"] for resource in resources]


def entries(bundle_json: dict[str, Any], mode: str | None = None) -> list[dict[str, Any]]:
    return [
        entry["resource"]
        for entry in bundle_json.get("entry", [])
        if mode is None or entry.get("search", {}).get("mode") == mode
    ]


def link(bundle_json: dict[str, Any], relation: str) -> str | None:
    for item in bundle_json.get("link", []):
        if item["relation"] == relation:
            url: str = item["url"]
            return url
    return None


# -- fhirpy -----------------------------------------------------------------------------------


def test_fhirpy_create_read_update_delete(node: Node) -> None:
    client = fhirpy_client(node)
    raw = node.session()
    person = client.resource("Patient", **patient_json("欧阳", "娜娜", "female", "1992-06-18"))
    person.save()
    assert str(uuid.UUID(person.id)) == person.id
    assert person["meta"]["versionId"] == "1"

    read = client.get("Patient", person.id)
    assert read["name"][0]["family"] == "欧阳" and read["name"][0]["given"] == ["娜娜"]
    assert read["meta"]["versionId"] == "1"
    assert dict(client.reference("Patient", person.id).to_resource()) == dict(person)

    person["telecom"] = [{"system": "phone", "value": "13912345678", "use": "mobile"}]
    person.save()
    assert person["meta"]["versionId"] == "2"
    assert client.get("Patient", person.id)["telecom"][0]["value"] == "13912345678"
    response = raw.get(f"{node.fhir}/Patient/{person.id}")
    assert response.headers["ETag"] == 'W/"2"'
    person.refresh()
    assert person["meta"]["versionId"] == "2"

    assert client.delete(person) is None  # 204 No Content
    with pytest.raises(ResourceNotFound):
        client.get("Patient", person.id)
    assert raw.get(f"{node.fhir}/Patient/{person.id}").status_code == 410
    assert raw.get(f"{node.fhir}/Patient/{uuid.uuid4()}").status_code == 404
    # the versions before the delete stay readable
    version = client.execute(f"Patient/{person.id}/_history/2", method="get")
    assert version["telecom"][0]["value"] == "13912345678"


def test_fhirpy_keeps_decimal_precision(node: Node, world: World) -> None:
    """fhirpy sends Decimal("13.50") as 13.50 (requests uses simplejson); the node must keep
    the trailing zero, which FHIR says is part of the value."""
    client = fhirpy_client(node)
    obs = client.resource("Observation", **observation_json(world.patient, value="13.50"))
    obs.save()
    stored = node.session().get(f"{node.fhir}/Observation/{obs.id}")
    assert b'"valueQuantity":{"value":13.50,' in stored.content
    assert b'"low":{"value":12.0,' in stored.content


def test_fhirpy_search_with_several_parameters(node: Node) -> None:
    client = fhirpy_client(node)
    org = client.resource("Organization", **organization_json("浙江省人民医院"))
    org.save()
    fang = patient_json("王", "芳", "female", "1985-03-12", organization=org.id)
    wei = patient_json("王", "伟", "male", "1990-07-01", organization=org.id)
    na = patient_json("李", "娜", "female", "1978-11-30", organization=org.id)
    made = {}
    for key, data in (("fang", fang), ("wei", wei), ("na", na)):
        resource = client.resource("Patient", **data)
        resource.save()
        made[key] = resource.id
    patients = client.resources("Patient").search(organization=f"Organization/{org.id}")

    assert set(ids(patients.search(gender="female").fetch_all())) == {made["fang"], made["na"]}
    assert ids(patients.search(family="王", birthdate__ge="1986-01-01").fetch_all()) == [
        made["wei"]
    ]
    assert ids(patients.search(name="芳", gender="female").fetch_all()) == [made["fang"]]
    assert ids(patients.search(birthdate__lt="1980", gender="female").fetch_all()) == [made["na"]]
    assert patients.search(family="王", gender="other").fetch_all() == []
    identifier = f"{RESIDENT_ID}|{na['identifier'][0]['value']}"
    assert ids(client.resources("Patient").search(identifier=identifier).fetch_all()) == [
        made["na"]
    ]

    lab = client.resources("Observation").search(subject=f"Patient/{made['wei']}")
    march = observation_json(made["wei"], "hemoglobin", "14.10", "2024-03-05T08:30:00+08:00")
    april = observation_json(made["wei"], "hemoglobin", "13.20", "2024-04-02T08:10:00+08:00")
    wbc = observation_json(made["wei"], "leukocytes", "7.10", "2024-04-02T08:10:00+08:00")
    found = {}
    for key, data in (("march", march), ("april", april), ("wbc", wbc)):
        resource = client.resource("Observation", **data)
        resource.save()
        found[key] = resource.id
    hemoglobin = lab.search(code=f"{LOINC}|718-7")
    assert set(ids(hemoglobin.fetch_all())) == {found["march"], found["april"]}
    assert ids(hemoglobin.search(date__ge="2024-04-01").fetch_all()) == [found["april"]]
    assert ids(lab.search(date="2024-04-02", code="6690-2").fetch_all()) == [found["wbc"]]
    assert lab.search(code="http://example.org|718-7").fetch_all() == []

    # unknown parameters are refused (400) unless the client asks for lenient handling
    with pytest.raises(OperationOutcome) as refused:
        patients.search(shoe_size="42").fetch()
    assert "shoe-size" in refused.value.resource["issue"][0]["diagnostics"]
    lenient = fhirpy_client(node, Prefer="handling=lenient").resources("Patient")
    search = lenient.search(organization=f"Organization/{org.id}", gender="male", shoe_size="42")
    bundle_json = search.fetch_raw()
    assert ids(entries(bundle_json, "match")) == [made["wei"]]
    (outcome,) = entries(bundle_json, "outcome")
    assert outcome["issue"][0]["severity"] == "warning"
    assert "shoe-size" in outcome["issue"][0]["diagnostics"]


def test_fhirpy_pages_through_next_links(node: Node) -> None:
    client = fhirpy_client(node)
    person = client.resource("Patient", **patient_json("赵", "磊"))
    person.save()
    days = list(range(45))
    random.Random(45).shuffle(days)  # created out of date order, so _sort has work to do
    transaction = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": observation_json(
                    person.id,
                    "hemoglobin",
                    f"{12 + day / 20:.2f}",
                    f"2024-{1 + day // 28:02d}-{1 + day % 28:02d}T08:00:00+08:00",
                ),
                "request": {"method": "POST", "url": "Observation"},
            }
            for day in days
        ],
    }
    response = client.execute("", method="post", data=transaction)
    made = [entry["resource"]["id"] for entry in response["entry"]]
    by_date = [made[days.index(day)] for day in range(45)]
    assert len(set(made)) == 45

    search = client.resources("Observation").search(subject=f"Patient/{person.id}").limit(10)
    seen = ids(list(search))
    assert len(seen) == 45 and set(seen) == set(made)

    first = search.fetch_raw()
    assert first["total"] == 45 and len(first["entry"]) == 10
    assert link(first, "previous") is None
    last = link(first, "last")
    assert last is not None and last.startswith(f"{node.fhir}?_getpages=")
    assert "_getpagesoffset=40" in last and "_count=10" in last

    # follow next by hand: five pages of 10, 10, 10, 10, 5, each one's links consistent
    pages: list[list[str]] = []
    url: str | None = link(first, "next")
    pages.append(ids(entries(first)))
    while url is not None:
        assert (
            url.startswith(f"{node.fhir}?_getpages=")
            and f"_getpagesoffset={10 * len(pages)}" in url
        )
        page = client.execute(url, method="get")
        assert page["total"] == 45 and link(page, "previous") is not None
        pages.append(ids(entries(page)))
        url = link(page, "next")
    assert [len(page) for page in pages] == [10, 10, 10, 10, 5]
    assert [i for page in pages for i in page] == seen

    # _sort holds across pages
    assert ids(list(search.sort("date"))) == by_date
    assert ids(list(search.sort("-date"))) == by_date[::-1]

    # fhirclient follows the same next links
    server = fhirclient_server(node)
    where = observation.Observation.where(
        {"subject": f"Patient/{person.id}", "_count": "10", "_sort": "date"}
    )
    assert [resource.id for resource in where.perform_resources_iter(server)] == by_date


def test_fhirpy_include_and_revinclude(node: Node, world: World) -> None:
    client = fhirpy_client(node)
    reports = client.resources("DiagnosticReport").search(_id=world.report)
    bundle_json = (
        reports.include("DiagnosticReport", "result").revinclude("Provenance", "target").fetch_raw()
    )
    assert bundle_json["total"] == 1
    assert ids(entries(bundle_json, "match")) == [world.report]
    included = entries(bundle_json, "include")
    assert sorted(ids([r for r in included if r["resourceType"] == "Observation"])) == sorted(
        world.observations
    )
    assert ids([r for r in included if r["resourceType"] == "Provenance"]) == [world.provenance]
    assert len(included) == 4
    # fetch() keeps only the searched type
    assert ids(reports.include("DiagnosticReport", "result").fetch()) == [world.report]

    # and the other way round: the reports that hold an Observation
    observations = client.resources("Observation").search(_id=world.observations[0])
    bundle_json = observations.revinclude("DiagnosticReport", "result").fetch_raw()
    assert ids(entries(bundle_json, "match")) == [world.observations[0]]
    assert ids(entries(bundle_json, "include")) == [world.report]
    # an _include that starts from another type is refused
    with pytest.raises(OperationOutcome):
        observations.include("DiagnosticReport", "result").fetch()


def test_fhirpy_sort(node: Node) -> None:
    client = fhirpy_client(node)
    org = client.resource("Organization", **organization_json("宁波市医疗中心李惠利医院"))
    org.save()
    made = {}
    for key, family, given, birth in (
        ("fang", "王", "芳", "1985-03-12"),
        ("wei", "王", "伟", "1990-07-01"),
        ("na", "李", "娜", "1978-11-30"),
    ):
        resource = client.resource(
            "Patient", **patient_json(family, given, birth=birth, organization=org.id)
        )
        resource.save()
        made[key] = resource.id
    patients = client.resources("Patient").search(organization=f"Organization/{org.id}")
    assert ids(patients.sort("birthdate").fetch()) == [made["na"], made["fang"], made["wei"]]
    assert ids(patients.sort("-birthdate").fetch()) == [made["wei"], made["fang"], made["na"]]
    # 李 sorts before 王; within 王, the younger first
    assert ids(patients.sort("family", "-birthdate").fetch()) == [
        made["na"],
        made["wei"],
        made["fang"],
    ]
    assert ids(patients.sort("-_lastUpdated").fetch()) == [made["na"], made["wei"], made["fang"]]


def test_fhirpy_conditional_create(node: Node) -> None:
    data = patient_json("孙", "丽", "female", "1975-09-09")
    value = data["identifier"][0]["value"]
    condition = f"identifier={RESIDENT_ID}|{value}"
    client = fhirpy_client(node, **{"If-None-Exist": condition})
    first, was_created = client.resources("Patient").get_or_create(
        client.resource("Patient", **data)
    )
    assert was_created
    again, was_created = client.resources("Patient").get_or_create(
        client.resource("Patient", **data)
    )
    assert not was_created
    assert again.id == first.id and again["meta"]["versionId"] == "1"
    plain = fhirpy_client(node)
    assert ids(
        plain.resources("Patient").search(identifier=f"{RESIDENT_ID}|{value}").fetch_all()
    ) == [first.id]

    # a condition that matches two resources is refused with 412 (fhirpy: MultipleResourcesFound)
    family = f"孙{uuid.uuid4().hex[:6]}"
    for given in ("一", "二"):
        plain.resource("Patient", **patient_json(family, given)).save()
    # header values are Latin-1: the Chinese criterion goes percent-encoded, as in a URL
    ambiguous = fhirpy_client(node, **{"If-None-Exist": f"family={quote(family)}"})
    with pytest.raises(MultipleResourcesFound):
        ambiguous.resources("Patient").get_or_create(
            ambiguous.resource("Patient", **patient_json(family, "三"))
        )
    assert len(plain.resources("Patient").search(family=family).fetch_all()) == 2


def put_if_match(node: Node, path: str, resource: dict[str, Any], etag: str) -> requests.Response:
    return node.session().put(
        f"{node.fhir}/{path}",
        json=resource,
        headers={"Content-Type": FHIR_JSON, "If-Match": etag},
    )


def test_fhirpy_update_with_stale_version(node: Node) -> None:
    client = fhirpy_client(node)
    person = client.resource("Patient", **patient_json("周", "杰"))
    person.save()
    person["telecom"] = [{"system": "phone", "value": "13700000001"}]
    person.save()
    assert person["meta"]["versionId"] == "2"

    stale = fhirpy_client(node, **{"If-Match": 'W/"1"'})
    change = stale.resource("Patient", **{**dict(person), "gender": "other"})
    with pytest.raises(MultipleResourcesFound) as refused:  # fhirpy's name for every 412
        change.update()
    assert "version 2" in str(refused.value)
    current = client.get("Patient", person.id)
    assert current["gender"] == "male" and current["meta"]["versionId"] == "2"
    assert put_if_match(node, f"Patient/{person.id}", dict(current), 'W/"1"').status_code == 412

    fresh = fhirpy_client(node, **{"If-Match": 'W/"2"'})
    updated = fresh.resource("Patient", **{**dict(person), "gender": "other"}).update()
    assert updated["meta"]["versionId"] == "3" and updated["gender"] == "other"
    assert client.get("Patient", person.id)["gender"] == "other"


def test_fhirpy_transaction_rewrites_urn_references(node: Node, world: World) -> None:
    client = fhirpy_client(node)
    patient_urn = f"urn:uuid:{uuid.uuid4()}"
    observation_urn = f"urn:uuid:{uuid.uuid4()}"
    new_patient = patient_json("钱", "芳芳", "female", "2001-02-03")
    lab = observation_json("placeholder", "platelets", "231")
    lab["subject"] = {"reference": patient_urn}
    origin = provenance_json(observation_urn, world.practitioner, world.organization)
    origin["target"].append({"reference": patient_urn})
    response = client.execute(
        "",
        method="post",
        data={
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "fullUrl": observation_urn,
                    "resource": lab,
                    "request": {"method": "POST", "url": "Observation"},
                },
                {
                    "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                    "resource": origin,
                    "request": {"method": "POST", "url": "Provenance"},
                },
                {
                    "fullUrl": patient_urn,
                    "resource": new_patient,
                    "request": {"method": "POST", "url": "Patient"},
                },
            ],
        },
    )
    assert response["type"] == "transaction-response"
    assert [entry["response"]["status"] for entry in response["entry"]] == ["201 Created"] * 3
    obs_id, prov_id, pat_id = (entry["resource"]["id"] for entry in response["entry"])
    assert response["entry"][2]["response"]["location"] == f"Patient/{pat_id}/_history/1"

    stored = client.get("Observation", obs_id)
    assert stored["subject"]["reference"] == f"Patient/{pat_id}"
    subject = client.reference(reference=stored["subject"]["reference"]).to_resource()
    assert subject["name"][0]["given"] == ["芳芳"]
    targets = [t["reference"] for t in client.get("Provenance", prov_id)["target"]]
    assert targets == [f"Observation/{obs_id}", f"Patient/{pat_id}"]
    assert "urn:uuid" not in str(dict(stored))
    found = client.resources("Observation").search(subject=f"Patient/{pat_id}").fetch_all()
    assert ids(found) == [obs_id]


def test_fhirpy_transaction_resolves_references_to_later_entries(node: Node) -> None:
    """FHIR does not make a transaction's entries come in dependency order: an Observation
    may reference, by its urn:uuid, a Patient created by a later entry."""
    client = fhirpy_client(node)
    patient_urn = f"urn:uuid:{uuid.uuid4()}"
    lab = observation_json("placeholder", "hemoglobin", "12.80")
    lab["subject"] = {"reference": patient_urn}
    response = client.execute(
        "",
        method="post",
        data={
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {"resource": lab, "request": {"method": "POST", "url": "Observation"}},
                {
                    "fullUrl": patient_urn,
                    "resource": patient_json("何", "静", "female", "1968-12-24"),
                    "request": {"method": "POST", "url": "Patient"},
                },
            ],
        },
    )
    obs_id, pat_id = (entry["resource"]["id"] for entry in response["entry"])
    assert client.get("Observation", obs_id)["subject"]["reference"] == f"Patient/{pat_id}"


def test_fhirpy_failed_transaction_leaves_nothing(node: Node) -> None:
    client = fhirpy_client(node)
    patient_urn = f"urn:uuid:{uuid.uuid4()}"
    new_patient = patient_json("吴", "刚")
    good = observation_json("placeholder", "leukocytes", "5.40")
    good["subject"] = {"reference": patient_urn}
    bad = observation_json(str(uuid.uuid4()), "platelets", "199")  # no such Patient
    bundle_json = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": patient_urn,
                "resource": new_patient,
                "request": {"method": "POST", "url": "Patient"},
            },
            {"resource": good, "request": {"method": "POST", "url": "Observation"}},
            {"resource": bad, "request": {"method": "POST", "url": "Observation"}},
        ],
    }
    with pytest.raises(OperationOutcome) as refused:
        client.execute("", method="post", data=bundle_json)
    issue = refused.value.resource["issue"][0]
    assert issue["diagnostics"].startswith("Bundle.entry[2]")
    assert "does not exist" in issue["diagnostics"]
    raw = post(node.session(), node.fhir, bundle_json)
    assert raw.status_code == 422

    identifier = f"{RESIDENT_ID}|{new_patient['identifier'][0]['value']}"
    assert client.resources("Patient").search(identifier=identifier).fetch_all() == []
    for entry in (good, bad):
        order = f"{ORDER_IDS}|{entry['identifier'][0]['value']}"
        assert client.resources("Observation").search(identifier=order).fetch_all() == []


def test_fhirpy_referenced_resource_cannot_be_deleted(node: Node) -> None:
    client = fhirpy_client(node)
    person = client.resource("Patient", **patient_json("郑", "爽"))
    person.save()
    lab = client.resource("Observation", **observation_json(person.id))
    lab.save()
    with pytest.raises(OperationOutcome) as refused:
        client.delete("Patient", person.id)
    assert f"Observation/{lab.id}" in refused.value.resource["issue"][0]["diagnostics"]
    assert node.session().delete(f"{node.fhir}/Patient/{person.id}").status_code == 409
    assert client.get("Patient", person.id)["meta"]["versionId"] == "1"
    client.delete(lab)
    client.delete(person)
    with pytest.raises(ResourceNotFound):
        client.get("Patient", person.id)


def test_fhirpy_patient_sees_only_their_compartment(node: Node, world: World) -> None:
    token = node.token(f"patient-{world.patient}", "patient", patient=world.patient)
    client = fhirpy_client(node, token)
    own = client.resources("Observation").fetch_all()
    assert set(world.observations) <= set(ids(own))
    assert {o["subject"]["reference"] for o in own} == {f"Patient/{world.patient}"}
    other = fhirpy_client(node).resource("Patient", **patient_json("冯", "小刚"))
    other.save()
    with pytest.raises(ResourceNotFound):
        client.get("Patient", other.id)
    assert client.resources("Patient").search(_id=other.id).fetch_all() == []
    with pytest.raises(AuthorizationError):
        SyncFHIRClient(node.fhir, authorization="Bearer not-a-token").get("Patient", world.patient)


def test_fhirpy_whole_record_idioms(node: Node, world: World) -> None:
    """What an integrator does with fhirpy against every R4 type: a Condition and an
    Encounter saved and searched, conditional update (upsert by identifier) and conditional
    delete through a search set, JSON Patch, chained and _has searches, _elements, composite
    and narrative searches."""
    client = fhirpy_client(node)
    encounter = client.resource(
        "Encounter",
        status="finished",
        **{"class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}},
        subject={"reference": f"Patient/{world.patient}"},
    )
    encounter.save()
    condition = client.resource(
        "Condition",
        subject={"reference": f"Patient/{world.patient}"},
        encounter={"reference": f"Encounter/{encounter.id}"},
        code={"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "E11.9"}]},
    )
    condition.save()
    found = (
        client.resources("Condition")
        .search(patient=world.patient, code="http://hl7.org/fhir/sid/icd-10|E11.9")
        .fetch_all()
    )
    assert [c.id for c in found] == [condition.id]
    # conditional update: the search set's update creates, then updates the one match
    mrn = f"mrn-{uuid.uuid4().hex[:10]}"
    matching = client.resources("Patient").search(identifier=f"{RESIDENT_ID}|{mrn}")
    person = patient_json("钱", "七", identifier=mrn)
    created_one, was_created = matching.update(client.resource("Patient", **person))
    assert was_created
    person["gender"] = "female"
    updated, was_created = matching.update(client.resource("Patient", **person))
    assert not was_created
    assert updated.id == created_one.id and updated["meta"]["versionId"] == "2"
    # JSON Patch through the client's own request (fhirpy's patch is a merge patch)
    patched = node.session().patch(
        f"{node.fhir}/Patient/{updated.id}",
        json=[{"op": "replace", "path": "/gender", "value": "male"}],
        headers={"Content-Type": "application/json-patch+json", "If-Match": 'W/"2"'},
    )
    assert patched.status_code == 200 and client.get("Patient", updated.id)["gender"] == "male"
    # chains and _has, as fhirpy writes them
    card = next(i for i in person["identifier"] if i["system"] == RESIDENT_ID)
    chained = (
        client.resources("Observation")
        .search(**{"subject:Patient.identifier": f"{RESIDENT_ID}|{card['value']}"})
        .fetch_all()
    )
    assert chained == []
    has = client.resources("Patient").has("Condition", "subject", code="E11.9").fetch_all()
    assert world.patient in {p.id for p in has}
    slim = client.resources("Condition").search(_id=condition.id).elements("code").fetch_all()
    assert set(slim[0]) >= {"code", "id", "meta"} and "encounter" not in slim[0]
    assert "SUBSETTED" in {t["code"] for t in slim[0]["meta"]["tag"]}
    # a composite search and a narrative search, as fhirpy writes them
    pressure = client.resource(
        "Observation",
        status="final",
        code={"coding": [{"system": "http://loinc.org", "code": "85354-9"}]},
        subject={"reference": f"Patient/{world.patient}"},
        text={"status": "generated", "div": "<div>收缩压偏高 systolic high</div>"},
        component=[
            {
                "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                "valueQuantity": {
                    "value": value,
                    "system": "http://unitsofmeasure.org",
                    "code": "mm[Hg]",
                },
            }
            for code, value in (("8480-6", 150), ("8462-4", 85))
        ],
    )
    pressure.save()
    ucum = "http://unitsofmeasure.org"
    for value, found in (("8480-6$gt140", True), ("8462-4$gt140", False)):
        hits = (
            client.resources("Observation")
            .search(
                subject=f"Patient/{world.patient}",
                **{"component-code-value-quantity": f"{value}|{ucum}|mm[Hg]"},
            )
            .fetch_all()
        )
        assert (pressure.id in {o.id for o in hits}) is found, value
    narrated = client.resources("Observation").search(_text="偏高").fetch_all()
    assert pressure.id in {o.id for o in narrated}
    # conditional delete through the search set
    assert matching.delete()[1] == 204
    assert node.session().get(f"{node.fhir}/Patient/{updated.id}").status_code == 410
    assert condition.id and client.get("Condition", condition.id)


def test_fhirpy_count_is_refused_unless_lenient(node: Node, world: World) -> None:
    """fhirpy's count() adds ``_totalMethod=count``, a parameter FHIR does not define: a strict
    server refuses it, and with ``Prefer: handling=lenient`` it is ignored."""
    client = fhirpy_client(node)
    search = client.resources("Observation").search(subject=f"Patient/{world.patient}")
    with pytest.raises(OperationOutcome) as refused:
        search.count()
    assert "_totalMethod" in refused.value.resource["issue"][0]["diagnostics"]
    lenient = fhirpy_client(node, Prefer="handling=lenient")
    expected = len(search.fetch_all())
    assert (
        lenient.resources("Observation").search(subject=f"Patient/{world.patient}").count()
        == expected
    )


def test_count_zero_has_no_next_link(node: Node, world: World) -> None:
    """``_count=0`` asks only for the total; a ``next`` link on it points to the same empty
    page again, and a client following next links never stops."""
    client = fhirpy_client(node)
    search = client.resources("Observation").search(subject=f"Patient/{world.patient}")
    bundle_json = search.limit(0).fetch_raw()
    assert bundle_json["total"] == len(search.fetch_all()) and not bundle_json.get("entry")
    assert link(bundle_json, "next") is None


# -- fhirclient -------------------------------------------------------------------------------


def test_fhirclient_capability_statement(node: Node) -> None:
    server = fhirclient_server(node)
    server.get_capability()
    statement = server.capabilityStatement
    assert isinstance(statement, capabilitystatement.CapabilityStatement)
    raw = requests.get(f"{node.fhir}/metadata", headers={"Accept": FHIR_JSON}, timeout=30).json()
    capabilitystatement.CapabilityStatement(raw, strict=True)
    assert statement.fhirVersion == "4.0.1" and statement.kind == "instance"
    assert statement.format and "application/fhir+json" in statement.format
    (rest,) = statement.rest
    assert rest.mode == "server"
    assert {resource.type for resource in rest.resource} == set(RESOURCE_TYPES)
    assert set(HOSTED_TYPES) < set(RESOURCE_TYPES)
    by_type = {resource.type: resource for resource in rest.resource}
    audit = {i.code for i in by_type["AuditEvent"].interaction}
    assert "read" in audit and "search-type" in audit and "create" not in audit
    assert {"create", "update", "delete"} <= {i.code for i in by_type["Patient"].interaction}
    assert "DiagnosticReport:result" in by_type["DiagnosticReport"].searchInclude
    assert "Provenance:target" in by_type["DiagnosticReport"].searchRevInclude
    assert {"transaction", "batch"} <= {i.code for i in rest.interaction}


def test_fhirclient_reads_searches_and_creates_through_its_server(node: Node, world: World) -> None:
    server = fhirclient_server(node)
    person = patient.Patient.read(world.patient, server)
    assert person.name[0].family == "张" and person.birthDate.isostring == "1980-01-02"
    assert person.managingOrganization.reference == f"Organization/{world.organization}"

    lab = observation.Observation.read(world.observations[0], server)
    assert lab.valueQuantity.value == 13.5 and lab.valueQuantity.code == "g/dL"
    assert lab.valueQuantity.system == UCUM

    study = imagingstudy.ImagingStudy.read(world.study, server)
    assert [series.modality.code for series in study.series] == ["CT", "SR"]
    assert study.basedOn[0].reference == f"ServiceRequest/{world.request}"

    search = diagnosticreport.DiagnosticReport.where(
        {"subject": f"Patient/{world.patient}", "code": f"{LOINC}|58410-2"}
    ).include("result")
    found = list(search.perform_resources_iter(server))
    reports = [r for r in found if isinstance(r, diagnosticreport.DiagnosticReport)]
    assert [r.id for r in reports] == [world.report]
    assert sorted(r.id for r in found if isinstance(r, observation.Observation)) == sorted(
        world.observations
    )

    # create through fhirclient: its as_json() is accepted as it is
    made = practitioner.Practitioner(practitioner_json("陈", "静"), strict=True)
    answer = made.create(server)
    assert answer is not None and answer["name"][0]["family"] == "陈"
    again = practitioner.Practitioner.read(answer["id"], server)
    assert again.qualification[0].code.text == "执业医师"

    with pytest.raises(FHIRNotFoundException):
        patient.Patient.read(str(uuid.uuid4()), server)
    anonymous = FHIRServer(None, base_uri=node.fhir)
    with pytest.raises(FHIRUnauthorizedException):
        patient.Patient.read(world.patient, anonymous)


def empty_values(value: Any, path: str = "") -> list[str]:
    """Where a JSON value holds an empty array, object or string (FHIR JSON forbids them)."""
    if isinstance(value, dict):
        found = [path] if not value else []
        for key, item in value.items():
            found += empty_values(item, f"{path}.{key}" if path else key)
        return found
    if isinstance(value, list):
        found = [path] if not value else []
        for index, item in enumerate(value):
            found += empty_values(item, f"{path}[{index}]")
        return found
    return [path] if value == "" else []


def test_fhirclient_round_trips_the_capability_statement(node: Node) -> None:
    raw = requests.get(f"{node.fhir}/metadata", headers={"Accept": FHIR_JSON}, timeout=30).json()
    parsed = capabilitystatement.CapabilityStatement(raw, strict=True)
    assert empty_values(raw) == []
    assert parsed.as_json() == raw


def all_pages(session: requests.Session, url: str) -> Iterator[dict[str, Any]]:
    next_url: str | None = url
    while next_url is not None:
        response = session.get(next_url)
        assert response.status_code == 200, response.text
        page: dict[str, Any] = response.json()
        yield page
        next_url = link(page, "next")


def test_fhirclient_models_parse_every_resource_strictly(node: Node, world: World) -> None:
    """Every resource of every hosted type, as the node serves it (in searchsets and on read),
    parses with fhirclient's R4 models in strict mode and serialises back unchanged."""
    # strict mode does refuse what R4 does not define, so passing means something
    with pytest.raises(FHIRValidationError):
        patient.Patient({"resourceType": "Patient", "shoeSize": 42}, strict=True)

    auditor = node.session(node.token("auditor", "auditor"))
    counts: dict[str, int] = {}
    for resource_type in HOSTED_TYPES:
        model = MODELS[resource_type]
        counts[resource_type] = 0
        for page in all_pages(auditor, f"{node.fhir}/{resource_type}?_count=200"):
            parsed_bundle = bundle.Bundle(page, strict=True)
            assert parsed_bundle.type == "searchset"
            assert parsed_bundle.as_json() == page
            for entry in page.get("entry", []):
                assert entry["resource"]["resourceType"] == resource_type
                instance = model(entry["resource"], strict=True)
                assert instance.as_json() == entry["resource"]
                counts[resource_type] += 1
        assert counts[resource_type] >= 1, f"no {resource_type} to parse"

    for resource_type, resource_id in (
        ("Consent", world.consent),
        ("Provenance", world.provenance),
        ("ServiceRequest", world.request),
        ("DiagnosticReport", world.report),
    ):
        read = auditor.get(f"{node.fhir}/{resource_type}/{resource_id}").json()
        assert MODELS[resource_type](read, strict=True).as_json() == read

    agreement = consent.Consent(auditor.get(f"{node.fhir}/Consent/{world.consent}").json())
    assert agreement.scope.coding[0].code == "treatment"
    assert agreement.category[0].coding[0].code == "59284-0"
    assert agreement.provision.type == "permit"
    assert agreement.provision.data[0].reference.reference == f"DiagnosticReport/{world.report}"

    response = auditor.get(
        f"{node.fhir}/AuditEvent", params={"entity": f"Patient/{world.patient}", "_count": "5"}
    )
    assert response.status_code == 200, response.text
    events = response.json()
    assert events["total"] >= 1
    event = auditevent.AuditEvent(events["entry"][0]["resource"], strict=True)
    assert event.agent[0].requestor is True and event.source.observer is not None
    assert event.recorded is not None
