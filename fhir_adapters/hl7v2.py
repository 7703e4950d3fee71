"""HL7 v2 laboratory results (ORU^R01, v2.3 to v2.5.1) read and mapped to FHIR R4.

Pure: message bytes in, FHIR resource dicts and ACK bytes out; no database, no network (the
node stores what this makes: :mod:`node.intake.hl7`). In order:

* :func:`decode` finds the character set (MSH-18: ``UNICODE UTF-8``, ``GB 18030-2000`` and
  their usual spellings, ASCII, ISO 8859, Big5; empty means UTF-8, and a message that is not
  UTF-8 then is read as GB18030, with a note saying so);
* :func:`parse_message` splits it with the ``hl7`` package and checks the header: an
  ``ORU^R01`` of a supported version, with a control ID. What fails here is *rejected* (AR);
* :func:`read_results` maps it: PID to a Patient's identifiers and demographics, each OBR to a
  DiagnosticReport, each OBX to an Observation (LOINC or the hospital's local codes, UCUM
  units, reference ranges, abnormal flags, status, times, specimen, performing lab). What
  fails here is an *application error* (AE);
* :func:`build_ack` answers (MSA, and ERR with an HL7 table 0357 code), in the message's own
  separators and character set.

Identifier systems are made in one place, :class:`Systems`. Times without a zone are China
Standard Time (UTC+08:00). Everything refused is an :class:`Hl7Error` naming the field.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Literal
from urllib.parse import quote

import hl7  # type: ignore[import-untyped]

from consent.pseudonym import RESIDENT_ID_SYSTEM
from fhir_adapters.jsonio import number_problem
from fhir_adapters.ucum import UCUM_SYSTEM, to_ucum

SUPPORTED_VERSIONS = ("2.3", "2.3.1", "2.4", "2.5", "2.5.1")
CHINA_TIME = timezone(timedelta(hours=8))

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
V2_TABLE = "http://terminology.hl7.org/CodeSystem/v2-{:04d}"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
DATA_ABSENT = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
IDENTIFIER_TYPE = V2_TABLE.format(203)
SERVICE_SECTION = V2_TABLE.format(74)
ABNORMAL_FLAGS = V2_TABLE.format(78)

AckCode = Literal["AA", "AE", "AR"]

# HL7 table 0357, message error condition codes
ERROR_NAMES = {
    0: "Message accepted",
    100: "Segment sequence error",
    101: "Required field missing",
    102: "Data type error",
    103: "Table value not found",
    200: "Unsupported message type",
    201: "Unsupported event code",
    202: "Unsupported processing id",
    203: "Unsupported version id",
    204: "Unknown key identifier",
    205: "Duplicate key identifier",
    206: "Application record locked",
    207: "Application internal error",
}


# -- errors -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Location:
    """Where in a message: a segment (its n-th occurrence), a field and a component."""

    segment: str
    sequence: int = 1
    field: int | None = None
    component: int | None = None

    def __str__(self) -> str:
        text = self.segment if self.segment == "MSH" else f"{self.segment}[{self.sequence}]"
        if self.field is not None:
            text += f"-{self.field}"
            if self.component is not None:
                text += f".{self.component}"
        return text


class Hl7Error(Exception):
    """A message that cannot be taken in. ``ack_code`` AR: rejected, not understood as an
    ORU^R01 we accept; AE: understood, but it cannot be stored as it is. ``code`` is the HL7
    table 0357 code."""

    def __init__(
        self, ack_code: AckCode, code: int, text: str, location: Location | None = None
    ) -> None:
        super().__init__(text)
        self.ack_code = ack_code
        self.code = code
        self.text = text
        self.location = location
        # what the ACK answers, once the message's header and character set are known
        self.header: Header | None = None
        self.charset: Decoded | None = None

    @property
    def reason(self) -> str:
        """One line: the ACK code, the table 0357 code, where and what."""
        where = f"{self.location}: " if self.location else ""
        return f"{self.ack_code} {self.code} {where}{self.text}"

    def __str__(self) -> str:
        return self.reason


def _rejected(code: int, text: str, location: Location | None = None) -> Hl7Error:
    return Hl7Error("AR", code, text, location)


def _error(code: int, text: str, location: Location | None = None) -> Hl7Error:
    return Hl7Error("AE", code, text, location)


# -- character sets ---------------------------------------------------------------------------

# MSH-18 values (HL7 table 0211 and the spellings LIS vendors use), folded by _charset_key.
_CHARSETS = {
    "ASCII": "ascii",
    "USASCII": "ascii",
    "UNICODEUTF8": "utf-8",
    "UTF8": "utf-8",
    "GB18030": "gb18030",
    "GB180302000": "gb18030",
    "GB180302005": "gb18030",
    "GB180302022": "gb18030",
    "GBK": "gb18030",  # GBK and GB 2312 are subsets of GB 18030
    "GB2312": "gb18030",
    "CP936": "gb18030",
    "BIG5": "big5",
    **{f"8859{n}": f"iso8859-{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 15)},
    **{f"ISO8859{n}": f"iso8859-{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 15)},
}
CHARSET_NAMES = "UNICODE UTF-8, GB 18030-2000 (GB18030, GBK, GB2312), ASCII, 8859/n, BIG-5"


def _charset_key(name: str) -> str:
    return re.sub(r"[\s_\-/.]", "", name).upper()


def charset_codec(name: str) -> str | None:
    """The Python codec for an MSH-18 value, or None when it is not one we read."""
    return _CHARSETS.get(_charset_key(name))


@dataclass(frozen=True)
class Decoded:
    text: str
    codec: str  # the Python codec the message was read with (and its ACK is written in)
    declared: str  # MSH-18 as sent, "" when empty
    note: str | None = None  # set when the character set was not the one declared


_BOM = b"\xef\xbb\xbf"


def _msh18(first_line: str) -> str:
    """MSH-18's first repetition, from the MSH segment's text."""
    if len(first_line) < 8 or not first_line.startswith("MSH"):
        return ""
    separator = first_line[3]
    parts = first_line.split(separator)
    if len(parts) < 18:
        return ""
    encoding = parts[1]
    value = parts[17]
    for cut in encoding[:2]:  # component, repetition separators
        value = value.split(cut)[0]
    return value.strip()


def _first_line(data: bytes) -> bytes:
    return re.split(rb"[\r\n]", data, maxsplit=1)[0]


def decode(payload: bytes) -> Decoded:
    """The message as text, in the character set MSH-18 names (see the module's docstring)."""
    body = payload.removeprefix(_BOM)
    declared_guess = _msh18(_first_line(body).decode("latin-1"))
    order: list[str] = []
    guessed = charset_codec(declared_guess) if declared_guess else None
    if guessed:
        order.append(guessed)
    order += [codec for codec in ("utf-8", "gb18030") if codec not in order]
    failures: list[str] = []
    for codec in order:
        try:
            text = body.decode(codec)
        except UnicodeDecodeError as exc:
            failures.append(f"not {codec.upper()} (byte {exc.start})")
            continue
        declared = _msh18(re.split(r"[\r\n]", text, maxsplit=1)[0])
        if declared:
            wanted = charset_codec(declared)
            if wanted is None:
                raise _rejected(
                    103,
                    f"character set {declared!r} is not supported; use one of {CHARSET_NAMES}",
                    Location("MSH", field=18),
                )
            if wanted == codec:
                return Decoded(text, codec, declared)
            if wanted not in order:
                order.append(wanted)
            continue  # the text names another character set: try that one
        return _undeclared(body)
    named = declared_guess or "(empty: UTF-8)"
    raise _rejected(
        102,
        f"the bytes are not in the character set MSH-18 names, {named}: " + "; ".join(failures),
        Location("MSH", field=18),
    )


def _undeclared(body: bytes) -> Decoded:
    """A message whose MSH-18 is empty: UTF-8, else GB 18030 (with a note saying so)."""
    try:
        return Decoded(body.decode("utf-8"), "utf-8", "")
    except UnicodeDecodeError as exc:
        not_utf8 = exc.start
    try:
        text = body.decode("gb18030")
    except UnicodeDecodeError as exc:
        raise _rejected(
            102,
            f"MSH-18 is empty and the message is neither UTF-8 (byte {not_utf8}) nor GB 18030 "
            f"(byte {exc.start}); name its character set in MSH-18",
            Location("MSH", field=18),
        ) from None
    note = f"MSH-18 is empty and the message is not UTF-8 (byte {not_utf8}): read as GB18030"
    return Decoded(text, "gb18030", "", note)


# -- the header, as sent ----------------------------------------------------------------------

_DEFAULT_ENCODING = "^~\\&"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Header:
    """The MSH segment's fields as sent (escaped), enough to answer the message."""

    field_separator: str
    encoding: str  # MSH-2: component, repetition, escape, subcomponent
    fields: tuple[str, ...]  # fields[n] is MSH-n (n >= 3)

    def raw(self, number: int) -> str:
        return self.fields[number] if number < len(self.fields) else ""

    def component(self, number: int, component: int = 1) -> str:
        parts = self.raw(number).split(self.encoding[0])
        return parts[component - 1] if component <= len(parts) else ""

    @property
    def version(self) -> str:
        return self.component(12).strip()

    @classmethod
    def from_line(cls, line: str) -> Header | None:
        """The header of an MSH line, or None when the line is not one."""
        if len(line) < 8 or not line.startswith("MSH"):
            return None
        separator = line[3]
        if separator.isalnum() or separator.isspace() or _CONTROL.match(separator):
            return None
        parts = [_CONTROL.sub("", part) for part in line.split(separator)]
        encoding = parts[1]
        if not _valid_encoding(separator, encoding):
            encoding = _DEFAULT_ENCODING
        return cls(separator, encoding, ("MSH", separator, *parts[1:]))


def _valid_encoding(separator: str, encoding: str) -> bool:
    return (
        len(encoding) == 4
        and len(set(encoding + separator)) == 5
        and not any(c.isalnum() or c.isspace() or _CONTROL.match(c) for c in encoding)
    )


def read_header(payload: bytes) -> Header | None:
    """The MSH fields of bytes that may not be a readable message (best effort, to answer it)."""
    data = payload.removeprefix(_BOM).lstrip(b" \t\r\n")
    try:
        text = _first_line(data).decode(decode(data).codec)
    except Hl7Error:
        text = _first_line(data).decode("utf-8", errors="replace")
    return Header.from_line(text)


# -- the parsed message -----------------------------------------------------------------------

Component = tuple[str, ...]  # subcomponents
Repetition = tuple[Component, ...]
Field = tuple[Repetition, ...]

# hl7's unescaping maps highlighting to "_" and line breaks to "\r"; FHIR text wants neither
_UNESCAPE_MAP = {"H": "", "N": "", ".br": "\n", ".sp": "\n", ".ce": "\n", ".fi": "", ".nf": ""}
_SEGMENT_ID = re.compile(r"[A-Z][A-Z0-9]{2}")


@dataclass(frozen=True)
class Segment:
    name: str
    sequence: int  # which occurrence of this segment ID in the message, from 1
    fields: tuple[Field, ...]  # fields[n] is field n; fields[0] the segment ID

    def field(self, number: int) -> Field:
        return self.fields[number] if number < len(self.fields) else ()

    def repetitions(self, number: int) -> list[Repetition]:
        """The field's repetitions that hold anything."""
        return [rep for rep in self.field(number) if any(any(c) for c in rep)]

    def value(self, number: int, component: int = 1, subcomponent: int = 1) -> str:
        """One value of the field's first repetition, stripped ("" when absent)."""
        reps = self.field(number)
        return part(reps[0], component, subcomponent) if reps else ""

    def text(self, number: int) -> str:
        """The whole field as text: repetitions on lines, components joined by ``^``."""
        return "\n".join(_rep_text(rep) for rep in self.field(number)).strip()

    def at(self, number: int | None = None, component: int | None = None) -> Location:
        return Location(self.name, self.sequence, number, component)


def part(rep: Repetition, component: int, subcomponent: int = 1) -> str:
    if component > len(rep):
        return ""
    subs = rep[component - 1]
    return subs[subcomponent - 1].strip() if subcomponent <= len(subs) else ""


def _rep_text(rep: Repetition) -> str:
    return "^".join("&".join(subs) for subs in rep).rstrip("^&")


@dataclass(frozen=True)
class Hl7Message:
    """A decoded ORU^R01 whose header was checked."""

    segments: tuple[Segment, ...]
    header: Header
    charset: Decoded
    digest: str  # SHA-256 of the segments, MSH-7 (the time of sending) left out

    @property
    def msh(self) -> Segment:
        return self.segments[0]

    def named(self, name: str) -> list[Segment]:
        return [s for s in self.segments if s.name == name]

    @property
    def sending_application(self) -> str:
        return _hd_text(self.msh, 3)

    @property
    def sending_facility(self) -> str:
        return _hd_text(self.msh, 4)

    @property
    def control_id(self) -> str:
        return self.msh.value(10)

    @property
    def version(self) -> str:
        return self.msh.value(12)

    @property
    def key(self) -> str:
        """What identifies the message to its sender: application, facility, control ID."""
        key = f"{self.sending_application}|{self.sending_facility}|{self.control_id}"
        if len(key) > 255:
            return "sha256:" + hashlib.sha256(key.encode()).hexdigest()
        return key


def _hd_text(segment: Segment, number: int) -> str:
    reps = segment.field(number)
    return _rep_text(reps[0]).strip() if reps else ""


def _normalise(value: Any, message: Any) -> Field:
    """An ``hl7`` field as repetitions of components of subcomponents, unescaped."""

    escape_char = re.escape(message.esc)
    hex_escape = re.compile(f"{escape_char}X([^{escape_char}]*){escape_char}")
    repeated = re.compile(f"{escape_char}\\.[a-z]{{2}}([^{escape_char}]*){escape_char}")

    def leaf(text: Any) -> str:
        raw = str(text)
        if raw == '""':  # HL7's explicit null
            return ""
        if message.esc not in raw:
            return raw
        for digits in hex_escape.findall(raw):  # hl7 would log and drop a bad one
            if not re.fullmatch(r"(?:[0-9A-Fa-f]{2})+", digits):
                raise ValueError(f"\\X{digits[:20]}\\ is not a hexadecimal escape")
        for count in repeated.findall(raw):  # \.sp9999999\ would make a string that long
            if count and not (re.fullmatch(r"[+-]?\d{1,3}", count)):
                raise ValueError(f"formatting escape with a count of {count[:20]!r}")
        return str(message.unescape(raw, _UNESCAPE_MAP))

    def component(node: Any) -> Component:
        return tuple(leaf(sub) for sub in node)

    def repetition(node: Any) -> Repetition:
        if len(node) == 1 and isinstance(node[0], str):
            return ((leaf(node[0]),),)
        return tuple(component(c) for c in node)

    if len(value) == 1 and isinstance(value[0], str):
        return (((leaf(value[0]),),),)
    return tuple(repetition(r) for r in value)


def message_lines(text: str) -> list[str]:
    """A message's segments: lines split on CR, LF or CRLF, blank ones dropped."""
    return [line.rstrip(" \t") for line in re.split(r"\r\n|\r|\n", text) if line.strip()]


_MLLP_FRAME = re.compile(rb"\x0b(.*?)\x1c\r?", re.DOTALL)
_BATCH_SEGMENTS = (b"FHS", b"BHS", b"BTS", b"FTS")


def split_messages(data: bytes) -> list[bytes]:
    """The messages in a file: MLLP frames, or text whose segments end in CR, LF or CRLF, each
    message starting at an MSH (batch envelopes FHS/BHS/BTS/FTS dropped). Lines before the
    first MSH make a message of their own, so that they are refused and kept, not lost.

    Splitting bytes is safe before decoding: CR and LF never occur inside a UTF-8 or GB18030
    character."""
    if b"\x0b" in data and b"\x1c" in data:
        return [frame for frame in _MLLP_FRAME.findall(data) if frame.strip()]
    messages: list[list[bytes]] = []
    for line in re.split(rb"\r\n|\r|\n", data.removeprefix(_BOM)):
        if not line.strip() or line[:3] in _BATCH_SEGMENTS:
            continue
        if line.startswith(b"MSH") or not messages:
            messages.append([])
        messages[-1].append(line)
    return [b"\r".join(lines) + b"\r" for lines in messages]


def parse_message(payload: bytes) -> Hl7Message:
    """Decode and split one message and check its header (an ORU^R01 we take in)."""
    body = payload.removeprefix(_BOM).lstrip(b" \t\r\n")
    if not body.startswith(b"MSH"):
        shown = body[:20].decode("utf-8", errors="replace")
        raise _rejected(100, f"the message does not start with an MSH segment but {shown!r}")
    decoded = decode(body)
    lines = message_lines(decoded.text)
    header = Header.from_line(lines[0])
    if header is None:
        raise _rejected(
            102,
            "MSH-1 must be one separator character, not a letter, digit or space",
            Location("MSH", field=1),
        )
    encoding = lines[0][4 : lines[0].find(header.field_separator, 4)]
    if lines[0].find(header.field_separator, 4) < 0 or not _valid_encoding(
        header.field_separator, encoding
    ):
        raise _rejected(
            102,
            f"MSH-2 must be four distinct encoding characters such as ^~\\&, not {encoding!r}",
            Location("MSH", field=2),
        )
    try:
        return _checked(_split(lines, header, decoded))
    except Hl7Error as error:
        error.header, error.charset = header, decoded
        raise


def _split(lines: list[str], header: Header, decoded: Decoded) -> Hl7Message:
    for number, line in enumerate(lines, 1):
        name = line[:3]
        if not _SEGMENT_ID.fullmatch(name) or (len(line) > 3 and line[3] != header.field_separator):
            raise _rejected(
                100,
                f"line {number} does not start with a segment ID and field separator: "
                f"{line[:12]!r}",
            )
        if number > 1 and name == "MSH":
            raise _rejected(100, f"line {number} starts a second message: send one per frame")
    try:
        parsed = hl7.parse("\r".join(lines))
    except Exception as exc:  # the package raises what it meets; every failure is a reject
        raise _rejected(100, f"not an HL7 message: {type(exc).__name__}: {exc}") from None
    counts: dict[str, int] = {}
    segments = []
    for raw in parsed:
        name = str(raw[0][0]) if raw and raw[0] else ""
        counts[name] = counts.get(name, 0) + 1
        fields: list[Field] = []
        for number, value in enumerate(raw):
            if name == "MSH" and number in (1, 2):
                fields.append((((str(value[0]),),),))
                continue
            try:
                fields.append(_normalise(value, parsed))
            except Exception as exc:  # a malformed escape sequence
                raise _error(
                    102,
                    f"bad escape sequence ({type(exc).__name__}: {exc})",
                    Location(name, counts[name], number),
                ) from None
        segments.append(Segment(name, counts[name], tuple(fields)))
    digest_lines = [header.field_separator.join(_without_msh7(lines[0], header)), *lines[1:]]
    digest = hashlib.sha256("\r".join(digest_lines).encode("utf-8")).hexdigest()
    return Hl7Message(tuple(segments), header, decoded, digest)


def _without_msh7(line: str, header: Header) -> list[str]:
    parts = line.split(header.field_separator)
    if len(parts) > 6:
        parts[6] = ""
    return parts


def _checked(message: Hl7Message) -> Hl7Message:
    msh = message.msh
    code, trigger = msh.value(9, 1), msh.value(9, 2)
    if not code:
        raise _rejected(101, "the message type is missing", msh.at(9))
    if code != "ORU":
        raise _rejected(
            200,
            f"message type {code}^{trigger} is not taken in: only ORU^R01 (lab results)",
            msh.at(9, 1),
        )
    if trigger != "R01":
        raise _rejected(201, f"event {code}^{trigger} is not taken in: only ORU^R01", msh.at(9, 2))
    if not message.control_id:
        raise _rejected(101, "the message control ID is missing", msh.at(10))
    processing = msh.value(11)
    if not processing:
        raise _rejected(101, "the processing ID is missing (P for production)", msh.at(11))
    if processing != "P":
        raise _rejected(
            202,
            f"processing ID {processing!r} is not taken in: only P (production) results are "
            "stored; send training (T) and debugging (D) messages to a test node",
            msh.at(11),
        )
    version = message.version
    if not version:
        raise _rejected(101, "the version ID is missing", msh.at(12))
    if version not in SUPPORTED_VERSIONS:
        raise _rejected(
            203,
            f"version {version!r} is not supported (" + ", ".join(SUPPORTED_VERSIONS) + ")",
            msh.at(12),
        )
    sent = msh.value(7)
    if not sent:
        raise _rejected(101, "the date/time of the message is missing", msh.at(7))
    try:
        _moment(sent)
    except ValueError as exc:
        raise _rejected(102, str(exc), msh.at(7)) from None
    return message


# -- times ------------------------------------------------------------------------------------

_TS = re.compile(
    r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,4}))?(?:([+-])(\d{2})(\d{2}))?"
)


