"""Code systems and CE/CWE coded values read to FHIR CodeableConcepts (LOINC, SNOMED CT, HL7
tables, the hospital's local codes)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from fhir_adapters.hl7v2.message import Repetition, part
from fhir_adapters.ucum import UCUM_SYSTEM

if TYPE_CHECKING:  # annotations only: these modules import this one
    from fhir_adapters.hl7v2.systems import Systems


LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
V2_TABLE = "http://terminology.hl7.org/CodeSystem/v2-{:04d}"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
DATA_ABSENT = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
IDENTIFIER_TYPE = V2_TABLE.format(203)
SERVICE_SECTION = V2_TABLE.format(74)
ABNORMAL_FLAGS = V2_TABLE.format(78)
# -- codes ------------------------------------------------------------------------------------

_CODING_SYSTEMS = {
    "LN": LOINC,
    "LOINC": LOINC,
    "SCT": SNOMED,
    "SNOMEDCT": SNOMED,
    "UCUM": UCUM_SYSTEM,
    "I10": "http://hl7.org/fhir/sid/icd-10",
}


def fhir_code(text: str) -> str:
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
    coding: dict[str, Any] = {
        "system": coding_system(system_name, systems),
        "code": fhir_code(code),
    }
    if display:
        coding["display"] = display
    return coding


def codeable_concept(rep: Repetition, systems: Systems) -> dict[str, Any] | None:
    """A CE/CWE/CNE (identifier^text^system^alt identifier^alt text^alt system^^^original text)
    as a CodeableConcept; None when it holds nothing."""
    codings = []
    for first in (1, 4):
        code = fhir_code(part(rep, first))
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
