"""Ed25519 key files and domain-separated signatures."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ledger import keys
from ledger.errors import KeyFileError, SignatureError


def test_key_file_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "node.pem"
    key = keys.load_or_create_private_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    again = keys.load_or_create_private_key(path)
    assert keys.public_key_text(again) == keys.public_key_text(key)
    with pytest.raises(KeyFileError, match="not overwriting"):
        keys.write_private_key(path, key)


def test_unsafe_or_wrong_key_files_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.pem"
    keys.load_or_create_private_key(path)
    os.chmod(path, 0o640)
    with pytest.raises(KeyFileError, match="chmod 600"):
        keys.load_private_key(path)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key")
    os.chmod(junk, 0o600)
    with pytest.raises(KeyFileError, match="not an unencrypted PEM private key"):
        keys.load_private_key(junk)
    with pytest.raises(KeyFileError, match="does not exist"):
        keys.load_private_key(tmp_path / "absent.pem")


def test_signatures_are_domain_separated(tmp_path: Path) -> None:
    key = keys.load_or_create_private_key(tmp_path / "k.pem")
    digest = bytes(range(32))
    signature = keys.sign(key, keys.BLOCK_DOMAIN, digest)
    keys.verify(keys.public_key_text(key), keys.BLOCK_DOMAIN, digest, signature)
    with pytest.raises(SignatureError):
        keys.verify(key.public_key(), keys.ROSTER_DOMAIN, digest, signature)
    with pytest.raises(SignatureError):
        keys.verify(key.public_key(), keys.BLOCK_DOMAIN, bytes(32), signature)


@pytest.mark.parametrize("text", ["YWJj=", "YW+j", "YW/j", "YWJ", "YWJjZ", "a b"])
def test_base64url_is_strict(text: str) -> None:
    with pytest.raises(SignatureError):
        keys.b64url_decode(text)


def test_base64url_round_trip() -> None:
    for size in range(40):
        data = os.urandom(size)
        assert keys.b64url_decode(keys.b64url_encode(data), length=size) == data