@dataclass(frozen=True)
class _Moment:
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


def _moment(text: str) -> _Moment:
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
    return _Moment(moment, digits, fraction or "")


def _date_time(segment: Segment, number: int, component: int = 1) -> _Moment | None:
    text = segment.value(number, component)
    if not text:
        return None
    try:
        return _moment(text)
    except ValueError as exc:
        raise _error(102, str(exc), segment.at(number)) from None


def instant_value(text: str) -> datetime:
    """A stored FHIR instant or dateTime as an aware datetime (for ordering versions)."""
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=CHINA_TIME)


# -- identifier systems -----------------------------------------------------------------------


@dataclass(frozen=True)
class Systems:
    """The identifier and code systems this node gives what its LIS sends (one place).

    ``node_id`` scopes every local system: ``urn:hrx:member:<node_id>:...``."""

    node_id: str
    match_system: str = RESIDENT_ID_SYSTEM  # consent.identifier_system: members match by it

    def _urn(self, *parts: str) -> str:
        return ":".join(["urn:hrx:member", self.node_id, *parts])

    @property
    def mrn(self) -> str:
        """Medical record numbers (PID-3 of type MR, or untyped)."""
        return self._urn("mrn")

    def patient_id(self, id_type: str) -> str:
        """Other PID-3 identifiers, by their HL7 table 0203 type (PI, PT, AN...)."""
        return self._urn("patient-id", _urn_part(id_type.lower()))

    def local_codes(self, coding_system: str) -> str:
        """The LIS's own codes (OBX-3, OBR-4, units, coded values): coding system L, 99xxx,
        or empty; a named local system gets its own."""
        name = coding_system.strip()
        if name.upper() in ("", "L", "LOCAL", "LN99", "99LOCAL"):
            return self._urn("lis")
        return self._urn("lis", _urn_part(name.lower()))

    def filler_orders(self, namespace: str) -> str:
        """Filler order numbers (OBR-3) of one filler application (its namespace)."""
        return self._urn("lis-order", _urn_part(namespace))

    def placer_orders(self, namespace: str) -> str:
        """Placer order numbers (OBR-2) of one placer application."""
        return self._urn("his-order", _urn_part(namespace))

    def results(self, namespace: str) -> str:
        """Observations: ``<filler order>/<OBX-3 code>[/<OBX-4 sub-ID>]`` of one filler."""
        return self._urn("lis-result", _urn_part(namespace))

    @property
    def specimens(self) -> str:
        return self._urn("lis-specimen")

    @property
    def labs(self) -> str:
        """Performing laboratories named by a local identifier (OBX-23.10, OBX-15)."""
        return self._urn("lab")


