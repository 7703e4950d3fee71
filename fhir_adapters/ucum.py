"""Laboratory units as LIS systems write them, recognised as UCUM codes.

An HL7 v2 result carries its unit in OBX-6, usually as the lab's own spelling (``10^9/L``,
``×10^12/L``, ``μmol/L``, ``mIU/mL``, ``mmHg``). FHIR wants a UCUM code
(``http://unitsofmeasure.org``) when there is one. :func:`to_ucum` answers the UCUM code for
a spelling it knows, or None: the unit is then kept as text only (``Quantity.unit``), never
guessed. The table holds the units of routine clinical chemistry, haematology, urinalysis and
immunoassay; adding one is adding a line.
"""

from __future__ import annotations

import re
import unicodedata

UCUM_SYSTEM = "http://unitsofmeasure.org"

# UCUM codes of the units labs report, with the other spellings seen in LIS exports.
_UNITS: dict[str, tuple[str, ...]] = {
    # counts
    "10*9/L": ("10^9/L", "x10^9/L", "×10^9/L", "10E9/L"),
    "10*12/L": ("10^12/L", "x10^12/L", "×10^12/L", "10E12/L"),
    "10*6/L": ("10^6/L", "x10^6/L", "×10^6/L"),
    "10*3/uL": ("10^3/uL", "x10^3/uL", "K/uL", "10^3/μL"),
    "10*6/uL": ("10^6/uL", "x10^6/uL", "M/uL", "10^6/μL"),
    "/uL": ("/μL", "cells/uL", "cells/μL", "个/uL", "个/μL"),
    "/[HPF]": ("/HPF", "/HP", "个/HP", "个/HPF"),
    "/[LPF]": ("/LPF", "/LP", "个/LP", "个/LPF"),
    # mass and substance concentrations
    "g/L": (),
    "g/dL": (),
    "mg/dL": (),
    "mg/L": (),
    "ug/L": ("μg/L",),
    "ug/dL": ("μg/dL",),
    "ug/mL": ("μg/mL",),
    "ng/mL": (),
    "ng/L": (),
    "ng/dL": (),
    "pg/mL": (),
    "mol/L": (),
    "mmol/L": ("mM",),
    "umol/L": ("μmol/L", "μM", "uM"),
    "nmol/L": ("nM",),
    "pmol/L": ("pM",),
    "meq/L": ("mEq/L",),
    "mosm/kg": ("mOsm/kg", "mOsm/kgH2O"),
    "mg/(24.h)": ("mg/24h", "mg/24 h", "mg/d"),
    "g/(24.h)": ("g/24h", "g/24 h", "g/d"),
    "mmol/(24.h)": ("mmol/24h", "mmol/24 h", "mmol/d"),
    # enzymes and immunoassays
    "U/L": (),
    "U/mL": (),
    "kU/L": (),
    "[IU]/L": ("IU/L",),
    "[IU]/mL": ("IU/mL",),
    "m[IU]/mL": ("mIU/mL",),
    "m[IU]/L": ("mIU/L",),
    "u[IU]/mL": ("uIU/mL", "μIU/mL"),
    "k[IU]/L": ("kIU/L",),
    # cells, times, rates, ratios
    "fL": ("fl",),
    "pg": (),
    "%": ("％",),
    "s": ("sec", "秒"),
    "min": (),
    "h": ("hr",),
    "mm/h": ("mm/hr", "mm/1h"),
    "mL/min": ("ml/min",),
    "mL/min/{1.73_m2}": ("mL/min/1.73m2", "ml/min/1.73m2", "mL/min/1.73 m2"),
    "{ratio}": ("ratio",),
    "[pH]": ("pH",),
    "mm[Hg]": ("mmHg",),
    "kPa": (),
    "Cel": ("°C", "℃"),
    "kg/L": (),
    "g/mL": (),
    "mg/g": (),
    "{titer}": ("titer",),
}


def _key(text: str) -> str:
    """The spelling with width, micro signs and spaces folded away. Case stays: in UCUM it
    matters (``G/L`` is giga per litre, ``M`` mega, ``m`` milli)."""
    folded = unicodedata.normalize("NFKC", text).replace("µ", "u").replace("μ", "u")
    return re.sub(r"\s+", "", folded)


_BY_KEY: dict[str, str] = {}
for _code, _spellings in _UNITS.items():
    for _spelling in (_code, *_spellings):
        # the litre is written "l" as often as "L" (no unit here has another capital L)
        for _variant in (_spelling, _spelling.replace("L", "l")):
            _BY_KEY.setdefault(_key(_variant), _code)

# "10^9/L", "×10E9/l", "10*9/L": a power of ten per litre or microlitre
_POWER = re.compile(r"(?:[x×*])?10(?:\^|\*\*|\*|[eE])(\d{1,2})/([lL]|u[lL])")


def to_ucum(unit: str) -> str | None:
    """The UCUM code for a unit as a lab wrote it, or None when it is not one we know."""
    text = unit.strip()
    if not text:
        return None
    if text in _UNITS:
        return text
    key = _key(text)
    if key in _BY_KEY:
        return _BY_KEY[key]
    power = _POWER.fullmatch(key)
    if power:
        return f"10*{int(power.group(1))}/{'L' if len(power.group(2)) == 1 else 'uL'}"
    return None


def is_ucum(code: str) -> bool:
    """Whether ``code`` is, exactly, one of the UCUM codes this table knows."""
    return code in _UNITS
