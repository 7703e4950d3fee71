"""DICOM to FHIR R4: what a study's DICOM attributes say, as a Patient and an ImagingStudy.

The input is pydicom Datasets — read from files, or parsed from DICOMweb's DICOM JSON with
``Dataset.from_json`` — so character sets (GB18030, ISO_IR 192, ISO 2022...) are already
decoded and person names come with their alphabetic, ideographic and phonetic groups. Nothing
here touches a database or the network; :mod:`node.intake.dicom` stores what this returns.

The mapping (docs/adapters-dicom.md has the whole table):

- ImagingStudy.identifier: ``urn:dicom:uid`` | ``urn:oid:<StudyInstanceUID>`` (the FHIR R4
  convention), and the AccessionNumber as identifier type ACSN.
- series (sorted by SeriesNumber, then UID): uid, number, modality (DICOM DCM), description,
  bodySite (BodyPartExamined through :data:`BODY_PARTS`, SNOMED CT; the text kept as the
  display when unmapped), started, numberOfInstances and the instances (uid, SOP class,
  number); the study's modality list, numberOfSeries and numberOfInstances follow from them.
- started: StudyDate + StudyTime in TimezoneOffsetFromUTC, or in China Standard Time
  (+08:00) when the study gives no offset.
- Patient: PatientID as this hospital's MRN (``urn:hrx:member:<node>:mrn``) — unless its
  issuer names the consortium's identifier system (the resident ID), and the resident IDs of
  OtherPatientIDsSequence; PatientName groups as HumanNames (ideographic first), sex, birth date.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from consent.pseudonym import RESIDENT_ID_SYSTEM, normalized
from fhir_adapters.errors import AdapterError

DICOM_UID_SYSTEM = "urn:dicom:uid"
DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
SNOMED_SYSTEM = "http://snomed.info/sct"
URI_SYSTEM = "urn:ietf:rfc:3986"
IDENTIFIER_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0203"
CONNECTION_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
NAME_REPRESENTATION_URL = "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation"
LOCAL_ZONE = "+08:00"  # China Standard Time: what a study time without an offset means here
ENDPOINT_ID = "wado-rs"  # the contained Endpoint's id
OTHER_MODALITY = "OT"  # DICOM's "Other", for a series that names no modality

# BodyPartExamined (0018,0015) defined terms -> SNOMED CT, as DICOM PS3.16 Annex L
# ("Correspondence of Anatomic Region Codes and Body Part Examined Defined Terms") gives them.
# Keys are compared upper-cased with spaces, "_" and "-" removed ("WHOLE BODY" is WHOLEBODY).
BODY_PARTS: dict[str, tuple[str, str]] = {
    "ABDOMEN": ("818981001", "Abdomen"),
    "ABDOMENPELVIS": ("818982008", "Abdomen and Pelvis"),
    "ANKLE": ("70258002", "Ankle joint"),
    "BRAIN": ("12738006", "Brain"),
    "BREAST": ("76752008", "Breast"),
    "CHEST": ("43799004", "Chest"),
    "CHESTABDOMEN": ("416550000", "Chest and Abdomen"),
    "CHESTABDPELVIS": ("416775004", "Chest, Abdomen and Pelvis"),
    "CSPINE": ("122494005", "Cervical spine"),
    "ELBOW": ("16953009", "Elbow joint"),
    "EXTREMITY": ("66019005", "Extremity"),
    "FOOT": ("56459004", "Foot"),
    "HAND": ("85562004", "Hand"),
    "HEAD": ("69536005", "Head"),
    "HEADNECK": ("774007", "Head and Neck"),
    "HEART": ("80891009", "Heart"),
    "HIP": ("24136001", "Hip joint"),
    "KIDNEY": ("64033007", "Kidney"),
    "KNEE": ("72696002", "Knee"),
    "LIVER": ("10200004", "Liver"),
    "LSPINE": ("122496007", "Lumbar spine"),
    "LUNG": ("39607008", "Lung"),
    "NECK": ("45048000", "Neck"),
    "PELVIS": ("816092008", "Pelvis"),
    "SHOULDER": ("16982005", "Shoulder"),
    "SKULL": ("89546000", "Skull"),
    "SPINE": ("421060004", "Spine"),
    "THORAX": ("43799004", "Thorax"),
    "TSPINE": ("122495006", "Thoracic spine"),
    "WHOLEBODY": ("38266002", "Entire body"),
    "WRIST": ("74670003", "Wrist joint"),
}

_GENDERS = {"M": "male", "F": "female", "O": "other"}
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_TIME = re.compile(r"([0-9]{2})([0-9]{2})?([0-9]{2})?(\.[0-9]{1,6})?")
_OFFSET = re.compile(r"([+-])([0-9]{2})([0-9]{2})")
# Han, kana, Hangul: names written in these read family name first, without spaces
_CJK = re.compile("[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")


class DicomMappingError(AdapterError):
    """A study's DICOM cannot be mapped; the message says why, for the operator."""


