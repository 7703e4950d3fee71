"""Taking the PACS's studies into the node: from DICOMweb (QIDO-RS) or from DICOM files.

:func:`store_study` stores one study in one transaction: it finds the study's Patient by
identifier (the MRN, the consortium's identifier) or creates it, then creates the ImagingStudy
or — when one with the same Study Instance UID exists — updates it, writing a new version only
when the content changed; an AuditEvent for what was written commits with it. Everything goes
through the resource store, so its observers (the pseudonym index) follow. A study is never
moved to another patient nor given another patient's instances, and identifiers naming two
patients are not guessed between: such a study is refused whole (PatientConflict), nothing
written, and kept in ``adapter_quarantine`` with a reason naming the local Patients — which
the output and the logs never do.

:func:`sync_round` asks a DICOMweb service for studies by StudyDate (QIDO-RS, paged), then
for each its series, its instances and one instance's metadata, and stores it. How far it
came is kept in ``adapter_sync_state`` (adapter ``dicomweb``, source the URL without
credentials) as the cursor ``{"study_date_from": "YYYYMMDD", "retry": [uid...]}``: the next
round asks for studies from ``overlap_days`` before the day this one started (China Standard
Time), and again for every study that failed. :func:`watch` repeats rounds until stopped.

A study a round refuses is kept in the quarantine (adapter ``dicomweb``, one open row per
study) and asked for again like a failed one; once the PACS is corrected it is stored and its
row marked replayed.

:func:`import_files` reads DICOM files (pydicom), groups them by study and stores each study,
adding its instances to what is stored. A file that is not DICOM or lacks a UID, or whose
study is refused, is reported by name with the reason and kept in the quarantine (adapter
``dicom``); the others go on. Symbolic links out of the directories given are not followed
(:func:`dicom_files`). :func:`replay` takes quarantined files and studies in again. See
docs/adapters-dicom.md.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO, Literal
from urllib.parse import urlsplit, urlunsplit

import pydicom
import requests
import sqlalchemy as sa
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from consent.pseudonym import RESIDENT_ID_SYSTEM
from fhir_adapters.dicom import (
    DICOM_UID_SYSTEM,
    NO_PATIENT_ID,
    DicomMappingError,
    StudySource,
    check_instance,
    content,
    imaging_study,
    instance_uid,
    merge_imaging_studies,
    patient_identifiers,
    patient_resource,
    series_uid,
    study_uid,
    text,
)
from fhir_adapters.errors import FhirError
from fhir_adapters.hl7v2 import masked
from fhir_adapters.store import Stored, Writer, now_micros
from fhir_adapters.store.search import EVERYONE, parse_search
from fhir_adapters.store.search_params import LOCAL_ZONE
from node.base.config import NodeConfig
from node.base.errors import NodeError
from node.db.schema import quarantine_table, sync_state_table
from node.intake.quarantine import (
    ORIGIN_LENGTH,
    QuarantineRow,
    keep_in_quarantine,
    quarantine_row,
)
from node.records.audit_trail import AuditRecord
from node.services import Services

log = logging.getLogger(__name__)

SYNC_ADAPTER = "dicomweb"
FILE_ADAPTER = "dicom"
DICOM_JSON = "application/dicom+json"
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory: an index, not an image
QUARANTINE_MAX_BYTES = 64 * 1024 * 1024  # larger files are recorded without their bytes
# QIDO-RS attributes asked for beyond each level's defaults (PS3.18 10.6.3.3)
SERIES_FIELDS = ("0008103E", "00180015", "00080021", "00080031", "00201209")
INSTANCE_FIELDS = ("00080016", "00200013", "00100020", "00100021")  # + whose they are
STUDY_FIELDS = ("00201206", "00201208")

Outcome = Literal["created", "updated", "unchanged"]


class DicomIntakeError(NodeError):
    """A study cannot be stored as it is (e.g. its identifier matches two Patients)."""


class PatientConflict(DicomIntakeError):
    """Storing a study would put it, or some of it, under another patient than the one it is
    stored for; or its DICOM names two or more patients here. Refused and never applied. The
    message says so without naming anyone (it goes to the output and the logs); ``detail``
    names the local Patients (``Patient/<id>``) and identifiers, for the quarantine only."""

    def __init__(self, message: str, detail: str) -> None:
        super().__init__(message)
        self.detail = detail


class DicomwebError(NodeError):
    """The DICOMweb service answered something other than what was asked for."""


class DicomwebUnavailable(DicomwebError):
    """The DICOMweb service could not be reached or did not answer in time."""


class StudyGone(DicomwebError):
    """The DICOMweb service no longer holds a study it listed (or that failed before)."""


# -- storing one study ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredStudy:
    uid: str
    outcome: Outcome
    study: Stored  # its current version
    patient_id: str
    patient_created: bool


def consortium_systems(config: NodeConfig) -> list[str]:
    """The identifier systems a DICOM issuer may name to mean "the consortium's identifier":
    the configured matching system and the resident ID."""
    return list(dict.fromkeys([config.identifier_system, RESIDENT_ID_SYSTEM]))


def _escape(value: str) -> str:
    """A token search value with FHIR's escapes (``\\`` ``,`` ``$`` ``|``)."""
    for char in ("\\", ",", "$", "|"):
        value = value.replace(char, "\\" + char)
    return value


