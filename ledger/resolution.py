"""The consortium authority's way back from a fork: a signed resolution naming the branch of a
chain that is kept.

A fork is two validly signed blocks of one chain at one height. Every member that sees one
freezes the chain, and no member can decide on its own which branch is the chain: only the
authority, the trust anchor, can. A resolution says, for a chain and a height, which block
(by its hash) is the chain's; it is signed by the authority's key over
``b"hrx/resolution/v1\\x00" + SHA-256(JCS(resolution))``, like a roster::

    {"resolution": {"v": 1, "chain": "hosp-a", "height": 7, "keep": "<block hash>"},
     "signature": "<Ed25519, base64url>"}

A member that holds the kept block at that height follows the chain again (its fork evidence
there is resolved); one that holds the other block keeps the chain frozen. The evidence stays:
the fork happened, and the auditor still reports it, as resolved by the authority. A roster
is not used for this, so that the roster's form stays as docs/spec.md §5 fixes it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ledger import keys
from ledger.canonical import canonical_bytes
from ledger.errors import LedgerError, VerificationError
from ledger.model import block_hash, check_chain_id

VERSION = 1
FIELDS = frozenset({"v", "chain", "height", "keep"})


def make_resolution(chain: str, height: int, keep: str) -> dict[str, Any]:
    """A resolution body: block ``keep`` (its hash, hex) is ``chain``'s at ``height``."""
    return check_resolution_body({"v": VERSION, "chain": chain, "height": height, "keep": keep})


def check_resolution_body(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict) or set(body) != FIELDS or type(body["v"]) is not int:
        raise VerificationError(f"a resolution is {sorted(FIELDS)} with v {VERSION}")
    if body["v"] != VERSION:
        raise VerificationError(f"a resolution is {sorted(FIELDS)} with v {VERSION}")
    check_chain_id(body["chain"])
    if type(body["height"]) is not int or body["height"] < 0:
        raise VerificationError("a resolution's height is a whole number")
    keep = body["keep"]
    if not isinstance(keep, str) or len(keep) != 64 or keep != keep.lower():
        raise VerificationError("a resolution keeps a block named by its SHA-256 (lowercase hex)")
    bytes.fromhex(keep)
    return body


def digest(body: Mapping[str, Any]) -> bytes:
    return hashlib.sha256(canonical_bytes(dict(body))).digest()


def sign_resolution(body: dict[str, Any], authority: Ed25519PrivateKey) -> dict[str, Any]:
    """The signed document (``{"resolution", "signature"}``)."""
    check_resolution_body(body)
    return {
        "resolution": body,
        "signature": keys.sign(authority, keys.RESOLUTION_DOMAIN, digest(body)),
    }


def open_resolution(document: Any, authority: Ed25519PublicKey) -> dict[str, Any]:
    """The resolution of a signed document, once the authority's signature holds."""
    try:
        if not isinstance(document, dict) or set(document) != {"resolution", "signature"}:
            raise VerificationError('a signed resolution is {"resolution", "signature"}')
        body = check_resolution_body(document["resolution"])
        keys.verify(authority, keys.RESOLUTION_DOMAIN, digest(body), document["signature"])
    except VerificationError:
        raise
    except (LedgerError, ValueError) as exc:
        raise VerificationError(f"resolution: {exc}") from None
    return body


def resolves(resolution: Mapping[str, Any], evidence: Mapping[str, Any]) -> bool:
    """Whether ``resolution`` settles ``evidence``: the same chain and height, and one of the
    two blocks is the one it keeps."""
    headers = [signed["header"] for signed in evidence["headers"]]
    return (
        resolution["chain"] == evidence["chain"]
        and resolution["height"] == evidence["height"]
        and resolution["keep"] in {block_hash(header).hex() for header in headers}
    )


def settled(evidence: Mapping[str, Any], resolutions: Iterable[Mapping[str, Any]]) -> bool:
    return any(resolves(resolution, evidence) for resolution in resolutions)
