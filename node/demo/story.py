"""``hrx demo``: the README's main job — a three-hospital consortium on this machine, playing
the story hrx exists for, with the real commands and the real adapters.

1. Three hospitals are created and join one consortium (``hrx node init``, ``hrx consortium
   roster``, ``hrx node join``) and serve (``hrx node serve`` and ``hrx node replicate``, each
   its own process; SQLite; local ports).
2. Their results come in through the adapters: hospital A's LIS sends a blood count over HL7
   v2/MLLP (``hrx adapters hl7-listen``) and its PACS's CT study is imported (``hrx adapters
   dicom-import``); hospital C's LIS export is imported as CSV (``hrx adapters csv-import``).
3. The patient enrolls in hospital A's portal with a one-time code and grants consent there.
4. The patient is referred to hospital B, whose doctor fetches the prior results from every
   member (``$prior-results``): each with its mutual-recognition verdict.
5. The recognised CT and blood count replace new exams (``$accept-recognised``); a recognised
   platelet count is ordered again with a reason the 2022 measures allow (``$reorder``); C's
   potassium is not recognised (a lower-level hospital's lab result).
6. Remote reading (基层检查、上级诊断): hospital C, the community health centre, acquires a CT
   (pydicom's sample slices in its PACS, Orthanc, taken in with ``hrx adapters
   dicomweb-sync``) and asks hospital A's imaging centre to read it; A's radiologist claims
   it, views the images through DICOMweb under the consult, and sends a signed report, which
   C verifies; the turnaround is printed from the ledger. (Skipped, saying why, where Orthanc
   and its DICOMweb plugin are not installed.)
7. The patient revokes consent in the portal; B's next request is denied by A.
8. The members co-sign a checkpoint of every chain (BLS).
9. The auditor verifies B's copy of the whole ledger from its URL — every signature, proof and
   checkpoint, and every access decision replayed against the consent policy — and the
   savings are reported from the ledger.

``--keep`` leaves the nodes running and prints where to sign in; Ctrl-C stops them.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pydicom
import requests
from pydicom.uid import generate_uid
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from consent.pseudonym import RESIDENT_ID_SYSTEM
from fhir_adapters.lis_csv import parse_mapping
from ledger.store import ChainStore
from node.base.config import load_config
from node.base.errors import NodeError
from node.consortium.locator import holders
from node.db.engines import open_database
from node.demo import orthanc
from node.demo.harness import Consortium
from node.demo.nodes import free_port
from node.identity.users import set_password
from node.intake.csv import import_files as import_csv_files
from node.intake.dicom import dicom_files
from node.intake.dicom import import_files as import_dicom_files
from node.intake.mllp import send
from node.services import Services, open_services

ZONE = timezone(timedelta(hours=8))
SAMPLES = Path(__file__).resolve().parents[2] / "fhir_adapters" / "samples"
RESIDENT_ID = "330106198503150016"  # 张三, in every sample
MRN_AT_A = "HZ00012345"  # his medical record number at hospital A (HL7 PID-3, DICOM PatientID)
PASSWORD = "demo password 2026"
FHIR_JSON = "application/fhir+json"
LOINC = "http://loinc.org"
DICOM = "http://dicom.nema.org/resources/ontology/DCM"
SNOMED = "http://snomed.info/sct"
RECOGNITION_URL = "urn:hrx:fhir:StructureDefinition:mutual-recognition"
REGISTRY = "hosp-a"  # runs the record locator: the 医共体's lead hospital
HOSPITALS = {
    "hosp-a": "示范区人民医院",
    "hosp-b": "示范区第二医院",
    "hosp-c": "示范区社区卫生服务中心",
}
MEMBERS_INFO: dict[str, dict[str, object]] = {
    "hosp-a": {
        "level": "三级甲等",
        "accreditation": [
            {"category": "laboratory", "scope": "省HR", "until": "2030-12-31"},
            {"category": "imaging", "scope": "省HR", "until": "2030-12-31"},
        ],
    },
    "hosp-b": {
        "level": "三级乙等",
        "accreditation": [
            {"category": "laboratory", "scope": "省HR", "until": "2030-12-31"},
            {"category": "imaging", "scope": "省HR", "until": "2030-12-31"},
        ],
    },
    "hosp-c": {
        "level": "二级甲等",
        "accreditation": [{"category": "laboratory", "scope": "市HR", "until": "2030-12-31"}],
    },
}
HRX = [sys.executable, "-m", "node.cli"]


class DemoError(NodeError):
    """A step of the story did not go as it must."""


def _hrx(*args: str) -> str:
    """One hrx command, run as an operator runs it (its own process); its output, or DemoError
    naming it."""
    result = subprocess.run([*HRX, *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        raise DemoError(f"hrx {' '.join(args[:3])}: {output[-600:]}")
    return result.stdout


def _expect(response: requests.Response, status: int, what: str) -> Any:
    if response.status_code != status:
        raise DemoError(f"{what}: HTTP {response.status_code}: {response.text[:400]}")
    return response.json() if "json" in response.headers.get("Content-Type", "") else None


class Story:
    """The consortium and who acts in it."""

    def __init__(self, root: Path, console: Console) -> None:
        self.root = root
        self.console = console
        self.group = Consortium(
            root,
            3,
            epoch_seconds=3,
            replicate_interval=0.5,
            members_info=MEMBERS_INFO,
            display_names=HOSPITALS,
            consortium_name="示范区医共体",
            registries=[REGISTRY],
        )
        self.tokens: dict[tuple[str, str], str] = {}
        self.portal = requests.Session()  # the patient's browser
        self.patient_ids: dict[str, str] = {}
        self.pacs: orthanc.OrthancServer | None = None  # hospital C's, when Orthanc is here
        self.closing = ExitStack()

    # -- who --------------------------------------------------------------------------------

    def directory(self, member: str) -> Path:
        return self.group.members[member].directory

    def base(self, member: str) -> str:
        return self.group.members[member].local

    def token(self, member: str, username: str, role: str) -> str:
        """A user of a member (``hrx user add``) and a bearer token for it (``hrx token``)."""
        if (member, username) not in self.tokens:
            self.tokens[(member, username)] = self.group.token(
                member, username, role, password=PASSWORD
            )
        return self.tokens[(member, username)]

    def session(self, member: str, username: str, role: str) -> requests.Session:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {self.token(member, username, role)}"
        session.headers["Accept"] = FHIR_JSON
        return session

    def post(self, session: requests.Session, url: str, resource: Any, **headers: str) -> Any:
        return session.post(
            url,
            data=json.dumps(resource, ensure_ascii=False).encode(),
            headers={"Content-Type": FHIR_JSON, **headers},
            timeout=60,
        )

    def patient_at(self, member: str) -> str:
        """The patient's id at a member, found by his resident ID."""
        if member not in self.patient_ids:
            staff = self.session(member, "it-admin", "admin")
            found = staff.get(
                f"{self.base(member)}/fhir/Patient",
                params={"identifier": f"{RESIDENT_ID_SYSTEM}|{RESIDENT_ID}"},
                timeout=30,
            ).json()
            ids = [e["resource"]["id"] for e in found.get("entry", [])]
            if len(ids) != 1:
                raise DemoError(f"{member} holds {len(ids)} patients with his resident ID")
            self.patient_ids[member] = ids[0]
        return self.patient_ids[member]


