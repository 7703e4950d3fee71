"""``hrx adapters csv-import``: lab results from an LIS's CSV export, through a mapping file
(:mod:`node.intake.csv`; the file's format is in ``docs/adapters-csv.md``). Every report is
reported stored, duplicate or quarantined; the exit status is 1 when any row was quarantined
or a file could not be read."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fhir_adapters.lis_csv import CsvError, parse_mapping
from node.base.config import load_config
from node.base.logs import configure_logging
from node.cli.console import err, fail, out, reported
from node.cli.node import DIR_OPTION
from node.intake.csv import ReportTaken, import_files
from node.services import open_services


@click.command("csv-import")
@DIR_OPTION
@click.option(
    "--mapping",
    "mapping_path",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="The mapping file (TOML): which column holds what (docs/adapters-csv.md).",
)
@click.argument(
    "files", nargs=-1, required=True, type=click.Path(path_type=Path, dir_okay=False, exists=True)
)
def csv_import(directory: Path, mapping_path: Path, files: tuple[Path, ...]) -> None:
    """Take lab results from an LIS's CSV export files."""
    with reported():
        try:
            mapping = parse_mapping(mapping_path.read_text(encoding="utf-8"), str(mapping_path))
        except UnicodeDecodeError:
            fail(f"{mapping_path} is not UTF-8 text")
        except CsvError as exc:
            fail(str(exc))
        config = load_config(directory)
        configure_logging(config.log_format, config.log_level)  # the node's log lines
        services = open_services(config)

    def taken(report: ReportTaken) -> None:
        accepted = report.status in ("stored", "duplicate")
        text = f"{report.origin}: {report.summary}"
        out.print(text if accepted else f"[red]{text}[/]", highlight=False, markup=not accepted)

    try:
        result = import_files(services, mapping, files, taken)
    finally:
        services.close()
    for path, problem in result.unreadable:
        err.print(f"[red]{path}: {problem}[/]", highlight=False)
    counts = result.counts
    out.print(
        f"{sum(counts.values())} report(s): {counts['stored']} stored, {counts['duplicate']} "
        f"duplicate, {result.refused} refused"
        + (f"; {len(result.unreadable)} file(s) unreadable" if result.unreadable else ""),
        highlight=False,
    )
    if result.refused or result.unreadable:
        err.print(
            "[yellow]not everything was taken in:[/] see hrx adapters quarantine list --dir "
            f"{directory}; fix the file or the mapping and import it again (what was stored is "
            "not stored twice)"
        )
        sys.exit(1)


COMMANDS: list[click.Command] = [csv_import]
