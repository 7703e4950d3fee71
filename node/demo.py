"""``hrx demo``: the README's main job. For now it plays the ledger's part of the story on one
machine: a hospital's chain records consents, accesses and recognised results (pseudonyms and
hashes only), a concurrent burst is group-committed, the ledger is exported and verified by the
offline auditor against the authority key, and one entry's inclusion proof is checked."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from ledger import keys, merkle
from ledger.canonical import canonical_bytes
from ledger.roster import make_member, make_roster, sign_roster
from ledger.store import ChainStore, ChainWriter
from ledger.verify import verify_export


def _pseudonym(secret: bytes, system: str, value: str) -> str:
    return hmac.new(secret, f"{system}|{value}".encode(), hashlib.sha256).hexdigest()


def _story(secret: bytes) -> list[tuple[str, dict[str, Any]]]:
    patient = _pseudonym(secret, "urn:oid:2.16.156.10011.1.1", "330106199001011234")
    doctor = _pseudonym(secret, "urn:hrx:practitioner", "hosp-b/D042")
    consent_hash = hashlib.sha256(b"Consent/c-1 v1").hexdigest()
    released = [hashlib.sha256(f"Observation/o-{i}".encode()).hexdigest() for i in range(3)]
    return [
        (
            "consent.granted",
            {
                "consent_id": "c-1",
                "patient": patient,
                "grantees": ["*"],
                "categories": ["laboratory", "imaging"],
                "purposes": ["TREAT"],
                "period": {"start": "2026-11-01", "end": "2027-11-01"},
                "resource_hash": consent_hash,
            },
        ),
        (
            "access.decided",
            {
                "request_id": "r-1",
                "requester_org": "hosp-b",
                "decision": "permit",
                "reason": "consent",
                "consent": {"chain": "hosp-a", "seq": 0},
                "view": {"hosp-a": 1},
                "released": released,
                "requester_practitioner": doctor,
            },
        ),
        (
            "result.recognized",
            {
                "patient": patient,
                "source": {"org": "hosp-a", "resource_hash": released[0]},
                "code": "CT-HEAD",
                "avoided_cost_fen": 28000,
            },
        ),
        ("consent.revoked", {"consent_id": "c-1", "patient": patient}),
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
        body = {"request_id": "burst", "patient": _pseudonym(secret, "demo", "p")}
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
