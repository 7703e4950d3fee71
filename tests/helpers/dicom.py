"""DICOM for the PACS adapter's tests: pydicom's sample files, copies of them as studies of
their own, ``hrx`` run in this process with its Result, a node to import into, and what the
node then stores (its studies by UID, its patients by MRN, how many versions)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pydicom
import pydicom.data
import sqlalchemy as sa
from click.testing import CliRunner, Result
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from fhir_adapters.store import tables
from node.cli import main
from node.services import Services
from tests.helpers.nodes import free_port, init_node, join_alone

SAMPLES = Path(pydicom.data.__file__).parent
TEST_FILES = SAMPLES / "test_files"
CHARSET_FILES = SAMPLES / "charset_files"
MRN = "urn:hrx:member:hosp-a:mrn"


def hrx(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


def read(path: Path) -> Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def uid_of(*sources: str) -> str:
    return str(generate_uid(entropy_srcs=["hrx-test", *sources]))


def new_study(source: Path, name: str, *, directory: Path, **attributes: Any) -> Path:
    """A copy of a sample file as a study of its own (new UIDs), with ``attributes`` set."""
    dataset = pydicom.dcmread(source)
    dataset.StudyInstanceUID = uid_of(name, "study")
    dataset.SeriesInstanceUID = uid_of(name, "series")
    dataset.SOPInstanceUID = uid_of(name, "instance")
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    for keyword, value in attributes.items():
        if value is None:
            delattr(dataset, keyword)
        else:
            setattr(dataset, keyword, value)
    path = directory / name
    dataset.save_as(path, enforce_file_format=True)
    return path


def new_node(directory: Path, db_url: str | None = None) -> Path:
    init_node(directory, "hosp-a", db_url, free_port())
    join_alone(directory)
    return directory


def current(services: Services, resource_type: str) -> list[dict[str, Any]]:
    R = tables.resources
    with services.database.engine.connect() as conn:
        ids = conn.execute(
            sa.select(R.c.id).where(R.c.type == resource_type, R.c.deleted.is_(False))
        ).scalars()
        return [services.store.read(resource_type, i).resource() for i in ids]


def studies_by_uid(services: Services) -> dict[str, dict[str, Any]]:
    found = {}
    for study in current(services, "ImagingStudy"):
        (uid,) = [i["value"] for i in study["identifier"] if i["system"] == "urn:dicom:uid"]
        assert uid.startswith("urn:oid:")
        found[uid[len("urn:oid:") :]] = study
    return found


def patient_by_mrn(services: Services) -> dict[str, dict[str, Any]]:
    found = {}
    for patient in current(services, "Patient"):
        for identifier in patient["identifier"]:
            if identifier["system"] == MRN:
                found[identifier["value"]] = patient
    return found


def version_count(services: Services) -> int:
    with services.database.engine.connect() as conn:
        count = conn.execute(sa.select(sa.func.count()).select_from(tables.versions)).scalar()
        return int(count or 0)


def wait_for(path: Path, text: str, process: subprocess.Popen[bytes], seconds: float = 60) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        content = path.read_text(errors="replace") if path.exists() else ""
        if text in content:
            return content
        if process.poll() is not None:
            raise AssertionError(f"exited with {process.returncode} before {text!r}: {content}")
        time.sleep(0.1)
    raise AssertionError(f"{text!r} never appeared in {path}")


def chest_ct(directory: Path, resident_id: str, name: str = "ct", slices: int = 3) -> list[Path]:
    """A CT of the chest: ``slices`` slices of one series (written out of order), whose
    patient carries an MRN and, as another ID, a resident ID; by instance number."""
    other = Dataset()
    other.PatientID = resident_id
    other.IssuerOfPatientID = "2.16.156.10011.1.3"
    directory.mkdir(parents=True, exist_ok=True)
    made = []
    for number in [*range(slices, 0, -1)]:
        path = new_study(
            TEST_FILES / "CT_small.dcm",
            f"{name}-{number}.dcm",
            directory=directory,
            PatientID="MRN-7",
            PatientName="Zhang^San=张^三",
            SpecificCharacterSet="ISO_IR 192",
            OtherPatientIDsSequence=[other],
            BodyPartExamined="CHEST",
            InstanceNumber=number,
        )
        dataset = pydicom.dcmread(path)  # one study and series; an instance of its own
        dataset.StudyInstanceUID = uid_of(name, resident_id, "study")
        dataset.SeriesInstanceUID = uid_of(name, resident_id, "series")
        dataset.SOPInstanceUID = uid_of(name, resident_id, str(number))
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.save_as(path, enforce_file_format=True)
        made.append((number, path))
    return [path for _, path in sorted(made)]
