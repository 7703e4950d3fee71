"""Checkpoint certificates (ledger.checkpoint): the signers must be witnesses of the roster
version the checkpoint names, and reach its quorum; the aggregate must verify."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledger import bls
from ledger.checkpoint import make_certificate, make_checkpoint, sign, verify_certificate
from ledger.errors import CheckpointError
from ledger.roster import make_member, make_roster, open_roster, sign_roster

SECRETS = {m: bls.generate_secret_key(m.encode().ljust(32, b"\0")) for m in ("a", "b", "c")}


def roster(roles: dict[str, list[str]], quorum: int) -> Any:
    authority = Ed25519PrivateKey.generate()
    members = [
        make_member(
            f"hosp-{m}",
            m,
            f"https://{m}.example",
            Ed25519PrivateKey.generate(),
            secret,
            roles=roles.get(m),
        )
        for m, secret in SECRETS.items()
    ]
    body = make_roster("test", members, quorum=quorum)
    return open_roster(body, sign_roster(body, authority), authority.public_key())


def certificate(signers: str) -> dict[str, Any]:
    checkpoint = make_checkpoint(5, 1, {})
    return make_certificate(
        checkpoint, {f"hosp-{m}": sign(checkpoint, SECRETS[m]) for m in signers}
    )


def test_witnesses_certify() -> None:
    witnessed = roster({"c": []}, quorum=2)  # hosp-c is an ordinary member
    assert verify_certificate(certificate("ab"), {1: witnessed})["epoch"] == 5
    with pytest.raises(CheckpointError, match=r"\['hosp-c'\] are not witnesses"):
        verify_certificate(certificate("ac"), {1: witnessed})
    with pytest.raises(CheckpointError, match="quorum is 2"):
        verify_certificate(certificate("a"), {1: witnessed})
    everyone = roster({}, quorum=2)  # no roles: every member is a witness, as before roles
    assert verify_certificate(certificate("ac"), {1: everyone})["epoch"] == 5


def test_a_version_must_be_the_integer_1() -> None:
    from ledger.checkpoint import check_checkpoint
    from ledger.resolution import check_resolution_body

    checkpoint = make_checkpoint(5, 1, {})
    with pytest.raises(CheckpointError, match="version"):
        check_checkpoint({**checkpoint, "v": True})
    with pytest.raises(Exception, match="v 1"):
        check_resolution_body({"v": True, "chain": "hosp-a", "height": 1, "keep": "ab" * 32})
