"""OBR and OBX mapped to DiagnosticReports and Observations: statuses, sections, values (numeric,
coded, text, times), units, reference ranges, abnormal flags, specimen, performing lab."""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from fhir_adapters.hl7v2.codes import (
    ABNORMAL_FLAGS,
    DATA_ABSENT,
    IDENTIFIER_TYPE,
    INTERPRETATION,
    SERVICE_SECTION,
    codeable_concept,
    fhir_code,
)
from fhir_adapters.hl7v2.errors import application_error
from fhir_adapters.hl7v2.message import Hl7Message, Repetition, Segment, part, repetition_text
from fhir_adapters.hl7v2.model import OrderData, OrderSegments, ResultData
from fhir_adapters.hl7v2.systems import OID, Systems, resource_id
from fhir_adapters.hl7v2.times import Moment, field_time, read_moment
from fhir_adapters.store.jsonio import number_problem
from fhir_adapters.ucum import UCUM_SYSTEM, to_ucum

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
    could not read (:func:`fhir_adapters.store.jsonio.number_problem`)."""
    problem = number_problem(value)
    if problem:
        raise application_error(102, problem, segment.at(field_number))
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
        raise application_error(101, "OBX-5 holds a value but OBX-2 gives no value type", obx.at(2))
    if value_type not in VALUE_TYPES:
        raise application_error(
            102,
            f"value type {value_type!r} is not supported (" + ", ".join(VALUE_TYPES) + ")",
            obx.at(2),
        )
    if value_type in _TEXT_TYPES:
        return "valueString", obx.text(5)
    if len(reps) > 1:
        raise application_error(102, f"a {value_type} value does not repeat", obx.at(5))
    rep = reps[0]
    if value_type == "NM":
        parsed = number(repetition_text(rep))
        if parsed is None:
            raise application_error(
                102, f"{repetition_text(rep)[:40]!r} is not a number (OBX-2 NM)", obx.at(5)
            )
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
            raise application_error(
                102, f"{part(rep, 1)[:40]!r} is not an HL7 time (HHMMSS)", obx.at(5)
            )
        hour, minute, second = (g or "00" for g in match.groups())
        if int(second) > 59:
            raise application_error(102, f"{part(rep, 1)[:40]!r} is not an HL7 time", obx.at(5))
        return "valueTime", f"{hour}:{minute}:{second}"
    moment = field_time(obx, 5)
    assert moment is not None
    return "valueDateTime", moment.date_time()


def _structured_numeric(obx: Segment, rep: Repetition, unit: Unit) -> tuple[str, Any]:
    """SN: comparator ^ number ^ separator/suffix ^ number."""
    comparator, first, separator, second = (part(rep, n) for n in (1, 2, 3, 4))
    bad = application_error(
        102, f"{repetition_text(rep)[:40]!r} is not a structured numeric (SN)", obx.at(5)
    )
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
            coding = {"system": ABNORMAL_FLAGS, "code": fhir_code(flag)}
        concept = {"coding": [coding], "text": part(rep, 1)}
        if concept not in found:
            found.append(concept)
    return found or None


def _lab(name: str, identifier: str, authority: str, systems: Systems) -> dict[str, Any] | None:
    """A performing laboratory as a logical Reference (display, identifier)."""
    reference: dict[str, Any] = {}
    if identifier:
        system = f"urn:oid:{authority}" if OID.fullmatch(authority) else systems.labs
        reference["identifier"] = {"system": system, "value": identifier}
    if name:
        reference["display"] = name
    return reference or None


def _facility(message: Hl7Message, systems: Systems) -> dict[str, Any] | None:
    msh = message.msh
    namespace, universal, universal_type = msh.value(4, 1), msh.value(4, 2), msh.value(4, 3)
    reference: dict[str, Any] = {}
    if universal and OID.fullmatch(universal) and universal_type.upper() in ("ISO", ""):
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
    received = (field_time(spm, 18) if spm is not None else None) or field_time(obr, 14)
    if received is not None:
        specimen["receivedTime"] = received.date_time()
    collected = (field_time(spm, 17) if spm is not None else None) or field_time(obr, 7)
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


def read_order(message: Hl7Message, segments: OrderSegments, systems: Systems) -> OrderData:
    obr, specimens = segments.obr, segments.specimens
    filler = obr.repetitions(3)
    if not filler and segments.orc is not None:
        filler = segments.orc.repetitions(3)  # ORC-3, the same filler order number
    if not filler:
        raise application_error(
            101, "the filler order number is missing: results are identified by it", obr.at(3)
        )
    filler_rep = filler[0]
    filler_number = part(filler_rep, 1)
    if not filler_number:
        raise application_error(101, "the filler order number is empty", obr.at(3, 1))
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
        raise application_error(
            101, "the universal service ID (what was tested) is missing", obr.at(4)
        )
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
    collected = field_time(obr, 7)
    if collected is None and specimens:
        collected = field_time(specimens[0], 17)
    reported = field_time(obr, 22)
    issued = (reported.instant() if reported else None) or read_moment(
        message.msh.value(7)
    ).instant()
    if issued is None:
        issued = read_moment(message.msh.value(7)).moment.strftime("%Y-%m-%dT00:00:00+08:00")
    specimen = _specimen(obr, specimens, systems)
    results: list[ResultData] = []
    seen: dict[str, Segment] = {}
    context = _OrderContext(
        message, systems, systems.results(namespace), filler_number, collected, issued, specimen
    )
    for obx, notes in segments.results:
        result = _result(obx, notes, context)
        if result.resource_id in seen:
            raise application_error(
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
            raise application_error(
                103, f"result status {hl7_status!r} is not in HL7 table 0123", obr.at(25)
            )
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
    collected: Moment | None
    issued: str
    specimen: dict[str, Any] | None


def _result(obx: Segment, notes: list[Segment], order: _OrderContext) -> ResultData:
    systems = order.systems
    code = codeable_concept(obx.field(3)[0], systems) if obx.repetitions(3) else None
    test_code = obx.value(3, 1) or obx.value(3, 4)
    if code is None or not test_code:
        raise application_error(
            101, "the observation identifier (what was measured) is missing", obx.at(3)
        )
    hl7_status = obx.value(11).upper()
    if not hl7_status:
        raise application_error(101, "the observation result status is missing", obx.at(11))
    if hl7_status not in _RESULT_STATUS:
        raise application_error(
            103, f"result status {hl7_status!r} is not in HL7 table 0085", obx.at(11)
        )
    status = _RESULT_STATUS[hl7_status]
    sub_id = obx.value(4)
    value_text = "/".join(
        [order.filler_number, fhir_code(test_code), *([sub_id] if sub_id else [])]
    )
    unit = _unit(obx)
    elements: dict[str, Any] = {"code": code}
    if order.specimen is not None:
        elements["specimen"] = order.specimen
    effective = field_time(obx, 14) or order.collected
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
