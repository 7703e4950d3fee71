"""HL7 v2 messages for the adapter's tests: the shipped samples, edited field by field, and
resident IDs with valid check characters."""

from __future__ import annotations

import random

from tests.helpers import ROOT

SAMPLES = ROOT / "fhir_adapters" / "samples" / "hl7"
CBC = "hosp-a-cbc-v251-utf8.hl7"
CHEM = "hosp-b-chem-v23-gb18030.hl7"
CHEM_CORRECTION = "hosp-b-chem-v23-gb18030-correction.hl7"
URINE = "hosp-c-urine-v24-utf8.hl7"
ALL_SAMPLES = (CBC, CHEM, CHEM_CORRECTION, URINE)
CODECS = {CBC: "utf-8", CHEM: "gb18030", CHEM_CORRECTION: "gb18030", URINE: "utf-8"}

_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def resident_id(first17: str) -> str:
    """A resident ID (GB 11643) with its check character."""
    total = sum(int(c) * w for c, w in zip(first17, _WEIGHTS, strict=True))
    return first17 + "10X98765432"[total % 11]


def random_resident(rng: random.Random) -> str:
    year = rng.randint(1940, 2020)
    return resident_id(
        f"330106{year}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}{rng.randint(0, 999):03d}"
    )


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def set_field(
    message: bytes,
    segment: str,
    number: int,
    value: str,
    occurrence: int = 1,
    codec: str = "utf-8",
) -> bytes:
    """The message with field ``number`` of the ``occurrence``-th ``segment`` set to ``value``
    (separators |, and segments ending in CR)."""
    lines = message.decode(codec).split("\r")
    seen = 0
    for index, line in enumerate(lines):
        if line[:3] != segment:
            continue
        seen += 1
        if seen != occurrence:
            continue
        parts = line.split("|")
        position = number - 1 if segment == "MSH" else number
        while len(parts) <= position:
            parts.append("")
        parts[position] = value
        lines[index] = "|".join(parts)
        return "\r".join(lines).encode(codec)
    raise KeyError(f"no {segment} number {occurrence}")


def get_field(
    message: bytes, segment: str, number: int, occurrence: int = 1, codec: str = "utf-8"
) -> str:
    lines = [line for line in message.decode(codec).split("\r") if line[:3] == segment]
    parts = lines[occurrence - 1].split("|")
    position = number - 1 if segment == "MSH" else number
    return parts[position] if position < len(parts) else ""


def remove_segments(message: bytes, segment: str, codec: str = "utf-8") -> bytes:
    lines = message.decode(codec).split("\r")
    return "\r".join(line for line in lines if line[:3] != segment).encode(codec)


def cbc(
    control: str,
    filler: str,
    resident: str | None = None,
    mrn: str = "HZ00012345",
    *,
    name: str = "张^三",
    phone: str = "13800138000",
    reported: str = "20260310093000+0800",
) -> bytes:
    """The CBC sample with its control ID, filler order number and patient made unique."""
    message = sample(CBC)
    message = set_field(message, "MSH", 10, control)
    for segment, number in (("ORC", 3), ("OBR", 3)):
        message = set_field(message, segment, number, f"{filler}^XYLIS")
    identifiers = [f"{mrn}^^^HZSY^MR"] if mrn else []
    if resident:
        identifiers.append(f"{resident}^^^CHN^NNCHN")
    message = set_field(message, "PID", 3, "~".join(identifiers))
    message = set_field(message, "PID", 5, name)
    message = set_field(message, "PID", 13, f"^PRN^CP^^^^^^^^^{phone}")
    return set_field(message, "OBR", 22, reported)
