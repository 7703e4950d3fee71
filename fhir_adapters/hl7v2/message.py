"""The parsed message: segments, fields, repetitions and components, split with the ``hl7`` package
and checked as an ORU^R01 of a supported version."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import hl7  # type: ignore[import-untyped]

from fhir_adapters.hl7v2.charsets import BOM, Decoded, decode
from fhir_adapters.hl7v2.errors import Hl7Error, Location, application_error, rejection
from fhir_adapters.hl7v2.header import Header, valid_encoding
from fhir_adapters.hl7v2.times import read_moment

SUPPORTED_VERSIONS = ("2.3", "2.3.1", "2.4", "2.5", "2.5.1")
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
        return "\n".join(repetition_text(rep) for rep in self.field(number)).strip()

    def at(self, number: int | None = None, component: int | None = None) -> Location:
        return Location(self.name, self.sequence, number, component)


def part(rep: Repetition, component: int, subcomponent: int = 1) -> str:
    if component > len(rep):
        return ""
    subs = rep[component - 1]
    return subs[subcomponent - 1].strip() if subcomponent <= len(subs) else ""


def repetition_text(rep: Repetition) -> str:
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
    return repetition_text(reps[0]).strip() if reps else ""


def _normaliser(message: Any) -> Callable[[Any], Field]:
    """What turns an ``hl7`` field of ``message`` into repetitions of components of
    subcomponents, unescaped (its escape patterns compiled once for all its fields)."""

    esc = message.esc
    escape_char = re.escape(esc)
    hex_escape = re.compile(f"{escape_char}X([^{escape_char}]*){escape_char}")
    repeated = re.compile(f"{escape_char}\\.[a-z]{{2}}([^{escape_char}]*){escape_char}")

    def leaf(text: Any) -> str:
        raw = str(text)
        if raw == '""':  # HL7's explicit null
            return ""
        if esc not in raw:
            return raw
        for digits in hex_escape.findall(raw):  # hl7 would log and drop a bad one
            if not _HEX_DIGITS.fullmatch(digits):
                raise ValueError(f"\\X{digits[:20]}\\ is not a hexadecimal escape")
        for count in repeated.findall(raw):  # \.sp9999999\ would make a string that long
            if count and not (_COUNT.fullmatch(count)):
                raise ValueError(f"formatting escape with a count of {count[:20]!r}")
        return str(message.unescape(raw, _UNESCAPE_MAP))

    def repetition(node: Any) -> Repetition:
        if len(node) == 1 and isinstance(node[0], str):
            return ((leaf(node[0]),),)
        return tuple(tuple(leaf(sub) for sub in c) for c in node)

    def normalise(value: Any) -> Field:
        if len(value) == 1 and isinstance(value[0], str):
            return (((leaf(value[0]),),),)
        return tuple(repetition(r) for r in value)

    return normalise


_HEX_DIGITS = re.compile(r"(?:[0-9A-Fa-f]{2})+")
_COUNT = re.compile(r"[+-]?\d{1,3}")


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
    for line in re.split(rb"\r\n|\r|\n", data.removeprefix(BOM)):
        if not line.strip() or line[:3] in _BATCH_SEGMENTS:
            continue
        if line.startswith(b"MSH") or not messages:
            messages.append([])
        messages[-1].append(line)
    return [b"\r".join(lines) + b"\r" for lines in messages]


def parse_message(payload: bytes) -> Hl7Message:
    """Decode and split one message and check its header (an ORU^R01 we take in)."""
    body = payload.removeprefix(BOM).lstrip(b" \t\r\n")
    if not body.startswith(b"MSH"):
        shown = body[:20].decode("utf-8", errors="replace")
        raise rejection(100, f"the message does not start with an MSH segment but {shown!r}")
    decoded = decode(body)
    lines = message_lines(decoded.text)
    header = Header.from_line(lines[0])
    if header is None:
        raise rejection(
            102,
            "MSH-1 must be one separator character, not a letter, digit or space",
            Location("MSH", field=1),
        )
    encoding = lines[0][4 : lines[0].find(header.field_separator, 4)]
    if lines[0].find(header.field_separator, 4) < 0 or not valid_encoding(
        header.field_separator, encoding
    ):
        raise rejection(
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
            raise rejection(
                100,
                f"line {number} does not start with a segment ID and field separator: "
                f"{line[:12]!r}",
            )
        if number > 1 and name == "MSH":
            raise rejection(100, f"line {number} starts a second message: send one per frame")
    try:
        parsed = hl7.parse("\r".join(lines))
    except Exception as exc:  # the package raises what it meets; every failure is a reject
        raise rejection(100, f"not an HL7 message: {type(exc).__name__}: {exc}") from None
    counts: dict[str, int] = {}
    segments = []
    normalise = _normaliser(parsed)
    for raw in parsed:
        name = str(raw[0][0]) if raw and raw[0] else ""
        counts[name] = counts.get(name, 0) + 1
        fields: list[Field] = []
        for number, value in enumerate(raw):
            if name == "MSH" and number in (1, 2):
                fields.append((((str(value[0]),),),))
                continue
            try:
                fields.append(normalise(value))
            except Exception as exc:  # a malformed escape sequence
                raise application_error(
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
        raise rejection(101, "the message type is missing", msh.at(9))
    if code != "ORU":
        raise rejection(
            200,
            f"message type {code}^{trigger} is not taken in: only ORU^R01 (lab results)",
            msh.at(9, 1),
        )
    if trigger != "R01":
        raise rejection(201, f"event {code}^{trigger} is not taken in: only ORU^R01", msh.at(9, 2))
    if not message.control_id:
        raise rejection(101, "the message control ID is missing", msh.at(10))
    processing = msh.value(11)
    if not processing:
        raise rejection(101, "the processing ID is missing (P for production)", msh.at(11))
    if processing != "P":
        raise rejection(
            202,
            f"processing ID {processing!r} is not taken in: only P (production) results are "
            "stored; send training (T) and debugging (D) messages to a test node",
            msh.at(11),
        )
    version = message.version
    if not version:
        raise rejection(101, "the version ID is missing", msh.at(12))
    if version not in SUPPORTED_VERSIONS:
        raise rejection(
            203,
            f"version {version!r} is not supported (" + ", ".join(SUPPORTED_VERSIONS) + ")",
            msh.at(12),
        )
    sent = msh.value(7)
    if not sent:
        raise rejection(101, "the date/time of the message is missing", msh.at(7))
    try:
        read_moment(sent)
    except ValueError as exc:
        raise rejection(102, str(exc), msh.at(7)) from None
    return message