def _days_ago(days: int) -> datetime:
    return datetime.now(ZONE) - timedelta(days=days)


def _csrf(page: requests.Response) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    if found is None:
        raise DemoError(f"{page.url} shows no form")
    return found.group(1)


# -- the steps ----------------------------------------------------------------------------------


def start_consortium(story: Story) -> None:
    if orthanc.missing() is None:  # hospital C's PACS, and A reads what C asks it to
        story.pacs = story.closing.enter_context(orthanc.running_orthanc(story.root / "pacs-c"))
        _configure(story, "hosp-c", f'[dicomweb]\nurl = "{story.pacs.dicomweb_url}"\n')
        _configure(story, "hosp-a", '[consults]\nmodalities = "CT,MR,DX,CR"\n')
    story.group.start_all()
    table = Table(title="示范区医共体: three members")
    for column in ("member", "hospital", "level", "URL"):
        table.add_column(column)
    for name, member in story.group.members.items():
        level = str(MEMBERS_INFO[name]["level"])
        table.add_row(name, HOSPITALS[name], level, member.local)
    story.console.print(table)


def _configure(story: Story, member: str, settings: str) -> None:
    """Settings added to a member's node.toml (before it starts)."""
    config = story.directory(member) / "node.toml"
    config.write_text(config.read_text() + "\n" + settings)


