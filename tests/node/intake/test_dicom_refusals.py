"""What the PACS adapter refuses, through the real commands (and a real Orthanc): a study
stored for one patient is never moved to another, nor given another patient's images — by
``dicom-import`` or by ``dicomweb-sync`` (also ``--watch``); the refusal is counted, quarantined
with both local patients named (in the quarantine only: never in the output or the log),
nothing stored changes, and ``dicom-replay`` takes it in once corrected. And ``dicom-import``
does not follow symbolic links out of the directory it was given."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
import sqlalchemy as sa

from fhir_adapters.store import tables
from node.base.config import load_config
from node.db.schema import quarantine_table, sync_state_table
from node.demo import orthanc
from node.services import Services, open_services
from tests.helpers import ROOT
from tests.helpers.dicom import (
    TEST_FILES,
    hrx,
    new_node,
    new_study,
    patient_by_mrn,
    read,
    studies_by_uid,
    uid_of,
    version_count,
    wait_for,
)

pytestmark = pytest.mark.skipif(orthanc.missing() is not None, reason=str(orthanc.missing()))

RESIDENT_OID = "2.16.156.10011.1.3"
# who the test patients are; none of it may reach the output or the log
UTF8 = "ISO_IR 192"
PATIENT_A = {
    "PatientID": "PAT-A-0001",
    "PatientName": "Zhang^San=张^三",
    "SpecificCharacterSet": UTF8,
}
PATIENT_B = {"PatientID": "PAT-B-0002", "PatientName": "Li^Si=李^四", "SpecificCharacterSet": UTF8}
PATIENT_C = {
    "PatientID": "PAT-C-0003",
    "PatientName": "Wang^Wu=王^五",
    "SpecificCharacterSet": UTF8,
}
WHO = ["PAT-A-0001", "PAT-B-0002", "PAT-C-0003", "Zhang", "张三", "李四", "Wang^Wu", "王五"]


@pytest.fixture
def services_of() -> Iterator[Any]:
    """Opens a node's services (closed after the test)."""
    opened: list[Services] = []

    def open_(directory: Path) -> Services:
        opened.append(open_services(load_config(directory)))
        return opened[-1]

    yield open_
    for services in opened:
        services.close()


def copy_of(source: Path, target: Path, **attributes: Any) -> Path:
    """``source`` with ``attributes`` set, its UIDs kept unless given."""
    dataset = pydicom.dcmread(source)
    for keyword, value in attributes.items():
        setattr(dataset, keyword, value)
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.save_as(target, enforce_file_format=True)
    return target


def quarantine_rows(services: Any, adapter: str) -> list[Any]:
    Q = quarantine_table
    with services.database.engine.connect() as conn:
        return list(conn.execute(sa.select(Q).where(Q.c.adapter == adapter).order_by(Q.c.id)))


def patient_count(services: Any) -> int:
    R = tables.resources
    with services.database.engine.connect() as conn:
        count = conn.execute(
            sa.select(sa.func.count()).select_from(R).where(R.c.type == "Patient")
        ).scalar()
    return int(count or 0)


def delete_study_of(server: orthanc.OrthancServer, patient_id: str, uid: str) -> None:
    """Delete from Orthanc the study ``uid`` it holds for ``patient_id``."""
    for found in requests.get(f"{server.rest_base}/studies", timeout=10).json():
        tags = requests.get(f"{server.rest_base}/studies/{found}", timeout=10).json()
        if (
            tags["PatientMainDicomTags"]["PatientID"],
            tags["MainDicomTags"]["StudyInstanceUID"],
        ) == (patient_id, uid):
            requests.delete(f"{server.rest_base}/studies/{found}", timeout=10).raise_for_status()


def names_no_one(text: str, *patient_ids: str) -> None:
    for secret in [*WHO, *patient_ids]:
        assert secret not in text, f"{secret!r} is in {text!r}"


