"""Taking the PACS's studies into the node: from DICOMweb (QIDO-RS) or from DICOM files.

:func:`store_study` stores one study in one transaction: it finds the study's Patient by
identifier (the MRN first, then the consortium's identifier) or creates it, then creates the
ImagingStudy or — when one with the same Study Instance UID exists — updates it, writing a new
version only when the content changed; an AuditEvent for what was written commits with it.
Everything goes through the resource store, so its observers (the pseudonym index) follow.

:func:`sync_round` asks a DICOMweb service for studies by StudyDate (QIDO-RS, paged), then
for each its series, its instances and one instance's metadata, and stores it. How far it
came is kept in ``adapter_sync_state`` (adapter ``dicomweb``, source the URL without
credentials) as the cursor ``{"study_date_from": "YYYYMMDD", "retry": [uid...]}``: the next
round asks for studies from ``overlap_days`` before the day this one started (China Standard
Time), and again for every study that failed. :func:`watch` repeats rounds until stopped.

:func:`import_files` reads DICOM files (pydicom), groups them by study and stores each study,
adding its instances to what is stored. A file that is not DICOM or lacks a UID is reported
by name with the reason and kept in ``adapter_quarantine`` (adapter ``dicom``); the others go
on. See docs/adapters-dicom.md.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
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
)
from fhir_adapters.errors import FhirError
from fhir_adapters.search import EVERYONE, parse_search
from fhir_adapters.search_params import LOCAL_ZONE
from fhir_adapters.store import Stored, Writer, now_micros
from node.adapter_tables import quarantine_table, sync_state_table
from node.audit import AuditRecord
from node.config import NodeConfig
from node.errors import NodeError
from node.services import Services

log = logging.getLogger(__name__)

SYNC_ADAPTER = "dicomweb"
FILE_ADAPTER = "dicom"
DICOM_JSON = "application/dicom+json"
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory: an index, not an image
QUARANTINE_MAX_BYTES = 64 * 1024 * 1024  # larger files are recorded without their bytes
# QIDO-RS attributes asked for beyond each level's defaults (PS3.18 10.6.3.3)
SERIES_FIELDS = ("0008103E", "00180015", "00080021", "00080031", "00201209")
INSTANCE_FIELDS = ("00080016", "00200013")
STUDY_FIELDS = ("00201206", "00201208")

Outcome = Literal["created", "updated", "unchanged"]


class DicomIntakeError(NodeError):
    """A study cannot be stored as it is (e.g. its identifier matches two Patients)."""


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


def find_by_identifier(
    writer: Writer, resource_type: str, system: str, values: Iterable[str]
) -> Stored | None:
    """The one current resource with ``system|value`` for any of ``values``, inside the
    writer's transaction; DicomIntakeError when several have it."""
    query = ",".join(f"{_escape(system)}|{_escape(value)}" for value in dict.fromkeys(values))
    request = parse_search(resource_type, [("identifier", query)])
    found = writer.store.count_matches(request, EVERYONE, 2, conn=writer.conn)
    if len(found) > 1:
        raise DicomIntakeError(
            f"two or more {resource_type} resources have the identifier {system}|"
            f"{next(iter(values))}; merge or correct them, then send the study again"
        )
    return writer.store.by_pk(found[0], conn=writer.conn) if found else None


def _variants(system: str, value: str) -> list[str]:
    """The ways an identifier may have been stored (a resident ID's check character x in
    either case)."""
    if system == RESIDENT_ID_SYSTEM:
        return [value, value[:-1] + value[-1:].lower()]
    return [value]


def patient_for(writer: Writer, config: NodeConfig, dataset: Dataset) -> tuple[Stored, bool]:
    """The Patient a study's patient attributes name — found by its MRN, then by the
    consortium's identifier — or a new one; True when created. A Patient found is not changed
    (the hospital's patient index, not the PACS, is the master of demographics)."""
    systems = consortium_systems(config)
    identifiers = patient_identifiers(dataset, config.node_id, systems)
    if not identifiers:
        raise DicomMappingError(NO_PATIENT_ID)
    for identifier in identifiers:
        system, value = identifier["system"], identifier["value"]
        writer.lock(f"Patient identifier {system}|{value}")
        found = find_by_identifier(writer, "Patient", system, _variants(system, value))
        if found is not None:
            return found, False
    return writer.create(patient_resource(dataset, config.node_id, systems)), True


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
    ``origin`` (the DICOMweb URL or the files) and ``agent`` go into the AuditEvent."""
    config = services.config
    uid = source.uid
    with services.store.writing() as writer:
        writer.lock(f"ImagingStudy {DICOM_UID_SYSTEM}|urn:oid:{uid}")
        patient, patient_created = patient_for(writer, config, source.study)
        new = imaging_study(source, f"Patient/{patient.id}", config.node_id, wado_study_url)
        existing = find_by_identifier(writer, "ImagingStudy", DICOM_UID_SYSTEM, [f"urn:oid:{uid}"])
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
        metadata = self.get(
            f"/studies/{uid}/series/{series_uid(first)}/instances/{instance_uid(first)}/metadata"
        )
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


# -- a sync round --------------------------------------------------------------------------------


@dataclass
class Tally:
    """What storing studies did."""

    created: int = 0
    updated: int = 0
    unchanged: int = 0
    patients_created: int = 0

    def count(self, stored: StoredStudy) -> None:
        setattr(self, stored.outcome, getattr(self, stored.outcome) + 1)
        self.patients_created += stored.patient_created

    def describe(self) -> str:
        return (
            f"{self.created} created, {self.updated} updated, {self.unchanged} unchanged "
            f"({self.patients_created} new patients)"
        )


@dataclass
class SyncReport:
    """One round of a DICOMweb sync."""

    source: str
    study_date_from: date | None  # the StudyDate filter it used; None: every study
    seen: int = 0
    tally: Tally = field(default_factory=Tally)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (study UID, reason)
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


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FhirError):
        return "; ".join(issue.diagnostics for issue in exc.issues)
    if isinstance(exc, DicomMappingError | NodeError):
        return str(exc)
    return f"{type(exc).__name__}: {_first_line(exc)}"


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
    study), store each, and save the cursor unless the round was stopped. A study that fails
    is reported and asked for again next round; the service being unreachable ends the round
    (DicomwebUnavailable) with the cursor unchanged."""
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
    for uid in [*listed, *retry]:
        if stop is not None and stop.is_set():
            report.interrupted = True
            break
        try:
            source = client.study_source(uid)
            stored = store_study(
                services,
                source,
                wado_study_url=client.study_url(uid),
                merge=False,
                origin=client.public_url,
                agent="dicomweb-sync",
            )
        except (DicomwebUnavailable, SQLAlchemyError):
            raise
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
        with services.database.write_engine.begin() as conn:
            save_cursor(
                conn, client.public_url, Cursor(next_from, tuple(uid for uid, _ in report.failed))
            )
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
    """What ``dicom-import`` did with its files."""

    files: int = 0
    studies: int = 0
    tally: Tally = field(default_factory=Tally)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why): DICOMDIRs

    def describe(self) -> str:
        return (
            f"{self.files} files, {self.studies} studies: {self.tally.describe()}; "
            f"{len(self.bad)} files refused, {len(self.skipped)} skipped"
        )


