"""Consortium membership on a node: the authority's roster and the shared pseudonym secret.

The consortium authority (e.g. the regional health commission) signs rosters; its public key
is the trust anchor every member and auditor is given out of band. A node learns it when it
first joins (``hrx node join --authority``) and from then on installs only rosters of a
higher version that this key signs, whose every BLS proof of possession holds, and that list
this node with exactly its own keys. The pseudonym secret (32 random bytes, hex) turns
patient identifiers into pseudonyms; it is shared by the members and never goes on the ledger.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ledger import keys
from ledger.canonical import parse_json
from ledger.errors import LedgerError
from ledger.roster import REGISTRY, WITNESS, Roster, is_witness, make_roster, open_roster
from ledger.store import ChainStore
from node.base.errors import ConfigError

AUTHORITY_SETTING = "authority"
ENROLLMENT_FILE = "enrollment.json"  # a node's member entry, for the authority (hrx node init)
NEXT_ENROLLMENT_FILE = "enrollment-next.json"  # its next keys' (hrx node rotate-keys)
SECRET_BYTES = 32


def read_roster_file(path: Path) -> tuple[dict[str, Any], str]:
    """``{"roster": {...}, "signature": "..."}`` as ``hrx consortium roster`` writes it."""
    try:
        document = parse_json(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    except LedgerError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if (
        not isinstance(document, dict)
        or set(document) != {"roster", "signature"}
        or not isinstance(document["roster"], dict)
    ):
        raise ConfigError(f'{path} is not a signed roster ({{"roster": ..., "signature": ...}})')
    return document["roster"], document["signature"]


def read_roster_history(path: Path) -> list[dict[str, Any]]:
    """Every roster version a file holds, oldest first: one signed roster (as ``hrx consortium
    roster`` writes it), or a JSON array of them (as a member's ``GET /ledger/rosters`` serves
    every version). Signatures are the authority's own and not checked here."""
    try:
        document = parse_json(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    except LedgerError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    items = document if isinstance(document, list) else [document]
    rosters = []
    for item in items:
        if (
            not isinstance(item, dict)
            or set(item) != {"roster", "signature"}
            or not isinstance(item["roster"], dict)
        ):
            raise ConfigError(
                f'{path} is not a signed roster ({{"roster": ..., "signature": ...}}) nor an '
                "array of them"
            )
        rosters.append(item["roster"])
    if not rosters:
        raise ConfigError(f"{path} holds no roster")
    return sorted(rosters, key=lambda roster: int(roster.get("version", 0)))


REPLACES = "replaces"  # in enrollment-next.json: the keys a rotation takes over from
MEMBER_INFO_FIELDS = ("level", "accreditation")


@dataclass
class NextRoster:
    """A roster body for the authority to sign, and what it should be told about it."""

    roster: dict[str, Any]
    warnings: list[str]


def next_roster(
    history: list[dict[str, Any]],
    enrollments: list[dict[str, Any]],
    info: dict[str, Any],
    *,
    name: str | None,
    quorum: int | None,
    remove: tuple[str, ...] = (),
    witnesses: list[str] | None = None,
    registries: list[str] | None = None,
) -> NextRoster:
    """The next roster version: the newest of ``history`` (empty for a consortium's first
    roster) with, for each member, only what the authority says changes — enrollments add
    members or give them new keys, names and URLs; ``info`` sets levels and accreditation;
    ``remove`` takes members out; ``witnesses`` and ``registries``, when given, are exactly the
    members with that role (:func:`_set_roles`). Everything else (levels, accreditation, URLs,
    keys) stays as it was. A member's keys change only by a rotation (an enrollment made by
    ``hrx node rotate-keys``, which names the keys it replaces) and never back to a key that
    any version of ``history`` listed for it: a stale enrollment file cannot put a retired key
    back. ConfigError naming what is wrong."""
    previous = history[-1] if history else None
    members: dict[str, dict[str, Any]] = {
        m["id"]: dict(m) for m in (previous["members"] if previous else [])
    }
    listed: dict[str, set[str]] = {}  # every key each member has had, in any version
    for roster in history:
        for member in roster["members"]:
            listed.setdefault(member["id"], set()).update((member["ed25519"], member["bls"]))
    for removed in remove:
        if members.pop(removed, None) is None:
            raise ConfigError(f"--remove {removed}: no such member in the previous roster")
    for enrollment in enrollments:
        enrollment = dict(enrollment)
        member_id = enrollment.get("id")
        replaces = enrollment.pop(REPLACES, None)
        if not isinstance(member_id, str):
            raise ConfigError("an enrollment file (made by hrx node init) names its member's id")
        before = members.get(member_id)
        if before is None:
            if replaces is not None:
                raise ConfigError(
                    f"{member_id}'s enrollment is a key rotation, but {member_id} is not a member "
                    "of the previous roster"
                )
            if set(_keys(enrollment)) & listed.get(member_id, set()):
                raise ConfigError(
                    f"{member_id}'s enrollment carries keys an earlier roster version listed for "
                    "it: a retired key is never put back; refused"
                )
            members[member_id] = enrollment
            continue
        if _keys(enrollment) != _keys(before):
            if replaces is None or _keys(replaces) != _keys(before):
                raise ConfigError(
                    f"{member_id}'s enrollment carries other keys than roster version "
                    f"{previous['version'] if previous else 0} lists for it, and is not a "
                    "rotation from those (hrx node rotate-keys writes enrollment-next.json): an "
                    "old enrollment file would put retired keys back; refused"
                )
            retired = listed.get(member_id, set()) - set(_keys(before))
            if set(_keys(enrollment)) & retired:
                raise ConfigError(
                    f"{member_id}'s new keys were listed for it by an earlier roster version: a "
                    "retired key is never put back; refused"
                )
        kept = {k: v for k, v in before.items() if k in (*MEMBER_INFO_FIELDS, "roles")}
        members[member_id] = {**enrollment, **kept}
    unknown = set(info) - set(members)
    if unknown:
        raise ConfigError(f"--members-info names members not in the roster: {sorted(unknown)}")
    for member_id, fields in info.items():
        if not isinstance(fields, dict) or set(fields) - set(MEMBER_INFO_FIELDS):
            raise ConfigError(
                f"--members-info: {member_id} must map to an object with {MEMBER_INFO_FIELDS}"
            )
        members[member_id].update(fields)
    if not members:
        raise ConfigError("a roster lists at least one member")
    _set_roles(members, witnesses, registries)
    consortium = name or (previous["consortium"] if previous else None)
    if not consortium:
        raise ConfigError("give the consortium's name with --consortium")
    quorum = quorum or (int(previous["quorum"]) if previous else None)
    if quorum is None:
        raise ConfigError("give the checkpoint quorum with --quorum")
    witness_count = sum(1 for member in members.values() if is_witness(member))
    if quorum > witness_count:
        raise ConfigError(f"--quorum {quorum} is more than the {witness_count} witnesses")
    roster = make_roster(
        consortium,
        sorted(members.values(), key=lambda m: str(m["id"])),
        quorum=quorum,
        version=int(previous["version"]) + 1 if previous else 1,
    )
    warnings = []
    unlevelled = sorted(m for m, body in members.items() if not body.get("level"))
    if unlevelled:
        warnings.append(
            f"no level for {', '.join(unlevelled)}: no result of theirs is ever recognised, and "
            "they recognise nothing (give their level and accreditation with --members-info)"
        )
    quorum_note = quorum_warning(roster)
    if quorum_note:
        warnings.append(quorum_note)
    return NextRoster(roster, warnings)


def _set_roles(
    members: dict[str, dict[str, Any]],
    witnesses: list[str] | None,
    registries: list[str] | None,
) -> None:
    """Write ``roles`` (docs/spec.md §5): with ``witnesses`` given, exactly those members are
    witnesses; with ``registries`` given, exactly those run the record locator. A member whose
    roles neither changes keeps them (none listed: a witness)."""
    for flag, named in (("--witnesses", witnesses), ("--registry", registries)):
        strangers = sorted(set(named or ()) - set(members))
        if strangers:
            raise ConfigError(f"{flag} names members not in the roster: {strangers}")
    if witnesses is None and registries is None:
        return
    for member_id, member in members.items():
        witness = member_id in witnesses if witnesses is not None else is_witness(member)
        registry = (
            member_id in registries
            if registries is not None
            else REGISTRY in member.get("roles", [])
        )
        member["roles"] = [WITNESS] * witness + [REGISTRY] * registry


def _keys(member: dict[str, Any]) -> tuple[str, str]:
    return (str(member.get("ed25519")), str(member.get("bls")))


def write_secret(path: Path) -> None:
    if path.exists():
        raise ConfigError(f"{path} already exists; a consortium makes its secret once")
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_hex(SECRET_BYTES) + "\n")


