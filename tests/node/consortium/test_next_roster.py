"""The authority's next roster (node.consortium.membership.next_roster): it starts from the
previous one and changes only what the authority says; keys change only by a rotation, never
back."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledger import bls
from ledger.roster import make_member
from node.base.errors import ConfigError
from node.consortium.membership import next_roster

INFO = {
    "hosp-a": {
        "level": "三级甲等",
        "accreditation": [{"category": "laboratory", "scope": "省HR", "until": "2030-12-31"}],
    },
    "hosp-b": {"level": "一级", "accreditation": []},
}


def enrollment(member_id: str, seed: int, url: str = "") -> dict[str, Any]:
    return make_member(
        member_id,
        f"医院 {member_id}",
        url or f"https://{member_id}.example",
        Ed25519PrivateKey.generate(),
        bls.generate_secret_key(bytes([seed]) * 32),
    )


@pytest.fixture(scope="module")
def first() -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    members = {m: enrollment(m, n + 1) for n, m in enumerate(("hosp-a", "hosp-b", "hosp-c"))}
    made = next_roster([], list(members.values()), INFO, name="杭州医联体", quorum=2)
    return made.roster, members


def test_a_first_roster_lists_the_enrollments_and_warns_of_missing_levels(
    first: tuple[dict[str, Any], dict[str, dict[str, Any]]],
) -> None:
    roster, members = first
    assert roster["version"] == 1 and [m["id"] for m in roster["members"]] == list(members)
    assert roster["members"][0]["level"] == "三级甲等"
    made = next_roster([], list(members.values()), {}, name="x", quorum=2)
    (warning,) = made.warnings
    assert "no level for hosp-a, hosp-b, hosp-c" in warning and "--members-info" in warning
    with pytest.raises(ConfigError, match="--quorum"):
        next_roster([], list(members.values()), {}, name="x", quorum=None)
    with pytest.raises(ConfigError, match="--consortium"):
        next_roster([], list(members.values()), {}, name=None, quorum=1)


def test_the_next_roster_changes_only_what_is_said(
    first: tuple[dict[str, Any], dict[str, dict[str, Any]]],
) -> None:
    roster, members = first
    moved = {**members["hosp-b"], "url": "https://new.hosp-b.example"}
    newcomer = enrollment("hosp-d", 9)
    made = next_roster(
        [roster],
        [moved, newcomer],
        {"hosp-d": {"level": "二级甲等"}},
        name=None,
        quorum=None,
        remove=("hosp-c",),
    )
    after = {m["id"]: m for m in made.roster["members"]}
    assert made.roster["version"] == 2 and made.roster["quorum"] == 2
    assert made.roster["consortium"] == "杭州医联体" and set(after) == {
        "hosp-a",
        "hosp-b",
        "hosp-d",
    }
    assert after["hosp-a"] == next(m for m in roster["members"] if m["id"] == "hosp-a")
    assert after["hosp-b"]["url"] == "https://new.hosp-b.example"
    assert after["hosp-b"]["level"] == "一级"  # kept, though its enrollment has none
    assert after["hosp-d"]["level"] == "二级甲等"
    with pytest.raises(ConfigError, match="--remove hosp-x"):
        next_roster([roster], [], {}, name=None, quorum=None, remove=("hosp-x",))
    with pytest.raises(ConfigError, match="not in the roster"):
        next_roster([roster], [], {"hosp-x": {"level": "一级"}}, name=None, quorum=None)


def test_keys_change_by_a_rotation_only_and_never_back(
    first: tuple[dict[str, Any], dict[str, dict[str, Any]]],
) -> None:
    roster, members = first
    old = members["hosp-a"]
    rotated = enrollment("hosp-a", 42)
    with pytest.raises(ConfigError, match="not a rotation"):
        next_roster([roster], [rotated], {}, name=None, quorum=None)
    rotation = {**rotated, "replaces": {"ed25519": old["ed25519"], "bls": old["bls"]}}
    second = next_roster([roster], [rotation], {}, name=None, quorum=None).roster
    listed = next(m for m in second["members"] if m["id"] == "hosp-a")
    assert (listed["ed25519"], listed["level"]) == (rotated["ed25519"], "三级甲等")
    assert "replaces" not in listed
    # a stale enrollment (the keys before the rotation) is no rotation from the listed ones
    with pytest.raises(ConfigError, match="would put retired keys back"):
        next_roster([roster, second], [old], {}, name=None, quorum=None)
    # a rotation back to them is refused when the history shows them
    back = {**old, "replaces": {"ed25519": rotated["ed25519"], "bls": rotated["bls"]}}
    with pytest.raises(ConfigError, match="a retired key is never put back"):
        next_roster([roster, second], [back], {}, name=None, quorum=None)
    # a member taken out comes back only with keys it never had
    third = next_roster([roster, second], [], {}, name=None, quorum=None, remove=("hosp-c",))
    with pytest.raises(ConfigError, match="an earlier roster version listed"):
        next_roster([roster, second, third.roster], [members["hosp-c"]], {}, name=None, quorum=None)
    again = next_roster(
        [roster, second, third.roster], [enrollment("hosp-c", 77)], {}, name=None, quorum=None
    )
    assert "hosp-c" in {m["id"] for m in again.roster["members"]}


def test_witnesses_and_registry_write_roles_and_later_versions_keep_them(
    first: tuple[dict[str, Any], dict[str, dict[str, Any]]],
) -> None:
    roster, _ = first
    made = next_roster(
        [roster],
        [],
        {},
        name=None,
        quorum=2,
        witnesses=["hosp-a", "hosp-b"],
        registries=["hosp-c"],
    )
    roles = {m["id"]: m["roles"] for m in made.roster["members"]}
    assert roles == {"hosp-a": ["witness"], "hosp-b": ["witness"], "hosp-c": ["registry"]}
    # the next version, given neither flag, keeps them; --registry alone keeps the witnesses
    again = next_roster([roster, made.roster], [], {}, name=None, quorum=None)
    assert {m["id"]: m["roles"] for m in again.roster["members"]} == roles
    moved = next_roster(
        [roster, made.roster], [], {}, name=None, quorum=None, registries=["hosp-a"]
    )
    assert {m["id"]: m["roles"] for m in moved.roster["members"]} == {
        "hosp-a": ["witness", "registry"],
        "hosp-b": ["witness"],
        "hosp-c": [],
    }
    # a registry named in a roster without roles stays a witness too
    first_registry = next_roster([roster], [], {}, name=None, quorum=2, registries=["hosp-b"])
    assert [m.get("roles") for m in first_registry.roster["members"]] == [
        ["witness"],
        ["witness", "registry"],
        ["witness"],
    ]


def test_fewer_witnesses_than_the_quorum_or_strangers_are_refused(
    first: tuple[dict[str, Any], dict[str, dict[str, Any]]],
) -> None:
    roster, _ = first
    with pytest.raises(ConfigError, match="quorum 2 is more than the 1 witnesses"):
        next_roster([roster], [], {}, name=None, quorum=2, witnesses=["hosp-a"])
    with pytest.raises(ConfigError, match=r"--registry names members not in the roster"):
        next_roster([roster], [], {}, name=None, quorum=1, registries=["hosp-x"])
