"""The one error hierarchy of this package: every failure it reports is an AdapterError.

The FHIR store's failures are FhirErrors; the mappers have their own subclasses, next to their
code (:class:`fhir_adapters.hl7v2.Hl7Error`, :class:`fhir_adapters.lis_csv.CsvError`,
:class:`fhir_adapters.dicom.DicomMappingError`).

Each FhirError knows the HTTP status FHIR gives it and becomes an OperationOutcome with
:meth:`FhirError.outcome`; the web layer only serialises it. ``issues`` lets one error carry
several problems (every invalid element of a resource, say), each with the FHIRPath location
of what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Issue:
    """One OperationOutcome issue: what is wrong and where (a FHIRPath expression)."""

    diagnostics: str
    code: str = "invalid"
    expression: str | None = None
    severity: str = "error"

    def to_json(self) -> dict[str, Any]:
        issue: dict[str, Any] = {
            "severity": self.severity,
            "code": self.code,
            "diagnostics": self.diagnostics,
        }
        if self.expression:
            issue["expression"] = [self.expression]
        return issue


class AdapterError(Exception):
    """Base of every error this package raises."""


class FhirError(AdapterError):
    """Base of every error the FHIR package raises: an HTTP status and OperationOutcome issues."""

    status = 400
    code = "invalid"

    def __init__(
        self,
        message: str,
        *,
        expression: str | None = None,
        issues: list[Issue] | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        self.issues = issues or [Issue(message, self.code, expression)]

    def outcome(self) -> dict[str, Any]:
        return operation_outcome(self.issues)


def operation_outcome(issues: list[Issue]) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [issue.to_json() for issue in issues]}


class InvalidRequest(FhirError):
    """400: the request or resource cannot be parsed or breaks basic FHIR rules."""


class TooCostly(InvalidRequest):
    """400 (or the status given): beyond one of this server's limits (search parameters,
    Bundle entries); the message names the limit."""

    code = "too-costly"


class InvalidCode(InvalidRequest):
    """400: a code value its required binding refuses."""

    code = "code-invalid"


class Unauthorized(FhirError):
    """401: no credentials, or credentials that cannot be trusted (expired, forged)."""

    status = 401
    code = "login"


class Forbidden(FhirError):
    """403: authenticated, but the scopes or role do not allow this."""

    status = 403
    code = "forbidden"


class NotFound(FhirError):
    """404: no such resource, version, type or operation."""

    status = 404
    code = "not-found"


class MethodNotAllowed(FhirError):
    """405: the interaction is not supported on this resource type."""

    status = 405
    code = "not-supported"


class NotAcceptable(FhirError):
    """406: the client asks for a format this server does not produce."""

    status = 406
    code = "not-supported"


class Conflict(FhirError):
    """409: the request conflicts with the stored state (version race, referenced resource)."""

    status = 409
    code = "conflict"


class Gone(FhirError):
    """410: the resource was deleted."""

    status = 410
    code = "deleted"


class PreconditionFailed(FhirError):
    """412: If-Match names a version that is not current, or a conditional matched several."""

    status = 412
    code = "conflict"


class UnsupportedMediaType(FhirError):
    """415: the body is not FHIR JSON."""

    status = 415
    code = "not-supported"


class Unprocessable(FhirError):
    """422: well-formed, but it breaks a business rule (an unresolvable reference, say)."""

    status = 422
    code = "processing"