def _with_identifier(
    writer: Writer, resource_type: str, system: str, values: Iterable[str], limit: int
) -> list[Stored]:
    """Up to ``limit`` current resources with ``system|value`` for any of ``values``, inside
    the writer's transaction."""
    query = ",".join(f"{_escape(system)}|{_escape(value)}" for value in dict.fromkeys(values))
    request = parse_search(resource_type, [("identifier", query)])
    found = writer.store.count_matches(request, EVERYONE, limit, conn=writer.conn)
    return [writer.store.by_pk(pk, conn=writer.conn) for pk in found]


def _variants(system: str, value: str) -> list[str]:
    """The ways an identifier may have been stored (a resident ID's check character x in
    either case)."""
    if system == RESIDENT_ID_SYSTEM:
        return [value, value[:-1] + value[-1:].lower()]
    return [value]


def _shown(identifier: dict[str, Any]) -> str:
    """An identifier as the quarantine's reasons name it (a resident ID masked)."""
    system, value = identifier["system"], identifier["value"]
    if system == RESIDENT_ID_SYSTEM:
        return f"resident ID {masked(value)}"
    if system.endswith(":mrn"):
        return f"MRN {value}"
    return f"{system}|{value}"


def find_patient(writer: Writer, config: NodeConfig, dataset: Dataset) -> Stored | None:
    """The Patient a study's patient attributes name — the one that has any of its
    identifiers (the MRN, the consortium's identifier) — or None when no Patient has any.
    PatientConflict when they name two or more Patients. A Patient found is not changed (the
    hospital's patient index, not the PACS, is the master of demographics)."""
    identifiers = patient_identifiers(dataset, config.node_id, consortium_systems(config))
    if not identifiers:
        raise DicomMappingError(NO_PATIENT_ID)
    found: dict[str, tuple[Stored, list[str]]] = {}
    for identifier in identifiers:
        system, value = identifier["system"], identifier["value"]
        writer.lock(f"Patient identifier {system}|{value}")
        patients = _with_identifier(writer, "Patient", system, _variants(system, value), 3)
        if len(patients) > 1:
            raise PatientConflict(
                "two or more Patients here have the identifier its DICOM names: refused; "
                "merge or correct them, then replay it",
                f"{', '.join(f'Patient/{p.id}' for p in patients)} all have the identifier "
                f"{_shown(identifier)} the DICOM names; merge or correct them, then replay",
            )
        for patient in patients:
            found.setdefault(patient.id, (patient, []))[1].append(_shown(identifier))
    if len(found) > 1:
        named = "; ".join(
            f"Patient/{patient_id} by {', '.join(shown)}"
            for patient_id, (_, shown) in sorted(found.items())
        )
        raise PatientConflict(
            "the identifiers its DICOM names belong to different patients here: refused; "
            "merge or correct them, then replay it",
            f"the DICOM's identifiers name different patients here ({named}); merge or "
            "correct them, then replay",
        )
    return next(iter(found.values()))[0] if found else None


def _patient_named(dataset: Dataset) -> tuple[str, str]:
    """Whom an instance says it is of: Patient ID (0010,0020) and its issuer (0010,0021)."""
    return text(dataset, "PatientID"), text(dataset, "IssuerOfPatientID")


def check_one_patient(writer: Writer, config: NodeConfig, source: StudySource) -> None:
    """PatientConflict unless every instance of the study (and its study attributes) names
    the same Patient ID and issuer: one study is one patient's, and two patients' images
    must never be merged into one. Instances whose Patient ID the PACS did not return are
    not compared."""
    named: dict[tuple[str, str], list[Dataset]] = {}
    for dataset in source.instances:
        if "PatientID" in dataset:
            named.setdefault(_patient_named(dataset), []).append(dataset)
    if "PatientID" in source.study:
        named.setdefault(_patient_named(source.study), [source.study])
    if len(named) < 2:
        return
    parts = []
    for datasets in named.values():
        systems = consortium_systems(config)
        identifiers = patient_identifiers(datasets[0], config.node_id, systems)
        if not identifiers:
            parts.append(f"no one (an empty Patient ID: {len(datasets)} of its instances)")
            continue
        patient = find_patient(writer, config, datasets[0])
        whom = f"Patient/{patient.id}" if patient else "a patient not known here"
        shown = ", ".join(_shown(i) for i in identifiers)
        parts.append(f"{whom} ({shown}: {len(datasets)} of its instances)")
    raise PatientConflict(
        "its instances do not all name the same patient (Patient ID (0010,0020) or its issuer "
        "differ): refused, nothing stored; a study is one patient's: correct the PACS (or the "
        "files), then replay it",
        f"its instances name different patients: {'; '.join(parts)}; a study is one "
        "patient's: correct the PACS (or the files), then replay",
    )


