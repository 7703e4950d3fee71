"""``hrx adapters csv-import``: an LIS's CSV export through a mapping file, into a real node
directory (SQLite, and once PostgreSQL), with the sample files the demo uses."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from fhir_adapters.lis_csv import CsvError, Mapping, parse_mapping, read_reports
from fhir_adapters.store import tables
from node.base.config import load_config
from node.cli import main
from node.db.schema import messages_table
from node.intake.quarantine import quarantined
from node.records.pseudonym_index import patients_with
from node.services import Services, open_services
from tests.helpers import ROOT
from tests.helpers.nodes import joined_node_dir

SAMPLES = ROOT / "fhir_adapters" / "samples" / "csv"
MAPPING = SAMPLES / "lis-mapping.toml"
EXPORT = SAMPLES / "lis-export.csv"


def run(*args: str) -> Result:
    return CliRunner().invoke(main, ["adapters", *args])


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def node_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    with joined_node_dir(tmp_path / "hosp-b", "hosp-b", request.param) as directory:
        yield directory


def services_of(directory: Path) -> Services:
    return open_services(load_config(directory))


def resources(directory: Path, resource_type: str) -> list[dict[str, Any]]:
    services = services_of(directory)
    try:
        with services.database.engine.connect() as conn:
            rows = conn.execute(
                tables.resources.select().where(tables.resources.c.type == resource_type)
            ).all()
        return [services.store.read(resource_type, row.id).resource() for row in rows]
    finally:
        services.close()


def observation(directory: Path, code: str, report: str) -> dict[str, Any]:
    (found,) = [
        o
        for o in resources(directory, "Observation")
        if o["identifier"][0]["value"] == f"{report}/{code}"
    ]
    return found


def test_the_sample_export_is_stored_once(node_dir: Path) -> None:
    first = run("csv-import", "--dir", str(node_dir), "--mapping", str(MAPPING), str(EXPORT))
    assert first.exit_code == 0, first.output
    assert "3 report(s): 3 stored, 0 duplicate, 0 refused" in first.output
    creatinine = observation(node_dir, "2160-0", "ZY20260312001")
    assert creatinine["code"]["coding"][0] == {
        "system": "http://loinc.org",
        "code": "2160-0",
        "display": "肌酐",
    }
    assert creatinine["valueQuantity"]["value"] == Decimal("88")
    assert creatinine["valueQuantity"]["code"] == "umol/L"
    assert creatinine["interpretation"][0]["coding"][0]["code"] == "H"
    assert creatinine["referenceRange"][0]["low"]["value"] == Decimal("41")
    assert creatinine["effectiveDateTime"] == "2026-03-12T07:40:00+08:00"
    assert creatinine["issued"] == "2026-03-12T10:05:00+08:00"
    assert creatinine["performer"][0]["display"] == "杭州市中医院检验科"
    reports = {r["identifier"][0]["value"]: r for r in resources(node_dir, "DiagnosticReport")}
    assert sorted(reports) == ["ZY20260312001", "ZY20260312002", "ZY20260312003"]
    assert len(reports["ZY20260312001"]["result"]) == 3
    patients = {p["name"][0]["text"]: p for p in resources(node_dir, "Patient")}
    assert sorted(patients) == ["李秀英", "王建国"]  # GB18030 read intact
    assert patients["李秀英"]["birthDate"] == "1972-06-11"
    assert patients["李秀英"]["gender"] == "female"
    # the patient is matched across members by the resident ID's pseudonym
    services = services_of(node_dir)
    try:
        pseudonym = services.consents.pseudonym_of(patients["王建国"])
        assert pseudonym is not None
        assert patients_with(services.database.engine, pseudonym) == [patients["王建国"]["id"]]
    finally:
        services.close()
    again = run("csv-import", "--dir", str(node_dir), "--mapping", str(MAPPING), str(EXPORT))
    assert again.exit_code == 0, again.output
    assert "3 report(s): 0 stored, 3 duplicate, 0 refused" in again.output
    assert observation(node_dir, "2160-0", "ZY20260312001")["meta"]["versionId"] == "1"
    # counted as what they came through: the CSV adapter, not HL7 (hrx_adapter_* metrics)
    services = services_of(node_dir)
    try:
        with services.database.engine.connect() as conn:
            adapters = conn.execute(sa.select(messages_table.c.adapter)).scalars().all()
    finally:
        services.close()
    assert adapters == ["csv"] * 3


def test_a_corrected_row_is_a_new_version(node_dir: Path, tmp_path: Path) -> None:
    assert (
        run("csv-import", "--dir", str(node_dir), "--mapping", str(MAPPING), str(EXPORT)).exit_code
        == 0
    )
    text = EXPORT.read_bytes().decode("gb18030")
    corrected = text.replace(
        "2160-0,肌酐,88,umol/L,41-81,↑,已审核,2026-03-12 07:40:00,2026-03-12 10:05:00",
        "2160-0,肌酐,79,umol/L,41-81,正常,更正,2026-03-12 07:40:00,2026-03-12 14:20:00",
    ).replace("2026-03-12 10:05:00", "2026-03-12 14:20:00")
    assert corrected != text
    fixed = tmp_path / "corrected.csv"
    fixed.write_bytes(corrected.encode("gb18030"))
    answer = run("csv-import", "--dir", str(node_dir), "--mapping", str(MAPPING), str(fixed))
    assert answer.exit_code == 0, answer.output
    creatinine = observation(node_dir, "2160-0", "ZY20260312001")
    assert creatinine["meta"]["versionId"] == "2"
    assert creatinine["status"] == "corrected"
    assert creatinine["valueQuantity"]["value"] == Decimal("79")
    (report,) = [
        r
        for r in resources(node_dir, "DiagnosticReport")
        if r["identifier"][0]["value"] == "ZY20260312001"
    ]
    assert report["status"] == "corrected"


def test_rows_that_make_no_message_are_quarantined_and_the_rest_stored(
    node_dir: Path, tmp_path: Path
) -> None:
    text = EXPORT.read_bytes().decode("gb18030")
    broken = text.replace("2026-03-12 11:30:00", "12/03/2026 11h30")  # report ZY20260312002
    bad = tmp_path / "export.csv"
    bad.write_bytes(broken.encode("gb18030"))
    answer = run("csv-import", "--dir", str(node_dir), "--mapping", str(MAPPING), str(bad))
    assert answer.exit_code == 1
    assert "2 stored, 0 duplicate, 1 refused" in answer.output
    assert "line 5, column '报告时间': '12/03/2026 11h30' is in none of the time_formats" in (
        answer.output
    )
    services = services_of(node_dir)
    try:
        (row,) = quarantined(services.database.engine, adapter="csv")
    finally:
        services.close()
    assert row.origin.startswith("export.csv report ZY20260312002 (")
    listed = run("quarantine", "list", "--dir", str(node_dir))
    assert listed.exit_code == 0 and f"{row.id}" in listed.output, listed.output
    # the same broken file again: still one quarantine row; then the corrected file
    assert (
        run("csv-import", "--dir", str(node_dir), "--mapping", str(MAPPING), str(bad)).exit_code
        == 1
    )
    bad.write_bytes(text.encode("gb18030"))
    fixed = run("csv-import", "--dir", str(node_dir), "--mapping", str(MAPPING), str(bad))
    assert fixed.exit_code == 0, fixed.output
    services = services_of(node_dir)
    try:
        assert quarantined(services.database.engine, adapter="csv") == []
        (replayed,) = quarantined(services.database.engine, adapter="csv", include_replayed=True)
        assert replayed.id == row.id and replayed.replayed_at is not None
    finally:
        services.close()


@pytest.mark.parametrize(
    ("value", "problem"),
    [("9" * 10_000, "has 10000 significant digits"), ("1e999999", "too large")],
    ids=["10000-digits", "1e999999"],
)
def test_a_number_json_clients_cannot_read_is_quarantined(
    node_dir: Path, tmp_path: Path, value: str, problem: str
) -> None:
    """Was stored (10,000 digits), and the patient's results then could not be read."""
    text = EXPORT.read_bytes().decode("gb18030")
    broken = text.replace("3094-0,尿素,6.1,", f"3094-0,尿素,{value},")  # report ZY20260312001
    assert broken != text
    bad = tmp_path / "export.csv"
    bad.write_bytes(broken.encode("gb18030"))
    answer = run("csv-import", "--dir", str(node_dir), "--mapping", str(MAPPING), str(bad))
    assert answer.exit_code == 1
    assert "2 stored, 0 duplicate, 1 refused" in answer.output
    assert "line 3, column '结果'" in answer.output and problem in answer.output
    assert "9999999999" not in answer.output
    reports = [r["identifier"][0]["value"] for r in resources(node_dir, "DiagnosticReport")]
    assert sorted(reports) == ["ZY20260312002", "ZY20260312003"]
    services = services_of(node_dir)
    try:
        (row,) = quarantined(services.database.engine, adapter="csv")
    finally:
        services.close()
    assert row.origin.startswith("export.csv report ZY20260312001 (")


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda m: m.replace('report = "报告单号"\n', ""), "must name the column(s) report"),
        (lambda m: m.replace('"↑" = "H"', '"↑" = 1'), "[values.X] tables"),
        (lambda m: "colour = 1\n" + m, "unknown key(s) ['colour']"),
        (lambda m: m.replace('encoding = "gb18030"', 'encoding = "big5"'), "utf-8 or gb18030"),
        (lambda m: m.replace("[columns]", "[columns]\nweight = '体重'"), "'weight'"),
    ],
)
def test_a_wrong_mapping_file_is_named(tmp_path: Path, change: Any, problem: str) -> None:
    with pytest.raises(CsvError) as caught:
        parse_mapping(change(MAPPING.read_text(encoding="utf-8")), "m.toml")
    assert problem in str(caught.value)


