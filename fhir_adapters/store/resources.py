"""The resource types a node hosts, and the validation every stored resource passes.

``fhir.resources`` has no R4 package; its R4B models (4.3.0) are the closest and check
structure and types (unknown elements are refused). The 18 R4 types R4B dropped are checked by
fhirclient's R4 models instead (structure, JSON types, date formats, required elements; no
code bindings). On top of them this module refuses what
FHIR JSON forbids and the models let through (``null`` values, empty strings, objects and
arrays, malformed ids) and every code value its required binding refuses
(:mod:`fhir_adapters.store.codes`). A failure lists every problem found, each with its FHIRPath.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from decimal import Decimal
from functools import cache
from typing import Any

import pydantic

from fhir_adapters import definitions
from fhir_adapters.errors import InvalidCode, InvalidRequest, Issue, NotFound
from fhir_adapters.store.codes import code_issues
from fhir_adapters.store.jsonio import number_problem
from fhir_adapters.store.shapes import CONTROL, certainly_valid, field_kinds


def _modelled(resource_type: str) -> bool:
    return importlib.util.find_spec(f"fhir.resources.R4B.{resource_type.lower()}") is not None


# Every FHIR R4 resource type. R4B dropped 18 of them (the MedicinalProduct* and Substance*
# definitions and two evidence syntheses): those are checked by fhirclient's R4 models.
RESOURCE_TYPES = definitions.resource_types()
R4_ONLY = tuple(t for t in RESOURCE_TYPES if not _modelled(t))
ID_PATTERN = re.compile(r"[A-Za-z0-9\-.]{1,64}")
MAX_ISSUES = 50  # a resource wrong in a thousand places gets the first fifty
MAX_DEPTH = 64  # JSON nesting a resource may have (the models recurse once per level)


@cache
def model_class(resource_type: str) -> Any:
    """The R4B model class for a hosted resource type."""
    module = importlib.import_module(f"fhir.resources.R4B.{resource_type.lower()}")
    return getattr(module, resource_type)


@cache
def r4_model_class(resource_type: str) -> Any:
    """fhirclient's R4 model class for one of the :data:`R4_ONLY` types."""
    module = importlib.import_module(f"fhirclient.models.{resource_type.lower()}")
    return getattr(module, resource_type)


@cache
def r4_elements(resource_type: str) -> tuple[tuple[str, str, bool], ...]:
    """(JSON name, base name: a choice's ``value`` for ``valueQuantity``, required) of each
    root-level element of an :data:`R4_ONLY` type, from fhirclient's R4 model."""
    return tuple(
        (json_name, of_many or json_name, bool(required))
        for _name, json_name, _type, _is_list, of_many, required in r4_model_class(
            resource_type
        )().elementProperties()
    )


def check_type(resource_type: str) -> str:
    if resource_type in RESOURCE_TYPES:
        return resource_type
    raise NotFound(
        f"this server does not host {resource_type[:64]!r} resources: it is not a FHIR R4 "
        "resource type (names are case-sensitive, e.g. Patient, Observation)",
        expression=None,
    )


def check_id(resource_id: str, what: str = "id") -> str:
    if not ID_PATTERN.fullmatch(resource_id):
        raise InvalidRequest(
            f"{what} {resource_id[:80]!r} is not a FHIR id (1 to 64 of A-Z a-z 0-9 - .)"
        )
    return resource_id


def _expression(resource_type: str, location: tuple[Any, ...]) -> str:
    path = resource_type
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part != "__root__":
            path += f".{part}"
    return path


def _json_shape_issues(value: Any, path: str, issues: list[Issue], depth: int = 0) -> None:
    """What FHIR JSON forbids that the models accept: nulls, empty values, control
    characters; nesting deeper than :data:`MAX_DEPTH`; and numbers JSON clients cannot read
    (:func:`fhir_adapters.store.jsonio.number_problem`)."""
    if len(issues) >= MAX_ISSUES:
        return
    if depth > MAX_DEPTH:
        issues.append(Issue(f"nested more than {MAX_DEPTH} levels deep", expression=path))
        return
    if isinstance(value, dict):
        if not value:
            issues.append(Issue("an object must not be empty", expression=path))
        for key, item in value.items():
            if item is None:
                issues.append(Issue("null is not a FHIR value", expression=f"{path}.{key}"))
            elif key.startswith("_") and isinstance(item, list):
                # primitive extensions of a repeating element: nulls keep the alignment
                for index, element in enumerate(item):
                    if element is not None:
                        _json_shape_issues(element, f"{path}.{key}[{index}]", issues, depth + 1)
            else:
                _json_shape_issues(item, f"{path}.{key}", issues, depth + 1)
    elif isinstance(value, list):
        if not value:
            issues.append(Issue("an array must not be empty", expression=path))
        for index, item in enumerate(value):
            if item is None and not path.rsplit(".", 1)[-1].startswith("_"):
                # a null in a primitive array is allowed only beside a "_name" array
                issues.append(Issue("null is not a FHIR value", expression=f"{path}[{index}]"))
            elif item is not None:
                _json_shape_issues(item, f"{path}[{index}]", issues, depth + 1)
    elif isinstance(value, str):
        if not value.strip():
            issues.append(Issue("a string must not be empty or only white space", expression=path))
        elif CONTROL.search(value):
            issues.append(Issue("a string must not hold control characters", expression=path))
    elif isinstance(value, int | Decimal) and not isinstance(value, bool):
        problem = number_problem(value)
        if problem:
            issues.append(Issue(f"{path}: {problem}", "value", path))


