"""The ``hrx`` command line: ledger administration, the offline auditor, and the demo.

Every command reports a problem as one line naming it and what to do next, and exits non-zero;
``hrx audit verify`` exits 0 with a summary when the ledger is valid and 1 with the first fault;
``hrx audit receipt`` does the same for one entry's receipt from the patient portal.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import click
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from rich.markup import escape

from ledger import keys
from ledger.canonical import canonical_bytes, parse_json
from ledger.errors import LedgerError, VerificationError
from ledger.model import check_body, check_entry_type
from ledger.roster import make_member, make_roster, sign_roster
from ledger.store import ChainStore, ChainWriter
from ledger.verify import Summary, verify_database, verify_export
from node.cli.console import entry_progress, fail, out, reported

PRIVATE_UMASK = 0o077  # what hrx writes (databases, keys, logs, exports): its user's alone
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
        from node.base.config import load_config

        db = load_config(directory).database_url
    assert db is not None
    store = ChainStore(db)
    if not store.is_initialised():
        fail(f"{db} holds no ledger; create one with: hrx ledger init --db {db} ...")
    return store


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hrx")
def main() -> None:
    """hrx: a cross-institution health-record exchange with a verifiable ledger."""
    os.umask(PRIVATE_UMASK)


# -- hrx ledger ----------------------------------------------------------------------------


@main.group()
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


@main.group()
def audit() -> None:
    """Verify ledgers as an independent auditor."""


def _looks_like_database(target: str) -> bool:
    if "://" in target:
        return True
    path = Path(target)
    if not path.is_file():
        return False
    with path.open("rb") as handle:
        return handle.read(16) == b"SQLite format 3\x00"


AUTHORITY_OPTION = click.option(
    "--authority",
    default=None,
    help="The consortium authority's public key (base64url) or key file: the trust anchor.",
)


def _anchor(authority: str | None) -> Ed25519PublicKey | None:
    """The authority's public key from --authority, or None; exit 2 naming what is wrong."""
    try:
        return keys.load_public_key(authority) if authority else None
    except LedgerError as exc:
        fail(f"--authority: {exc}", 2)


@audit.command("verify")
@click.argument("target")
@AUTHORITY_OPTION
@click.option("--token", default=None, help="With a node's URL: an auditor's bearer token.")
@click.option(
    "--resolution",
    "resolutions",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="The authority's signed resolution of a fork (needs --authority). Repeatable.",
)
@click.option(
    "--checkpoint",
    "checkpoints",
    multiple=True,
    help="A checkpoint certificate obtained elsewhere (a file, or a member's URL): the ledger "
    "must hold every block it certifies. Repeatable.",
)
def audit_verify(
    target: str,
    authority: str | None,
    token: str | None,
    resolutions: tuple[Path, ...],
    checkpoints: tuple[str, ...],
) -> None:
    """Verify a ledger: an export file, a database, or a node's URL (http(s)://...).

    Exit 0 when valid, 1 with the first fault, when fork evidence proves a member lied, when
    an access decision is not the one the consent policy makes over the view it records, or
    when the ledger lacks blocks that a --checkpoint certifies. The first line is the verdict.
    """
    from exchange.audit import WATCHED, DecisionAudit

    anchor = _anchor(authority)
    decisions = DecisionAudit()
    given = [_certificate_from(source, token) for source in checkpoints]
    if resolutions and anchor is None:
        fail("--resolution is checked against the authority's key: give --authority", 2)
    with reported():
        settled = [parse_json(path.read_bytes()) for path in resolutions]
    watching: dict[str, Any] = {
        "watch": WATCHED,
        "observe": decisions.observe,
        "given": given,
        "resolutions": settled,
    }
    with reported():
        try:
            if target.startswith(("http://", "https://")):
                if not token:
                    fail("verifying a node's URL needs an auditor's --token", 2)
                import tempfile

                from node.consortium.remote_export import download_export

                with tempfile.TemporaryDirectory() as scratch:
                    export = Path(scratch) / "ledger.jsonl"
                    with entry_progress(None, "downloading") as advance:
                        download_export(target, token or "", export, advance)
                    with entry_progress(None, "verifying") as advance:
                        summary = verify_export(export, anchor, advance, **watching)
            elif _looks_like_database(target):
                store = ChainStore(target, read_only=True)
                if not store.is_initialised():
                    fail(f"{target} holds no ledger")
                total = sum(rows for rows, _, _ in store.entry_stats().values())
                with entry_progress(total, "verifying") as advance:
                    summary = verify_database(store, anchor, advance, **watching)
            else:
                if not Path(target).is_file():
                    fail(f"{target} is neither an export file nor a database URL")
                with entry_progress(None, "verifying") as advance:
                    summary = verify_export(Path(target), anchor, advance, **watching)
        except VerificationError as exc:
            invalid(str(exc))
    findings = decisions.findings({c: s.entries for c, s in summary.chains.items()})
    print_summary(summary, findings)
    out.print(f"{len(decisions.decisions)} access decision(s) replayed against the consent policy")
    if findings:
        out.print(
            f"[bold red]{len(findings)} access decision(s) the policy would not have made:[/]"
        )
        for finding in findings:
            out.print(f"  {finding}", highlight=False)
    if findings or summary.forks:
        sys.exit(1)


def invalid(message: str) -> NoReturn:
    """The verdict that a ledger or receipt does not hold, as the first line, and exit 1."""
    out.print(f"[bold red]INVALID[/]: {escape(message)}", highlight=False)
    sys.exit(1)


