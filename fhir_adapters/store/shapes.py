"""What each fhir.resources R4B model class allows, as plain tables, and a walk over a parsed
resource that says whether it *certainly* passes :func:`fhir_adapters.store.resources.validate`.

Validating into the R4B models costs about 12 µs per nested element, most of it the library's
Python validators run around each nested model (pydantic's own checks run in compiled code).
This walk checks the same rules directly on the parsed JSON: each element's JSON name is one
of its class's, each value has the JSON type FHIR gives the element, each primitive passes
the very pydantic validator its model field uses (called on the value alone, and remembered
for strings already seen), required elements are present, a choice ``value[x]`` has at most
one form, every code is one its required binding allows, and nothing is null, empty,
blank, too deeply nested or a number JSON clients cannot read.

**It may refuse, never accept more.** It answers True only for a resource every check of
``validate`` accepts; whatever it is not sure of (a primitive's extension ``_name``, a contained
resource's own ``contained``, an element name given in the models' Python spelling, a class
with validators of its own, a field the tables do not describe) makes it answer False, and
``validate`` then runs the models and its own checks as before, which decide and name every
fault. Contained resources are walked as the type their ``resourceType`` names, looked up as
the models look it up. So no verdict and no message depends on this
module; only the time does. ``tests/fhir_adapters/test_shapes.py`` holds it to that,
differentially, on the sample resources and on generated changes of them.

Cost: one dictionary look-up and a type test per element, and one pydantic call per
primitive value not seen before; constant per resource, whatever the store holds.
"""

from __future__ import annotations

import datetime
import re
import threading
import types
import typing
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cache
from typing import Any

import pydantic
from fhir_core.constraints import FHIR_TYPES_MAPS
from fhir_core.fhirabstractmodel import FHIRAbstractModel
from fhir_core.types import FhirBase, FhirElementOrResourceBase
from pydantic._internal._validators import import_string

from fhir_adapters.store.codes import annotation_models, required_binding
from fhir_adapters.store.jsonio import number_problem

_WALKED_DEPTH = 32  # objects nested deeper than this are left to the models
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")  # FHIR strings: no control characters
_SEEN_LIMIT = 4096  # strings remembered per primitive field before the memory is cleared

_PRIMITIVE_KINDS: dict[Any, str] = {
    bool: "boolean",
    int: "integer",
    Decimal: "number",
    str: "string",
    datetime.date: "string",
    datetime.datetime: "string",
    datetime.time: "string",
    bytes: "string",
}


def _kind_of(annotation: Any) -> tuple[str, bool]:
    """(JSON kind, is a list) of a model field's annotation."""
    is_list = False
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Union or origin is types.UnionType:
            choices = [a for a in typing.get_args(annotation) if a is not type(None)]
            # a FHIR url (Attachment.url, Endpoint.address) is Union[AnyUrl, str]: a JSON string
            annotation = str if str in choices else choices[0]
        elif origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin is list:
            is_list = True
            annotation = typing.get_args(annotation)[0]
        else:
            break
    return _PRIMITIVE_KINDS.get(annotation, "object"), is_list


_FIELD_KINDS: dict[type, dict[str, tuple[str, str, bool]]] = {}


def field_kinds(model_type: type[pydantic.BaseModel]) -> dict[str, tuple[str, str, bool]]:
    """JSON name -> (Python attribute, JSON kind, is a list) for a model class."""
    kinds = _FIELD_KINDS.get(model_type)
    if kinds is None:
        kinds = {}
        for name, info in model_type.model_fields.items():
            kind, is_list = _kind_of(info.annotation)
            kinds[info.alias or name] = (name, kind, is_list)
        _FIELD_KINDS[model_type] = kinds
    return kinds


