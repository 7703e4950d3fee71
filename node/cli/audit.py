"""``hrx audit``: verify a ledger as an independent auditor (an export file, a database, or a
node's URL), and a patient's receipt. The first line is always the verdict; the exit status
says it too (0 valid, 1 invalid, 2 a wrong option)."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import click
import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from rich.markup import escape

from exchange.decision_replay import WATCHED, DecisionReplay
from ledger import keys
from ledger.canonical import parse_json
from ledger.errors import LedgerError, VerificationError
from ledger.receipt import verify_receipt
from ledger.store import ChainStore
from ledger.verify import Summary
from ledger.verify_parallel import (
    available_cores,
    verify_database_in_parallel,
    verify_export_in_parallel,
)
from node.cli.console import entry_progress, fail, out, reported
from node.consortium.remote_export import download_export


@click.group("audit")
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
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=None,
    help="Processes that verify chains at once (default: every core this process may use); "
    "the verdict and the first fault are the same with any number.",
)
def audit_verify(
    target: str,
    authority: str | None,
    token: str | None,
    resolutions: tuple[Path, ...],
    checkpoints: tuple[str, ...],
    jobs: int | None,
) -> None:
    """Verify a ledger: an export file, a database, or a node's URL (http(s)://...).

    Exit 0 when valid, 1 with the first fault, when fork evidence proves a member lied, when
    an access decision is not the one the consent policy makes over the view it records, or
    when the ledger lacks blocks that a --checkpoint certifies. The first line is the verdict.
    """
    anchor = _anchor(authority)
    decisions = DecisionReplay()
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
        "jobs": jobs or available_cores(),
    }
    with reported():
        try:
            if target.startswith(("http://", "https://")):
                if not token:
                    fail("verifying a node's URL needs an auditor's --token", 2)

                with tempfile.TemporaryDirectory() as scratch:
                    export = Path(scratch) / "ledger.jsonl"
                    with entry_progress(None, "downloading") as advance:
                        download_export(target, token or "", export, advance)
                    with entry_progress(None, "verifying") as advance:
                        summary = verify_export_in_parallel(export, anchor, advance, **watching)
            elif _looks_like_database(target):
                store = ChainStore(target, read_only=True)
                if not store.is_initialised():
                    fail(f"{target} holds no ledger")
                total = sum(rows for rows, _, _ in store.entry_stats().values())
                with entry_progress(total, "verifying") as advance:
                    summary = verify_database_in_parallel(store, anchor, advance, **watching)
            else:
                if not Path(target).is_file():
                    fail(f"{target} is neither an export file nor a database URL")
                with entry_progress(None, "verifying") as advance:
                    summary = verify_export_in_parallel(Path(target), anchor, advance, **watching)
        except VerificationError as exc:
            invalid(str(exc))
    findings = decisions.findings({c: s.entries for c, s in summary.chains.items()})
    print_summary(summary, findings)
    out.print(f"{len(decisions.decisions)} access decision(s) replayed against the consent policy")
    out.print(
        f"{len(decisions.lookups)} record locator lookup(s) checked against the questions asked"
    )
    out.print(
        f"{len(decisions.image_reads)} read(s) of images checked against their grants "
        "(access decisions, consults)"
    )
    if findings:
        out.print(
            f"[bold red]{len(findings)} finding(s): access decisions the policy would not have "
            "made, or lookups no recorded question called for:[/]"
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
            f"[bold red]INVALID[/]: {len(findings)} finding(s) of the access replay (decisions "
            "the consent policy would not have made, lookups no recorded question called for, or "
            "reads of images no grant allowed)"
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
