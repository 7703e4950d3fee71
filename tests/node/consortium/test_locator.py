"""The record locator's store and a member's holdings (node.consortium.locator), on each
engine: holdings are pseudonyms, categories and dates only; a newer date replaces an older one
and never the reverse; only the patients whose results or Patient changed are sent again;
malformed holdings are refused naming the first."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest

from consent.pseudonym import RESIDENT_ID_SYSTEM
from node.base.config import load_config
from node.consortium.locator import (
    LocatorError,
    changed_patients,
    check_holdings,
    holders,
    holdings_of,
    record_holdings,
)
from node.demo.nodes import init_node, join_alone
from node.services import Services, open_services
from tests.helpers.databases import postgres_database

P, Q = "a" * 64, "b" * 64
LAB = {"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def services(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Services]:
    directory = tmp_path / "hosp-r"
    with postgres_database() if request.param == "postgres" else nullcontext() as url:
        init_node(directory, "hosp-r", url, 8080)
        join_alone(directory)
        svc = open_services(load_config(directory))
        try:
            yield svc
        finally:
            svc.close()


def test_holdings_keep_the_newest_date_and_answer_by_category(services: Services) -> None:
    write, read = services.database.write_engine, services.database.engine
    assert record_holdings(write, "hosp-a", []) == 0
    given = [
        {"patient": P, "category": "laboratory", "newest": "2026-11-30"},
        {"patient": P, "category": "imaging", "newest": "2026-10-01"},
    ]
    assert record_holdings(write, "hosp-a", given) == 2
    record_holdings(
        write, "hosp-b", [{"patient": P, "category": "imaging", "newest": "2026-01-02"}]
    )
    record_holdings(
        write, "hosp-c", [{"patient": Q, "category": "laboratory", "newest": "2026-01-02"}]
    )
    assert holders(read, P, ["laboratory"]) == ["hosp-a"]
    assert holders(read, P, ["laboratory", "imaging"]) == ["hosp-a", "hosp-b"]
    assert holders(read, Q, ["imaging"]) == []
    # an older date never replaces a newer one; a newer one does
    record_holdings(
        write, "hosp-a", [{"patient": P, "category": "laboratory", "newest": "2025-01-01"}]
    )
    record_holdings(
        write, "hosp-a", [{"patient": P, "category": "imaging", "newest": "2026-12-01"}]
    )
    with read.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT category, newest FROM locator_holdings WHERE member = 'hosp-a' ORDER BY 1"
        ).all()
    assert [tuple(row) for row in rows] == [("imaging", "2026-12-01"), ("laboratory", "2026-11-30")]


@pytest.mark.parametrize(
    "holdings",
    [
        "x",
        [{"patient": "Zhang San", "category": "laboratory", "newest": "2026-01-01"}],
        [{"patient": P, "category": "genetics", "newest": "2026-01-01"}],
        [{"patient": P, "category": "laboratory", "newest": "yesterday!"}],
        [{"patient": P, "category": "laboratory", "newest": "2026-01-01", "name": "张三"}],
        [{"patient": P, "category": "laboratory", "newest": "2026-01-01"}] * 2001,
    ],
)
def test_malformed_holdings_are_refused(holdings: Any) -> None:
    with pytest.raises(LocatorError, match=r"holding 0 is not|at most 2000"):
        check_holdings(holdings)


def test_a_member_sends_only_the_patients_whose_records_changed(services: Services) -> None:
    store, engine = services.store, services.database.engine
    first = store.create(
        {
            "resourceType": "Patient",
            "identifier": [{"system": RESIDENT_ID_SYSTEM, "value": "330106199001011234"}],
        }
    )
    other = store.create(
        {
            "resourceType": "Patient",
            "identifier": [{"system": RESIDENT_ID_SYSTEM, "value": "330106199202022345"}],
        }
    )
    store.create({"resourceType": "Patient"})  # no identifier: no pseudonym, never sent

    def lab(patient: str, day: str) -> None:
        store.create(
            {
                "resourceType": "Observation",
                "status": "final",
                "category": [{"coding": [LAB]}],
                "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
                "subject": {"reference": f"Patient/{patient}"},
                "effectiveDateTime": f"{day}T09:00:00+08:00",
            }
        )

    lab(first.id, "2026-11-01")
    lab(first.id, "2026-11-20")
    everyone, newest = changed_patients(engine, None)
    assert everyone == sorted([first.id, other.id])
    holdings = holdings_of(store, engine, everyone)
    pseudonym = services.consents.pseudonym_of(first.resource())
    assert holdings == [{"patient": pseudonym, "category": "laboratory", "newest": "2026-11-20"}]
    assert "330106" not in str(holdings)  # pseudonyms only
    assert changed_patients(engine, newest) == ([], newest)  # nothing since
    lab(other.id, "2026-12-01")
    changed, later = changed_patients(engine, newest)
    assert changed == [other.id] and later > newest
