"""Quantities compared across units: the UCUM units of clinical results brought to one base
unit per dimension, so that ``value-quantity=gt7|http://unitsofmeasure.org|mmol/L`` finds
7.5 mmol/L and 8000 umol/L alike; and, where the analyte is known by its LOINC code,
substance and mass concentrations related by its molar mass (135 mg/dL of glucose is
7.49 mmol/L).

A stored Quantity gives one index row as written (its system, code and value) with its base
dimension and value when its unit is a UCUM code of :data:`UNITS`; and, for an analyte of
:data:`MOLAR_MASS`, a second, *derived* row in the other concentration. A search with a UCUM
unit compares base values within that dimension (derived rows included); a search with
another unit compares values as written, unit for unit; a search without a unit compares
values as written (derived rows left out). Mass and substance concentrations of an analyte
whose molar mass is not known here cannot be compared: such a search says so in its Bundle
(:func:`caveat`), rather than passing silently over them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

UCUM = "http://unitsofmeasure.org"
LOINC = "http://loinc.org"
MASS_CONCENTRATION = "g/L"
SUBSTANCE_CONCENTRATION = "mol/L"

# UCUM code -> (dimension, factor to the dimension's base unit). Temperatures are affine
# (:data:`TEMPERATURES`).
UNITS: dict[str, tuple[str, float]] = {
    # mass concentration (base g/L)
    "g/L": ("g/L", 1.0),
    "g/dL": ("g/L", 10.0),
    "g/mL": ("g/L", 1e3),
    "kg/L": ("g/L", 1e3),
    "mg/dL": ("g/L", 1e-2),
    "mg/L": ("g/L", 1e-3),
    "mg/mL": ("g/L", 1.0),
    "ug/L": ("g/L", 1e-6),
    "ug/dL": ("g/L", 1e-5),
    "ug/mL": ("g/L", 1e-3),
    "ng/mL": ("g/L", 1e-6),
    "ng/dL": ("g/L", 1e-8),
    "ng/L": ("g/L", 1e-9),
    "pg/mL": ("g/L", 1e-9),
    # substance concentration (base mol/L)
    "mol/L": ("mol/L", 1.0),
    "mmol/L": ("mol/L", 1e-3),
    "umol/L": ("mol/L", 1e-6),
    "nmol/L": ("mol/L", 1e-9),
    "pmol/L": ("mol/L", 1e-12),
    # number concentration (base /L)
    "/L": ("/L", 1.0),
    "/mL": ("/L", 1e3),
    "/uL": ("/L", 1e6),
    "10*6/L": ("/L", 1e6),
    "10*9/L": ("/L", 1e9),
    "10*12/L": ("/L", 1e12),
    "10*3/uL": ("/L", 1e9),
    "10*6/uL": ("/L", 1e12),
    # catalytic and arbitrary activity (base U/L, [IU]/L: not convertible into each other)
    "U/L": ("U/L", 1.0),
    "U/mL": ("U/L", 1e3),
    "kU/L": ("U/L", 1e3),
    "[IU]/L": ("[IU]/L", 1.0),
    "[IU]/mL": ("[IU]/L", 1e3),
    "k[IU]/L": ("[IU]/L", 1e3),
    "m[IU]/L": ("[IU]/L", 1e-3),
    "m[IU]/mL": ("[IU]/L", 1.0),
    "u[IU]/mL": ("[IU]/L", 1e-3),
    # mass, length, volume, time, rates, pressure
    "kg": ("g", 1e3),
    "g": ("g", 1.0),
    "mg": ("g", 1e-3),
    "ug": ("g", 1e-6),
    "pg": ("g", 1e-12),
    "[lb_av]": ("g", 453.59237),
    "m": ("m", 1.0),
    "cm": ("m", 1e-2),
    "mm": ("m", 1e-3),
    "[in_i]": ("m", 0.0254),
    "L": ("L", 1.0),
    "dL": ("L", 0.1),
    "mL": ("L", 1e-3),
    "fL": ("L", 1e-15),
    "s": ("s", 1.0),
    "ms": ("s", 1e-3),
    "min": ("s", 60.0),
    "h": ("s", 3600.0),
    "d": ("s", 86400.0),
    "wk": ("s", 604800.0),
    "a": ("s", 31557600.0),
    "/s": ("/s", 1.0),
    "/min": ("/s", 1 / 60),
    "{beats}/min": ("/s", 1 / 60),
    "/h": ("/s", 1 / 3600),
    "mm/h": ("m/s", 1e-3 / 3600),
    "mL/min": ("L/s", 1e-3 / 60),
    "Pa": ("Pa", 1.0),
    "kPa": ("Pa", 1e3),
    "mm[Hg]": ("Pa", 133.322387415),
    "cm[H2O]": ("Pa", 98.0665),
    "kg/m2": ("kg/m2", 1.0),
    "%": ("%", 1.0),
}
TEMPERATURES = {"Cel": 273.15, "K": 0.0}  # offset to kelvin; [degF] below
KELVIN = "K"

# Molar masses (g/mol) of analytes reported in both mass and substance concentration, by the
# LOINC codes of either report.
MOLAR_MASS: dict[str, float] = {
    **dict.fromkeys(("2345-7", "2339-0", "15074-8", "14749-6", "41653-7"), 180.156),  # glucose
    **dict.fromkeys(("2160-0", "38483-4", "14682-9"), 113.118),  # creatinine
    **dict.fromkeys(("2093-3", "14647-2", "2085-9", "14646-4", "13457-7", "2089-1"), 386.654),
    **dict.fromkeys(("22748-8", "39469-2"), 386.654),  # LDL cholesterol (mmol/L)
    **dict.fromkeys(("2571-8", "14927-8", "3043-7"), 885.7),  # triglycerides (as triolein)
    **dict.fromkeys(("3084-1", "14933-6"), 168.11),  # urate
    **dict.fromkeys(("17861-6", "2000-8"), 40.078),  # calcium
    **dict.fromkeys(("1975-2", "14631-6", "1968-7", "14629-0"), 584.66),  # bilirubin
    **dict.fromkeys(("3094-0", "6299-2", "14937-7"), 28.014),  # urea nitrogen
}


@dataclass(frozen=True)
class Row:
    """One index row of a quantity."""

    system: str
    code: str
    value: float
    dimension: str  # "" when the unit is not one of UNITS
    base: float  # the value in the dimension's base unit (the value when no dimension)
    derived: bool = False  # a second row, by the analyte's molar mass


def base_of(code: str, value: float) -> tuple[str, float] | None:
    """(dimension, value in its base unit) of a value in UCUM unit ``code``, or None."""
    if code in UNITS:
        dimension, factor = UNITS[code]
        return dimension, value * factor
    if code in TEMPERATURES:
        return KELVIN, value + TEMPERATURES[code]
    if code == "[degF]":
        return KELVIN, (value - 32) * 5 / 9 + 273.15
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def rows_of(quantity: Any, analytes: frozenset[str] = frozenset()) -> list[Row]:
    """The index rows of a Quantity (Age, Count, Distance, Duration, SimpleQuantity alike);
    ``analytes``: the LOINC codes of what it measures (an Observation's code)."""
    if not isinstance(quantity, dict):
        return []
    value = _number(quantity.get("value"))
    if value is None:
        return []
    system = str(quantity.get("system") or "")
    code = str(quantity.get("code") or quantity.get("unit") or "")
    based = base_of(code, value) if system in (UCUM, "") else None
    if based is None:
        return [Row(system, code[:64], value, "", value)]
    rows = [Row(system, code[:64], value, based[0], based[1])]
    masses = {MOLAR_MASS[a] for a in analytes if a in MOLAR_MASS}
    if len(masses) == 1 and based[0] in (MASS_CONCENTRATION, SUBSTANCE_CONCENTRATION):
        (mass,) = masses
        if based[0] == MASS_CONCENTRATION:
            rows.append(
                Row(UCUM, "mol/L", based[1] / mass, SUBSTANCE_CONCENTRATION, based[1] / mass, True)
            )
        else:
            rows.append(
                Row(UCUM, "g/L", based[1] * mass, MASS_CONCENTRATION, based[1] * mass, True)
            )
    return rows


PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")


@dataclass(frozen=True)
class Wanted:
    """A quantity search value: ``prefix`` and the range ``[low, high)`` its number stands for
    at the precision written; by base value in ``dimension`` when ``dimension`` is set, else
    by value as written in ``system``/``code`` (either may be empty: any)."""

    prefix: str
    number: float
    low: float
    high: float
    system: str
    code: str
    dimension: str


def parse_wanted(text: str) -> Wanted:
    """``[prefix]number[|system|code]``; ValueError saying what is wrong."""
    prefix = text[:2] if text[:2] in PREFIXES else "eq"
    rest = text[2:] if text[:2] in PREFIXES else text
    number_text, _, unit = rest.partition("|")
    system, _, code = unit.partition("|")
    if unit and "|" not in unit:
        raise ValueError(f"{text!r} is not number|system|code (write number||code for a unit)")
    try:
        number = Decimal(number_text)
    except InvalidOperation:
        raise ValueError(f"{number_text[:40]!r} is not a number") from None
    if not number.is_finite() or abs(number.adjusted()) > 300:
        raise ValueError(f"{number_text[:40]!r} is not a number a quantity can hold")
    half = Decimal(5).scaleb(number.as_tuple().exponent - 1)  # type: ignore[operator]
    low, high = float(number - half), float(number + half)
    value = float(number)
    if system == UCUM:
        based = base_of(code, 1.0)
        if based is None:
            raise ValueError(f"{code[:40]!r} is no UCUM unit this server converts")
        dimension = based[0]
        low, high, value = _to_base(code, low), _to_base(code, high), _to_base(code, value)
        return Wanted(prefix, value, low, high, system, code, dimension)
    return Wanted(prefix, value, low, high, system, code, "")


def _to_base(code: str, value: float) -> float:
    based = base_of(code, value)
    assert based is not None
    return based[1]


def caveat(wanted: Wanted) -> str | None:
    """What a search by a concentration cannot see: the other concentration of analytes whose
    molar mass is not known here."""
    if wanted.dimension == SUBSTANCE_CONCENTRATION:
        other = "mass concentrations (mg/dL, g/L ...)"
    elif wanted.dimension == MASS_CONCENTRATION:
        other = "substance concentrations (mmol/L, umol/L ...)"
    else:
        return None
    return (
        f"{wanted.code} is compared with values recorded in {other} only for analytes whose "
        "molar mass this server knows (by LOINC: glucose, creatinine, cholesterol, "
        "triglycerides, urate, calcium, bilirubin, urea nitrogen); other such values were not "
        "matched"
    )
