"""``hrx report``: what the ledger this node holds says of mutual recognition (the exams
avoided, the cost saved, the re-orders), by member, item and month."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from exchange.recognition import load_rules
from exchange.savings import RESULT_TYPES, savings, yuan
from ledger.store import ChainStore
from node.base.config import load_config
from node.cli.console import out, reported
from node.cli.node import DIR_OPTION
from node.db.engines import open_database


@click.group("report")
def report_group() -> None:
    """Reports computed from the ledger this node holds (every member's chain)."""


@report_group.command("savings")
@DIR_OPTION
@click.option("--from", "start", default=None, type=click.DateTime(["%Y-%m-%d"]))
@click.option("--to", "end", default=None, type=click.DateTime(["%Y-%m-%d"]))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def report_savings(directory: Path, start: Any, end: Any, as_json: bool) -> None:
    """Exams avoided by mutual recognition and the cost saved, by member, item and month."""

    with reported():
        config = load_config(directory)
        rules = load_rules(config.recognition_rules)
        database = open_database(config.database_url)
        try:
            entries = ChainStore(database.engine).entries_about(None, RESULT_TYPES)
        finally:
            database.close()
    report = savings(
        entries, rules.zone, start.date() if start else None, end.date() if end else None
    )
    if as_json:
        click.echo(json.dumps(report.to_json(), ensure_ascii=False, indent=2))
        return
    names = {item.id: item.label() for item in rules.items}
    span = f"{start:%Y-%m-%d} .. " if start else "… "
    span += f"{end:%Y-%m-%d}" if end else "now"
    out.print(
        f"mutual recognition, {span}: {report.exams_avoided} exam(s) avoided, "
        f"¥{yuan(report.fen_saved)} saved",
        highlight=False,
    )
    for title, position in (("by member", 0), ("by item", 1), ("by month", 2)):
        out.print(f"[bold]{title}[/]")
        for key, count, fen in report.by(position):
            label = f"{key} {names[key]}" if position == 1 and key in names else key
            out.print(f"  {label:32} {count:6} exam(s)  ¥{yuan(fen):>12}", highlight=False)
    if report.reordered:
        out.print("[bold]ordered again despite a recognised result[/]")
        for (member, reason), count in sorted(report.reordered.items()):
            out.print(f"  {member:12} {reason:20} {count}", highlight=False)