def test_import_never_moves_a_study_to_another_patient(tmp_path: Path, services_of: Any) -> None:
    directory = new_node(tmp_path / "hosp-a")
    files = tmp_path / "files"
    files.mkdir()
    ct = new_study(TEST_FILES / "CT_small.dcm", "ct-a.dcm", directory=files, **PATIENT_A)
    mr = new_study(TEST_FILES / "MR_small.dcm", "mr-b.dcm", directory=files, **PATIENT_B)
    first = hrx("adapters", "dicom-import", "--dir", str(directory), str(ct), str(mr))
    assert first.exit_code == 0, first.output
    services = services_of(directory)
    patients = patient_by_mrn(services)
    a, b = patients[PATIENT_A["PatientID"]]["id"], patients[PATIENT_B["PatientID"]]["id"]
    uid = read(ct).StudyInstanceUID
    stored = studies_by_uid(services)[uid]
    versions, people = version_count(services), patient_count(services)

    later = tmp_path / "later"
    later.mkdir()
    new_series = {"SeriesInstanceUID": uid_of("b-series"), "SOPInstanceUID": uid_of("b-instance")}
    cases = [
        # the same image, now said to be patient B's
        (copy_of(ct, later / "same.dcm", **PATIENT_B), f"not for Patient/{b}"),
        # a new series of the study, patient B's
        (copy_of(ct, later / "series.dcm", **PATIENT_B, **new_series), f"not for Patient/{b}"),
        # patient A's ID under another issuer (the resident ID's): another identifier
        (
            copy_of(ct, later / "issuer.dcm", IssuerOfPatientID=RESIDENT_OID),
            "not for a patient not known here",
        ),
        # a patient this node does not know
        (copy_of(ct, later / "unknown.dcm", **PATIENT_C), "not for a patient not known here"),
    ]
    rows: dict[str, int] = {}
    for path, named in cases:
        result = hrx("adapters", "dicom-import", "--dir", str(directory), str(path))
        output = " ".join(result.output.split())
        assert result.exit_code == 1, output
        assert "1 files, 1 studies: 0 created, 0 updated, 0 unchanged, 1 refused" in output
        assert f"{path}: study {uid} is stored here for another patient" in output
        assert "refused, nothing changed" in output and "quarantine #" in output
        names_no_one(result.output, a, b)
        (row,) = [r for r in quarantine_rows(services, "dicom") if r.origin == str(path)]
        assert row.payload == path.read_bytes() and row.replayed_at is None
        assert f"study {uid} is already stored for Patient/{a}, {named}" in row.reason
        assert f"(quarantine #{row.id})" in output
        rows[path.name] = row.id
    # nothing stored changed: the same study, version and subject; no Patient created
    assert studies_by_uid(services)[uid] == stored
    assert stored["subject"]["reference"] == f"Patient/{a}"
    assert (version_count(services), patient_count(services)) == (versions, people)

    # the existing commands list and show the quarantine, which names both patients
    listed = hrx("adapters", "quarantine", "list", "--dir", str(directory), "--adapter", "dicom")
    assert listed.exit_code == 0 and f"#{rows['series.dcm']}" in listed.output
    shown = hrx("adapters", "quarantine", "show", "--dir", str(directory), str(rows["same.dcm"]))
    assert f"Patient/{a}" in shown.output and f"Patient/{b}" in shown.output
    # the HL7 replay says which command replays DICOM
    other = hrx("adapters", "quarantine", "replay", "--dir", str(directory), str(rows["same.dcm"]))
    assert "holds a dicom item" in other.output

    # replayed as it is: refused again, the row stays open
    replay = ["adapters", "dicom-replay", "--dir", str(directory)]
    again = hrx(*replay, str(rows["series.dcm"]))
    assert again.exit_code == 1 and "refused" in again.output, again.output
    names_no_one(again.output, a, b)
    assert studies_by_uid(services)[uid] == stored
    # the stored study was the wrong one (it is patient B's): corrected here, the replay goes in
    corrected = {**stored, "subject": {"reference": f"Patient/{b}"}}
    services.store.update("ImagingStudy", stored["id"], corrected)
    done = hrx(*replay, str(rows["series.dcm"]), str(rows["same.dcm"]))
    assert done.exit_code == 0, done.output
    assert "2 files, 1 studies: 0 created, 1 updated, 0 unchanged, 0 refused" in done.output
    study = studies_by_uid(services)[uid]
    assert study["subject"]["reference"] == f"Patient/{b}"
    assert study["numberOfSeries"] == 2 and study["numberOfInstances"] == 2
    still_open = {r.id for r in quarantine_rows(services, "dicom") if r.replayed_at is None}
    assert still_open == {rows["issuer.dcm"], rows["unknown.dcm"]}


