"""Acknowledgements: the ACK built in the message's own separators and character set (MSA, ERR with
a table 0357 code), and an ACK read back."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from fhir_adapters.hl7v2.charsets import charset_codec, decode
from fhir_adapters.hl7v2.errors import ERROR_NAMES, AckCode, Hl7Error
from fhir_adapters.hl7v2.header import CONTROL_CHARACTERS, DEFAULT_ENCODING, Header
from fhir_adapters.hl7v2.message import message_lines
from fhir_adapters.hl7v2.times import CHINA_TIME

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
        elif not CONTROL_CHARACTERS.match(char):
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


DEFAULT_HEADER = Header("|", DEFAULT_ENCODING, ("MSH", "|", DEFAULT_ENCODING))


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
