"""Benchmark images through the node's DICOMweb proxy against the same requests straight to the
PACS, in the same run.

Loads a CT series into a real Orthanc (``--instances`` slices of 512×512, 16 bits: 512 KiB a
frame, made from pydicom's CT_small), takes it into a node (``hrx adapters dicomweb-sync``),
serves the node with gunicorn (2 workers, gthread) and drives both with wrk from another
process, each figure beside its ceiling:

- frames: WADO-RS ``…/frames/1`` of every slice, as stored (what a viewer scrolls through);
- rendered: ``…/rendered`` of every slice as JPEG, windowed for the mediastinum;
- metadata: the series' metadata (JSON, its URLs rewritten on the way);
- study: the whole study in one multipart answer, streamed (one client, MB/s), and how much
  the serving worker's memory grew meanwhile;
- offload: frames and renderings again, the node (gunicorn, ``dicomweb.offload``) behind
  the deployment's nginx blocks (one worker per core, as Debian runs it): renderings are sent
  by nginx once the node has decided (X-Accel-Redirect); frames are decided by the node once
  per token and study in 10 s (nginx keeps the decision) and sent by nginx; against the same
  requests straight to the PACS;
- relay: frames of the same series read by another member's doctor through that member's
  node (``/dicomweb/members/hosp-a``) under a permitted access request, against the same
  frames straight from the PACS. Both members run in the test harness (Werkzeug's threaded
  server behind a loopback relay each), not gunicorn.
- consult round trip: hosp-a asks hosp-b to read the study, hosp-b's radiologist claims it
  and reports at once (no reading time), through the clinic pages as people use them: from
  the request sent to the signed report stored at hosp-a (the report's POST returns once the
  requester has verified and stored it), ``--consults`` times; beside it, the ceiling of one
  loopback HTTP request to each node (``GET /livez``).

    python3 scripts/bench_dicomweb.py [--instances 100] [--seconds 10] [--connections 8]
        [--consults 20]

Needs Orthanc with its DICOMweb plugin (scripts/test-deps.sh) and wrk (apt-get install wrk).
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import requests
from click.testing import CliRunner
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from rich.console import Console

from consent.model import consent_resource
from consent.pseudonym import RESIDENT_ID_SYSTEM
from node.cli import main as hrx_main
from node.demo import orthanc
from node.demo.harness import Consortium
from node.demo.nodes import Node, free_port, init_node, join_alone, post, wait_healthy
from node.demo.proxy import offload_site, running_nginx
from node.identity.users import set_password

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.bench_fhir import gunicorn, lua_paths

console = Console()
RESIDENT_ID = "330106198503150016"
CT_SMALL = Path(pydicom.data.__file__).parent / "test_files" / "CT_small.dcm"
FRAMES_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'


def ct_series(directory: Path, count: int) -> tuple[str, str, list[str]]:
    """``count`` CT slices of 512×512 in one series of one study; their UIDs."""
    source = pydicom.dcmread(CT_SMALL)
    pixels = np.kron(source.pixel_array, np.ones((4, 4), dtype=source.pixel_array.dtype))
    study, series = generate_uid(), generate_uid()
    other = Dataset()
    other.PatientID = RESIDENT_ID
    other.IssuerOfPatientID = "2.16.156.10011.1.3"
    instances = []
    directory.mkdir(parents=True, exist_ok=True)
    for number in range(1, count + 1):
        dataset = pydicom.dcmread(CT_SMALL)
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, series
        dataset.SOPInstanceUID = generate_uid()
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.InstanceNumber = number
        dataset.PatientID = "MRN-BENCH"
        dataset.OtherPatientIDsSequence = [other]
        dataset.Rows = dataset.Columns = 512
        dataset.PixelData = pixels.tobytes()
        path = directory / f"{number:04d}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        instances.append(dataset.SOPInstanceUID)
    return study, series, instances


def wrk_run(
    url: str, paths: list[str], headers: list[str], seconds: int, connections: int
) -> dict[str, float]:
    """Requests/s, MB/s and p50 latency (ms) of wrk over ``paths`` at ``url``."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(lua_paths(paths))
    command = ["wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds}s", "--latency"]
    for header in headers:
        command += ["-H", header]
    output = subprocess.run(
        [*command, "-s", handle.name, url], capture_output=True, text=True, check=True
    ).stdout
    os.unlink(handle.name)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if errors:
        raise SystemExit(f"{errors.group(1)} requests failed:\n{output}")
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    size, unit = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", output).groups()  # type: ignore[union-attr]
    megabytes = float(size) * {"B": 1 / 2**20, "KB": 1 / 1024, "MB": 1, "GB": 1024}[unit]
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", output)
    assert p50
    latency = float(p50.group(1)) * {"us": 0.001, "ms": 1, "s": 1000}[p50.group(2)]
    return {"rate": rate, "mbs": megabytes, "p50": latency}


