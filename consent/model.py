"""FHIR Consent to and from the consortium's consent terms and ledger entry bodies
(docs/spec.md §13.2, §14.1).

An *exchange consent* is a FHIR R4 Consent whose ``scope`` is ``patient-privacy``: the patient
lets members of the consortium see records held by this member. It maps to :class:`Terms`:

- ``provision.actor[].reference.identifier`` with system :data:`MEMBER_SYSTEM` names the
  members granted access (``grantees``); no actor grants every member (``["*"]``);
- ``provision.purpose`` (v3 ActReason): ``TREAT``, ``ETREAT`` (emergency), ``HRESCH``
  (health research), ``PUBHLTH`` (public health, the regional platform's statistics); none:
  the two of care (:data:`CARE_PURPOSES`), never research or public health, which a patient
  must name;
- ``provision.class`` (observation-category codes): the data categories; none: all of them;
- ``provision.period`` (else ``Consent.dateTime``, else the time it is recorded) bounds it,
  with partial dates read in the consortium's time zone (UTC+08:00) as their whole span.

Anything a provision could say that the ledger entry cannot carry (``type`` ``deny``, nested
exception provisions, ``action``, ``securityLabel``, ``code``, ``data``, ``dataPeriod``) is
refused rather than ignored: a restriction silently dropped would widen what is shared.

Status decides the entry: ``active`` grants (``consent.granted``; a later grant of the same
consent supersedes the earlier one, which is how a patient narrows a consent);
``inactive``, ``rejected`` and ``entered-in-error`` revoke a consent that was granted
(``consent.revoked``); ``draft`` and ``proposed`` are not yet anything.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from consent.errors import ConsentError
from ledger.model import format_time

CONSENT_SCOPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/consentscope"
PRIVACY_SCOPE = "patient-privacy"
ACT_REASON_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
CARE_PURPOSES = ("TREAT", "ETREAT")  # what a consent naming no purpose covers
RESEARCH = "HRESCH"
PURPOSES = (*CARE_PURPOSES, RESEARCH, "PUBHLTH")  # v3 ActReason (GeneralPurposeOfUse)
EMERGENCY = "ETREAT"
# Why a doctor breaks the glass (ETREAT without consent): one of these codes, with a text of
# EMERGENCY_REASON_CHARS characters that says it for this patient (kept off the ledger)
EMERGENCY_REASONS = {
    "unconscious": ("患者昏迷或无法表达意愿", "the patient is unconscious or cannot consent"),
    "life-threatening": ("危及生命的急危重症", "a life-threatening condition"),
    "no-representative": (
        "无法及时联系到监护人或代理人",
        "no guardian or representative can be reached in time",
    ),
    "public-health": ("突发公共卫生事件", "a public health emergency"),
    "other": ("其他（须详细说明）", "other (say which in the text)"),
}
EMERGENCY_REASON_CHARS = (10, 500)
CATEGORY_SYSTEM = "http://terminology.hl7.org/CodeSystem/observation-category"
CATEGORIES = (
    "laboratory",
    "imaging",
    "vital-signs",
    "procedure",
    "exam",
    "therapy",
    "social-history",
    "survey",
    "activity",
)
MEMBER_SYSTEM = "urn:hrx:member"  # Identifier.system of a consortium member's id
ALL_MEMBERS = "*"
LOINC = "http://loinc.org"
CONSENT_DOCUMENT = "59284-0"  # LOINC: Patient Consent
ACT_CODE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
PARTICIPATION_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
WITNESS_URL = "http://hl7.org/fhir/StructureDefinition/consent-Witness"
TRANSCRIBER_URL = "http://hl7.org/fhir/StructureDefinition/consent-Transcriber"
CONSORTIUM_ZONE = timezone(timedelta(hours=8))

GRANTING = "active"
REVOKING = ("inactive", "rejected", "entered-in-error")
UNSUPPORTED_PROVISION = ("action", "securityLabel", "code", "data", "dataPeriod", "provision")

_DATE_TIME = re.compile(
    r"(?P<year>[0-9]{4})(?:-(?P<month>[0-9]{2})(?:-(?P<day>[0-9]{2})"
    r"(?:T(?P<hour>[0-9]{2}):(?P<minute>[0-9]{2}):(?P<second>[0-9]{2})(?:\.(?P<fraction>[0-9]+))?"
    r"(?P<zone>Z|[+-][0-9]{2}:[0-9]{2}))?)?)?"
)


@dataclass(frozen=True)
class Terms:
    """What a granted consent allows: who, which categories, for what, from when to when."""

    grantees: tuple[str, ...]  # member ids, sorted, or ("*",)
    categories: tuple[str, ...]  # sorted
    purposes: tuple[str, ...]  # sorted
    start: str  # ledger time (RFC 3339 UTC, milliseconds)
    end: str | None  # inclusive; None: open

    def period(self) -> dict[str, str | None]:
        return {"start": self.start, "end": self.end}


def is_exchange_consent(resource: dict[str, Any]) -> bool:
    """Whether a Consent is a privacy consent for the exchange (scope ``patient-privacy``)."""
    scope = resource.get("scope")
    codings = scope.get("coding", []) if isinstance(scope, dict) else []
    return any(
        isinstance(c, dict)
        and c.get("system") == CONSENT_SCOPE_SYSTEM
        and c.get("code") == PRIVACY_SCOPE
        for c in codings
    )


def ledger_action(status: str) -> str | None:
    """``"granted"``, ``"revoked"``, or None for a consent status that is not yet a decision."""
    if status == GRANTING:
        return "granted"
    if status in REVOKING:
        return "revoked"
    return None


def patient_reference(resource: dict[str, Any]) -> str:
    """The id of the local Patient a Consent is about."""
    reference = resource.get("patient", {}).get("reference")
    if not isinstance(reference, str) or not re.fullmatch(
        r"Patient/[A-Za-z0-9\-.]{1,64}", reference
    ):
        raise ConsentError(
            "a privacy consent must name its patient as a local reference Patient/<id>",
            "Consent.patient",
        )
    return reference.split("/", 1)[1]


def fhir_time(text: str, *, end: bool, where: str) -> str:
    """A FHIR date or dateTime as a ledger time; a partial one as the first (or, for an
    ``end``, the last) millisecond it covers, in the consortium's time zone when it has none."""
    match = _DATE_TIME.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ConsentError(f"{text!r} is not a FHIR date or dateTime", where)
    parts = match.groupdict()
    try:
        year = int(parts["year"])
        if parts["month"] is None:
            first = datetime(year, 1, 1, tzinfo=CONSORTIUM_ZONE)
            following = datetime(year + 1, 1, 1, tzinfo=CONSORTIUM_ZONE)
        elif parts["day"] is None:
            month = int(parts["month"])
            first = datetime(year, month, 1, tzinfo=CONSORTIUM_ZONE)
            following = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=CONSORTIUM_ZONE)
        elif parts["hour"] is None:
            first = datetime(year, int(parts["month"]), int(parts["day"]), tzinfo=CONSORTIUM_ZONE)
            following = first + timedelta(days=1)
        else:
            zone = (
                UTC
                if parts["zone"] == "Z"
                else timezone(
                    (-1 if parts["zone"][0] == "-" else 1)
                    * timedelta(hours=int(parts["zone"][1:3]), minutes=int(parts["zone"][4:6]))
                )
            )
            fraction = (parts["fraction"] or "")[:6].ljust(6, "0")
            first = datetime(
                year,
                int(parts["month"]),
                int(parts["day"]),
                int(parts["hour"]),
                int(parts["minute"]),
                int(parts["second"]),
                int(fraction),
                tzinfo=zone,
            )
            following = first + timedelta(milliseconds=1)
    except (ValueError, OverflowError):
        raise ConsentError(f"{text!r} is not a valid date", where) from None
    if end:
        return format_time(following - timedelta(milliseconds=1))
    return format_time(first)


