"""A real nginx for tests and benchmarks, on a free loopback port, with a site of the
caller's making (the deployment's own blocks, taken from deploy/nginx/hrx-node.conf, where
it needs them); stopped when the block ends. ``scripts/test-deps.sh`` installs nginx."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from node.demo.nodes import free_port

SITE = Path(__file__).resolve().parents[2] / "deploy" / "nginx" / "hrx-node.conf"


def nginx_binary() -> str | None:
    return shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )


def site_blocks(*names: str) -> str:
    """The ``location`` blocks of the deployment's site whose heads are ``names`` (e.g.
    ``/_hrx_pacs/``, ``@pacs_down``), as written there."""
    text = SITE.read_text()
    blocks = []
    for name in names:
        found = re.search(r"\n    location " + re.escape(name) + r" \{\n.*?\n    \}\n", text, re.S)
        if found is None:
            raise RuntimeError(f"deploy/nginx/hrx-node.conf has no location {name}")
        blocks.append(found.group(0))
    return "".join(blocks)


FRAMES = (
    '~ "^/dicomweb/studies/[0-9.]{1,64}/series/[0-9.]{1,64}/instances/[0-9.]{1,64}/frames/'
    '[0-9,]{1,1600}$"'
)


def offload_site(
    root: Path, node_port: int, pacs_root: str, username: str, password: str
) -> tuple[str, str]:
    """The http-level directives and the server body of a site in front of the node on
    ``node_port`` with the deployment's DICOMweb blocks (its decision cache under ``root``),
    their CHANGE lines set to the PACS at ``pacs_root`` (``http://host:port/dicom-web``) and
    its credentials."""
    text = SITE.read_text()
    start = text.index("proxy_cache_path ")
    http = text[start : text.index("upstream hrx_node {")]
    http = http.replace("/var/cache/nginx/hrx-decisions", str(root / "decisions"))
    blocks = site_blocks(
        "/_hrx_pacs/",
        FRAMES,
        "= /_hrx_decide",
        "@hrx_refused_401",
        "@hrx_refused_403",
        "@pacs_refused",
        "@pacs_not_found",
        "@pacs_down",
    )
    basic = base64.b64encode(f"{username}:{password}".encode()).decode()
    host = pacs_root.split("://", 1)[1].split("/", 1)[0]
    for old, new in (
        ("http://127.0.0.1:8042/dicom-web/;", f"{pacs_root.rstrip('/')}/;"),
        ("proxy_pass http://127.0.0.1:8042;", f"proxy_pass http://{host};"),
        ('"Basic aHJ4OmNoYW5nZS1tZQ=="', f'"Basic {basic}"'),
        ("http://hrx_node$request_uri;", f"http://127.0.0.1:{node_port}$request_uri;"),
    ):
        if old not in blocks:
            raise RuntimeError(f"deploy/nginx/hrx-node.conf's DICOMweb blocks lack {old}")
        blocks = blocks.replace(old, new)
    server = f"""
        location / {{
            proxy_pass http://127.0.0.1:{node_port};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
{blocks}"""
    return http, server


@contextmanager
def running_nginx(
    root: Path, server_body: str, http_body: str = "", workers: str = "1"
) -> Iterator[str]:
    """nginx serving one plain-HTTP server on a free loopback port with ``server_body`` (and
    ``http_body`` beside it), with ``workers`` worker processes (``auto``: one per core, as
    Debian's nginx runs); its base URL until the block ends."""
    binary = nginx_binary()
    if binary is None:
        raise RuntimeError("nginx is missing (Debian: apt-get install nginx; scripts/test-deps.sh)")
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    for temporary in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (root / temporary).mkdir(exist_ok=True)
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers that may read the temp dirs
    (root / "nginx.conf").write_text(
        f"""{user}worker_processes {workers};
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
{http_body}
    server {{
        listen 127.0.0.1:{port};
{server_body}
    }}
}}
"""
    )
    check = subprocess.run(
        [binary, "-t", "-p", str(root), "-c", str(root / "nginx.conf")],
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        raise RuntimeError(f"nginx refuses the configuration: {check.stderr}")
    process = subprocess.Popen(
        [binary, "-p", str(root), "-c", str(root / "nginx.conf"), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(f"{base}/livez", timeout=2)
                break
            except requests.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "nginx did not start: " + (root / "error.log").read_text()[-1000:]
                    ) from None
                time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)