def test_files_that_cannot_be_read_are_named(node_dir: Path, tmp_path: Path) -> None:
    utf8 = tmp_path / "utf8.csv"
    utf8.write_text(EXPORT.read_bytes().decode("gb18030").replace("报告单号", "单号"))
    answer = run("csv-import", "--dir", str(node_dir), "--mapping", str(MAPPING), str(utf8))
    assert answer.exit_code == 1
    assert "is not gb18030" in answer.output or "no column '报告单号'" in answer.output
    mapping = tmp_path / "m.toml"
    mapping.write_text(MAPPING.read_text(encoding="utf-8").replace('"↑" = "H"', "broken ="))
    answer = run("csv-import", "--dir", str(node_dir), "--mapping", str(mapping), str(EXPORT))
    assert answer.exit_code == 1 and "is not TOML" in answer.output


def test_hl7_delimiters_in_cells_come_through() -> None:
    from fhir_adapters.hl7v2 import Systems, parse_message, read_results

    mapping: Mapping = parse_mapping(MAPPING.read_text(encoding="utf-8"))
    odd = "见备注|弱阳性^2+ & ~\\"
    text = EXPORT.read_bytes().decode("gb18030").replace(",151,g/L,", f",{odd},g/L,")
    reports = read_reports(text.encode("gb18030"), mapping)
    (report,) = [r for r in reports if r.number == "ZY20260312003"]
    (group,) = read_results(parse_message(report.message(mapping, "hosp-b")), Systems("hosp-b"))
    values = [r.elements.get("valueString") for r in group.orders[0].results]
    assert odd in values


