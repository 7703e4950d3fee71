"""The consortium roster: who is a member, with which keys, signed by the consortium authority.

docs/spec.md §5: ``{"v": 1, "consortium", "version", "quorum", "members": [{"id", "name", "url",
"level", "ed25519", "bls", "bls_pop", "accreditation"}]}``, signed with Ed25519 over
``b"hrx/roster/v1\\x00" || SHA-256(JCS(roster))`` by the authority key, the trust anchor that
auditors are given. A node refuses blocks, requests and checkpoint signatures from keys the
roster does not list.

hrx requires ``id``, ``name``, ``url``, ``ed25519``, ``bls`` and ``bls_pop`` of every member;
``level`` (a string) and ``accreditation`` (a list of ``{"category", "scope", "until"}``) may
be absent. Member ids are unique chain ids; ``1 <= quorum <= len(members)``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ledger import keys
from ledger.canonical import canonical_bytes
from ledger.errors import EntryError, LedgerError, RosterError, SignatureError
from ledger.model import VERSION, check_chain_id

ROSTER_KEYS = frozenset({"v", "consortium", "version", "quorum", "members"})
MEMBER_REQUIRED = frozenset({"id", "name", "url", "ed25519", "bls", "bls_pop"})
MEMBER_OPTIONAL = frozenset({"level", "accreditation", "roles"})
WITNESS, REGISTRY = "witness", "registry"
ROLES = (WITNESS, REGISTRY)  # what a member does beyond keeping its own chain
ACCREDITATION_KEYS = frozenset({"category", "scope", "until"})


def roster_digest(roster: dict[str, Any]) -> bytes:
    return hashlib.sha256(canonical_bytes(roster)).digest()


def check_roster(roster: Any) -> dict[str, Any]:
    """Raise :class:`RosterError` unless ``roster`` is well formed (signature not checked)."""
    if not isinstance(roster, dict) or roster.keys() != ROSTER_KEYS:
        raise RosterError(f"roster fields must be {sorted(ROSTER_KEYS)}")
    if roster["v"] != VERSION or type(roster["v"]) is not int:
        raise RosterError(f"roster format version {roster['v']!r} is not {VERSION}")
    if not isinstance(roster["consortium"], str) or not roster["consortium"]:
        raise RosterError("roster consortium must be a non-empty string")
    if type(roster["version"]) is not int or roster["version"] < 1:
        raise RosterError("roster version must be an integer from 1")
    members = roster["members"]
    if not isinstance(members, list) or not members:
        raise RosterError("roster members must be a non-empty list")
    seen: set[str] = set()
    for member in members:
        _check_member(member)
        if member["id"] in seen:
            raise RosterError(f"member {member['id']} is listed twice")
        seen.add(member["id"])
    quorum = roster["quorum"]
    witnesses = [m["id"] for m in members if is_witness(m)]
    if type(quorum) is not int or not 1 <= quorum <= len(witnesses):
        raise RosterError(
            f"quorum {quorum!r} must be from 1 to the {len(witnesses)} witnesses "
            f"(members with the {WITNESS} role, or with no roles listed)"
        )
    return roster


def is_witness(member: dict[str, Any]) -> bool:
    """A member without ``roles`` is a witness (rosters from before roles keep their meaning);
    ``"roles": []`` is an ordinary member."""
    return WITNESS in member.get("roles", [WITNESS])


def _check_member(member: Any) -> None:
    if not isinstance(member, dict):
        raise RosterError("a roster member must be a JSON object")
    missing = MEMBER_REQUIRED - member.keys()
    unknown = member.keys() - MEMBER_REQUIRED - MEMBER_OPTIONAL
    if missing or unknown:
        raise RosterError(
            f"roster member {member.get('id')!r}: "
            f"missing {sorted(missing)}, unknown {sorted(unknown)}"
        )
    try:
        check_chain_id(member["id"])
        keys.parse_public_key(member["ed25519"])
    except (EntryError, SignatureError, ValueError) as exc:
        raise RosterError(f"roster member {member['id']!r}: {exc}") from exc
    for field in ("name", "url"):
        if not isinstance(member[field], str):
            raise RosterError(f"roster member {member['id']}: {field} must be a string")
    for field, size in (("bls", 48), ("bls_pop", 96)):
        value = member[field]
        if not isinstance(value, str) or len(value) != 2 * size or value != value.lower():
            raise RosterError(
                f"roster member {member['id']}: {field} must be {size} bytes of lowercase hex"
            )
        try:
            bytes.fromhex(value)
        except ValueError:
            raise RosterError(f"roster member {member['id']}: {field} is not hex") from None
    if "level" in member and not isinstance(member["level"], str):
        raise RosterError(f"roster member {member['id']}: level must be a string")
    roles = member.get("roles", [])
    if (
        not isinstance(roles, list)
        or not all(isinstance(r, str) and r in ROLES for r in roles)
        or len(set(roles)) != len(roles)
    ):
        raise RosterError(
            f"roster member {member['id']}: roles is a list of distinct roles from {list(ROLES)}"
        )
    accreditation = member.get("accreditation", [])
    if not isinstance(accreditation, list):
        raise RosterError(f"roster member {member['id']}: accreditation must be a list")
    for item in accreditation:
        if not isinstance(item, dict) or item.keys() != ACCREDITATION_KEYS:
            raise RosterError(
                f"roster member {member['id']}: "
                f"accreditation items are {sorted(ACCREDITATION_KEYS)}"
            )


def make_roster(
    consortium: str, members: list[dict[str, Any]], *, quorum: int, version: int = 1
) -> dict[str, Any]:
    """A roster body (checked; sign it with :func:`sign_roster`)."""
    return check_roster(
        {
            "v": VERSION,
            "consortium": consortium,
            "version": version,
            "quorum": quorum,
            "members": members,
        }
    )


def sign_roster(roster: dict[str, Any], authority: Ed25519PrivateKey) -> str:
    check_roster(roster)
    return keys.sign(authority, keys.ROSTER_DOMAIN, roster_digest(roster))


@dataclass(frozen=True)
class Roster:
    """A roster whose authority signature has been checked (or, unanchored, not)."""

    body: dict[str, Any]
    signature: str
    anchored: bool

    @property
    def version(self) -> int:
        return int(self.body["version"])

    @property
    def quorum(self) -> int:
        return int(self.body["quorum"])

    def member(self, member_id: str) -> dict[str, Any]:
        for member in self.body["members"]:
            if member["id"] == member_id:
                return dict(member)
        raise RosterError(f"{member_id!r} is not a member in roster version {self.version}")

    def ed25519_key(self, member_id: str) -> Ed25519PublicKey:
        return keys.parse_public_key(self.member(member_id)["ed25519"])

    def member_ids(self) -> list[str]:
        return [member["id"] for member in self.body["members"]]

    def witnesses(self) -> list[str]:
        """The members that replicate and verify every chain and co-sign checkpoints."""
        return [member["id"] for member in self.body["members"] if is_witness(member)]

    def registries(self) -> list[str]:
        """The members that run the record locator."""
        return [m["id"] for m in self.body["members"] if REGISTRY in m.get("roles", [])]

    def to_json(self) -> dict[str, Any]:
        return {"roster": self.body, "signature": self.signature}


def open_roster(
    roster: Any,
    signature: Any,
    authority: Ed25519PublicKey | None,
    *,
    check_possession: bool = True,
) -> Roster:
    """Check a roster's form, its authority signature and its members' BLS proofs of possession.

    With ``authority`` None the signature cannot be checked: the result is marked unanchored,
    and whoever reports on it must say so.
    """
    check_roster(roster)
    if not isinstance(signature, str):
        raise RosterError("roster signature must be a string")
    if authority is not None:
        try:
            keys.verify(authority, keys.ROSTER_DOMAIN, roster_digest(roster), signature)
        except SignatureError as exc:
            raise RosterError(
                f"roster version {roster['version']}: authority signature: {exc}"
            ) from exc
    else:
        keys.b64url_decode(signature, length=64, what="roster signature")
    if check_possession:
        from ledger import bls

        for member in roster["members"]:
            try:
                proven = bls.verify_possession(
                    bytes.fromhex(member["bls"]), bytes.fromhex(member["bls_pop"])
                )
            except LedgerError:
                proven = False
            if not proven:
                raise RosterError(
                    f"roster member {member['id']}: BLS proof of possession does not verify"
                )
    return Roster(body=roster, signature=signature, anchored=authority is not None)


def make_member(
    member_id: str,
    name: str,
    url: str,
    ed25519: Ed25519PrivateKey | Ed25519PublicKey,
    bls_secret_key: bytes,
    *,
    level: str | None = None,
    accreditation: list[dict[str, str]] | None = None,
    roles: list[str] | None = None,
) -> dict[str, Any]:
    """A roster member entry from a member's keys (the BLS proof of possession is made here)."""
    from ledger import bls

    member: dict[str, Any] = {
        "id": check_chain_id(member_id),
        "name": name,
        "url": url,
        "ed25519": keys.public_key_text(ed25519),
        "bls": bls.public_key(bls_secret_key).hex(),
        "bls_pop": bls.prove_possession(bls_secret_key).hex(),
    }
    if level is not None:
        member["level"] = level
    if accreditation is not None:
        member["accreditation"] = accreditation
    if roles is not None:
        member["roles"] = roles
    return member
