"""The MSH segment as sent: field separator and encoding characters, read before the message is
parsed so that even a refusal answers in the sender's separators."""

from __future__ import annotations

import re
from dataclasses import dataclass

from fhir_adapters.hl7v2.charsets import BOM, decode, header_line
from fhir_adapters.hl7v2.errors import Hl7Error

# -- the header, as sent ----------------------------------------------------------------------

DEFAULT_ENCODING = "^~\\&"
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


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
        if separator.isalnum() or separator.isspace() or CONTROL_CHARACTERS.match(separator):
            return None
        parts = [CONTROL_CHARACTERS.sub("", part) for part in line.split(separator)]
        encoding = parts[1]
        if not valid_encoding(separator, encoding):
            encoding = DEFAULT_ENCODING
        return cls(separator, encoding, ("MSH", separator, *parts[1:]))


def valid_encoding(separator: str, encoding: str) -> bool:
    return (
        len(encoding) == 4
        and len(set(encoding + separator)) == 5
        and not any(c.isalnum() or c.isspace() or CONTROL_CHARACTERS.match(c) for c in encoding)
    )


def read_header(payload: bytes) -> Header | None:
    """The MSH fields of bytes that may not be a readable message (best effort, to answer it)."""
    data = payload.removeprefix(BOM).lstrip(b" \t\r\n")
    try:
        text = header_line(data).decode(decode(data).codec)
    except Hl7Error:
        text = header_line(data).decode("utf-8", errors="replace")
    return Header.from_line(text)
