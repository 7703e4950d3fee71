"""``hrx adapters bulk-import``: load FHIR NDJSON files (a hospital's history, another
server's Bulk Data export) into a node, validated and indexed, resumable after a crash. What
it does with each line: :mod:`node.flows.bulk_import`."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from fhir_adapters.store.bulk_import import Progress
from node.base.config import load_config
from node.base.logs import configure_logging
from node.cli.console import err, fail, out, reported
from node.cli.node import DIR_OPTION
from node.flows.bulk_import import import_job_id, run_import
from node.records.audit_trail import Caller
from node.services import open_services

COMMANDS: list[click.Command] = []
SHOWN_REFUSALS = 20  # refused lines printed; every one is in the job's refused.txt


@click.command("bulk-import")
@DIR_OPTION
@click.option(
    "--workers",
    type=click.IntRange(0, 64),
    default=None,
    help="Processes that parse and validate (default: one per core; 0: none, all in this one).",
)
@click.argument(
    "files", nargs=-1, required=True, type=click.Path(path_type=Path, dir_okay=False, exists=True)
)
def bulk_import(directory: Path, workers: int | None, files: tuple[Path, ...]) -> None:
    """Load FHIR resources from NDJSON files (one resource per line, any type, each with its
    id; references between the files resolve in any order).

    Run the same command again after an interruption: it resumes where it stopped and stores
    nothing twice. Refused lines are listed (file:line: reason) and kept aside; the exit
    status is 1 when any line was refused."""
    with reported():
        config = load_config(directory)
        configure_logging(config.log_format, config.log_level)
        services = open_services(config)
    started = time.monotonic()
    last_shown = 0.0

    def progress(state: Progress) -> None:
        nonlocal last_shown
        now = time.monotonic()
        if not err.is_terminal or now - last_shown < 0.5:
            return
        last_shown = now
        done, total, counts = state.bytes_done, state.bytes_total, state.counts
        rate = counts.settled / max(now - started, 1e-6)
        share = done / total if total else 1.0
        err.print(
            f"\r{share:6.1%} of {total / 1e6:,.1f} MB  {counts.settled:,} lines  {rate:,.0f}/s  "
            f"{counts.refused:,} refused  {counts.held:,} waiting",
            end="",
            highlight=False,
        )

    job = import_job_id(files)
    try:
        with reported():
            outcome = run_import(
                services, Caller(None), files, job=job, workers=workers, progress=progress
            )
    finally:
        services.close()
        if err.is_terminal:
            err.print()
    counts, seconds = outcome.counts, time.monotonic() - started
    out.print(
        f"{job}: {counts.created:,} created, {counts.updated:,} updated, {counts.unchanged:,} "
        f"unchanged, {counts.refused:,} refused ({counts.settled / max(seconds, 1e-6):,.0f} "
        f"lines/s)",
        highlight=False,
    )
    if outcome.refused_reasons is not None:
        with outcome.refused_reasons.open(encoding="utf-8") as reasons:
            for number, reason in enumerate(reasons):
                if number == SHOWN_REFUSALS:
                    err.print(f"… and {counts.refused - SHOWN_REFUSALS:,} more")
                    break
                err.print(reason.rstrip("\n"), highlight=False, markup=False)
        err.print(
            f"[yellow]refused lines are kept in {outcome.refused_lines}[/] (reasons in "
            f"{outcome.refused_reasons}); fix them and import that file"
        )
        sys.exit(1)
    if not outcome.finished:
        fail("the import stopped before the end; run the same command again to resume")


COMMANDS.append(bulk_import)
