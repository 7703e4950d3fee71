"""Who is calling, and what they may do: bearer tokens, SMART scopes, roles.

Tokens are EdDSA (Ed25519) JWTs signed by the node's token key (``keys/token.pem``, kept
apart from the key that signs ledger blocks), with SMART v2 scopes such as
``user/*.cruds``, ``patient/Observation.rs`` and ``system/*.rs`` (v1 ``.read``/``.write``
are read as ``.rs``/``.cud``). What a token allows is what its scopes grant *and* its user's
role allows:

- doctor and admin: create, read, update, delete and search every type but AuditEvent;
- auditor: read and search every type, AuditEvent included; never writes;
- patient: read and search, only inside the compartment of the patient the user stands for;
  create and update their own privacy consents (:mod:`node.consents`).

AuditEvents are written by the node alone. A token stops working when it expires, when its
user is disabled, or when its signature or claims do not check; the reason goes back as a
401 OperationOutcome, a scope or role that does not allow the call as a 403.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fhir_adapters.errors import Forbidden, Unauthorized
from fhir_adapters.resources import RESOURCE_TYPES
from fhir_adapters.search import Access
from node.errors import UserError
from node.users import User

ACTIONS = "cruds"
SCOPE = re.compile(r"(patient|user|system)/(\*|[A-Z][A-Za-z]+)\.([a-z*]+)")
CLOCK_SKEW = 30  # seconds a token's iat may lie in the future

ROLE_CONTEXTS = {
    "doctor": ("user",),
    "admin": ("user", "system"),
    "auditor": ("user", "system"),
    "patient": ("patient",),
}
DEFAULT_SCOPES = {
    "doctor": "user/*.cruds",
    "admin": "user/*.cruds",
    "auditor": "user/*.rs",
    "patient": "patient/*.rs patient/Consent.cu",
}


def role_allows(role: str, resource_type: str, action: str) -> bool:
    if resource_type == "AuditEvent":
        return action in "rs" and role in ("auditor", "patient")
    if role in ("doctor", "admin"):
        return True
    if role == "patient" and resource_type == "Consent":
        return action in "crus"  # their own privacy consents (node.consents)
    return action in "rs"


@dataclass(frozen=True)
class Scope:
    context: str
    resource_type: str  # "*" or a type
    actions: str

    def __str__(self) -> str:
        return f"{self.context}/{self.resource_type}.{self.actions}"


def parse_scope(text: str) -> Scope:
    match = SCOPE.fullmatch(text)
    if not match:
        raise UserError(
            f"scope {text!r} is not a SMART scope such as user/*.cruds or patient/Observation.rs"
        )
    context, resource_type, actions = match.groups()
    actions = {"read": "rs", "write": "cud", "*": ACTIONS}.get(actions, actions)
    if (
        not actions
        or any(a not in ACTIONS for a in actions)
        or list(actions) != sorted(actions, key=ACTIONS.index)
        or len(set(actions)) != len(actions)
    ):
        raise UserError(f"scope {text!r}: permissions must be letters of 'cruds' in that order")
    if resource_type != "*" and resource_type not in RESOURCE_TYPES:
        raise UserError(f"scope {text!r}: this node does not host {resource_type}")
    return Scope(context, resource_type, actions)


def parse_scopes(text: str) -> list[Scope]:
    """Scopes separated by spaces; OpenID and launch scopes are ignored."""
    return [
        parse_scope(part)
        for part in text.split()
        if part not in ("openid", "fhirUser", "offline_access", "online_access")
        and not part.startswith("launch")
    ]


def check_scopes_for(user: User, scopes: list[Scope]) -> None:
    allowed = ROLE_CONTEXTS[user.role]
    for scope in scopes:
        if scope.context not in allowed:
            raise UserError(
                f"a {user.role} cannot hold {scope}: {user.role} scopes are "
                + " or ".join(f"{c}/..." for c in allowed)
            )


@dataclass(frozen=True)
class Principal:
    """The caller of one request."""

    username: str
    role: str
    scopes: tuple[Scope, ...]
    patient_id: str | None
    token_id: str

    @property
    def owner(self) -> str:
        """Who a stored search set belongs to: the same user with the same rights."""
        scopes = " ".join(str(s) for s in self.scopes)
        return f"{self.username}|{self.role}|{self.patient_id or ''}|{scopes}"[:255]

    def allows(self, resource_type: str, action: str) -> bool:
        if not role_allows(self.role, resource_type, action):
            return False
        return any(
            action in scope.actions and scope.resource_type in ("*", resource_type)
            for scope in self.scopes
        )

    def require(self, resource_type: str, action: str) -> Access:
        """What the caller may see of ``resource_type`` for ``action``, or 403."""
        if not self.allows(resource_type, action):
            verb = {"c": "create", "r": "read", "u": "update", "d": "delete", "s": "search"}
            raise Forbidden(
                f"{self.username} ({self.role}) may not {verb[action]} {resource_type}: "
                "no scope or role allows it"
            )
        return self.access

    @property
    def access(self) -> Access:
        if self.role == "patient":
            return Access(frozenset({self.patient_id or ""}))
        return Access()


class TokenAuthority:
    """Issues and checks a node's tokens."""

    def __init__(
        self,
        key: Ed25519PrivateKey,
        issuer: str,
        lookup_user: Any,
        *,
        user_cache_seconds: float = 5.0,
    ) -> None:
        self.key = key
        self.public_key = key.public_key()
        self.issuer = issuer
        self.lookup_user = lookup_user
        self.user_cache_seconds = user_cache_seconds
        self._tokens: OrderedDict[str, tuple[Principal, int]] = OrderedDict()
        self._users: dict[str, tuple[User | None, float]] = {}
        self._lock = threading.Lock()

    def issue(self, user: User, scope_text: str | None, ttl: int) -> str:
        if not user.active:
            raise UserError(f"user {user.username!r} is disabled")
        scopes = parse_scopes(scope_text or DEFAULT_SCOPES[user.role])
        if not scopes:
            raise UserError("no scope given")
        check_scopes_for(user, scopes)
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.issuer,
            "sub": user.username,
            "iat": now,
            "exp": now + ttl,
            "jti": secrets.token_urlsafe(16),
            "scope": " ".join(str(s) for s in scopes),
            "role": user.role,
        }
        if user.patient_id:
            claims["patient"] = user.patient_id
            claims["fhirUser"] = f"{self.issuer}/Patient/{user.patient_id}"
        return jwt.encode(claims, self.key, algorithm="EdDSA", headers={"typ": "JWT"})

    def scope_of(self, token: str) -> str:
        claims = jwt.decode(token, options={"verify_signature": False})
        return str(claims["scope"])

    def _user(self, username: str) -> User | None:
        now = time.monotonic()
        cached = self._users.get(username)
        if cached is not None and now - cached[1] < self.user_cache_seconds:
            return cached[0]
        user: User | None = self.lookup_user(username)
        self._users[username] = (user, now)
        return user

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise Unauthorized(
                "this server needs a bearer token (Authorization: Bearer ...); get one with "
                "hrx token issue or POST /auth/token"
            )
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("the Authorization header must be: Bearer <token>")
        token = token.strip()
        now = int(time.time())
        with self._lock:
            cached = self._tokens.get(token)
            if cached is not None:
                self._tokens.move_to_end(token)
        if cached is not None and cached[1] > now:
            principal = cached[0]
        else:
            principal, expires = self._verify(token)
            with self._lock:
                self._tokens[token] = (principal, expires)
                while len(self._tokens) > 4096:
                    self._tokens.popitem(last=False)
        user = self._user(principal.username)
        if (
            user is None
            or not user.active
            or user.role != principal.role
            or user.patient_id != principal.patient_id
        ):
            raise Unauthorized(f"the token's user {principal.username!r} is disabled or removed")
        return principal

    def _verify(self, token: str) -> tuple[Principal, int]:
        try:
            claims = jwt.decode(
                token,
                self.public_key,
                algorithms=["EdDSA"],
                audience=self.issuer,
                issuer=self.issuer,
                options={"require": ["exp", "iat", "sub", "jti", "scope", "role"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("the token has expired; get a new one") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthorized(f"the token is not valid here: {exc}") from None
        if claims["iat"] > time.time() + CLOCK_SKEW:
            raise Unauthorized("the token was issued in the future; check the clocks")
        try:
            scopes = tuple(parse_scopes(claims["scope"]))
        except UserError as exc:
            raise Unauthorized(f"the token's scope is not valid: {exc}") from None
        principal = Principal(
            username=claims["sub"],
            role=claims["role"],
            scopes=scopes,
            patient_id=claims.get("patient"),
            token_id=claims["jti"],
        )
        if principal.role not in ROLE_CONTEXTS or (
            principal.role == "patient" and not principal.patient_id
        ):
            raise Unauthorized("the token's role claims are not valid")
        return principal, int(claims["exp"])
