"""``hrx node status``: one screen an operator can trust — what is well, what is wrong, and
what to do about each (:mod:`node.ops.status`). Exit 0 when nothing is a problem, 1 otherwise."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from node.base.config import load_config
from node.cli.console import out, reported
from node.cli.node import DIR_OPTION
from node.db.engines import open_database
from node.ops.status import node_status

STYLE = {"ok": "green", "note": "cyan", "warning": "yellow", "problem": "bold red"}


@click.command("status")
@DIR_OPTION
def status(directory: Path) -> None:
    """Show the node's state and what to do about each problem (running or not)."""
    with reported():
        config = load_config(directory)
        database = open_database(config.database_url)
        try:
            found = node_status(config, database)
        finally:
            database.close()
    out.print(f"[bold]{escape(config.name)}[/] ({config.node_id}) — {config.directory}")
    table = Table(show_header=False, box=None, pad_edge=False, expand=False)
    table.add_column(no_wrap=True)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    for finding in found.findings:
        style = STYLE[finding.level]
        text = escape(finding.what)
        if finding.do:
            text += f"\n[bold]→[/] {escape(finding.do)}"
        table.add_row(finding.topic, f"[{style}]{finding.level}[/]", text)
    out.print(table)
    if found.worst == "problem":
        sys.exit(1)
