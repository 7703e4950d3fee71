"""``hrx demo``: a three-hospital consortium on this machine plays a referral from start to
end (:mod:`node.demo.story`)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
from rich.console import Console

from node.demo.story import DemoError, run_demo


@click.command("demo")
@click.option(
    "--dir",
    "workdir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Keep the consortium's files here (default: a temporary folder, removed afterwards).",
)
@click.option("--keep", is_flag=True, help="Leave the nodes running and say where to sign in.")
def demo(workdir: Path | None, keep: bool) -> None:
    """Run a three-hospital consortium on this machine and play a referral from start to end:
    adapters, consent, prior results with mutual recognition, revocation, checkpoints, and the
    auditor's verdict."""
    console = Console(highlight=False, soft_wrap=True)
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        if any(workdir.iterdir()):
            raise click.ClickException(f"{workdir} is not empty; give an empty --dir")
        valid = _played(workdir, console, keep)
    else:
        with tempfile.TemporaryDirectory(prefix="hrx-demo-") as tmp:
            valid = _played(Path(tmp), console, keep)
    if not valid:
        console.print("[bold red]verdict: the auditor found faults (above)[/]")
        raise SystemExit(1)
    console.print(
        "\n[bold green]verdict: the ledger is valid, and every access decision is the one the "
        "patient's consent allows[/]"
    )


def _played(root: Path, console: Console, keep: bool) -> bool:
    try:
        return run_demo(root, console, keep=keep)
    except DemoError as exc:
        raise click.ClickException(str(exc)) from None
