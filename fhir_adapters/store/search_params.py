"""The search parameters of each hosted resource type, and the index values of a resource.

Every type's parameters are the official R4 SearchParameters of :mod:`fhir_adapters.definitions`
of the types the index stores (token, string, reference, date, uri, quantity, number), each
reading what its
FHIRPath expression selects (:mod:`fhir_adapters.store.expressions`). For the types the node
has always served, a hand-written table of JSON paths stands in front: it is what today's
searches and the node's own rules (AuditEvent, Consent) were built on, and it is faster.
A composite parameter of a token and one other value (Observation's ``code-value-quantity``,
``component-code-value-quantity``...) is indexed as the other value's rows under a parameter
name that carries the token (:func:`composite_param`), so both parts hold of one element.
Other composites are refused, saying so. Three parameters R4 leaves to the server are searched
by rules of this module's own: ``_text`` (the narrative's words, indexed in passages),
``_content`` (every string the index holds of a resource: those, string parameters, a code's
text and displays) and Location's ``near`` (its position as two number rows, latitude and
longitude). ``_query`` (named queries) is refused: there are none. :func:`index_values`
turns a resource into the rows of the index tables; the search code queries those rows and
never parses stored JSON.

Dates without a time zone (``2024-03-01``, ``2024-03-01T08:00:00``) are read in China
Standard Time (UTC+08:00, no daylight saving), both in resources and in search values, so a
date means the day a clinician in the consortium means.
"""

from __future__ import annotations

import hashlib
import html
import re
import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from fhir_adapters import definitions
from fhir_adapters.errors import InvalidRequest
from fhir_adapters.store.expressions import Select, compile_expression, expression_roots
from fhir_adapters.store.quantities import LOINC
from fhir_adapters.store.quantities import Row as QuantityRow
from fhir_adapters.store.quantities import rows_of as quantity_rows
from fhir_adapters.store.resources import RESOURCE_TYPES, references

LOCAL_ZONE = timezone(timedelta(hours=8))
ParamType = definitions.ParamType
INDEXED_TYPES = ("token", "string", "reference", "date", "uri", "quantity", "number")


@dataclass(frozen=True)
class SearchParam:
    name: str
    type: ParamType
    paths: tuple[str, ...]  # JSON paths (hand-written), or none when ``select`` reads it
    targets: tuple[str, ...] = ()  # reference: the types it may point to (all hosted when empty)
    description: str = ""
    select: Select | None = None  # the definition's FHIRPath, compiled
    # composite: the token part and the other part, each (kind, expression relative to what
    # ``select`` selects)
    components: tuple[tuple[ParamType, Select], ...] = ()
    # the other parameters whose rows it searches instead of its own, its values being exactly
    # theirs together: Observation's combo-code is code or component-code; for a composite,
    # other composites (combo-code-value-quantity is code-value-quantity or
    # component-code-value-quantity)
    union_of: tuple[str, ...] = ()
    # a composite over the resource itself: the parameters its token part and its other part
    # are, whose rows of one resource it searches instead of its own (Observation's
    # code-value-quantity is code and value-quantity of the same Observation)
    parts_of: tuple[str, ...] = ()
    # the JSON names at a resource's root it selects under (None: not known), so that the
    # index skips a parameter whose elements a resource does not have
    roots: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if self.select is None and self.paths:
            object.__setattr__(self, "roots", frozenset(p.split(".")[0] for p in self.paths))


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
    parameters = definitions.search_parameters(resource_type)
    for code, definition in parameters.items():
        if code in ("_id", "_lastUpdated") or definition.expression is None:
            continue
        if definition.type == "composite" and _composite_kinds(definition) is not None:
            found[code] = SearchParam(
                code,
                "composite",
                (),
                roots=expression_roots(definition.expression, resource_type),
                select=compile_expression(definition.expression, resource_type),
                components=tuple(
                    (c.type, compile_expression(c.expression, resource_type))
                    for c in definition.components
                ),
                union_of=_union_of(definition, parameters),
                parts_of=_parts_of(definition, parameters, resource_type),
            )
            continue
        if definition.type not in INDEXED_TYPES:
            continue
        found[code] = SearchParam(
            code,
            definition.type,
            (),
            tuple(t for t in definition.targets if t in RESOURCE_TYPES),
            roots=expression_roots(definition.expression, resource_type),
            select=compile_expression(definition.expression, resource_type),
            union_of=_parameter_union(definition, parameters),
        )
    return found