NO_PATIENT_ID = (
    "has no Patient ID (0010,0020): cannot tell whose study it is; set the Patient ID in the "
    "PACS (or the file) and send it again"
)


@dataclass(frozen=True)
class StudySource:
    """One study's DICOM: the attributes of the study (patient and study modules; from a file
    or one instance's metadata), of each series, and of each instance. A series an instance
    names but ``series`` lacks is described by that instance's own attributes."""

    study: Dataset
    series: Sequence[Dataset]
    instances: Sequence[Dataset]

    @property
    def uid(self) -> str:
        return study_uid(self.study)


def text(dataset: Dataset, keyword: str) -> str:
    """An attribute's value as stripped text ('' when absent or empty; multiple values are
    joined with a backslash, as DICOM writes them)."""
    value = dataset.get(keyword)
    if value is None:
        return ""
    if isinstance(value, list | tuple | MultiValue):
        return "\\".join(str(item) for item in value).strip()
    return str(value).strip()


def _uid(dataset: Dataset, keyword: str, tag: str) -> str:
    value = text(dataset, keyword)
    if not value:
        raise DicomMappingError(f"lacks {_spaced(keyword)} {tag}")
    if len(value) > 64 or not _UID.fullmatch(value):
        raise DicomMappingError(f"{_spaced(keyword)} {tag} {value[:80]!r} is not a DICOM UID")
    return value


