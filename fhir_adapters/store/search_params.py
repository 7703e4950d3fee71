"""The search parameters of each hosted resource type, and the index values of a resource.

Every type's parameters are the official R4 SearchParameters of :mod:`fhir_adapters.definitions`
of the types the index stores (token, string, reference, date, uri, quantity, number), each
reading what its
FHIRPath expression selects (:mod:`fhir_adapters.store.expressions`). For the types the node
has always served, a hand-written table of JSON paths stands in front: it is what today's
searches and the node's own rules (AuditEvent, Consent) were built on, and it is faster.
Composite and special parameters are not searchable yet; a search naming
one is refused, saying so. :func:`index_values` turns a resource into the rows of the index
tables; the search code queries those rows and never parses stored JSON.

Dates without a time zone (``2024-03-01``, ``2024-03-01T08:00:00``) are read in China
Standard Time (UTC+08:00, no daylight saving), both in resources and in search values, so a
date means the day a clinician in the consortium means.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal, cast

from fhir_adapters import definitions
from fhir_adapters.errors import InvalidRequest
from fhir_adapters.store.expressions import Select, compile_expression
from fhir_adapters.store.quantities import LOINC
from fhir_adapters.store.quantities import Row as QuantityRow
from fhir_adapters.store.quantities import rows_of as quantity_rows
from fhir_adapters.store.resources import RESOURCE_TYPES, references

LOCAL_ZONE = timezone(timedelta(hours=8))
ParamType = Literal["token", "string", "reference", "date", "uri", "quantity", "number"]
INDEXED_TYPES = ("token", "string", "reference", "date", "uri", "quantity", "number")


@dataclass(frozen=True)
class SearchParam:
    name: str
    type: ParamType
    paths: tuple[str, ...]  # JSON paths (hand-written), or none when ``select`` reads it
    targets: tuple[str, ...] = ()  # reference: the types it may point to (all hosted when empty)
    description: str = ""
    select: Select | None = None  # the definition's FHIRPath, compiled


def _p(name: str, kind: ParamType, *paths: str, targets: tuple[str, ...] = ()) -> SearchParam:
    return SearchParam(name, kind, paths, targets)


_PATIENT = ("Patient",)
_PEOPLE = ("Practitioner", "Organization", "Patient")

_COMMON_CLINICAL = {
    "identifier": _p("identifier", "token", "identifier"),
}

HAND_WRITTEN: dict[str, dict[str, SearchParam]] = {
    "Patient": {
        "identifier": _p("identifier", "token", "identifier"),
        "name": _p("name", "string", "name"),
        "family": _p("family", "string", "name.family"),
        "given": _p("given", "string", "name.given"),
        "birthdate": _p("birthdate", "date", "birthDate"),
        "gender": _p("gender", "token", "gender"),
        "active": _p("active", "token", "active"),
        "phone": _p("phone", "token", "telecom"),
        "organization": _p(
            "organization", "reference", "managingOrganization", targets=("Organization",)
        ),
        "general-practitioner": _p(
            "general-practitioner",
            "reference",
            "generalPractitioner",
            targets=("Practitioner", "Organization"),
        ),
        "link": _p("link", "reference", "link.other", targets=_PATIENT),
    },
    "Practitioner": {
        "identifier": _p("identifier", "token", "identifier"),
        "name": _p("name", "string", "name"),
        "family": _p("family", "string", "name.family"),
        "given": _p("given", "string", "name.given"),
        "active": _p("active", "token", "active"),
    },
    "Organization": {
        "identifier": _p("identifier", "token", "identifier"),
        "name": _p("name", "string", "name", "alias"),
        "active": _p("active", "token", "active"),
        "type": _p("type", "token", "type"),
        "partof": _p("partof", "reference", "partOf", targets=("Organization",)),
    },
    "Observation": {
        **_COMMON_CLINICAL,
        "patient": _p("patient", "reference", "subject", targets=_PATIENT),
        "subject": _p("subject", "reference", "subject"),
        "code": _p("code", "token", "code"),
        "category": _p("category", "token", "category"),
        "date": _p(
            "date",
            "date",
            "effectiveDateTime",
            "effectivePeriod",
            "effectiveInstant",
        ),
        "status": _p("status", "token", "status"),
        "performer": _p("performer", "reference", "performer"),
        "based-on": _p("based-on", "reference", "basedOn"),
        "has-member": _p("has-member", "reference", "hasMember"),
        "derived-from": _p("derived-from", "reference", "derivedFrom"),
    },
    "DiagnosticReport": {
        **_COMMON_CLINICAL,
        "patient": _p("patient", "reference", "subject", targets=_PATIENT),
        "subject": _p("subject", "reference", "subject"),
        "code": _p("code", "token", "code"),
        "category": _p("category", "token", "category"),
        "date": _p("date", "date", "effectiveDateTime", "effectivePeriod"),
        "issued": _p("issued", "date", "issued"),
        "status": _p("status", "token", "status"),
        "result": _p("result", "reference", "result", targets=("Observation",)),
        "performer": _p("performer", "reference", "performer"),
        "based-on": _p("based-on", "reference", "basedOn"),
    },
    "ImagingStudy": {
        **_COMMON_CLINICAL,
        "patient": _p("patient", "reference", "subject", targets=_PATIENT),
        "subject": _p("subject", "reference", "subject"),
        "started": _p("started", "date", "started"),
        "status": _p("status", "token", "status"),
        "modality": _p("modality", "token", "series.modality"),
        "bodysite": _p("bodysite", "token", "series.bodySite"),
        "basedon": _p("basedon", "reference", "basedOn", targets=("ServiceRequest",)),
        "referrer": _p("referrer", "reference", "referrer", targets=("Practitioner",)),
    },
    "ServiceRequest": {
        **_COMMON_CLINICAL,
        "patient": _p("patient", "reference", "subject", targets=_PATIENT),
        "subject": _p("subject", "reference", "subject"),
        "code": _p("code", "token", "code"),
        "category": _p("category", "token", "category"),
        "status": _p("status", "token", "status"),
        "intent": _p("intent", "token", "intent"),
        "priority": _p("priority", "token", "priority"),
        "authored": _p("authored", "date", "authoredOn"),
        "occurrence": _p("occurrence", "date", "occurrenceDateTime", "occurrencePeriod"),
        "requester": _p("requester", "reference", "requester"),
        "performer": _p("performer", "reference", "performer"),
        "based-on": _p("based-on", "reference", "basedOn"),
    },
    "Consent": {
        **_COMMON_CLINICAL,
        "patient": _p("patient", "reference", "patient", targets=_PATIENT),
        "status": _p("status", "token", "status"),
        "scope": _p("scope", "token", "scope"),
        "category": _p("category", "token", "category"),
        "date": _p("date", "date", "dateTime"),
        "period": _p("period", "date", "provision.period"),
        "purpose": _p("purpose", "token", "provision.purpose"),
        "action": _p("action", "token", "provision.action"),
        "actor": _p("actor", "reference", "provision.actor.reference"),
        "organization": _p("organization", "reference", "organization", targets=("Organization",)),
        "consentor": _p("consentor", "reference", "performer"),
        "data": _p("data", "reference", "provision.data.reference"),
    },
    "AuditEvent": {
        "date": _p("date", "date", "recorded"),
        "type": _p("type", "token", "type"),
        "subtype": _p("subtype", "token", "subtype"),
        "action": _p("action", "token", "action"),
        "outcome": _p("outcome", "token", "outcome"),
        "altid": _p("altid", "token", "agent.altId"),
        "agent": _p("agent", "reference", "agent.who"),
        "entity": _p("entity", "reference", "entity.what"),
        "patient": _p("patient", "reference", "agent.who", "entity.what", targets=_PATIENT),
        "source": _p("source", "token", "source.observer.identifier"),
    },
    "Provenance": {
        "target": _p("target", "reference", "target"),
        "patient": _p("patient", "reference", "target", targets=_PATIENT),
        "agent": _p("agent", "reference", "agent.who", targets=_PEOPLE),
        "recorded": _p("recorded", "date", "recorded"),
        "entity": _p("entity", "reference", "entity.what"),
    },
}


def _from_definitions(resource_type: str) -> dict[str, SearchParam]:
    """The official R4 parameters of a type that the index stores (``_id`` and
    ``_lastUpdated`` are columns of every resource's row, not index rows)."""
    found = {}
    for code, definition in definitions.search_parameters(resource_type).items():
        if (
            code in ("_id", "_lastUpdated")
            or definition.type not in INDEXED_TYPES
            or definition.expression is None
        ):
            continue
        found[code] = SearchParam(
            code,
            cast(ParamType, definition.type),
            (),
            tuple(t for t in definition.targets if t in RESOURCE_TYPES),
            select=compile_expression(definition.expression, resource_type),
        )
    return found


# AuditEvent keeps only its hand-written parameters: the node writes one for every read, so
# each more parameter is index rows on every request (R4's others would double them).
OWN_PARAMETERS_ONLY = ("AuditEvent",)

SEARCH_PARAMS: dict[str, dict[str, SearchParam]] = {
    t: {
        **({} if t in OWN_PARAMETERS_ONLY else _from_definitions(t)),
        **HAND_WRITTEN.get(t, {}),
    }
    for t in RESOURCE_TYPES
}

# The Patient compartment (FHIR R4 CompartmentDefinition "patient"): a resource belongs to a
# patient's compartment when one of these parameters points to that Patient.
COMPARTMENT_PARAMS: dict[str, tuple[str, ...]] = {
    t: definitions.patient_compartment(t) for t in RESOURCE_TYPES
}


def unsupported(resource_type: str, name: str) -> str | None:
    """Why an R4 parameter of the type cannot be searched here (its kind is not indexed
    yet), or None when it is no R4 parameter of the type."""
    definition = definitions.search_parameters(resource_type).get(name)
    if definition is None or name in SEARCH_PARAMS.get(resource_type, {}):
        return None
    return (
        f"{resource_type}'s {name} is a {definition.type} parameter; this server does not "
        "search those yet"
    )


@dataclass
class IndexRows:
    """A resource's values for every search parameter of its type."""

    tokens: list[tuple[str, str, str]] = field(default_factory=list)  # param, system, code
    strings: list[tuple[str, str, str]] = field(default_factory=list)  # param, normalised, as is
    references: list[tuple[str, str, str]] = field(default_factory=list)  # param, type, id
    dates: list[tuple[str, int, int]] = field(default_factory=list)  # param, low, high (µs)
    quantities: list[tuple[str, QuantityRow]] = field(default_factory=list)  # param, row
    compartment: set[str] = field(default_factory=set)  # patient ids
    links: list[tuple[str, str]] = field(default_factory=list)  # every local reference


def _walk(value: Any, path: list[str]) -> Iterator[Any]:
    if isinstance(value, list):
        for item in value:
            yield from _walk(item, path)
        return
    if not path:
        yield value
        return
    if isinstance(value, dict) and path[0] in value:
        yield from _walk(value[path[0]], path[1:])


def values_at(resource: dict[str, Any], dotted: str) -> Iterator[Any]:
    return _walk(resource, dotted.split("."))


def normalise_string(text: str) -> str:
    """Case- and accent-insensitive form for string search (FHIR: "ignoring case and
    combining characters"), width-folded so full-width Latin matches half-width."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold().strip()


def _tokens(value: Any) -> Iterator[tuple[str, str]]:
    if isinstance(value, bool):
        yield "", "true" if value else "false"
    elif isinstance(value, str):
        yield "", value
    elif isinstance(value, dict):
        if "coding" in value:
            for coding in value["coding"]:
                if isinstance(coding, dict) and isinstance(coding.get("code"), str):
                    yield str(coding.get("system", "")), coding["code"]
        elif isinstance(value.get("code"), str):  # Coding
            yield str(value.get("system", "")), value["code"]
        elif isinstance(value.get("value"), str):  # Identifier, ContactPoint
            yield str(value.get("system", "")), value["value"]


def _typed(value: Any) -> Iterator[tuple[str, str]]:
    """(type system, "type code|value") of an Identifier with a type (``:of-type``)."""
    if not isinstance(value, dict) or not isinstance(value.get("value"), str):
        return
    for coding in (value.get("type") or {}).get("coding", []):
        if isinstance(coding, dict) and isinstance(coding.get("code"), str):
            yield str(coding.get("system", "")), f"{coding['code']}|{value['value']}"


def _token_texts(value: Any) -> Iterator[str]:
    """The words of a coded value (``:text``): a CodeableConcept's text and its codings'
    displays, a Coding's display, an Identifier's type text."""
    if not isinstance(value, dict):
        return
    for text in (value.get("text"), value.get("display")):
        if isinstance(text, str):
            yield text
    for coding in value.get("coding", []) if isinstance(value.get("coding"), list) else []:
        if isinstance(coding, dict) and isinstance(coding.get("display"), str):
            yield coding["display"]


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):  # HumanName, Address
        for key in (
            "text",
            "family",
            "given",
            "prefix",
            "suffix",
            "line",
            "city",
            "district",
            "state",
            "postalCode",
            "country",
        ):
            item = value.get(key)
            if isinstance(item, str):
                yield item
            elif isinstance(item, list):
                yield from (part for part in item if isinstance(part, str))


def parse_reference(reference: str, base_url: str = "") -> tuple[str, str] | None:
    """(type, id) of a local reference ``Type/id`` (``/_history/n`` dropped, the server's own
    base URL accepted), or None for anything else (absolute, contained, urn)."""
    if base_url and reference.startswith(base_url.rstrip("/") + "/"):
        reference = reference[len(base_url.rstrip("/")) + 1 :]
    parts = reference.split("/")
    if len(parts) in (2, 4) and (len(parts) == 2 or parts[2] == "_history"):
        resource_type, resource_id = parts[0], parts[1]
        if _TYPE.fullmatch(resource_type) and _ID.fullmatch(resource_id):
            return resource_type, resource_id
    return None


_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")

# --- dates ---------------------------------------------------------------------------------

_DATE = re.compile(
    r"(?P<year>\d{4})(?:-(?P<month>\d{2})(?:-(?P<day>\d{2})"
    r"(?:T(?P<hour>\d{2}):(?P<minute>\d{2})(?::(?P<second>\d{2})(?P<fraction>\.\d+)?)?"
    r"(?P<zone>Z|[+-]\d{2}:\d{2})?)?)?)?"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MIN_TIME = -(2**62)
MAX_TIME = 2**62


def _micros(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(microseconds=1)


def date_range(text: str) -> tuple[int, int]:
    """The half-open range [low, high) in µs since the epoch that a FHIR date, dateTime or
    instant covers at its precision (``2024`` is the whole year). Raises ValueError."""
    match = _DATE.fullmatch(text)
    if not match:
        raise ValueError(f"{text!r} is not a FHIR date or dateTime")
    parts = match.groupdict()
    zone = LOCAL_ZONE
    if parts["zone"]:
        if parts["zone"] == "Z":
            zone = UTC
        else:
            sign = 1 if parts["zone"][0] == "+" else -1
            hours, minutes = int(parts["zone"][1:3]), int(parts["zone"][4:6])
            zone = timezone(sign * timedelta(hours=hours, minutes=minutes))
    try:
        return _range_of(parts, zone)
    except OverflowError:  # the range ends after 9999-12-31: it runs to the end of time
        return _range_of(parts, zone, open_end=True)


def _range_of(parts: dict[str, Any], zone: Any, *, open_end: bool = False) -> tuple[int, int]:
    year = int(parts["year"])
    if open_end:
        start = datetime(year, int(parts["month"] or 1), int(parts["day"] or 1), tzinfo=zone)
        if parts["hour"] is not None:
            start = start.replace(
                hour=int(parts["hour"]),
                minute=int(parts["minute"]),
                second=int(parts["second"] or 0),
            )
        return _micros(start), MAX_TIME
    if parts["month"] is None:
        start = datetime(year, 1, 1, tzinfo=zone)
        end = datetime(year + 1, 1, 1, tzinfo=zone)
    elif parts["day"] is None:
        month = int(parts["month"])
        start = datetime(year, month, 1, tzinfo=zone)
        end = datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=zone)
    else:
        day_start = datetime(year, int(parts["month"]), int(parts["day"]), tzinfo=zone)
        if parts["hour"] is None:
            start, end = day_start, day_start + timedelta(days=1)
        else:
            start = day_start.replace(hour=int(parts["hour"]), minute=int(parts["minute"]))
            if parts["second"] is None:
                end = start + timedelta(minutes=1)
            else:
                start = start.replace(second=int(parts["second"]))
                fraction = parts["fraction"] or ""
                digits = min(len(fraction) - 1, 6) if fraction else 0
                if digits:
                    start = start.replace(microsecond=int(fraction[1 : digits + 1].ljust(6, "0")))
                end = start + timedelta(microseconds=10 ** (6 - digits))
    return _micros(start), _micros(end)


def _date_values(value: Any) -> Iterator[tuple[int, int]]:
    try:
        if isinstance(value, str):
            yield date_range(value)
        elif isinstance(value, dict) and ("start" in value or "end" in value):  # Period
            low = date_range(value["start"])[0] if "start" in value else MIN_TIME
            high = date_range(value["end"])[1] if "end" in value else MAX_TIME
            yield low, high
    except (ValueError, OverflowError):  # a validated resource's dates are valid; else unindexed
        return


def index_values(resource: dict[str, Any], base_url: str = "") -> IndexRows:
    """Every search-parameter value of a (validated) resource, as index rows."""
    resource_type = resource["resourceType"]
    rows = IndexRows()
    params = SEARCH_PARAMS.get(resource_type, {})
    compartment_params = COMPARTMENT_PARAMS.get(resource_type, ())
    analytes = (
        frozenset(
            c["code"]
            for c in (resource.get("code") or {}).get("coding", [])
            if isinstance(c, dict) and c.get("system") == LOINC and isinstance(c.get("code"), str)
        )
        if isinstance(resource.get("code"), dict)
        else frozenset()
    )
    for param in params.values():
        selected = (
            param.select(resource)
            if param.select is not None
            else [v for path in param.paths for v in values_at(resource, path)]
        )
        for value in selected:
            if param.type == "token":
                rows.tokens.extend((param.name, system, code) for system, code in _tokens(value))
                rows.tokens.extend(  # :of-type: an Identifier by its type and value
                    (f"{param.name}:of-type", system, code) for system, code in _typed(value)
                )
                rows.strings.extend(  # :text searches a concept's text and displays
                    (f"{param.name}:text", normalise_string(text), text.strip())
                    for text in _token_texts(value)
                )
            elif param.type == "uri":
                if isinstance(value, str):
                    rows.tokens.append((param.name, "", value))
            elif param.type == "string":
                rows.strings.extend(
                    (param.name, normalise_string(text), text.strip()) for text in _strings(value)
                )
            elif param.type == "date":
                rows.dates.extend((param.name, low, high) for low, high in _date_values(value))
            elif param.type == "quantity":
                rows.quantities.extend((param.name, q) for q in quantity_rows(value, analytes))
            elif param.type == "number":  # kept with the quantities, without a unit
                rows.quantities.extend((param.name, q) for q in quantity_rows({"value": value}))
            elif (
                isinstance(value, dict)
                and isinstance(value.get("identifier"), dict)
                and ("reference" not in value)
            ):  # :identifier: a reference by its target's identifier, not its id
                rows.tokens.extend(
                    (f"{param.name}:identifier", system, code)
                    for system, code in _tokens(value["identifier"])
                )
            elif isinstance(value, dict) and isinstance(value.get("reference"), str):
                target = parse_reference(value["reference"], base_url)
                if target and (not param.targets or target[0] in param.targets):
                    rows.references.append((param.name, *target))
                    if param.name in compartment_params and target[0] == "Patient":
                        rows.compartment.add(target[1])
    if resource_type == "Patient" and "id" in resource:
        rows.compartment.add(resource["id"])
    if resource_type != "AuditEvent":  # an audit record holds nothing in place
        for _path, reference in references(resource):
            target = parse_reference(reference, base_url)
            if target and target != (resource_type, resource.get("id")):
                rows.links.append(target)
    # one row per distinct value
    rows.tokens = list(dict.fromkeys(rows.tokens))
    rows.strings = list(dict.fromkeys(rows.strings))
    rows.references = list(dict.fromkeys(rows.references))
    rows.dates = list(dict.fromkeys(rows.dates))
    rows.quantities = list(dict.fromkeys(rows.quantities))
    rows.links = list(dict.fromkeys(rows.links))
    return rows


def check_param_name(resource_type: str, name: str) -> SearchParam:
    param = SEARCH_PARAMS.get(resource_type, {}).get(name)
    if param is None:
        known = ", ".join(sorted(SEARCH_PARAMS.get(resource_type, {})))
        raise InvalidRequest(
            f"{resource_type} has no search parameter {name!r}; supported: _id, _lastUpdated, "
            f"{known}"
        )
    return param
