"""PID mapped to a FHIR Patient: identifiers (the resident identity card checked), names, gender,
birth date, telecoms, addresses; and a stored Patient merged with a newer message's
demographics."""

from __future__ import annotations

import re
from typing import Any

from consent.pseudonym import RESIDENT_ID_SYSTEM
from fhir_adapters.hl7v2.codes import IDENTIFIER_TYPE, fhir_code
from fhir_adapters.hl7v2.errors import application_error
from fhir_adapters.hl7v2.message import Repetition, Segment, part
from fhir_adapters.hl7v2.model import PatientData
from fhir_adapters.hl7v2.systems import OID, Systems
from fhir_adapters.hl7v2.times import field_time

# -- patients ---------------------------------------------------------------------------------

_RESIDENT_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def masked(value: str) -> str:
    """An identifier as messages and logs show it: its last four characters."""
    return "…" + value[-4:] if len(value) > 4 else "…"


def resident_id_problem(value: str) -> str | None:
    """Why ``value`` is not a resident identity card number (GB 11643), or None."""
    if re.fullmatch(r"\d{15}", value):
        return None  # the first-generation card: no check character
    if not re.fullmatch(r"\d{17}[\dX]", value):
        return "is not 18 characters (17 digits and a digit or X) nor 15 digits"
    total = sum(int(c) * w for c, w in zip(value[:17], _RESIDENT_WEIGHTS, strict=True))
    if "10X98765432"[total % 11] != value[17]:
        return "fails its check character (GB 11643)"
    return None


def _is_resident(id_type: str, authority_text: str) -> bool:
    if id_type.upper() == "NNCHN":
        return True
    if id_type.upper() == "NN" and "CHN" in authority_text.upper():
        return True
    return "2.16.156.10011.1.3" in authority_text or "身份证" in authority_text


def _identifier(
    rep: Repetition, segment: Segment, number: int, systems: Systems
) -> tuple[dict[str, Any], str] | None:
    """A CX as a FHIR Identifier and its kind: resident, mrn, oid or other."""
    value = part(rep, 1)
    if not value:
        return None
    id_type = part(rep, 5)
    authority = rep[3] if len(rep) > 3 else ()
    authority_text = "&".join(authority)
    universal, universal_type = (
        (authority[1].strip() if len(authority) > 1 else ""),
        (authority[2].strip() if len(authority) > 2 else ""),
    )
    identifier: dict[str, Any] = {}
    if _is_resident(id_type, authority_text):
        value = value.upper()
        problem = resident_id_problem(value)
        if problem:
            raise application_error(
                102, f"resident ID {masked(value)} {problem}", segment.at(number)
            )
        identifier["use"] = "official"
        identifier["type"] = {
            "coding": [{"system": IDENTIFIER_TYPE, "code": "NNCHN"}],
            "text": "居民身份证号",
        }
        identifier["system"] = RESIDENT_ID_SYSTEM
        kind = "resident"
    elif OID.fullmatch(universal) and universal_type.upper() in ("ISO", ""):
        identifier["system"] = f"urn:oid:{universal}"
        kind = "oid"
    elif id_type.upper() in ("MR", ""):
        identifier["type"] = {"coding": [{"system": IDENTIFIER_TYPE, "code": "MR"}]}
        identifier["system"] = systems.mrn
        kind = "mrn"
    else:
        identifier["system"] = systems.patient_id(id_type)
        kind = "other"
    if kind in ("oid", "other") and id_type:
        identifier["type"] = {"coding": [{"system": IDENTIFIER_TYPE, "code": fhir_code(id_type)}]}
    identifier["value"] = value
    return identifier, kind


_NAME_USE = {
    "L": "official",
    "D": "usual",
    "A": "nickname",
    "N": "nickname",
    "M": "maiden",
    "B": "old",
    "S": "anonymous",
    "T": "temp",
}
_GENDER = {"M": "male", "F": "female", "O": "other", "A": "other", "U": "unknown", "N": "unknown"}
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


def _human_name(rep: Repetition) -> dict[str, Any] | None:
    family, given, middle = part(rep, 1), part(rep, 2), part(rep, 3)
    suffix, prefix = part(rep, 4), part(rep, 5)
    if not (family or given):
        return None
    name: dict[str, Any] = {"use": _NAME_USE.get(part(rep, 7).upper(), "official")}
    givens = [g for g in (given, middle) if g]
    if _CJK.search(family + given):
        name["text"] = family + "".join(givens)
    else:
        name["text"] = " ".join([*givens, family]).strip()
    if family:
        name["family"] = family
    if givens:
        name["given"] = givens
    if prefix:
        name["prefix"] = [prefix]
    if suffix:
        name["suffix"] = [suffix]
    return name


def _telecoms(segment: Segment, number: int, work: bool) -> list[dict[str, Any]]:
    found = []
    for rep in segment.repetitions(number):
        use_code, equipment = part(rep, 2).upper(), part(rep, 3).upper()
        email = part(rep, 4)
        if use_code == "NET" or equipment in ("INTERNET", "X.400") or (email and not part(rep, 1)):
            if email:
                found.append({"system": "email", "value": email, "use": "work" if work else "home"})
            continue
        number_text = part(rep, 1) or part(rep, 12) or (part(rep, 6) + part(rep, 7))
        if not number_text:
            continue
        contact: dict[str, Any] = {"system": "fax" if equipment == "FX" else "phone"}
        contact["value"] = number_text
        contact["use"] = "mobile" if equipment == "CP" else ("work" if work else "home")
        found.append(contact)
    return found


