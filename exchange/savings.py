"""What mutual recognition saved, computed from the ledger alone (docs/spec.md §17).

Every ``result.recognized`` entry is an exam a member did not repeat because it accepted a
recognised prior result, with the cost avoided in fen; every ``result.reordered`` is one it
repeated anyway, with the reason. The report counts both by member (the chain that recorded
it: the hospital that avoided or repeated the exam), by item and by month (in the
consortium's time zone), over an optional date range.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Any

RECOGNIZED = "result.recognized"
REORDERED = "result.reordered"
RESULT_TYPES = (RECOGNIZED, REORDERED)


@dataclass
class SavingsReport:
    start: date | None
    end: date | None
    avoided: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # member,item,month
    fen: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    reordered: Counter[tuple[str, str]] = field(default_factory=Counter)  # member, reason

    @property
    def exams_avoided(self) -> int:
        return sum(self.avoided.values())

    @property
    def fen_saved(self) -> int:
        return sum(self.fen.values())

    def by(self, position: int) -> list[tuple[str, int, int]]:
        """(key, exams avoided, fen saved) by member (0), item (1) or month (2), sorted."""
        counts: Counter[str] = Counter()
        money: Counter[str] = Counter()
        for key, count in self.avoided.items():
            counts[key[position]] += count
            money[key[position]] += self.fen[key]
        return sorted((key, counts[key], money[key]) for key in counts)

    def to_json(self) -> dict[str, Any]:
        return {
            "from": self.start.isoformat() if self.start else None,
            "to": self.end.isoformat() if self.end else None,
            "exams_avoided": self.exams_avoided,
            "fen_saved": self.fen_saved,
            "rows": [
                {
                    "member": member,
                    "item": item,
                    "month": month,
                    "exams_avoided": count,
                    "fen_saved": self.fen[(member, item, month)],
                }
                for (member, item, month), count in sorted(self.avoided.items())
            ],
            "reordered": [
                {"member": m, "reason": r, "exams": n}
                for (m, r), n in sorted(self.reordered.items())
            ],
        }


def month_of(time: str, zone: timezone) -> tuple[str, date]:
    moment = datetime.fromisoformat(time.replace("Z", "+00:00")).astimezone(zone)
    return moment.strftime("%Y-%m"), moment.date()


def savings(
    entries: Iterable[Mapping[str, Any]],
    zone: timezone,
    start: date | None = None,
    end: date | None = None,
) -> SavingsReport:
    """The report over ``entries`` (any entries: only the two result types count), from
    ``start`` to ``end`` inclusive."""
    report = SavingsReport(start, end)
    for entry in entries:
        if entry.get("type") not in RESULT_TYPES:
            continue
        month, day = month_of(str(entry["time"]), zone)
        if (start and day < start) or (end and day > end):
            continue
        body = entry["body"]
        member = str(entry["chain"])
        if entry["type"] == RECOGNIZED:
            key = (member, str(body.get("code", "?")), month)
            report.avoided[key] += 1
            cost = body.get("avoided_cost_fen")
            report.fen[key] += cost if type(cost) is int and cost >= 0 else 0
        else:
            report.reordered[(member, str(body.get("reason", "?")))] += 1
    return report


def yuan(fen: int) -> str:
    """Fen as yuan with two decimals: 28000 -> '280.00'."""
    return f"{fen // 100:,}.{fen % 100:02d}"