def load_results(story: Story) -> None:
    """The hospitals' own systems feed their nodes, through the adapters."""
    # hospital A's LIS: a blood count over MLLP, dated two days ago
    sample = (SAMPLES / "hl7" / "hosp-a-cbc-v251-utf8.hl7").read_bytes()
    message = sample.replace(b"20260310", _days_ago(2).strftime("%Y%m%d").encode())
    with _listener(story.directory("hosp-a")) as port:
        ack = send("127.0.0.1", port, message)
    if b"MSA|AA|" not in ack:
        raise DemoError(f"hospital A's HL7 listener did not accept the blood count: {ack!r}")
    results = sum(1 for segment in message.split(b"\r") if segment.startswith(b"OBX"))
    story.console.print(
        f"   hosp-a LIS → HL7 v2 ORU^R01 over MLLP: blood count, {results} results, ACK AA"
    )
    # hospital A's PACS: a CT of the chest, four days ago (the DICOM import adapter)
    ct = _ct_file(story.root / "ct-chest.dcm")
    with _services(story, "hosp-a") as services:
        imported = import_dicom_files(services, dicom_files([ct]))
    story.console.print(f"   hosp-a PACS → DICOM import: CT chest ({imported.describe()})")
    # hospital C's LIS export: potassium and sodium, this morning (the CSV adapter)
    csv_file = _lis_export(story.root / "hosp-c-export.csv")
    mapping_file = SAMPLES / "csv" / "lis-mapping.toml"
    mapping = parse_mapping(mapping_file.read_text(encoding="utf-8"), str(mapping_file))
    with _services(story, "hosp-c") as services:
        taken = import_csv_files(services, mapping, [csv_file])
    if taken.refused or taken.unreadable:
        raise DemoError(f"hosp-c's CSV export was not taken in whole: {dict(taken.counts)}")
    story.console.print(
        f"   hosp-c LIS → CSV export: {sum(taken.counts.values())} report(s), "
        f"{taken.counts['stored']} stored"
    )


@contextmanager
def _services(story: Story, member: str) -> Iterator[Services]:
    """A member's services, as an adapter process opens them."""
    services = open_services(load_config(story.directory(member)))
    try:
        yield services
    finally:
        services.close()


