"""Signed requests between member nodes (docs/spec.md §10): HTTP Message Signatures (RFC 9421).

A node signs every request to a peer with its ledger Ed25519 key: ``alg="ed25519"``,
``keyid`` = its member id, ``tag="hrx"``, covering ``@method``, ``@target-uri`` and
``content-digest`` (RFC 9530, SHA-256; present even for an empty body), with ``created`` and
a random ``nonce``. The receiving node accepts it only when the key id is a member of its
newest roster, the signature verifies with that member's key, ``created`` lies within the
last 300 s (and no more than 5 s ahead), the digest matches the body, and the nonce has not
been seen (nonces are remembered in the database for as long as they could be accepted, so a
replay is caught whichever worker process it reaches). Remembering a nonce commits without
waiting for the disk (SQLite ``synchronous=NORMAL`` in WAL mode, PostgreSQL
``synchronous_commit=off``): it survives the process crashing, and only a power loss in the
same moment could forget it, which a replay would also have to hit within 300 s.

The target URI a node checks is its own public URL (``node.url``) plus the request's path and
query: what the peer signed, whatever proxies sit between them.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from http_message_signatures import (
    HTTPMessageSigner,
    HTTPMessageVerifier,
    HTTPSignatureKeyResolver,
    InvalidSignature,
    algorithms,
)
from http_message_signatures.exceptions import HTTPMessageSignaturesException
from sqlalchemy.engine import Engine

from fhir_adapters.errors import Unauthorized
from ledger.errors import LedgerError
from ledger.roster import Roster
from node.db.schema import nonces_table

TAG = "hrx"
LABEL = "hrx"
COVERED = ("@method", "@target-uri", "content-digest")
MAX_AGE_SECONDS = 300
FUTURE_SKEW_SECONDS = 5


@dataclass
class Message:
    """The parts of an HTTP request a signature covers (the library's message interface)."""

    method: str
    url: str
    headers: dict[str, str]


class _OwnKey(HTTPSignatureKeyResolver):
    def __init__(self, member_id: str, key: Ed25519PrivateKey) -> None:
        self.member_id = member_id
        self.key = key

    def resolve_private_key(self, key_id: str) -> Ed25519PrivateKey:
        assert key_id == self.member_id
        return self.key


class _RosterKeys(HTTPSignatureKeyResolver):
    def __init__(self, roster: Roster) -> None:
        self.roster = roster

    def resolve_public_key(self, key_id: str) -> Any:
        try:
            return self.roster.ed25519_key(key_id)
        except LedgerError:
            raise Unauthorized(
                f"keyid {key_id[:64]!r} is not a member of roster version {self.roster.version}"
            ) from None


def sign_request(
    member_id: str,
    key: Ed25519PrivateKey,
    method: str,
    url: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> dict[str, str]:
    """The headers to send with a request: the given ones plus Content-Digest, Signature-Input
    and Signature."""
    message = Message(method.upper(), url, dict(headers or {}))
    HTTPMessageSigner(
        signature_algorithm=algorithms.ED25519, key_resolver=_OwnKey(member_id, key)
    ).sign(
        message,
        key_id=member_id,
        created=datetime.now(UTC),
        nonce=secrets.token_urlsafe(24),
        label=LABEL,
        tag=TAG,
        covered_component_ids=COVERED,
        body=body,
    )
    return message.headers


class _Verifier(HTTPMessageVerifier):
    max_clock_skew = timedelta(seconds=FUTURE_SKEW_SECONDS)


def verify_request(
    roster: Roster,
    nonces: Engine,
    method: str,
    url: str,
    headers: Iterable[tuple[str, str]],
    body: bytes,
) -> str:
    """The member id that signed this request, or :class:`Unauthorized` saying why not."""
    message = Message(method.upper(), url, {name: value for name, value in headers})
    lowered = {name.lower() for name in message.headers}
    if "signature" not in lowered or "signature-input" not in lowered:
        raise Unauthorized("this endpoint takes requests signed by a member node (RFC 9421)")
    try:
        results = _Verifier(
            signature_algorithm=algorithms.ED25519, key_resolver=_RosterKeys(roster)
        ).verify(
            message,
            # the library adds its clock-skew tolerance to the age limit
            max_age=timedelta(seconds=MAX_AGE_SECONDS - FUTURE_SKEW_SECONDS),
            expect_tag=TAG,
            require_components=COVERED,
            body=body,
        )
    except (InvalidSignature, HTTPMessageSignaturesException) as exc:
        raise Unauthorized(f"request signature refused: {exc}") from None
    result = results[0]
    member = str(result.parameters["keyid"])
    nonce = result.parameters.get("nonce")
    if not isinstance(nonce, str) or not 16 <= len(nonce) <= 64:
        raise Unauthorized("the signature carries no nonce (16 to 64 characters)")
    _remember_nonce(nonces, member, nonce)
    return member


def _remember_nonce(engine: Engine, member: str, nonce: str) -> None:
    now = int(time.time())
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":  # as SQLite's nonce engine: no wait for the disk
            conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
        conn.execute(
            nonces_table.delete().where(
                nonces_table.c.seen < now - MAX_AGE_SECONDS - FUTURE_SKEW_SECONDS
            )
        )
        seen = conn.execute(
            sa.select(nonces_table.c.member).where(nonces_table.c.nonce == nonce)
        ).first()
        if seen is not None:
            raise Unauthorized("replayed request: this nonce was already used")
        conn.execute(nonces_table.insert().values(nonce=nonce, member=member, seen=now))