_ADDRESS_USE = {"H": "home", "B": "work", "O": "work", "C": "temp", "BA": "billing"}


def _addresses(segment: Segment) -> list[dict[str, Any]]:
    found = []
    for rep in segment.repetitions(11):
        address: dict[str, Any] = {}
        use = _ADDRESS_USE.get(part(rep, 7).upper())
        if use:
            address["use"] = use
        lines = [line for line in (part(rep, 1), part(rep, 2)) if line]
        if lines:
            address["line"] = lines
        for component, element in ((3, "city"), (9, "district"), (4, "state"), (5, "postalCode")):
            if part(rep, component):
                address[element] = part(rep, component)
        if part(rep, 6):
            address["country"] = part(rep, 6)
        if any(k != "use" for k in address):
            found.append(address)
    return found


def read_patient(pid: Segment, systems: Systems) -> PatientData:
    identifiers: list[dict[str, Any]] = []
    keys: list[tuple[str, str]] = []
    resident = None
    for number in (3, 2):  # PID-2 (v2.3's external ID) only when PID-3 holds none
        if identifiers:
            break
        for rep in pid.repetitions(number):
            made = _identifier(rep, pid, number, systems)
            if made is None:
                continue
            identifier, kind = made
            key = (identifier["system"], identifier["value"])
            if key in keys:
                continue
            identifiers.append(identifier)
            keys.append(key)
            if kind == "resident":
                if resident is not None and resident != identifier["value"]:
                    raise application_error(
                        102,
                        f"two different resident IDs ({masked(resident)}, "
                        f"{masked(identifier['value'])}) for one patient",
                        pid.at(3),
                    )
                resident = identifier["value"]
    if not identifiers:
        raise application_error(
            101, "no patient identifier (PID-3): the results name no patient", pid.at(3)
        )
    match_keys = [
        key
        for key, identifier in zip(keys, identifiers, strict=True)
        if key[0] in (RESIDENT_ID_SYSTEM, systems.mrn, systems.match_system)
        or key[0].startswith("urn:oid:")
    ]
    demographics: dict[str, Any] = {}
    names = [n for n in (_human_name(rep) for rep in pid.repetitions(5)) if n]
    if names:
        demographics["name"] = names
    telecom = _telecoms(pid, 13, work=False) + _telecoms(pid, 14, work=True)
    if telecom:
        demographics["telecom"] = telecom
    sex = pid.value(8).upper()
    if sex:
        demographics["gender"] = _GENDER.get(sex, "unknown")
    born = field_time(pid, 7)
    if born is not None:
        demographics["birthDate"] = born.moment.strftime(
            {4: "%Y", 6: "%Y-%m"}.get(born.digits, "%Y-%m-%d")
        )
    addresses = _addresses(pid)
    if addresses:
        demographics["address"] = addresses
    return PatientData(pid, identifiers, match_keys, resident, demographics)


def new_patient(data: PatientData) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": data.identifiers,
        "active": True,
        **data.demographics,
    }


def merged_patient(existing: dict[str, Any], data: PatientData) -> dict[str, Any]:
    """An existing Patient updated as PID says: identifiers added; names, phones and addresses
    replaced where PID gives one of the same use; gender and birth date set; the rest kept.
    Nothing is made worse than another source stored it: a name that is the same name with
    less structure (张三 as family alone where 张 / 三 was stored), a birth date that is the
    same date less precisely (1985 for 1985-03-12), and an unknown gender keep what was
    stored."""
    patient = {k: v for k, v in existing.items() if k != "meta"}
    have = {(i.get("system"), i.get("value")) for i in patient.get("identifier", [])}
    added = [i for i in data.identifiers if (i["system"], i["value"]) not in have]
    if added:
        patient["identifier"] = [*patient.get("identifier", []), *added]
    new = data.demographics
    for element, same in (
        ("name", lambda a, b: a.get("use") == b.get("use")),
        (
            "telecom",
            lambda a, b: (a.get("system"), a.get("use")) == (b.get("system"), b.get("use")),
        ),
        ("address", lambda a, b: a.get("use") == b.get("use")),
    ):
        if element in new:
            stored = patient.get(element, [])
            fresh = [
                next((old for old in stored if _better_name(old, item)), item)
                if element == "name"
                else item
                for item in new[element]
            ]
            kept = [old for old in stored if not any(same(old, item) for item in fresh)]
            patient[element] = [*fresh, *kept]
    if "gender" in new and not (new["gender"] == "unknown" and patient.get("gender")):
        patient["gender"] = new["gender"]
    if "birthDate" in new:
        known = str(patient.get("birthDate", ""))
        if not (len(known) > len(new["birthDate"]) and known.startswith(new["birthDate"])):
            patient["birthDate"] = new["birthDate"]
    return patient


def _name_text(name: dict[str, Any]) -> str:
    whole = name.get("text") or str(name.get("family", "")) + "".join(name.get("given", []))
    return "".join(str(whole).split())


def _better_name(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether a stored name is the same name as a new one, of the same use (or of none),
    with more of its parts told apart (family and given)."""
    return (
        old.get("use") in (None, new.get("use"))
        and _name_text(old) == _name_text(new)
        and _name_parts(old) > _name_parts(new)
    )


def _name_parts(name: dict[str, Any]) -> int:
    return int(bool(name.get("family"))) + int(bool(name.get("given")))