def _spaced(keyword: str) -> str:
    """``StudyInstanceUID`` -> ``Study Instance UID``."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", keyword)


def study_uid(dataset: Dataset) -> str:
    return _uid(dataset, "StudyInstanceUID", "(0020,000D)")


def series_uid(dataset: Dataset) -> str:
    return _uid(dataset, "SeriesInstanceUID", "(0020,000E)")


def instance_uid(dataset: Dataset) -> str:
    return _uid(dataset, "SOPInstanceUID", "(0008,0018)")


def check_instance(dataset: Dataset) -> None:
    """Raise DicomMappingError unless an instance carries the UIDs a study is built from."""
    study_uid(dataset)
    series_uid(dataset)
    instance_uid(dataset)
    _uid(dataset, "SOPClassUID", "(0008,0016)")


# -- the Patient ---------------------------------------------------------------------------------


def mrn_system(node_id: str) -> str:
    """The identifier system of a member's medical record numbers (shared with the HL7 v2
    adapter, so the LIS's and the PACS's records of one patient meet)."""
    return f"urn:hrx:member:{node_id}:mrn"


def accession_system(node_id: str) -> str:
    return f"urn:hrx:member:{node_id}:accession"


def _issuer_system(dataset: Dataset, systems: Sequence[str]) -> str | None:
    """The system of ``systems`` that an item's IssuerOfPatientID (0010,0021), or the ISO
    UniversalEntityID of its IssuerOfPatientIDQualifiersSequence (0010,0024), names."""
    names = [text(dataset, "IssuerOfPatientID")]
    for qualifiers in dataset.get("IssuerOfPatientIDQualifiersSequence", None) or []:
        if text(qualifiers, "UniversalEntityIDType").upper() in ("", "ISO"):
            names.append(text(qualifiers, "UniversalEntityID"))
    for name in filter(None, names):
        for system in systems:
            if name == system or f"urn:oid:{name}" == system:
                return system
    return None


def patient_identifiers(
    dataset: Dataset, node_id: str, consortium_systems: Sequence[str]
) -> list[dict[str, Any]]:
    """The Patient identifiers a study carries, the MRN first.

    PatientID (0010,0020) is this hospital's MRN, unless its issuer names one of
    ``consortium_systems`` (the consortium's matching identifier, the resident ID); then it is
    an identifier of that system. OtherPatientIDsSequence (0010,1002) items whose issuer names
    one of those systems add identifiers of it; other items are not used."""
    found: list[dict[str, Any]] = []
    patient_id = text(dataset, "PatientID")
    if patient_id:
        system = _issuer_system(dataset, consortium_systems)
        if system is not None:
            found.append(_consortium_identifier(system, patient_id))
        else:
            mrn: dict[str, Any] = {
                "type": {"coding": [{"system": IDENTIFIER_TYPE_SYSTEM, "code": "MR"}]},
                "system": mrn_system(node_id),
                "value": patient_id,
            }
            issuer = text(dataset, "IssuerOfPatientID")
            if issuer:
                mrn["assigner"] = {"display": issuer}
            found.append(mrn)
    for item in dataset.get("OtherPatientIDsSequence", None) or []:
        value = text(item, "PatientID")
        system = _issuer_system(item, consortium_systems)
        if value and system is not None:
            identifier = _consortium_identifier(system, value)
            if not any(
                known.get("system") == system and known.get("value") == identifier["value"]
                for known in found
            ):
                found.append(identifier)
    return found


def _consortium_identifier(system: str, value: str) -> dict[str, Any]:
    """An identifier of a consortium system; a resident ID written as the HL7 v2 adapter
    writes it (type NNCHN, check character upper-cased)."""
    if system != RESIDENT_ID_SYSTEM:
        return {"system": system, "value": value}
    return {
        "use": "official",
        "type": {
            "coding": [{"system": IDENTIFIER_TYPE_SYSTEM, "code": "NNCHN"}],
            "text": "居民身份证号",
        },
        "system": system,
        "value": normalized(system, value),
    }


def human_names(value: PersonName | str | None) -> list[dict[str, Any]]:
    """A DICOM person name as HumanNames: the ideographic group first (its text the name as
    Chinese write it, family name then given name), then the alphabetic and phonetic groups.
    When the name has more than one group each HumanName says which it is (ISO 21090
    representation: IDE, ABC, SYL)."""
    if value is None:
        return []
    name = value if isinstance(value, PersonName) else PersonName(str(value))
    groups = [
        ("IDE", str(name.ideographic or "")),
        ("ABC", str(name.alphabetic or "")),
        ("SYL", str(name.phonetic or "")),
    ]
    present = [(kind, group) for kind, group in groups if group.replace("^", "").strip()]
    names: list[dict[str, Any]] = []
    for kind, group in present:
        parts = [part.strip() for part in group.split("^")] + [""] * 5
        family, given, middle, prefix, suffix = parts[:5]
        human: dict[str, Any] = {}
        if len(present) > 1:
            human["extension"] = [{"url": NAME_REPRESENTATION_URL, "valueCode": kind}]
        if not names:
            human["use"] = "official"
        if _CJK.search(group):
            human["text"] = "".join(filter(None, [family, given, middle]))
        else:
            human["text"] = " ".join(filter(None, [prefix, given, middle, family, suffix]))
        if family:
            human["family"] = family
        if given or middle:
            human["given"] = [part for part in (given, middle) if part]
        if prefix:
            human["prefix"] = [prefix]
        if suffix:
            human["suffix"] = [suffix]
        if not human["text"]:
            del human["text"]
        names.append(human)
    return names


def fhir_date(value: str) -> str | None:
    """A DICOM DA (``YYYYMMDD``; also ``YYYY.MM.DD`` of old files) as a FHIR date, or None when
    it is empty or not a real date."""
    digits = value.strip().replace(".", "")
    if not re.fullmatch(r"[0-9]{8}", digits):
        return None
    try:
        day = date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        return None
    return None if day.year < 1 else day.isoformat()


def fhir_time(value: str) -> str | None:
    """A DICOM TM (``HH[MM[SS[.F{1,6}]]]``; colons of old files allowed) as ``HH:MM:SS[.F]``,
    or None when empty or not a time of day."""
    match = _TIME.fullmatch(value.strip().replace(":", ""))
    if not match:
        return None
    hours, minutes, seconds, fraction = match.groups()
    if int(hours) > 23 or int(minutes or 0) > 59 or int(seconds or 0) > 59:
        return None
    fraction = fraction if seconds and fraction else ""
    return f"{hours}:{minutes or '00'}:{seconds or '00'}{fraction}"


def zone_of(dataset: Dataset) -> str:
    """TimezoneOffsetFromUTC (0008,0201) as ``+hh:mm``; China Standard Time when absent."""
    match = _OFFSET.fullmatch(text(dataset, "TimezoneOffsetFromUTC"))
    if match and int(match.group(2)) <= 14 and int(match.group(3)) < 60:
        return f"{match.group(1)}{match.group(2)}:{match.group(3)}"
    return LOCAL_ZONE


def fhir_datetime(day: str, time: str, zone: str) -> str | None:
    when = fhir_date(day)
    if when is None:
        return None
    clock = fhir_time(time)
    return when if clock is None else f"{when}T{clock}{zone}"


def patient_resource(
    dataset: Dataset, node_id: str, consortium_systems: Sequence[str]
) -> dict[str, Any]:
    """A new Patient from a study's patient attributes (identifiers, name, sex, birth date)."""
    identifiers = patient_identifiers(dataset, node_id, consortium_systems)
    if not identifiers:
        raise DicomMappingError(NO_PATIENT_ID)
    patient: dict[str, Any] = {"resourceType": "Patient", "identifier": identifiers}
    names = human_names(dataset.get("PatientName"))
    if names:
        patient["name"] = names
    gender = _GENDERS.get(text(dataset, "PatientSex").upper())
    if gender:
        patient["gender"] = gender
    birth = fhir_date(text(dataset, "PatientBirthDate"))
    if birth:
        patient["birthDate"] = birth
    return patient


# -- the ImagingStudy ----------------------------------------------------------------------------


def body_site(value: str) -> dict[str, Any] | None:
    """BodyPartExamined as a SNOMED CT Coding (:data:`BODY_PARTS`), or a Coding holding just
    the text when the term is not in the table; None when empty."""
    if not value:
        return None
    key = re.sub(r"[\s_\-]", "", value).upper()
    if key in BODY_PARTS:
        code, display = BODY_PARTS[key]
        return {"system": SNOMED_SYSTEM, "code": code, "display": display}
    return {"display": value}


def _number(dataset: Dataset, keyword: str) -> int | None:
    value = text(dataset, keyword)
    try:
        number = int(value)
    except ValueError:
        return None
    return number if 0 <= number < 2**31 else None


def _modality(dataset: Dataset) -> dict[str, Any]:
    code = text(dataset, "Modality").upper() or OTHER_MODALITY
    return {"system": DCM_SYSTEM, "code": code}


def _order(number: int | None, uid: str) -> tuple[bool, int, str]:
    return (number is None, number or 0, uid)


def _instance_entry(dataset: Dataset) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "uid": instance_uid(dataset),
        "sopClass": {
            "system": URI_SYSTEM,
            "code": "urn:oid:" + _uid(dataset, "SOPClassUID", "(0008,0016)"),
        },
    }
    number = _number(dataset, "InstanceNumber")
    if number is not None:
        entry["number"] = number
    return entry