def _item_annotation(annotation: Any) -> Any:
    """A field's annotation without its ``Optional`` and ``List``: what each value must be."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Union or origin is types.UnionType:
            choices = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(choices) != 1:
                return annotation
            annotation = choices[0]
        elif origin is list:
            annotation = typing.get_args(annotation)[0]
        else:
            return annotation


@dataclass(slots=True)
class _Primitive:
    """How one primitive element is checked: its JSON kind, the field's own pydantic
    validator, the codes its required binding allows, and the strings already accepted."""

    kind: str
    adapter: pydantic.TypeAdapter[Any]
    allowed: frozenset[str] | None
    seen: set[str] = field(default_factory=set)

    def accepts(self, value: Any) -> bool:
        kind = self.kind
        if kind == "string":
            if type(value) is not str:
                return False
            if value in self.seen:
                return True
            if not value.strip() or CONTROL.search(value):
                return False
            if self.allowed is not None and value not in self.allowed:
                return False
            if not self._validates(value):
                return False
            if len(self.seen) >= _SEEN_LIMIT:
                self.seen.clear()
            self.seen.add(value)
            return True
        if kind == "boolean":
            return type(value) is bool and self._validates(value)
        if kind == "integer":
            ok = type(value) is int
        elif kind == "number":
            ok = type(value) is int or type(value) is Decimal
        else:
            return False
        return ok and number_problem(value) is None and self._validates(value)

    def _validates(self, value: Any) -> bool:
        try:
            self.adapter.validate_python(value)
        except (pydantic.ValidationError, ValueError, TypeError, ArithmeticError):
            return False
        return True


@dataclass(slots=True)
class _Element:
    """One element of a class: a list or not, and what each value must be."""

    is_list: bool
    primitive: _Primitive | None  # None: a complex element, checked against ``shape``
    shape: Shape | None  # None for contained resources, checked against their own types
    resources_prefix: str = ""  # contained: where the models look their types up


@dataclass(slots=True)
class Shape:
    """What one R4B model class allows, by JSON name."""

    name: str
    elements: dict[str, _Element] = field(default_factory=dict)
    required: tuple[str, ...] = ()  # JSON names that must be present
    choices: tuple[tuple[tuple[str, ...], bool], ...] = ()  # (JSON names, one is required)


_SHAPES: dict[type, Shape] = {}  # finished tables, read without the lock
_BUILDING: dict[type, Shape] = {}  # tables being built (the classes refer to each other)
_BUILD_LOCK = threading.Lock()
_ADAPTERS: dict[Any, pydantic.TypeAdapter[Any]] = {}
_TOLERATED_VALIDATORS = {"reject_null_complex_elements", "validate_after_model_construction"}


def shape_of(model_type: type[FHIRAbstractModel]) -> Shape:
    """The table of an R4B model class, built once with the classes it can hold. A table is
    seen by other threads only once it and every table it refers to is whole."""
    known = _SHAPES.get(model_type)
    if known is not None:
        return known
    with _BUILD_LOCK:
        shape = _build(model_type)
        _SHAPES.update(_BUILDING)
        _BUILDING.clear()
    return shape


def _build(model_type: type[FHIRAbstractModel]) -> Shape:
    known = _SHAPES.get(model_type) or _BUILDING.get(model_type)
    if known is not None:
        return known
    shape = _BUILDING[model_type] = Shape(model_type.__name__)
    decorators = model_type.__pydantic_decorators__
    if (
        set(decorators.model_validators) - _TOLERATED_VALIDATORS
        or decorators.field_validators
        or decorators.validators
        or decorators.root_validators
    ):
        return shape  # rules of its own this walk does not know: every element falls back
    kinds = field_kinds(model_type)
    for json_name, (attribute, kind, is_list) in kinds.items():
        info = model_type.model_fields[attribute]
        if attribute == "fhir_comments" or attribute.endswith("__ext") or info.metadata:
            continue  # left to the models
        if kind != "object":
            item = _item_annotation(info.annotation)
            adapter = _ADAPTERS.get(item)
            if adapter is None:
                adapter = _ADAPTERS[item] = pydantic.TypeAdapter(item)
            allowed = required_binding(model_type, json_name)
            primitive = _Primitive(kind, adapter, None if allowed is None else frozenset(allowed))
            shape.elements[json_name] = _Element(is_list, primitive, None)
            continue
        prefix = _resources_prefix(info.annotation)
        if json_name == "contained" and is_list and prefix is not None:
            shape.elements[json_name] = _Element(True, None, None, prefix)  # each by its type
            continue
        targets = list(annotation_models(info.annotation))
        if (
            len(targets) != 1
            or targets[0].__name__ in ("Resource", "DomainResource", "Element", "BackboneElement")
            or not _is_model_field(info.annotation)
        ):
            continue  # any resource (contained) or more than one class: left to the models
        shape.elements[json_name] = _Element(is_list, None, _build(targets[0]))
    instance = model_type.model_construct()
    aliases = {attribute: json_name for json_name, (attribute, _, _) in kinds.items()}
    required = [aliases[name] for name, _ in instance.get_required_fields()]
    required += [aliases[a] for a, info in model_type.model_fields.items() if info.is_required()]
    shape.required = tuple(dict.fromkeys(required))
    shape.choices = tuple(
        (
            tuple(aliases[a] for a in attributes),
            (model_type.model_fields[attributes[0]].json_schema_extra or {}).get(  # type: ignore[union-attr]
                "one_of_many_required"
            )
            is True,
        )
        for attributes in instance.get_one_of_many_fields().values()
    )
    return shape


def _resources_prefix(annotation: Any) -> str | None:
    """For a field of any resource (``DomainResource.contained``): the prefix under which the
    models look up the class a value's ``resourceType`` names; else None."""
    item = _item_annotation(annotation)
    if (
        isinstance(item, type)
        and issubclass(item, FhirElementOrResourceBase)
        and item.get_model_klass().__name__ == "Resource"
    ):
        return str(item._prefix)
    return None