def _urn_part(text: str) -> str:
    return quote(text.strip() or "-", safe="-._~")


def resource_id(system: str, value: str) -> str:
    """A stable FHIR id for what an identifier names (the same message twice, the same id)."""
    return "lis-" + hashlib.sha256(f"{system}|{value}".encode()).hexdigest()[:40]


# -- codes ------------------------------------------------------------------------------------

_CODING_SYSTEMS = {
    "LN": LOINC,
    "LOINC": LOINC,
    "SCT": SNOMED,
    "SNOMEDCT": SNOMED,
    "UCUM": UCUM_SYSTEM,
    "I10": "http://hl7.org/fhir/sid/icd-10",
}


def _code(text: str) -> str:
    """A FHIR code: no leading, trailing or doubled white space."""
    return " ".join(text.split())


def coding_system(name: str, systems: Systems) -> str:
    key = re.sub(r"[\s\-_]", "", name).upper()
    if key in _CODING_SYSTEMS:
        return _CODING_SYSTEMS[key]
    table = re.fullmatch(r"HL7(\d{4})", key)
    if table:
        return V2_TABLE.format(int(table.group(1)))
    return systems.local_codes(name)


def _coding(code: str, display: str, system_name: str, systems: Systems) -> dict[str, Any]:
    coding: dict[str, Any] = {"system": coding_system(system_name, systems), "code": _code(code)}
    if display:
        coding["display"] = display
    return coding


def codeable_concept(rep: Repetition, systems: Systems) -> dict[str, Any] | None:
    """A CE/CWE/CNE (identifier^text^system^alt identifier^alt text^alt system^^^original text)
    as a CodeableConcept; None when it holds nothing."""
    codings = []
    for first in (1, 4):
        code = _code(part(rep, first))
        if code:
            coding = _coding(code, part(rep, first + 1), part(rep, first + 2), systems)
            if coding not in codings:
                codings.append(coding)
    text = part(rep, 9) or part(rep, 2) or part(rep, 5)
    concept: dict[str, Any] = {}
    if codings:
        concept["coding"] = codings
    if text:
        concept["text"] = text
    return concept or None