def _series_entry(dataset: Dataset, zone: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"uid": series_uid(dataset)}
    number = _number(dataset, "SeriesNumber")
    if number is not None:
        entry["number"] = number
    entry["modality"] = _modality(dataset)
    description = text(dataset, "SeriesDescription")
    if description:
        entry["description"] = description
    site = body_site(text(dataset, "BodyPartExamined"))
    if site:
        entry["bodySite"] = site
    started = fhir_datetime(text(dataset, "SeriesDate"), text(dataset, "SeriesTime"), zone)
    if started:
        entry["started"] = started
    return entry


def wado_endpoint(study_url: str) -> dict[str, Any]:
    """The contained Endpoint through which the study is retrieved (WADO-RS)."""
    return {
        "resourceType": "Endpoint",
        "id": ENDPOINT_ID,
        "status": "active",
        "connectionType": {"system": CONNECTION_TYPE_SYSTEM, "code": "dicom-wado-rs"},
        "payloadType": [{"text": "DICOM"}],
        "payloadMimeType": ["application/dicom"],
        "address": study_url,
    }


def imaging_study(
    source: StudySource,
    patient_reference: str,
    node_id: str,
    wado_study_url: str | None = None,
) -> dict[str, Any]:
    """The ImagingStudy of a study's DICOM, about ``patient_reference`` (``Patient/<id>``);
    with a contained WADO-RS Endpoint when ``wado_study_url`` is given."""
    study = source.study
    uid = study_uid(study)
    zone = zone_of(study)
    series: dict[str, dict[str, Any]] = {}
    for dataset in source.series:
        entry = _series_entry(dataset, zone)
        series.setdefault(entry["uid"], entry)
    instances: dict[str, dict[str, dict[str, Any]]] = {}
    for dataset in source.instances:
        if study_uid(dataset) != uid:
            raise DicomMappingError(
                f"instance {instance_uid(dataset)} belongs to study {study_uid(dataset)}, not {uid}"
            )
        owner = series_uid(dataset)
        if owner not in series:
            series[owner] = _series_entry(dataset, zone)
        entry = _instance_entry(dataset)
        instances.setdefault(owner, {}).setdefault(entry["uid"], entry)
    for owner, entry in series.items():
        entry["instance"] = list(instances.get(owner, {}).values())
    resource: dict[str, Any] = {"resourceType": "ImagingStudy"}
    if wado_study_url:
        resource["contained"] = [wado_endpoint(wado_study_url)]
    identifiers: list[dict[str, Any]] = [{"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"}]
    accession = text(study, "AccessionNumber")
    if accession:
        identifiers.append(
            {
                "use": "usual",
                "type": {"coding": [{"system": IDENTIFIER_TYPE_SYSTEM, "code": "ACSN"}]},
                "system": accession_system(node_id),
                "value": accession,
            }
        )
    resource["identifier"] = identifiers
    resource["status"] = "available"
    resource["subject"] = {"reference": patient_reference}
    started = fhir_datetime(text(study, "StudyDate"), text(study, "StudyTime"), zone)
    if started:
        resource["started"] = started
    if wado_study_url:
        resource["endpoint"] = [{"reference": f"#{ENDPOINT_ID}"}]
    description = text(study, "StudyDescription")
    if description:
        resource["description"] = description
    return with_series(resource, series.values())


