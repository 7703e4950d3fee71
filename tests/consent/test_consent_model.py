"""FHIR Consent to consent terms and ledger bodies, and the pseudonym."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from consent.errors import ConsentError
from consent.model import (
    CARE_PURPOSES,
    CATEGORIES,
    PURPOSES,
    consent_resource,
    fhir_time,
    granted_body,
    is_exchange_consent,
    ledger_action,
    patient_reference,
    terms_from_body,
    terms_of,
)
from consent.pseudonym import RESIDENT_ID_SYSTEM, is_pseudonym, pseudonym
from fhir_adapters.store.resources import validate

MEMBERS = {"hosp-a", "hosp-b", "hosp-c"}
RECORDED = "2026-11-25T02:00:00.000Z"


def made(**changes: Any) -> dict[str, Any]:
    resource = consent_resource(
        "p1", ["hosp-b"], ["laboratory", "imaging"], ["TREAT"], "2026-11-25", "2027-05-24"
    )
    resource.update(changes)
    return resource


def test_a_built_consent_is_valid_fhir_and_maps_back_to_its_terms() -> None:
    resource = made()
    validate(resource, "Consent")
    assert is_exchange_consent(resource)
    assert patient_reference(resource) == "p1"
    terms = terms_of(resource, MEMBERS, RECORDED)
    assert terms.grantees == ("hosp-b",)
    assert terms.categories == ("imaging", "laboratory")
    assert terms.purposes == ("TREAT",)
    # whole days in the consortium's time zone (UTC+08:00)
    assert terms.start == "2026-11-24T16:00:00.000Z"
    assert terms.end == "2027-05-24T15:59:59.999Z"
    body = granted_body("c1", "f" * 64, terms, "0" * 64)
    assert terms_from_body(body) == terms


def test_absent_elements_grant_everything_they_could_name_but_research() -> None:
    resource = consent_resource("p1", [], [], [], None, None)
    resource["provision"] = {"type": "permit"}
    terms = terms_of(resource, MEMBERS, RECORDED)
    assert terms.grantees == ("*",)
    assert terms.purposes == CARE_PURPOSES[::-1] == ("ETREAT", "TREAT")  # never HRESCH, PUBHLTH
    assert terms.categories == tuple(sorted(CATEGORIES))
    assert terms.start == RECORDED and terms.end is None
    resource["dateTime"] = "2026-11-20T08:30:00+08:00"
    assert terms_of(resource, MEMBERS, RECORDED).start == "2026-11-20T00:30:00.000Z"


def test_research_and_public_health_are_granted_when_named() -> None:
    resource = consent_resource("p1", ["hosp-b"], ["laboratory"], PURPOSES, None, None)
    validate(resource, "Consent")
    assert terms_of(resource, MEMBERS, RECORDED).purposes == (
        "ETREAT",
        "HRESCH",
        "PUBHLTH",
        "TREAT",
    )
    resource["provision"]["purpose"][0]["code"] = "HMARKT"  # marketing: no consent names it
    with pytest.raises(ConsentError, match="HMARKT"):
        terms_of(resource, MEMBERS, RECORDED)


@pytest.mark.parametrize(
    ("text", "end", "expected"),
    [
        ("2026", False, "2025-12-31T16:00:00.000Z"),
        ("2026", True, "2026-12-31T15:59:59.999Z"),
        ("2026-02", True, "2026-02-28T15:59:59.999Z"),
        ("2026-12", True, "2026-12-31T15:59:59.999Z"),
        ("2026-11-25T10:00:00Z", False, "2026-11-25T10:00:00.000Z"),
        ("2026-11-25T10:00:00.1234-05:00", True, "2026-11-25T15:00:00.123Z"),
    ],
)
def test_fhir_times(text: str, end: bool, expected: str) -> None:
    assert fhir_time(text, end=end, where="x") == expected


@pytest.mark.parametrize("text", ["2026-13", "2026-02-30", "26-01-01", "2026-11-25T10:00", ""])
def test_bad_times_are_refused(text: str) -> None:
    with pytest.raises(ConsentError):
        fhir_time(text, end=False, where="x")


def _provision(**changes: Any) -> dict[str, Any]:
    resource = made()
    resource["provision"] = {**resource["provision"], **changes}
    return resource


@pytest.mark.parametrize(
    ("resource", "expression", "words"),
    [
        (made(patient={"reference": "Group/1"}), "Consent.patient", "Patient/<id>"),
        ({**made(), "provision": None}, "Consent.provision", "needs a provision"),
        (_provision(type="deny"), "Consent.provision.type", "only permits"),
        (
            _provision(provision=[{"type": "deny"}]),
            "Consent.provision.provision",
            "not be enforced",
        ),
        (
            _provision(securityLabel=[{"code": "R"}]),
            "Consent.provision.securityLabel",
            "cannot be recorded",
        ),
        (
            _provision(data=[{"meaning": "instance"}]),
            "Consent.provision.data",
            "cannot be recorded",
        ),
        (
            _provision(actor=[{"reference": {"reference": "Organization/1"}}]),
            "Consent.provision.actor[0].reference",
            "by identifier",
        ),
        (
            _provision(
                actor=[{"reference": {"identifier": {"system": "urn:hrx:member", "value": "x"}}}]
            ),
            "Consent.provision.actor[0].reference.identifier.value",
            "not a member",
        ),
        (
            _provision(
                purpose=[
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                        "code": "HMARKT",
                    }
                ]
            ),
            "Consent.provision.purpose[0].code",
            "not one of TREAT, ETREAT",
        ),
        (
            _provision(**{"class": [{"system": "urn:x", "code": "laboratory"}]}),
            "Consent.provision.class[0]",
            "must be a code",
        ),
        (
            _provision(period={"start": "2026-11-25", "end": "2026-11-01"}),
            "Consent.provision.period",
            "ends before",
        ),
    ],
)
def test_consents_the_ledger_cannot_carry_are_refused(
    resource: dict[str, Any], expression: str, words: str
) -> None:
    with pytest.raises(ConsentError, match=words) as caught:
        patient_reference(resource)
        terms_of(resource, MEMBERS, RECORDED)
    assert caught.value.expression == expression


def test_status_decides_the_entry() -> None:
    assert ledger_action("active") == "granted"
    for status in ("inactive", "rejected", "entered-in-error"):
        assert ledger_action(status) == "revoked"
    for status in ("draft", "proposed"):
        assert ledger_action(status) is None
    research = copy.deepcopy(made())
    research["scope"]["coding"][0]["code"] = "research"
    assert not is_exchange_consent(research)


def test_pseudonym_is_keyed_and_normalises_the_resident_id() -> None:
    secret = bytes(range(32))
    one = pseudonym(secret, RESIDENT_ID_SYSTEM, "11010519491231002x")
    assert is_pseudonym(one)
    assert one == pseudonym(secret, RESIDENT_ID_SYSTEM, " 11010519491231002X ")
    assert one != pseudonym(bytes(32), RESIDENT_ID_SYSTEM, "11010519491231002X")
    assert one != pseudonym(secret, "urn:other", "11010519491231002X")
    assert pseudonym(secret, "urn:other", "ab") != pseudonym(secret, "urn:other", "AB")
    # a fixed vector, so another implementation can check itself against this one
    assert pseudonym(bytes(32), RESIDENT_ID_SYSTEM, "11010519491231002x") == (
        "969f9155f6493a6e049b4c4a6b6b87314a5f5a550bc67d69590eb187630f191e"
    )
    with pytest.raises(ValueError):
        pseudonym(secret, RESIDENT_ID_SYSTEM, " ")
