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
from pathlib import Path
from typing import Any

from ledger import keys
from ledger.canonical import parse_json
from ledger.errors import LedgerError
from ledger.roster import Roster, open_roster
from ledger.store import ChainStore
from node.errors import ConfigError

AUTHORITY_SETTING = "authority"
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
    """A warning when two quorums need not share an honest member: with n members of whom
    f = (n-1)//3 may lie, quorums must exceed (n+f)/2 (2f+1 when n = 3f+1; DESIGN §3)."""
    members = len(roster["members"])
    faulty = (members - 1) // 3
    needed = (members + faulty) // 2 + 1
    if roster["quorum"] < needed:
        return (
            f"quorum {roster['quorum']} of {members} members is below {needed}: with up to "
            f"{faulty} dishonest member(s) two conflicting views could both be certified"
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
