"""``hrx demo``: the README's main job. For now it plays the ledger's part of the story on one
machine: a hospital's chain records consents, accesses and recognised results (pseudonyms and
hashes only), a concurrent burst is group-committed, the ledger is exported and verified by the
offline auditor against the authority key, and one entry's inclusion proof is checked."""

from __future__ import annotations

import hashlib
import secrets
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from consent.model import Terms, granted_body, revoked_body
from consent.policy import AccessRequest, decide
from consent.pseudonym import RESIDENT_ID_SYSTEM, pseudonym
from exchange.decisions import Decided, decided_body
from ledger import keys, merkle
from ledger.canonical import canonical_bytes
from ledger.model import format_time
from ledger.roster import make_member, make_roster, sign_roster
from ledger.store import ChainStore, ChainWriter
from ledger.verify import verify_export


def _story(secret: bytes) -> list[tuple[str, dict[str, Any]]]:
    patient = pseudonym(secret, RESIDENT_ID_SYSTEM, "330106199001011234")
    consent_hash = hashlib.sha256(b"Consent/c-1 v1").hexdigest()
    released = [hashlib.sha256(f"Observation/o-{i}".encode()).hexdigest() for i in range(3)]
    terms = Terms(
        grantees=("*",),
        categories=("imaging", "laboratory"),
        purposes=("TREAT",),
        start="2026-01-01T00:00:00.000Z",
        end=None,
    )
    grant = granted_body("c-1", patient, terms, consent_hash)
    request = AccessRequest(patient, "hosp-b", "TREAT", ("imaging",), format_time())
    in_view = [{"chain": "hosp-a", "seq": 0, "type": "consent.granted", "body": grant}]
    decided = Decided(decide(in_view, request), {"hosp-a": 1})
    return [
        ("consent.granted", grant),
        ("access.decided", decided_body("r-1", request, decided, released)),
        (
            "result.recognized",
            {
                "patient": patient,
                "source": {"org": "hosp-a", "resource_hash": released[0]},
                "code": "CT-HEAD",
                "avoided_cost_fen": 28000,
            },
        ),
        ("consent.revoked", revoked_body("c-1", patient)),
    ]


def run_demo(workdir: Path, console: Console) -> None:
    """Play the story in ``workdir``; a ledger the auditor finds invalid raises."""
    db = workdir / "hosp-a.db"
    console.print(f"[bold]1.[/] hospital A creates its chain in {db}")
    key = keys.load_or_create_private_key(workdir / "hosp-a.pem")
    authority = keys.load_or_create_private_key(workdir / "authority.pem")
    from ledger import bls  # slow to import (py_ecc): only when the demo runs

    member = make_member("hosp-a", "Hospital A", "", key, bls.generate_secret_key())
    roster = make_roster("demo", [member], quorum=1)
    store = ChainStore(str(db))
    store.initialise(
        roster, sign_roster(roster, authority), chain="hosp-a", key_path=workdir / "hosp-a.pem"
    )

    secret = secrets.token_bytes(32)
    with ChainWriter(store, "hosp-a", key) as writer:
        console.print("[bold]2.[/] consent, access and recognition events (pseudonyms only)")
        for entry_type, body in _story(secret):
            seq = writer.append(entry_type, body)
            console.print(f"   seq {seq}: {entry_type}")
        burst = 2000
        console.print(f"[bold]3.[/] {burst} concurrent appends from 8 threads, group-committed")
        started = time.perf_counter()
        body = {"request_id": "burst", "patient": pseudonym(secret, "urn:hrx:demo", "p")}
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: writer.append("access.requested", body), range(burst)))
        elapsed = time.perf_counter() - started
    blocks = store.block_count()
    console.print(f"   {burst} durable appends in {elapsed:.2f} s, {blocks} blocks in all")

    export = workdir / "ledger.jsonl"
    with export.open("wb") as handle:
        for line in store.export_lines():
            handle.write(line + b"\n")
    console.print(f"[bold]4.[/] the auditor verifies the export {export} offline")
    summary = verify_export(export, authority.public_key())
    head = summary.chains["hosp-a"]
    console.print(
        f"   [green]VALID[/]: {summary.blocks} blocks, {summary.entries} entries, "
        f"root {head.tree_root[:16]}…"
    )

    proof = store.inclusion_proof("hosp-a", 0)
    leaf = merkle.leaf_hash(canonical_bytes(store.entry("hosp-a", 0)))
    merkle.verify_inclusion(
        leaf,
        proof["leaf_index"],
        proof["tree_size"],
        [bytes.fromhex(h) for h in proof["audit_path"]],
        bytes.fromhex(head.tree_root),
    )
    console.print(
        f"[bold]5.[/] the consent entry's inclusion proof ({len(proof['audit_path'])} hashes) "
        "checks against the signed head"
    )
    store.close()


@click.command("demo")
@click.option(
    "--dir",
    "workdir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Keep the demo's files here (default: a temporary folder, removed afterwards).",
)
def demo(workdir: Path | None) -> None:
    """Build a ledger, append events, verify it as the auditor, and print the verdict."""
    console = Console(highlight=False, soft_wrap=True)
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        if (workdir / "hosp-a.db").exists():
            raise click.ClickException(f"{workdir} holds a demo already; give an empty --dir")
        run_demo(workdir, console)
    else:
        with tempfile.TemporaryDirectory(prefix="hrx-demo-") as tmp:
            run_demo(Path(tmp), console)
    console.print("[bold green]verdict: the ledger is valid[/]")