class DicomFileError(Exception):
    """A file cannot be taken in; the message is the reason."""


def dicom_files(paths: Iterable[Path]) -> list[Path]:
    """The files named, and every file under the directories named (sorted, recursively;
    hidden files and directories, whose names start with a dot, left out)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            for root, directories, names in os.walk(path):
                directories[:] = sorted(d for d in directories if not d.startswith("."))
                found.extend(Path(root) / name for name in sorted(names) if name[:1] != ".")
        else:
            found.append(path)
    return found


def read_instance(path: Path, default_charset: str | None = None) -> Dataset | None:
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


def quarantine_file(engine: Engine, path: Path, reason: str) -> None:
    """Keep a refused file's bytes and the reason (once while it is not replayed)."""
    origin = _origin(path)
    try:
        size = path.stat().st_size
        payload = path.read_bytes() if size <= QUARANTINE_MAX_BYTES else b""
    except OSError:
        payload, size = b"", 0
    if size > QUARANTINE_MAX_BYTES:
        reason += f" (the file, {size} bytes, is too large to keep here; it is still at {path})"
    table = quarantine_table
    with engine.begin() as conn:
        open_rows = conn.execute(
            sa.select(table.c.payload, table.c.reason).where(
                table.c.adapter == FILE_ADAPTER,
                table.c.origin == origin,
                table.c.replayed_at.is_(None),
            )
        ).all()
        if any(row[0] == payload and row[1] == reason for row in open_rows):
            return
        conn.execute(
            table.insert().values(
                adapter=FILE_ADAPTER,
                received_at=now_micros(),
                origin=origin,
                reason=reason,
                payload=payload,
            )
        )


def _release_quarantined(engine: Engine, paths: Iterable[Path]) -> None:
    """Files that were refused before and are now stored: their quarantine rows are done."""
    origins = sorted({_origin(path) for path in paths})
    table = quarantine_table
    with engine.begin() as conn:
        for start in range(0, len(origins), 500):
            conn.execute(
                table.update()
                .where(
                    table.c.adapter == FILE_ADAPTER,
                    table.c.origin.in_(origins[start : start + 500]),
                    table.c.replayed_at.is_(None),
                )
                .values(replayed_at=now_micros())
            )


def _origin(path: Path) -> str:
    text = str(path.resolve())
    return text if len(text) <= 255 else "…" + text[-254:]


def import_files(
    services: Services,
    paths: Iterable[Path],
    *,
    default_charset: str | None = None,
    advance: Callable[[int], None] | None = None,
) -> ImportReport:
    """Read, group by study and store DICOM files (see the module docstring;
    ``default_charset``: see :func:`read_instance`)."""
    files = dicom_files(paths)
    report = ImportReport(files=len(files))
    engine = services.database.write_engine
    by_study: dict[str, list[tuple[Path, Dataset]]] = {}
    for path in files:
        try:
            dataset = read_instance(path, default_charset)
        except DicomFileError as exc:
            report.bad.append((str(path), str(exc)))
            if path.is_file():
                quarantine_file(engine, path, str(exc))
        else:
            if dataset is None:
                report.skipped.append((str(path), "a DICOMDIR (an index of the medium)"))
            else:
                by_study.setdefault(study_uid(dataset), []).append((path, dataset))
        if advance is not None:
            advance(1)
    report.studies = len(by_study)
    for uid in sorted(by_study):
        members = by_study[uid]
        datasets = [dataset for _, dataset in members]
        try:
            stored = store_study(
                services,
                StudySource(datasets[0], [], datasets),
                wado_study_url=None,
                merge=True,
                origin=f"{len(members)} DICOM files, e.g. {members[0][0]}",
                agent="dicom-import",
            )
        except SQLAlchemyError:
            raise
        except Exception as exc:
            if not isinstance(exc, DicomMappingError | NodeError | FhirError):
                log.exception("study %s from DICOM files", uid)
            reason = f"study {uid} {_reason(exc)}"
            for path, _ in members:
                report.bad.append((str(path), reason))
                quarantine_file(engine, path, reason)
        else:
            report.tally.count(stored)
            _release_quarantined(engine, [path for path, _ in members])
    return report