def _certificate_from(source: str, token: str | None) -> Any:
    """A checkpoint certificate from a file or a URL (a member's base URL means its latest);
    exit 2 naming what is wrong."""
    try:
        if source.startswith(("http://", "https://")):
            import requests

            url = (
                source
                if "/ledger/" in source
                else source.rstrip("/") + ("/ledger/checkpoints/latest")
            )
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            answer = requests.get(url, headers=headers, timeout=30)
            if answer.status_code != 200:
                fail(f"--checkpoint {url}: answered {answer.status_code}", 2)
            data = answer.content
        else:
            data = Path(source).read_bytes()
        certificate = parse_json(data)
    except OSError as exc:
        fail(f"--checkpoint {source}: {exc.strerror or exc}", 2)
    except LedgerError as exc:
        fail(f"--checkpoint {source} is not a certificate: {exc}", 2)
    if not isinstance(certificate, dict) or "checkpoint" not in certificate:
        fail(f'--checkpoint {source} is not a certificate ({{"checkpoint", "signers", ...}})', 2)
    return certificate


@audit.command("receipt")
@click.argument("receipt_file", type=click.Path(dir_okay=False, path_type=Path))
@AUTHORITY_OPTION
def audit_receipt(receipt_file: Path, authority: str | None) -> None:
    """Verify a receipt (from the patient portal) offline and say what it proves.

    Exit 0 when it holds, 1 naming what does not."""
    from ledger.receipt import verify_receipt

    anchor = _anchor(authority)
    with reported():
        try:
            receipt = parse_json(receipt_file.read_bytes())
        except OSError as exc:
            fail(f"{receipt_file}: {exc.strerror}")
        except LedgerError as exc:
            fail(f"{receipt_file} is not a receipt: {exc}")
        try:
            summary = verify_receipt(receipt, anchor)
        except VerificationError as exc:
            invalid(str(exc))
    out.print("VALID receipt")
    out.print(summary.describe(), highlight=False)


def print_summary(summary: Summary, findings: Sequence[object] = ()) -> None:
    """The verdict on its first line, then what it covered (and every fork proven)."""
    counts = (
        f"{len(summary.chains)} chain(s), {summary.blocks} block(s), {summary.entries} "
        f"entries; roster version(s) {', '.join(map(str, summary.rosters))}"
    )
    if summary.forks:
        out.print(f"[bold red]INVALID[/]: fork proven: {escape(summary.forks[0])}", highlight=False)
    elif findings:
        out.print(
            f"[bold red]INVALID[/]: {len(findings)} access decision(s) the consent policy "
            "would not have made"
        )
    else:
        settled = f"; {len(summary.resolved)} fork(s) resolved by the authority"
        out.print(f"[bold green]VALID[/]: {counts}{settled if summary.resolved else ''}")
    if summary.forks or findings:
        out.print(f"checked: {counts}")
    if summary.given:
        out.print(
            "every block that checkpoint epoch(s) "
            f"{', '.join(map(str, sorted(summary.given)))} (given with --checkpoint) certifies "
            "is in this ledger, as the quorum signed it"
        )
    else:
        out.print(
            "[yellow]note:[/] a copy of a ledger cannot prove that nothing was cut off its end: "
            "blocks after each chain's last one below could be missing without trace. To "
            "check, give --checkpoint with a certificate obtained from another member (a file, "
            "or its URL)"
        )
    if not summary.anchored:
        out.print(
            "[yellow]warning:[/] no --authority key given: the roster's signature was NOT checked "
            "against the consortium authority, so these members' keys are trusted as found"
        )
    for warning in summary.warnings:
        out.print(f"[yellow]warning:[/] {warning}")
    for chain, head in sorted(summary.chains.items()):
        covered = summary.covered.get(chain)
        out.print(
            f"  {chain}: height {head.height}, tree size {head.entries}, "
            f"root {head.tree_root}, head {head.head_hash}, at {head.time}"
        )
        out.print(
            f"    certified up to height {covered[1]} by checkpoint epoch {covered[0]}"
            if covered
            else "    [yellow]not covered by any checkpoint certificate[/]"
        )
    if summary.certificates:
        out.print(
            f"{len(summary.certificates)} checkpoint certificate(s) verified (quorum, "
            f"aggregate BLS signature, heads), newest epoch {max(summary.certificates)}"
        )
    if summary.emergencies:
        out.print(
            f"[bold yellow]{len(summary.emergencies)} emergency (break-glass) access(es)[/], "
            "each to be justified:"
        )
        for emergency in summary.emergencies[:50]:
            out.print(
                f"  {emergency.time} {emergency.requester} (recorded on {emergency.chain} seq "
                f"{emergency.seq})"
            )
        if len(summary.emergencies) > 50:
            out.print(f"  ... and {len(summary.emergencies) - 50} more")
    for fork in summary.forks:
        out.print(f"[bold red]FORK PROVEN:[/] {fork}")
    for fork in summary.resolved:
        out.print(f"[yellow]fork proven, resolved by the authority:[/] {fork}")


def _register_commands() -> None:
    from node.cli import accounts
    from node.cli import node as node_commands
    from node.cli.adapters import adapters_group
    from node.cli.keys import rotate_keys
    from node.cli.recovery import recover
    from node.cli.status import status
    from node.demo.story import demo

    main.add_command(demo)
    main.add_command(adapters_group)
    node_commands.register(main)
    accounts.register(main)
    node_commands.node_group.add_command(rotate_keys)
    node_commands.node_group.add_command(recover)
    node_commands.node_group.add_command(status)


_register_commands()

if __name__ == "__main__":  # pragma: no cover
    main()
