"""``hrx consortium``: what the consortium authority does on its offline workstation: make the
pseudonym secret once, sign each roster version, and sign the resolution of a fork."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ledger import keys
from ledger.canonical import canonical_bytes, parse_json
from ledger.resolution import make_resolution, sign_resolution
from ledger.roster import open_roster, sign_roster
from node.cli.console import err, fail, out, reported
from node.consortium.membership import next_roster, read_roster_history, write_secret


@click.group("consortium")
def consortium_group() -> None:
    """What the consortium authority does: sign rosters, make the pseudonym secret."""


@consortium_group.command("roster")
@click.option(
    "--authority-key",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="The authority's Ed25519 key (PEM); created when absent.",
)
@click.option(
    "--quorum",
    default=None,
    type=click.IntRange(1),
    help="Signers a checkpoint needs (default: that of --previous; else required).",
)
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--consortium",
    "name",
    default=None,
    help="The consortium's name (default: that of --previous, else required).",
)
@click.option(
    "--previous",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="The roster this one replaces (or every version so far, as a member's /ledger/rosters "
    "serves them): the new one starts from it and gets the next version.",
)
@click.option(
    "--members-info",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help='JSON {"member id": {"level": ..., "accreditation": [...]}}: what changes.',
)
@click.option("--remove", multiple=True, help="A member to take out of the roster (repeatable).")
@click.option(
    "--witnesses",
    default=None,
    help="Comma-separated ids of the members that replicate every chain and co-sign "
    "checkpoints; every other member becomes an ordinary one (default: as --previous; in a "
    "first roster, every member).",
)
@click.option(
    "--registry",
    default=None,
    help="Comma-separated ids of the members that run the record locator (default: as "
    "--previous; in a first roster, none).",
)
@click.argument(
    "enrollments",
    nargs=-1,
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
)
def consortium_roster(
    authority_key: Path,
    quorum: int | None,
    out_path: Path,
    name: str | None,
    previous: Path | None,
    members_info: Path | None,
    remove: tuple[str, ...],
    witnesses: str | None,
    registry: str | None,
    enrollments: tuple[Path, ...],
) -> None:
    """Sign the next roster: the previous one with what changes — the members whose
    enrollment files are given (new members, new keys from hrx node rotate-keys, new names
    or URLs), levels and accreditation from --members-info, members taken out with --remove.
    A consortium's first roster lists exactly the enrollments given. --witnesses and
    --registry set the members' roles; a roster with fewer witnesses than its quorum is
    refused."""
    with reported():
        history = read_roster_history(previous) if previous is not None else []
        if not history and not enrollments:
            fail("a consortium's first roster needs the members' enrollment files")
        info: dict[str, Any] = {}
        if members_info is not None:
            info = parse_json(members_info.read_bytes())
            if not isinstance(info, dict):
                fail(f"{members_info} must hold a JSON object keyed by member id")
        read = []
        for path in enrollments:
            member = parse_json(path.read_bytes())
            if not isinstance(member, dict) or "id" not in member:
                fail(f"{path} is not an enrollment file (made by hrx node init)")
            read.append(member)
        made = next_roster(
            history,
            read,
            info,
            name=name,
            quorum=quorum,
            remove=remove,
            witnesses=_ids(witnesses),
            registries=_ids(registry),
        )
        roster = made.roster
        authority = keys.load_or_create_private_key(authority_key)
        signature = sign_roster(roster, authority)
        open_roster(roster, signature, authority.public_key())  # every proof of possession
        out_path.write_bytes(canonical_bytes({"roster": roster, "signature": signature}) + b"\n")
    out.print(
        f"roster version {roster['version']} of {roster['consortium']}: "
        f"{len(roster['members'])} members, quorum {roster['quorum']}"
    )
    out.print(f"authority public key: {keys.public_key_text(authority)}")
    for warning in made.warnings:
        err.print(f"[bold yellow]warning:[/] {warning}")


def _ids(listed: str | None) -> list[str] | None:
    return None if listed is None else [i.strip() for i in listed.split(",") if i.strip()]


@consortium_group.command("resolve-fork")
@click.option(
    "--authority-key",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="The authority's Ed25519 key (PEM).",
)
@click.option("--chain", required=True, help="The member whose chain forked.")
@click.option("--height", required=True, type=click.IntRange(0), help="The height of the fork.")
@click.option(
    "--keep", required=True, help="The hash of the block kept at that height (hex, 64 digits)."
)
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path, dir_okay=False))
def consortium_resolve_fork(
    authority_key: Path, chain: str, height: int, keep: str, out_path: Path
) -> None:
    """Sign the resolution of a fork: which block is the chain's at the height it forked
    (members install it with hrx node resolve-fork; docs/operations.md)."""
    with reported():
        document = sign_resolution(
            make_resolution(chain, height, keep.lower()), keys.load_private_key(authority_key)
        )
        out_path.write_bytes(canonical_bytes(document) + b"\n")
    out.print(f"resolution of {chain}'s fork at height {height}: block {keep.lower()} is kept")
    out.print(f"give {out_path} to every member: hrx node resolve-fork --dir DIR {out_path}")


@consortium_group.command("secret")
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path, dir_okay=False))
def consortium_secret(out_path: Path) -> None:
    """Make the consortium's pseudonym secret (once; give it to every member)."""
    with reported():
        write_secret(out_path)
    out.print(f"wrote {out_path} (mode 0600): give it to each member over a secure channel")