def store_study(
    services: Services,
    source: StudySource,
    *,
    wado_study_url: str | None,
    merge: bool,
    origin: str,
    agent: str,
) -> StoredStudy:
    """Store one study (see the module docstring). ``merge``: add its series and instances to
    what is stored (files) instead of replacing them (DICOMweb: the PACS holds the whole study).
    ``origin`` (the DICOMweb URL or the files) and ``agent`` go into the AuditEvent.

    A study stored for one Patient is never moved to another, nor given instances of another
    (PatientConflict, nothing written): what the DICOM says must name the Patient the stored
    study is for."""
    config = services.config
    uid = source.uid
    with services.store.writing() as writer:
        writer.lock(f"ImagingStudy {DICOM_UID_SYSTEM}|urn:oid:{uid}")
        check_one_patient(writer, config, source)
        patient = find_patient(writer, config, source.study)
        studies = _with_identifier(writer, "ImagingStudy", DICOM_UID_SYSTEM, [f"urn:oid:{uid}"], 2)
        if len(studies) > 1:
            raise DicomIntakeError(
                f"two or more ImagingStudy resources have its Study Instance UID "
                f"({', '.join(f'ImagingStudy/{s.id}' for s in studies)}); delete all but "
                "one, then send the study again"
            )
        existing = studies[0] if studies else None
        if existing is not None:
            _check_same_patient(existing, patient, source, config)
        patient_created = patient is None
        if patient is None:
            systems = consortium_systems(config)
            patient = writer.create(patient_resource(source.study, config.node_id, systems))
        new = imaging_study(source, f"Patient/{patient.id}", config.node_id, wado_study_url)
        outcome: Outcome
        if existing is None:
            stored = writer.create(new)
            outcome = "created"
        else:
            old = content(existing.resource())
            if merge:
                new = merge_imaging_studies(old, new)
            if old == new:
                stored, outcome = existing, "unchanged"
            else:
                stored, _ = writer.update(
                    "ImagingStudy",
                    existing.id,
                    {"resourceType": "ImagingStudy", "id": existing.id, **new},
                )
                outcome = "updated"
        if outcome != "unchanged":
            services.audit.record_in(
                writer,
                AuditRecord(
                    interaction="create" if outcome == "created" else "update",
                    username=agent,
                    role=None,
                    address=None,
                    client=f"hrx adapters {agent}",
                    description=f"DICOM study {uid} from {origin}"[:1000],
                    entities=[patient, stored] if patient_created else [stored],
                    patients={patient.id},
                ),
            )
    return StoredStudy(uid, outcome, stored, patient.id, patient_created)


def _check_same_patient(
    existing: Stored, patient: Stored | None, source: StudySource, config: NodeConfig
) -> None:
    """PatientConflict unless the stored study is about ``patient`` (the one the DICOM
    names; None: a patient not known here)."""
    subject = (existing.resource().get("subject") or {}).get("reference")
    if patient is not None and subject == f"Patient/{patient.id}":
        return
    identifiers = patient_identifiers(source.study, config.node_id, consortium_systems(config))
    named = ", ".join(_shown(i) for i in identifiers)
    whom = f"Patient/{patient.id}" if patient else "a patient not known here"
    raise PatientConflict(
        "is stored here for another patient than the one its DICOM names: refused, nothing "
        "changed; correct the patient in the PACS or the file (or the stored study here), "
        "then replay it",
        f"is already stored for {subject}, not for {whom} whom the DICOM names ({named}); "
        "correct the patient in the PACS or the file (or the stored study here), then replay",
    )


# -- DICOMweb ------------------------------------------------------------------------------------


def public_url(url: str) -> str:
    """A URL without the user and password it may carry (what is shown, stored and put in
    resources)."""
    parts = urlsplit(url.rstrip("/"))
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def _no_bulk_data(tag: str, vr: str, uri: str) -> None:
    """Bulk data (pixels) is never fetched: the mapping needs none."""
    return None


def from_dicom_json(items: list[Any], what: str) -> list[Dataset]:
    datasets = []
    for item in items:
        try:
            datasets.append(Dataset.from_json(item, bulk_data_uri_handler=_no_bulk_data))
        except Exception as exc:  # pydicom raises several kinds on malformed DICOM JSON
            raise DicomwebError(f"{what}: not DICOM JSON ({type(exc).__name__}: {exc})") from None
    return datasets