# The parameters R4 leaves to the server (no FHIRPath a walk could follow), as searched here.
NARRATIVE = "_text"
CONTENT = "_content"
NEAR = "near"
LATITUDE, LONGITUDE = "near:latitude", "near:longitude"  # Location.position's rows
_SPECIAL = {
    NARRATIVE: "the words of the narrative (text.div)",
    CONTENT: "the words of every string the index holds of the resource",
    NEAR: "within a distance of a point (latitude|longitude|distance|unit)",
}


def _special(resource_type: str) -> dict[str, SearchParam]:
    official = definitions.search_parameters(resource_type)
    return {
        code: SearchParam(code, "special", (), description=description)
        for code, description in _SPECIAL.items()
        if code in official and (code != NEAR or resource_type == "Location")
    }


def _composite_kinds(definition: definitions.Definition) -> tuple[str, str] | None:
    """The kinds of a composite's two parts when it is one this index serves: a token, then
    any indexed kind but a reference, each a path from the composite's element."""
    kinds = tuple(c.type for c in definition.components)
    if (
        len(kinds) != 2
        or kinds[0] != "token"
        or kinds[1] not in INDEXED_TYPES
        or kinds[1] == "reference"
        or any(c.expression.startswith("%") for c in definition.components)
    ):
        return None
    return kinds[0], kinds[1]


def _union_of(
    composite: definitions.Definition, parameters: Mapping[str, definitions.Definition]
) -> tuple[str, ...]:
    """The other composites of the type that ``composite`` is the union of (one for each
    branch of its expression, with the same parts), or () when it is none."""
    branches = definitions.union_branches(composite.expression or "")
    if len(branches) < 2:
        return ()
    parts = [c.expression for c in composite.components]
    found = []
    for branch in branches:
        same = [
            code
            for code, other in parameters.items()
            if other.type == "composite"
            and other.expression == branch
            and [c.expression for c in other.components] == parts
        ]
        if not same:
            return ()
        found.append(same[0])
    return tuple(found)


def _branches(expression: str) -> frozenset[str]:
    """An expression's union branches, compared as written but for enclosing parentheses and
    the case of an ``ofType`` type name (R4 writes ``ofType(DateTime)`` and
    ``ofType(dateTime)`` alike)."""
    found = set()
    for branch in definitions.union_branches(expression):
        while branch.startswith("(") and _closing(branch) == len(branch) - 1:
            branch = branch[1:-1].strip()
        found.add(_OF_TYPE.sub(lambda m: f"ofType({m.group(1).lower()})", branch))
    return frozenset(found)


_OF_TYPE = re.compile(r"ofType\((\w+)\)")


def _closing(text: str) -> int:
    """Where the parenthesis that opens ``text`` closes (-1: nowhere)."""
    depth = 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return i
    return -1


def _parameter_union(
    definition: definitions.Definition, parameters: Mapping[str, definitions.Definition]
) -> tuple[str, ...]:
    """The other parameters of the type, of the same kind, whose expressions' branches are
    together exactly this one's (each branch in one of them), or () when there are none.
    References are left alone: chains, ``_include`` and the compartment read their rows by
    name."""
    if definition.type == "reference" or definition.expression is None:
        return ()
    branches = _branches(definition.expression)
    found: list[str] = []
    covered: set[str] = set()
    for code, other in parameters.items():
        if code == definition.code or other.type != definition.type or other.expression is None:
            continue
        theirs = _branches(other.expression)
        if theirs < branches and not theirs & covered:
            found.append(code)
            covered |= theirs
    return tuple(found) if len(found) > 1 and covered == branches else ()