def with_series(resource: dict[str, Any], series: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The ImagingStudy with these series (sorted; each with its instances sorted and
    counted) and the study's modality list and counts that follow from them, in FHIR's
    element order."""
    entries = []
    for item in series:
        entry = {key: value for key, value in item.items() if key != "instance"}
        instances = sorted(
            item.get("instance", []), key=lambda i: _order(i.get("number"), i["uid"])
        )
        entry["numberOfInstances"] = len(instances)
        if instances:
            entry["instance"] = instances
        entries.append(_ordered(entry, _SERIES_ORDER))
    entries.sort(key=lambda e: _order(e.get("number"), e["uid"]))
    study = {key: value for key, value in resource.items() if key not in _DERIVED}
    modalities: list[dict[str, Any]] = []
    for entry in entries:
        if entry["modality"] not in modalities:
            modalities.append(entry["modality"])
    if modalities:
        study["modality"] = modalities
    study["numberOfSeries"] = len(entries)
    study["numberOfInstances"] = sum(entry["numberOfInstances"] for entry in entries)
    if entries:
        study["series"] = entries
    return _ordered(study, _STUDY_ORDER)


_DERIVED = ("modality", "numberOfSeries", "numberOfInstances", "series")
_STUDY_ORDER = (
    "resourceType",
    "id",
    "meta",
    "contained",
    "identifier",
    "status",
    "modality",
    "subject",
    "started",
    "endpoint",
    "numberOfSeries",
    "numberOfInstances",
    "description",
    "series",
)
_SERIES_ORDER = (
    "uid",
    "number",
    "modality",
    "description",
    "numberOfInstances",
    "bodySite",
    "started",
    "instance",
)


def _ordered(resource: dict[str, Any], order: Sequence[str]) -> dict[str, Any]:
    """The same elements, the known ones in ``order`` and any others after them."""
    rank = {key: index for index, key in enumerate(order)}
    return dict(sorted(resource.items(), key=lambda item: rank.get(item[0], len(order))))


def merge_imaging_studies(existing: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """What a study is once ``new`` (from some of its files) is added to what was stored:
    the study's attributes of ``new``, every series and instance of either (those of ``new``
    winning), and the stored WADO-RS endpoint when ``new`` has none."""
    series: dict[str, dict[str, Any]] = {}
    for item in existing.get("series", []):
        series[item["uid"]] = item
    for item in new.get("series", []):
        old = series.get(item["uid"], {})
        merged_instances = {i["uid"]: i for i in old.get("instance", [])}
        merged_instances.update({i["uid"]: i for i in item.get("instance", [])})
        series[item["uid"]] = {**item, "instance": list(merged_instances.values())}
    merged = dict(new)
    if "endpoint" not in new and "endpoint" in existing:
        merged["contained"] = existing.get("contained", [])
        merged["endpoint"] = existing["endpoint"]
        if not merged["contained"]:
            del merged["contained"]
    return with_series(merged, series.values())


def content(resource: dict[str, Any]) -> dict[str, Any]:
    """A resource without what the server sets (id, meta): what a comparison looks at."""
    return {key: value for key, value in resource.items() if key not in ("id", "meta")}
