"""How a message is refused: :class:`Hl7Error` (AR rejected, AE application error) with the HL7
table 0357 code and the :class:`Location` of the field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from fhir_adapters.errors import AdapterError

if TYPE_CHECKING:  # annotations only: these modules import this one
    from fhir_adapters.hl7v2.charsets import Decoded
    from fhir_adapters.hl7v2.header import Header


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


class Hl7Error(AdapterError):
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


def rejection(code: int, text: str, location: Location | None = None) -> Hl7Error:
    return Hl7Error("AR", code, text, location)


def application_error(code: int, text: str, location: Location | None = None) -> Hl7Error:
    return Hl7Error("AE", code, text, location)