def read_secret(path: Path) -> bytes:
    try:
        mode = path.stat().st_mode & 0o077
        text = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    if mode:
        raise ConfigError(f"{path} is readable by others (mode {oct(mode)}); chmod 600 it")
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = b""
    if len(secret) != SECRET_BYTES:
        raise ConfigError(f"{path} is not a consortium secret (64 hex digits)")
    return secret


def install_roster(
    store: ChainStore,
    node_id: str,
    node_key: Any,
    bls_public: bytes,
    roster: dict[str, Any],
    signature: str,
    authority: str | None,
) -> Roster:
    """Check and store a roster for this node; returns it. ``authority`` (base64url or a PEM
    file) is needed on first join, and must then match the anchor already stored."""
    stored_anchor = store.setting(AUTHORITY_SETTING)
    if authority is not None:
        anchor_text = keys.public_key_text(keys.load_public_key(authority))
        if stored_anchor is not None and stored_anchor != anchor_text:
            raise ConfigError(
                "this node already trusts another authority key; a consortium's authority "
                "does not change by a join"
            )
    elif stored_anchor is None:
        raise ConfigError("first join: give the consortium authority's public key (--authority)")
    else:
        anchor_text = stored_anchor
    checked = open_roster(roster, signature, keys.parse_public_key(anchor_text))
    try:
        member = checked.member(node_id)
    except LedgerError:
        raise ConfigError(
            f"roster version {checked.version} does not list this node ({node_id})"
        ) from None
    if member["ed25519"] != keys.public_key_text(node_key):
        raise ConfigError(
            f"roster version {checked.version} lists {node_id} with another Ed25519 key than "
            "this node's keys/node.pem"
        )
    if member["bls"] != bls_public.hex():
        raise ConfigError(
            f"roster version {checked.version} lists {node_id} with another BLS key than this "
            "node's keys/node.bls"
        )
    store.add_roster(roster, signature)
    if stored_anchor is None:
        store.set_setting(AUTHORITY_SETTING, anchor_text)
    return checked


