"""A real PACS for tests, demos and benchmarks: Debian's Orthanc with its DICOMweb plugin,
started on free 127.0.0.1 ports with a configuration of its own in a temporary directory
(storage there, remote access refused, one user, the DICOM listener refusing every request —
no modality is known and unknown ones may do nothing) and stopped afterwards, also when the
code using it fails.

    with running_orthanc(tmp_path / "orthanc") as pacs:
        upload(pacs.rest_base, Path("CT_small.dcm"))
        hrx adapters dicomweb-sync --dir NODE --url pacs.dicomweb_url

Orthanc 1.10 cannot be told which address to listen on; it refuses HTTP clients other than
the local machine (``RemoteAccessAllowed``) and asks every client for the password.
``scripts/test-deps.sh`` installs the Debian packages ``orthanc`` and ``orthanc-dicomweb``.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import requests

from node.demo.nodes import free_port

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USERNAME = "hrx"
PASSWORD = "hrx-test-password"


def missing() -> str | None:
    """Why Orthanc cannot be started here, or None."""
    for path, package in ((ORTHANC, "orthanc"), (DICOMWEB_PLUGIN, "orthanc-dicomweb")):
        if not path.exists():
            return f"{path} is missing: install the Debian package {package} (scripts/test-deps.sh)"
    return None


@dataclass(frozen=True)
class OrthancServer:
    http_port: int
    dicom_port: int
    username: str
    password: str
    directory: Path
    process: subprocess.Popen[bytes] | None = field(default=None, compare=False)

    def stop(self) -> None:
        """Stop the PACS before its block ends (a PACS that goes down)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    @property
    def rest_base(self) -> str:
        """Orthanc's REST API, the credentials in the URL."""
        return f"http://{self.username}:{self.password}@127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root, the credentials in the URL (as ``--url`` takes it)."""
        return f"{self.rest_base}/dicom-web"

    @property
    def public_dicomweb_url(self) -> str:
        """The DICOMweb root without credentials (as the node shows and stores it)."""
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    @property
    def auth(self) -> tuple[str, str]:
        return (self.username, self.password)


def _configuration(directory: Path, http_port: int, dicom_port: int) -> dict[str, Any]:
    storage = directory / "storage"
    return {
        "Name": "hrx-test-pacs",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "HRXTESTPACS",
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowEcho": False,
        "DicomAlwaysAllowStore": False,
        "DicomModalities": {},
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USERNAME: PASSWORD},
        "DefaultEncoding": "Utf8",
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
        "HttpCompressionEnabled": False,
        "ExecuteLuaEnabled": False,
        "RestApiWriteToFileSystemEnabled": False,
        "StableAge": 1,
    }


@contextmanager
def running_orthanc(directory: Path, *, timeout: float = 30) -> Iterator[OrthancServer]:
    """Orthanc with DICOMweb, serving from ``directory`` (created) until the block ends."""
    reason = missing()
    if reason:
        raise RuntimeError(reason)
    directory.mkdir(parents=True, exist_ok=True)
    server = OrthancServer(free_port(), free_port(), USERNAME, PASSWORD, directory)
    config = directory / "orthanc.json"
    config.write_text(
        json.dumps(_configuration(directory, server.http_port, server.dicom_port), indent=2)
    )
    log_path = directory / "orthanc.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [str(ORTHANC), str(config)], stdout=log, stderr=log, cwd=directory
        )
    try:
        _wait_ready(server, process, log_path, timeout)
        yield replace(server, process=process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_ready(
    server: OrthancServer, process: subprocess.Popen[bytes], log_path: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{server.http_port}/system"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"Orthanc exited with {process.returncode}:\n{tail}")
        try:
            if requests.get(url, auth=server.auth, timeout=1).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):  # not up, or busy starting
            pass
        time.sleep(0.05)
    raise RuntimeError(f"Orthanc did not answer on {url} within {timeout} s")


def upload(rest_base: str, path: Path | bytes) -> dict[str, Any]:
    """Store one DICOM file (or its bytes) in Orthanc (REST ``POST /instances``)."""
    data = path if isinstance(path, bytes) else path.read_bytes()
    response = requests.post(
        f"{rest_base}/instances",
        data=data,
        headers={"Content-Type": "application/dicom"},
        timeout=30,
    )
    response.raise_for_status()
    answer: dict[str, Any] = response.json()
    if answer.get("Status") not in ("Success", "AlreadyStored"):
        raise RuntimeError(f"Orthanc did not store {path!r:.80}: {answer}")
    return answer