class DicomwebClient:
    """QIDO-RS and WADO-RS metadata requests to one DICOMweb service (its root URL; a user
    and password in the URL are sent as HTTP Basic credentials)."""

    def __init__(self, url: str, timeout_ms: int, page_size: int) -> None:
        self.url = url.rstrip("/")
        self.public_url = public_url(self.url)
        self.timeout = timeout_ms / 1000
        self.page_size = page_size
        self.session = requests.Session()
        self.session.headers["Accept"] = DICOM_JSON

    def close(self) -> None:
        self.session.close()

    def study_url(self, uid: str) -> str:
        """The study's WADO-RS URL (without credentials)."""
        return f"{self.public_url}/studies/{uid}"

    def get(self, path: str, params: dict[str, Any] | None = None) -> list[Any]:
        """GET ``path`` under the root: a DICOM JSON array (empty for 204 No Content)."""
        shown = self.public_url + path
        try:
            response = self.session.get(self.url + path, params=params, timeout=self.timeout)
        except requests.Timeout:
            raise DicomwebUnavailable(
                f"the DICOMweb service at {self.public_url} did not answer within "
                f"{self.timeout:g} s (GET {shown}); check that the PACS is up, or raise "
                "[dicomweb] timeout_ms in node.toml"
            ) from None
        except requests.RequestException as exc:
            raise DicomwebUnavailable(
                f"cannot reach the DICOMweb service at {self.public_url} "
                f"({type(exc).__name__}: {_first_line(exc)}); check that the PACS is running "
                "and that --url (or [dicomweb] url in node.toml, HRX_DICOMWEB_URL) names its "
                "DICOMweb root, e.g. http://pacs.example:8042/dicom-web"
            ) from None
        if response.status_code == 204:
            return []
        if response.status_code in (401, 403):
            raise DicomwebError(
                f"the DICOMweb service at {self.public_url} refused access (HTTP "
                f"{response.status_code}); give its user and password in the URL "
                "(http://user:password@host/dicom-web)"
            )
        if response.status_code == 404 and not path.startswith("/studies/"):
            raise DicomwebError(
                f"{shown} is not known to the server (HTTP 404); is {self.public_url} the "
                "DICOMweb root (Orthanc: http://host:8042/dicom-web)?"
            )
        if response.status_code == 404:
            raise StudyGone(f"the PACS no longer holds it (HTTP 404 for GET {shown})")
        if not 200 <= response.status_code < 300:
            raise DicomwebError(
                f"GET {shown} answered HTTP {response.status_code}: {response.text[:200].strip()}"
            )
        try:
            data = response.json()
        except ValueError:
            raise DicomwebError(
                f"GET {shown} did not answer with DICOM JSON (Content-Type "
                f"{response.headers.get('Content-Type', 'none')})"
            ) from None
        if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
            raise DicomwebError(f"GET {shown} did not answer with an array of DICOM JSON objects")
        return data

    def paged(self, path: str, params: dict[str, Any]) -> Iterator[Dataset]:
        """Every result of a QIDO-RS query, ``page_size`` at a time (``limit``/``offset``)."""
        offset = 0
        previous: list[Any] = []
        while True:
            page = self.get(path, {**params, "limit": self.page_size, "offset": offset})
            if page and page == previous:
                raise DicomwebError(
                    f"GET {self.public_url}{path} gave the same results for offset {offset} as "
                    "before it: the service ignores offset; raise [dicomweb] page_size above the "
                    "number of results"
                )
            yield from from_dicom_json(page, f"GET {self.public_url}{path}")
            if len(page) != self.page_size:  # fewer: the last page; more: limit ignored, all
                return
            offset += len(page)
            previous = page

    def study_uids(self, study_date_from: date | None) -> list[str]:
        """The Study Instance UIDs of the studies from ``study_date_from`` on (all when None),
        each once, in the order the service lists them."""
        params: dict[str, Any] = {"includefield": list(STUDY_FIELDS)}
        if study_date_from is not None:
            params["StudyDate"] = study_date_from.strftime("%Y%m%d") + "-"
        found: dict[str, None] = {}
        for dataset in self.paged("/studies", params):
            try:
                found.setdefault(study_uid(dataset), None)
            except DicomMappingError as exc:
                log.warning("%s listed a study that %s; skipped", self.public_url, exc)
        return list(found)

    def study_source(self, uid: str) -> StudySource:
        """A study's series and instances (QIDO-RS) and the metadata of its first instance
        (WADO-RS), which holds the patient and study attributes as a file would."""
        series = list(self.paged(f"/studies/{uid}/series", {"includefield": list(SERIES_FIELDS)}))
        instances = list(
            self.paged(f"/studies/{uid}/instances", {"includefield": list(INSTANCE_FIELDS)})
        )
        if not instances:
            raise StudyGone("the PACS lists no instances of it")
        for instance in instances:
            if "StudyInstanceUID" not in instance:
                instance.StudyInstanceUID = uid
        first = instances[0]
        try:
            metadata = self.get(
                f"/studies/{uid}/series/{series_uid(first)}/instances/{instance_uid(first)}"
                "/metadata"
            )
        except StudyGone:  # not gone: listed a moment ago (Orthanc: one SOP UID, two patients)
            raise DicomwebError(
                f"the PACS lists {len(instances)} instances of it but has no metadata for "
                f"instance {instance_uid(first)} (HTTP 404): does it hold that instance under "
                "two patients? Correct the PACS"
            ) from None
        studies = from_dicom_json(metadata, f"metadata of study {uid}")
        if not studies:
            raise StudyGone("the PACS gave no metadata for its first instance")
        return StudySource(studies[0], series, instances)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else ""


# -- the sync state ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cursor:
    """How far syncs from one source came: the StudyDate the next round starts from, and the
    studies that failed and are asked for again."""

    study_date_from: date | None
    retry: tuple[str, ...] = ()

    def dump(self) -> str:
        return json.dumps(
            {
                "study_date_from": (
                    self.study_date_from.strftime("%Y%m%d") if self.study_date_from else None
                ),
                "retry": list(self.retry),
            }
        )

    @classmethod
    def load(cls, text: str) -> Cursor | None:
        try:
            raw = json.loads(text)
            day = raw.get("study_date_from")
            return cls(
                datetime.strptime(day, "%Y%m%d").date() if day else None,
                tuple(str(uid) for uid in raw.get("retry", [])),
            )
        except (ValueError, TypeError, AttributeError):
            return None


def load_cursor(engine: Engine, source: str) -> Cursor | None:
    table = sync_state_table
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(table.c.cursor).where(
                table.c.adapter == SYNC_ADAPTER, table.c.source == source
            )
        ).first()
    return None if row is None else Cursor.load(row[0])


def save_cursor(conn: Connection, source: str, cursor: Cursor) -> None:
    table = sync_state_table
    values = {"last_run_at": now_micros(), "cursor": cursor.dump()}
    where = (table.c.adapter == SYNC_ADAPTER, table.c.source == source)
    if conn.execute(table.update().where(*where).values(**values)).rowcount == 0:
        conn.execute(table.insert().values(adapter=SYNC_ADAPTER, source=source, **values))


# -- the quarantine ------------------------------------------------------------------------------


