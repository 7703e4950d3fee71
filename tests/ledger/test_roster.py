"""Rosters: form, authority signature, proofs of possession."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from ledger import bls, keys
from ledger.errors import RosterError
from ledger.roster import make_member, make_roster, open_roster, sign_roster

BLS_A = bls.generate_secret_key(b"a" * 32)
BLS_B = bls.generate_secret_key(b"b" * 32)


@pytest.fixture
def signed(tmp_path: Path) -> tuple[dict[str, Any], str, Any]:
    authority = keys.load_or_create_private_key(tmp_path / "authority.pem")
    key_a = keys.load_or_create_private_key(tmp_path / "a.pem")
    key_b = keys.load_or_create_private_key(tmp_path / "b.pem")
    accreditation = [{"category": "laboratory", "scope": "省HR", "until": "2027-12-31"}]
    members = [
        make_member(
            "hosp-a",
            "甲医院",
            "https://a.example",
            key_a,
            BLS_A,
            level="三级甲等",
            accreditation=accreditation,
        ),
        make_member("hosp-b", "乙医院", "https://b.example", key_b, BLS_B),
    ]
    roster = make_roster("杭州医联体", members, quorum=2)
    return roster, sign_roster(roster, authority), authority.public_key()


def test_signed_roster_opens(signed: tuple[dict[str, Any], str, Any]) -> None:
    roster, signature, authority = signed
    opened = open_roster(roster, signature, authority)
    assert opened.anchored and opened.member_ids() == ["hosp-a", "hosp-b"]
    assert opened.member("hosp-a")["level"] == "三级甲等"
    with pytest.raises(RosterError, match="not a member"):
        opened.member("hosp-c")


def test_changed_roster_fails_its_signature(signed: tuple[dict[str, Any], str, Any]) -> None:
    roster, signature, authority = signed
    changed = copy.deepcopy(roster)
    changed["quorum"] = 1
    with pytest.raises(RosterError, match="authority signature"):
        open_roster(changed, signature, authority)


def test_swapped_proof_of_possession_is_refused(
    signed: tuple[dict[str, Any], str, Any], tmp_path: Path
) -> None:
    roster, _, authority = signed
    changed = copy.deepcopy(roster)
    changed["members"][0]["bls_pop"] = roster["members"][1]["bls_pop"]
    resigned = sign_roster(changed, keys.load_private_key(tmp_path / "authority.pem"))
    with pytest.raises(RosterError, match="proof of possession"):
        open_roster(changed, resigned, authority)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda r: r.update(quorum=3), "quorum"),
        (lambda r: r.update(quorum=0), "quorum"),
        (lambda r: r["members"].append(copy.deepcopy(r["members"][0])), "listed twice"),
        (lambda r: r["members"][0].pop("ed25519"), "missing"),
        (lambda r: r["members"][0].update(phone="123"), "unknown"),
        (lambda r: r["members"][0].update(bls="AB" * 48), "lowercase hex"),
        (lambda r: r.update(version=0), "version"),
        (lambda r: r.update(members=[]), "non-empty"),
        (lambda r: r["members"][0].update(roles="witness"), "roles is a list"),
        (lambda r: r["members"][0].update(roles=["reader"]), "roles is a list"),
        (lambda r: r["members"][0].update(roles=["witness", "witness"]), "distinct roles"),
        # a quorum of 2 needs 2 witnesses: an ordinary member does not count
        (lambda r: r["members"][1].update(roles=["registry"]), "2 must be from 1 to the 1 witn"),
    ],
)
def test_malformed_rosters_refused(
    signed: tuple[dict[str, Any], str, Any], change: Any, problem: str
) -> None:
    roster, signature, _ = signed
    changed = copy.deepcopy(roster)
    change(changed)
    with pytest.raises(RosterError, match=problem):
        open_roster(changed, signature, None)


def test_members_without_roles_are_witnesses(signed: tuple[dict[str, Any], str, Any]) -> None:
    roster, signature, _ = signed
    changed = copy.deepcopy(roster)
    changed["quorum"] = 1
    changed["members"][1]["roles"] = ["registry"]
    opened = open_roster(changed, signature, None, check_possession=False)
    assert opened.witnesses() == ["hosp-a"] and opened.registries() == ["hosp-b"]
    changed["members"][0]["roles"] = ["witness", "registry"]
    changed["members"][1]["roles"] = []  # an ordinary member
    opened = open_roster(changed, signature, None, check_possession=False)
    assert opened.witnesses() == ["hosp-a"] and opened.registries() == ["hosp-a"]
    assert open_roster(roster, signature, None, check_possession=False).witnesses() == [
        "hosp-a",
        "hosp-b",
    ]