def validate(resource: Any, resource_type: str | None = None) -> dict[str, Any]:
    """Check a parsed resource; returns it, or raises with every issue.

    ``resource_type`` is the type the URL names, when there is one. A resource
    :func:`fhir_adapters.store.shapes.certainly_valid` vouches for is not validated into its
    model again: that walk accepts only what every check below accepts.
    """
    if not isinstance(resource, dict):
        raise InvalidRequest("a resource must be a JSON object")
    declared = resource.get("resourceType")
    if not isinstance(declared, str):
        raise InvalidRequest("the resource has no resourceType", expression="resourceType")
    if resource_type is not None and declared != resource_type:
        raise InvalidRequest(
            f"the body is a {declared} but the URL names {resource_type}",
            expression="resourceType",
        )
    check_type(declared)
    if "id" in resource and isinstance(resource["id"], str):
        check_id(resource["id"])
    if declared not in R4_ONLY and certainly_valid(resource, model_class(declared)):
        return resource
    issues: list[Issue] = []
    _json_shape_issues(resource, declared, issues)
    if issues:
        raise InvalidRequest(issues[0].diagnostics, issues=issues[:MAX_ISSUES])
    if declared in R4_ONLY:
        _r4_model(resource, declared)
        return resource
    model_type = model_class(declared)
    try:
        model = model_type.model_validate(resource)
    except pydantic.ValidationError as exc:
        for error in exc.errors()[:MAX_ISSUES]:
            location = _expression(declared, error["loc"])
            message = str(error["msg"]).split("\n")[0]
            if error["type"] == "extra_forbidden":
                message = "unknown element"
            elif error["type"] == "missing":
                message = "required element missing"
            issues.append(Issue(f"{location}: {message}", "structure", location))
        raise InvalidRequest(issues[0].diagnostics, issues=issues) from None
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        # e.g. a contained resource of a type the models do not know
        raise InvalidRequest(
            f"{declared}: not a valid resource ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''})"
        ) from None
    except RecursionError:
        raise InvalidRequest(f"{declared} is nested too deeply") from None
    _json_type_issues(resource, model, declared, issues)
    if issues:
        raise InvalidRequest(issues[0].diagnostics, issues=issues[:MAX_ISSUES])
    bad_codes = code_issues(model)
    if bad_codes:
        for bad in bad_codes[:MAX_ISSUES]:
            issues.append(
                Issue(
                    f"{bad.expression}: {bad.value!r} is not one of " + ", ".join(bad.allowed),
                    "code-invalid",
                    bad.expression,
                )
            )
        raise InvalidCode(issues[0].diagnostics, issues=issues)
    return resource


# -- the R4 types R4B dropped: fhirclient's R4 models ----------------------------------------

_ADDRESS = re.compile(r"<[^<>]*>")  # an object's or class's repr, which the messages name


def _r4_model(resource: dict[str, Any], declared: str) -> Any:
    """fhirclient's strict R4 model of ``resource`` (an :data:`R4_ONLY` type): it refuses
    unknown elements, values of the wrong JSON type, malformed dates and missing required
    elements. No code value is checked against its binding (the models carry none)."""
    from fhirclient.models.fhirabstractbase import FHIRValidationError  # (50 ms: on first use)

    try:  # the models take a decimal as a float: checked on a copy, stored as written
        return r4_model_class(declared)(_floats(resource), strict=True)
    except FHIRValidationError as exc:
        issues: list[Issue] = []
        _r4_issues(exc, declared, issues)
        raise InvalidRequest(issues[0].diagnostics, issues=issues[:MAX_ISSUES]) from None
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise InvalidRequest(f"{declared}: not a valid resource ({type(exc).__name__})") from None
    except RecursionError:
        raise InvalidRequest(f"{declared} is nested too deeply") from None