class StudyRefused(DicomIntakeError):
    """A PatientConflict, kept in the quarantine: the message names no one but the row."""

    def __init__(self, conflict: PatientConflict, quarantine_id: int) -> None:
        super().__init__(f"{conflict} (quarantine #{quarantine_id})")
        self.quarantine_id = quarantine_id


def _clipped(origin: str) -> str:
    """An origin as the quarantine keeps it: 255 characters at most, a longer one its end."""
    return origin if len(origin) <= ORIGIN_LENGTH else "…" + origin[1 - ORIGIN_LENGTH :]


def quarantine(
    engine: Engine,
    adapter: str,
    origin: str,
    reason: str,
    payload: bytes,
    *,
    row_id: int | None = None,
    once_per_origin: bool = False,
) -> int:
    """Keep a refused file or study (written by the HL7 intake's :func:`keep_in_quarantine`)
    and return its row's id. A new row, unless an open row of ``origin`` holds this payload
    and reason already (a file imported again: that row), or — ``once_per_origin``, a study
    each sync round refuses again — holds anything (that row, given this reason and payload).
    ``row_id``: the row being replayed, given the new reason."""
    origin = _clipped(origin)
    Q = quarantine_table
    with engine.begin() as conn:
        if row_id is None:
            open_rows = conn.execute(
                sa.select(Q.c.id, Q.c.payload, Q.c.reason)
                .where(Q.c.adapter == adapter, Q.c.origin == origin, Q.c.replayed_at.is_(None))
                .order_by(Q.c.id)
            ).all()
            for found, kept, why in open_rows:
                if kept == payload and why == reason:
                    return int(found)
            if once_per_origin and open_rows:
                row_id = int(open_rows[0][0])
        return keep_in_quarantine(conn, adapter, origin, reason, payload, row_id=row_id)


def release(engine: Engine, adapter: str, origins: Iterable[str]) -> None:
    """What was refused before and is now stored (a corrected file imported, a study the PACS
    corrected, a replay): the open rows of these origins are marked replayed."""
    wanted = sorted({_clipped(origin) for origin in origins})
    Q = quarantine_table
    with engine.begin() as conn:
        for start in range(0, len(wanted), 500):
            conn.execute(
                Q.update()
                .where(
                    Q.c.adapter == adapter,
                    Q.c.origin.in_(wanted[start : start + 500]),
                    Q.c.replayed_at.is_(None),
                )
                .values(replayed_at=now_micros())
            )


def open_origins(engine: Engine, adapter: str) -> set[str]:
    """The origins of an adapter's open quarantine rows."""
    Q = quarantine_table
    with engine.connect() as conn:
        return set(
            conn.execute(
                sa.select(Q.c.origin).where(Q.c.adapter == adapter, Q.c.replayed_at.is_(None))
            ).scalars()
        )


def _reason(exc: BaseException) -> str:
    """Why a study or file was refused, as the output and the logs say it (naming no one)."""
    if isinstance(exc, FhirError):
        return "; ".join(issue.diagnostics for issue in exc.issues)
    if isinstance(exc, DicomMappingError | NodeError):
        return str(exc)
    return f"{type(exc).__name__}: {_first_line(exc)}"


def _kept_reason(exc: BaseException) -> str:
    """Why, as the quarantine keeps it (a PatientConflict naming the Patients)."""
    return exc.detail if isinstance(exc, PatientConflict) else _reason(exc)


# -- a sync round --------------------------------------------------------------------------------


@dataclass
class Tally:
    """What storing studies did."""

    created: int = 0
    updated: int = 0
    unchanged: int = 0
    refused: int = 0  # PatientConflicts: quarantined, nothing written
    patients_created: int = 0

    def count(self, stored: StoredStudy) -> None:
        setattr(self, stored.outcome, getattr(self, stored.outcome) + 1)
        self.patients_created += stored.patient_created

    def describe(self) -> str:
        return (
            f"{self.created} created, {self.updated} updated, {self.unchanged} unchanged, "
            f"{self.refused} refused ({self.patients_created} new patients)"
        )


@dataclass
class SyncReport:
    """One round of a DICOMweb sync."""

    source: str
    study_date_from: date | None  # the StudyDate filter it used; None: every study
    seen: int = 0
    tally: Tally = field(default_factory=Tally)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (study UID, reason)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (study UID, reason)
    gone: list[str] = field(default_factory=list)  # studies to retry the PACS no longer holds
    interrupted: bool = False

    def describe(self) -> str:
        scope = (
            f"StudyDate from {self.study_date_from.isoformat()}"
            if self.study_date_from
            else "every study"
        )
        line = (
            f"{self.source} ({scope}): {self.seen} studies seen: {self.tally.describe()}, "
            f"{len(self.failed)} failed"
        )
        if self.gone:
            line += f", {len(self.gone)} no longer on the PACS"
        return line + (" — interrupted" if self.interrupted else "")


def _dicom_json(source: StudySource) -> bytes:
    """What the PACS said of a study (its first instance's metadata, then its instances), as
    a DICOM JSON array: what the quarantine keeps of a study a sync refused."""
    items = []
    for dataset in [source.study, *source.instances]:
        try:
            items.append(dataset.to_json_dict())
        except Exception as exc:  # keep what can be kept: the reason says the rest
            items.append({"error": f"{type(exc).__name__}: {_first_line(exc)}"})
    return json.dumps(items, ensure_ascii=False).encode()


