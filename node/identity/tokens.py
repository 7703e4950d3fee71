"""Who is calling, and what they may do: bearer tokens, SMART scopes, roles.

Tokens are EdDSA (Ed25519) JWTs signed by the node's token key (``keys/token.pem``, kept
apart from the key that signs ledger blocks), with SMART v2 scopes such as
``user/*.cruds``, ``patient/Observation.rs`` and ``system/*.rs`` (v1 ``.read``/``.write``
are read as ``.rs``/``.cud``). What a token allows is what its scopes grant *and* its user's
role allows:

- doctor and admin: create, read, update, delete and search every type but AuditEvent;
- auditor: read and search every type, AuditEvent included; never writes;
- patient: read and search, only inside the compartment of the patient the user stands for;
  create and update their own privacy consents (:mod:`node.records.consents`).

AuditEvents are written by the node alone. A token stops working when it expires, when its
signature or claims do not check, when its user is disabled or removed, when it is revoked by
its id (``jti``), and when every token of its user is (``hrx token revoke --username``, a new
password, disabling: the user's token generation moves past the token's claim ``gen``). Each
request reads its token's standing from the database (one query, two primary-key reads,
:func:`node.identity.users.token_standing`), so a revocation made by any process holds from the next
request on in every other; only the signature check is cached. The reason for a refusal goes
back as a 401 OperationOutcome, a scope or role that does not allow the call as a 403.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fhir_adapters.errors import Forbidden, Unauthorized
from fhir_adapters.store.resources import RESOURCE_TYPES
from fhir_adapters.store.search import Access
from ledger import keys
from node.base.errors import UserError
from node.db.engines import Database
from node.identity.users import User, get_user, record_token, token_standing

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
        return action in "crus"  # their own privacy consents (node.records.consents)
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
    generation: int = 0  # the user's token generation when the token was issued

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


Standing = Callable[[str, str], tuple[User | None, bool]]  # (username, jti): users.token_standing
Recorder = Callable[[str, str, int, int], None]  # (jti, username, iat, exp): users.record_token


class TokenAuthority:
    """Issues and checks a node's tokens.

    ``standing`` tells a token's user and whether the token was revoked by its id; ``record``,
    when given, lists each token issued (so that it can be revoked by its id)."""

    def __init__(
        self,
        key: Ed25519PrivateKey,
        issuer: str,
        standing: Standing,
        record: Recorder | None = None,
    ) -> None:
        self.key = key
        self.public_key = key.public_key()
        self.issuer = issuer
        self.standing = standing
        self.record = record
        self._tokens: OrderedDict[str, tuple[Principal, int]] = OrderedDict()
        self._lock = threading.Lock()

    def issue(self, user: User, scope_text: str | None, ttl: int) -> str:
        if user.removed:
            raise UserError(f"user {user.username!r} was removed")
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
            "gen": user.token_generation,
        }
        if user.patient_id:
            claims["patient"] = user.patient_id
            claims["fhirUser"] = f"{self.issuer}/Patient/{user.patient_id}"
        token = jwt.encode(claims, self.key, algorithm="EdDSA", headers={"typ": "JWT"})
        if self.record is not None:
            self.record(claims["jti"], user.username, now, now + ttl)
        return token

    def scope_of(self, token: str) -> str:
        claims = jwt.decode(token, options={"verify_signature": False})
        return str(claims["scope"])

    def id_of(self, token: str) -> str:
        """The token's id (``jti``), for revoking it alone."""
        claims = jwt.decode(token, options={"verify_signature": False})
        return str(claims["jti"])

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
        user, revoked = self.standing(principal.username, principal.token_id)
        if user is None or user.removed:
            raise Unauthorized(f"the token's user {principal.username!r} was removed")
        if not user.active:
            raise Unauthorized(f"the token's user {principal.username!r} is disabled")
        if revoked:
            raise Unauthorized("the token was revoked; get a new one")
        if user.token_generation != principal.generation:
            raise Unauthorized(
                f"every token of {principal.username!r} issued before a revocation, a new "
                "password or disabling was revoked; get a new one"
            )
        if user.role != principal.role or user.patient_id != principal.patient_id:
            raise Unauthorized(f"the token's user {principal.username!r} changed; get a new one")
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
            token_id=str(claims["jti"]),
            generation=claims.get("gen", 0),
        )
        if (
            principal.role not in ROLE_CONTEXTS
            or (principal.role == "patient" and not principal.patient_id)
            or not isinstance(principal.generation, int)
            or len(principal.token_id) > 64
        ):
            raise Unauthorized("the token's role claims are not valid")
        return principal, int(claims["exp"])


def token_authority(key_path: Path, issuer: str, database: Database) -> TokenAuthority:
    """The node's token authority over its database: tokens' standing read from it, and every
    token issued listed in it."""
    return TokenAuthority(
        keys.load_private_key(key_path),
        issuer,
        partial(token_standing, database.engine),
        partial(record_token, database.write_engine),
    )


def issue_token(
    key_path: Path,
    issuer: str,
    database: Database,
    username: str,
    scope: str | None,
    ttl: int,
) -> str:
    """A bearer token for a user of the node (its id listed, so that it can be revoked)."""
    user = get_user(database.engine, username)
    if user is None:
        raise UserError(f"no user {username!r}")
    return token_authority(key_path, issuer, database).issue(user, scope, ttl)