def _codes(items: Any, system: str, allowed: Collection[str], where: str) -> set[str]:
    found: set[str] = set()
    for index, coding in enumerate(items or []):
        place = f"{where}[{index}]"
        if not isinstance(coding, dict) or coding.get("system") != system:
            raise ConsentError(f"{place} must be a code of {system}", place)
        code = coding.get("code")
        if code not in allowed:
            raise ConsentError(
                f"{place}: {code!r} is not one of {', '.join(allowed)}", f"{place}.code"
            )
        found.add(str(code))
    return found


def terms_of(resource: dict[str, Any], members: Collection[str], recorded: str) -> Terms:
    """The terms of an exchange consent; ``members`` are the consortium's member ids and
    ``recorded`` the ledger time it is being recorded at (its start when it states none)."""
    provision = resource.get("provision")
    if not isinstance(provision, dict):
        raise ConsentError(
            "a privacy consent needs a provision saying who may see what", "Consent.provision"
        )
    if provision.get("type", "permit") != "permit":
        raise ConsentError(
            "the consortium shares nothing without consent, so a consent only permits: revoke "
            "(status inactive) the consents that grant access instead of adding a deny",
            "Consent.provision.type",
        )
    for name in UNSUPPORTED_PROVISION:
        if name in provision:
            raise ConsentError(
                f"provision.{name} cannot be recorded on the consortium ledger, and a restriction "
                "that is not recorded would not be enforced; express the consent with actor, "
                "purpose, class and period only",
                f"Consent.provision.{name}",
            )
    grantees: set[str] = set()
    for index, actor in enumerate(provision.get("actor") or []):
        place = f"Consent.provision.actor[{index}].reference"
        identifier = (
            actor.get("reference", {}).get("identifier") if isinstance(actor, dict) else None
        )
        if not isinstance(identifier, dict) or identifier.get("system") != MEMBER_SYSTEM:
            raise ConsentError(
                f"{place} must name a consortium member by identifier (system {MEMBER_SYSTEM})",
                place,
            )
        member = identifier.get("value")
        if member not in members:
            raise ConsentError(
                f"{place}: {member!r} is not a member of the consortium "
                f"({', '.join(sorted(members))})",
                f"{place}.identifier.value",
            )
        grantees.add(str(member))
    purposes = _codes(
        provision.get("purpose"), ACT_REASON_SYSTEM, PURPOSES, "Consent.provision.purpose"
    ) or set(CARE_PURPOSES)
    categories = _codes(
        provision.get("class"), CATEGORY_SYSTEM, CATEGORIES, "Consent.provision.class"
    ) or set(CATEGORIES)
    period = provision.get("period") or {}
    if "start" in period:
        start = fhir_time(period["start"], end=False, where="Consent.provision.period.start")
    elif "dateTime" in resource:
        start = fhir_time(resource["dateTime"], end=False, where="Consent.dateTime")
    else:
        start = recorded
    end = None
    if "end" in period:
        end = fhir_time(period["end"], end=True, where="Consent.provision.period.end")
        if end < start:
            raise ConsentError(
                "the consent's period ends before it starts", "Consent.provision.period"
            )
    return Terms(
        grantees=tuple(sorted(grantees)) if grantees else (ALL_MEMBERS,),
        categories=tuple(sorted(categories)),
        purposes=tuple(sorted(purposes)),
        start=start,
        end=end,
    )