def sync_study(
    services: Services, client: DicomwebClient, uid: str, open_rows: set[str] | None = None
) -> StoredStudy:
    """Fetch one study from the PACS and store it. A PatientConflict is kept in the
    quarantine (adapter ``dicomweb``, origin the study's WADO-RS URL, one open row per study:
    the reason naming both Patients, and what the PACS said) and raised as StudyRefused. Once
    stored, the study's open rows (``open_rows``: the origins that have any; None: look) are
    marked replayed."""
    source = client.study_source(uid)
    origin = client.study_url(uid)
    engine = services.database.write_engine
    try:
        stored = store_study(
            services,
            source,
            wado_study_url=origin,
            merge=False,
            origin=client.public_url,
            agent="dicomweb-sync",
        )
    except PatientConflict as conflict:
        reason = f"study {uid} {conflict.detail}"
        row = quarantine(
            engine, SYNC_ADAPTER, origin, reason, _dicom_json(source), once_per_origin=True
        )
        raise StudyRefused(conflict, row) from None
    if open_rows is None or _clipped(origin) in open_rows:
        release(engine, SYNC_ADAPTER, [origin])
    return stored


def sync_round(
    services: Services,
    client: DicomwebClient,
    *,
    since: date | None = None,
    full: bool = False,
    stop: threading.Event | None = None,
    advance: Callable[[int], None] | None = None,
) -> SyncReport:
    """One round: list the studies from ``since`` (else the saved cursor; ``full``: every
    study), store each, and save the cursor unless the round was stopped. A study that fails,
    or is refused (:func:`sync_study`), is reported and asked for again next round; the
    service being unreachable ends the round (DicomwebUnavailable) with the cursor
    unchanged."""
    started = datetime.now(LOCAL_ZONE)
    engine = services.database.engine
    cursor = None if full else load_cursor(engine, client.public_url)
    if since is not None:
        date_from: date | None = since
    elif cursor is not None:
        date_from = cursor.study_date_from
    else:
        date_from = None
    report = SyncReport(client.public_url, date_from)
    listed = client.study_uids(date_from)
    retry = [uid for uid in (cursor.retry if cursor else ()) if uid not in listed]
    report.seen = len(listed) + len(retry)
    open_rows = open_origins(engine, SYNC_ADAPTER)
    for uid in [*listed, *retry]:
        if stop is not None and stop.is_set():
            report.interrupted = True
            break
        try:
            stored = sync_study(services, client, uid, open_rows)
        except (DicomwebUnavailable, SQLAlchemyError):
            raise
        except StudyRefused as exc:
            report.tally.refused += 1
            report.refused.append((uid, str(exc)))
        except StudyGone as exc:
            if uid in retry:
                report.gone.append(uid)
            else:
                report.failed.append((uid, _reason(exc)))
        except Exception as exc:  # one study's trouble must not stop the others
            if not isinstance(exc, DicomMappingError | NodeError | FhirError):
                log.exception("study %s from %s", uid, client.public_url)
            report.failed.append((uid, _reason(exc)))
        else:
            report.tally.count(stored)
        if advance is not None:
            advance(1)
    if not report.interrupted:
        next_from = started.date() - timedelta(days=services.config.dicomweb_overlap_days)
        again = tuple(uid for uid, _ in [*report.failed, *report.refused])
        with services.database.write_engine.begin() as conn:
            save_cursor(conn, client.public_url, Cursor(next_from, again))
    return report


def watch(
    services: Services,
    client: DicomwebClient,
    interval: float,
    stop: threading.Event,
    on_report: Callable[[SyncReport], None],
    on_error: Callable[[BaseException], None],
) -> None:
    """Sync every ``interval`` seconds until ``stop`` is set. A round that fails is reported
    to ``on_error`` and the next one tries again: nothing ends the watch but ``stop``."""
    while not stop.is_set():
        try:
            on_report(sync_round(services, client, stop=stop))
        except Exception as exc:
            on_error(exc)
        stop.wait(interval)


# -- DICOM files ---------------------------------------------------------------------------------


@dataclass
class ImportReport:
    """What ``dicom-import`` (or ``dicom-replay``) did with its files."""

    files: int = 0
    studies: int = 0
    tally: Tally = field(default_factory=Tally)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why): DICOMDIRs
    links: list[tuple[str, str]] = field(default_factory=list)  # (link, why): not followed

    def describe(self) -> str:
        line = (
            f"{self.files} files, {self.studies} studies: {self.tally.describe()}; "
            f"{len(self.bad)} files refused, {len(self.skipped)} skipped"
        )
        if self.links:
            line += f", {len(self.links)} links out of the tree not followed"
        return line


class DicomFileError(Exception):
    """A file cannot be taken in; the message is the reason."""


@dataclass
class FoundFiles:
    """The files under the paths given: each as found (what the report names) and the file
    read (a link's target); and the links not followed."""

    files: list[tuple[Path, Path]] = field(default_factory=list)
    links: list[tuple[str, str]] = field(default_factory=list)  # (link, why): out of the tree
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (link, why): to a directory


