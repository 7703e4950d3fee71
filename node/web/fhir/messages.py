"""A FHIR request and its answer without their transport (:mod:`node.web.fhir.interactions`
carries them out; HTTP or a Bundle's entries bring them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl

from fhir_adapters.errors import InvalidRequest, Unauthorized, UnsupportedMediaType
from fhir_adapters.store import jsonio
from node.identity.tokens import Principal
from node.records.audit_trail import Caller

JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")
JSON_PATCH = "application/json-patch+json"
FORM = "application/x-www-form-urlencoded"


def preference(prefer: str | None, name: str, default: str) -> str:
    """The value a ``Prefer`` header gives preference ``name`` (``handling``, ``return``...),
    or ``default``."""
    for part in (prefer or "").split(","):
        key, _, value = part.strip().partition("=")
        if key.strip() == name:
            return value.strip().strip('"')
    return default


@dataclass
class FhirRequest:
    """One FHIR request: ``path`` below the FHIR base (``Patient/1/_history/2``, ``""`` for the
    base itself), decoded; ``query`` as given; header names lower-case; ``body`` as sent."""

    method: str
    path: str
    query: list[tuple[str, str]]
    caller: Caller
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    content_type: str = ""  # the media type, lower-case, without parameters
    charset: str | None = None  # the Content-Type's charset parameter, as sent
    raw_query: str = ""  # the query string as sent (for self links and the audit)
    route: str = ""  # the pattern it matched, once handled (FhirApi.handle)

    @property
    def principal(self) -> Principal:
        if self.caller.principal is None:
            raise Unauthorized(
                "this server needs a bearer token (Authorization: Bearer ...); get one with "
                "hrx token issue or POST /auth/token"
            )
        return self.caller.principal

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def arg(self, name: str, default: str | None = None) -> str | None:
        return next((value for key, value in self.query if key == name), default)

    def listed(self, name: str) -> list[str]:
        """Every value of a parameter, comma-separated values apart."""
        return [part for key, value in self.query if key == name for part in value.split(",")]

    def prefer(self, name: str, default: str) -> str:
        return preference(self.header("Prefer"), name, default)

    def json(self, what: str = "the body") -> Any:
        """The body as FHIR JSON; 415 for another media type or character set, 400 empty."""
        if self.content_type not in JSON_TYPES:
            raise UnsupportedMediaType(
                f"Content-Type {self.header('Content-Type') or '(none)'} is not FHIR JSON; send "
                "application/fhir+json"
            )
        self._check_charset()
        if not self.body:
            raise InvalidRequest(f"{what} is empty")
        return jsonio.parse(self.body, what)

    def json_patch(self) -> list[Any]:
        """The body as a JSON Patch (RFC 6902, ``application/json-patch+json``); 415 for
        another media type, 400 for what is no list of operations."""
        if self.content_type != JSON_PATCH:
            raise UnsupportedMediaType(
                f"Content-Type {self.header('Content-Type') or '(none)'}: PATCH takes a JSON "
                f"Patch ({JSON_PATCH}); FHIRPath Patch is not supported"
            )
        self._check_charset()
        return patch_operations(jsonio.parse(self.body, "the patch") if self.body else None)

    def form(self) -> list[tuple[str, str]]:
        """The body as a form (``POST _search``); 415 for another media type."""
        if self.content_type != FORM:
            raise UnsupportedMediaType(f"POST _search takes {FORM}")
        self._check_charset()
        try:
            text = self.body.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest("the form is not UTF-8") from None
        return parse_qsl(text, keep_blank_values=True)

    def _check_charset(self) -> None:
        """415 unless the Content-Type names UTF-8 (in any case) or no charset: FHIR JSON is
        UTF-8, and a body in another character set must not be read as if it were."""
        if self.charset and self.charset.lower() != "utf-8":  # an empty one names none
            raise UnsupportedMediaType(
                f"Content-Type charset={self.charset[:40]!r}: this server reads bodies as UTF-8 "
                "only; send them in UTF-8 (charset=utf-8, or no charset)"
            )


@dataclass
class FhirResponse:
    status: int
    body: bytes | dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def status_line(self) -> str:
        """``201 Created``: the status as a Bundle entry's response gives it."""
        return f"{self.status} {HTTPStatus(self.status).phrase}"


def patch_operations(value: Any) -> list[dict[str, Any]]:
    """``value`` as a list of JSON Patch operations; 400 when it is none."""
    if not isinstance(value, list) or not all(isinstance(o, dict) for o in value):
        raise InvalidRequest('a JSON Patch is a list of operations ({"op", "path", ...})')
    return value