def test_a_name_stored_better_elsewhere_is_not_made_worse(node_dir: Path) -> None:
    """The sample mapping gives only the whole name (姓名): a Patient stored as family 李,
    given 秀英 keeps both; its birth date and gender stay as precise as they were."""
    services = services_of(node_dir)
    try:
        with services.store.writing() as writer:
            writer.create(
                {
                    "resourceType": "Patient",
                    "identifier": [
                        {"system": "urn:oid:2.16.156.10011.1.3", "value": "33010219720611123X"}
                    ],
                    "name": [{"text": "李秀英", "family": "李", "given": ["秀英"]}],
                    "gender": "female",
                    "birthDate": "1972-06-11",
                },
                "Patient",
            )
    finally:
        services.close()
    assert run("csv-import", "--dir", str(node_dir), "--mapping", str(MAPPING), str(EXPORT))
    (patient,) = [
        p for p in resources(node_dir, "Patient") if "33010219720611123X" in str(p["identifier"])
    ]
    assert patient["name"] == [{"text": "李秀英", "family": "李", "given": ["秀英"]}]
    assert (patient["gender"], patient["birthDate"]) == ("female", "1972-06-11")


def test_merging_keeps_the_more_precise_of_the_same_facts() -> None:
    from types import SimpleNamespace

    from fhir_adapters.hl7v2 import merged_patient

    stored = {
        "resourceType": "Patient",
        "name": [{"text": "张三", "family": "张", "given": ["三"]}],
        "gender": "male",
        "birthDate": "1985-03-12",
    }
    vaguer = SimpleNamespace(
        identifiers=[],
        demographics={
            "name": [{"text": "张三", "family": "张三"}],
            "gender": "unknown",
            "birthDate": "1985",
        },
    )
    assert merged_patient(stored, vaguer) == stored  # type: ignore[arg-type]
    renamed = SimpleNamespace(
        identifiers=[],
        demographics={
            "name": [{"text": "张珊", "family": "张", "given": ["珊"]}],
            "birthDate": "1985-03-21",
        },
    )
    merged = merged_patient(stored, renamed)  # type: ignore[arg-type]
    assert merged["name"] == [{"text": "张珊", "family": "张", "given": ["珊"]}]
    assert merged["birthDate"] == "1985-03-21" and merged["gender"] == "male"
