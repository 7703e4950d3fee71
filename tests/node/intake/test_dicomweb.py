"""The PACS adapter against a real Orthanc (DICOMweb plugin) loaded with pydicom's sample files:
``hrx adapters dicomweb-sync`` maps every study to an ImagingStudy linked to its Patient
(Chinese names in GB18030 and UTF-8 intact), re-syncs change nothing, the saved cursor finds a
study added later, ``--since`` filters, the contained WADO-RS endpoint retrieves the study,
``dicom-import`` of the same files gives the same resources, bad files and bad studies are
reported by name with the reason, an unreachable PACS is named, ``--watch`` runs rounds until
SIGTERM; and the result is searchable through a running node's FHIR API, on SQLite and
PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pydicom
import pydicom.data
import pytest
import requests
import sqlalchemy as sa
from click.testing import Result
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.fileset import FileSet

from fhir_adapters.store import tables
from node.base.config import load_config
from node.base.errors import ConfigError
from node.db.engines import open_database
from node.db.schema import quarantine_table, sync_state_table
from node.demo import orthanc
from node.records.pseudonym_index import patients_with
from node.services import Services, open_services
from tests.helpers import ROOT
from tests.helpers.databases import postgres_database
from tests.helpers.dicom import (
    CHARSET_FILES,
    MRN,
    TEST_FILES,
    current,
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
from tests.helpers.nodes import free_port, running_node

pytestmark = pytest.mark.skipif(orthanc.missing() is not None, reason=str(orthanc.missing()))

RESIDENT = "urn:oid:2.16.156.10011.1.3"
SNOMED = "http://snomed.info/sct"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
CST = timezone(timedelta(hours=8))
RESIDENT_ID = "33010619900101123x"  # written with a small x; stored upper-cased

# The sample files in the PACS; some studies have two files (two instances of one series).
SAMPLE_FILES = [
    TEST_FILES / "CT_small.dcm",  # CT, TimezoneOffsetFromUTC -0500
    TEST_FILES / "MR_small.dcm",  # MR
    TEST_FILES / "examples_rgb_color.dcm",  # US, patient 13US1 ...
    TEST_FILES / "examples_jpeg2k.dcm",  # ... and its second instance
    TEST_FILES / "JPEG-lossy.dcm",  # NM, WHOLE BODY, patient 8NM1 ...
    TEST_FILES / "JPEG2000.dcm",  # ... and its second instance
    TEST_FILES / "examples_overlay.dcm",  # MR, ABDOMEN, accession, fractional time, no zone
    CHARSET_FILES / "chrJapMulti.dcm",  # CR, CHEST, accession, ISO 2022 IR 87
    CHARSET_FILES / "chrX1.dcm",  # 王^小東 in ISO_IR 192 (UTF-8)
    CHARSET_FILES / "chrX2.dcm",  # 王^小东 in GB18030
]
# StudyDate + StudyTime (+ TimezoneOffsetFromUTC, else China Standard Time), as expected
STARTED = {
    "CT_small.dcm": "2004-01-19T07:27:30-05:00",
    "MR_small.dcm": "2004-08-26T18:50:59-04:00",
    "examples_rgb_color.dcm": "2004-08-26T18:50:59-04:00",
    "JPEG-lossy.dcm": "2004-08-26T18:50:59-04:00",
    "examples_overlay.dcm": "2005-11-30T13:26:45.921000+08:00",
    "chrJapMulti.dcm": "2008-05-04T17:17:15+08:00",
    "resident.dcm": "2024-03-15T09:30:00+08:00",
}
BODY_SITES = {  # DICOM PS3.16 Annex L
    "CHEST": "43799004",
    "HEAD": "69536005",
    "ABDOMEN": "818981001",
    "WHOLE BODY": "38266002",
}


def resident_study(directory: Path) -> Path:
    """An MR of the head whose patient has an MRN and, in OtherPatientIDsSequence, a resident
    ID; UTF-8 Chinese in the description; no time zone."""
    other = Dataset()
    other.PatientID = RESIDENT_ID
    other.IssuerOfPatientID = "2.16.156.10011.1.3"
    return new_study(
        TEST_FILES / "MR_small.dcm",
        "resident.dcm",
        directory=directory,
        SpecificCharacterSet="ISO_IR 192",
        PatientID="MRN-0042",
        PatientName="Li^Hua=李^华",
        PatientBirthDate="19900101",
        PatientSex="F",
        OtherPatientIDsSequence=[other],
        StudyDate="20240315",
        StudyTime="093000",
        TimezoneOffsetFromUTC=None,
        AccessionNumber="ACC-0042",
        StudyDescription="头颅 MR 平扫",
        BodyPartExamined="HEAD",
    )


@dataclass
class Pacs:
    server: orthanc.OrthancServer
    files: list[Path]

    @property
    def url(self) -> str:
        return self.server.dicomweb_url

    def studies(self) -> dict[str, list[Dataset]]:
        """The files in the PACS by Study Instance UID."""
        found: dict[str, list[Dataset]] = {}
        for path in self.files:
            dataset = read(path)
            dataset.filename = str(path)
            found.setdefault(dataset.StudyInstanceUID, []).append(dataset)
        return found


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pacs]:
    work = tmp_path_factory.mktemp("pacs-files")
    files = [*SAMPLE_FILES, resident_study(work)]
    with orthanc.running_orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        for path in files:
            orthanc.upload(server.rest_base, path)
        yield Pacs(server, files)


@pytest.fixture(scope="module")
def synced(pacs: Pacs, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Result]:
    """A node that synced everything from the PACS once."""
    directory = new_node(tmp_path_factory.mktemp("synced") / "hosp-a")
    result = hrx("adapters", "dicomweb-sync", "--dir", str(directory), "--url", pacs.url)
    return directory, result


@pytest.fixture
def services_of() -> Iterator[Any]:
    opened: list[Services] = []

    def open_(directory: Path) -> Services:
        services = open_services(load_config(directory))
        opened.append(services)
        return services

    yield open_
    for services in opened:
        services.close()


def test_sync_maps_every_study(pacs: Pacs, synced: tuple[Path, Result], services_of: Any) -> None:
    directory, result = synced
    expected = pacs.studies()
    assert result.exit_code == 0, result.output
    assert f"{len(expected)} studies seen: {len(expected)} created" in result.output
    assert "0 failed" in result.output
    services = services_of(directory)
    studies = studies_by_uid(services)
    patients = {p["id"]: p for p in current(services, "Patient")}
    assert set(studies) == set(expected)
    assert len(patients) == len({d[0].PatientID for d in expected.values()})
    for uid, files in expected.items():
        study, first = studies[uid], files[0]
        name = Path(first.filename).name
        assert study["status"] == "available"
        patient = patients[study["subject"]["reference"].removeprefix("Patient/")]
        assert {"system": MRN, "value": first.PatientID} in [
            {"system": i["system"], "value": i["value"]} for i in patient["identifier"]
        ]
        accession = [i for i in study["identifier"] if i.get("type", {}).get("coding")]
        if first.AccessionNumber:
            assert [a["value"] for a in accession] == [first.AccessionNumber]
            assert accession[0]["type"]["coding"][0]["code"] == "ACSN"
        else:
            assert accession == []
        assert study.get("started") == STARTED.get(name), name
        assert study.get("description") == (first.get("StudyDescription") or None)
        assert study["numberOfSeries"] == len({f.SeriesInstanceUID for f in files})
        assert study["numberOfInstances"] == len(files)
        assert study["modality"] == [{"system": DCM, "code": first.Modality}]
        (series,) = study["series"]
        assert series["uid"] == first.SeriesInstanceUID
        assert series["number"] == int(first.SeriesNumber)
        assert series["modality"] == {"system": DCM, "code": first.Modality}
        assert series["numberOfInstances"] == len(files)
        assert series.get("description") == (first.get("SeriesDescription") or None)
        part = first.get("BodyPartExamined")
        if part:
            assert series["bodySite"]["system"] == SNOMED
            assert series["bodySite"]["code"] == BODY_SITES[part]
        else:
            assert "bodySite" not in series
        assert sorted(i["uid"] for i in series["instance"]) == sorted(
            f.SOPInstanceUID for f in files
        )
        for instance in series["instance"]:
            (source,) = [f for f in files if f.SOPInstanceUID == instance["uid"]]
            assert instance["sopClass"]["code"] == f"urn:oid:{source.SOPClassUID}"
            assert instance["number"] == int(source.InstanceNumber)
        (endpoint,) = study["contained"]
        assert study["endpoint"] == [{"reference": f"#{endpoint['id']}"}]
        assert endpoint["resourceType"] == "Endpoint"
        assert endpoint["connectionType"]["code"] == "dicom-wado-rs"
        assert endpoint["address"] == f"{pacs.server.public_dicomweb_url}/studies/{uid}"
    ct = studies["1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"]
    assert ct["series"][0]["started"] == "1997-04-30T11:27:49-05:00"  # SeriesDate/Time


def test_chinese_and_japanese_names_come_through(
    synced: tuple[Path, Result], services_of: Any
) -> None:
    services = services_of(synced[0])
    patients = patient_by_mrn(services)
    for mrn, given in (("X1EXAMPLE", "小東"), ("X2EXAMPLE", "小东")):  # UTF-8, GB18030
        ideographic, alphabetic = patients[mrn]["name"]
        assert ideographic["use"] == "official"
        assert ideographic["text"] == f"王{given}"
        assert (ideographic["family"], ideographic["given"]) == ("王", [given])
        assert ideographic["extension"][0]["valueCode"] == "IDE"
        assert (alphabetic["family"], alphabetic["given"]) == ("Wang", ["XiaoDong"])
        assert alphabetic["extension"][0]["valueCode"] == "ABC"
    (japanese,) = patients["2008-4"]["name"]
    assert (japanese["family"], japanese["given"]) == ("やまだ", ["たろう"])
    assert patients["2008-4"]["gender"] == "male"
    assert patients["2008-4"]["birthDate"] == "1800-01-01"
    assert patients["1CT1"]["name"][0]["family"] == "CompressedSamples"
    li = patients["MRN-0042"]
    assert li["name"][0]["text"] == "李华" and li["name"][1]["text"] == "Hua Li"
    described = [s for s in current(services, "ImagingStudy") if s.get("description")]
    assert "头颅 MR 平扫" in [s["description"] for s in described]


def test_patients_are_shared_and_resident_ids_matched(
    synced: tuple[Path, Result], services_of: Any
) -> None:
    services = services_of(synced[0])
    patients = patient_by_mrn(services)
    studies = current(services, "ImagingStudy")
    # the two files of patient 13US1 (one study, two instances) have one Patient
    subjects = [s["subject"]["reference"] for s in studies]
    assert subjects.count(f"Patient/{patients['13US1']['id']}") == 1
    li = patients["MRN-0042"]
    resident = next(i for i in li["identifier"] if i["system"] == RESIDENT)
    assert resident["value"] == RESIDENT_ID.upper()
    assert resident["type"]["coding"][0]["code"] == "NNCHN"
    mrn = next(i for i in li["identifier"] if i["system"] == MRN)
    assert (mrn["value"], mrn["type"]["coding"][0]["code"]) == ("MRN-0042", "MR")
    assert [i["system"] for i in li["identifier"]] == [MRN, RESIDENT]
    # the Patient is in the pseudonym index, so the consortium can match it
    pseudonym = services.consents.pseudonym_of(li)
    assert pseudonym and patients_with(services.database.engine, pseudonym) == [li["id"]]
    # and each write left an AuditEvent naming the patient
    events = current(services, "AuditEvent")
    mine = [e for e in events if e["agent"][0]["who"]["display"] == "dicomweb-sync"]
    assert len(mine) == len(studies)


def test_resync_changes_nothing(pacs: Pacs, synced: tuple[Path, Result], services_of: Any) -> None:
    directory = synced[0]
    services = services_of(directory)
    before = version_count(services)
    expected = len(pacs.studies())
    result = hrx("adapters", "dicomweb-sync", "--dir", str(directory), "--url", pacs.url, "--full")
    assert result.exit_code == 0, result.output
    assert f"{expected} studies seen: 0 created, 0 updated, {expected} unchanged" in result.output
    since = hrx(
        "adapters",
        "dicomweb-sync",
        "--dir",
        str(directory),
        "--url",
        pacs.url,
        "--since",
        "2000-01-01",
    )
    assert since.exit_code == 0 and "0 created, 0 updated" in since.output, since.output
    assert version_count(services) == before  # no new versions, no AuditEvents


def test_endpoint_retrieves_the_study(
    pacs: Pacs, synced: tuple[Path, Result], services_of: Any
) -> None:
    services = services_of(synced[0])
    for uid, study in studies_by_uid(services).items():
        address = study["contained"][0]["address"]
        assert "@" not in address and orthanc.PASSWORD not in address
        response = requests.get(
            f"{address}/metadata",
            auth=pacs.server.auth,
            headers={"Accept": "application/dicom+json"},
            timeout=10,
        )
        assert response.status_code == 200, response.text
        instances = response.json()
        assert {i["0020000D"]["Value"][0] for i in instances} == {uid}
        assert len(instances) == study["numberOfInstances"]


def test_since_filters_and_pages(pacs: Pacs, tmp_path: Path, services_of: Any) -> None:
    directory = new_node(tmp_path / "hosp-a")
    result = hrx(
        "adapters",
        "dicomweb-sync",
        "--dir",
        str(directory),
        "--url",
        pacs.url,
        "--since",
        "2005-12-01",
        env={"HRX_DICOMWEB_PAGE_SIZE": "1"},  # every QIDO-RS result a page of its own
    )
    assert result.exit_code == 0, result.output
    wanted = {
        uid
        for uid, files in pacs.studies().items()
        if files[0].get("StudyDate") and files[0].StudyDate >= "20051201"
    }
    assert len(wanted) >= 2
    assert set(studies_by_uid(services_of(directory))) == wanted
    assert "StudyDate from 2005-12-01" in result.output


def test_dicom_import_gives_the_same_resources(
    pacs: Pacs, synced: tuple[Path, Result], tmp_path: Path, services_of: Any
) -> None:
    directory = new_node(tmp_path / "hosp-a")
    # a directory and single files alike
    medium = FileSet()  # a CD as a modality writes it: a DICOMDIR, files without suffix
    for path in SAMPLE_FILES[:4]:
        medium.add(path)
    loose = tmp_path / "cd"
    medium.write(loose)
    others = [str(path) for path in [*SAMPLE_FILES[4:], pacs.files[-1]]]
    result = hrx("adapters", "dicom-import", "--dir", str(directory), str(loose), *others)
    assert result.exit_code == 0, result.output
    expected = pacs.studies()
    files = len(SAMPLE_FILES) + 1
    assert f"{files + 1} files, {len(expected)} studies: {len(expected)} created" in result.output
    assert f"skipped {loose / 'DICOMDIR'}: a DICOMDIR" in result.output
    imported_services, synced_services = services_of(directory), services_of(synced[0])
    imported, from_pacs = studies_by_uid(imported_services), studies_by_uid(synced_services)
    imported_patients = {p["id"]: p for p in current(imported_services, "Patient")}
    synced_patients = {p["id"]: p for p in current(synced_services, "Patient")}

    def comparable(study: dict[str, Any], patients: dict[str, Any]) -> dict[str, Any]:
        patient = patients[study["subject"]["reference"].removeprefix("Patient/")]
        drop = ("id", "meta", "contained", "endpoint", "subject")
        return {
            **{k: v for k, v in study.items() if k not in drop},
            "patient": {k: v for k, v in patient.items() if k not in ("id", "meta")},
        }

    assert set(imported) == set(from_pacs)
    for uid in imported:
        assert "endpoint" not in imported[uid]
        assert comparable(imported[uid], imported_patients) == comparable(
            from_pacs[uid], synced_patients
        )
    # importing the files into the synced node: every study is unchanged (the endpoint stays)
    before = version_count(synced_services)
    again = hrx("adapters", "dicom-import", "--dir", str(synced[0]), str(loose), *others)
    assert again.exit_code == 0, again.output
    assert f"0 created, 0 updated, {len(expected)} unchanged" in again.output
    assert version_count(synced_services) == before


def test_import_adds_instances_to_a_stored_study(tmp_path: Path, services_of: Any) -> None:
    directory = new_node(tmp_path / "hosp-a")
    first, second = TEST_FILES / "JPEG-lossy.dcm", TEST_FILES / "JPEG2000.dcm"
    assert hrx("adapters", "dicom-import", "--dir", str(directory), str(first)).exit_code == 0
    result = hrx("adapters", "dicom-import", "--dir", str(directory), str(second))
    assert result.exit_code == 0 and "1 updated" in result.output, result.output
    (study,) = current(services_of(directory), "ImagingStudy")
    assert study["numberOfInstances"] == 2 and study["series"][0]["numberOfInstances"] == 2
    assert study["meta"]["versionId"] == "2"


def test_import_decodes_files_that_name_no_charset(tmp_path: Path, services_of: Any) -> None:
    """A modality that writes GB18030 without (0008,0005): --charset says what it is."""
    dataset = pydicom.dcmread(new_study(TEST_FILES / "CT_small.dcm", "gb.dcm", directory=tmp_path))
    del dataset.SpecificCharacterSet
    dataset.PatientID = "GB-0001"
    dataset[0x00100010] = DataElement(0x00100010, "PN", "张^三丰 ".encode("gb18030"))
    dataset.save_as(tmp_path / "gb.dcm", enforce_file_format=True)
    directory = new_node(tmp_path / "hosp-a")
    refused = hrx("adapters", "dicom-import", "--dir", str(directory), "--charset", "GB2312", ".")
    assert refused.exit_code == 1 and "not a DICOM character set" in refused.output
    args = ["adapters", "dicom-import", "--dir", str(directory), "--charset", "GB18030"]
    result = hrx(*args, str(tmp_path / "gb.dcm"))
    assert result.exit_code == 0, result.output
    (name,) = patient_by_mrn(services_of(directory))["GB-0001"]["name"]
    assert (name["text"], name["family"], name["given"]) == ("张三丰", "张", ["三丰"])


def test_bad_files_are_named_and_kept(tmp_path: Path, services_of: Any) -> None:
    directory = new_node(tmp_path / "hosp-a")
    files = tmp_path / "files"
    files.mkdir()
    (files / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden: not even looked at
    not_dicom = files / "报告.txt"
    not_dicom.write_text("这不是 DICOM 文件", encoding="utf-8")
    no_study = new_study(
        TEST_FILES / "CT_small.dcm", "no-study.dcm", directory=files, StudyInstanceUID=None
    )
    no_patient = new_study(
        TEST_FILES / "CT_small.dcm", "no-patient.dcm", directory=files, PatientID=""
    )
    good = CHARSET_FILES / "chrX2.dcm"
    missing = files / "missing.dcm"
    args = ["adapters", "dicom-import", "--dir", str(directory), str(files), str(good)]
    result = hrx(*args, str(missing))
    assert result.exit_code == 1, result.output
    output = " ".join(result.output.split())
    assert f"{not_dicom}: is not a DICOM file" in output
    assert f"{no_study}: lacks Study Instance UID (0020,000D)" in output
    assert f"{no_patient}: study {uid_of('no-patient.dcm', 'study')} has no Patient ID" in output
    assert f"{missing}: does not exist" in output
    assert "1 created" in output  # the good file went in all the same
    services = services_of(directory)
    assert list(patient_by_mrn(services)) == ["X2EXAMPLE"]
    with services.database.engine.connect() as conn:
        kept = conn.execute(
            sa.select(quarantine_table.c.origin, quarantine_table.c.payload).where(
                quarantine_table.c.adapter == "dicom"
            )
        ).all()
    assert sorted(origin for origin, _ in kept) == sorted(
        str(p.resolve()) for p in (not_dicom, no_study, no_patient)
    )
    assert all(payload == Path(origin).read_bytes() for origin, payload in kept)
    again = hrx(*args)  # the same refusals are not kept twice
    assert again.exit_code == 1
    with services.database.engine.connect() as conn:
        count = conn.execute(sa.select(sa.func.count()).select_from(quarantine_table)).scalar()
    assert count == 3


def test_an_unreachable_pacs_is_named(synced: tuple[Path, Result]) -> None:
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    result = hrx("adapters", "dicomweb-sync", "--dir", str(synced[0]), "--url", url)
    assert result.exit_code == 1
    output = " ".join(result.output.split())
    assert f"cannot reach the DICOMweb service at {url}" in output
    assert "check that the PACS is running" in output
    nothing = hrx("adapters", "dicomweb-sync", "--dir", str(synced[0]))
    assert nothing.exit_code == 1 and "pass --url, or set [dicomweb] url" in nothing.output


def test_configuration_is_checked(synced: tuple[Path, Result]) -> None:
    directory = synced[0]
    config = load_config(directory, environ={"HRX_DICOMWEB_URL": "http://pacs:8042/dicom-web/"})
    assert config.dicomweb_url == "http://pacs:8042/dicom-web"
    assert (config.dicomweb_interval_seconds, config.dicomweb_overlap_days) == (0, 1)
    assert (config.dicomweb_grant_seconds, config.dicomweb_cors_origins) == (14400, ())
    origins = "https://ohif.example, http://127.0.0.1:3000/"
    assert load_config(
        directory, environ={"HRX_DICOMWEB_CORS_ORIGINS": origins}
    ).dicomweb_cors_origins == ("https://ohif.example", "http://127.0.0.1:3000")
    for name, value, problem in (
        ("HRX_DICOMWEB_URL", "pacs:8042", "is not an http:// or https:// URL"),
        ("HRX_DICOMWEB_PAGE_SIZE", "0", "dicomweb.page_size must be at least 1"),
        ("HRX_DICOMWEB_INTERVAL_SECONDS", "-1", "must be at least 0"),
        ("HRX_DICOMWEB_GRANT_SECONDS", "0", "dicomweb.grant_seconds must be at least 1"),
        ("HRX_DICOMWEB_CORS_ORIGINS", "https://ohif.example/viewer", "is not a web origin"),
        ("HRX_DICOMWEB_CORS_ORIGINS", "*", "is not a web origin"),
    ):
        with pytest.raises(ConfigError, match=problem):
            load_config(directory, environ={name: value})
    url = "http://127.0.0.1:1/dicom-web"
    result = hrx("adapters", "dicomweb-sync", "--dir", str(directory), "--url", url, "--watch")
    assert result.exit_code == 1 and "--watch needs an interval" in result.output


def test_a_bad_study_is_reported_and_retried(tmp_path: Path, services_of: Any) -> None:
    bad = new_study(TEST_FILES / "CT_small.dcm", "bad.dcm", directory=tmp_path, PatientID="")
    bad_uid = read(bad).StudyInstanceUID
    directory = new_node(tmp_path / "hosp-a")
    with orthanc.running_orthanc(tmp_path / "orthanc") as server:
        stored = orthanc.upload(server.rest_base, bad)
        orthanc.upload(server.rest_base, CHARSET_FILES / "chrX1.dcm")
        args = ["adapters", "dicomweb-sync", "--dir", str(directory)]
        env = {"HRX_DICOMWEB_URL": server.dicomweb_url}  # the configuration, not --url
        first = hrx(*args, env=env)
        assert first.exit_code == 1
        output = " ".join(first.output.split())
        assert "2 studies seen: 1 created" in output and "1 failed" in output
        assert f"study {bad_uid}: has no Patient ID (0010,0020)" in output
        services = services_of(directory)
        with services.database.engine.connect() as conn:
            (cursor,) = conn.execute(sa.select(sync_state_table.c.cursor)).scalars()
        assert json.loads(cursor)["retry"] == [bad_uid]
        second = hrx(*args, env=env)  # chrX1 has no StudyDate: only the retry is seen
        assert second.exit_code == 1 and "1 studies seen: 0 created" in second.output
        deleted = requests.delete(f"{server.rest_base}/studies/{stored['ParentStudy']}", timeout=10)
        deleted.raise_for_status()
        third = hrx(*args, env=env)
        assert third.exit_code == 0, third.output
        assert f"study {bad_uid} failed before and is no longer on the PACS" in third.output


def test_new_study_is_found_through_the_cursor(tmp_path: Path, services_of: Any) -> None:
    directory = new_node(tmp_path / "hosp-a")
    with orthanc.running_orthanc(tmp_path / "orthanc") as server:
        for path in (TEST_FILES / "CT_small.dcm", CHARSET_FILES / "chrX1.dcm"):
            orthanc.upload(server.rest_base, path)
        args = ["adapters", "dicomweb-sync", "--dir", str(directory), "--url", server.dicomweb_url]
        first = hrx(*args)
        assert first.exit_code == 0 and "(every study): 2 studies seen" in first.output
        services = services_of(directory)
        today = datetime.now(CST).date()
        with services.database.engine.connect() as conn:
            (row,) = conn.execute(sa.select(sync_state_table)).mappings().all()
        assert (row["adapter"], row["source"]) == ("dicomweb", server.public_dicomweb_url)
        cursor = json.loads(row["cursor"])
        assert cursor["retry"] == []
        saved = datetime.strptime(cursor["study_date_from"], "%Y%m%d").date()
        assert today - saved in (timedelta(days=1), timedelta(days=2))  # a round may span midnight
        # today's CT of patient 1CT1 (already known from CT_small)
        added = new_study(
            TEST_FILES / "CT_small.dcm",
            "today.dcm",
            directory=tmp_path,
            StudyDate=today.strftime("%Y%m%d"),
            StudyTime="080000",
        )
        orthanc.upload(server.rest_base, added)
        patients_before = patient_by_mrn(services)
        result = hrx(*args)
    assert result.exit_code == 0, result.output
    assert f"StudyDate from {saved.isoformat()}" in result.output
    assert "1 studies seen: 1 created, 0 updated, 0 unchanged, 0 refused (0 new patients)" in (
        result.output
    )
    study = studies_by_uid(services)[read(added).StudyInstanceUID]
    assert study["subject"]["reference"] == f"Patient/{patients_before['1CT1']['id']}"
    assert study["started"] == f"{today.isoformat()}T08:00:00-05:00"


def test_through_a_running_node(pacs: Pacs, tmp_path: Path) -> None:
    with running_node(tmp_path / "hosp-a") as node:
        result = hrx(
            "adapters",
            "dicomweb-sync",
            "--dir",
            str(node.directory),
            env={"HRX_DICOMWEB_URL": pacs.url},
        )
        assert result.exit_code == 0, result.output
        session = node.session()
        found = session.get(f"{node.fhir}/Patient", params={"identifier": f"{MRN}|2008-4"})
        (entry,) = found.json()["entry"]
        patient_id = entry["resource"]["id"]
        response = session.get(f"{node.fhir}/ImagingStudy", params={"patient": patient_id})
        assert response.status_code == 200, response.text
        (study,) = [e["resource"] for e in response.json()["entry"]]
        assert study["modality"] == [{"system": DCM, "code": "CR"}]
        assert study["series"][0]["bodySite"]["code"] == BODY_SITES["CHEST"]
        by_site = session.get(
            f"{node.fhir}/ImagingStudy", params={"bodysite": f"{SNOMED}|{BODY_SITES['CHEST']}"}
        )
        assert [e["resource"]["id"] for e in by_site.json()["entry"]] == [study["id"]]
        by_date = session.get(
            f"{node.fhir}/ImagingStudy", params={"started": "2008-05-04", "modality": "CR"}
        )
        assert [e["resource"]["id"] for e in by_date.json()["entry"]] == [study["id"]]


@pytest.mark.postgres
def test_on_postgresql(pacs: Pacs, tmp_path: Path) -> None:
    with postgres_database() as url:
        directory = new_node(tmp_path / "hosp-a", url)
        args = ["adapters", "dicomweb-sync", "--dir", str(directory), "--url", pacs.url]
        first = hrx(*args, "--full")
        count = len(pacs.studies())
        assert first.exit_code == 0, first.output
        assert f"{count} studies seen: {count} created" in first.output
        again = hrx(*args, "--full")
        assert f"0 created, 0 updated, {count} unchanged" in again.output, again.output
        database = open_database(load_config(directory).database_url)
        try:
            with database.engine.connect() as conn:
                studies = conn.execute(
                    sa.select(sa.func.count())
                    .select_from(tables.resources)
                    .where(tables.resources.c.type == "ImagingStudy")
                ).scalar()
        finally:
            database.close()
        assert studies == count


def test_watch_runs_rounds_until_sigterm(pacs: Pacs, tmp_path: Path) -> None:
    directory = new_node(tmp_path / "hosp-a")
    down = f"http://127.0.0.1:{free_port()}/dicom-web"
    for url, line in ((down, "sync round failed, trying again"), (pacs.url, "studies seen")):
        log = tmp_path / f"watch-{len(line)}.log"
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", "HRX_DICOMWEB_URL": url}
        command = [sys.executable, "-m", "node.cli", "adapters", "dicomweb-sync"]
        command += ["--dir", str(directory), "--watch", "--interval", "1"]
        with log.open("wb") as output:
            process = subprocess.Popen(
                command, cwd=ROOT, env=environment, stdout=output, stderr=output
            )
        try:
            wait_for(log, line, process)
            if url == down:  # a failed round does not end the watch: the next one comes
                _wait_for_count(log, line, 2, process)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        assert "stopped" in log.read_text()


def _wait_for_count(
    path: Path, text: str, count: int, process: subprocess.Popen[bytes], seconds: float = 60
) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.read_text(errors="replace").count(text) >= count:
            return
        if process.poll() is not None:
            raise AssertionError(f"exited with {process.returncode}")
        time.sleep(0.1)
    raise AssertionError(f"{text!r} did not appear {count} times in {path}")
