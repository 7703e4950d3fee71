"""``hrx node rotate-keys``: make a node's next signing keys (Ed25519 for its chain, BLS for
checkpoints) and the enrollment file that asks the consortium authority to list them.

Rotation takes three steps, none of which stops the node for long:

1. ``hrx node rotate-keys --dir DIR`` writes ``keys/node-next.pem``, ``keys/node-next.bls``
   (mode 0600; the same ones again if run twice) and ``enrollment-next.json`` (the member
   entry with the next keys, and the keys they replace: the authority's roster command takes
   new keys for a member only from such a rotation).
2. The authority signs the next roster version listing them: ``hrx consortium roster
   --previous roster.json ... enrollment-next.json`` (the other members' entries as before).
3. The node installs it: ``hrx node join --dir DIR --roster NEW`` puts the next keys in place
   (the old ones are kept as ``*-retired-v<version>``) and leaves one ``enrollment.json``, with
   the keys now listed; then its processes are restarted.

Blocks the node signed before the rotation stay valid: verifiers check each block against the
roster version it names, and replicas accept old-key blocks that lead to a head signed with the
new key (docs/consortium.md).
"""

from __future__ import annotations

from pathlib import Path

import click

from ledger import keys
from ledger.canonical import canonical_bytes
from ledger.roster import make_member
from node.base.config import load_config
from node.cli.console import out, reported
from node.cli.node import DIR_OPTION
from node.consortium.membership import NEXT_ENROLLMENT_FILE, REPLACES, next_key_paths


@click.command("rotate-keys")
@DIR_OPTION
def rotate_keys(directory: Path) -> None:
    """Make the node's next Ed25519 and BLS keys and enrollment-next.json for the authority."""
    from ledger import bls

    with reported():
        config = load_config(directory)
        next_ed25519, next_bls = next_key_paths(config)
        signing_key = keys.load_or_create_private_key(next_ed25519)
        bls_secret = bls.load_or_create_secret_key(next_bls)
        member = make_member(config.node_id, config.name, config.url, signing_key, bls_secret)
        current = keys.load_private_key(config.ed25519_key)
        replaces = {
            "ed25519": keys.public_key_text(current),
            "bls": bls.public_key(bls.read_secret_key(config.bls_key)).hex(),
        }
        enrollment = directory / NEXT_ENROLLMENT_FILE
        enrollment.write_bytes(canonical_bytes({**member, REPLACES: replaces}) + b"\n")
    out.print(f"next keys of {config.node_id}: {next_ed25519}, {next_bls}")
    out.print(f"  Ed25519 {member['ed25519']}")
    out.print(f"  send {enrollment} to the consortium authority; once it has signed a roster")
    out.print(f"  listing them, run hrx node join --dir {directory} --roster <that roster>")
