"""A hospital's deployment (deploy/): secrets kept out of node.toml, the hospital's compose
file, the TLS proxy, the systemd units with their install script, and the authority's offline
tooling — each run for real as far as this machine allows.

- node.toml holds no secret: init's database password goes to keys/database.password, and a
  node.toml every user may read is refused when it holds a password or a token.
- deploy/hospital/docker-compose.yml is valid compose (docker-compose itself), runs real
  commands, publishes nothing beyond 127.0.0.1 unless .env names an address, and holds no
  secret; its init script runs against this machine's PostgreSQL, and its web service serves.
- deploy/nginx/hrx-node.conf runs in a real nginx (TLS, loopback ports) in front of that web
  service: the node sees the client's address and https, Prometheus scrapes with the token,
  a SIGHUP reload takes a new token without a restart.
- deploy/systemd: `systemd-analyze verify` reads the units without a complaint, and
  install-node.sh runs as root in a private mount namespace (its own /etc, /opt and /srv, so
  the user hrx it creates exists only there): it makes the user and the directories, runs
  hrx node init as hrx, and the web unit's command, run as hrx, serves the node.
- deploy/authority/authority.sh makes the secret and two roster versions, and a node joins
  with what is carried to a hospital.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from node.base.config import load_config, write_config
from node.base.errors import ConfigError
from tests.helpers import ROOT
from tests.helpers.compose import docker_compose, hrx_command, mounts, published_ports
from tests.helpers.databases import POSTGRES_ADMIN, postgres_admin
from tests.helpers.nodes import free_port, hrx, init_node, wait_healthy

DEPLOY = ROOT / "deploy"
HOSPITAL = DEPLOY / "hospital"
NGINX_SITE = DEPLOY / "nginx" / "hrx-node.conf"
UNITS = DEPLOY / "systemd"
CONTAINER_NODE = "/srv/hrx/node"
SECRET_WORDS = ("PASSWORD", "TOKEN", "SECRET")


def hrx_tools(directory: Path) -> dict[str, str]:
    """An environment whose ``hrx`` is this checkout's CLI (not an installed one)."""
    directory.mkdir(parents=True, exist_ok=True)
    wrapper = directory / "hrx"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m node.cli "$@"\n')
    wrapper.chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{directory}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
    }


# -- secrets out of node.toml ---------------------------------------------------------------


def node_settings(url: str) -> dict[str, dict[str, Any]]:
    return {
        "node": {"id": "hosp-a", "name": "示范区人民医院", "url": "https://hrx.hosp-a.example"},
        "database": {"url": url},
    }


def test_write_config_keeps_the_database_password_out_of_node_toml(tmp_path: Path) -> None:
    password = "p@ss:w/rd%1"
    quoted = "p%40ss%3Aw%2Frd%251"
    write_config(tmp_path, node_settings(f"postgresql://hrx:{quoted}@db.internal:5432/hosp_a"))
    text = (tmp_path / "node.toml").read_text()
    assert "p%40ss" not in text and password not in text
    assert 'url = "postgresql://hrx@db.internal:5432/hosp_a"' in text
    assert 'password_file = "keys/database.password"' in text
    assert stat.S_IMODE((tmp_path / "node.toml").stat().st_mode) == 0o640
    secret = tmp_path / "keys" / "database.password"
    assert secret.read_text() == password + "\n"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    config = load_config(tmp_path, environ={})
    assert config.database_url == f"postgresql+psycopg://hrx:{quoted}@db.internal:5432/hosp_a"
    assert config.database_url_redacted == "postgresql+psycopg://hrx:***@db.internal:5432/hosp_a"
    # without a password nothing is added
    other = tmp_path / "other"
    other.mkdir()
    write_config(other, node_settings("postgresql://hrx@/hosp_a"))
    assert "password_file" not in (other / "node.toml").read_text()
    assert not (other / "keys" / "database.password").exists()


