"""The FHIR store below the web layer: search sets are bounded per caller, date ranges follow
FHIR precision, parameter values split at unescaped commas, index rows of a resource."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from fhir_adapters.errors import NotFound
from fhir_adapters.store import tables
from fhir_adapters.store.search import SEARCH_SETS_PER_OWNER, page, paginate, split_values
from fhir_adapters.store.search_params import date_range, index_values
from ledger.store import open_engine


def test_search_sets_are_bounded_per_owner(tmp_path: Path) -> None:
    engine = open_engine(str(tmp_path / "store.db"))
    tables.metadata.create_all(engine)
    pairs = [(n, 1) for n in range(1, 31)]
    first = paginate(engine, pairs, 10, "alice", "search", {})
    assert first.set_id and first.total == 30 and first.pairs == pairs[:10]
    with engine.connect() as conn:
        assert page(conn, first.set_id, 20, 10, "alice").pairs == pairs[20:]
        with pytest.raises(NotFound, match="not yours"):
            page(conn, first.set_id, 0, 10, "mallory")
    for _ in range(SEARCH_SETS_PER_OWNER):
        paginate(engine, pairs, 10, "alice", "search", {})
    paginate(engine, pairs, 10, "bob", "search", {})
    with engine.connect() as conn:
        owners = dict(
            conn.execute(
                sa.select(tables.search_sets.c.owner, sa.func.count()).group_by(
                    tables.search_sets.c.owner
                )
            ).all()
        )
        assert owners == {"alice": SEARCH_SETS_PER_OWNER, "bob": 1}
        with pytest.raises(NotFound):  # alice's oldest made room
            page(conn, first.set_id, 0, 10, "alice")
    # one page or _count=0: nothing stored
    assert paginate(engine, pairs[:5], 10, "carol", "search", {}).set_id is None
    assert paginate(engine, pairs, 0, "carol", "search", {}).set_id is None
    engine.dispose()


def test_date_ranges_follow_precision_and_zone() -> None:
    day = date_range("2024-03-05")
    assert day[1] - day[0] == 86_400_000_000
    assert date_range("2024-03-05T00:00:00+08:00")[0] == day[0]  # no zone: UTC+08:00
    assert date_range("2024-03-04T16:00:00Z")[0] == day[0]
    year = date_range("2024")
    assert year[1] - year[0] == 366 * 86_400_000_000
    assert date_range("2024-12")[1] == date_range("2025-01")[0]
    instant = date_range("2024-03-05T10:00:00.123Z")
    assert instant[1] - instant[0] == 1000
    for bad in ("2024-13", "24-01-01", "2024-02-30", "2024-01-01T25:00"):
        with pytest.raises(ValueError):
            date_range(bad)


def test_split_values() -> None:
    assert split_values("a,b") == ["a", "b"]
    assert split_values(r"a\,b,c") == ["a,b", "c"]
    assert split_values(r"http://x|a\|b") == [r"http://x|a|b"]
    assert split_values("") == [""]


def test_index_values_of_an_observation() -> None:
    rows = index_values(
        {
            "resourceType": "Observation",
            "id": "o1",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
            "subject": {"reference": "http://node/fhir/Patient/p1"},
            "performer": [{"reference": "Practitioner/d1"}],
            "effectivePeriod": {"start": "2024-01-01"},
        },
        "http://node/fhir",
    )
    assert ("code", "http://loinc.org", "718-7") in rows.tokens
    assert ("patient", "Patient", "p1") in rows.references
    assert rows.compartment == {"p1"}
    assert set(rows.links) == {("Patient", "p1"), ("Practitioner", "d1")}
    assert rows.dates == [("date", date_range("2024-01-01")[0], 2**62)]


def test_url_elements_are_json_strings() -> None:
    """A FHIR url (a Union of AnyUrl and str in the models) is a JSON string, not an object:
    an attachment's url and a contained Endpoint's address validate (they were refused as
    "must be an object"), and an object there is refused."""
    from fhir_adapters.errors import FhirError
    from fhir_adapters.store.resources import validate

    report = {
        "resourceType": "DiagnosticReport",
        "status": "final",
        "code": {"text": "CT chest"},
        "presentedForm": [{"contentType": "application/pdf", "url": "https://pacs/r/1.pdf"}],
    }
    assert validate(report)["presentedForm"][0]["url"] == "https://pacs/r/1.pdf"
    study = {
        "resourceType": "ImagingStudy",
        "status": "available",
        "subject": {"reference": "Patient/p1"},
        "contained": [
            {
                "resourceType": "Endpoint",
                "id": "wado",
                "status": "active",
                "connectionType": {"code": "dicom-wado-rs"},
                "payloadType": [{"text": "DICOM"}],
                "address": "http://pacs/dicom-web/studies/1.2.3",
            }
        ],
        "endpoint": [{"reference": "#wado"}],
    }
    assert validate(study)["contained"][0]["address"].endswith("/studies/1.2.3")
    report["presentedForm"][0]["url"] = {"value": "https://pacs/r/1.pdf"}
    with pytest.raises(FhirError):
        validate(report)