def _parts_of(
    composite: definitions.Definition,
    parameters: Mapping[str, definitions.Definition],
    resource_type: str,
) -> tuple[str, ...]:
    """For a composite whose element is the resource itself, the parameters of the type that
    its parts are (each part's definition, selecting exactly what the part selects), or ()
    when it is no such composite. A SampledData branch of a quantity parameter selects
    nothing the quantity index holds (a SampledData has no value), so it is left out of the
    comparison."""
    if composite.expression != resource_type:
        return ()
    by_url = {other.url: code for code, other in parameters.items()}
    parts: list[str] = []
    for component in composite.components:
        code = by_url.get(component.definition)
        other = parameters.get(code) if code is not None else None
        if code is None or other is None or other.type != component.type or not other.expression:
            return ()
        selects = " | ".join(
            f"{resource_type}.{b}" for b in definitions.union_branches(component.expression)
        )
        theirs = {
            b
            for b in _branches(other.expression)
            if other.type != "quantity" or not b.endswith(".ofType(sampleddata)")
        }
        if _branches(selects) != theirs:
            return ()
        parts.append(code)
    return tuple(parts)


def composite_param(name: str, token: str) -> str:
    """The index's parameter name for a composite's other part where its token part is
    ``token`` (``system|code``, ``|code`` or ``code``, as a search writes it). The token is
    digested so that a long system URL still fits the index's parameter column."""
    return f"{name}${hashlib.blake2b(token.encode(), digest_size=8).hexdigest()}"


# AuditEvent keeps only its hand-written parameters: the node writes one for every read, so
# each more parameter is index rows on every request (R4's others would double them).
OWN_PARAMETERS_ONLY = ("AuditEvent",)


class _ParamsByType(Mapping[str, dict[str, SearchParam]]):
    """Each hosted type's parameters, compiled the first time the type is asked for: every
    process (a node, each CLI command) would otherwise compile 146 types' expressions as it
    starts, a tenth of a second, for the few types it uses."""

    def __init__(self) -> None:
        self._compiled: dict[str, dict[str, SearchParam]] = {}

    def __getitem__(self, resource_type: str) -> dict[str, SearchParam]:
        found = self._compiled.get(resource_type)
        if found is None:
            if resource_type not in RESOURCE_TYPES:
                raise KeyError(resource_type)
            own = resource_type in OWN_PARAMETERS_ONLY
            found = {
                **({} if own else {**_from_definitions(resource_type), **_special(resource_type)}),
                **HAND_WRITTEN.get(resource_type, {}),
            }
            self._compiled[resource_type] = found
        return found

    def __iter__(self) -> Iterator[str]:
        return iter(RESOURCE_TYPES)

    def __len__(self) -> int:
        return len(RESOURCE_TYPES)


SEARCH_PARAMS: Mapping[str, dict[str, SearchParam]] = _ParamsByType()

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
    if name == "_query":
        return "_query names a query this server defines; it defines none"
    if definition.type == "composite":
        kinds = ", ".join(c.type for c in definition.components)
        return (
            f"{resource_type}'s {name} is a composite of {kinds}; this server searches "
            "composites of a token and one other value that is no reference"
        )
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
    if text.isascii():  # its own NFKD form, and no combining characters
        return text.casefold().strip()
    decomposed = unicodedata.normalize("NFKD", text)
    # (no character below U+0300 is a combining one)
    return (
        "".join(ch for ch in decomposed if ch < "\u0300" or not unicodedata.combining(ch))
        .casefold()
        .strip()
    )


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


def _add(
    rows: IndexRows,
    kind: ParamType,
    name: str,
    value: Any,
    analytes: frozenset[str],
    base_url: str,
    targets: tuple[str, ...] = (),
    *,
    extras: bool = True,
) -> tuple[str, str] | None:
    """Add the rows of one value selected for parameter ``name`` of ``kind``; the (type, id)
    a reference points to. ``extras``: a token's ``:of-type`` and ``:text`` rows too."""
    if kind == "token":
        rows.tokens.extend((name, system, code) for system, code in _tokens(value))
        if extras:
            rows.tokens.extend(  # :of-type: an Identifier by its type and value
                (f"{name}:of-type", system, code) for system, code in _typed(value)
            )
            rows.strings.extend(  # :text searches a concept's text and displays
                (f"{name}:text", normalise_string(text), text.strip())
                for text in _token_texts(value)
            )
    elif kind == "uri":
        if isinstance(value, str):
            rows.tokens.append((name, "", value))
    elif kind == "string":
        rows.strings.extend(
            (name, normalise_string(text), text.strip()) for text in _strings(value)
        )
    elif kind == "date":
        rows.dates.extend((name, low, high) for low, high in _date_values(value))
    elif kind == "quantity":
        rows.quantities.extend((name, q) for q in quantity_rows(value, analytes))
    elif kind == "number":  # kept with the quantities, without a unit
        rows.quantities.extend((name, q) for q in quantity_rows({"value": value}))
    elif (
        isinstance(value, dict)
        and isinstance(value.get("identifier"), dict)
        and ("reference" not in value)
    ):  # :identifier: a reference by its target's identifier, not its id
        rows.tokens.extend(
            (f"{name}:identifier", system, code) for system, code in _tokens(value["identifier"])
        )
    elif isinstance(value, dict) and isinstance(value.get("reference"), str):
        target = parse_reference(value["reference"], base_url)
        if target and (not targets or target[0] in targets):
            rows.references.append((name, *target))
            return target
    return None


