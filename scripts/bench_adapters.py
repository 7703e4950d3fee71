"""Benchmark the hospital adapters on this machine, each figure beside its ceiling from the
same run:

- HL7 v2: ORU^R01 messages per second over MLLP into a node (``hrx adapters hl7-listen`` as its
  own process, with ``--processes`` listener processes, by default one per core;
  ``--connections`` senders at once, each waiting for its ACK; every ACK must be AA).
  Beside it: the same messages taken in without sockets (``Hl7Intake`` in this process:
  parse, map, store), and the ceiling — the same resources (mapped before the clock starts)
  written straight through the resource store, one transaction per message. The MLLP
  senders' messages share commits in the listener (group commit); ``--rounds`` repeats the HL7
  figures (the machine may be shared: each round is printed). Last, what one message's
  write costs SQLite: the database pages it changes (the WAL frames its commit appends, with
  checkpoints held off), and which of the database's b-trees they belong to.
- DICOMweb: studies per second synced from a real Orthanc (``sync_round``: QIDO-RS, WADO-RS
  metadata, ImagingStudy and Patient stored), and again when nothing changed; the ceiling is
  the same DICOMweb requests for every study without storing anything.

    python3 scripts/bench_adapters.py [--messages 2000] [--connections 4] [--processes N]
        [--studies 100] [--only hl7|dicomweb] [--rounds 1]
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from sqlalchemy import event

from fhir_adapters.hl7v2 import Systems, parse_message, read_results
from node.base.config import load_config
from node.demo.nodes import free_port, init_node, join_alone
from node.demo.orthanc import running_orthanc, upload
from node.intake.dicom import DicomwebClient, sync_round
from node.intake.hl7 import Hl7Intake
from node.intake.mllp import send_many
from node.services import open_services

ROOT = Path(__file__).resolve().parent.parent

console = Console()
HRX = [sys.executable, "-m", "node.cli"]
SAMPLE = ROOT / "fhir_adapters" / "samples" / "hl7" / "hosp-a-cbc-v251-utf8.hl7"


def node_dir(root: Path, name: str) -> Path:
    directory = root / name
    init_node(directory, "hosp-a", None, 8080)
    join_alone(directory)
    return directory


def messages(count: int) -> list[bytes]:
    """``count`` distinct CBC messages: their own control ID and filler order number, a
    patient per ten messages (MRN and a valid resident ID)."""
    text = SAMPLE.read_bytes().decode("utf-8").split("\x1c")[0].strip("\x0b")
    first = text.split("MSH|", 2)
    template = "MSH|" + first[1] if len(first) > 1 else text
    found = []
    for number in range(count):
        patient = number // 10
        body = 330106198500000000 + patient * 10
        digits = str(body)[:17]
        weights = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]
        check = "10X98765432"[sum(int(d) * w for d, w in zip(digits, weights, strict=True)) % 11]
        message = (
            template.replace("HZSY2603100001", f"BENCH{number:010d}")
            .replace("LAB20260310-0001", f"LAB-B{number:08d}")
            .replace("HZ00012345", f"HZB{patient:07d}")
            .replace("330106198503150016", digits + check)
        )
        found.append(message.encode("utf-8"))
    return found


def listener(directory: Path, processes: int = 1) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    command = [*HRX, "adapters", "hl7-listen", "--dir", str(directory), "--port", str(port)]
    process = subprocess.Popen(
        [*command, "--processes", str(processes)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    line = process.stdout.readline().decode()
    if "MLLP" not in line:
        raise RuntimeError(f"hl7-listen did not start: {line!r}")
    return process, port


def bench_hl7(
    root: Path, count: int, connections: int, processes: int = 1
) -> list[tuple[str, float, str]]:
    batch = messages(count)
    results_per_message = sum(1 for line in batch[0].split(b"\r") if line.startswith(b"OBX"))
    rows = []
    # over MLLP, into a listener process
    directory = node_dir(root, "mllp")
    process, port = listener(directory, processes)
    acks: list[bytes] = []
    try:
        shares = [batch[i::connections] for i in range(connections)]
        lock = threading.Lock()

        def send(share: list[bytes]) -> None:
            answers = send_many("127.0.0.1", port, share)
            with lock:
                acks.extend(answers)

        threads = [threading.Thread(target=send, args=(share,)) for share in shares]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        mllp = time.perf_counter() - started
    finally:
        process.terminate()
        process.wait(timeout=30)
    refused = [a for a in acks if b"MSA|AA|" not in a]
    if len(acks) != count or refused:
        raise RuntimeError(f"{len(acks)} ACKs, {len(refused)} not AA: {refused[:1]!r}")
    rows.append(
        (
            f"HL7 over MLLP ({connections} connections, {processes} listener processes), "
            "messages/s",
            count / mllp,
            f"{count * results_per_message / mllp:,.0f} results/s",
        )
    )
    # the same messages, in this process, no sockets
    directory = node_dir(root, "intake")
    services = open_services(load_config(directory))
    try:
        intake = Hl7Intake(services)
        started = time.perf_counter()
        for payload in batch:
            outcome = intake.take_in(payload, "bench")
            assert outcome.accepted, outcome.reason
        in_process = time.perf_counter() - started
    finally:
        services.close()
    rows.append(
        ("HL7 taken in without sockets (parse, map, store), messages/s", count / in_process, "")
    )
    # the ceiling: the same resources, mapped beforehand, written through the store
    directory = node_dir(root, "ceiling")
    services = open_services(load_config(directory))
    try:
        systems = Systems("hosp-a")
        mapped = [read_results(parse_message(payload), systems)[0] for payload in batch]
        patients: dict[str, str] = {}
        started = time.perf_counter()
        for group in mapped:
            with services.store.writing() as writer:
                key = group.patient.match_keys[0][1]
                if key not in patients:
                    patient_resource = {
                        "resourceType": "Patient",
                        "identifier": group.patient.identifiers,
                        **group.patient.demographics,
                    }
                    patients[key] = writer.create(patient_resource).id
                patient = patients[key]
                for order in group.orders:
                    for result in order.results:
                        writer.update(
                            "Observation", result.resource_id, result.observation(patient)
                        )
                    writer.update("DiagnosticReport", order.resource_id, order.report(patient))
        ceiling = time.perf_counter() - started
    finally:
        services.close()
    rows.append(
        ("ceiling: the same resources written through the store, messages/s", count / ceiling, "")
    )
    rows.append(pages_per_message(root, batch[: min(count, 200)]))
    return rows


def pages_per_message(root: Path, batch: list[bytes]) -> tuple[str, float, str]:
    """The pages one message's write changes, as the WAL frames its commit appends (the second
    half of ``batch``, taken one at a time with checkpoints held off), and the b-trees they
    belong to (each page's owner, from SQLite's ``dbstat``)."""
    directory = node_dir(root, "pages")
    services = open_services(load_config(directory))
    try:
        engine = services.store.write_engine

        @event.listens_for(engine, "connect")
        def no_checkpoints(dbapi: Any, _record: Any) -> None:
            dbapi.execute("PRAGMA wal_autocheckpoint=0")

        engine.dispose()
        intake = Hl7Intake(services)
        half = len(batch) // 2
        for payload in batch[:half]:
            assert intake.take_in(payload, "bench").accepted
        database = Path(str(engine.url.database))
        wal = database.with_name(database.name + "-wal")
        with sqlite3.connect(database) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        frames: collections.Counter[str] = collections.Counter()
        for payload in batch[half:]:
            assert intake.take_in(payload, "bench").accepted
        size = wal.stat().st_size
        with sqlite3.connect(database) as conn:  # the pages' owners, new pages included
            owners = dict(conn.execute("SELECT pageno, name FROM dbstat"))
        with wal.open("rb") as handle:
            page = int.from_bytes(handle.read(32)[8:12], "big")  # the WAL's header: page size
            while header := handle.read(24):  # each frame: a 24-byte header and a page
                number = int.from_bytes(header[:4], "big")
                frames[owners.get(number, "free pages")] += 1
                handle.seek(page, os.SEEK_CUR)
    finally:
        services.close()
    messages = len(batch) - half
    per_message = sum(frames.values()) / messages
    top = ", ".join(f"{name} {n / messages:.0f}" for name, n in frames.most_common(4))
    return (
        "pages changed per message (WAL frames, no checkpoints)",
        per_message,
        f"{size / messages / 2**20:.1f} MiB of WAL each; most: {top}",
    )


def study_files(count: int) -> list[bytes]:
    """``count`` studies of one CT image each, their own UIDs, a patient per five studies."""
    source = Path(pydicom.data.__file__).parent / "test_files" / "CT_small.dcm"
    found = []
    for number in range(count):
        dataset = pydicom.dcmread(source)
        dataset.StudyInstanceUID = generate_uid()
        dataset.SeriesInstanceUID = generate_uid()
        dataset.SOPInstanceUID = generate_uid()
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.PatientID = f"CTB{number // 5:06d}"
        dataset.AccessionNumber = f"ACC{number:08d}"
        dataset.StudyDate = time.strftime("%Y%m%d")
        with tempfile.SpooledTemporaryFile() as buffer:
            dataset.save_as(buffer, enforce_file_format=True)
            buffer.seek(0)
            found.append(buffer.read())
    return found


def bench_dicomweb(root: Path, count: int) -> list[tuple[str, float, str]]:
    rows = []
    with running_orthanc(root / "orthanc") as pacs:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("loading Orthanc", total=count)
            for data in study_files(count):
                upload(pacs.rest_base, data)
                progress.advance(task)
        directory = node_dir(root, "pacs")
        services = open_services(load_config(directory))
        client = DicomwebClient(pacs.dicomweb_url, 30_000, 100)
        try:
            for _ in range(2):  # the first pass warms Orthanc's caches; the second is timed
                started = time.perf_counter()
                uids = client.study_uids(None)
                for uid in uids:
                    client.study_source(uid)
                ceiling = time.perf_counter() - started
            assert len(uids) == count, len(uids)
            started = time.perf_counter()
            report = sync_round(services, client, full=True)
            first = time.perf_counter() - started
            assert report.tally.created == count, report.describe()
            started = time.perf_counter()
            again = sync_round(services, client, full=True)
            second = time.perf_counter() - started
            assert again.tally.unchanged == count, again.describe()
        finally:
            client.close()
            services.close()
    rows.append(("DICOMweb sync, new studies/s", count / first, "QIDO-RS + WADO-RS + store"))
    rows.append(("DICOMweb sync, unchanged studies/s", count / second, "nothing written"))
    rows.append(
        ("ceiling: the same DICOMweb requests, nothing stored, studies/s", count / ceiling, "")
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--studies", type=int, default=100)
    parser.add_argument("--only", choices=["hl7", "dicomweb"], default=None)
    parser.add_argument("--rounds", type=int, default=1, help="of the HL7 figures")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hrx-bench-adapters-"))
    rows: list[tuple[str, float, str]] = []
    try:
        for number in range(1, args.rounds + 1 if args.only != "dicomweb" else 1):
            with console.status(f"HL7 v2 over MLLP, round {number}"):
                found = bench_hl7(
                    root / f"hl7-{number}", args.messages, args.connections, args.processes
                )
            if args.rounds > 1:
                found = [(f"round {number}: {name}", value, note) for name, value, note in found]
            rows += found
        if args.only != "hl7":
            with console.status("DICOMweb from Orthanc"):
                rows += bench_dicomweb(root, args.studies)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    table = Table(title=f"adapters: {args.messages} HL7 messages, {args.studies} studies")
    table.add_column("figure")
    table.add_column("measured", justify="right")
    table.add_column("note")
    for figure, value, note in rows:
        table.add_row(figure, f"{value:,.0f}", note)
    console.print(table)


if __name__ == "__main__":
    main()