def _floats(value: Any) -> Any:
    """``value`` with every Decimal (as resources are parsed) a float."""
    if isinstance(value, dict):
        return {key: _floats(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_floats(item) for item in value]
    return float(value) if isinstance(value, Decimal) else value


def _r4_issues(error: BaseException, path: str, issues: list[Issue]) -> None:
    from fhirclient.models.fhirabstractbase import FHIRValidationError

    if isinstance(error, FHIRValidationError):
        if error.path:
            path += "." + re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", str(error.path))
        for inner in error.errors:
            _r4_issues(inner, path, issues)
        return
    text = str(error).strip("'\"")
    missing = re.search(r'Non-optional property "(\w+)"', text)
    unknown = re.search(r'Superfluous entry "([^"]+)"', text)
    wrong = re.search(r"Wrong type <class '(\w+)'>.*expecting <class '([\w.]+)'>", text)
    where = path
    if missing:
        where, message = f"{path}.{missing.group(1)}", "required element missing"
    elif unknown:
        where, message = f"{path}.{unknown.group(1)[:64]}", "unknown element"
    elif wrong:
        expected, found = (_JSON_NAMES.get(t, "object") for t in wrong.groups()[::-1])
        message = f"must be a JSON {expected}, not {found}"
    elif "only takes dict" in text:
        message = "must be an object"
    elif "for list property" in text:
        message = "must be an array"
    else:
        message = _ADDRESS.sub("", text).replace("  ", " ")[:200]
    issues.append(Issue(f"{where}: {message}", "structure", where))


_JSON_NAMES = {
    "str": "string",
    "int": "integer",
    "float": "number",
    "bool": "boolean",
    "list": "array",
    "dict": "object",
}


# -- JSON types: the models coerce ("true" for a boolean, 7 for a dateTime); FHIR JSON does not --


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, Decimal | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else "null"


def _json_type_issues(raw: Any, model: Any, path: str, issues: list[Issue]) -> None:
    """Every element whose JSON type is not the one FHIR JSON gives it."""
    if not isinstance(raw, dict) or model is None or len(issues) >= MAX_ISSUES:
        return
    model_type: Any = type(model)
    kinds = field_kinds(model_type)
    for key, value in raw.items():
        if key == "resourceType" or key not in kinds:
            continue
        attribute, kind, is_list = kinds[key]
        where = f"{path}.{key}"
        items = value if isinstance(value, list) else [value]
        if isinstance(value, list) != is_list:
            issues.append(
                Issue(
                    f"{where}: must be " + ("an array" if is_list else f"a single {kind}"),
                    "structure",
                    where,
                )
            )
            continue
        held = getattr(model, attribute, None)
        held_items = held if isinstance(held, list) else [held]
        for index, item in enumerate(items):
            place = f"{where}[{index}]" if is_list else where
            found = _json_kind(item)
            if item is None:
                continue  # nulls keep primitive extension arrays aligned
            if kind == "object":
                if found != "object":
                    issues.append(Issue(f"{place}: must be an object", "structure", place))
                elif index < len(held_items):
                    _json_type_issues(item, held_items[index], place, issues)
            elif found != kind and not (kind == "number" and found == "integer"):
                issues.append(
                    Issue(f"{place}: must be a JSON {kind}, not {found}", "structure", place)
                )


def identical(first: Any, second: Any) -> bool:
    """Whether two parsed JSON values are the same value of the same Python types, keys in the
    same order and decimals digit for digit: what :func:`validate` cannot tell apart (``==``
    would take ``1``, ``1.0`` and ``True`` for one another)."""
    if type(first) is not type(second):
        return False
    if isinstance(first, dict):
        return list(first) == list(second) and all(
            identical(value, second[key]) for key, value in first.items()
        )
    if isinstance(first, list):
        return len(first) == len(second) and all(
            identical(a, b) for a, b in zip(first, second, strict=True)
        )
    if isinstance(first, Decimal):
        return bool(first.as_tuple() == second.as_tuple())
    return bool(first == second)


_CONTAINERS = (dict, list)


def references(value: Any, path: str = "") -> list[tuple[str, str]]:
    """Every ``Reference.reference`` in a resource, with the FHIRPath of its Reference
    (contained resources excluded: their references are checked where they are used)."""
    found: list[tuple[str, str]] = []
    _collect_references(value, [path] if path else [], found)
    return found


def _collect_references(value: Any, parts: list[str | int], found: list[tuple[str, str]]) -> None:
    """(``parts``: the path's keys and indexes so far, joined only for a reference found.)"""
    if isinstance(value, dict):
        reference = value.get("reference")
        if isinstance(reference, str):
            found.append((_joined(parts), reference))
        for key, item in value.items():
            if isinstance(item, _CONTAINERS) and key != "contained" and key[:1] != "_":
                parts.append(key)
                _collect_references(item, parts, found)
                parts.pop()
    elif isinstance(value, list):
        for index, item in enumerate(value):
            if isinstance(item, _CONTAINERS):
                parts.append(index)
                _collect_references(item, parts, found)
                parts.pop()


def _joined(parts: list[str | int]) -> str:
    return "".join(
        f"[{part}]" if isinstance(part, int) else part if at == 0 else f".{part}"
        for at, part in enumerate(parts)
    )