def quorum_warning(roster: dict[str, Any]) -> str | None:
    """A warning when two quorums need not share an honest witness: with n witnesses of whom
    f = (n-1)//3 may lie, quorums must exceed (n+f)/2 (2f+1 when n = 3f+1)."""
    witnesses = sum(1 for member in roster["members"] if is_witness(member))
    faulty = (witnesses - 1) // 3
    needed = (witnesses + faulty) // 2 + 1
    if roster["quorum"] < needed:
        return (
            f"quorum {roster['quorum']} of {witnesses} witnesses is below {needed}: with up to "
            f"{faulty} dishonest witness(es) two conflicting views could both be certified"
        )
    return None


def next_key_paths(config: Any) -> tuple[Path, Path]:
    """Where ``hrx node rotate-keys`` keeps a node's next Ed25519 and BLS keys until a roster
    lists them: beside the current ones, ``<name>-next<suffix>``."""
    return (
        config.ed25519_key.with_name(config.ed25519_key.stem + "-next" + config.ed25519_key.suffix),
        config.bls_key.with_name(config.bls_key.stem + "-next" + config.bls_key.suffix),
    )


def listed_next_keys(config: Any, roster: dict[str, Any]) -> tuple[Any, bytes] | None:
    """This node's next keys (made by ``hrx node rotate-keys``) when ``roster`` lists them:
    the Ed25519 private key and the BLS public key; None when there are none or the roster
    lists the current ones."""
    from ledger import bls

    next_ed25519, next_bls = next_key_paths(config)
    if not next_ed25519.exists() or not next_bls.exists():
        return None
    member = next((m for m in roster.get("members", []) if m.get("id") == config.node_id), None)
    if member is None:
        return None
    signing_key = keys.load_private_key(next_ed25519)
    bls_public = bls.public_key(bls.read_secret_key(next_bls))
    listed = (member.get("ed25519") == keys.public_key_text(signing_key), member.get("bls"))
    if listed == (True, bls_public.hex()):
        return signing_key, bls_public
    if listed[0] or listed[1] == bls_public.hex():
        raise ConfigError(
            "the roster lists only one of this node's next keys; the authority must list both "
            "(enrollment-next.json)"
        )
    return None


def put_next_keys_in_place(config: Any, version: int) -> str:
    """Once a roster listing them is installed: the next keys replace the current ones, which
    are kept as ``<name>-retired-v<version>``; a note saying so."""
    next_ed25519, next_bls = next_key_paths(config)
    for current, upcoming in ((config.ed25519_key, next_ed25519), (config.bls_key, next_bls)):
        retired = current.with_name(f"{current.stem}-retired-v{version}{current.suffix}")
        os.replace(current, retired)
        os.replace(upcoming, current)
    return (
        f"keys rotated: roster version {version} lists this node's next keys, now in "
        f"{config.ed25519_key.name} and {config.bls_key.name} (the old ones kept as "
        f"*-retired-v{version}); restart the node's processes so they sign with them"
    )