def show(name: str, proxied: dict[str, float], direct: dict[str, float]) -> None:
    share = proxied["rate"] / direct["rate"] * 100
    console.print(
        f"{name:<10} proxy {proxied['rate']:8.1f}/s {proxied['mbs']:7.1f} MB/s "
        f"p50 {proxied['p50']:6.1f} ms | direct {direct['rate']:8.1f}/s "
        f"{direct['mbs']:7.1f} MB/s p50 {direct['p50']:6.1f} ms | {share:5.1f}% of direct"
    )


def stream_study(url: str, headers: dict[str, str]) -> tuple[float, int]:
    """MB/s of one client reading a whole study, and its bytes."""
    started, size = time.perf_counter(), 0
    with requests.get(url, headers=headers, stream=True, timeout=120) as answer:
        answer.raise_for_status()
        for chunk in answer.iter_content(1 << 20):
            size += len(chunk)
    return size / 2**20 / (time.perf_counter() - started), size


def rss_kib(pid: int) -> int:
    """Resident memory of a process and its children (the gunicorn workers), in KiB."""
    total = 0
    pids = [pid] + [
        int(p)
        for p in subprocess.run(
            ["pgrep", "-P", str(pid)], capture_output=True, text=True
        ).stdout.split()
    ]
    for each in pids:
        status = Path(f"/proc/{each}/status")
        if status.exists():
            match = re.search(r"VmRSS:\s+(\d+)", status.read_text())
            total += int(match.group(1)) if match else 0
    return total


def local_proxy(args: argparse.Namespace, work: Path, pacs: orthanc.OrthancServer) -> None:
    study, series, instances = args.uids
    directory, port = work / "node", free_port()
    init_node(directory, "hosp-a", None, port)
    join_alone(directory)
    config = directory / "node.toml"
    config.write_text(config.read_text() + f'\n[dicomweb]\nurl = "{pacs.dicomweb_url}"\n')
    synced = CliRunner().invoke(hrx_main, ["adapters", "dicomweb-sync", "--dir", str(directory)])
    assert synced.exit_code == 0, synced.output
    node = Node(directory, port)
    token = node.token("bench", "doctor")
    server = gunicorn(directory, port, 2, 4)
    try:
        wait_healthy(node.base, server)
        basic = base64.b64encode(f"{pacs.username}:{pacs.password}".encode()).decode()
        direct_auth, proxy_auth = f"Authorization: Basic {basic}", f"Authorization: Bearer {token}"
        direct_root = f"http://127.0.0.1:{pacs.http_port}/dicom-web"
        proxy_root = f"{node.base}/dicomweb"
        prefix = f"studies/{study}/series/{series}"
        frames = [f"/{prefix}/instances/{i}/frames/1" for i in instances]
        rendered = [f"/{prefix}/instances/{i}/rendered?window=40,400,linear" for i in instances]
        metadata = [f"/{prefix}/metadata"]
        seconds, connections = args.seconds, args.connections
        console.print(
            f"{len(instances)} CT slices of 512×512×16 bits in Orthanc; node under gunicorn "
            f"(2 workers × 4 threads); wrk 2 threads, {connections} connections, {seconds} s each"
        )
        ceiling = wrk_run(f"{node.base}/livez", ["/livez"], [], seconds, connections)
        console.print(f"ceiling    GET /livez {ceiling['rate']:.0f}/s p50 {ceiling['p50']:.1f} ms")
        for name, paths, accept in (
            ("frames", frames, FRAMES_ACCEPT),
            ("rendered", rendered, "image/jpeg"),
            ("metadata", metadata, "application/dicom+json"),
        ):
            direct = wrk_run(
                direct_root,
                [f"/dicom-web{p}" for p in paths],
                [direct_auth, f"Accept: {accept}"],
                seconds,
                connections,
            )
            proxied = wrk_run(
                proxy_root,
                [f"/dicomweb{p}" for p in paths],
                [proxy_auth, f"Accept: {accept}"],
                seconds,
                connections,
            )
            show(name, proxied, direct)
        before = rss_kib(server.pid)
        direct_mbs, size = stream_study(
            f"{direct_root}/studies/{study}", {"Authorization": f"Basic {basic}"}
        )
        proxy_mbs, _ = stream_study(
            f"{proxy_root}/studies/{study}", {"Authorization": f"Bearer {token}"}
        )
        grown = rss_kib(server.pid) - before
        console.print(
            f"study      one client, {size / 2**20:.1f} MB: proxy {proxy_mbs:.1f} MB/s | direct "
            f"{direct_mbs:.1f} MB/s | {proxy_mbs / direct_mbs * 100:.1f}% of direct; the "
            f"workers' memory grew {grown / 1024:.1f} MB meanwhile"
        )
    finally:
        server.terminate()
        server.wait()
    offload(args, work, pacs, directory, token, frames, rendered)


