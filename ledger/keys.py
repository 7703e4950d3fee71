"""Ed25519 keys and signatures for the ledger: PEM (PKCS#8) key files, base64url encoding, and
domain-separated signing.

Key files are created when absent with mode 0600 and refused when other users may read them.
Every signature covers ``domain || digest`` where ``domain`` names what is signed
(docs/spec.md §1.3: ``b"hrx/block/v1\\x00"``, ``b"hrx/roster/v1\\x00"``), so a signature over
one kind of object can never be replayed as another.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from functools import lru_cache
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from ledger.errors import KeyFileError, SignatureError

BLOCK_DOMAIN = b"hrx/block/v1\x00"
ROSTER_DOMAIN = b"hrx/roster/v1\x00"
CHECKPOINT_DOMAIN = b"hrx/checkpoint/v1\x00"
RESOLUTION_DOMAIN = b"hrx/resolution/v1\x00"


def b64url_encode(data: bytes) -> str:
    """base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str, *, length: int | None = None, what: str = "value") -> bytes:
    """Strict base64url without padding; ``length`` (if given) is the exact byte length."""
    if not isinstance(text, str) or not text.isascii() or "=" in text:
        raise SignatureError(f"{what} is not unpadded base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"{what} is not base64url: {exc}") from exc
    if b64url_encode(data) != text:
        raise SignatureError(f"{what} is not canonical base64url")
    if length is not None and len(data) != length:
        raise SignatureError(f"{what} is {len(data)} bytes, not {length}")
    return data


def write_private_key(path: Path, key: Ed25519PrivateKey) -> None:
    """Write ``key`` as PEM PKCS#8 to a new file readable by its owner only."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path} exists already; not overwriting a key") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
        handle.flush()
        os.fsync(handle.fileno())


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read an Ed25519 PEM PKCS#8 key file, refusing one that others may read."""
    try:
        mode = path.stat().st_mode
        pem = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"key file {path} is accessible to other users (mode {stat.S_IMODE(mode):04o}); "
            f"run: chmod 600 {path}"
        )
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def load_or_create_private_key(path: Path) -> Ed25519PrivateKey:
    """The key in ``path``; a new one is generated and written there when the file is absent."""
    if not path.exists():
        write_private_key(path, Ed25519PrivateKey.generate())
    return load_private_key(path)


def public_key_text(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The raw 32-byte public key, base64url (the form rosters carry)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return b64url_encode(
        public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


@lru_cache(maxsize=1024)
def parse_public_key(text: str) -> Ed25519PublicKey:
    """An Ed25519 public key from its base64url text."""
    return Ed25519PublicKey.from_public_bytes(
        b64url_decode(text, length=32, what="Ed25519 public key")
    )


def load_public_key(source: str) -> Ed25519PublicKey:
    """A public key given as base64url text or as a PEM file (public or private key)."""
    path = Path(source)
    if not path.is_file():
        return parse_public_key(source)
    data = path.read_bytes()
    try:
        if b"PRIVATE KEY" in data:
            private = load_private_key(path)
            return private.public_key()
        public = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise KeyFileError(f"{path} holds no PEM key: {exc}") from exc
    if not isinstance(public, Ed25519PublicKey):
        raise KeyFileError(f"{path} holds a {type(public).__name__}, not an Ed25519 key")
    return public


def sign(key: Ed25519PrivateKey, domain: bytes, digest: bytes) -> str:
    """Ed25519 signature over ``domain || digest``, base64url."""
    return b64url_encode(key.sign(domain + digest))


def verify(public: Ed25519PublicKey | str, domain: bytes, digest: bytes, signature: str) -> None:
    """Raise :class:`SignatureError` unless ``signature`` by ``public`` signs ``domain||digest``."""
    key = parse_public_key(public) if isinstance(public, str) else public
    raw = b64url_decode(signature, length=64, what="Ed25519 signature")
    try:
        key.verify(raw, domain + digest)
    except InvalidSignature:
        raise SignatureError("Ed25519 signature does not verify") from None
