"""``hrx report``: what the ledger this node holds says of mutual recognition (the exams
avoided, the cost saved, the re-orders), by member, item and month; and of remote reading (the
turnaround of consults, by reading member and priority)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from exchange.reading import CONSULT_TYPES, turnaround
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


@report_group.command("consults")
@DIR_OPTION
@click.option("--from", "start", default=None, type=click.DateTime(["%Y-%m-%d"]))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def report_consults(directory: Path, start: Any, as_json: bool) -> None:
    """Turnaround of remote reading consults requested since --from (a day in the
    consortium's zone), per reading member and priority: median and 90th percentile, and the
    share reported within the deadline; computed from the ledger alone."""
    with reported():
        config = load_config(directory)
        rules = load_rules(config.recognition_rules)
        database = open_database(config.database_url)
        try:
            store = ChainStore(database.engine)
            entries = store.entries_about(None, CONSULT_TYPES)
            names = {m["id"]: m.get("name") or m["id"] for m in store.roster().body["members"]}
        finally:
            database.close()
    since = start.replace(tzinfo=rules.zone) if start else None
    rows = turnaround(entries, since)
    if as_json:
        click.echo(
            json.dumps(
                [{**row.__dict__, "share_within": row.share_within} for row in rows],
                ensure_ascii=False,
                indent=2,
            )
        )
        return
    span = f"since {start:%Y-%m-%d}" if start else "all"
    out.print(f"remote reading consults ({span}), turnaround from the ledger", highlight=False)
    if not rows:
        out.print("  no consults")
    for row in rows:
        if row.reported:
            share = f"{row.within_deadline}/{row.reported} within deadline"
            figures = (
                f"median {_duration(row.median_minutes)}, p90 {_duration(row.p90_minutes)}, {share}"
            )
        else:
            figures = "none reported yet"
        out.print(
            f"  {names.get(row.reader, row.reader)} ({row.reader}) {row.priority:8} "
            f"{figures}; {row.open} open, {row.cancelled} cancelled",
            highlight=False,
        )


def _duration(minutes: float | None) -> str:
    """Minutes as a person reads them: seconds under a minute, else minutes."""
    if minutes is None:
        return "–"
    return f"{minutes * 60:.0f} s" if minutes < 1 else f"{minutes:.1f} min"
