"""``hrx ledger``: create a ledger, append to it, export it, prove its entries, show its
heads (an operator's tools; a node's own chain is written by the node)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ledger import keys
from ledger.canonical import canonical_bytes, parse_json
from ledger.errors import LedgerError
from ledger.model import check_body, check_entry_type
from ledger.roster import make_member, make_roster, sign_roster
from ledger.store import ChainStore, ChainWriter
from node.base.config import load_config
from node.cli.console import fail, out, reported

DB_OPTION = click.option("--db", default=None, help="Database URL or SQLite file.")
DIR_OPTION = click.option(
    "--dir",
    "directory",
    default=None,
    type=click.Path(path_type=Path, file_okay=False),
    help="A node's directory (instead of --db).",
)


def open_store(db: str | None, directory: Path | None = None) -> ChainStore:
    """The ledger of ``--db`` or of the node in ``--dir`` (exactly one of them)."""
    if (db is None) == (directory is None):
        fail("give either --db or --dir", 2)
    if directory is not None:
        db = load_config(directory).database_url
    assert db is not None
    store = ChainStore(db)
    if not store.is_initialised():
        fail(f"{db} holds no ledger; create one with: hrx ledger init --db {db} ...")
    return store


@click.group("ledger")
def ledger() -> None:
    """Create, append to, export and prove a ledger."""


@ledger.command("init")
@click.option(
    "--db", required=True, help="Database URL (sqlite:///FILE, postgresql://...) or SQLite file."
)
@click.option("--chain", required=True, help="This ledger's chain (member) id, e.g. hosp-a.")
@click.option(
    "--key",
    "key_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Ed25519 key (PEM); created when absent.",
)
@click.option(
    "--authority-key",
    required=True,
    type=click.Path(path_type=Path),
    help="Roster authority key (PEM); created when absent.",
)
@click.option(
    "--bls-key",
    type=click.Path(path_type=Path),
    help="BLS key file; default: the key path with suffix .bls.",
)
@click.option(
    "--consortium", default=None, help="Consortium name in the roster (default: standalone-CHAIN)."
)
@click.option("--name", default=None, help="Member name in the roster (default: the chain id).")
def ledger_init(
    db: str,
    chain: str,
    key_path: Path,
    authority_key: Path,
    bls_key: Path | None,
    consortium: str | None,
    name: str | None,
) -> None:
    """Create a standalone ledger with a one-member roster signed by the authority key."""
    with reported():
        store = ChainStore(db)
        if store.is_initialised() and store.rosters():
            fail(
                f"{db} already holds a ledger (roster version {store.roster().version}); "
                "use another --db"
            )
        signing_key = keys.load_or_create_private_key(key_path)
        authority = keys.load_or_create_private_key(authority_key)
        from ledger import bls  # py_ecc takes ~0.4 s to import: only when a key is made

        bls_secret = bls.load_or_create_secret_key(bls_key or key_path.with_suffix(".bls"))
        member = make_member(chain, name or chain, "", signing_key, bls_secret)
        roster = make_roster(consortium or f"standalone-{chain}", [member], quorum=1)
        store.initialise(roster, sign_roster(roster, authority), chain=chain, key_path=key_path)
    out.print(f"initialised chain [bold]{chain}[/] in {db}")
    out.print(f"authority public key: {keys.public_key_text(authority)}")


@ledger.command("append")
@DB_OPTION
@DIR_OPTION
@click.option("--type", "entry_type", required=True, help="Entry type, e.g. consent.granted.")
@click.option("--chain", default=None, help="Chain to append to (default: the one init set).")
@click.option(
    "--key",
    "key_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Signing key (default: the one init set).",
)
def ledger_append(
    db: str | None,
    directory: Path | None,
    entry_type: str,
    chain: str | None,
    key_path: Path | None,
) -> None:
    """Append JSON object bodies read from stdin, one per line; print each entry's seq.

    Every line is checked before anything is appended: one bad line appends nothing.
    """
    with reported():
        store = open_store(db, directory)
        chain = chain or store.setting("chain")
        key_setting = key_path or store.setting("key")
        if not chain or not key_setting:
            fail("this database has no default chain or key; pass --chain and --key")
        bodies: list[tuple[str, dict[str, Any]]] = []
        check_entry_type(entry_type)
        for number, line in enumerate(sys.stdin.buffer, start=1):
            if not line.strip():
                continue
            try:
                bodies.append((entry_type, check_body(parse_json(line))))
            except LedgerError as exc:
                fail(f"stdin line {number}: {exc}; nothing was appended")
        key = keys.load_private_key(Path(key_setting))
        with ChainWriter(store, chain, key) as writer:
            seqs = writer.append_many(bodies)
    for seq in seqs:
        click.echo(seq)


@ledger.command("export")
@DB_OPTION
@DIR_OPTION
@click.option(
    "--out",
    "out_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Output file (default: stdout).",
)
def ledger_export(db: str | None, directory: Path | None, out_path: Path | None) -> None:
    """Export rosters and every chain as JSON Lines (canonical JSON)."""
    with reported():
        store = open_store(db, directory)
        target = out_path.open("wb") if out_path else sys.stdout.buffer
        try:
            for line in store.export_lines():
                target.write(line + b"\n")
        finally:
            if out_path:
                target.close()


@ledger.command("proof")
@DB_OPTION
@DIR_OPTION
@click.option("--chain", required=True, help="Chain id.")
@click.option("--seq", type=int, default=None, help="Entry to prove included.")
@click.option(
    "--tree-size", type=int, default=None, help="Signed tree size (default: the newest head)."
)
@click.option(
    "--consistency",
    nargs=2,
    type=int,
    default=None,
    metavar="M N",
    help="Prove tree M is a prefix of tree N.",
)
def ledger_proof(
    db: str | None,
    directory: Path | None,
    chain: str,
    seq: int | None,
    tree_size: int | None,
    consistency: tuple[int, int] | None,
) -> None:
    """Print an inclusion proof (--seq) or a consistency proof (--consistency M N) as JSON."""
    if (seq is None) == (consistency is None):
        fail("give either --seq I or --consistency M N", 2)
    if consistency is not None and tree_size is not None:
        fail("--tree-size goes with --seq; a consistency proof names both sizes itself", 2)
    with reported():
        store = open_store(db, directory)
        if consistency is not None:
            proof = store.consistency_proof(chain, consistency[0], consistency[1])
            result: dict[str, Any] = {"path": proof["path"]}
        else:
            assert seq is not None
            result = store.inclusion_proof(chain, seq, tree_size)
    click.echo(canonical_bytes(result).decode())


@ledger.command("heads")
@DB_OPTION
@DIR_OPTION
def ledger_heads(db: str | None, directory: Path | None) -> None:
    """Print the newest signed block header of every chain as JSON."""
    with reported():
        heads = {chain: head.to_json() for chain, head in open_store(db, directory).heads().items()}
    click.echo(canonical_bytes(heads).decode())


# -- hrx audit -----------------------------------------------------------------------------