# -- the results of one message ---------------------------------------------------------------


@dataclass
class PatientData:
    """What PID says about the patient."""

    segment: Segment
    identifiers: list[dict[str, Any]]
    match_keys: list[tuple[str, str]]  # (system, value) an existing Patient is found by
    resident_id: str | None
    demographics: dict[str, Any]  # name, telecom, gender, birthDate, address


@dataclass
class ResultData:
    """One OBX as an Observation, but for its subject."""

    segment: Segment
    resource_id: str
    identifier: dict[str, Any]
    status: str
    hl7_status: str  # OBX-11 as sent
    elements: dict[str, Any]  # the Observation's elements after subject, in order
    issued: str

    def observation(self, patient: str) -> dict[str, Any]:
        resource: dict[str, Any] = {"resourceType": "Observation", "id": self.resource_id}
        specimen = self.elements.get("specimen")
        if specimen is not None:
            resource["contained"] = [specimen]
        resource["identifier"] = [self.identifier]
        resource["status"] = self.status
        resource["category"] = [
            {
                "coding": [
                    {"system": OBSERVATION_CATEGORY, "code": "laboratory", "display": "Laboratory"}
                ]
            }
        ]
        resource["code"] = self.elements["code"]
        resource["subject"] = {"reference": f"Patient/{patient}"}
        for name, value in self.elements.items():
            if name not in ("code", "specimen"):
                resource[name] = value
        if specimen is not None:
            resource["specimen"] = {"reference": "#specimen"}
        return resource


@dataclass
class OrderData:
    """One OBR and its OBX segments: a DiagnosticReport and its Observations."""

    segment: Segment
    resource_id: str
    identifiers: list[dict[str, Any]]
    status: str
    code: dict[str, Any]
    category: list[dict[str, Any]]
    effective: str | None
    issued: str
    performer: dict[str, Any] | None
    specimen: dict[str, Any] | None
    results: list[ResultData] = field(default_factory=list)

    def report(self, patient: str) -> dict[str, Any]:
        resource: dict[str, Any] = {"resourceType": "DiagnosticReport", "id": self.resource_id}
        if self.specimen is not None:
            resource["contained"] = [self.specimen]
        resource["identifier"] = self.identifiers
        resource["status"] = self.status
        resource["category"] = self.category
        resource["code"] = self.code
        resource["subject"] = {"reference": f"Patient/{patient}"}
        if self.effective:
            resource["effectiveDateTime"] = self.effective
        resource["issued"] = self.issued
        if self.performer:
            resource["performer"] = [self.performer]
        if self.specimen is not None:
            resource["specimen"] = [{"reference": "#specimen"}]
        if self.results:
            resource["result"] = [
                {"reference": f"Observation/{result.resource_id}"} for result in self.results
            ]
        return resource


@dataclass
class PatientResults:
    """One PATIENT_RESULT group: the patient and the orders reported for them."""

    patient: PatientData
    orders: list[OrderData]


@dataclass
class _OrderSegments:
    """The segments of one ORDER_OBSERVATION group."""

    obr: Segment
    orc: Segment | None  # the ORC just before the OBR
    results: list[tuple[Segment, list[Segment]]] = field(default_factory=list)  # OBX, NTEs
    specimens: list[Segment] = field(default_factory=list)


def read_results(message: Hl7Message, systems: Systems) -> list[PatientResults]:
    """Map a parsed ORU^R01 to what will be stored; AE (or AR for a broken segment order)
    naming the field when it cannot be."""
    groups: list[tuple[Segment | None, list[_OrderSegments]]] = []
    notes: list[Segment] | None = None  # where an NTE goes: the latest OBX's notes
    orc: Segment | None = None
    in_specimen = False
    for segment in message.segments[1:]:
        if segment.name == "PID":
            groups.append((segment, []))
            notes, orc = None, None
        elif segment.name == "ORC":
            orc = segment
        elif segment.name == "OBR":
            if not groups:
                groups.append((None, []))
            groups[-1][1].append(_OrderSegments(segment, orc))
            notes, orc, in_specimen = None, None, False
        elif segment.name == "OBX":
            if not groups or not groups[-1][1]:
                raise _rejected(100, "an OBX comes before any OBR", segment.at())
            if in_specimen:
                continue  # an observation about the specimen (SPM group): not a result
            notes = []
            groups[-1][1][-1].results.append((segment, notes))
        elif segment.name == "NTE":
            if notes is not None:
                notes.append(segment)
        elif segment.name == "SPM":
            if not groups or not groups[-1][1]:
                raise _rejected(100, "an SPM comes before any OBR", segment.at())
            groups[-1][1][-1].specimens.append(segment)
            notes, in_specimen = None, True
    if not any(orders for _, orders in groups):
        raise _rejected(100, "the message holds no OBR segment: no results to store")
    results: list[PatientResults] = []
    seen_orders: dict[str, Segment] = {}
    for pid, orders in groups:
        if pid is None:
            raise _error(101, "no PID segment: the results name no patient", Location("PID"))
        patient = read_patient(pid, systems)
        mapped = []
        for segments in orders:
            order = _order(message, segments, systems)
            if order.resource_id in seen_orders:
                raise _error(
                    205,
                    f"repeats the filler order number of {seen_orders[order.resource_id].at(3)}",
                    segments.obr.at(3),
                )
            seen_orders[order.resource_id] = segments.obr
            mapped.append(order)
        results.append(PatientResults(patient, mapped))
    return results


# -- patients ---------------------------------------------------------------------------------

_RESIDENT_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")


def masked(value: str) -> str:
    """An identifier as messages and logs show it: its last four characters."""
    return "…" + value[-4:] if len(value) > 4 else "…"


def resident_id_problem(value: str) -> str | None:
    """Why ``value`` is not a resident identity card number (GB 11643), or None."""
    if re.fullmatch(r"\d{15}", value):
        return None  # the first-generation card: no check character
    if not re.fullmatch(r"\d{17}[\dX]", value):
        return "is not 18 characters (17 digits and a digit or X) nor 15 digits"
    total = sum(int(c) * w for c, w in zip(value[:17], _RESIDENT_WEIGHTS, strict=True))
    if "10X98765432"[total % 11] != value[17]:
        return "fails its check character (GB 11643)"
    return None


def _is_resident(id_type: str, authority_text: str) -> bool:
    if id_type.upper() == "NNCHN":
        return True
    if id_type.upper() == "NN" and "CHN" in authority_text.upper():
        return True
    return "2.16.156.10011.1.3" in authority_text or "身份证" in authority_text


def _identifier(
    rep: Repetition, segment: Segment, number: int, systems: Systems
) -> tuple[dict[str, Any], str] | None:
    """A CX as a FHIR Identifier and its kind: resident, mrn, oid or other."""
    value = part(rep, 1)
    if not value:
        return None
    id_type = part(rep, 5)
    authority = rep[3] if len(rep) > 3 else ()
    authority_text = "&".join(authority)
    universal, universal_type = (
        (authority[1].strip() if len(authority) > 1 else ""),
        (authority[2].strip() if len(authority) > 2 else ""),
    )
    identifier: dict[str, Any] = {}
    if _is_resident(id_type, authority_text):
        value = value.upper()
        problem = resident_id_problem(value)
        if problem:
            raise _error(102, f"resident ID {masked(value)} {problem}", segment.at(number))
        identifier["use"] = "official"
        identifier["type"] = {
            "coding": [{"system": IDENTIFIER_TYPE, "code": "NNCHN"}],
            "text": "居民身份证号",
        }
        identifier["system"] = RESIDENT_ID_SYSTEM
        kind = "resident"
    elif _OID.fullmatch(universal) and universal_type.upper() in ("ISO", ""):
        identifier["system"] = f"urn:oid:{universal}"
        kind = "oid"
    elif id_type.upper() in ("MR", ""):
        identifier["type"] = {"coding": [{"system": IDENTIFIER_TYPE, "code": "MR"}]}
        identifier["system"] = systems.mrn
        kind = "mrn"
    else:
        identifier["system"] = systems.patient_id(id_type)
        kind = "other"
    if kind in ("oid", "other") and id_type:
        identifier["type"] = {"coding": [{"system": IDENTIFIER_TYPE, "code": _code(id_type)}]}
    identifier["value"] = value
    return identifier, kind