def test_write_config_mode_does_not_depend_on_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        write_config(tmp_path, node_settings("sqlite:///hrx.db"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "node.toml").stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["node.toml"]  # no temporary file left


@pytest.mark.parametrize(
    "section, secret",
    [
        ("database", 'url = "postgresql://hrx:s3cret@db/hosp_a"'),
        ("metrics", 'token = "0123456789abcdef0123"'),
        ("dicomweb", 'url = "http://hrx:s3cret@pacs:8042/dicom-web"'),
    ],
)
def test_a_node_toml_everyone_reads_may_not_hold_a_secret(
    tmp_path: Path, section: str, secret: str
) -> None:
    write_config(tmp_path, node_settings("sqlite:///hrx.db"))
    path = tmp_path / "node.toml"
    text = path.read_text()
    if section == "database":
        text = text.replace('url = "sqlite:///hrx.db"', secret)
    else:
        text += f"\n[{section}]\n{secret}\n"
    path.write_text(text)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by every user") as refused:
        load_config(tmp_path, environ={})
    assert "s3cret" not in str(refused.value) and "0123456789" not in str(refused.value)
    path.chmod(0o640)  # the node's user and its group only: taken
    load_config(tmp_path, environ={})


def write_secret(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def test_secrets_from_files_named_in_node_toml_or_the_environment(tmp_path: Path) -> None:
    write_config(tmp_path, node_settings("postgresql://hrx@db/hosp_a"))
    write_secret(tmp_path / "run" / "db", "from-env-file\n")
    token = write_secret(tmp_path / "keys" / "metrics.token", "t0ken-t0ken-t0ken-t0ken\n")
    environ = {
        "HRX_DATABASE_PASSWORD_FILE": str(tmp_path / "run" / "db"),
        "HRX_METRICS_TOKEN_FILE": str(token),
    }
    config = load_config(tmp_path, environ=environ)
    assert config.database_url == "postgresql+psycopg://hrx:from-env-file@db/hosp_a"
    assert config.metrics_token == "t0ken-t0ken-t0ken-t0ken"
    with pytest.raises(ConfigError, match=r"metrics\.token and metrics\.token_file"):
        load_config(tmp_path, environ={**environ, "HRX_METRICS_TOKEN": "x" * 20})
    write_secret(token, "short\n")
    with pytest.raises(ConfigError, match="at least 16"):
        load_config(tmp_path, environ=environ)


@pytest.mark.parametrize(
    "problem, match",
    [
        ("group-readable", "accessible to other users"),
        ("missing", "does not exist"),
        ("empty", "one line"),
        ("two lines", "one line"),
        ("password in the url too", "give the password one way"),
        ("sqlite", "SQLite database has no password"),
    ],
)
def test_a_password_file_is_checked(tmp_path: Path, problem: str, match: str) -> None:
    url = {
        "password in the url too": "postgresql://hrx:other@db/hosp_a",
        "sqlite": "sqlite:///hrx.db",
    }.get(problem, "postgresql://hrx@db/hosp_a")
    write_config(tmp_path, node_settings("postgresql://hrx@db/hosp_a"))
    path = tmp_path / "node.toml"
    path.write_text(
        path.read_text().replace(
            'url = "postgresql://hrx@db/hosp_a"',
            f'url = "{url}"\npassword_file = "keys/database.password"',
        )
    )
    text = {"empty": "\n", "two lines": "a\nb\n"}.get(problem, "s3cret\n")
    if problem != "missing":
        write_secret(
            tmp_path / "keys" / "database.password",
            text,
            0o640 if problem == "group-readable" else 0o600,
        )
    with pytest.raises(ConfigError, match=match) as refused:
        load_config(tmp_path, environ={})
    assert "s3cret" not in str(refused.value)


# -- the hospital's compose file ------------------------------------------------------------


def hospital_env(tmp_path: Path, **changes: str) -> Path:
    """env.example filled in as a hospital would (and as docs/operations.md says)."""
    values = {"DB_PASSWORD": "s3cret", "ORTHANC_PASSWORD": "0rthanc", **changes}
    lines = []
    for line in (HOSPITAL / "env.example").read_text().splitlines():
        name = line.split("=", 1)[0]
        lines.append(f"{name}={values.pop(name)}" if name in values and "=" in line else line)
    lines += [f"{name}={value}" for name, value in values.items()]
    path = tmp_path / f"env-{uuid.uuid4().hex[:6]}"
    path.write_text("\n".join(lines) + "\n")
    return path


def resolve_hospital(env_file: Path) -> subprocess.CompletedProcess[str]:
    profiles = [
        word for name in ("hl7", "pacs", "orthanc", "tools") for word in ("--profile", name)
    ]
    return subprocess.run(
        [
            docker_compose(),
            "-f",
            str(HOSPITAL / "docker-compose.yml"),
            "--env-file",
            str(env_file),
            *profiles,
            "config",
        ],
        capture_output=True,
        text=True,
        cwd=HOSPITAL,
        env={k: v for k, v in os.environ.items() if not k.startswith(("DB_", "NODE_"))},
    )


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The hospital's compose file as docker-compose resolves it, every profile on."""
    answer = resolve_hospital(hospital_env(tmp_path_factory.mktemp("env")))
    assert answer.returncode == 0, answer.stderr
    resolved: dict[str, Any] = yaml.safe_load(answer.stdout)
    return resolved


def test_the_hospital_file_is_refused_without_its_secrets(tmp_path: Path) -> None:
    answer = resolve_hospital(hospital_env(tmp_path, DB_PASSWORD=""))
    assert answer.returncode != 0 and "set DB_PASSWORD in .env" in answer.stderr


def test_every_hospital_service_runs_a_real_command(hospital: dict[str, Any]) -> None:
    services = hospital["services"]
    assert set(services) == {"db", "web", "replicate", "hl7", "pacs", "orthanc", "init", "hrx"}
    for name, service in services.items():
        if name in ("db", "orthanc"):
            assert "command" not in service and "image" in service
            continue
        assert service["build"]["context"] == str(ROOT), name
        command = [*service.get("entrypoint", []), *service["command"]]
        if name == "init":
            script = command[0]
            assert script == "/app/deploy/hospital/init-node.sh"
            assert (ROOT / script.removeprefix("/app/")).stat().st_mode & 0o111
            # what the script runs, with what an operator adds (docs/operations.md)
            words = re.search(
                r"^\s+hrx (node init .*)$", (HOSPITAL / "init-node.sh").read_text(), re.M
            )
            assert words is not None
            line = words.group(1).replace('"$DIR"', CONTAINER_NODE)
            line = line.replace('"$INIT_DATABASE_URL"', "postgresql://hrx@db/hrx")
            line = line.replace('"$@"', "--id hosp-a --name 示范区人民医院 --url https://h.example")
            hrx_command(shlex.split(line))
        elif command == ["hrx", "--help"]:  # `docker compose run --rm hrx ARGS` replaces --help
            assert 'hrx = "node.cli:main"' in (ROOT / "pyproject.toml").read_text()
            hrx_command(
                ["user", "add", "--dir", CONTAINER_NODE, "--username", "w", "--role", "doctor"]
            )
        elif command[0] == "hrx":
            hrx_command(command[1:])
        else:
            assert command[:3] == ["gunicorn", "-c", "python:node.ops.gunicorn_conf"], name
            assert command[-1] == "node.web.wsgi:app"
        assert service["environment"]["HRX_NODE_DIR"] == CONTAINER_NODE, name
        if "--dir" in command:
            assert command[command.index("--dir") + 1] == CONTAINER_NODE, name
        assert mounts(service) == {CONTAINER_NODE: "/srv/hrx/hosp-a"}, name
        assert service["depends_on"]["db"]["condition"] == "service_healthy", name
    assert set(services["db"]["volumes"]) == {"postgres-data:/var/lib/postgresql/data:rw"}
    # the init service connects to the db service as the user and database it creates
    db = services["db"]["environment"]
    url = services["init"]["environment"]["INIT_DATABASE_URL"]
    assert url == f"postgresql://{db['POSTGRES_USER']}:s3cret@db:5432/{db['POSTGRES_DB']}"
    assert db["POSTGRES_PASSWORD"] == "s3cret"


def test_the_hospital_file_publishes_on_this_host_only(
    hospital: dict[str, Any], tmp_path: Path
) -> None:
    every = {
        (name, p.target): p
        for name, service in hospital["services"].items()
        for p in published_ports(service)
    }
    assert set(every) == {("web", 8080), ("hl7", 2575), ("orthanc", 8042), ("orthanc", 4242)}
    assert {p.host_ip for p in every.values()} == {"127.0.0.1"}
    web = hospital["services"]["web"]
    assert web["command"][web["command"].index("-b") + 1] == "0.0.0.0:8080"  # in its container
    # an address for the LIS only where .env names one
    answer = resolve_hospital(hospital_env(tmp_path, HL7_LISTEN="10.1.2.3"))
    assert answer.returncode == 0, answer.stderr
    resolved = yaml.safe_load(answer.stdout)["services"]
    assert [p.host_ip for p in published_ports(resolved["hl7"])] == ["10.1.2.3"]
    assert [p.host_ip for p in published_ports(resolved["web"])] == ["127.0.0.1"]


def test_the_hospital_files_hold_no_secret() -> None:
    """The compose file (read by every user) names secrets only as ${...} from .env, and
    env.example leaves them empty; the file says .env is mode 0600."""
    raw = yaml.safe_load((HOSPITAL / "docker-compose.yml").read_text())
    for name, service in raw["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if any(word in key for word in SECRET_WORDS):
                assert str(value).startswith("${") or "_FILE" in key, (name, key, value)
            if "://" in str(value) and "@" in str(value):
                assert re.search(r"://\w+:\$\{\w+", str(value)), (name, key, value)
    example = (HOSPITAL / "env.example").read_text()
    for line in example.splitlines():
        if any(word in line.split("=")[0] for word in SECRET_WORDS) and "=" in line:
            assert line.endswith("="), line
    assert "chmod 600 .env" in (HOSPITAL / "docker-compose.yml").read_text()
    assert "chmod 600 .env" in example
    # the image's user, which must own NODE_DIR on the host
    assert "--uid 10001" in (ROOT / "Dockerfile").read_text()
    assert "-o 10001 -g 10001" in example


# -- the hospital's node, made by its init script and served behind nginx ------------------


@dataclass
class HospitalNode:
    directory: Path
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    init: Any  # the first and second runs of init-node.sh


def run_init(directory: Path, database_url: str, env: dict[str, str], *args: str) -> Any:
    return subprocess.run(
        [str(HOSPITAL / "init-node.sh"), *args],
        capture_output=True,
        text=True,
        env={**env, "HRX_NODE_DIR": str(directory), "INIT_DATABASE_URL": database_url},
    )


@pytest.fixture(scope="module")
def hospital_node(
    hospital: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HospitalNode]:
    """init-node.sh run for real (twice) on a fresh PostgreSQL database, and the web service's
    command and environment served with only the bind address and the paths made local."""
    root = tmp_path_factory.mktemp("hospital")
    env = hrx_tools(root / "bin")
    directory = root / "node"
    name = f"hrx_hospital_{uuid.uuid4().hex[:8]}"
    admin = postgres_admin()
    admin.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN.rsplit("/", 1)[0]
    url = base.replace("://postgres@", "://postgres:s3cret@") + f"/{name}"
    try:
        args = ("--id", "hosp-a", "--name", "示范区人民医院", "--url", "https://hrx.hosp-a.example")
        first = run_init(directory, url, env, *args)
        assert first.returncode == 0, first.stdout + first.stderr
        second = run_init(directory, url, env, *args)
        service = hospital["services"]["web"]
        port = free_port()
        command = list(service["command"])
        command[command.index("-b") + 1] = f"127.0.0.1:{port}"
        command[command.index("-w") + 1] = "2"
        environment = {
            **env,
            **{
                k: v.replace(CONTAINER_NODE, str(directory))
                for k, v in service["environment"].items()
            },
        }
        log = root / "web.log"
        with log.open("ab") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", *command[1:]],
                cwd=ROOT,
                env=environment,
                stdout=output,
                stderr=output,
            )
        try:
            wait_healthy(f"http://127.0.0.1:{port}", process)
            yield HospitalNode(directory, port, process, log, (first, second))
        finally:
            process.terminate()
            process.wait(timeout=60)
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.mark.postgres
def test_init_makes_a_node_without_a_secret_in_node_toml(
    hospital_node: HospitalNode, tmp_path: Path
) -> None:
    directory = hospital_node.directory
    first, second = hospital_node.init
    assert "send" in first.stdout and "enrollment.json" in first.stdout
    assert second.returncode == 0 and "holds a node already" in second.stdout
    text = (directory / "node.toml").read_text()
    assert "s3cret" not in text
    assert stat.S_IMODE((directory / "node.toml").stat().st_mode) == 0o640
    for name in ("database.password", "metrics.token", "node.pem", "node.bls", "token.pem"):
        assert stat.S_IMODE((directory / "keys" / name).stat().st_mode) == 0o600, name
    assert (directory / "keys" / "database.password").read_text() == "s3cret\n"
    assert ":s3cret@" in load_config(directory).database_url
    # an interrupted init (node.toml, no enrollment.json) is named, not papered over
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "node.toml").write_text("")
    answer = run_init(broken, "postgresql://x@y/z", hrx_tools(tmp_path / "bin"), "--id", "x")
    assert answer.returncode == 1 and "interrupted" in answer.stderr


def self_signed(directory: Path, host: str) -> tuple[Path, Path]:
    """A certificate for ``host`` and 127.0.0.2 (and its key), signed by itself."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(host), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert = directory / "fullchain.pem"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    private = directory / "privkey.pem"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    private.chmod(0o600)
    return cert, private


def nginx() -> str:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if found is None:
        message = "nginx is missing (Debian: apt-get install nginx)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must run the proxy's tests")
        pytest.skip(message)
    return found


@dataclass
class Proxy:
    base: str
    ca: Path
    monitor: str  # the only address the site lets ask for /metrics


@pytest.fixture(scope="module")
def proxy(hospital_node: HospitalNode, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """deploy/nginx/hrx-node.conf in a real nginx, with only what its CHANGE lines say to
    change changed (and its ports made free loopback ones), in front of the hospital's node."""
    binary = nginx()
    root = tmp_path_factory.mktemp("nginx")
    cert, key = self_signed(root, "hrx.hosp-a.example")
    https, http = free_port(), free_port()
    site = NGINX_SITE.read_text()
    changes = {
        "server 127.0.0.1:8080;": f"server 127.0.0.1:{hospital_node.port};",
        "/etc/ssl/hrx/fullchain.pem": str(cert),
        "/etc/ssl/hrx/privkey.pem": str(key),
        "/var/cache/nginx/hrx-decisions": str(root / "decisions"),
        "allow 192.0.2.10;": "allow 127.0.0.2;",
        "listen 443 ssl;": f"listen 127.0.0.1:{https} ssl;",
        "listen [::]:443 ssl;": "",
        "listen 80;": f"listen 127.0.0.1:{http};",
        "listen [::]:80;": "",
    }
    for old, new in changes.items():
        assert old in site, old
        site = site.replace(old, new)
    (root / "site.conf").write_text(site)
    for temporary in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (root / temporary).mkdir()
    (root / "nginx.conf").write_text(
        f"""user root;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log {root}/access.log;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    include {root}/site.conf;
}}
"""
    )
    check = subprocess.run(
        [binary, "-t", "-p", str(root), "-c", str(root / "nginx.conf")],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stderr
    process = subprocess.Popen(
        [binary, "-p", str(root), "-c", str(root / "nginx.conf"), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        base = f"https://127.0.0.1:{https}"
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(f"{base}/healthz", verify=str(cert), timeout=2)
                break
            except requests.ConnectionError:
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.1)
        redirect = requests.get(f"http://127.0.0.1:{http}/fhir/metadata", allow_redirects=False)
        assert redirect.status_code == 301
        assert redirect.headers["Location"].startswith("https://")
        yield Proxy(base, cert, "127.0.0.2")
    finally:
        process.terminate()
        process.wait(timeout=30)


def from_address(address: str) -> requests.Session:
    """A session whose connections come from ``address`` (another loopback address)."""
    from requests.adapters import HTTPAdapter

    class Bound(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            kwargs["source_address"] = (address, 0)
            super().init_poolmanager(*args, **kwargs)

    session = requests.Session()
    session.mount("https://", Bound())
    return session


def access_line(log: Path, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        for line in log.read_text(errors="replace").splitlines():
            if request_id in line and line.startswith("{"):
                record: dict[str, Any] = json.loads(line)
                if record.get("logger") == "hrx.access" and record.get("request_id") == request_id:
                    return record
        assert time.monotonic() < deadline, f"no access line for {request_id}"
        time.sleep(0.1)


@pytest.mark.postgres
def test_the_proxy_passes_the_client_address_and_https(
    hospital_node: HospitalNode, proxy: Proxy
) -> None:
    client = from_address("127.0.0.2")
    request_id = f"proxy-{uuid.uuid4().hex[:8]}"
    answer = client.get(
        f"{proxy.base}/portal/signin",
        verify=str(proxy.ca),
        headers={"X-Request-ID": request_id, "X-Forwarded-For": "10.9.9.9"},
    )
    assert answer.status_code == 200
    # the address nginx saw, not nginx's own nor the one the client claimed
    assert access_line(hospital_node.log, request_id)["remote_addr"] == "127.0.0.2"
    # the node knows the request came over TLS: its cookies are Secure
    cookie = answer.headers["Set-Cookie"]
    assert "hrx_portal_csrf=" in cookie and "Secure" in cookie
    # a body beyond nginx's default 1 MB, up to the node's limit, reaches the node and is read
    # (the node's own answer to what is in it, not nginx's 413 page)
    directory = str(hospital_node.directory)
    hrx("user", "add", "--dir", directory, "--username", "proxy-check", "--role", "doctor")
    token = hrx("token", "issue", "--dir", directory, "--username", "proxy-check").strip()
    big = client.post(
        f"{proxy.base}/fhir/Patient",
        data=b'{"resourceType": "Observation"' + b" " * (4 * 1024 * 1024) + b"}",
        headers={"Content-Type": "application/fhir+json", "Authorization": f"Bearer {token}"},
        verify=str(proxy.ca),
    )
    assert big.status_code == 400, big.text[:300]
    outcome = big.json()
    assert outcome["resourceType"] == "OperationOutcome" and "Observation" in big.text


@pytest.mark.postgres
def test_prometheus_scrapes_through_the_proxy_with_the_token(
    hospital_node: HospitalNode, proxy: Proxy
) -> None:
    token = (hospital_node.directory / "keys" / "metrics.token").read_text().strip()
    monitor = from_address(proxy.monitor)
    url = f"{proxy.base}/metrics"
    refused = monitor.get(url, verify=str(proxy.ca))
    assert refused.status_code == 401  # the node's answer: the token is missing
    scraped = monitor.get(url, verify=str(proxy.ca), headers={"Authorization": f"Bearer {token}"})
    assert scraped.status_code == 200 and 'hrx_node_info{node="hosp-a"} 1.0' in scraped.text
    elsewhere = from_address("127.0.0.3").get(
        url, verify=str(proxy.ca), headers={"Authorization": f"Bearer {token}"}
    )
    assert elsewhere.status_code == 403 and "nginx" in elsewhere.text  # refused by nginx


@pytest.mark.postgres
def test_a_reload_takes_a_new_token_without_a_restart(
    hospital_node: HospitalNode, proxy: Proxy
) -> None:
    """SIGHUP (systemctl reload, docker compose kill -s SIGHUP web): new workers read the token
    file again; the master and its listening socket stay."""
    path = hospital_node.directory / "keys" / "metrics.token"
    old = path.read_text().strip()
    new = "reloaded-" + uuid.uuid4().hex
    temporary = path.with_name("metrics.token.part")
    write_secret(temporary, new + "\n").rename(path)
    monitor = from_address(proxy.monitor)

    def scrape(token: str) -> int:
        headers = {"Authorization": f"Bearer {token}"}
        return monitor.get(
            f"{proxy.base}/metrics", verify=str(proxy.ca), headers=headers
        ).status_code

    assert scrape(old) == 200  # read when the workers started
    hospital_node.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 60
    while scrape(new) != 200:
        assert hospital_node.process.poll() is None
        assert time.monotonic() < deadline, "the reload did not take the new token"
        time.sleep(0.2)
    deadline = time.monotonic() + 60
    while scrape(old) != 401:  # the old workers finish and go
        assert time.monotonic() < deadline, "old workers still answer"
        time.sleep(0.2)
    assert hospital_node.process.poll() is None


# -- systemd --------------------------------------------------------------------------------


def unit_settings(path: Path, instance: str) -> dict[str, list[str]]:
    """A unit file's [Service] settings, %i given (a key may repeat)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        key, _, value = line.partition("=")
        if section == "[Service]":
            settings.setdefault(key, []).append(value.replace("%i", instance))
    return settings


def test_the_units_run_real_commands() -> None:
    units = sorted(UNITS.glob("*.service"))
    assert [u.name for u in units] == [
        "hrx-hl7@.service",
        "hrx-pacs@.service",
        "hrx-replicate@.service",
        "hrx-web@.service",
    ]
    for unit in units:
        settings = unit_settings(unit, "hosp-a")
        assert settings["User"] == ["hrx"] and settings["Group"] == ["hrx"], unit.name
        assert settings["WorkingDirectory"] == ["/srv/hrx/hosp-a"], unit.name
        assert settings["ReadWritePaths"] == ["/srv/hrx/hosp-a"], unit.name
        (start,) = settings["ExecStart"]
        words = shlex.split(
            start.replace("${HL7_HOST}", "127.0.0.1").replace("${HL7_PORT}", "2575")
        )
        if words[0] == "/opt/hrx/bin/hrx":
            hrx_command(words[1:])
            assert words[words.index("--dir") + 1] == "/srv/hrx/hosp-a"
            assert "ExecReload" not in settings, unit.name  # no reload: restart
        else:
            assert words[:3] == ["/opt/hrx/bin/gunicorn", "-c", "python:node.ops.gunicorn_conf"]
            assert words[-1] == "node.web.wsgi:app" and "-b" not in words  # node.toml's address
            assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
            assert settings["KillMode"] == ["mixed"]
            grace = int(words[words.index("--graceful-timeout") + 1])
            assert int(settings["TimeoutStopSec"][0]) > grace
            environment = dict(e.split("=", 1) for e in settings["Environment"])
            assert environment["HRX_NODE_DIR"] == "/srv/hrx/hosp-a"
            assert environment["HRX_SERVER_TRUSTED_PROXIES"] == "1"  # deploy/nginx
            assert environment["HRX_METRICS_TOKEN_FILE"] == "/srv/hrx/hosp-a/keys/metrics.token"


def in_namespace(script: str, workdir: Path, **kwargs: Any) -> subprocess.Popen[str]:
    """``script`` run by sh as root in a private mount namespace whose /etc and /opt are
    overlays (changes go to ``workdir``) and whose /srv is ``workdir``/srv: a user it creates,
    a unit it installs, exist only there. If this Python or this checkout lives under /root
    (mode 0700), /root is made passable there so that another user can run them."""
    for name in ("etc.up", "etc.work", "opt.up", "opt.work", "srv"):
        (workdir / name).mkdir()
    # a merged directory has its upper directory's mode: /etc and /opt keep theirs whatever
    # this process's umask was when these were made
    for name in ("etc", "opt"):
        (workdir / f"{name}.up").chmod(stat.S_IMODE(os.stat(f"/{name}").st_mode))
    (workdir / "srv").chmod(0o755)
    prelude = f"""set -eu
mount --make-rprivate /
mount -t overlay overlay -o lowerdir=/etc,upperdir={workdir}/etc.up,workdir={workdir}/etc.work /etc
mount -t overlay overlay -o lowerdir=/opt,upperdir={workdir}/opt.up,workdir={workdir}/opt.work /opt
mount --bind {workdir}/srv /srv
"""
    # what another user must reach under /root (0700): kept aside, then put back on a /root
    # that others may pass through
    hidden = sorted({str(p) for p in (Path(sys.prefix), ROOT) if p.is_relative_to("/root")})
    if hidden:
        for number, path in enumerate(hidden):
            (workdir / f"kept{number}").mkdir()
            prelude += f"mount --bind {shlex.quote(path)} {workdir}/kept{number}\n"
        prelude += "mount -t tmpfs -o mode=0755 tmpfs /root\n"
        for number, path in enumerate(hidden):
            prelude += f"(umask 022 && mkdir -p {shlex.quote(path)})\n"
            prelude += f"mount --bind {workdir}/kept{number} {shlex.quote(path)}\n"
    return subprocess.Popen(
        ["unshare", "--mount", "sh", "-c", prelude + script],
        text=True,
        start_new_session=True,
        **kwargs,
    )


def namespaces_work() -> None:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare (util-linux) for a private mount namespace")


def installed_hrx() -> str:
    """/opt/hrx/bin as a venv would have it, running this checkout."""
    lines = []
    for name, module in (("hrx", "node.cli"), ("gunicorn", "gunicorn"), ("python3", "")):
        run = f"-m {module} " if module else ""
        lines.append(
            f"printf '#!/bin/sh\\nPYTHONPATH={ROOT} exec {sys.executable} {run}\"$@\"\\n' "
            f"> /opt/hrx/bin/{name}"
        )
    # an administrator's root shell (umask 022), whatever this process's umask is
    return "umask 022\nmkdir -p /opt/hrx/bin\n" + "\n".join(lines) + "\nchmod 755 /opt/hrx/bin/*\n"


def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    namespaces_work()
    verify = shutil.which("systemd-analyze")
    if verify is None:
        pytest.skip("systemd-analyze is missing (Debian: the systemd package)")
    units = tmp_path / "units"
    units.mkdir()
    for unit in UNITS.glob("*.service"):
        shutil.copy(unit, units / unit.name)
    web = (UNITS / "hrx-web@.service").read_text()
    (units / "misspelt@.service").write_text(web.replace("KillMode=", "KilMode="))
    instances = [u.name.replace("@", "@hosp-a") for u in UNITS.glob("*.service")]
    process = in_namespace(
        installed_hrx()
        + f"cd {units}\n{verify} verify {' '.join(instances)}\n"
        + f"echo ---\n{verify} verify misspelt@hosp-a.service\n",
        tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    ours, misspelt = output.split("---\n")
    assert ours == "", ours  # not a warning
    assert "Unknown key 'KilMode'" in misspelt  # the check can fail


@pytest.mark.postgres
def test_install_node_sets_up_a_node_its_user_runs(tmp_path: Path, postgres_url: str) -> None:
    """install-node.sh as root, twice, then the web unit's ExecStart as the unit's User with
    the unit's Environment: the node serves. Not run: systemd itself (no PID 1 here), so
    Type=notify, the hardening settings and `systemctl reload` are checked by reading only."""
    namespaces_work()
    had_user = subprocess.run(["id", "hrx"], capture_output=True).returncode == 0
    port = free_port()
    settings = unit_settings(UNITS / "hrx-web@.service", "hosp-a")
    environment = " ".join(shlex.quote(e) for e in settings["Environment"])
    report = tmp_path / "report.json"
    survey = """
import grp, json, os, pwd, stat, sys
paths = ["/srv/hrx", "/srv/hrx/hosp-a", "/srv/hrx/hosp-a/node.toml", "/srv/hrx/hosp-a/keys"]
paths += sorted("/srv/hrx/hosp-a/keys/" + n for n in os.listdir("/srv/hrx/hosp-a/keys"))
found = {}
for path in paths:
    s = os.stat(path)
    owner, group = pwd.getpwuid(s.st_uid).pw_name, grp.getgrgid(s.st_gid).gr_name
    found[path] = [owner, group, oct(stat.S_IMODE(s.st_mode))]
user = pwd.getpwnam("hrx")
found["user"] = [user.pw_dir, user.pw_shell, user.pw_uid < 1000]
found["units"] = sorted(n for n in os.listdir("/etc/systemd/system") if n.startswith("hrx-"))
json.dump(found, open(sys.argv[1], "w"))
"""
    script = (
        installed_hrx()
        + f"{UNITS}/install-node.sh hosp-a 示范区人民医院 https://hrx.hosp-a.example "
        + f"{shlex.quote(postgres_url)} {port}\n"
        + f"{UNITS}/install-node.sh hosp-a 示范区人民医院 https://hrx.hosp-a.example "
        + f"{shlex.quote(postgres_url)} {port}\n"
        + f"{sys.executable} -c {shlex.quote(survey)} {report}\n"
        + f"cd {settings['WorkingDirectory'][0]}\n"
        + f"exec runuser -u {settings['User'][0]} -- env -i PATH=/usr/bin:/bin {environment} "
        + f"{settings['ExecStart'][0]}\n"
    )
    log = tmp_path / "namespace.log"
    with log.open("w") as output:
        process = in_namespace(script, tmp_path, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not report.exists():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        wait_healthy(f"http://127.0.0.1:{port}", process, seconds=60)  # type: ignore[arg-type]
        found = json.loads(report.read_text())
        config_text = (tmp_path / "srv" / "hrx" / "hosp-a" / "node.toml").read_text()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    text = log.read_text()
    assert text.count("set up in /srv/hrx/hosp-a") == 2 and "holds a node already" in text
    assert found.pop("user") == ["/srv/hrx", "/usr/sbin/nologin", True]
    assert found.pop("units") == [u.name for u in sorted(UNITS.glob("*.service"))]
    keys = {path: owner for path, owner in found.items() if "/keys/" in path}
    assert set(keys) == {
        f"/srv/hrx/hosp-a/keys/{name}"
        for name in ("metrics.token", "node.bls", "node.pem", "token.pem")
    }
    assert set(map(tuple, keys.values())) == {("hrx", "hrx", "0o600")}
    assert found["/srv/hrx"] == ["root", "hrx", "0o750"]
    assert found["/srv/hrx/hosp-a"] == ["hrx", "hrx", "0o750"]
    assert found["/srv/hrx/hosp-a/keys"] == ["hrx", "hrx", "0o700"]
    assert found["/srv/hrx/hosp-a/node.toml"] == ["hrx", "hrx", "0o640"]
    assert 'url = "https://hrx.hosp-a.example"' in config_text
    # nothing of it outside the namespace
    assert not Path("/srv/hrx/hosp-a/node.toml").exists()
    assert (subprocess.run(["id", "hrx"], capture_output=True).returncode == 0) == had_user


# -- the authority --------------------------------------------------------------------------


def authority(directory: Path, env: dict[str, str], *args: str) -> Any:
    answer = subprocess.run(
        [str(DEPLOY / "authority" / "authority.sh"), str(directory), *args],
        capture_output=True,
        text=True,
        env=env,
    )
    assert answer.returncode == 0, answer.stdout + answer.stderr
    return answer


def test_the_authority_tooling_makes_what_a_hospital_joins_with(tmp_path: Path) -> None:
    env = hrx_tools(tmp_path / "bin")
    offline = tmp_path / "authority"
    hospitals = tmp_path / "hospitals"
    for node_id in ("hosp-a", "hosp-b"):
        init_node(hospitals / node_id, node_id, None, free_port())
    authority(offline, env, "secret")
    secret = (offline / "consortium.key").read_bytes()
    again = authority(offline, env, "secret")
    assert "never replaced" in again.stdout and (offline / "consortium.key").read_bytes() == secret
    enrollment = str(hospitals / "hosp-a" / "enrollment.json")
    first = authority(
        offline, env, "roster", "--quorum", "1", "--consortium", "示范区医共体", enrollment
    )
    assert "roster-v1.json" in first.stdout
    authority(
        offline,
        env,
        "roster",
        "--quorum",
        "2",
        enrollment,
        str(hospitals / "hosp-b" / "enrollment.json"),
    )
    assert sorted(p.name for p in offline.iterdir()) == [
        "authority.pem",
        "authority.pub.pem",
        "consortium.key",
        "rosters",
    ]
    assert sorted(p.name for p in (offline / "rosters").iterdir()) == [
        "roster-v1.json",
        "roster-v2.json",
    ]
    for private in ("authority.pem", "consortium.key"):
        assert stat.S_IMODE((offline / private).stat().st_mode) == 0o600
    for public in ("authority.pub.pem", "rosters/roster-v2.json"):
        assert stat.S_IMODE((offline / public).stat().st_mode) == 0o644
    assert "PRIVATE" not in (offline / "authority.pub.pem").read_text()
    # the fingerprint the authority reads out is the hospital's command's
    fingerprint = subprocess.run(
        f"openssl pkey -pubin -in {offline / 'authority.pub.pem'} -outform DER "
        "| openssl dgst -sha256 -r",
        shell=True,
        capture_output=True,
        text=True,
    ).stdout[:64]
    assert re.fullmatch(r"[0-9a-f]{64}", fingerprint) and fingerprint in first.stdout
    # what is carried to hosp-a: the rosters, the public key and (by hand) the secret
    node = hospitals / "hosp-a"
    write_secret(node / "keys" / "consortium.key", secret.decode())
    joined = subprocess.run(
        [
            sys.executable,
            "-m",
            "node.cli",
            "node",
            "join",
            "--dir",
            str(node),
            "--roster",
            str(offline / "rosters" / "roster-v1.json"),
            "--secret",
            str(node / "keys" / "consortium.key"),
            "--authority",
            str(offline / "authority.pub.pem"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert joined.returncode == 0, joined.stdout + joined.stderr
    newer = subprocess.run(
        [
            sys.executable,
            "-m",
            "node.cli",
            "node",
            "join",
            "--dir",
            str(node),
            "--roster",
            str(offline / "rosters" / "roster-v2.json"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert newer.returncode == 0 and "roster version 2" in newer.stdout, newer.stderr


def test_nothing_here_names_this_machine() -> None:
    for path in [*DEPLOY.rglob("*"), ROOT / "Dockerfile"]:
        if path.is_file():
            text = path.read_text(errors="replace")
            assert "/work/" not in text and "/root/" not in text, path
    assert socket.gethostname() not in (HOSPITAL / "docker-compose.yml").read_text()
