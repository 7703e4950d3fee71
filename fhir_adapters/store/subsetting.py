"""``_summary`` and ``_elements``: the part of a resource a client asked for (FHIR R4 search
§3.1.1.5.8-9), on reads and searches alike.

- ``_summary=true``: the elements the resource's definition marks as summary elements;
  ``text``: ``text`` and the mandatory elements; ``data``: all but ``text``; ``false``: all.
  (``count`` only counts, and is a search's business.)
- ``_elements=a,b``: those elements (root-level names, ``Patient.name`` allowed too), with the
  mandatory ones, as R4 asks servers to.

``resourceType``, ``id`` and ``meta`` always stay, and a subsetted resource carries the
``SUBSETTED`` tag so that nobody mistakes it for the whole and writes it back. Which elements
are summary or mandatory is read off the R4B models, the same definitions the store validates
with; a name the type does not have is refused (400), not silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from fhir_adapters import definitions
from fhir_adapters.errors import InvalidRequest
from fhir_adapters.store.resources import R4_ONLY, model_class, r4_elements

SUBSETTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "SUBSETTED",
    "display": "subsetted",
}
SUMMARY_VALUES = ("true", "text", "data", "count", "false")
ALWAYS = ("resourceType", "id", "meta")


@dataclass(frozen=True)
class Subsetting:
    """What a client asked for: ``summary`` one of true, text, data (None: whole), or
    ``elements``, the root-level element names asked for."""

    summary: str | None = None
    elements: tuple[str, ...] | None = None

    def query(self) -> list[str]:
        """The parameters, for a search's links."""
        if self.elements is not None:
            return ["_elements=" + ",".join(self.elements)]
        return [f"_summary={self.summary}"] if self.summary else []

    def apply(self, resource: dict[str, Any]) -> dict[str, Any] | None:
        """The resource subsetted, or None when it is to be sent whole."""
        if self.summary is None and self.elements is None:
            return None
        shape = _shape(str(resource.get("resourceType")))
        if self.elements is not None:
            wanted = {*ALWAYS, *shape.mandatory, *self.elements}
            kept = {k: v for k, v in resource.items() if _base(k, shape) in wanted}
        elif self.summary == "true":
            kept = {k: v for k, v in resource.items() if k in ALWAYS or k in shape.summary}
        elif self.summary == "text":
            wanted = {*ALWAYS, "text", *shape.mandatory}
            kept = {k: v for k, v in resource.items() if _base(k, shape) in wanted}
        else:  # data
            kept = {k: v for k, v in resource.items() if k != "text"}
        meta = dict(kept.get("meta") or {})
        meta["tag"] = [*(meta.get("tag") or []), SUBSETTED]
        kept["meta"] = meta
        return kept


@dataclass(frozen=True)
class _Shape:
    names: frozenset[str]  # root-level element names, choices as their base (value)
    summary: frozenset[str]  # JSON keys of summary elements (valueQuantity, _birthDate ...)
    mandatory: frozenset[str]  # root-level names of mandatory elements
    choice_of: dict[str, str]  # JSON key of a choice type -> its base name


@cache
def _shape(resource_type: str) -> _Shape:
    if resource_type in R4_ONLY:
        return _r4_shape(resource_type)
    fields = model_class(resource_type).model_fields
    names: set[str] = set()
    summary: set[str] = set()
    mandatory: set[str] = set()
    choice_of: dict[str, str] = {}
    for name, field in fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        alias = field.alias or name
        if not extra.get("element_property"):
            continue
        base = str(extra.get("one_of_many") or alias)
        if base != alias:
            choice_of[alias] = base
            choice_of["_" + alias] = base
        names.add(base)
        if extra.get("summary_element_property"):
            summary.update((alias, "_" + alias))
        if (
            field.is_required()
            or extra.get("element_required")
            or extra.get("one_of_many_required")
        ):
            mandatory.add(base)
    return _Shape(frozenset(names), frozenset(summary), frozenset(mandatory), choice_of)


def _r4_shape(resource_type: str) -> _Shape:
    """The shape of an R4 type R4B dropped: its elements from fhirclient's R4 model, its
    summary elements from R4's own definition."""
    summary_bases = definitions.summary_elements(resource_type)
    names: set[str] = set()
    summary: set[str] = set()
    mandatory: set[str] = set()
    choice_of: dict[str, str] = {}
    for json_name, base, required in r4_elements(resource_type):
        names.add(base)
        if base != json_name:
            choice_of[json_name] = choice_of["_" + json_name] = base
        if base in summary_bases:
            summary.update((json_name, "_" + json_name))
        if required:
            mandatory.add(base)
    return _Shape(frozenset(names), frozenset(summary), frozenset(mandatory), choice_of)


def _base(key: str, shape: _Shape) -> str:
    """The root-level element name a JSON key belongs to (``_birthDate`` → ``birthDate``,
    ``valueQuantity`` → ``value``)."""
    if key in shape.choice_of:
        return shape.choice_of[key]
    return key[1:] if key.startswith("_") else key


def parse_subsetting(
    resource_types: tuple[str, ...], summary: list[str], elements: list[str]
) -> Subsetting:
    """The subsetting that ``_summary`` and ``_elements`` values ask for, for resources of
    ``resource_types``; 400 naming what is wrong (an unknown value or element, both given,
    either given twice)."""
    if len(summary) > 1 or len(elements) > 1:
        raise InvalidRequest("_summary and _elements may each be given once")
    if summary and elements:
        raise InvalidRequest("give _summary or _elements, not both")
    if summary:
        if summary[0] not in SUMMARY_VALUES:
            raise InvalidRequest(f"_summary must be one of {', '.join(SUMMARY_VALUES)}")
        return Subsetting(summary=None if summary[0] in ("false", "count") else summary[0])
    if not elements:
        return Subsetting()
    asked = []
    for item in elements[0].split(","):
        name = item.strip()
        owner, dot, rest = name.partition(".")
        if dot and owner in resource_types:
            name = rest
        if name not in ALWAYS and (  # those are kept anyway (clients such as fhirpy name them)
            not name or not all(name in _shape(t).names for t in resource_types)
        ):
            raise InvalidRequest(
                f"_elements: {item.strip()[:60]!r} is not a root-level element of "
                + " or ".join(resource_types)
            )
        asked.append(name)
    return Subsetting(elements=tuple(dict.fromkeys(asked)))
