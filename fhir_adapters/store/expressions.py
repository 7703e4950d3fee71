"""A search parameter's FHIRPath expression as a function from a resource to the values it
selects: what the search index stores for that parameter.

Nearly all R4 expressions (2,440 of 2,502 that the index reads) are unions of paths with at
most a type (``.ofType(Quantity)``, or a choice element such as ``Observation.effective``),
a reference's target type (``.where(resolve() is Patient)``) or an equality
(``.where(system='phone')``). Those are compiled here into a walk over the JSON, which is
what keeps indexing fast; every other branch is evaluated by fhirpathpy with the R4 model.
``tests/fhir_adapters/test_expressions.py`` holds the walk to fhirpathpy's answers.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from fhir_adapters.definitions import union_branches

log = logging.getLogger(__name__)
Select = Callable[[dict[str, Any]], list[Any]]

# The FHIR data types a choice element ([x]) may take, as they end its JSON name.
CHOICE_SUFFIXES = frozenset(
    [
        "Base64Binary",
        "Boolean",
        "Canonical",
        "Code",
        "Date",
        "DateTime",
        "Decimal",
        "Id",
        "Instant",
        "Integer",
        "Markdown",
        "Oid",
        "PositiveInt",
        "String",
        "Time",
        "UnsignedInt",
        "Uri",
        "Url",
        "Uuid",
        "Address",
        "Age",
        "Annotation",
        "Attachment",
        "CodeableConcept",
        "Coding",
        "ContactPoint",
        "Count",
        "Distance",
        "Duration",
        "HumanName",
        "Identifier",
        "Money",
        "Period",
        "Quantity",
        "Range",
        "Ratio",
        "Reference",
        "SampledData",
        "Signature",
        "Timing",
        "ContactDetail",
        "Contributor",
        "DataRequirement",
        "Expression",
        "ParameterDefinition",
        "RelatedArtifact",
        "TriggerDefinition",
        "UsageContext",
        "Dosage",
        "Meta",
    ]
)

_STEP = re.compile(
    r"\.(?:"
    r"ofType\((?P<of_type>[A-Za-z]+)\)"
    r"|where\(resolve\(\) is (?P<resolves>[A-Z][A-Za-z]+)\)"
    r"|where\((?P<key>[a-z][A-Za-z0-9]*)='(?P<literal>[^'\\]*)'\)"
    r"|(?P<child>[a-z][A-Za-z0-9]*)(?![A-Za-z0-9(])"
    r")"
)
_HEAD = re.compile(r"[A-Z][A-Za-z]+")


@dataclass(frozen=True)
class _Step:
    kind: str  # child | key (an exact JSON name) | resolves | where
    name: str
    value: str = ""
    # a child's JSON names as a choice element (effective -> effectiveDateTime ...)
    choices: frozenset[str] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        choices = frozenset(self.name + suffix for suffix in CHOICE_SUFFIXES)
        object.__setattr__(self, "choices", choices if self.kind == "child" else frozenset())


def _ungroup(text: str) -> str | None:
    """``text`` without its grouping parentheses (those of calls such as ``ofType(X)`` stay)
    and white space outside string literals; None when they do not balance."""
    out = list(text)
    open_at: list[tuple[int, bool]] = []
    quote = False
    for i, char in enumerate(text):
        if char == "'":
            quote = not quote
        elif quote:
            continue
        elif char.isspace():
            out[i] = ""
        elif char == "(":
            open_at.append((i, i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")))
        elif char == ")":
            if not open_at:
                return None
            start, grouping = open_at.pop()
            if grouping:
                out[start] = out[i] = ""
    return None if open_at or quote else "".join(out)


def _steps(branch: str, resource_type: str) -> list[_Step] | None:
    """The walk a branch describes, or None when it is more than this module walks."""
    text = _ungroup(branch)
    if text is None:
        return None
    text = text.replace("resolve()is", "resolve() is ")
    head = _HEAD.match(text)
    if head is not None:
        if head.group() != resource_type:
            return None
        text = text[head.end() :]
        if not text:  # the resource itself (a composite parameter's ``Observation``)
            return []
    else:
        text = "." + text  # a path relative to the resource (R4: InsurancePlan's name | alias)
    steps: list[_Step] = []
    position = 0
    for match in _STEP.finditer(text):
        if match.start() != position:
            return None
        position = match.end()
        if match["child"]:
            steps.append(_Step("child", match["child"]))
        elif match["of_type"]:
            if not steps or steps[-1].kind != "child":
                return None
            name = steps[-1].name
            steps[-1] = _Step("key", name + match["of_type"][0].upper() + match["of_type"][1:])
        elif match["resolves"]:
            steps.append(_Step("resolves", match["resolves"]))
        else:
            steps.append(_Step("where", match["key"], match["literal"]))
    if position != len(text) or not steps:
        return None
    return steps


def _refers_to(value: Any, resource_type: str) -> bool:
    reference = value.get("reference") if isinstance(value, dict) else None
    if not isinstance(reference, str):
        return False
    parts = reference.split("/_history/")[0].rstrip("/").split("/")
    return len(parts) >= 2 and parts[-2] == resource_type


def _children_of(values: list[Any], step: _Step) -> list[Any]:
    """What one step selects under each of ``values``, in order: the element itself (its items
    if it repeats), or for a choice element (``effective``) every form present."""
    found: list[Any] = []
    name = step.name
    exact = step.kind == "key"
    for value in values:
        if not isinstance(value, dict):
            continue
        if exact or name in value:
            child = value.get(name)
            if isinstance(child, list):
                found.extend(child)
            elif child is not None:
                found.append(child)
        else:
            choices = step.choices
            for key, child in value.items():
                if key in choices:
                    if isinstance(child, list):
                        found.extend(child)
                    else:
                        found.append(child)
    return found


def _walk(steps: list[_Step]) -> Select:
    def select(resource: dict[str, Any]) -> list[Any]:
        values: list[Any] = [resource]
        for step in steps:
            if step.kind in ("child", "key"):
                values = _children_of(values, step)
            elif step.kind == "resolves":
                values = [value for value in values if _refers_to(value, step.name)]
            else:
                values = [
                    v for v in values if isinstance(v, dict) and v.get(step.name) == step.value
                ]
        return values

    return select


def _fhirpath(expression: str) -> Select:
    """fhirpathpy's evaluation of ``expression``, compiled on first use (importing fhirpathpy
    takes a tenth of a second, which every process would otherwise pay at start)."""

    def select(resource: dict[str, Any]) -> list[Any]:
        try:
            found = _compiled(expression)(resource, {})
        except Exception:  # fhirpathpy's own failure must not fail a write: unindexed
            log.warning("FHIRPath %r could not be evaluated on a resource", expression)
            return []
        return [v for v in found if isinstance(v, dict | str | bool | int)]

    return select


@cache
def _compiled(expression: str) -> Any:
    from fhirpathpy import compile as compile_fhirpath
    from fhirpathpy.models import models

    return compile_fhirpath(expression, models["r4"])


def compile_expression(expression: str, resource_type: str) -> Select:
    """The values ``expression`` (a search parameter's expression for ``resource_type``, a
    union of branches) selects in a resource of that type."""
    selects: list[Select] = []
    for branch in union_branches(expression):
        steps = _steps(branch, resource_type)
        selects.append(_walk(steps) if steps is not None else _fhirpath(branch))
    if len(selects) == 1:
        return selects[0]

    def union(resource: dict[str, Any]) -> list[Any]:
        return [value for select in selects for value in select(resource)]

    return union


def expression_roots(expression: str, resource_type: str) -> frozenset[str] | None:
    """The JSON names at a resource's root that ``expression`` can select anything under
    (a choice element's every name): a resource holding none of them gives it nothing. None
    when that cannot be told (a branch handed to fhirpathpy, or one starting at the resource
    itself)."""
    roots: set[str] = set()
    for branch in union_branches(expression):
        steps = _steps(branch, resource_type)
        if not steps or steps[0].kind not in ("child", "key"):
            return None
        roots.add(steps[0].name)
        roots |= steps[0].choices
    return frozenset(roots)


def walks(expression: str, resource_type: str) -> bool:
    """Whether every branch of ``expression`` is walked here (not handed to fhirpathpy)."""
    return all(_steps(b, resource_type) is not None for b in union_branches(expression))
