"""HL7 v2 times (TS/DTM) read to FHIR dateTime and instant; without a zone they are China Standard
Time (UTC+08:00)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from fhir_adapters.hl7v2.errors import application_error

if TYPE_CHECKING:  # annotations only: these modules import this one
    from fhir_adapters.hl7v2.message import Segment


CHINA_TIME = timezone(timedelta(hours=8))
# -- times ------------------------------------------------------------------------------------

_TS = re.compile(
    r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,4}))?(?:([+-])(\d{2})(\d{2}))?"
)


@dataclass(frozen=True)
class Moment:
    moment: datetime  # with the sender's zone, or UTC+08:00 when it gave none
    digits: int  # 4 year, 6 month, 8 day, 10 hour, 12 minute, 14 second
    fraction: str

    def date_time(self) -> str:
        """A FHIR dateTime at the message's precision."""
        m = self.moment
        if self.digits <= 8:
            return m.strftime({4: "%Y", 6: "%Y-%m", 8: "%Y-%m-%d"}[self.digits])
        return self._with_time()

    def instant(self) -> str | None:
        """A FHIR instant (seconds and zone), or None when it is no more precise than a day."""
        return None if self.digits <= 8 else self._with_time()

    def _with_time(self) -> str:
        m = self.moment
        text = m.strftime("%Y-%m-%dT%H:%M:%S")
        if self.fraction:
            text += "." + self.fraction
        offset = m.utcoffset() or timedelta(0)
        minutes = int(offset.total_seconds() // 60)
        sign = "-" if minutes < 0 else "+"
        return text + f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def read_moment(text: str) -> Moment:
    """An HL7 TS/DTM (YYYY[MM[DD[HH[MM[SS[.S...]]]]]][+/-ZZZZ])."""
    match = _TS.fullmatch(text.strip())
    if match is None or (match.group(7) and not match.group(6)):
        raise ValueError(f"{text[:40]!r} is not an HL7 date/time (YYYYMMDDHHMMSS[+ZZZZ])")
    year, month, day, hour, minute, second, fraction, sign, zh, zm = match.groups()
    digits = 4 + sum(2 for g in (month, day, hour, minute, second) if g)
    zone: timezone = CHINA_TIME
    if sign:
        if int(zh) > 14 or int(zm) > 59:
            raise ValueError(f"{text[:40]!r}: time zone {sign}{zh}{zm} does not exist")
        offset = timedelta(hours=int(zh), minutes=int(zm))
        zone = timezone(-offset if sign == "-" else offset)
    try:
        moment = datetime(
            int(year),
            int(month or 1),
            int(day or 1),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            tzinfo=zone,
        )
    except ValueError as exc:
        raise ValueError(f"{text[:40]!r} is not a date/time: {exc}") from None
    return Moment(moment, digits, fraction or "")


def field_time(segment: Segment, number: int, component: int = 1) -> Moment | None:
    text = segment.value(number, component)
    if not text:
        return None
    try:
        return read_moment(text)
    except ValueError as exc:
        raise application_error(102, str(exc), segment.at(number)) from None


def instant_value(text: str) -> datetime:
    """A stored FHIR instant or dateTime as an aware datetime (for ordering versions)."""
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=CHINA_TIME)
