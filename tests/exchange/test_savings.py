"""Savings from the ledger: exams avoided and cost saved by member, item and month."""

from __future__ import annotations

from datetime import date, timedelta, timezone
from typing import Any

from exchange.savings import savings, yuan

ZONE = timezone(timedelta(hours=8))


def entry(chain: str, time: str, entry_type: str, **body: Any) -> dict[str, Any]:
    return {"chain": chain, "seq": 0, "time": time, "type": entry_type, "body": body}


ENTRIES = [
    entry(
        "hosp-b",
        "2026-10-31T17:00:00.000Z",
        "result.recognized",
        code="ct-chest",
        avoided_cost_fen=30000,
    ),
    entry(
        "hosp-b", "2026-11-02T01:00:00.000Z", "result.recognized", code="hgb", avoided_cost_fen=500
    ),
    entry(
        "hosp-b", "2026-11-03T01:00:00.000Z", "result.recognized", code="hgb", avoided_cost_fen=500
    ),
    entry(
        "hosp-c",
        "2026-11-20T01:00:00.000Z",
        "result.recognized",
        code="ct-chest",
        avoided_cost_fen=30000,
    ),
    entry(
        "hosp-b", "2026-11-21T01:00:00.000Z", "result.reordered", code="k", reason="fast-changing"
    ),
    entry("hosp-b", "2026-11-21T02:00:00.000Z", "access.decided", decision="permit"),
]


def test_savings_by_member_item_and_month() -> None:
    report = savings(ENTRIES, ZONE)
    assert report.exams_avoided == 4 and report.fen_saved == 61000
    # 2026-10-31T17:00Z is November 1st in UTC+08:00
    assert report.by(2) == [("2026-11", 4, 61000)]
    assert report.by(0) == [("hosp-b", 3, 31000), ("hosp-c", 1, 30000)]
    assert report.by(1) == [("ct-chest", 2, 60000), ("hgb", 2, 1000)]
    assert dict(report.reordered) == {("hosp-b", "fast-changing"): 1}
    assert yuan(report.fen_saved) == "610.00" and yuan(123456) == "1,234.56"


def test_savings_over_a_date_range() -> None:
    report = savings(ENTRIES, ZONE, date(2026, 11, 2), date(2026, 11, 19))
    assert report.exams_avoided == 2 and report.fen_saved == 1000
    assert report.to_json()["rows"] == [
        {
            "member": "hosp-b",
            "item": "hgb",
            "month": "2026-11",
            "exams_avoided": 2,
            "fen_saved": 1000,
        }
    ]