def _is_model_field(annotation: Any) -> bool:
    """Whether an annotation is a stand-in type of one model class (``abc.CodingType``),
    optional or in a list: what :func:`_fits` can check by that class's table."""
    item = _item_annotation(annotation)
    return isinstance(item, type) and issubclass(item, FhirBase)


def certainly_valid(resource: dict[str, Any], model_type: type[FHIRAbstractModel]) -> bool:
    """Whether ``resource`` (parsed, its ``resourceType`` the model's) certainly passes every
    check of ``validate``. False means "not sure": the full validation decides (so does a
    failure of the walk itself, which must cost time, never a refusal)."""
    try:
        return _fits(resource, shape_of(model_type), 0, root=True)
    except Exception:
        return False


def _contained_fits(resource: dict[str, Any], prefix: str, depth: int) -> bool:
    """A contained resource, checked as the type its ``resourceType`` names; no contained
    resources of its own."""
    resource_type = resource.get("resourceType")
    if type(resource_type) is not str or "contained" in resource:
        return False
    model_type = _resource_model(prefix, resource_type)
    return model_type is not None and _fits(resource, shape_of(model_type), depth, root=True)


@cache
def _resource_model(prefix: str, resource_type: str) -> type[FHIRAbstractModel] | None:
    """The class the models validate a contained ``resource_type`` into (found as they find
    it), or None when they would refuse it."""
    name = FHIR_TYPES_MAPS.get(f"{prefix}{resource_type}Type")
    if name is None:
        return None
    model_type = import_string(name)
    return model_type if model_type.has_resource_base() else None


def _fits(value: dict[str, Any], shape: Shape, depth: int, root: bool = False) -> bool:
    """(``depth``: the object's nesting as ``validate`` counts it, an array a level; ``root``:
    ``value`` is a resource, a contained one included.)"""
    if not value or depth > _WALKED_DEPTH:
        return False
    elements = shape.elements
    for key, item in value.items():
        element = elements.get(key)
        if element is None:
            if root and key == "resourceType":
                continue
            return False
        primitive = element.primitive
        inner = element.shape
        if element.is_list:
            if type(item) is not list or not item:
                return False
            if primitive is not None:
                for each in item:
                    if not primitive.accepts(each):
                        return False
            elif inner is not None:
                for each in item:
                    if type(each) is not dict or not _fits(each, inner, depth + 2):
                        return False
            else:  # contained resources, each of its own type
                if not root:
                    return False  # misplaced: only a resource contains others
                prefix = element.resources_prefix
                for each in item:
                    if type(each) is not dict or not _contained_fits(each, prefix, depth + 2):
                        return False
        elif primitive is None:
            if type(item) is not dict or inner is None or not _fits(item, inner, depth + 1):
                return False
        elif not primitive.accepts(item):
            return False
    for name in shape.required:
        if name not in value:
            return False
    for names, needed in shape.choices:
        present = sum(1 for name in names if name in value)
        if present > 1 or (needed and present == 0):
            return False
    return True
