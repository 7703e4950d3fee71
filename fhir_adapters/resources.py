"""The resource types a node hosts, and the validation every stored resource passes.

``fhir.resources`` has no R4 package; its R4B models (4.3.0) are the closest and check
structure and types (unknown elements are refused). On top of them this module refuses what
FHIR JSON forbids and the models let through (``null`` values, empty strings, objects and
arrays, malformed ids) and every code value its required binding refuses
(:mod:`fhir_adapters.codes`). A failure lists every problem found, each with its FHIRPath.
"""

from __future__ import annotations

import importlib
import re
from functools import cache
from typing import Any

import pydantic

from fhir_adapters.codes import code_issues
from fhir_adapters.errors import InvalidCode, InvalidRequest, Issue

RESOURCE_TYPES = (
    "Patient",
    "Practitioner",
    "Organization",
    "Observation",
    "DiagnosticReport",
    "ImagingStudy",
    "ServiceRequest",
    "Consent",
    "AuditEvent",
    "Provenance",
)
ID_PATTERN = re.compile(r"[A-Za-z0-9\-.]{1,64}")
MAX_ISSUES = 50  # a resource wrong in a thousand places gets the first fifty


@cache
def model_class(resource_type: str) -> Any:
    """The R4B model class for a hosted resource type."""
    module = importlib.import_module(f"fhir.resources.R4B.{resource_type.lower()}")
    return getattr(module, resource_type)


def check_type(resource_type: str) -> str:
    from fhir_adapters.errors import NotFound

    if resource_type not in RESOURCE_TYPES:
        raise NotFound(
            f"this server does not host {resource_type!r} resources; it hosts "
            + ", ".join(RESOURCE_TYPES),
            expression=None,
        )
    return resource_type


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


def _json_shape_issues(value: Any, path: str, issues: list[Issue]) -> None:
    """What FHIR JSON forbids that the models accept: nulls and empty values."""
    if len(issues) >= MAX_ISSUES:
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
                        _json_shape_issues(element, f"{path}.{key}[{index}]", issues)
            else:
                _json_shape_issues(item, f"{path}.{key}", issues)
    elif isinstance(value, list):
        if not value:
            issues.append(Issue("an array must not be empty", expression=path))
        for index, item in enumerate(value):
            if item is None and not path.rsplit(".", 1)[-1].startswith("_"):
                # a null in a primitive array is allowed only beside a "_name" array
                issues.append(Issue("null is not a FHIR value", expression=f"{path}[{index}]"))
            elif item is not None:
                _json_shape_issues(item, f"{path}[{index}]", issues)
    elif isinstance(value, str) and not value.strip():
        issues.append(Issue("a string must not be empty or only white space", expression=path))


def validate(resource: Any, resource_type: str | None = None) -> tuple[dict[str, Any], Any]:
    """Check a parsed resource; returns it and its model instance, or raises with every issue.

    ``resource_type`` is the type the URL names, when there is one.
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
    issues: list[Issue] = []
    _json_shape_issues(resource, declared, issues)
    if issues:
        raise InvalidRequest(issues[0].diagnostics, issues=issues[:MAX_ISSUES])
    try:
        model = model_class(declared).model_validate(resource)
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
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(f"{declared}: {str(exc).splitlines()[0]}") from None
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
    return resource, model


def references(value: Any, path: str = "") -> list[tuple[str, str]]:
    """Every ``Reference.reference`` in a resource, with the FHIRPath of its Reference
    (contained resources excluded: their references are checked where they are used)."""
    found: list[tuple[str, str]] = []
    _collect_references(value, path, found)
    return found


def _collect_references(value: Any, path: str, found: list[tuple[str, str]]) -> None:
    if isinstance(value, dict):
        reference = value.get("reference")
        if isinstance(reference, str):
            found.append((path, reference))
        for key, item in value.items():
            if key != "contained" and not key.startswith("_"):
                _collect_references(item, f"{path}.{key}" if path else key, found)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _collect_references(item, f"{path}[{index}]", found)