def test_import_never_merges_two_patients_images(tmp_path: Path, services_of: Any) -> None:
    """The files of one study naming two patients: the study is refused whole."""
    directory = new_node(tmp_path / "hosp-a")
    files = tmp_path / "files"
    files.mkdir()
    known = new_study(TEST_FILES / "MR_small.dcm", "b.dcm", directory=files, **PATIENT_B)
    assert hrx("adapters", "dicom-import", "--dir", str(directory), str(known)).exit_code == 0
    services = services_of(directory)
    b = patient_by_mrn(services)[PATIENT_B["PatientID"]]["id"]
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    first = new_study(TEST_FILES / "CT_small.dcm", "1.dcm", directory=mixed, **PATIENT_A)
    copy_of(first, mixed / "2.dcm", SOPInstanceUID=uid_of("second"), **PATIENT_B)
    versions = version_count(services)
    result = hrx("adapters", "dicom-import", "--dir", str(directory), str(mixed))
    assert result.exit_code == 1
    output = " ".join(result.output.split())
    assert "2 files, 1 studies: 0 created, 0 updated, 0 unchanged, 1 refused" in output
    assert "its instances do not all name the same patient" in output
    names_no_one(result.output, b)
    assert read(first).StudyInstanceUID not in studies_by_uid(services)
    assert version_count(services) == versions  # no Patient, no study, no AuditEvent
    reasons = {r.reason for r in quarantine_rows(services, "dicom")}
    (reason,) = reasons
    assert "its instances name different patients: a patient not known here" in reason
    assert f"Patient/{b} (MRN {PATIENT_B['PatientID']}: 1 of its instances)" in reason


def test_sync_never_moves_a_study_to_another_patient(tmp_path: Path, services_of: Any) -> None:
    directory = new_node(tmp_path / "hosp-a")
    files = tmp_path / "files"
    files.mkdir()
    ct = new_study(TEST_FILES / "CT_small.dcm", "ct-a.dcm", directory=files, **PATIENT_A)
    mr = new_study(TEST_FILES / "MR_small.dcm", "mr-b.dcm", directory=files, **PATIENT_B)
    moved = copy_of(ct, files / "ct-b.dcm", **PATIENT_B)  # the same study, patient B's
    new_series = {"SeriesInstanceUID": uid_of("b-series"), "SOPInstanceUID": uid_of("b-instance")}
    series_b = copy_of(ct, files / "series-b.dcm", **PATIENT_B, **new_series)
    uid = read(ct).StudyInstanceUID
    with orthanc.running_orthanc(tmp_path / "orthanc") as server:
        orthanc.upload(server.rest_base, ct)
        orthanc.upload(server.rest_base, mr)
        sync = ["adapters", "dicomweb-sync", "--dir", str(directory), "--url", server.dicomweb_url]
        assert hrx(*sync).exit_code == 0
        services = services_of(directory)
        patients = patient_by_mrn(services)
        a, b = patients[PATIENT_A["PatientID"]]["id"], patients[PATIENT_B["PatientID"]]["id"]
        stored = studies_by_uid(services)[uid]
        versions = version_count(services)

        # the PACS now holds the study as patient B's
        delete_study_of(server, PATIENT_A["PatientID"], uid)
        orthanc.upload(server.rest_base, moved)
        result = hrx(*sync, "--full")
        output = " ".join(result.output.split())
        assert result.exit_code == 1, output
        assert "2 studies seen: 0 created, 0 updated, 1 unchanged, 1 refused" in output
        assert f"study {uid}: is stored here for another patient than the one its DICOM" in output
        names_no_one(result.output, a, b)
        assert studies_by_uid(services)[uid] == stored
        assert version_count(services) == versions
        (row,) = quarantine_rows(services, "dicomweb")
        assert row.origin == f"{server.public_dicomweb_url}/studies/{uid}"
        assert f"(quarantine #{row.id})" in output
        assert f"is already stored for Patient/{a}, not for Patient/{b} whom" in row.reason
        assert PATIENT_B["PatientID"] in row.payload.decode()  # what the PACS said
        with services.database.engine.connect() as conn:
            (cursor,) = conn.execute(sa.select(sync_state_table.c.cursor)).scalars()
        assert json.loads(cursor)["retry"] == [uid]

        # asked for again (the retry list) in each round, --watch included: one open row
        log = tmp_path / "watch.log"
        environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
        environment["HRX_DICOMWEB_URL"] = server.dicomweb_url
        command = [sys.executable, "-m", "node.cli", "adapters", "dicomweb-sync"]
        command += ["--dir", str(directory), "--watch", "--interval", "1"]
        with log.open("wb") as output_file:
            process = subprocess.Popen(
                command, cwd=ROOT, env=environment, stdout=output_file, stderr=output_file
            )
        try:
            wait_for(log, f"(quarantine #{row.id})", process)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        watched = log.read_text()
        assert "1 refused" in watched and f"study {uid}: is stored here" in watched
        names_no_one(watched, a, b)
        assert [r.id for r in quarantine_rows(services, "dicomweb")] == [row.id]
        assert studies_by_uid(services)[uid] == stored

        # the PACS holds the same instance under both patients: Orthanc has no metadata for it
        orthanc.upload(server.rest_base, ct)
        both = hrx(*sync)
        assert both.exit_code == 1 and "1 failed" in both.output, both.output
        assert "does it hold that instance under two patients?" in both.output
        names_no_one(both.output, a, b)
        with services.database.engine.connect() as conn:
            (cursor,) = conn.execute(sa.select(sync_state_table.c.cursor)).scalars()
        assert json.loads(cursor)["retry"] == [uid]  # still asked for (it is not gone)

        # the PACS holds patient A's study and a series of it as patient B's: refused (never
        # merged, whichever instance comes first)
        delete_study_of(server, PATIENT_B["PatientID"], uid)
        orthanc.upload(server.rest_base, series_b)
        mixed = hrx(*sync)
        assert mixed.exit_code == 1
        assert "its instances do not all name the same patient" in " ".join(mixed.output.split())
        names_no_one(mixed.output, a, b)
        (row,) = quarantine_rows(services, "dicomweb")  # the same row, with the new reason
        assert f"Patient/{a}" in row.reason and f"Patient/{b}" in row.reason
        assert "its instances name different patients" in row.reason
        assert studies_by_uid(services)[uid] == stored

        # the PACS corrected (patient B's series deleted): the replay takes it in, the row done
        delete_study_of(server, PATIENT_B["PatientID"], uid)
        replay = ["adapters", "dicom-replay", "--dir", str(directory), str(row.id)]
        unreachable = hrx(*replay)  # no [dicomweb] url, no --url
        assert unreachable.exit_code == 1 and "give its DICOMweb root" in unreachable.output
        replayed = hrx(*replay, "--url", server.dicomweb_url)
        assert replayed.exit_code == 0, replayed.output
        assert "1 studies asked for again: 0 created, 0 updated, 1 unchanged" in replayed.output
        (row,) = quarantine_rows(services, "dicomweb")
        assert row.replayed_at is not None
        assert studies_by_uid(services)[uid] == stored
        last = hrx(*sync)
        assert last.exit_code == 0 and "0 refused" in last.output, last.output
        with services.database.engine.connect() as conn:
            (cursor,) = conn.execute(sa.select(sync_state_table.c.cursor)).scalars()
        assert json.loads(cursor)["retry"] == []