def _add_composite(rows: IndexRows, param: SearchParam, element: Any) -> None:
    """The rows of a composite for one element its expression selects: the other part's
    values under :func:`composite_param` of each way a search may write the token part."""
    (_, token_part), (kind, other_part) = param.components
    keys: list[str] = []
    analytes: set[str] = set()
    for value in token_part(element):
        for system, code in _tokens(value):
            keys.extend((f"{system}|{code}", code))
            if system == LOINC:
                analytes.add(code)
    values = other_part(element) if keys else []
    for key in dict.fromkeys(keys):
        for value in values:
            _add(
                rows,
                kind,
                composite_param(param.name, key),
                value,
                frozenset(analytes),
                "",
                extras=False,
            )


_TAG = re.compile(r"<[^>]*>")
_WORD = re.compile(r"\w+")
PASSAGE = 250  # characters of one ``_text`` row (the index keeps 255)
_OVERLAP = 20  # characters by which the pieces of a long run without spaces (Chinese) overlap


def narrative_passages(resource: dict[str, Any]) -> list[str]:
    """The words of a resource's narrative, tags and punctuation dropped, as passages of at
    most :data:`PASSAGE` characters (words joined by single spaces). A word longer than that,
    as a Chinese sentence is, is cut into pieces that overlap by a few characters, so that a
    term of up to that many characters is whole in one of them."""
    text = resource.get("text")
    div = text.get("div") if isinstance(text, dict) else None
    if not isinstance(div, str):
        return []
    words: list[str] = []
    for word in _WORD.findall(html.unescape(_TAG.sub(" ", div))):
        step = PASSAGE - _OVERLAP
        words.extend(word[i : i + PASSAGE] for i in range(0, max(len(word) - _OVERLAP, 1), step))
    passages: list[str] = []
    current = ""
    for word in words:
        if current and len(current) + 1 + len(word) > PASSAGE:
            passages.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    if current:
        passages.append(current)
    return list(dict.fromkeys(passages))


def _position_rows(position: Any) -> list[tuple[str, QuantityRow]]:
    """Location.position's latitude and longitude as number rows (``near``)."""
    if not isinstance(position, dict):
        return []
    rows = [
        (name, q)
        for name, key in ((LATITUDE, "latitude"), (LONGITUDE, "longitude"))
        for q in quantity_rows({"value": position.get(key)})
    ]
    return rows if len(rows) == 2 else []


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
        if param.union_of or param.parts_of:  # searched by other parameters' rows
            continue
        if param.roots is not None and param.roots.isdisjoint(resource):
            continue  # nothing of the resource to select
        selected = (
            param.select(resource)
            if param.select is not None
            else [v for path in param.paths for v in values_at(resource, path)]
        )
        for value in selected:
            if param.type == "composite":
                _add_composite(rows, param, value)
                continue
            target = _add(rows, param.type, param.name, value, analytes, base_url, param.targets)
            if target and param.name in compartment_params and target[0] == "Patient":
                rows.compartment.add(target[1])
    if NARRATIVE in params:
        rows.strings.extend(
            (NARRATIVE, normalise_string(p), p) for p in narrative_passages(resource)
        )
    if NEAR in params:
        rows.quantities.extend(_position_rows(resource.get("position")))
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