def dicom_files(paths: Iterable[Path]) -> FoundFiles:
    """The files named, and every file under the directories named (sorted, recursively;
    hidden files and directories, whose names start with a dot, left out).

    A symbolic link met under a directory named is followed only to a file inside that
    directory (the target is what is read). One pointing out of it, or looping, is not
    followed and its target never read (``links``); one to a directory inside it is skipped
    (``skipped``: its files are found under their own names). A path named on the command
    line is taken as named, link or not."""
    found = FoundFiles()
    for path in paths:
        if not path.is_dir():
            found.files.append((path, path))
            continue
        root = path.resolve()
        for top, directories, names in os.walk(path):
            here = Path(top)
            walked = []
            for name in sorted(d for d in directories if not d.startswith(".")):
                if (here / name).is_symlink():
                    _follow(found, here / name, root)
                else:
                    walked.append(name)
            directories[:] = walked
            for name in sorted(n for n in names if n[:1] != "."):
                entry = here / name
                if entry.is_symlink():
                    _follow(found, entry, root)
                else:
                    found.files.append((entry, entry))
    return found


def _follow(found: FoundFiles, link: Path, root: Path) -> None:
    """Where a link under ``root`` goes: a file inside it, or not followed (see
    :func:`dicom_files`)."""
    try:
        target = link.resolve()
    except (OSError, RuntimeError):  # a loop
        found.links.append((str(link), "is a symbolic link that loops: not followed"))
        return
    if not target.is_relative_to(root):
        found.links.append(
            (str(link), f"is a symbolic link pointing out of {root}: not followed, not read")
        )
    elif target.is_dir():
        found.skipped.append(
            (str(link), "a symbolic link to a directory (its files are read under their own names)")
        )
    else:
        found.files.append((link, target))


def read_instance(path: Path | BinaryIO, default_charset: str | None = None) -> Dataset | None:
    """A DICOM file's attributes (no pixel data); None for a DICOMDIR (an index of a medium,
    not an image). DicomFileError says why a file cannot be taken in. ``default_charset``
    (a DICOM term such as ``GB18030``) decodes the text of a file that names no Specific
    Character Set (0008,0005) — as modalities writing Chinese without saying so do."""
    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True, defer_size="16 KB")
    except FileNotFoundError:
        raise DicomFileError("does not exist") from None
    except IsADirectoryError:
        raise DicomFileError("is a directory") from None
    except PermissionError:
        raise DicomFileError("cannot be read (permission denied)") from None
    except InvalidDicomError:
        raise DicomFileError(
            "is not a DICOM file (no DICM marker after the 128-byte preamble, as DICOM PS3.10 "
            "files have)"
        ) from None
    except Exception as exc:  # truncated or corrupt files fail in many ways inside pydicom
        raise DicomFileError(f"cannot be read as DICOM ({type(exc).__name__}: {exc})") from None
    meta = getattr(dataset, "file_meta", None)
    if meta is not None and str(meta.get("MediaStorageSOPClassUID", "")) == DICOMDIR_CLASS:
        return None
    if default_charset and not dataset.get("SpecificCharacterSet"):
        # text is decoded when first read, with the character set the file was read with
        implicit, little = dataset.original_encoding
        dataset.set_original_encoding(implicit, little, default_charset)
        dataset.SpecificCharacterSet = default_charset
    try:
        check_instance(dataset)
    except DicomMappingError as exc:
        raise DicomFileError(str(exc)) from None
    return dataset


@dataclass(frozen=True)
class TakenFile:
    """A DICOM file read: how the report names it, the quarantine's origin for it (its real
    path), its content (the file, or a quarantine row's bytes), attributes, and the
    quarantine row it is replayed from."""

    name: str
    origin: str
    content: Path | bytes
    dataset: Dataset
    row_id: int | None = None


def _origin(path: Path) -> str:
    return str(path.resolve())


def quarantine_file(
    engine: Engine, origin: str, content: Path | bytes, reason: str, row_id: int | None = None
) -> int:
    """Keep a refused file's bytes and the reason (see :func:`quarantine`); a file over
    QUARANTINE_MAX_BYTES is kept without its bytes, the reason saying where it is."""
    if isinstance(content, bytes):
        payload = content
    else:
        try:
            size = content.stat().st_size
            payload = content.read_bytes() if size <= QUARANTINE_MAX_BYTES else b""
        except OSError:
            payload, size = b"", 0
        if size > QUARANTINE_MAX_BYTES:
            reason += (
                f" (the file, {size} bytes, is too large to keep here; it is still at {content})"
            )
    return quarantine(engine, FILE_ADAPTER, origin, reason, payload, row_id=row_id)


def import_files(
    services: Services,
    found: FoundFiles,
    *,
    default_charset: str | None = None,
    advance: Callable[[int], None] | None = None,
) -> ImportReport:
    """Read, group by study and store DICOM files (see the module docstring;
    ``default_charset``: see :func:`read_instance`)."""
    report = ImportReport(files=len(found.files), skipped=list(found.skipped))
    report.links = list(found.links)
    engine = services.database.write_engine
    taken: list[TakenFile] = []
    for name, path in found.files:
        try:
            dataset = read_instance(path, default_charset)
        except DicomFileError as exc:
            if path.is_file():
                row = quarantine_file(engine, _origin(path), path, str(exc))
                report.bad.append((str(name), f"{exc} (quarantine #{row})"))
            else:
                report.bad.append((str(name), str(exc)))
        else:
            if dataset is None:
                report.skipped.append((str(name), "a DICOMDIR (an index of the medium)"))
            else:
                taken.append(TakenFile(str(name), _origin(path), path, dataset))
        if advance is not None:
            advance(1)
    store_files(services, taken, report, agent="dicom-import")
    return report