@contextmanager
def _listener(directory: Path) -> Iterator[int]:
    port = free_port()
    process = subprocess.Popen(
        [*HRX, "adapters", "hl7-listen", "--dir", str(directory), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        if b"MLLP" not in process.stdout.readline():
            raise DemoError("hrx adapters hl7-listen did not start")
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)


def _ct_file(path: Path) -> Path:
    """pydicom's sample CT, as the PACS of hospital A would hold it for 张三."""
    dataset = pydicom.dcmread(Path(pydicom.data.__file__).parent / "test_files" / "CT_small.dcm")
    dataset.SpecificCharacterSet = "ISO_IR 192"
    dataset.PatientName = "张^三"
    dataset.PatientID = MRN_AT_A
    dataset.PatientBirthDate = "19850315"
    dataset.PatientSex = "M"
    dataset.BodyPartExamined = "CHEST"
    dataset.StudyDescription = "胸部CT平扫"
    dataset.AccessionNumber = "CT" + _days_ago(4).strftime("%Y%m%d") + "0007"
    dataset.StudyDate = _days_ago(4).strftime("%Y%m%d")
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.save_as(path, enforce_file_format=True)
    return path


def _lis_export(path: Path) -> Path:
    """Hospital C's LIS export for 张三, in the sample mapping's columns (GB18030)."""
    sampled = datetime.now(ZONE).replace(hour=7, minute=30, second=0, microsecond=0)
    reported = sampled + timedelta(hours=1, minutes=10)
    when = f"{sampled:%Y-%m-%d %H:%M:%S},{reported:%Y-%m-%d %H:%M:%S}"
    head = (
        "报告单号,病历号,身份证号,姓名,性别,出生日期,组合代码,组合名称,项目代码,项目名称,"
        "结果,单位,参考范围,异常标志,状态,采样时间,报告时间,检验科室"
    )
    patient = f"SQ{sampled:%Y%m%d}01,SQ0031415,{RESIDENT_ID},张三,男,1985-03-15"
    lab = "社区卫生服务中心检验科"
    rows = [
        f"{patient},24326-1,电解质,2823-3,钾,3.3,mmol/L,3.5-5.3,↓,已审核,{when},{lab}",
        f"{patient},24326-1,电解质,2951-2,钠,139,mmol/L,137-147,正常,已审核,{when},{lab}",
    ]
    path.write_bytes(("\r\n".join([head, *rows]) + "\r\n").encode("gb18030"))
    return path


def grant_consent(story: Story) -> None:
    """The patient enrolls in hospital A's portal with a one-time code and grants consent."""
    a = story.base("hosp-a")
    patient_id = story.patient_at("hosp-a")
    output = _hrx(
        "patient", "enroll", "--dir", str(story.directory("hosp-a")), "--patient", patient_id
    )
    code = re.search(r"[A-Z2-9]{4}-[A-Z2-9]{4}-[A-Z2-9]{4}-[A-Z2-9]{4}", output)
    if code is None:
        raise DemoError(f"hrx patient enroll printed no code: {output}")
    browser = story.portal
    form = browser.get(f"{a}/portal/enroll", timeout=30)
    enrolled = browser.post(
        f"{a}/portal/enroll",
        data={
            "csrf_token": _csrf(form),
            "code": code.group(0),
            "username": "zhangsan",
            "password": PASSWORD,
            "password_again": PASSWORD,
        },
        timeout=30,
    )
    if "/portal/signin" not in enrolled.url:
        raise DemoError(f"enrolling failed: {enrolled.text[:300]}")
    form = browser.get(f"{a}/portal/signin", timeout=30)
    browser.post(
        f"{a}/portal/signin",
        data={"csrf_token": _csrf(form), "username": "zhangsan", "password": PASSWORD},
        timeout=30,
    )
    page = browser.get(f"{a}/portal/consents", timeout=30)
    granted = browser.post(
        f"{a}/portal/consents",
        data={
            "csrf_token": _csrf(page),
            "grantee": ["*"],
            "category": ["laboratory", "imaging"],
            "purpose": ["TREAT"],
            "start": datetime.now(ZONE).date().isoformat(),
            "end": "",
        },
        timeout=30,
    )
    if granted.status_code != 200 or not re.search(r'id="consent-', granted.text):
        raise DemoError(f"the consent was not granted: {granted.text[:300]}")
    story.console.print(
        f"   张三 enrolled with code {code.group(0)} and granted every member access to his "
        "laboratory and imaging results for treatment (consent.granted on hosp-a's chain)"
    )


def refer(story: Story) -> None:
    """At hospital B: the patient is registered and referred."""
    b = story.base("hosp-b")
    staff = story.session("hosp-b", "it-admin", "admin")
    created = _expect(
        story.post(
            staff,
            f"{b}/fhir/Patient",
            {
                "resourceType": "Patient",
                "identifier": [{"system": RESIDENT_ID_SYSTEM, "value": RESIDENT_ID}],
                "name": [{"use": "official", "text": "张三", "family": "张", "given": ["三"]}],
                "gender": "male",
                "birthDate": "1985-03-15",
            },
        ),
        201,
        "registering the patient at hosp-b",
    )
    story.patient_ids["hosp-b"] = created["id"]
    doctor = story.session("hosp-b", "dr-zhou", "doctor")
    _expect(
        story.post(
            doctor,
            f"{b}/fhir/ServiceRequest",
            {
                "resourceType": "ServiceRequest",
                "status": "active",
                "intent": "order",
                "category": [{"coding": [{"system": SNOMED, "code": "3457005"}]}],
                "code": {"text": "双向转诊：胸闷待查"},
                "subject": {"reference": f"Patient/{created['id']}"},
            },
        ),
        201,
        "the referral",
    )
    waited = story.group.wait_converged(30)
    story.console.print(
        f"   张三 referred to hosp-b (every member held every chain {waited:.1f} s later)"
    )
    located = _wait_located(story, {"hosp-a", "hosp-c"}, 30)
    story.console.print(
        f"   the record locator at {REGISTRY} knows that {', '.join(sorted(located))} hold 张三's "
        "results (pseudonym, category and date only)"
    )


def _wait_located(story: Story, members: set[str], seconds: float) -> set[str]:
    """The members the registry names for 张三 once it names at least ``members`` (their
    replication workers send it their holdings every few seconds)."""
    database = open_database(story.group.database_url(REGISTRY))
    try:
        granted = ChainStore(database.engine).entries_about(None, ["consent.granted"])
        pseudonym = granted[-1]["body"]["patient"]
        deadline = time.monotonic() + seconds
        while True:
            found = set(holders(database.engine, pseudonym, ["laboratory", "imaging"]))
            if members <= found:
                return found
            if time.monotonic() > deadline:
                raise DemoError(f"the record locator names only {sorted(found)} after {seconds} s")
            time.sleep(0.1)
    finally:
        database.close()


def _verdict(resource: dict[str, Any]) -> tuple[bool, list[str]]:
    """Recognised or not, and the codes of the reasons why not."""
    (extension,) = [e for e in resource.get("extension", []) if e["url"] == RECOGNITION_URL]
    parts = extension["extension"]
    recognised = next(p["valueBoolean"] for p in parts if p["url"] == "recognised")
    failed = [
        next(x["valueCode"] for x in p["extension"] if x["url"] == "code")
        for p in parts
        if p["url"] == "reason"
        and not next(x["valueBoolean"] for x in p["extension"] if x["url"] == "met")
    ]
    return recognised, failed


def fetch_prior_results(story: Story) -> None:
    b = story.base("hosp-b")
    doctor = story.session("hosp-b", "dr-zhou", "doctor")
    bundle = _expect(
        doctor.get(f"{b}/fhir/Patient/{story.patient_at('hosp-b')}/$prior-results", timeout=60),
        200,
        "$prior-results",
    )
    table = Table(title=f"prior results of 张三 at hosp-b: {bundle['total']} from the members")
    for column in ("from", "result", "date", "HR", "not recognised because"):
        table.add_column(column)
    for entry in bundle["entry"]:
        if entry["search"]["mode"] != "match":
            continue
        resource = entry["resource"]
        member = next(m for m in HOSPITALS if story.group.members[m].url in entry["fullUrl"])
        kind = resource["resourceType"]
        if kind == "ImagingStudy":
            what = resource.get("description") or "imaging study"
            when = str(resource.get("started", ""))[:10]
        else:
            what = (resource.get("code") or {}).get("text") or kind
            when = str(resource.get("effectiveDateTime", ""))[:10]
        recognised, failed = _verdict(resource)
        shown = escape(what)  # "[#/volume]" in a LOINC name is not markup
        table.add_row(member, shown, when, "HR ✓" if recognised else "✗", ", ".join(failed))
    story.console.print(table)
    issues = [
        e["resource"]["issue"][0] for e in bundle["entry"] if e["search"]["mode"] == "outcome"
    ]
    for note in (i for i in issues if i["severity"] == "information"):
        story.console.print(f"   {escape(note['diagnostics'])}")
    problems = [i for i in issues if i["severity"] != "information"]
    if problems:
        raise DemoError(f"a member did not answer: {problems[0]}")


def _parameters(*parameters: tuple[str, str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "Parameters",
        "parameter": [{"name": name, kind: value} for name, kind, value in parameters],
    }


def _order(story: Story, code: dict[str, Any], site: str | None = None) -> dict[str, Any]:
    order: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "code": {"coding": [code]},
        "subject": {"reference": f"Patient/{story.patient_at('hosp-b')}"},
    }
    if site:
        order["bodySite"] = [{"coding": [{"system": SNOMED, "code": site}]}]
    return order


def order_exams(story: Story) -> None:
    """B's doctor orders a CT chest, a blood count and a platelet count: all three are
    recognised at A; the first two are accepted instead, the third is ordered again with a
    reason the 2022 measures allow."""
    b = story.base("hosp-b")
    doctor = story.session("hosp-b", "dr-zhou", "doctor")
    wanted = {
        "胸部CT (CT chest)": _order(story, {"system": DICOM, "code": "CT"}, "51185008"),
        "血常规 (blood count)": _order(story, {"system": LOINC, "code": "58410-2"}),
    }
    for label, order in wanted.items():
        created = story.post(doctor, f"{b}/fhir/ServiceRequest", order)
        _expect(created, 201, f"ordering {label}")
        count = created.headers.get("X-HRX-Recognised-Results", "0")
        checked = _expect(
            story.post(doctor, f"{b}/fhir/ServiceRequest/$check-recognition", order),
            200,
            f"checking {label}",
        )
        results = [p for p in checked["parameter"] if p["name"] == "result"]
        if not results:
            raise DemoError(f"no recognised prior result for {label}")
        reference = next(p["valueUri"] for p in results[0]["part"] if p["name"] == "reference")
        accepted = _expect(
            story.post(
                doctor,
                f"{b}/fhir/ServiceRequest/{created.json()['id']}/$accept-recognised",
                {
                    "resourceType": "Parameters",
                    "parameter": [{"name": "result", "valueUri": reference}],
                },
            ),
            200,
            f"accepting the prior {label}",
        )
        fen = next(
            p["valueInteger"] for p in accepted["parameter"] if p["name"] == "avoidedCostFen"
        )
        story.console.print(
            f"   {label}: the order said {count} recognised result(s); accepted {reference} "
            f"instead of a new exam — ¥{fen / 100:.2f} avoided (result.recognized)"
        )
    platelets = _order(story, {"system": LOINC, "code": "777-3"})
    created = _expect(story.post(doctor, f"{b}/fhir/ServiceRequest", platelets), 201, "ordering")
    count = story.post(doctor, f"{b}/fhir/ServiceRequest/$check-recognition", platelets).json()
    if not [p for p in count["parameter"] if p["name"] == "result"]:
        raise DemoError("the platelet count at hosp-a is not recognised")
    _expect(
        story.post(
            doctor,
            f"{b}/fhir/ServiceRequest/{created['id']}/$reorder",
            _parameters(("reason", "valueCode", "critical-decision")),
        ),
        200,
        "ordering the platelet count again",
    )
    story.console.print(
        "   血小板计数 (platelet count): recognised at hosp-a, but he goes to surgery: ordered "
        "again, reason critical-decision (result.reordered)"
    )


def remote_read(story: Story) -> None:
    """Hospital C's CT, read by hospital A's imaging centre (see the module docstring)."""
    console = story.console
    if story.pacs is None:
        console.print(f"   skipped: {orthanc.missing()}")
        return
    for number in (1, 2, 3):
        orthanc.upload(story.pacs.rest_base, _ct_slice(story, number))
    synced = _hrx("adapters", "dicomweb-sync", "--dir", str(story.directory("hosp-c")), "--full")
    console.print(f"   hosp-c PACS (Orthanc) → DICOMweb sync: {synced.strip().splitlines()[-1]}")
    c, a = story.base("hosp-c"), story.base("hosp-a")
    township = _clinic(story, "hosp-c", "dr-sun")
    patient = story.patient_at("hosp-c")
    form = township.get(f"{c}/clinic/patients/{patient}/consult", timeout=30)
    study = re.search(r'name="study" value="([0-9.]+)"', form.text)
    if study is None:
        raise DemoError("hosp-c's consult form offers no study of the patient")
    asked_at = time.monotonic()
    asked = township.post(
        f"{c}/clinic/patients/{patient}/consult",
        data={
            "csrf_token": _csrf(form),
            "study": study.group(1),
            "reader": "hosp-a",
            "priority": "urgent",
            "question": "咳嗽两周，低热，请排除肺炎",
        },
        timeout=60,
    )
    consult = re.search(r'id="consult-([0-9a-f-]{36})"', asked.text)
    if asked.status_code != 200 or consult is None:
        raise DemoError(f"hosp-c could not ask for a read: {asked.status_code}")
    consult_id = consult.group(1)
    console.print(f"   hosp-c asks hosp-a to read the CT (urgent, consult {consult_id[:8]}…)")
    radiologist = _clinic(story, "hosp-a", "dr-lin")
    page = f"{a}/clinic/reading/{consult_id}"
    listed = radiologist.get(f"{a}/clinic/reading", timeout=30)
    left = re.search(r"还剩 (\d+) 分钟", listed.text)
    console.print(
        f"   hosp-a's worklist: the consult, {left.group(1) if left else '?'} min to its deadline"
    )
    radiologist.post(page, data={"csrf_token": _csrf(listed), "action": "claim"}, timeout=30)
    viewer = radiologist.get(f"{a}/clinic/viewer/hosp-c/{study.group(1)}", timeout=60)
    frames = set(re.findall(r"instances/([0-9.]+)/frames/(\d+)/rendered", viewer.text))
    frame = re.search(r'id="frame" src="([^"]+)"', viewer.text)
    image = radiologist.get(a + frame.group(1).replace("&amp;", "&"), timeout=60) if frame else None
    if image is None or image.status_code != 200:
        raise DemoError("hosp-a's radiologist could not view hosp-c's images")
    console.print(
        f"   hosp-a's radiologist views the study through DICOMweb: {len(frames)} "
        f"frame(s), a {len(image.content)} byte JPEG each, recorded on hosp-c's chain"
    )
    reported = radiologist.post(
        page,
        data={
            "csrf_token": _csrf(listed),
            "action": "report",
            "findings": "双肺纹理增多，右下肺见斑片状高密度影，边缘模糊。",
            "impression": "右下肺炎，建议抗炎治疗后复查。",
        },
        timeout=60,
    )
    delivered = "报告已签名并送达" in reported.text
    if not delivered and "报告已签名保存" not in reported.text:
        raise DemoError(f"hosp-a could not sign the report: {reported.status_code}")
    # not answered at once (a busy machine): hosp-a's node sends it again every few seconds
    deadline = time.monotonic() + 60
    while True:
        shown = township.get(f"{c}/clinic/consults/{consult_id}", timeout=30).text
        signature = re.search(r'id="signature">([^<]+)<', shown)
        if signature is not None:
            break
        if time.monotonic() > deadline:
            raise DemoError("hosp-a's signed report did not reach hosp-c")
        time.sleep(0.5)
    round_trip = time.monotonic() - asked_at
    again = "" if delivered else " (sent again: hosp-c did not answer at once)"
    console.print(f"   the signed report is back at hosp-c: {signature.group(1)}{again}")
    console.print(f"   request to report received: {round_trip:.1f} s (the reading included)")
    story.group.wait_converged(30)
    output = _hrx("report", "consults", "--dir", str(story.directory("hosp-b")))
    for line in output.strip().splitlines():
        console.print(f"   {line}", highlight=False)


def _ct_slice(story: Story, number: int) -> Path:
    """One of three slices of a CT of the chest at hospital C for 张三 (resident ID in
    OtherPatientIDsSequence)."""
    dataset = pydicom.dcmread(Path(pydicom.data.__file__).parent / "test_files" / "CT_small.dcm")
    dataset.SpecificCharacterSet = "ISO_IR 192"
    dataset.PatientName = "张^三"
    dataset.PatientID = "SQ0031415"
    other = pydicom.Dataset()
    other.PatientID = RESIDENT_ID
    other.IssuerOfPatientID = "2.16.156.10011.1.3"
    dataset.OtherPatientIDsSequence = [other]
    dataset.BodyPartExamined = "CHEST"
    dataset.StudyDescription = "胸部CT平扫"
    dataset.StudyDate = datetime.now(ZONE).strftime("%Y%m%d")
    dataset.StudyInstanceUID = generate_uid(entropy_srcs=[str(story.root), "study"])
    dataset.SeriesInstanceUID = generate_uid(entropy_srcs=[str(story.root), "series"])
    dataset.SOPInstanceUID = generate_uid(entropy_srcs=[str(story.root), str(number)])
    dataset.InstanceNumber = number
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    path = story.root / f"ct-c-{number}.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path


def _clinic(story: Story, member: str, username: str) -> requests.Session:
    """A doctor signed in to a member's clinic pages."""
    story.token(member, username, "doctor")  # the user, with the demo's password
    browser = requests.Session()
    form = browser.get(f"{story.base(member)}/clinic/signin", timeout=30)
    signed = browser.post(
        f"{story.base(member)}/clinic/signin",
        data={"csrf_token": _csrf(form), "username": username, "password": PASSWORD},
        timeout=30,
    )
    if signed.status_code != 200:
        raise DemoError(f"{username} could not sign in to {member}'s clinic")
    return browser


def revoke_consent(story: Story) -> None:
    a = story.base("hosp-a")
    browser = story.portal
    page = browser.get(f"{a}/portal/consents", timeout=30)
    consent = re.search(r'action="/portal/consents/([^"/]+)/revoke"', page.text)
    version = re.search(r'name="version" value="([0-9]+)"', page.text)
    if consent is None or version is None:
        raise DemoError("the portal shows no consent to revoke")
    revoked = browser.post(
        f"{a}/portal/consents/{consent.group(1)}/revoke",
        data={"csrf_token": _csrf(page), "version": version.group(1)},
        timeout=30,
    )
    _expect(revoked, 200, "revoking the consent")
    doctor = story.session("hosp-b", "dr-zhou", "doctor")
    b = story.base("hosp-b")
    bundle = _expect(
        doctor.get(f"{b}/fhir/Patient/{story.patient_at('hosp-b')}/$prior-results", timeout=60),
        200,
        "$prior-results after the revocation",
    )
    denied = [
        e["resource"]["issue"][0]["diagnostics"]
        for e in bundle["entry"]
        if e["search"]["mode"] == "outcome" and "hosp-a" in e["resource"]["issue"][0]["diagnostics"]
    ]
    from_a = [
        e for e in bundle["entry"] if story.group.members["hosp-a"].url in e.get("fullUrl", "")
    ]
    if not denied or from_a:
        raise DemoError("hosp-a still released results after the revocation")
    story.console.print(
        f"   张三 revoked his consent; B asked again and A denied: {denied[0][:110]}"
    )


def checkpoint(story: Story) -> None:
    """Wait for a checkpoint certificate that covers every chain's head as it is now."""
    b = story.base("hosp-b")
    auditor = story.session("hosp-b", "auditor-li", "auditor")
    story.group.wait_converged(30)
    wanted = story.group.heads("hosp-b")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        answer = auditor.get(f"{b}/ledger/checkpoints/latest", timeout=30)
        if answer.status_code == 200:
            certificate = answer.json()
            heads = certificate["checkpoint"]["heads"]
            if all(heads.get(chain, {}).get("hash") == head for chain, head in wanted.items()):
                story.console.print(
                    f"   epoch {certificate['checkpoint']['epoch']}: the heads of "
                    f"{len(heads)} chains co-signed by {len(certificate['signers'])} members "
                    "(one BLS aggregate signature)"
                )
                return
        time.sleep(0.5)
    raise DemoError("no checkpoint covered the heads within 60 s")


def audit(story: Story) -> bool:
    """The auditor verifies hosp-b's copy of the whole ledger from its URL."""
    token = story.token("hosp-b", "auditor-li", "auditor")
    result = subprocess.run(
        [
            *HRX, "audit", "verify", story.base("hosp-b"), "--token", token,
            "--authority", str(story.group.authority_key),
        ],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    for line in (result.stdout + result.stderr).strip().splitlines():
        story.console.print(f"   {line}", highlight=False)
    return result.returncode == 0


def savings(story: Story) -> None:
    output = _hrx("report", "savings", "--dir", str(story.directory("hosp-b")))
    for line in output.strip().splitlines():
        story.console.print(f"   {line}", highlight=False)


def run_demo(root: Path, console: Console, *, keep: bool = False) -> bool:
    """Play the story under ``root``; whether the auditor found everything valid."""
    story = Story(root, console)
    steps = [
        ("three hospitals join the consortium and serve", start_consortium),
        ("the hospitals' LIS and PACS feed their nodes through the adapters", load_results),
        ("the patient enrolls in hosp-a's portal and grants consent", grant_consent),
        ("the patient is referred to hosp-b", refer),
        ("hosp-b's doctor fetches the prior results from every member", fetch_prior_results),
        ("recognised results replace new exams; one is ordered again", order_exams),
        ("hosp-c's CT is read remotely by hosp-a's imaging centre", remote_read),
        ("the patient revokes consent; the next access is denied", revoke_consent),
        ("the members co-sign a checkpoint", checkpoint),
    ]
    valid = False
    try:
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as progress:
            task = progress.add_task("the story", total=len(steps) + 1)
            for number, (title, step) in enumerate(steps, start=1):
                progress.console.print(f"\n[bold cyan]{number}. {title}[/]")
                step(story)
                progress.advance(task)
            progress.console.print(
                f"\n[bold cyan]{len(steps) + 1}. the auditor verifies everything[/]"
            )
            valid = audit(story)
            progress.advance(task)
        console.print("\n[bold cyan]savings at hosp-b, from the ledger[/]")
        savings(story)
        if keep:
            _keep_running(story)
    finally:
        story.group.close()
        story.closing.close()
    return valid


def _keep_running(story: Story) -> None:
    console = story.console
    b, a = story.base("hosp-b"), story.base("hosp-a")

    story.token("hosp-b", "dr-zhou", "doctor")
    database = open_database(load_config(story.directory("hosp-b")).database_url)
    try:
        set_password(database.write_engine, "dr-zhou", PASSWORD)
    finally:
        database.close()
    # one line each, never wrapped or cut: a URL must stay whole in a narrow terminal or a log
    places = [
        ("patient portal (hosp-a)", f"{a}/portal", f"sign in as zhangsan / {PASSWORD}"),
        ("doctors' pages (hosp-b)", f"{b}/clinic", f"sign in as dr-zhou / {PASSWORD}"),
        ("savings (hosp-b)", f"{b}/clinic/savings", f"sign in as dr-zhou / {PASSWORD}"),
        ("reading worklist (hosp-a)", f"{a}/clinic/reading", f"sign in as dr-lin / {PASSWORD}"),
        *(
            (f"FHIR API ({name})", f"{story.base(name)}/fhir/metadata", "a bearer token")
            for name in HOSPITALS
        ),
    ]
    stop = threading.Event()
    # Ctrl-C and SIGTERM only set the event, from before the table is shown: one that comes
    # the moment it is (a reader, a script) stops the consortium as well as a later one
    previous = {
        signum: signal.signal(signum, lambda *_: stop.set())
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        console.print("the consortium keeps running (Ctrl-C stops it):")
        for what, where, how in places:
            console.print(f"  {what}: {where}  ({how})", soft_wrap=True, markup=False)
        console.print(f"node directories: {story.root}", soft_wrap=True, markup=False)
        while not stop.wait(0.5):
            pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    console.print("stopping the consortium")
