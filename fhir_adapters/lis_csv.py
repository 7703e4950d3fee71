"""LIS exports as CSV: a mapping file says which column holds what, and each report's rows
become one HL7 v2.5.1 ORU^R01 message, which the node then takes in exactly as it takes in a
message from the LIS over MLLP (:mod:`fhir_adapters.hl7v2`, :mod:`node.intake.hl7`). One
mapping path for both: the same identifiers, codes, units, ranges, flags and statuses, the same
idempotence (a report imported twice is stored once) and the same quarantine.

The mapping file (TOML) is documented in ``docs/adapters-csv.md``; in short::

    encoding = "gb18030"                 # of the CSV file: utf-8 (default) or gb18030
    delimiter = ","
    facility = "HZSY"                    # the LIS's facility (MSH-4): it scopes report numbers
    code_system = "LN"                   # OBX-3's coding system: LN (LOINC) or L (local)
    time_formats = ["%Y-%m-%d %H:%M:%S"] # strptime formats of the time columns (UTC+08:00)
    date_formats = ["%Y-%m-%d"]          # of the birth date column

    [columns]                            # CSV header -> what it holds
    report = "报告单号"                   # required: the filler order number, one report each
    mrn = "病历号"                        # mrn or resident_id (or both) is required
    resident_id = "身份证号"
    code = "项目代码"                     # required, with value, panel_code
    value = "结果"
    panel_code = "组合代码"
    ...

    [values.gender]                      # a column's values -> HL7 codes
    "男" = "M"

Nothing here touches a database: :func:`read_reports` turns bytes into :class:`Report` s (or
:class:`CsvError` naming the line and column), and :meth:`Report.message` writes the HL7.
"""

from __future__ import annotations

import csv
import hashlib
import io
import tomllib
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Any

from fhir_adapters.errors import AdapterError
from fhir_adapters.store.jsonio import number_problem

ZONE = timezone(timedelta(hours=8))  # times without a zone are China Standard Time
SENDING_APPLICATION = "HRX-CSV"  # MSH-3 of every message made from a CSV file
COLUMNS = (
    "report",  # filler order number (required)
    "placer",  # placer order number
    "mrn",
    "resident_id",
    "name",
    "gender",
    "birth_date",
    "phone",
    "panel_code",  # OBR-4 (required)
    "panel_name",
    "code",  # OBX-3 (required)
    "code_name",
    "code_system",  # per row, instead of the file's code_system
    "value",  # OBX-5 (required)
    "unit",
    "range",
    "flag",
    "status",  # OBX-11: F (default), C corrected, P preliminary, X cancelled...
    "collected",  # OBR-7 / OBX-14
    "received",  # OBR-14
    "reported",  # OBR-22
    "lab",  # OBX-23: the performing laboratory's name
)
REQUIRED = ("report", "panel_code", "code", "value")
MAPPED_VALUES = ("gender", "flag", "status")


class CsvError(AdapterError):
    """A mapping file or CSV content that cannot be read, with where (file, line, column)."""


@dataclass(frozen=True)
class Mapping:
    columns: dict[str, str]  # what -> CSV header
    values: dict[str, dict[str, str]]  # what -> (CSV value -> HL7 code)
    encoding: str = "utf-8"
    delimiter: str = ","
    facility: str = "LIS"
    code_system: str = "L"
    time_formats: tuple[str, ...] = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y%m%d%H%M%S")
    date_formats: tuple[str, ...] = ("%Y-%m-%d", "%Y%m%d", "%Y/%m/%d")
    text: str = ""  # the mapping file as read (kept with quarantined rows)

    @property
    def codec(self) -> str:
        """The Python codec of the CSV files (a UTF-8 BOM is skipped)."""
        return "utf-8-sig" if self.encoding.lower().replace("-", "") == "utf8" else "gb18030"


