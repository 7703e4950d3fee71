"""LIS exports as CSV, through a mapping file: each report (the rows that share a report
number) becomes one HL7 v2.5.1 ORU^R01 message and is taken in by the HL7 intake
(:mod:`node.intake.hl7`) in one transaction, so it is stored once however often the file is
imported and a changed report becomes a new version. Rows that cannot form a message are
quarantined (adapter ``csv``: the header and those rows, as read) with the line and column
named; importing the corrected file stores the report and marks those rows replayed."""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from fhir_adapters.lis_csv import CsvError, Mapping, Report, check_report, read_reports
from fhir_adapters.store import now_micros
from node.db.schema import quarantine_table
from node.intake.hl7 import Hl7Intake
from node.intake.quarantine import keep_once, quarantined
from node.services import Services

ADAPTER = "csv"


@dataclass(frozen=True)
class ReportTaken:
    """What became of one report."""

    origin: str  # the file, the report number and the lines
    status: str  # stored | duplicate | quarantined | refused
    summary: str  # for the operator: may name local patients


@dataclass
class CsvImport:
    """What an import did: reports by status, and the files that could not be read."""

    counts: Counter[str] = field(default_factory=Counter)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def refused(self) -> int:
        return self.counts["quarantined"] + self.counts["refused"]


def import_files(
    services: Services,
    mapping: Mapping,
    files: Iterable[Path],
    taken: Callable[[ReportTaken], None] = lambda _report: None,
    reading: Callable[[Path, int], None] = lambda _path, _reports: None,
) -> CsvImport:
    """Import every report of ``files``; ``taken`` hears of each report as it is done, and
    ``reading`` of each file as it starts (its number of reports)."""
    intake = Hl7Intake(services, ADAPTER)
    result = CsvImport()
    open_rows = bool(quarantined(services.database.engine, adapter=ADAPTER, limit=1))
    for path in files:
        data = path.read_bytes()
        try:
            reports = read_reports(data, mapping, str(path))
        except CsvError as exc:
            result.unreadable.append((path, str(exc)))
            continue
        reading(path, len(reports))
        for report in reports:
            origin = _origin(path, report)
            try:
                check_report(report, mapping)
                payload = report.message(mapping, services.config.node_id)
            except CsvError as exc:
                with services.database.write_engine.begin() as conn:
                    row = keep_once(
                        conn, ADAPTER, origin, str(exc), _rows_text(data, report.lines, mapping)
                    )
                result.counts["quarantined"] += 1
                taken(ReportTaken(origin, "quarantined", f"quarantined as #{row}: {exc}"))
                continue
            outcome = intake.take_in(payload, origin)
            result.counts[outcome.status] += 1
            if outcome.accepted and open_rows:
                _mark_replayed(services, path, report)
            taken(ReportTaken(origin, outcome.status, outcome.summary()))
    return result


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