def granted_body(consent_id: str, patient: str, terms: Terms, resource_hash: str) -> dict[str, Any]:
    """The body of ``consent.granted`` (docs/spec.md §13.2, §14.1)."""
    return {
        "consent_id": consent_id,
        "patient": patient,
        "grantees": list(terms.grantees),
        "categories": list(terms.categories),
        "purposes": list(terms.purposes),
        "period": terms.period(),
        "resource_hash": resource_hash,
    }


def revoked_body(consent_id: str, patient: str) -> dict[str, Any]:
    """The body of ``consent.revoked`` (docs/spec.md §13.2, §14.1)."""
    return {"consent_id": consent_id, "patient": patient}


def terms_from_body(body: dict[str, Any]) -> Terms:
    """The terms a ``consent.granted`` body records (for showing and checking it)."""
    period = body.get("period") or {}
    return Terms(
        grantees=tuple(body.get("grantees") or ()),
        categories=tuple(body.get("categories") or ()),
        purposes=tuple(body.get("purposes") or ()),
        start=str(period.get("start") or ""),
        end=period.get("end"),
    )


def consent_resource(
    patient_id: str,
    grantees: Collection[str],
    categories: Collection[str],
    purposes: Collection[str],
    start: str | None,
    end: str | None,
    *,
    status: str = GRANTING,
) -> dict[str, Any]:
    """A FHIR Consent granting ``grantees`` (member ids; empty or ``*``: every member) the
    ``categories`` for ``purposes`` from ``start`` to ``end`` (FHIR dates or dateTimes)."""
    provision: dict[str, Any] = {"type": "permit"}
    period = {name: value for name, value in (("start", start), ("end", end)) if value}
    if period:
        provision["period"] = period
    members = sorted(set(grantees) - {ALL_MEMBERS})
    if members:
        provision["actor"] = [
            {
                "role": {"coding": [{"system": PARTICIPATION_SYSTEM, "code": "IRCP"}]},
                "reference": {"identifier": {"system": MEMBER_SYSTEM, "value": member}},
            }
            for member in members
        ]
    provision["purpose"] = [{"system": ACT_REASON_SYSTEM, "code": p} for p in sorted(purposes)]
    provision["class"] = [{"system": CATEGORY_SYSTEM, "code": c} for c in sorted(categories)]
    return {
        "resourceType": "Consent",
        "status": status,
        "scope": {"coding": [{"system": CONSENT_SCOPE_SYSTEM, "code": PRIVACY_SCOPE}]},
        "category": [{"coding": [{"system": LOINC, "code": CONSENT_DOCUMENT}]}],
        "patient": {"reference": f"Patient/{patient_id}"},
        "policyRule": {"coding": [{"system": ACT_CODE_SYSTEM, "code": "OPTIN"}]},
        "provision": provision,
    }


def emergency_reason(code: Any, text: Any) -> tuple[str, str]:
    """A break-glass reason as ``(code, text)``: a code of :data:`EMERGENCY_REASONS` and a text
    of 10-500 characters with at least three different characters; ConsentError otherwise."""
    if not isinstance(code, str) or code not in EMERGENCY_REASONS:
        raise ConsentError(
            f"an emergency access needs a reason code, one of {', '.join(EMERGENCY_REASONS)}"
            + (f" (not {str(code)[:40]!r})" if code else ""),
            "reason-code",
        )
    stated = " ".join(text.split()) if isinstance(text, str) else ""
    shortest, longest = EMERGENCY_REASON_CHARS
    if not shortest <= len(stated) <= longest or len(set(stated.replace(" ", ""))) < 3:
        raise ConsentError(
            f"an emergency access needs a reason in words: {shortest}-{longest} characters "
            "saying why this patient's records are needed now",
            "reason",
        )
    return code, stated
