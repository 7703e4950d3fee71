"""fhir_adapters.store.codes: the code values of elements with a required binding (FHIR R4)."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class
from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_adapters.store import codes
from fhir_adapters.store.codes import CodeIssue, code_issues

UCUM = "http://unitsofmeasure.org"
DIV = '<div xmlns="http://www.w3.org/1999/xhtml">text</div>'

# The R4 4.0.1 value sets, in spec order, written out again here rather than imported.
GENDER = ("male", "female", "other", "unknown")
COMPARATOR = ("<", "<=", ">=", ">")
UNITS_OF_TIME = ("s", "min", "h", "d", "wk", "mo", "a")
ALLOWED: dict[tuple[str, str], tuple[str, ...]] = {
    ("Address", "use"): ("home", "work", "temp", "old", "billing"),
    ("Address", "type"): ("postal", "physical", "both"),
    ("ContactPoint", "system"): ("phone", "fax", "email", "pager", "url", "sms", "other"),
    ("ContactPoint", "use"): ("home", "work", "temp", "old", "mobile"),
    ("HumanName", "use"): ("usual", "official", "temp", "nickname", "anonymous", "old", "maiden"),
    ("Identifier", "use"): ("usual", "official", "temp", "secondary", "old"),
    ("Narrative", "status"): ("generated", "extensions", "additional", "empty"),
    ("Quantity", "comparator"): COMPARATOR,
    ("Age", "comparator"): COMPARATOR,
    ("Count", "comparator"): COMPARATOR,
    ("Distance", "comparator"): COMPARATOR,
    ("Duration", "comparator"): COMPARATOR,
    ("TimingRepeat", "durationUnit"): UNITS_OF_TIME,
    ("TimingRepeat", "periodUnit"): UNITS_OF_TIME,
    ("TimingRepeat", "dayOfWeek"): ("mon", "tue", "wed", "thu", "fri", "sat", "sun"),
    ("TimingRepeat", "when"): (
        "MORN",
        "MORN.early",
        "MORN.late",
        "NOON",
        "AFT",
        "AFT.early",
        "AFT.late",
        "EVE",
        "EVE.early",
        "EVE.late",
        "NIGHT",
        "PHS",
        "HS",
        "WAKE",
        "C",
        "CM",
        "CD",
        "CV",
        "AC",
        "ACM",
        "ACD",
        "ACV",
        "PC",
        "PCM",
        "PCD",
        "PCV",
    ),
    ("Contributor", "type"): ("author", "editor", "reviewer", "endorser"),
    ("DataRequirementSort", "direction"): ("ascending", "descending"),
    ("ParameterDefinition", "use"): ("in", "out"),
    ("RelatedArtifact", "type"): (
        "documentation",
        "justification",
        "citation",
        "predecessor",
        "successor",
        "derived-from",
        "depends-on",
        "composed-of",
    ),
    ("TriggerDefinition", "type"): (
        "named-event",
        "periodic",
        "data-changed",
        "data-added",
        "data-modified",
        "data-removed",
        "data-accessed",
        "data-access-ended",
    ),
    ("Patient", "gender"): GENDER,
    ("PatientContact", "gender"): GENDER,
    ("PatientLink", "type"): ("replaced-by", "replaces", "refer", "seealso"),
    ("Practitioner", "gender"): GENDER,
    ("Observation", "status"): (
        "registered",
        "preliminary",
        "final",
        "amended",
        "corrected",
        "cancelled",
        "entered-in-error",
        "unknown",
    ),
    ("DiagnosticReport", "status"): (
        "registered",
        "partial",
        "preliminary",
        "final",
        "amended",
        "corrected",
        "appended",
        "cancelled",
        "entered-in-error",
        "unknown",
    ),
    ("ImagingStudy", "status"): (
        "registered",
        "available",
        "cancelled",
        "entered-in-error",
        "unknown",
    ),
    ("ServiceRequest", "status"): (
        "draft",
        "active",
        "on-hold",
        "revoked",
        "completed",
        "entered-in-error",
        "unknown",
    ),
    ("ServiceRequest", "intent"): (
        "proposal",
        "plan",
        "directive",
        "order",
        "original-order",
        "reflex-order",
        "filler-order",
        "instance-order",
        "option",
    ),
    ("ServiceRequest", "priority"): ("routine", "urgent", "asap", "stat"),
    ("Consent", "status"): (
        "draft",
        "proposed",
        "active",
        "rejected",
        "inactive",
        "entered-in-error",
    ),
    ("ConsentProvision", "type"): ("deny", "permit"),
    ("ConsentProvisionData", "meaning"): ("instance", "related", "dependents", "authoredby"),
    ("AuditEvent", "action"): ("C", "R", "U", "D", "E"),
    ("AuditEvent", "outcome"): ("0", "4", "8", "12"),
    ("AuditEventAgentNetwork", "type"): ("1", "2", "3", "4", "5"),
    ("ProvenanceEntity", "role"): ("derivation", "revision", "quotation", "source", "removal"),
}


def quantity(value: float, comparator: str | None = None, unit: str = "mg") -> dict[str, Any]:
    q: dict[str, Any] = {"value": value, "unit": unit, "system": UCUM, "code": unit}
    if comparator is not None:
        q["comparator"] = comparator
    return q


def concept(code: str, system: str = "http://example.org/codes") -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code}], "text": code}


# A valid resource of each type, using every checked element somewhere (with a right code).
VALID: dict[str, dict[str, Any]] = {
    "Patient": {
        "resourceType": "Patient",
        "id": "p1",
        "text": {"status": "generated", "div": DIV},
        "extension": [
            {"url": "http://example.org/age", "valueAge": quantity(30, "<", "a")},
            {"url": "http://example.org/count", "valueCount": quantity(2, ">=", "1")},
            {"url": "http://example.org/distance", "valueDistance": quantity(5, "<=", "km")},
            {"url": "http://example.org/duration", "valueDuration": quantity(3, ">", "d")},
            {
                "url": "http://example.org/contributor",
                "valueContributor": {"type": "author", "name": "A. Author"},
            },
            {
                "url": "http://example.org/data-requirement",
                "valueDataRequirement": {
                    "type": "Observation",
                    "sort": [{"path": "date", "direction": "descending"}],
                },
            },
            {
                "url": "http://example.org/parameter",
                "valueParameterDefinition": {"use": "in", "type": "string"},
            },
            {
                "url": "http://example.org/related",
                "valueRelatedArtifact": {"type": "citation", "citation": "A paper"},
            },
            {
                "url": "http://example.org/trigger",
                "valueTriggerDefinition": {"type": "named-event", "name": "admission"},
            },
        ],
        "identifier": [{"use": "official", "system": "urn:oid:1.2.3", "value": "MRN-1"}],
        "name": [{"use": "official", "family": "Doe", "given": ["Jane"]}],
        "telecom": [
            {"system": "phone", "value": "+41 44 000 00 00", "use": "home"},
            {"system": "email", "value": "jane@example.org", "use": "work"},
        ],
        "gender": "female",
        "birthDate": "1990-01-01",
        "_birthDate": {
            "extension": [
                {
                    "url": "http://example.org/source",
                    "valueIdentifier": {"use": "usual", "value": "birth-register"},
                }
            ]
        },
        "address": [{"use": "home", "type": "both", "line": ["Main St 1"], "city": "Zurich"}],
        "contact": [
            {
                "name": {"use": "usual", "family": "Doe"},
                "telecom": [{"system": "phone", "value": "+41 44 000 00 01", "use": "mobile"}],
                "gender": "male",
            }
        ],
        "link": [{"other": {"reference": "Patient/p0"}, "type": "replaces"}],
    },
    "Practitioner": {
        "resourceType": "Practitioner",
        "id": "dr1",
        "name": [{"use": "official", "family": "House"}],
        "telecom": [{"system": "pager", "value": "123"}],
        "gender": "male",
        "qualification": [
            {
                "identifier": [{"use": "official", "value": "FMH-42"}],
                "code": concept("MD"),
            }
        ],
    },
    "Organization": {
        "resourceType": "Organization",
        "id": "lab",
        "identifier": [{"use": "official", "value": "ORG-1"}],
        "name": "Central Laboratory",
        "telecom": [{"system": "url", "value": "https://lab.example.org"}],
        "contact": [
            {
                "name": {"use": "official", "family": "Desk"},
                "telecom": [{"system": "fax", "value": "+41 44 000 00 02", "use": "work"}],
                "address": {"use": "work", "type": "postal", "city": "Zurich"},
            }
        ],
    },
    "Observation": {
        "resourceType": "Observation",
        "id": "hb1",
        "text": {"status": "generated", "div": DIV},
        "contained": [
            {
                "resourceType": "Patient",
                "id": "anon",
                "gender": "unknown",
                "telecom": [{"system": "sms", "value": "+41 79 000 00 00"}],
            }
        ],
        "identifier": [{"use": "official", "system": "urn:oid:1.2.3", "value": "LAB-1"}],
        "status": "final",
        "category": [concept("laboratory")],
        "code": concept("718-7", "http://loinc.org"),
        "subject": {"reference": "#anon"},
        "effectiveDateTime": "2024-01-02T10:00:00Z",
        "valueQuantity": quantity(13.2, "<", "g/dL"),
        "component": [{"code": concept("x"), "valueQuantity": quantity(1, ">", "g/dL")}],
        "referenceRange": [{"low": quantity(12, unit="g/dL"), "high": quantity(16, unit="g/dL")}],
    },
    "DiagnosticReport": {
        "resourceType": "DiagnosticReport",
        "id": "rep1",
        "status": "final",
        "code": concept("58410-2", "http://loinc.org"),
        "subject": {"identifier": {"use": "official", "value": "MRN-1"}},
        "result": [{"reference": "Observation/hb1"}],
        "presentedForm": [{"contentType": "application/pdf", "language": "de-CH"}],
    },
    "ImagingStudy": {
        "resourceType": "ImagingStudy",
        "id": "ct1",
        "status": "available",
        "subject": {"reference": "Patient/p1"},
        "series": [
            {
                "uid": "1.2.3.4",
                "modality": {
                    "system": "http://dicom.nema.org/resources/ontology/DCM",
                    "code": "CT",
                },
                "performer": [{"actor": {"reference": "Practitioner/dr1"}}],
                "instance": [
                    {"uid": "1.2.3.4.5", "sopClass": {"code": "1.2.840.10008.5.1.4.1.1.2"}}
                ],
            }
        ],
    },
    "ServiceRequest": {
        "resourceType": "ServiceRequest",
        "id": "sr1",
        "status": "active",
        "intent": "order",
        "priority": "stat",
        "code": concept("CT-HEAD"),
        "subject": {"reference": "Patient/p1"},
        "occurrenceTiming": {
            "repeat": {
                "boundsDuration": {"value": 7, "unit": "d", "system": UCUM, "code": "d"},
                "frequency": 2,
                "period": 1,
                "periodUnit": "d",
                "duration": 30,
                "durationUnit": "min",
                "dayOfWeek": ["mon", "wed"],
                "when": ["MORN", "ACM"],
            }
        },
    },
    "Consent": {
        "resourceType": "Consent",
        "id": "c1",
        "status": "active",
        "scope": concept("patient-privacy"),
        "category": [concept("59284-0", "http://loinc.org")],
        "patient": {"reference": "Patient/p1"},
        "policyRule": concept("OPTIN"),
        "provision": {
            "type": "deny",
            "provision": [
                {
                    "type": "permit",
                    "actor": [
                        {"role": concept("PRCP"), "reference": {"reference": "Organization/lab"}}
                    ],
                    "data": [{"meaning": "related", "reference": {"reference": "Observation/hb1"}}],
                    "provision": [{"type": "deny", "class": [{"code": "Observation"}]}],
                }
            ],
        },
    },
    "AuditEvent": {
        "resourceType": "AuditEvent",
        "id": "ae1",
        "type": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110110"},
        "action": "E",
        "recorded": "2024-01-02T10:00:00Z",
        "outcome": "0",
        "agent": [
            {
                "requestor": True,
                "who": {"reference": "Practitioner/dr1"},
                "network": {"address": "10.0.0.1", "type": "2"},
            }
        ],
        "source": {"observer": {"reference": "Organization/lab"}},
        "entity": [{"what": {"reference": "Patient/p1"}}],
    },
    "Provenance": {
        "resourceType": "Provenance",
        "id": "prov1",
        "target": [{"reference": "Observation/hb1"}],
        "recorded": "2024-01-02T10:00:00Z",
        "agent": [{"who": {"reference": "Organization/lab"}}],
        "entity": [{"role": "source", "what": {"reference": "DocumentReference/d1"}}],
        "signature": [
            {
                "type": [
                    {"system": "urn:iso-astm:E1762-95:2013", "code": "1.2.840.10065.1.12.1.1"}
                ],
                "when": "2024-01-02T10:00:00Z",
                "who": {"reference": "Organization/lab"},
                "sigFormat": "application/jose",
            }
        ],
    },
}

# (binding key, resource type, expression of an element bound to it in VALID[type])
CASES: list[tuple[tuple[str, str], str, str]] = [
    (("Address", "use"), "Patient", "Patient.address[0].use"),
    (("Address", "type"), "Organization", "Organization.contact[0].address.type"),
    (("ContactPoint", "system"), "Patient", "Patient.telecom[1].system"),
    (("ContactPoint", "system"), "Practitioner", "Practitioner.telecom[0].system"),
    (("ContactPoint", "use"), "Patient", "Patient.contact[0].telecom[0].use"),
    (("ContactPoint", "use"), "Organization", "Organization.contact[0].telecom[0].use"),
    (("HumanName", "use"), "Practitioner", "Practitioner.name[0].use"),
    (("HumanName", "use"), "Organization", "Organization.contact[0].name.use"),
    (("Identifier", "use"), "Patient", "Patient.identifier[0].use"),
    (("Identifier", "use"), "Practitioner", "Practitioner.qualification[0].identifier[0].use"),
    (("Identifier", "use"), "DiagnosticReport", "DiagnosticReport.subject.identifier.use"),
    (("Identifier", "use"), "Patient", "Patient.birthDate.extension[0].valueIdentifier.use"),
    (("Narrative", "status"), "Observation", "Observation.text.status"),
    (("Quantity", "comparator"), "Observation", "Observation.valueQuantity.comparator"),
    (
        ("Quantity", "comparator"),
        "Observation",
        "Observation.component[0].valueQuantity.comparator",
    ),
    (("Age", "comparator"), "Patient", "Patient.extension[0].valueAge.comparator"),
    (("Count", "comparator"), "Patient", "Patient.extension[1].valueCount.comparator"),
    (("Distance", "comparator"), "Patient", "Patient.extension[2].valueDistance.comparator"),
    (("Duration", "comparator"), "Patient", "Patient.extension[3].valueDuration.comparator"),
    (("Contributor", "type"), "Patient", "Patient.extension[4].valueContributor.type"),
    (
        ("DataRequirementSort", "direction"),
        "Patient",
        "Patient.extension[5].valueDataRequirement.sort[0].direction",
    ),
    (
        ("ParameterDefinition", "use"),
        "Patient",
        "Patient.extension[6].valueParameterDefinition.use",
    ),
    (("RelatedArtifact", "type"), "Patient", "Patient.extension[7].valueRelatedArtifact.type"),
    (
        ("TriggerDefinition", "type"),
        "Patient",
        "Patient.extension[8].valueTriggerDefinition.type",
    ),
    (
        ("TimingRepeat", "durationUnit"),
        "ServiceRequest",
        "ServiceRequest.occurrenceTiming.repeat.durationUnit",
    ),
    (
        ("TimingRepeat", "periodUnit"),
        "ServiceRequest",
        "ServiceRequest.occurrenceTiming.repeat.periodUnit",
    ),
    (
        ("TimingRepeat", "dayOfWeek"),
        "ServiceRequest",
        "ServiceRequest.occurrenceTiming.repeat.dayOfWeek[1]",
    ),
    (("TimingRepeat", "when"), "ServiceRequest", "ServiceRequest.occurrenceTiming.repeat.when[0]"),
    (
        ("TimingRepeat", "when"),
        "ServiceRequest",
        "ServiceRequest.occurrenceTiming.repeat.when[1]",
    ),
    (("Patient", "gender"), "Patient", "Patient.gender"),
    (("Patient", "gender"), "Observation", "Observation.contained[0].gender"),
    (("ContactPoint", "system"), "Observation", "Observation.contained[0].telecom[0].system"),
    (("PatientContact", "gender"), "Patient", "Patient.contact[0].gender"),
    (("PatientLink", "type"), "Patient", "Patient.link[0].type"),
    (("Practitioner", "gender"), "Practitioner", "Practitioner.gender"),
    (("Observation", "status"), "Observation", "Observation.status"),
    (("DiagnosticReport", "status"), "DiagnosticReport", "DiagnosticReport.status"),
    (("ImagingStudy", "status"), "ImagingStudy", "ImagingStudy.status"),
    (("ServiceRequest", "status"), "ServiceRequest", "ServiceRequest.status"),
    (("ServiceRequest", "intent"), "ServiceRequest", "ServiceRequest.intent"),
    (("ServiceRequest", "priority"), "ServiceRequest", "ServiceRequest.priority"),
    (("Consent", "status"), "Consent", "Consent.status"),
    (("ConsentProvision", "type"), "Consent", "Consent.provision.type"),
    (("ConsentProvision", "type"), "Consent", "Consent.provision.provision[0].type"),
    (
        ("ConsentProvision", "type"),
        "Consent",
        "Consent.provision.provision[0].provision[0].type",
    ),
    (
        ("ConsentProvisionData", "meaning"),
        "Consent",
        "Consent.provision.provision[0].data[0].meaning",
    ),
    (("AuditEvent", "action"), "AuditEvent", "AuditEvent.action"),
    (("AuditEvent", "outcome"), "AuditEvent", "AuditEvent.outcome"),
    (("AuditEventAgentNetwork", "type"), "AuditEvent", "AuditEvent.agent[0].network.type"),
    (("ProvenanceEntity", "role"), "Provenance", "Provenance.entity[0].role"),
]

_SEGMENT = re.compile(r"(\w+)(?:\[(\d+)\])?")


def locate(data: dict[str, Any], expression: str) -> tuple[Any, str | int]:
    """The container and key of the element at ``expression`` in FHIR JSON ``data``."""
    segments = [_SEGMENT.fullmatch(part) for part in expression.split(".")[1:]]
    node: Any = data
    for number, match in enumerate(segments):
        assert match is not None, expression
        name, index = match.group(1), match.group(2)
        last = number == len(segments) - 1
        if not last and not isinstance(node.get(name), dict | list):
            name = "_" + name  # the extensions of a primitive
        if index is None:
            if last:
                return node, name
            node = node[name]
        else:
            if last:
                return node[name], int(index)
            node = node[name][int(index)]
    raise AssertionError(expression)


def with_value(resource_type: str, expression: str, value: str) -> tuple[Any, str]:
    """A model of VALID[resource_type] with ``value`` at ``expression``, and the value it had."""
    data = copy.deepcopy(VALID[resource_type])
    container, key = locate(data, expression)
    old = container[key]
    container[key] = value
    return get_fhir_model_class(resource_type).model_validate(data), old


def case_id(case: tuple[tuple[str, str], str, str]) -> str:
    return case[2]


def test_the_table_is_r4() -> None:
    assert codes._BINDINGS == ALLOWED


def test_every_checked_element_has_a_case() -> None:
    assert {key for key, _, _ in CASES} == set(ALLOWED)


@pytest.mark.parametrize("resource_type", sorted(VALID))
def test_valid_resources_have_no_issues(resource_type: str) -> None:
    model = get_fhir_model_class(resource_type).model_validate(VALID[resource_type])
    assert code_issues(model) == []


@pytest.mark.parametrize("code", [code for allowed in ALLOWED.values() for code in allowed])
def test_every_allowed_code_passes_where_it_is_bound(code: str) -> None:
    for key, resource_type, expression in CASES:
        if code in ALLOWED[key]:
            model, _ = with_value(resource_type, expression, code)
            assert code_issues(model) == [], expression


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_a_wrong_code_is_reported(case: tuple[tuple[str, str], str, str]) -> None:
    key, resource_type, expression = case
    model, old = with_value(resource_type, expression, "bogus")
    assert old in ALLOWED[key], "the valid resource has a right code there"
    assert code_issues(model) == [CodeIssue(expression, "bogus", ALLOWED[key])]


def current(resource_type: str, expression: str) -> str:
    container, key = locate(VALID[resource_type], expression)
    value = container[key]
    assert isinstance(value, str)
    return value


@pytest.mark.parametrize(
    "case",
    [case for case in CASES if current(case[1], case[2]).swapcase() != current(case[1], case[2])],
    ids=case_id,
)
def test_codes_are_case_sensitive(case: tuple[tuple[str, str], str, str]) -> None:
    key, resource_type, expression = case
    right = current(resource_type, expression)
    for wrong in {right.swapcase(), right.upper(), right.lower(), right.capitalize()} - {right}:
        model, _ = with_value(resource_type, expression, wrong)
        assert code_issues(model) == [CodeIssue(expression, wrong, ALLOWED[key])]


def test_issues_come_in_document_order_with_list_indexes() -> None:
    data = copy.deepcopy(VALID["Patient"])
    data["gender"] = "F"
    data["telecom"][0]["system"] = "mobile"
    data["telecom"][1]["use"] = "private"
    data["identifier"][0]["use"] = "primary"
    data["link"][0]["type"] = "see-also"
    data["text"]["status"] = "Generated"
    issues = code_issues(get_fhir_model_class("Patient").model_validate(data))
    assert [(issue.expression, issue.value) for issue in issues] == [
        ("Patient.text.status", "Generated"),
        ("Patient.identifier[0].use", "primary"),
        ("Patient.telecom[0].system", "mobile"),
        ("Patient.telecom[1].use", "private"),
        ("Patient.gender", "F"),
        ("Patient.link[0].type", "see-also"),
    ]


def test_deeply_nested_provisions() -> None:
    data = copy.deepcopy(VALID["Consent"])
    inner: dict[str, Any] = {"type": "allow"}
    for _ in range(4):
        inner = {"type": "permit", "provision": [{"type": "deny"}, inner]}
    data["provision"] = inner
    issues = code_issues(get_fhir_model_class("Consent").model_validate(data))
    expression = "Consent.provision" + ".provision[1]" * 4 + ".type"
    assert issues == [CodeIssue(expression, "allow", ("deny", "permit"))]


def test_every_item_of_a_repeating_code_is_checked() -> None:
    data = copy.deepcopy(VALID["ServiceRequest"])
    data["occurrenceTiming"]["repeat"]["dayOfWeek"] = ["mon", "Tue", "wed", "thursday"]
    issues = code_issues(get_fhir_model_class("ServiceRequest").model_validate(data))
    prefix = "ServiceRequest.occurrenceTiming.repeat.dayOfWeek"
    assert [(issue.expression, issue.value) for issue in issues] == [
        (f"{prefix}[1]", "Tue"),
        (f"{prefix}[3]", "thursday"),
    ]


def test_contained_resources_of_another_type() -> None:
    data = copy.deepcopy(VALID["Observation"])
    practitioner = copy.deepcopy(VALID["Practitioner"])
    practitioner["gender"] = "x"
    practitioner["qualification"][0]["identifier"][0]["use"] = "y"
    data["contained"].append(practitioner)
    issues = code_issues(get_fhir_model_class("Observation").model_validate(data))
    assert [(issue.expression, issue.value) for issue in issues] == [
        ("Observation.contained[1].gender", "x"),
        ("Observation.contained[1].qualification[0].identifier[0].use", "y"),
    ]


def test_a_datatype_is_checked_wherever_it_appears() -> None:
    model = get_fhir_model_class("Identifier").model_validate({"use": "main", "value": "1"})
    assert code_issues(model) == [CodeIssue("Identifier.use", "main", ALLOWED["Identifier", "use"])]
    bundle = get_fhir_model_class("Bundle").model_validate(
        {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [{"resource": {"resourceType": "Patient", "gender": "M"}}],
        }
    )
    assert code_issues(bundle) == [CodeIssue("Bundle.entry[0].resource.gender", "M", GENDER)]


def test_bindings_that_are_not_required_or_not_enumerated_are_not_checked() -> None:
    data = copy.deepcopy(VALID["DiagnosticReport"])
    data["language"] = "xx-nonsense"  # preferred binding
    data["presentedForm"][0]["contentType"] = "application/x-unheard-of"  # MIME types
    data["presentedForm"][0]["language"] = "tlh"
    data["extension"] = [
        {"url": "http://example.org/e", "valueExpression": {"language": "text/python"}},
        {"url": "http://example.org/m", "valueMoney": {"value": 1, "currency": "XYZ"}},
    ]
    data["result"][0]["type"] = "NotAResource"  # extensible
    model = get_fhir_model_class("DiagnosticReport").model_validate(data)
    assert code_issues(model) == []


def test_primitive_extensions_are_not_codes() -> None:
    data = copy.deepcopy(VALID["Patient"])
    data["_gender"] = {"id": "bogus", "extension": [{"url": "http://x", "valueCode": "bogus"}]}
    assert code_issues(get_fhir_model_class("Patient").model_validate(data)) == []


def test_only_r4b_models() -> None:
    from fhir.resources.patient import Patient  # R5

    with pytest.raises(TypeError, match="R4B"):
        code_issues(Patient(gender="male"))


def test_a_subclass_of_an_r4b_model_is_checked_as_its_base() -> None:
    base = get_fhir_model_class("Patient")

    class LocalPatient(base):  # type: ignore[misc, valid-type]
        pass

    model = LocalPatient.model_validate({"resourceType": "Patient", "gender": "Female"})
    assert code_issues(model) == [CodeIssue("Patient.gender", "Female", GENDER)]


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet="mfaleotuhrnkwMF-<>=0123", min_size=1, max_size=8))
def test_gender_and_comparator_accept_exactly_their_codes(value: str) -> None:
    patient, _ = with_value("Patient", "Patient.contact[0].gender", value)
    issues = code_issues(patient)
    assert (issues == []) == (value in GENDER)
    observation, _ = with_value("Observation", "Observation.valueQuantity.comparator", value)
    issues = code_issues(observation)
    assert (issues == []) == (value in COMPARATOR)