_NAME_USE = {
    "L": "official",
    "D": "usual",
    "A": "nickname",
    "N": "nickname",
    "M": "maiden",
    "B": "old",
    "S": "anonymous",
    "T": "temp",
}
_GENDER = {"M": "male", "F": "female", "O": "other", "A": "other", "U": "unknown", "N": "unknown"}
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


def _human_name(rep: Repetition) -> dict[str, Any] | None:
    family, given, middle = part(rep, 1), part(rep, 2), part(rep, 3)
    suffix, prefix = part(rep, 4), part(rep, 5)
    if not (family or given):
        return None
    name: dict[str, Any] = {"use": _NAME_USE.get(part(rep, 7).upper(), "official")}
    givens = [g for g in (given, middle) if g]
    if _CJK.search(family + given):
        name["text"] = family + "".join(givens)
    else:
        name["text"] = " ".join([*givens, family]).strip()
    if family:
        name["family"] = family
    if givens:
        name["given"] = givens
    if prefix:
        name["prefix"] = [prefix]
    if suffix:
        name["suffix"] = [suffix]
    return name


def _telecoms(segment: Segment, number: int, work: bool) -> list[dict[str, Any]]:
    found = []
    for rep in segment.repetitions(number):
        use_code, equipment = part(rep, 2).upper(), part(rep, 3).upper()
        email = part(rep, 4)
        if use_code == "NET" or equipment in ("INTERNET", "X.400") or (email and not part(rep, 1)):
            if email:
                found.append({"system": "email", "value": email, "use": "work" if work else "home"})
            continue
        number_text = part(rep, 1) or part(rep, 12) or (part(rep, 6) + part(rep, 7))
        if not number_text:
            continue
        contact: dict[str, Any] = {"system": "fax" if equipment == "FX" else "phone"}
        contact["value"] = number_text
        contact["use"] = "mobile" if equipment == "CP" else ("work" if work else "home")
        found.append(contact)
    return found


_ADDRESS_USE = {"H": "home", "B": "work", "O": "work", "C": "temp", "BA": "billing"}


def _addresses(segment: Segment) -> list[dict[str, Any]]:
    found = []
    for rep in segment.repetitions(11):
        address: dict[str, Any] = {}
        use = _ADDRESS_USE.get(part(rep, 7).upper())
        if use:
            address["use"] = use
        lines = [line for line in (part(rep, 1), part(rep, 2)) if line]
        if lines:
            address["line"] = lines
        for component, element in ((3, "city"), (9, "district"), (4, "state"), (5, "postalCode")):
            if part(rep, component):
                address[element] = part(rep, component)
        if part(rep, 6):
            address["country"] = part(rep, 6)
        if any(k != "use" for k in address):
            found.append(address)
    return found


def read_patient(pid: Segment, systems: Systems) -> PatientData:
    identifiers: list[dict[str, Any]] = []
    keys: list[tuple[str, str]] = []
    resident = None
    for number in (3, 2):  # PID-2 (v2.3's external ID) only when PID-3 holds none
        if identifiers:
            break
        for rep in pid.repetitions(number):
            made = _identifier(rep, pid, number, systems)
            if made is None:
                continue
            identifier, kind = made
            key = (identifier["system"], identifier["value"])
            if key in keys:
                continue
            identifiers.append(identifier)
            keys.append(key)
            if kind == "resident":
                if resident is not None and resident != identifier["value"]:
                    raise _error(
                        102,
                        f"two different resident IDs ({masked(resident)}, "
                        f"{masked(identifier['value'])}) for one patient",
                        pid.at(3),
                    )
                resident = identifier["value"]
    if not identifiers:
        raise _error(101, "no patient identifier (PID-3): the results name no patient", pid.at(3))
    match_keys = [
        key
        for key, identifier in zip(keys, identifiers, strict=True)
        if key[0] in (RESIDENT_ID_SYSTEM, systems.mrn, systems.match_system)
        or key[0].startswith("urn:oid:")
    ]
    demographics: dict[str, Any] = {}
    names = [n for n in (_human_name(rep) for rep in pid.repetitions(5)) if n]
    if names:
        demographics["name"] = names
    telecom = _telecoms(pid, 13, work=False) + _telecoms(pid, 14, work=True)
    if telecom:
        demographics["telecom"] = telecom
    sex = pid.value(8).upper()
    if sex:
        demographics["gender"] = _GENDER.get(sex, "unknown")
    born = _date_time(pid, 7)
    if born is not None:
        demographics["birthDate"] = born.moment.strftime(
            {4: "%Y", 6: "%Y-%m"}.get(born.digits, "%Y-%m-%d")
        )
    addresses = _addresses(pid)
    if addresses:
        demographics["address"] = addresses
    return PatientData(pid, identifiers, match_keys, resident, demographics)


def new_patient(data: PatientData) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": data.identifiers,
        "active": True,
        **data.demographics,
    }


def merged_patient(existing: dict[str, Any], data: PatientData) -> dict[str, Any]:
    """An existing Patient updated as PID says: identifiers added; names, phones and addresses
    replaced where PID gives one of the same use; gender and birth date set; the rest kept.
    Nothing is made worse than another source stored it: a name that is the same name with
    less structure (张三 as family alone where 张 / 三 was stored), a birth date that is the
    same date less precisely (1985 for 1985-03-12), and an unknown gender keep what was
    stored."""
    patient = {k: v for k, v in existing.items() if k != "meta"}
    have = {(i.get("system"), i.get("value")) for i in patient.get("identifier", [])}
    added = [i for i in data.identifiers if (i["system"], i["value"]) not in have]
    if added:
        patient["identifier"] = [*patient.get("identifier", []), *added]
    new = data.demographics
    for element, same in (
        ("name", lambda a, b: a.get("use") == b.get("use")),
        (
            "telecom",
            lambda a, b: (a.get("system"), a.get("use")) == (b.get("system"), b.get("use")),
        ),
        ("address", lambda a, b: a.get("use") == b.get("use")),
    ):
        if element in new:
            stored = patient.get(element, [])
            fresh = [
                next((old for old in stored if _better_name(old, item)), item)
                if element == "name"
                else item
                for item in new[element]
            ]
            kept = [old for old in stored if not any(same(old, item) for item in fresh)]
            patient[element] = [*fresh, *kept]
    if "gender" in new and not (new["gender"] == "unknown" and patient.get("gender")):
        patient["gender"] = new["gender"]
    if "birthDate" in new:
        known = str(patient.get("birthDate", ""))
        if not (len(known) > len(new["birthDate"]) and known.startswith(new["birthDate"])):
            patient["birthDate"] = new["birthDate"]
    return patient


def _name_text(name: dict[str, Any]) -> str:
    whole = name.get("text") or str(name.get("family", "")) + "".join(name.get("given", []))
    return "".join(str(whole).split())