def offload(
    args: argparse.Namespace,
    work: Path,
    pacs: orthanc.OrthancServer,
    directory: Path,
    token: str,
    frames: list[str],
    rendered: list[str],
) -> None:
    """Frames and renderings through nginx with the node deciding (X-Accel-Redirect)."""
    port = free_port()
    server = gunicorn(directory, port, 2, 4, {"HRX_DICOMWEB_OFFLOAD": "/_hrx_pacs"})
    basic = base64.b64encode(f"{pacs.username}:{pacs.password}".encode()).decode()
    http, site = offload_site(
        work / "nginx", port, pacs.public_dicomweb_url, pacs.username, pacs.password
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", server)
        with running_nginx(work / "nginx", site, http, workers="auto") as base:
            direct_root = f"http://127.0.0.1:{pacs.http_port}/dicom-web"
            for name, paths, accept in (
                ("frames", frames, FRAMES_ACCEPT),
                ("rendered", rendered, "image/jpeg"),
            ):
                direct = wrk_run(
                    direct_root,
                    [f"/dicom-web{p}" for p in paths],
                    [f"Authorization: Basic {basic}", f"Accept: {accept}"],
                    args.seconds,
                    args.connections,
                )
                proxied = wrk_run(
                    base,
                    [f"/dicomweb{p}" for p in paths],
                    [f"Authorization: Bearer {token}", f"Accept: {accept}"],
                    args.seconds,
                    args.connections,
                )
                show(f"{name}+ngx", proxied, direct)
    finally:
        server.terminate()
        server.wait()


def relay(args: argparse.Namespace, work: Path, pacs: orthanc.OrthancServer) -> None:
    study, series, instances = args.uids
    group = Consortium(work / "consortium", 2, epoch_seconds=30)
    try:
        config = group.members["hosp-a"].directory / "node.toml"
        config.write_text(config.read_text() + f'\n[dicomweb]\nurl = "{pacs.dicomweb_url}"\n')
        reader = group.members["hosp-b"].directory / "node.toml"
        reader.write_text(reader.read_text() + '\n[consults]\nmodalities = "CT"\n')
        synced = CliRunner().invoke(
            hrx_main,
            ["adapters", "dicomweb-sync", "--dir", str(group.members["hosp-a"].directory)],
        )
        assert synced.exit_code == 0, synced.output
        group.start_all()
        a = Node(group.members["hosp-a"].directory, group.members["hosp-a"].web_port)
        b = Node(group.members["hosp-b"].directory, group.members["hosp-b"].web_port)
        identifier = {"identifier": f"{RESIDENT_ID_SYSTEM}|{RESIDENT_ID}"}
        at_a = a.session().get(f"{a.fhir}/Patient", params=identifier).json()
        patient_a = at_a["entry"][0]["resource"]["id"]
        granted = post(
            a.session(a.token(f"pt-{uuid.uuid4().hex[:6]}", "patient", patient=patient_a)),
            f"{a.fhir}/Consent",
            consent_resource(patient_a, ["hosp-b"], ["imaging"], ["TREAT"], None, None),
        )
        assert granted.status_code == 201, granted.text
        patient = {
            "resourceType": "Patient",
            "identifier": [{"system": RESIDENT_ID_SYSTEM, "value": RESIDENT_ID}],
        }
        patient_b = post(b.session(), f"{b.fhir}/Patient", patient).json()["id"]
        doctor = b.token("dr-bench", "doctor")
        prior = b.session(doctor).get(
            f"{b.fhir}/Patient/{patient_b}/$prior-results", params={"category": "imaging"}
        )
        assert prior.status_code == 200 and "ImagingStudy" in prior.text, prior.text[:500]
        basic = base64.b64encode(f"{pacs.username}:{pacs.password}".encode()).decode()
        prefix = f"studies/{study}/series/{series}"
        frames = [f"/{prefix}/instances/{i}/frames/1" for i in instances]
        direct = wrk_run(
            f"http://127.0.0.1:{pacs.http_port}/dicom-web",
            [f"/dicom-web{p}" for p in frames],
            [f"Authorization: Basic {basic}", f"Accept: {FRAMES_ACCEPT}"],
            args.seconds,
            args.connections,
        )
        relayed = wrk_run(
            f"{b.base}/dicomweb/members/hosp-a",
            [f"/dicomweb/members/hosp-a{p}" for p in frames],
            [f"Authorization: Bearer {doctor}", f"Accept: {FRAMES_ACCEPT}"],
            args.seconds,
            args.connections,
        )
        console.print(
            "relay      hosp-b's doctor reading hosp-a's frames through both nodes (harness: "
            "Werkzeug servers, a loopback relay before each)"
        )
        show("frames", relayed, direct)
        consult_round_trips(args, a, b, patient_a, study)
    finally:
        group.close()


def _clinic(at: Node, username: str) -> requests.Session:
    at.user(username, "doctor")
    set_password(at.database.write_engine, username, "bench password 1")
    browser = requests.Session()
    form = browser.get(f"{at.base}/clinic/signin", timeout=30)
    browser.post(
        f"{at.base}/clinic/signin",
        data={"username": username, "password": "bench password 1", "csrf_token": _csrf(form)},
        timeout=30,
    )
    return browser


def _csrf(page: requests.Response) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert found, page.text[:300]
    return found.group(1)


def consult_round_trips(
    args: argparse.Namespace, a: Node, b: Node, patient: str, study: str
) -> None:
    township, county = _clinic(a, "dr-bench-a"), _clinic(b, "dr-bench-b")
    request_page = f"{a.base}/clinic/patients/{patient}/consult"
    token = _csrf(township.get(request_page, timeout=30))
    county_token = _csrf(county.get(f"{b.base}/clinic/reading", timeout=30))
    times = []
    for _ in range(args.consults):
        started = time.perf_counter()
        asked = township.post(
            request_page,
            data={
                "csrf_token": token,
                "study": study,
                "reader": "hosp-b",
                "priority": "urgent",
                "question": "bench",
            },
            timeout=60,
        )
        consult = re.search(r'id="consult-([0-9a-f-]{36})"', asked.text)
        assert consult, asked.text[:500]
        page = f"{b.base}/clinic/reading/{consult.group(1)}"
        county.post(page, data={"csrf_token": county_token, "action": "claim"}, timeout=60)
        sent = county.post(
            page,
            data={
                "csrf_token": county_token,
                "action": "report",
                "findings": "未见异常。",
                "impression": "正常。",
            },
            timeout=60,
        )
        assert "报告已签名并送达" in sent.text, sent.text[:500]
        times.append((time.perf_counter() - started) * 1000)
    ceiling = []
    for _ in range(50):
        for at in (a, b):
            started = time.perf_counter()
            requests.get(f"{at.base}/livez", timeout=10)
            ceiling.append((time.perf_counter() - started) * 1000)
    times.sort()
    ceiling.sort()
    console.print(
        f"consult    request to signed report stored at the requester ({args.consults} "
        f"consults, no reading time): p50 {times[len(times) // 2]:.0f} ms, p90 "
        f"{times[int(len(times) * 0.9) - 1]:.0f} ms | ceiling: one loopback GET /livez p50 "
        f"{ceiling[len(ceiling) // 2]:.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--consults", type=int, default=20)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    if orthanc.missing():
        raise SystemExit(orthanc.missing())
    work = Path(tempfile.mkdtemp(prefix="hrx-bench-dicomweb-"))
    try:
        with orthanc.running_orthanc(work / "orthanc") as pacs:
            args.uids = ct_series(work / "files", args.instances)
            for path in sorted((work / "files").iterdir()):
                orthanc.upload(pacs.rest_base, path)
            local_proxy(args, work, pacs)
            relay(args, work, pacs)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