def store_files(
    services: Services, taken: list[TakenFile], report: ImportReport, *, agent: str
) -> None:
    """Store files read, one study at a time, into ``report``. The files of a study that
    cannot be stored are kept in the quarantine (a PatientConflict's with the reason naming
    the Patients; the report's reason names no one); those of a study stored that were
    quarantined before are marked replayed."""
    engine = services.database.write_engine
    by_study: dict[str, list[TakenFile]] = {}
    for item in taken:
        by_study.setdefault(study_uid(item.dataset), []).append(item)
    report.studies += len(by_study)
    for uid in sorted(by_study):
        members = by_study[uid]
        datasets = [item.dataset for item in members]
        try:
            stored = store_study(
                services,
                StudySource(datasets[0], [], datasets),
                wado_study_url=None,
                merge=True,
                origin=f"{len(members)} DICOM files, e.g. {members[0].name}",
                agent=agent,
            )
        except SQLAlchemyError:
            raise
        except Exception as exc:
            if not isinstance(exc, DicomMappingError | NodeError | FhirError):
                log.exception("study %s from DICOM files", uid)
            report.tally.refused += isinstance(exc, PatientConflict)
            for item in members:
                kept = f"study {uid} {_kept_reason(exc)}"
                row = quarantine_file(engine, item.origin, item.content, kept, item.row_id)
                where = "" if item.row_id else f" (quarantine #{row})"
                report.bad.append((item.name, f"study {uid} {_reason(exc)}{where}"))
        else:
            report.tally.count(stored)
            release(engine, FILE_ADAPTER, [item.origin for item in members])


# -- replaying the quarantine --------------------------------------------------------------------


@dataclass
class ReplayReport:
    """What ``dicom-replay`` did: the quarantined files taken in again (as an import of
    them), the studies asked for again from the PACS, and the rows it could not replay."""

    files: ImportReport = field(default_factory=ImportReport)
    asked: int = 0  # studies asked for again from the PACS
    studies: Tally = field(default_factory=Tally)
    refused: list[tuple[int, str]] = field(default_factory=list)  # (row, why) studies
    not_replayed: list[tuple[int, str]] = field(default_factory=list)  # (row, why)


def replay(
    services: Services,
    row_ids: Iterable[int],
    client: DicomwebClient | None,
    *,
    default_charset: str | None = None,
) -> ReplayReport:
    """Take quarantined DICOM in again, after the cause was corrected: a file (adapter
    ``dicom``) from the bytes kept, the rows of one study together; a study a sync refused
    (adapter ``dicomweb``) from the PACS (``client``), as it is now. A row stored is marked
    replayed; one refused again keeps the new reason."""
    report = ReplayReport()
    engine = services.database.engine
    taken: list[TakenFile] = []
    for row_id in row_ids:
        try:
            row = quarantine_row(engine, row_id)
        except NodeError as exc:
            report.not_replayed.append((row_id, str(exc)))
            continue
        if row.replayed_at is not None:
            report.not_replayed.append((row_id, "was already replayed and stored"))
        elif row.adapter == FILE_ADAPTER:
            report.files.files += 1
            item = _quarantined_file(services, row, default_charset, report)
            if item is not None:
                taken.append(item)
        elif row.adapter == SYNC_ADAPTER:
            _replay_study(services, row, client, report)
        else:
            report.not_replayed.append(
                (row_id, f"holds a {row.adapter} item: replay it with that adapter's command")
            )
    store_files(services, taken, report.files, agent="dicom-replay")
    return report


def _quarantined_file(
    services: Services, row: QuarantineRow, default_charset: str | None, report: ReplayReport
) -> TakenFile | None:
    """A quarantined file to store again, or None (said in ``report``)."""
    assert row.payload is not None
    if not row.payload:
        report.not_replayed.append(
            (row.id, f"holds no bytes (the file was too large to keep): import {row.origin}")
        )
        return None
    name = f"quarantine #{row.id}"
    try:
        dataset = read_instance(BytesIO(row.payload), default_charset)
    except DicomFileError as exc:
        engine = services.database.write_engine
        quarantine_file(engine, row.origin, row.payload, str(exc), row.id)
        report.files.bad.append((name, str(exc)))
        return None
    if dataset is None:
        report.files.skipped.append((name, "a DICOMDIR (an index of the medium)"))
        return None
    return TakenFile(name, row.origin, row.payload, dataset, row.id)


def _replay_study(
    services: Services, row: QuarantineRow, client: DicomwebClient | None, report: ReplayReport
) -> None:
    uid = row.origin.rpartition("/studies/")[2]
    if client is None:
        report.not_replayed.append(
            (
                row.id,
                "is a study from a PACS: give its DICOMweb root with --url (or [dicomweb] url)",
            )
        )
        return
    if _clipped(client.study_url(uid)) != row.origin:
        report.not_replayed.append(
            (row.id, f"came from {row.origin}, not from {client.public_url}: give that --url")
        )
        return
    report.asked += 1
    try:
        report.studies.count(sync_study(services, client, uid))
    except (DicomwebUnavailable, SQLAlchemyError):
        raise
    except StudyRefused as exc:
        report.studies.refused += 1
        report.refused.append((row.id, f"study {uid} {exc}"))
    except Exception as exc:
        if not isinstance(exc, DicomMappingError | NodeError | FhirError):
            log.exception("replaying study %s", uid)
        report.not_replayed.append((row.id, f"study {uid} {_reason(exc)}"))