def test_import_does_not_follow_links_out_of_the_tree(tmp_path: Path, services_of: Any) -> None:
    directory = new_node(tmp_path / "hosp-a")
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-7f3a: the root password is hunter2\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    new_study(TEST_FILES / "CT_small.dcm", "outside.dcm", directory=elsewhere, PatientID="OUT-1")
    tree = tmp_path / "cd"
    (tree / "sub").mkdir(parents=True)
    good = new_study(TEST_FILES / "MR_small.dcm", "good.dcm", directory=tree, PatientID="IN-1")
    refused = {
        tree / "passwd": Path("/etc/passwd"),
        tree / "secret": secret,
        tree / "sub" / "relative": Path("..") / ".." / "secret.txt",
        tree / "outside-dir": elsewhere,
        tree / "outside.dcm": elsewhere / "outside.dcm",
    }
    for link, target in refused.items():
        link.symlink_to(target)
    (tree / "sub" / "again.dcm").symlink_to(good)  # inside the tree: read
    (tree / "sub" / "up").symlink_to(tree)  # a directory inside the tree: not walked twice
    (tree / "loop").symlink_to(tree / "loop")
    result = hrx("adapters", "dicom-import", "--dir", str(directory), str(tree))
    # the secret and /etc/passwd are nowhere in the database's files, nor in the output
    database = Path(load_config(directory).database_url.removeprefix("sqlite:///"))
    passwd = Path("/etc/passwd").read_bytes().splitlines()[0]
    for path in database.parent.glob(database.name + "*"):
        content = path.read_bytes()
        assert b"TOP-SECRET" not in content and passwd not in content, path
    assert "TOP-SECRET" not in result.output
    services = services_of(directory)
    assert quarantine_rows(services, "dicom") == []
    assert list(patient_by_mrn(services)) == ["IN-1"]
    (study,) = studies_by_uid(services).values()
    assert study["numberOfInstances"] == 1  # good.dcm and the link to it: one instance
    # each link not followed is named, and the command says it did not do everything
    assert result.exit_code == 1
    output = " ".join(result.output.split())
    for link in refused:
        assert f"{link}: is a symbolic link pointing out of {tree.resolve()}: not" in output
    assert f"{tree / 'loop'}: is a symbolic link that loops" in output
    assert f"skipped {tree / 'sub' / 'up'}: a symbolic link to a directory" in output
    assert "2 files, 1 studies: 1 created" in output and "6 links out of the tree" in output
