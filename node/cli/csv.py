"""``hrx adapters csv-import``: lab results from an LIS's CSV export, through a mapping file
(:mod:`fhir_adapters.lis_csv`; the file's format is in ``docs/adapters-csv.md``).

Each report (the rows of one report number) becomes one HL7 v2.5.1 ORU^R01 and is taken in by
:class:`node.intake.hl7.Hl7Intake`, exactly as if the LIS had sent it: stored in one
transaction, stored once however often the file is imported, quarantined with the reason when
it cannot be. Rows that cannot even make a message (no report number, a time in no listed
format, a value missing from a ``[values]`` table) are quarantined as CSV (adapter ``csv``:
the header and those rows, as read) with the line and column named; importing the corrected
file later marks them replayed."""

from __future__ import annotations

import csv
import io
import sys
from collections import Counter
from pathlib import Path

import click
import sqlalchemy as sa

from fhir_adapters.lis_csv import Mapping, Report
from fhir_adapters.store import now_micros
from node.base.logs import configure_logging
from node.cli.console import entry_progress, err, fail, out, reported
from node.cli.node import DIR_OPTION
from node.db.adapter_tables import quarantine_table
from node.services import Services

ADAPTER = "csv"


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
    """Take lab results from an LIS's CSV export files.

    Every report is reported stored, duplicate or quarantined; the exit status is 1 when any
    row was quarantined or a file could not be read."""
    from fhir_adapters.lis_csv import CsvError, check_report, parse_mapping, read_reports
    from node.base.config import load_config
    from node.intake.hl7 import Hl7Intake, quarantined
    from node.services import open_services

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
    counts: Counter[str] = Counter()
    unreadable = []
    try:
        intake = Hl7Intake(services, ADAPTER)
        open_rows = bool(quarantined(services.database.engine, adapter=ADAPTER, limit=1))
        for path in files:
            data = path.read_bytes()
            try:
                reports = read_reports(data, mapping, str(path))
            except CsvError as exc:
                err.print(f"[red]{exc}[/]")
                unreadable.append(path)
                continue
            with entry_progress(len(reports), f"importing {path.name}") as advance:
                for report in reports:
                    origin = _origin(path, report)
                    try:
                        check_report(report, mapping)
                        payload = report.message(mapping, config.node_id)
                    except CsvError as exc:
                        row = _quarantine(services, origin, str(exc), data, report, mapping)
                        counts["quarantined"] += 1
                        out.print(f"[red]{origin}: quarantined as #{row}: {exc}[/]")
                        advance(1)
                        continue
                    outcome = intake.take_in(payload, origin)
                    counts[outcome.status] += 1
                    if outcome.accepted and open_rows:
                        _mark_replayed(services, path, report)
                    style = "" if outcome.accepted else "[red]"
                    out.print(
                        f"{style}{origin}: {outcome.summary()}",
                        highlight=False,
                        markup=bool(style),
                    )
                    advance(1)
    finally:
        services.close()
    refused = counts["quarantined"] + counts["refused"]
    out.print(
        f"{sum(counts.values())} report(s): {counts['stored']} stored, {counts['duplicate']} "
        f"duplicate, {refused} refused"
        + (f"; {len(unreadable)} file(s) unreadable" if unreadable else ""),
        highlight=False,
    )
    if refused or unreadable:
        err.print(
            "[yellow]not everything was taken in:[/] see hrx adapters quarantine list --dir "
            f"{directory}; fix the file or the mapping and import it again (what was stored is "
            "not stored twice)"
        )
        sys.exit(1)


def _rows_text(data: bytes, lines: list[int], mapping: Mapping) -> bytes:
    """The header and the given CSV lines of a file, as read (for the quarantine), in UTF-8."""
    text = data.decode(mapping.codec)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=mapping.delimiter)
    kept = io.StringIO(newline="")
    writer = csv.writer(kept, delimiter=mapping.delimiter, lineterminator="\n")
    wanted = {1, *lines}
    for row in reader:
        if reader.line_num in wanted:
            writer.writerow(row)
    return kept.getvalue().encode("utf-8")


def _origin(path: Path, report: Report) -> str:
    """Names the rows: the file, the report number and the lines (also how a later import of
    the corrected file finds them)."""
    return f"{path.name} report {report.number or '-'} ({report.origin(path.name)})"[:255]


def _quarantine(
    services: Services, origin: str, reason: str, data: bytes, report: Report, mapping: Mapping
) -> int:
    payload = _rows_text(data, report.lines, mapping)
    Q = quarantine_table
    with services.database.write_engine.begin() as conn:
        existing = conn.execute(
            sa.select(Q.c.id).where(
                Q.c.adapter == ADAPTER, Q.c.payload == payload, Q.c.replayed_at.is_(None)
            )
        ).first()
        if existing is not None:  # the same rows imported again: one row is enough
            return int(existing[0])
        inserted = conn.execute(
            Q.insert().values(
                adapter=ADAPTER,
                received_at=now_micros(),
                origin=origin,
                reason=reason[:4000],
                payload=payload,
            )
        )
        key = inserted.inserted_primary_key
        assert key is not None
        return int(key[0])


def _mark_replayed(services: Services, path: Path, report: Report) -> int:
    """Rows of this report quarantined by an earlier import of a file of the same name, now
    stored (the file was corrected): marked replayed. How many."""
    if not report.number:
        return 0
    Q = quarantine_table
    prefix = f"{path.name} report {report.number} ("
    with services.database.write_engine.begin() as conn:
        marked = conn.execute(
            Q.update()
            .where(
                Q.c.adapter == ADAPTER,
                Q.c.replayed_at.is_(None),
                sa.func.substr(Q.c.origin, 1, len(prefix)) == prefix,
            )
            .values(replayed_at=now_micros())
        )
        return int(marked.rowcount or 0)


COMMANDS: list[click.Command] = [csv_import]
