"""A minimal valid resource of any hosted R4 type, generated from its model (fhir.resources'
R4B, or fhirclient's R4 for the 18 types R4B dropped): every required element (and one choice
of each required choice group) filled with a value of its type, every reference naming one
given resource. Used where a test must hold for every type, not for the few a hand-written
sample covers."""

from __future__ import annotations

import types
import typing
from typing import Any

from fhir.resources.R4B import get_fhir_model_class

from fhir_adapters.store.resources import R4_ONLY, model_class, r4_model_class

# values of the complex data types a required element may need (a Reference is the caller's)
_DATA_TYPES: dict[str, Any] = {
    "CodeableConcept": {"text": "x"},
    "Coding": {"system": "urn:x", "code": "x"},
    "Period": {"start": "2024-03-01T08:00:00+08:00"},
    "Quantity": {"value": 1},
    "SimpleQuantity": {"value": 1},
    "Money": {"value": 1, "currency": "CNY"},
    "Identifier": {"system": "urn:x", "value": "x"},
    "Attachment": {"contentType": "text/plain", "data": "eA=="},
    "HumanName": {"text": "x"},
    "Address": {"text": "x"},
    "ContactPoint": {"system": "phone", "value": "x"},
    "Annotation": {"text": "x"},
    "Range": {"low": {"value": 1}},
    "Ratio": {"numerator": {"value": 1}, "denominator": {"value": 1}},
    "Timing": {"event": ["2024-03-01"]},
    "Age": {"value": 1},
    "Duration": {"value": 1},
    "Count": {"value": 1},
    "Distance": {"value": 1},
    "Narrative": {
        "status": "generated",
        "div": '<div xmlns="http://www.w3.org/1999/xhtml">x</div>',
    },
    "Meta": {},
}
# values of the primitive types, by the name of their annotation's marker
_PRIMITIVES: dict[str, Any] = {
    "Code": "x",
    "String": "x",
    "Markdown": "x",
    "Id": "x",
    "Uri": "urn:x",
    "Url": "urn:x",
    "Canonical": "urn:x",
    "Oid": "urn:oid:1.2",
    "Uuid": "urn:uuid:00000000-0000-4000-8000-000000000000",
    "DateTime": "2024-03-01",
    "Date": "2024-03-01",
    "Instant": "2024-03-01T08:00:00+08:00",
    "Time": "08:00:00",
    "Boolean": True,
    "Integer": 1,
    "PositiveInt": 1,
    "UnsignedInt": 1,
    "Decimal": 1,
    "Base64Binary": "eA==",
}


def minimal(resource_type: str, reference: str) -> dict[str, Any]:
    """A valid ``resource_type`` with only what R4 requires, every Reference ``reference``."""
    if resource_type in R4_ONLY:
        return {"resourceType": resource_type, **_fill_r4(r4_model_class(resource_type), reference)}
    return {"resourceType": resource_type, **_fill(model_class(resource_type), reference, 0)}


_R4_PRIMITIVES: dict[str, Any] = {
    "str": "x",
    "bool": True,
    "int": 1,
    "float": 1,
    "FHIRDate": "2024-03-01",
    "FHIRDateTime": "2024-03-01",
    "FHIRInstant": "2024-03-01T08:00:00+08:00",
    "FHIRTime": "08:00:00",
}


def _fill_r4(cls: Any, reference: str, depth: int = 0) -> dict[str, Any]:
    """The required elements of a fhirclient R4 model class (one choice of each group)."""
    out: dict[str, Any] = {}
    chosen: set[str] = set()
    for _name, json_name, kind, is_list, of_many, required in cls().elementProperties():
        if not required or (of_many and of_many in chosen):
            continue
        if of_many:
            chosen.add(of_many)
        name = kind.__name__
        if name in _R4_PRIMITIVES:
            value: Any = _R4_PRIMITIVES[name]
        elif name == "FHIRReference":
            value = {"reference": reference}
        elif name in _DATA_TYPES:
            value = dict(_DATA_TYPES[name])
        elif depth < 4:
            value = _fill_r4(kind, reference, depth + 1)
        else:
            continue
        out[json_name] = [value] if is_list else value
    return out


def with_references(resource_type: str, reference: str, paths: list[str]) -> dict[str, Any]:
    """:func:`minimal`, with each of ``paths`` (``subject``, or ``participant.actor`` through a
    backbone element; optional elements too) set to ``reference`` where it is a Reference (a
    list of one where it repeats)."""
    resource = minimal(resource_type, reference)
    for path in paths:
        _set(resource, model_class(resource_type), path.split("."), reference)
    return resource


def _set(node: dict[str, Any], cls: Any, steps: list[str], reference: str) -> None:
    fields = {info.alias or name: info for name, info in cls.model_fields.items()}
    info = fields.get(steps[0])
    if info is None:
        return
    if len(steps) == 1:
        if "Reference" in str(info.annotation):
            value = {"reference": reference}
            node[steps[0]] = [value] if _is_list(info.annotation) else value
        return
    try:
        backbone = get_fhir_model_class(_type_name(info.annotation))
    except (KeyError, ValueError):
        return
    child = node.get(steps[0])
    if child is None:
        child = _fill(backbone, reference, 1)
        node[steps[0]] = [child] if _is_list(info.annotation) else child
    elif isinstance(child, list):
        child = child[0]
    _set(child, backbone, steps[1:], reference)


def _type_name(annotation: Any) -> str:
    """The FHIR type an element's annotation names (Optional and List taken off)."""
    while typing.get_origin(annotation) in (typing.Union, types.UnionType, list, typing.List):  # noqa: UP006
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return str(getattr(annotation, "__name__", annotation)).removesuffix("Type")


def _fill(cls: Any, reference: str, depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    chosen: set[str] = set()
    for name, info in cls.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if not extra.get("element_property"):
            continue
        group = extra.get("one_of_many")
        if extra.get("one_of_many_required"):
            if group in chosen:
                continue
            chosen.add(str(group))
        elif not (extra.get("element_required") or info.is_required()):
            continue
        enum = extra.get("enum_values")
        value = (
            ([enum[0]] if _is_list(info.annotation) else enum[0])
            if enum
            else _value(info.annotation, reference, depth)
        )
        if value is not None:
            out[info.alias or name] = value
    return out


def _is_list(annotation: Any) -> bool:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_is_list(a) for a in typing.get_args(annotation))
    return typing.get_origin(annotation) in (list, typing.List)  # noqa: UP006


def _value(annotation: Any, reference: str, depth: int) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _value(inner[0], reference, depth)
    if origin in (list, typing.List):  # noqa: UP006
        item = _value(typing.get_args(annotation)[0], reference, depth)
        return None if item is None else [item]
    if origin is typing.Annotated:
        markers = typing.get_args(annotation)[1:]
        for marker in markers:
            if type(marker).__name__ in _PRIMITIVES:
                return _PRIMITIVES[type(marker).__name__]
        return "x"
    if annotation in (bool, int, float, str):
        return {bool: True, int: 1, float: 1, str: "x"}[annotation]
    name = getattr(annotation, "__name__", str(annotation)).removesuffix("Type")
    if name == "Reference":
        return {"reference": reference}
    if name in _DATA_TYPES:
        return dict(_DATA_TYPES[name])
    if depth > 4:
        return None
    try:
        backbone = get_fhir_model_class(name)
    except (KeyError, ValueError):
        return None
    return _fill(backbone, reference, depth + 1)