def _better_name(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether a stored name is the same name as a new one, of the same use (or of none),
    with more of its parts told apart (family and given)."""
    return (
        old.get("use") in (None, new.get("use"))
        and _name_text(old) == _name_text(new)
        and _name_parts(old) > _name_parts(new)
    )


def _name_parts(name: dict[str, Any]) -> int:
    return int(bool(name.get("family"))) + int(bool(name.get("given")))


# -- orders and results -----------------------------------------------------------------------

_RESULT_STATUS = {
    "C": "corrected",
    "D": "entered-in-error",
    "F": "final",
    "I": "registered",
    "N": "cancelled",
    "O": "registered",
    "P": "preliminary",
    "R": "preliminary",
    "S": "preliminary",
    "U": "final",
    "W": "entered-in-error",
    "X": "cancelled",
}
_REPORT_STATUS = {
    "O": "registered",
    "I": "registered",
    "S": "registered",
    "A": "partial",
    "P": "preliminary",
    "R": "preliminary",
    "C": "corrected",
    "F": "final",
    "X": "cancelled",
    "Y": "unknown",
    "Z": "unknown",
}
_SECTIONS = {
    "AU": "Audiology",
    "BG": "Blood Gases",
    "BLB": "Blood Bank",
    "CH": "Chemistry",
    "CP": "Cytopathology",
    "CUS": "Cardiac Ultrasound",
    "HM": "Hematology",
    "ICU": "Bedside ICU Monitoring",
    "IMM": "Immunology",
    "LAB": "Laboratory",
    "MB": "Microbiology",
    "MCB": "Mycobacteriology",
    "MYC": "Mycology",
    "OSL": "Outside Lab",
    "OTH": "Other",
    "PAT": "Pathology (gross & histopath, not surgical)",
    "PHR": "Pharmacy",
    "SP": "Surgical Pathology",
    "SR": "Serology",
    "TX": "Toxicology",
    "URN": "Urinalysis",
    "VR": "Virology",
}
_INTERPRETATIONS = {
    "L": "Low",
    "H": "High",
    "LL": "Critical low",
    "HH": "Critical high",
    "LU": "Significantly low",
    "HU": "Significantly high",
    "<": "Off scale low",
    ">": "Off scale high",
    "N": "Normal",
    "A": "Abnormal",
    "AA": "Critical abnormal",
    "U": "Significant change up",
    "D": "Significant change down",
    "B": "Better",
    "W": "Worse",
    "S": "Susceptible",
    "R": "Resistant",
    "I": "Intermediate",
    "MS": "moderately susceptible",
    "VS": "very susceptible",
    "POS": "Positive",
    "NEG": "Negative",
    "IND": "Indeterminate",
    "DET": "Detected",
    "ND": "Not detected",
    "E": "Equivocal",
    "NR": "Non-reactive",
    "RR": "Reactive",
    "WR": "Weakly reactive",
}
# arrows Chinese LIS print for high and low
_ARROWS = {"↑": "H", "↓": "L", "↑↑": "HH", "↓↓": "LL"}
_NUMBER = re.compile(r"\s*(<=|>=|<|>|≤|≥)?\s*([+-])?(\d*)(?:\.(\d*))?\s*")
_COMPARATORS = {"≤": "<=", "≥": ">="}
_RANGE = re.compile(r"\s*(-?\d+(?:\.\d+)?)\s*(?:-|~|～|—|–|至)\s*(-?\d+(?:\.\d+)?)\s*")
_BOUND = re.compile(r"\s*(<=|>=|<|>|≤|≥|＜|＞)\s*(-?\d+(?:\.\d+)?)\s*")
_TEXT_TYPES = {"ST", "TX", "FT", "ID", "IS"}
_CODED_TYPES = {"CE", "CWE", "CNE", "CF"}
VALUE_TYPES = ("NM", "SN", *sorted(_TEXT_TYPES), *sorted(_CODED_TYPES), "DT", "TS", "DTM", "TM")


def _decimal(integer: str, fraction: str | None, sign: str | None) -> Decimal:
    digits = (integer.lstrip("0") or "0") + (f".{fraction}" if fraction else "")
    return Decimal(("-" if sign == "-" else "") + digits)


def number(text: str) -> tuple[Decimal, str | None] | None:
    """An HL7 NM (optionally after <, <=, >, >=) as an exact decimal and FHIR comparator."""
    match = _NUMBER.fullmatch(text)
    if match is None:
        return None
    comparator, sign, integer, fraction = match.groups()
    if not integer and not fraction:
        return None
    return _decimal(integer, fraction, sign), _COMPARATORS.get(comparator or "", comparator)


def _plain_decimal(text: str) -> Decimal:
    parsed = number(text)
    assert parsed is not None
    return parsed[0]


def _storable(value: Decimal, segment: Segment, field_number: int) -> Decimal:
    """A number read from a field, or AE 102 naming the field when it is one JSON clients
    could not read (:func:`fhir_adapters.jsonio.number_problem`)."""
    problem = number_problem(value)
    if problem:
        raise _error(102, problem, segment.at(field_number))
    return value


@dataclass(frozen=True)
class Unit:
    text: str  # as the lab wrote it
    ucum: str | None

    def quantity(self, value: Decimal) -> dict[str, Any]:
        quantity: dict[str, Any] = {"value": value}
        if self.text:
            quantity["unit"] = self.text
        if self.ucum:
            quantity["system"] = UCUM_SYSTEM
            quantity["code"] = self.ucum
        return quantity


def _unit(obx: Segment) -> Unit:
    code, text, system = obx.value(6, 1), obx.value(6, 2), obx.value(6, 3)
    if re.fullmatch(r"[x×*]?10", code) and re.fullmatch(r"\d{1,2}/\S+", text):
        # "10^9/L" sent unescaped: its "^" split the unit into components
        return Unit(f"{code}^{text}", to_ucum(f"{code}^{text}"))
    if system.upper() == "UCUM" and code:
        return Unit(text or code, code)
    shown = code or text
    ucum = to_ucum(code) if code else None
    if ucum is None and text:
        ucum = to_ucum(text)
    return Unit(shown, ucum)


def _value(obx: Segment, unit: Unit, systems: Systems) -> tuple[str, Any] | None:
    """OBX-5 as a FHIR value[x] by OBX-2, or None when empty."""
    value_type = obx.value(2).upper()
    reps = obx.repetitions(5)
    if not reps:
        return None
    if not value_type:
        raise _error(101, "OBX-5 holds a value but OBX-2 gives no value type", obx.at(2))
    if value_type not in VALUE_TYPES:
        raise _error(
            102,
            f"value type {value_type!r} is not supported (" + ", ".join(VALUE_TYPES) + ")",
            obx.at(2),
        )
    if value_type in _TEXT_TYPES:
        return "valueString", obx.text(5)
    if len(reps) > 1:
        raise _error(102, f"a {value_type} value does not repeat", obx.at(5))
    rep = reps[0]
    if value_type == "NM":
        parsed = number(_rep_text(rep))
        if parsed is None:
            raise _error(102, f"{_rep_text(rep)[:40]!r} is not a number (OBX-2 NM)", obx.at(5))
        value = _storable(parsed[0], obx, 5)
        quantity = unit.quantity(value)
        if parsed[1]:
            quantity = {"value": value, "comparator": parsed[1], **quantity}
        return "valueQuantity", quantity
    if value_type == "SN":
        return _structured_numeric(obx, rep, unit)
    if value_type in _CODED_TYPES:
        concept = codeable_concept(rep, systems)
        return ("valueCodeableConcept", concept) if concept else None
    if value_type == "TM":
        match = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(?:\.\d{1,4})?(?:[+-]\d{4})?", part(rep, 1))
        if match is None or int(match.group(1)) > 23 or int(match.group(2) or 0) > 59:
            raise _error(102, f"{part(rep, 1)[:40]!r} is not an HL7 time (HHMMSS)", obx.at(5))
        hour, minute, second = (g or "00" for g in match.groups())
        if int(second) > 59:
            raise _error(102, f"{part(rep, 1)[:40]!r} is not an HL7 time", obx.at(5))
        return "valueTime", f"{hour}:{minute}:{second}"
    moment = _date_time(obx, 5)
    assert moment is not None
    return "valueDateTime", moment.date_time()


def _structured_numeric(obx: Segment, rep: Repetition, unit: Unit) -> tuple[str, Any]:
    """SN: comparator ^ number ^ separator/suffix ^ number."""
    comparator, first, separator, second = (part(rep, n) for n in (1, 2, 3, 4))
    bad = _error(102, f"{_rep_text(rep)[:40]!r} is not a structured numeric (SN)", obx.at(5))
    one = number(first) if first else None
    two = number(second) if second else None
    if (first and (one is None or one[1])) or (second and (two is None or two[1])):
        raise bad
    for parsed in (one, two):
        if parsed is not None:
            _storable(parsed[0], obx, 5)
    if one is not None and not separator and two is None:
        quantity = unit.quantity(one[0])
        if comparator in ("<", "<=", ">", ">="):
            quantity = {"value": one[0], "comparator": comparator, **quantity}
        elif comparator not in ("", "="):
            raise bad
        return "valueQuantity", quantity
    if one is not None and two is not None and not comparator:
        if separator in (":", "/"):
            return "valueRatio", {"numerator": {"value": one[0]}, "denominator": {"value": two[0]}}
        if separator == "-":
            return "valueRange", {"low": unit.quantity(one[0]), "high": unit.quantity(two[0])}
    if one is not None and two is None and separator == "+" and not comparator:
        return "valueString", f"{first}+"
    raise bad


def _reference_range(obx: Segment, unit: Unit) -> list[dict[str, Any]] | None:
    text = obx.text(7)
    if not text:
        return None
    ranged: dict[str, Any] = {}
    both = _RANGE.fullmatch(text)
    bound = _BOUND.fullmatch(text)
    if both:
        ranged["low"] = unit.quantity(_storable(_plain_decimal(both.group(1)), obx, 7))
        ranged["high"] = unit.quantity(_storable(_plain_decimal(both.group(2)), obx, 7))
    elif bound:
        side = "high" if bound.group(1) in ("<", "<=", "≤", "＜") else "low"
        ranged[side] = unit.quantity(_storable(_plain_decimal(bound.group(2)), obx, 7))
    ranged["text"] = text
    return [ranged]


def _interpretation(obx: Segment) -> list[dict[str, Any]] | None:
    found = []
    for rep in obx.repetitions(8):
        flag = _ARROWS.get(part(rep, 1), part(rep, 1))
        if not flag:
            continue
        if flag.upper() in _INTERPRETATIONS:
            code = flag.upper()
            coding = {"system": INTERPRETATION, "code": code, "display": _INTERPRETATIONS[code]}
        else:
            coding = {"system": ABNORMAL_FLAGS, "code": _code(flag)}
        concept = {"coding": [coding], "text": part(rep, 1)}
        if concept not in found:
            found.append(concept)
    return found or None


def _lab(name: str, identifier: str, authority: str, systems: Systems) -> dict[str, Any] | None:
    """A performing laboratory as a logical Reference (display, identifier)."""
    reference: dict[str, Any] = {}
    if identifier:
        system = f"urn:oid:{authority}" if _OID.fullmatch(authority) else systems.labs
        reference["identifier"] = {"system": system, "value": identifier}
    if name:
        reference["display"] = name
    return reference or None


def _facility(message: Hl7Message, systems: Systems) -> dict[str, Any] | None:
    msh = message.msh
    namespace, universal, universal_type = msh.value(4, 1), msh.value(4, 2), msh.value(4, 3)
    reference: dict[str, Any] = {}
    if universal and _OID.fullmatch(universal) and universal_type.upper() in ("ISO", ""):
        reference["identifier"] = {"system": "urn:ietf:rfc:3986", "value": f"urn:oid:{universal}"}
    elif namespace:
        reference["identifier"] = {"system": systems.labs, "value": namespace}
    if namespace or universal:
        reference["display"] = namespace or universal
    return reference or None


def _performer(obx: Segment, message: Hl7Message, systems: Systems) -> dict[str, Any] | None:
    """OBX-23 (v2.5: performing organization), else OBX-15 (producer's ID), else MSH-4."""
    name, identifier = obx.value(23, 1), obx.value(23, 10) or obx.value(23, 3)
    if name or identifier:
        authority = obx.value(23, 6, 2) or obx.value(23, 6, 1)
        return _lab(name, identifier, authority, systems)
    producer_id, producer_name = obx.value(15, 1), obx.value(15, 2)
    if producer_id or producer_name:
        return _lab(producer_name or producer_id, producer_id, "", systems)
    return _facility(message, systems)


def _specimen(obr: Segment, specimens: list[Segment], systems: Systems) -> dict[str, Any] | None:
    """A contained Specimen: SPM (v2.5) or OBR-15; collected OBR-7/SPM-17, received
    OBR-14/SPM-18."""
    spm = specimens[0] if specimens else None
    specimen: dict[str, Any] = {"resourceType": "Specimen", "id": "specimen"}
    if spm is not None:
        number_text = spm.value(2, 2) or spm.value(2, 1)
        if number_text:
            specimen["identifier"] = [{"system": systems.specimens, "value": number_text}]
        kind = codeable_concept(spm.field(4)[0], systems) if spm.repetitions(4) else None
    else:
        source = obr.field(15)[0] if obr.repetitions(15) else None
        kind = None
        if source is not None and source[0] and any(source[0]):
            subs = source[0]
            kind = codeable_concept(tuple((s,) for s in subs), systems)
    if kind:
        specimen["type"] = kind
    received = (_date_time(spm, 18) if spm is not None else None) or _date_time(obr, 14)
    if received is not None:
        specimen["receivedTime"] = received.date_time()
    collected = (_date_time(spm, 17) if spm is not None else None) or _date_time(obr, 7)
    if collected is not None:
        specimen["collection"] = {"collectedDateTime": collected.date_time()}
    return specimen if len(specimen) > 2 else None


def _namespace(identifier: Repetition | None, message: Hl7Message) -> str:
    """The namespace of an EI (order number): its namespace or universal ID, else the
    sending application."""
    if identifier is not None:
        for component in (2, 3):
            if part(identifier, component):
                return part(identifier, component)
    return message.msh.value(3, 1) or message.msh.value(3, 2) or "lis"


def _order(message: Hl7Message, segments: _OrderSegments, systems: Systems) -> OrderData:
    obr, specimens = segments.obr, segments.specimens
    filler = obr.repetitions(3)
    if not filler and segments.orc is not None:
        filler = segments.orc.repetitions(3)  # ORC-3, the same filler order number
    if not filler:
        raise _error(
            101, "the filler order number is missing: results are identified by it", obr.at(3)
        )
    filler_rep = filler[0]
    filler_number = part(filler_rep, 1)
    if not filler_number:
        raise _error(101, "the filler order number is empty", obr.at(3, 1))
    namespace = _namespace(filler_rep, message)
    filler_system = systems.filler_orders(namespace)
    identifiers: list[dict[str, Any]] = [
        {
            "type": {"coding": [{"system": IDENTIFIER_TYPE, "code": "FILL"}]},
            "system": filler_system,
            "value": filler_number,
        }
    ]
    placer = obr.repetitions(2)
    if placer and part(placer[0], 1):
        identifiers.append(
            {
                "type": {"coding": [{"system": IDENTIFIER_TYPE, "code": "PLAC"}]},
                "system": systems.placer_orders(_namespace(placer[0], message)),
                "value": part(placer[0], 1),
            }
        )
    code = codeable_concept(obr.field(4)[0], systems) if obr.repetitions(4) else None
    if code is None:
        raise _error(101, "the universal service ID (what was tested) is missing", obr.at(4))
    category = [{"coding": [{"system": SERVICE_SECTION, "code": "LAB", "display": "Laboratory"}]}]
    section = obr.value(24).upper()
    if section and section != "LAB" and section in _SECTIONS:
        category.append(
            {
                "coding": [
                    {"system": SERVICE_SECTION, "code": section, "display": _SECTIONS[section]}
                ]
            }
        )
    collected = _date_time(obr, 7)
    if collected is None and specimens:
        collected = _date_time(specimens[0], 17)
    reported = _date_time(obr, 22)
    issued = (reported.instant() if reported else None) or _moment(message.msh.value(7)).instant()
    if issued is None:
        issued = _moment(message.msh.value(7)).moment.strftime("%Y-%m-%dT00:00:00+08:00")
    specimen = _specimen(obr, specimens, systems)
    results: list[ResultData] = []
    seen: dict[str, Segment] = {}
    context = _OrderContext(
        message, systems, systems.results(namespace), filler_number, collected, issued, specimen
    )
    for obx, notes in segments.results:
        result = _result(obx, notes, context)
        if result.resource_id in seen:
            raise _error(
                205,
                f"a second result for {obx.value(3)} in this order ({seen[result.resource_id].at()}"
                " has it too); give them different sub-IDs (OBX-4)",
                obx.at(3),
            )
        seen[result.resource_id] = obx
        results.append(result)
    hl7_status = obr.value(25).upper()
    if hl7_status:
        if hl7_status not in _REPORT_STATUS:
            raise _error(103, f"result status {hl7_status!r} is not in HL7 table 0123", obr.at(25))
        status = _REPORT_STATUS[hl7_status]
    else:
        status = _derived_status([r.status for r in results])
    if status == "final" and any(r.status == "corrected" for r in results):
        status = "corrected"
    performers = [r.elements.get("performer") for r in results]
    common = performers[0][0] if performers and performers[0] else None
    if not common or any(p != performers[0] for p in performers):
        common = _facility(message, systems)
    return OrderData(
        segment=obr,
        resource_id=resource_id(filler_system, filler_number),
        identifiers=identifiers,
        status=status,
        code=code,
        category=category,
        effective=collected.date_time() if collected else None,
        issued=issued,
        performer=common,
        specimen=specimen,
        results=results,
    )


def _derived_status(statuses: list[str]) -> str:
    if not statuses:
        return "registered"
    if "corrected" in statuses and all(s in ("final", "corrected") for s in statuses):
        return "corrected"
    if all(s == "final" for s in statuses):
        return "final"
    if all(s == "cancelled" for s in statuses):
        return "cancelled"
    if all(s == "entered-in-error" for s in statuses):
        return "entered-in-error"
    if any(s in ("preliminary", "final", "corrected") for s in statuses):
        return "preliminary" if "final" not in statuses else "partial"
    return "registered"


@dataclass(frozen=True)
class _OrderContext:
    """What every result of one order shares."""

    message: Hl7Message
    systems: Systems
    result_system: str
    filler_number: str
    collected: _Moment | None
    issued: str
    specimen: dict[str, Any] | None


def _result(obx: Segment, notes: list[Segment], order: _OrderContext) -> ResultData:
    systems = order.systems
    code = codeable_concept(obx.field(3)[0], systems) if obx.repetitions(3) else None
    test_code = obx.value(3, 1) or obx.value(3, 4)
    if code is None or not test_code:
        raise _error(101, "the observation identifier (what was measured) is missing", obx.at(3))
    hl7_status = obx.value(11).upper()
    if not hl7_status:
        raise _error(101, "the observation result status is missing", obx.at(11))
    if hl7_status not in _RESULT_STATUS:
        raise _error(103, f"result status {hl7_status!r} is not in HL7 table 0085", obx.at(11))
    status = _RESULT_STATUS[hl7_status]
    sub_id = obx.value(4)
    value_text = "/".join([order.filler_number, _code(test_code), *([sub_id] if sub_id else [])])
    unit = _unit(obx)
    elements: dict[str, Any] = {"code": code}
    if order.specimen is not None:
        elements["specimen"] = order.specimen
    effective = _date_time(obx, 14) or order.collected
    if effective is not None:
        elements["effectiveDateTime"] = effective.date_time()
    elements["issued"] = order.issued
    performer = _performer(obx, order.message, systems)
    if performer:
        elements["performer"] = [performer]
    value = _value(obx, unit, systems)
    if value is not None:
        elements[value[0]] = value[1]
    elif status in ("final", "corrected", "preliminary") and hl7_status != "U":
        elements["dataAbsentReason"] = {"coding": [{"system": DATA_ABSENT, "code": "unknown"}]}
    elif status == "cancelled":
        elements["dataAbsentReason"] = {
            "coding": [{"system": DATA_ABSENT, "code": "not-performed"}]
        }
    interpretation = _interpretation(obx)
    if interpretation:
        elements["interpretation"] = interpretation
    texts = [note.text(3) for note in notes if note.text(3)]
    if texts:
        elements["note"] = [{"text": text} for text in texts]
    method = codeable_concept(obx.field(17)[0], systems) if obx.repetitions(17) else None
    if method:
        elements["method"] = method
    ranges = _reference_range(obx, unit)
    if ranges:
        elements["referenceRange"] = ranges
    return ResultData(
        segment=obx,
        resource_id=resource_id(order.result_system, value_text),
        identifier={"system": order.result_system, "value": value_text},
        status=status,
        hl7_status=hl7_status,
        elements=elements,
        issued=order.issued,
    )


# -- acknowledgements -------------------------------------------------------------------------


def escape(text: str, header: Header) -> str:
    """Text for an HL7 field, with the message's separators escaped."""
    component, repetition, escape_char, subcomponent = tuple(header.encoding)
    replaced = []
    for char in text:
        if char == escape_char:
            replaced.append(f"{escape_char}E{escape_char}")
        elif char == header.field_separator:
            replaced.append(f"{escape_char}F{escape_char}")
        elif char == component:
            replaced.append(f"{escape_char}S{escape_char}")
        elif char == repetition:
            replaced.append(f"{escape_char}R{escape_char}")
        elif char == subcomponent:
            replaced.append(f"{escape_char}T{escape_char}")
        elif char in "\r\n":
            replaced.append(f"{escape_char}.br{escape_char}")
        elif not _CONTROL.match(char):
            replaced.append(char)
    return "".join(replaced)


# the HL7 table 0211 name of each codec, for an ACK whose message named its character set wrongly
_CHARSET_NAMES = {
    "utf-8": "UNICODE UTF-8",
    "gb18030": "GB 18030-2000",
    "ascii": "ASCII",
    "big5": "BIG-5",
    **{f"iso8859-{n}": f"8859/{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 15)},
}


def _ack_charset(declared: str, codec: str) -> str:
    """MSH-18 of an ACK written in ``codec``: the message's, when it names ``codec`` (or is
    empty); else the proper name of ``codec``."""
    first = declared.split("~")[0].split("^")[0].strip()
    if not first or charset_codec(first) == codec:
        return first
    return _CHARSET_NAMES.get(codec, "")


DEFAULT_HEADER = Header("|", _DEFAULT_ENCODING, ("MSH", "|", _DEFAULT_ENCODING))


def build_ack(
    header: Header | None,
    ack_code: AckCode,
    *,
    codec: str = "utf-8",
    error: Hl7Error | None = None,
    text: str | None = None,
    now: datetime | None = None,
) -> bytes:
    """An original-mode ACK: MSH answering ``header`` (sending and receiving application and
    facility swapped), MSA with the code and the control ID answered, and for AE and AR an
    ERR segment (HL7 table 0357 code, where, what) and the reason as MSA-3, encoded in
    ``codec``."""
    h = header or DEFAULT_HEADER
    fs, component, subcomponent = h.field_separator, h.encoding[0], h.encoding[3]
    version = h.version if re.fullmatch(r"2\.\d(\.\d)?", h.version) else "2.5.1"
    trigger = h.component(9, 2)
    moment = (now or datetime.now(UTC)).astimezone(CHINA_TIME)
    msh = [
        "MSH",
        h.encoding,
        h.raw(5),
        h.raw(6),
        h.raw(3),
        h.raw(4),
        moment.strftime("%Y%m%d%H%M%S+0800"),
        "",
        component.join(["ACK", trigger, "ACK"]) if trigger else "ACK",
        "ACK" + uuid.uuid4().hex[:17].upper(),
        h.component(11) or "P",
        version,
    ]
    declared = _ack_charset(h.raw(18), codec)
    if declared:
        msh += ["", "", "", "", "", declared]
    message_text = text if text is not None else (error.reason if error else "")
    msa = ["MSA", ack_code, h.raw(10), escape(message_text, h)]
    segments = [fs.join(msh), fs.join(msa).rstrip(fs)]
    if error is not None:
        where = error.location
        name = escape(ERROR_NAMES.get(error.code, ""), h)
        located = [
            where.segment if where else "",
            str(where.sequence) if where else "",
            str(where.field) if where and where.field is not None else "",
        ]
        if _version_number(version) >= (2, 5):
            location = component.join(
                [*located, "1" if where and where.field is not None else ""]
                + ([str(where.component)] if where and where.component else [])
            ).rstrip(component)
            err = [
                "ERR",
                "",
                location,
                component.join([str(error.code), name, "HL70357"]),
                "E",
                "",
                "",
                "",
                escape(error.text, h),
            ]
        else:
            code = subcomponent.join([str(error.code), name, "HL70357"])
            err = ["ERR", component.join([*located, code])]
        segments.append(fs.join(err))
    return ("\r".join(segments) + "\r").encode(codec, errors="replace")


def _version_number(version: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", version))


def unescape(text: str, header: Header) -> str:
    """The inverse of :func:`escape` (the separators and line breaks)."""
    component, repetition, escape_char, subcomponent = tuple(header.encoding)
    names = {
        "F": header.field_separator,
        "S": component,
        "R": repetition,
        "T": subcomponent,
        "E": escape_char,
        ".br": "\n",
    }
    pattern = re.escape(escape_char) + r"(F|S|R|T|E|\.br)" + re.escape(escape_char)
    return re.sub(pattern, lambda match: names[match.group(1)], text)


@dataclass(frozen=True)
class Ack:
    """What an acknowledgement says (for clients and tests)."""

    code: str  # MSA-1
    control_id: str  # MSA-2: the control ID it answers
    text: str  # MSA-3, unescaped
    error_code: str  # ERR's HL7 table 0357 code, "" when there is no ERR
    segments: tuple[str, ...]


def parse_ack(data: bytes) -> Ack:
    """Read an ACK (in whatever character set its MSH-18 names)."""
    try:
        text = decode(data).text
    except Hl7Error:
        text = data.decode("utf-8", errors="replace")
    lines = message_lines(text)
    header = Header.from_line(lines[0]) if lines else None
    if header is None:
        raise ValueError(f"not an HL7 acknowledgement: {data[:40]!r}")
    code = control = text = error_code = ""
    for line in lines:
        fields = [*line.split(header.field_separator), "", "", "", ""]
        if fields[0] == "MSA":
            code, control, text = fields[1], fields[2], unescape(fields[3], header)
        elif fields[0] == "ERR":
            component, subcomponent = header.encoding[0], header.encoding[3]
            if fields[3]:  # v2.5: ERR-3
                error_code = fields[3].split(component)[0]
            else:  # v2.3, v2.4: ERR-1's fourth component
                located = [*fields[1].split(component), "", "", "", ""]
                error_code = located[3].split(subcomponent)[0]
    return Ack(code, control, text, error_code, tuple(lines))