def parse_mapping(text: str, where: str = "the mapping file") -> Mapping:
    """A mapping file's TOML; CsvError naming the key that is wrong."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CsvError(f"{where} is not TOML: {exc}") from None
    known = {
        "encoding",
        "delimiter",
        "facility",
        "code_system",
        "time_formats",
        "date_formats",
        "columns",
        "values",
    }
    unknown = set(raw) - known
    if unknown:
        raise CsvError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    columns = raw.get("columns")
    if not isinstance(columns, dict) or not all(isinstance(v, str) and v for v in columns.values()):
        raise CsvError(f"{where}: [columns] must map what a column holds to its CSV header")
    wrong = set(columns) - set(COLUMNS)
    if wrong:
        raise CsvError(f"{where}: [columns] has {sorted(wrong)}, not among {', '.join(COLUMNS)}")
    missing = [name for name in REQUIRED if name not in columns]
    if missing:
        raise CsvError(f"{where}: [columns] must name the column(s) {', '.join(missing)}")
    if "mrn" not in columns and "resident_id" not in columns:
        raise CsvError(f"{where}: [columns] must name mrn or resident_id: results need a patient")
    if "reported" not in columns and "collected" not in columns:
        raise CsvError(f"{where}: [columns] must name reported or collected: results need a time")
    values = raw.get("values", {})
    if not isinstance(values, dict) or not all(
        name in MAPPED_VALUES
        and isinstance(table, dict)
        and all(isinstance(v, str) for v in table.values())
        for name, table in values.items()
    ):
        raise CsvError(
            f"{where}: [values.X] tables (X one of {', '.join(MAPPED_VALUES)}) map a column's "
            "values to HL7 codes"
        )
    settings: dict[str, Any] = {}
    for key in ("encoding", "delimiter", "facility", "code_system"):
        if key in raw:
            if not isinstance(raw[key], str) or not raw[key]:
                raise CsvError(f"{where}: {key} must be a non-empty string")
            settings[key] = raw[key]
    for key in ("time_formats", "date_formats"):
        if key in raw:
            if not isinstance(raw[key], list) or not all(
                isinstance(f, str) and f for f in raw[key]
            ):
                raise CsvError(f"{where}: {key} must be a list of strptime formats")
            settings[key] = tuple(raw[key])
    if settings.get("encoding", "utf-8").lower().replace("-", "") not in ("utf8", "gb18030"):
        raise CsvError(f"{where}: encoding must be utf-8 or gb18030")
    if len(settings.get("delimiter", ",")) != 1:
        raise CsvError(f"{where}: delimiter must be one character")
    return Mapping(dict(columns), {k: dict(v) for k, v in values.items()}, text=text, **settings)


@dataclass
class Report:
    """The rows of one report (one filler order number), in file order."""

    number: str
    lines: list[int]  # CSV line numbers (1: the header)
    rows: list[dict[str, str]] = field(default_factory=list)  # what -> cell

    def origin(self, file_name: str) -> str:
        first, last = self.lines[0], self.lines[-1]
        return f"{file_name} line {first}" + (f"-{last}" if last != first else "")

    def message(self, mapping: Mapping, node_id: str) -> bytes:
        """The report as an ORU^R01 (HL7 v2.5.1, UTF-8); CsvError naming the line and column
        of a cell that cannot be written (a time or a date in no listed format, a number JSON
        clients could not read)."""
        first = self.rows[0]
        segments: list[list[str]] = []
        rows_digest = hashlib.sha256(
            "\n".join(repr(sorted(row.items())) for row in self.rows).encode()
        ).hexdigest()[:16]
        reported = self._time(mapping, "reported", 0)
        sent = reported or self._time(mapping, "collected", 0)  # MSH-7: the same for the same rows
        if not sent:
            raise CsvError(
                f"line {self.lines[0]}: the row has neither a report nor a collection time"
            )
        segments.append(
            [
                "MSH",
                "^~\\&",
                SENDING_APPLICATION,
                _escape(mapping.facility),
                "HRX",
                _escape(node_id),
                sent,
                "",
                "ORU^R01^ORU_R01",
                f"CSV{rows_digest}",  # the same rows, the same control ID: stored once
                "P",
                "2.5.1",
                "",
                "",
                "AL",
                "NE",
                "CHN",
                "UNICODE UTF-8",
            ]
        )
        identifiers = []
        if first.get("mrn"):
            identifiers.append(f"{_escape(first['mrn'])}^^^{_escape(mapping.facility)}^MR")
        if first.get("resident_id"):
            identifiers.append(f"{_escape(first['resident_id'])}^^^CHN^NNCHN")
        if not identifiers:
            raise CsvError(f"line {self.lines[0]}: the row names no patient (mrn or resident_id)")
        pid = ["PID", "1", "", "~".join(identifiers), "", _escape(first.get("name", ""))]
        pid += ["", self._date(mapping, "birth_date"), self._mapped(mapping, "gender", 0)]
        if first.get("phone"):
            pid += [""] * (13 - len(pid)) + [f"^PRN^CP^^^^^^^^^{_escape(first['phone'])}"]
        segments.append(pid)
        placer = f"{_escape(first['placer'])}^HIS" if first.get("placer") else ""
        filler = f"{_escape(self.number)}^{_escape(mapping.facility)}"
        segments.append(["ORC", "RE", placer, filler])
        obr = ["OBR", "1", placer, filler, self._code(mapping, 0, "panel_code", "panel_name")]
        obr += ["", "", self._time(mapping, "collected", 0)]
        obr += [""] * (14 - len(obr)) + [self._time(mapping, "received", 0)]
        obr += [""] * (22 - len(obr)) + [reported, "", "", ""]
        segments.append(obr)
        sub_ids: dict[str, int] = {}
        for index, row in enumerate(self.rows):
            code = row.get("code", "")
            sub_ids[code] = sub_ids.get(code, 0) + 1
            value = row.get("value", "")
            value_type = "NM" if _is_number(value) else "ST"
            problem = number_problem(Decimal(value)) if value_type == "NM" else None
            if problem:  # the HL7 intake would refuse it too, naming OBX-5, not the cell
                raise CsvError(f"{self._where(mapping, index, 'value')}: {problem}")
            obx = [
                "OBX",
                str(index + 1),
                value_type,
                self._code(mapping, index, "code", "code_name"),
            ]
            obx += [str(sub_ids[code]) if sub_ids[code] > 1 else "", _escape(value)]
            obx += [_escape(row.get("unit", "")), _escape(row.get("range", ""))]
            obx += [self._mapped(mapping, "flag", index), "", ""]
            obx += [self._mapped(mapping, "status", index) or "F", "", ""]
            obx += [self._time(mapping, "collected", index)]
            obx += [""] * (19 - len(obx)) + [self._time(mapping, "reported", index)]
            if row.get("lab"):
                obx += [""] * (23 - len(obx)) + [_escape(row["lab"])]
            segments.append(obx)
        text = "\r".join("|".join(_trimmed(segment)) for segment in segments) + "\r"
        return text.encode("utf-8")

    # -- cells ---------------------------------------------------------------------------

    def _where(self, mapping: Mapping, index: int, what: str) -> str:
        return f"line {self.lines[index]}, column {mapping.columns[what]!r}"

    def _mapped(self, mapping: Mapping, what: str, index: int) -> str:
        cell = self.rows[index].get(what, "")
        if not cell:
            return ""
        table = mapping.values.get(what)
        if table is None:
            return _escape(cell)
        if cell not in table:
            raise CsvError(
                f"{self._where(mapping, index, what)}: {cell!r} is not in [values.{what}] "
                f"({', '.join(repr(k) for k in table)})"
            )
        return _escape(table[cell])

    def _code(self, mapping: Mapping, index: int, code: str, name: str) -> str:
        row = self.rows[index]
        system = row.get("code_system") or mapping.code_system
        parts = [_escape(row.get(code, "")), _escape(row.get(name, "")), _escape(system)]
        return "^".join(parts).rstrip("^")

    def _time(self, mapping: Mapping, what: str, index: int) -> str:
        cell = self.rows[index].get(what, "").strip()
        if not cell:
            return ""
        for pattern in mapping.time_formats:
            try:
                moment = datetime.strptime(cell, pattern)
            except ValueError:
                continue
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=ZONE)
            return moment.strftime("%Y%m%d%H%M%S%z")
        raise CsvError(
            f"{self._where(mapping, index, what)}: {cell!r} is in none of the time_formats "
            f"{list(mapping.time_formats)}"
        )

    def _date(self, mapping: Mapping, what: str) -> str:
        cell = self.rows[0].get(what, "").strip()
        if not cell:
            return ""
        for pattern in mapping.date_formats:
            try:
                return datetime.strptime(cell, pattern).strftime("%Y%m%d")
            except ValueError:
                continue
        raise CsvError(
            f"{self._where(mapping, 0, what)}: {cell!r} is in none of the date_formats "
            f"{list(mapping.date_formats)}"
        )


def read_reports(data: bytes, mapping: Mapping, where: str = "the file") -> list[Report]:
    """The reports of a CSV file, rows grouped by report number in first-seen order;
    CsvError for a file that cannot be read at all (encoding, header). A row without a report
    number or whose patient differs from its report's first row is an error of that report
    (its lines are named), raised by :func:`check_report`."""
    try:
        text = data.decode(mapping.codec)
    except UnicodeDecodeError as exc:
        raise CsvError(
            f"{where} is not {mapping.encoding}: byte {exc.start} (set encoding in the mapping "
            "file)"
        ) from None
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=mapping.delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise CsvError(f"{where} is empty: no header line") from None
    header = [cell.strip() for cell in header]
    positions = {}
    for what, column in mapping.columns.items():
        if column not in header:
            raise CsvError(
                f"{where}: the header has no column {column!r} (for {what}); it has "
                f"{', '.join(repr(h) for h in header)}"
            )
        positions[what] = header.index(column)
    reports: dict[str, Report] = {}
    unnumbered: list[Report] = []
    for row in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        cells = {
            what: (row[position].strip() if position < len(row) else "")
            for what, position in positions.items()
        }
        number = cells["report"]
        if not number:
            unnumbered.append(Report("", [line], [cells]))
            continue
        report = reports.setdefault(number, Report(number, []))
        report.lines.append(line)
        report.rows.append(cells)
    return [*reports.values(), *unnumbered]


def check_report(report: Report, mapping: Mapping) -> None:
    """CsvError naming the lines of a report that cannot be one message."""
    if not report.number:
        raise CsvError(
            f"line {report.lines[0]}: no report number in column {mapping.columns['report']!r}"
        )
    patient = ("mrn", "resident_id", "name", "birth_date", "gender")
    first = report.rows[0]
    for index, row in enumerate(report.rows[1:], start=1):
        for what in patient:
            if row.get(what, "") != first.get(what, ""):
                raise CsvError(
                    f"line {report.lines[index]}: report {report.number} names another patient "
                    f"than line {report.lines[0]} ({mapping.columns[what]!r} differs)"
                )
    for index, row in enumerate(report.rows):
        for what in ("code", "panel_code"):
            if not row.get(what):
                raise CsvError(f"line {report.lines[index]}: {mapping.columns[what]!r} is empty")


def _is_number(text: str) -> bool:
    try:
        Decimal(text)
    except InvalidOperation:
        return False
    return text.strip() != "" and text.strip().lower() not in ("nan", "inf", "-inf", "infinity")


def _escape(text: str) -> str:
    """HL7 v2 escapes for the default delimiters (|^~\\&); line breaks become \\.br\\."""
    escaped = (
        text.replace("\\", "\\E\\")
        .replace("|", "\\F\\")
        .replace("^", "\\S\\")
        .replace("&", "\\T\\")
        .replace("~", "\\R\\")
    )
    return escaped.replace("\r\n", "\\.br\\").replace("\n", "\\.br\\").replace("\r", "\\.br\\")


def _trimmed(fields: list[str]) -> list[str]:
    while len(fields) > 1 and fields[-1] == "":
        fields = fields[:-1]
    return fields
