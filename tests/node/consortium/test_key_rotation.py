"""Rotating a member's keys on a running consortium (docs/operations.md): ``hrx node
rotate-keys``, the authority's next roster version, ``hrx node join`` putting the keys in
place; the member's later blocks, signed with the new key, replicate to the other member, and
the auditor verifies the chain across the rotation."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from ledger import keys
from ledger.errors import SignatureError
from ledger.model import block_hash
from ledger.store import ChainStore
from node.demo.harness import Consortium
from tests.helpers.nodes import append_requests, invoke

LEVELS: dict[str, dict[str, object]] = {
    "hosp-a": {
        "level": "三级甲等",
        "accreditation": [{"category": "imaging", "scope": "省HR", "until": "2030-12-31"}],
    },
    "hosp-b": {"level": "二级甲等", "accreditation": []},
}


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Consortium]:
    consortium = Consortium(
        tmp_path_factory.mktemp("rotation"), 2, quorum=2, epoch_seconds=2, members_info=LEVELS
    )
    try:
        consortium.start_all()
        yield consortium
    finally:
        consortium.close()


def test_a_member_rotates_its_keys(group: Consortium) -> None:
    a, b = group.members["hosp-a"], group.members["hosp-b"]
    append_requests(a.directory, "before-rotation")
    group.wait_converged(20)
    old_key = keys.public_key_text(keys.load_private_key(a.directory / "keys" / "node.pem"))

    made = invoke("node", "rotate-keys", "--dir", str(a.directory))
    assert made.exit_code == 0, made.output
    assert (a.directory / "keys" / "node-next.pem").stat().st_mode & 0o077 == 0
    first = (a.directory / "keys" / "node-next.pem").read_bytes()
    again = invoke("node", "rotate-keys", "--dir", str(a.directory))  # the same next keys
    assert again.exit_code == 0
    assert (a.directory / "keys" / "node-next.pem").read_bytes() == first
    root = group.root
    stale = (a.directory / "enrollment.json").read_bytes()  # the old keys' enrollment
    roster_v2 = root / "roster-v2.json"
    signed = invoke(
        "consortium", "roster", "--authority-key", str(group.authority_key),
        "--previous", str(root / "roster.json"), "--quorum", "2", "--out", str(roster_v2),
        str(a.directory / "enrollment-next.json"),
    )  # fmt: skip
    assert signed.exit_code == 0, signed.output
    assert "roster version 2" in signed.output
    # the next version starts from the previous one: levels and accreditation kept
    version_2 = json.loads(roster_v2.read_text())["roster"]
    for member in version_2["members"]:
        expected = LEVELS[member["id"]]
        assert (member["level"], member["accreditation"]) == (
            expected["level"],
            expected["accreditation"],
        )

    group.stop("hosp-a")
    joined = invoke("node", "join", "--dir", str(a.directory), "--roster", str(roster_v2))
    assert joined.exit_code == 0, joined.output
    assert "keys rotated" in joined.output
    new_key = keys.public_key_text(keys.load_private_key(a.directory / "keys" / "node.pem"))
    assert new_key != old_key
    assert (a.directory / "keys" / "node-retired-v2.pem").exists()
    assert not (a.directory / "keys" / "node-next.pem").exists()
    # the same roster again is refused, and the keys stay as they are
    rejoined = invoke("node", "join", "--dir", str(a.directory), "--roster", str(roster_v2))
    assert rejoined.exit_code == 1 and "not newer" in rejoined.output, rejoined.output
    assert keys.public_key_text(keys.load_private_key(a.directory / "keys" / "node.pem")) == (
        new_key
    )
    assert (
        invoke("node", "join", "--dir", str(b.directory), "--roster", str(roster_v2)).exit_code == 0
    )
    # join leaves one enrollment file, with the keys the roster lists now
    assert not (a.directory / "enrollment-next.json").exists()
    current = json.loads((a.directory / "enrollment.json").read_text())
    assert current["ed25519"] == new_key
    # an old enrollment file cannot put the retired key back, whatever else it says
    old_file = root / "hosp-a-old-enrollment.json"
    old_file.write_bytes(stale)
    every = root / "all-rosters.json"  # every version, as a member's /ledger/rosters serves them
    every.write_text(
        json.dumps([json.loads(f.read_text()) for f in (group.root / "roster.json", roster_v2)])
    )
    for previous in (roster_v2, every):
        refused = invoke(
            "consortium", "roster", "--authority-key", str(group.authority_key),
            "--previous", str(previous), "--out", str(root / "roster-v3.json"), str(old_file),
        )  # fmt: skip
        assert refused.exit_code == 1, refused.output
        assert "would put retired keys back" in refused.output, refused.output
        assert not (root / "roster-v3.json").exists()
    # nor can a rotation back to them
    back = {**json.loads(stale), "replaces": {"ed25519": new_key, "bls": current["bls"]}}
    old_file.write_text(json.dumps(back))
    refused = invoke(
        "consortium", "roster", "--authority-key", str(group.authority_key),
        "--previous", str(every), "--out", str(root / "v3.json"),
        str(old_file),
    )  # fmt: skip
    assert refused.exit_code == 1 and "a retired key is never put back" in refused.output
    group.start("hosp-a")

    append_requests(a.directory, "after-rotation")
    group.wait_converged(30)  # hosp-b took the block signed with the new key
    store = ChainStore(group.database_url("hosp-b"))
    try:
        head = store.heads()["hosp-a"]
        assert head.header["roster"] == 2
        # signed with the new key, not the old one
        keys.verify(new_key, keys.BLOCK_DOMAIN, block_hash(head.header), head.signature)
        with pytest.raises(SignatureError):
            keys.verify(old_key, keys.BLOCK_DOMAIN, block_hash(head.header), head.signature)
    finally:
        store.close()
    verdict = invoke(
        "audit", "verify", group.database_url("hosp-b"), "--authority", str(group.authority_key)
    )
    assert verdict.exit_code == 0, verdict.output
    assert "VALID" in verdict.output and "roster version(s) 1, 2" in verdict.output


def test_a_roster_listing_half_of_the_next_keys_is_refused(tmp_path: Path) -> None:
    from node.base.errors import ConfigError
    from node.consortium.membership import listed_next_keys

    class Config:
        node_id = "hosp-x"
        ed25519_key = tmp_path / "node.pem"
        bls_key = tmp_path / "node.bls"

    from ledger import bls

    keys.load_or_create_private_key(tmp_path / "node-next.pem")
    bls.load_or_create_secret_key(tmp_path / "node-next.bls")
    next_ed25519 = keys.public_key_text(keys.load_private_key(tmp_path / "node-next.pem"))
    roster = {"version": 3, "members": [{"id": "hosp-x", "ed25519": next_ed25519, "bls": "00"}]}
    with pytest.raises(ConfigError, match="only one of this node's next keys"):
        listed_next_keys(Config(), roster)
    assert listed_next_keys(Config(), {"version": 3, "members": []}) is None
