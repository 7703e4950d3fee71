"""The message's character set (MSH-18) found and the bytes decoded: UTF-8, GB18030 and its older
names, ASCII, ISO 8859, Big5."""

from __future__ import annotations

import re
from dataclasses import dataclass

from fhir_adapters.hl7v2.errors import Location, rejection

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


BOM = b"\xef\xbb\xbf"


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


def header_line(data: bytes) -> bytes:
    return re.split(rb"[\r\n]", data, maxsplit=1)[0]


def decode(payload: bytes) -> Decoded:
    """The message as text, in the character set MSH-18 names (see the module's docstring)."""
    body = payload.removeprefix(BOM)
    declared_guess = _msh18(header_line(body).decode("latin-1"))
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
                raise rejection(
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
    raise rejection(
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
        raise rejection(
            102,
            f"MSH-18 is empty and the message is neither UTF-8 (byte {not_utf8}) nor GB 18030 "
            f"(byte {exc.start}); name its character set in MSH-18",
            Location("MSH", field=18),
        ) from None
    note = f"MSH-18 is empty and the message is not UTF-8 (byte {not_utf8}): read as GB18030"
    return Decoded(text, "gb18030", "", note)
