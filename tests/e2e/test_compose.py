"""The trial's deploy/trial/docker-compose.yml, checked without a Docker engine: the file is
valid compose (by docker-compose itself), every command a service runs is a command of the hrx
CLI (or gunicorn serving the node's app) with options it accepts, nothing is published beyond
this host, and the bootstrap service's script, run for real against this machine's
PostgreSQL, makes nodes whose configuration agrees with what compose gives each service —
environment, ports, volumes, database names — and that serve with exactly that environment.
The script is killed or made to fail at each of its steps in turn, and each run after takes
up where the last stopped, until one succeeds."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pytest
import requests
import yaml

from ledger import keys
from ledger.store import ChainStore
from node.base.config import load_config
from node.consortium.membership import AUTHORITY_SETTING
from node.db.engines import open_database
from tests.helpers import ROOT
from tests.helpers.compose import docker_compose, hrx_command, mounts, published_ports
from tests.helpers.databases import POSTGRES_ADMIN, postgres_admin
from tests.helpers.nodes import free_port, wait_healthy

TRIAL = ROOT / "deploy" / "trial"
COMPOSE = TRIAL / "docker-compose.yml"
BOOTSTRAP = TRIAL / "bootstrap.sh"
NODES = ("hosp-a", "hosp-b", "hosp-c")

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The file as docker-compose resolves it (anchors merged, ${...} filled)."""
    answer = subprocess.run(
        [docker_compose(), "-f", str(COMPOSE), "config"],
        capture_output=True,
        text=True,
        env={**os.environ, "HRX_DB_PASSWORD": "s3cret"},
        cwd=ROOT,
    )
    assert answer.returncode == 0, answer.stderr
    resolved: dict[str, Any] = yaml.safe_load(answer.stdout)
    return resolved


def test_docker_compose_refuses_what_is_not_compose(tmp_path: Path) -> None:
    """The validity check can fail: a misspelt key is refused by the same tool."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("restart: unless-stopped", "restarts: no", 1))
    answer = subprocess.run(
        [docker_compose(), "-f", str(broken), "config", "-q"], capture_output=True, text=True
    )
    assert answer.returncode != 0 and "restarts" in answer.stderr


def test_every_service_runs_a_real_command(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {*NODES, "db", "orthanc", "bootstrap"} <= set(services)
    for name, service in services.items():
        command = service.get("command")
        if name in ("db", "orthanc"):
            assert command is None and "image" in service
            continue
        assert service["build"]["context"] == str(ROOT)
        if command[0] == "hrx":
            hrx_command(command[1:])
        elif command[0] == "gunicorn":
            assert command[-1] == "node.web.wsgi:app", name
            assert command[1:3] == ["-c", "python:node.ops.gunicorn_conf"], name  # metrics, logs
            assert "HRX_NODE_DIR" in service["environment"], name
        else:  # the image holds the repository's deploy/ under /app (Dockerfile)
            assert command == ["/app/deploy/trial/bootstrap.sh"], name
            assert BOOTSTRAP.stat().st_mode & 0o111
            assert "COPY deploy deploy" in (ROOT / "Dockerfile").read_text()
    with pytest.raises(click.UsageError):
        hrx_command(["node", "replicate", "--dri", "/srv/hrx/hosp-a"])  # the check can fail


def node_dir_of(service: dict[str, Any]) -> str:
    command = service["command"]
    if "--dir" in command:
        return str(command[command.index("--dir") + 1])
    return str(service["environment"]["HRX_NODE_DIR"])


def test_services_mount_the_volume_of_the_node_they_run(compose: dict[str, Any]) -> None:
    services = compose["services"]
    bootstrap_mounts = mounts(services["bootstrap"])
    for name, service in services.items():
        if name in ("db", "orthanc", "bootstrap"):
            continue
        node = name.split("-")[0] + "-" + name.split("-")[1]
        directory = node_dir_of(service)
        assert directory == f"/srv/hrx/{node}", name
        assert mounts(service).get(directory) == node == bootstrap_mounts[directory], name
        assert node in compose["volumes"]
        assert service["depends_on"]["bootstrap"]["condition"] == "service_completed_successfully"
        # the database and its password come from the node's directory, not the environment
        assert "HRX_DATABASE_URL" not in service.get("environment", {}), name
    password = compose["services"]["bootstrap"]["environment"]["HRX_DB_PASSWORD"]
    assert password == compose["services"]["db"]["environment"]["POSTGRES_PASSWORD"] == "s3cret"


def test_published_ports_are_the_ports_served_on_this_host_only(compose: dict[str, Any]) -> None:
    services = compose["services"]
    published = set()
    for node in NODES:
        service = services[node]
        command = service["command"]
        bind = command[command.index("-b") + 1]
        port = int(bind.rsplit(":", 1)[1])
        (mapping,) = published_ports(service)
        assert mapping.target == port
        published.add(mapping.port)
    assert len(published) == len(NODES)
    hl7 = services["hosp-a-hl7"]
    port = int(hl7["command"][hl7["command"].index("--port") + 1])
    assert [p.target for p in published_ports(hl7)] == [port]
    pacs = services["hosp-a-pacs"]["environment"]["HRX_DICOMWEB_URL"]
    assert pacs.startswith("http://orthanc:8042/")
    assert 8042 in {p.target for p in published_ports(services["orthanc"])}
    every = [p for service in services.values() for p in published_ports(service)]
    assert len(every) == len(NODES) + 2
    assert {p.host_ip for p in every} == {"127.0.0.1"}


def test_postgres_creates_every_database_the_nodes_use(compose: dict[str, Any]) -> None:
    init = (TRIAL / "postgres-init.sql").read_text()
    created = set(re.findall(r"CREATE DATABASE (\w+);", init))
    used = set(re.findall(r"\|(\w+)\"", BOOTSTRAP.read_text()))  # bootstrap's id|name|database
    assert used == created == {"hosp_a", "hosp_b", "hosp_c"}
    init_script = mounts(compose["services"]["db"])["/docker-entrypoint-initdb.d/10-hrx.sql"]
    assert Path(init_script) == TRIAL / "postgres-init.sql"


# `hrx` for bootstrap.sh: this checkout's CLI, made to fail at one chosen invocation. A fault
# names the words its invocation starts with and what happens: "before" (it fails without
# doing anything), "after" (it does everything, then the script is killed), "empty" (killed
# as its output file was opened: that file is left empty), "no-enrollment" (hrx node init
# killed before writing enrollment.json). Each fault that fires is noted in a file.
FAULTY_HRX = """#!{python}
import os, pathlib, runpy, sys

args = sys.argv[1:]
words, _, kind = os.environ.get("HRX_TEST_FAULT", "|").partition("|")
fires = bool(words) and " ".join(args).startswith(words)
if fires:
    with open(os.environ["HRX_TEST_FIRED"], "a") as fired:
        fired.write(words + "|" + kind + "\\n")
if fires and kind == "before":
    sys.exit("hrx: failed (fault injected before the step)")
sys.argv = ["hrx", *args]
try:
    runpy.run_module("node.cli", run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as exit:
    code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
if not fires or code != 0:
    sys.exit(code)
if kind == "empty":
    pathlib.Path(args[args.index("--out") + 1]).write_bytes(b"")
elif kind == "no-enrollment":
    (pathlib.Path(args[args.index("--dir") + 1]) / "enrollment.json").unlink()
os.kill(os.getppid(), 9)  # the script dies with the step done (or cut short)
sys.exit(137)
"""


@dataclass
class Bootstrap:
    root: Path
    suffix: str
    runs: list[tuple[str, int, str]]  # (fault, exit status, output) of each run, in order
    fired: list[str]


def trial_faults(root: Path) -> list[str]:
    """One fault at each step, in the order the steps run; each run after a fault does what
    the last did not, so the next fault is met further on."""
    return [
        f"node init --dir {root}/hosp-a|before",
        f"node init --dir {root}/hosp-a|no-enrollment",
        f"node init --dir {root}/hosp-b|after",
        f"node init --dir {root}/hosp-c|no-enrollment",
        "consortium secret|empty",
        "consortium secret|after",
        "consortium roster|empty",
        "consortium roster|after",
        f"node join --dir {root}/hosp-a|after",
        f"node join --dir {root}/hosp-b|before",
        f"node join --dir {root}/hosp-c|after",
    ]


@pytest.fixture(scope="module")
def bootstrapped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bootstrap]:
    """deploy/trial/bootstrap.sh run for real, broken at each step in turn and run again each
    time, then twice more without a fault: /srv/hrx is a temporary directory and the
    databases are this machine's PostgreSQL (dropped afterwards)."""
    root = tmp_path_factory.mktemp("srv-hrx")
    tools = tmp_path_factory.mktemp("bin")
    (tools / "hrx").write_text(FAULTY_HRX.format(python=sys.executable))
    (tools / "hrx").chmod(0o755)
    fired = tools / "fired"
    suffix = f"_t{uuid.uuid4().hex[:8]}"
    admin = postgres_admin()
    databases = [f"{node.replace('-', '_')}{suffix}" for node in NODES]
    for database in databases:
        admin.execute(f'CREATE DATABASE "{database}"')
    user, host = POSTGRES_ADMIN.split("://", 1)[1].split("/", 1)[0].split("@")
    environment = {
        **os.environ,
        "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "HRX_ROOT": str(root),
        "HRX_DB_HOST": host.split(":")[0],
        "HRX_DB_USER": user.split(":")[0],
        "HRX_DB_PASSWORD": "s3cret",  # the server trusts local connections: any will do
        "HRX_DB_SUFFIX": suffix,
        "HRX_TEST_FIRED": str(fired),
    }
    runs = []
    try:
        for fault in [*trial_faults(root), "", ""]:
            answer = subprocess.run(
                [str(BOOTSTRAP)],
                capture_output=True,
                text=True,
                env={**environment, "HRX_TEST_FAULT": fault},
            )
            runs.append((fault, answer.returncode, answer.stdout + answer.stderr))
            signed = root / "consortium" / "signing" / "authority.pem"
            if fault == "consortium roster|after" and signed.exists():
                signed.rename(root / "consortium" / "authority.pem")  # killed between renames
        yield Bootstrap(root, suffix, runs, fired.read_text().splitlines())
    finally:
        for database in databases:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        admin.close()


def test_bootstrap_takes_up_where_it_stopped_after_a_failure_at_any_step(
    bootstrapped: Bootstrap,
) -> None:
    """Every injected fault was met, each failed run was followed by one that went further,
    and the runs after the last fault succeed (the second changing nothing)."""
    assert bootstrapped.fired == trial_faults(bootstrapped.root)
    *faulted, finished, again = bootstrapped.runs
    for fault, status, output in faulted:
        assert status != 0, (fault, output)
    assert finished[1] == 0, finished[2]
    assert "three nodes joined" in finished[2]
    assert again[1] == 0 and "set up already" in again[2], again[2]
    consortium = bootstrapped.root / "consortium"
    assert sorted(p.name for p in consortium.iterdir()) == [
        "authority.pem",
        "consortium.key",
        "roster.json",
    ]
    roster_line = (consortium / "roster.json").read_bytes().rstrip(b"\n")
    authority = keys.public_key_text(keys.load_private_key(consortium / "authority.pem"))
    secret = (consortium / "consortium.key").read_bytes()
    for node in NODES:
        directory = bootstrapped.root / node
        config = load_config(directory)
        # every node holds the one roster, trusts the one authority, has the one secret
        assert (directory / "keys" / "consortium.key").read_bytes() == secret
        assert stat.S_IMODE((directory / "keys" / "consortium.key").stat().st_mode) == 0o600
        database = open_database(config.database_url)
        try:
            store = ChainStore(database.engine)
            assert store.setting(AUTHORITY_SETTING) == authority
            assert roster_line in list(store.export_lines())
        finally:
            database.close()


def test_bootstrap_makes_the_nodes_compose_runs(
    compose: dict[str, Any], bootstrapped: Bootstrap
) -> None:
    services = compose["services"]
    for node in NODES:
        directory = bootstrapped.root / node
        config = load_config(directory)
        # what bootstrap wrote agrees with what compose gives the node's services
        assert config.node_id == node
        assert config.url == f"http://{node}:{config.port}"
        command = services[node]["command"]
        assert command[command.index("-b") + 1] == f"0.0.0.0:{config.port}"
        database = config.database_url.rsplit("/", 1)[1]
        assert database == node.replace("-", "_") + bootstrapped.suffix
        for name, other in services.items():
            if name.startswith(node) and "environment" in other:
                load_config(directory, {**other["environment"], "HRX_NODE_DIR": str(directory)})
        # the password is in keys/, which only the node's user may read, not in node.toml
        text = (directory / "node.toml").read_text()
        assert "s3cret" not in text and 'password_file = "keys/database.password"' in text
        assert ":s3cret@" in config.database_url
        assert stat.S_IMODE((directory / "node.toml").stat().st_mode) == 0o640
        assert (directory / "keys").stat().st_mode & 0o077 == 0
        for key in (directory / "keys").iterdir():
            assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    roster = (bootstrapped.root / "consortium" / "roster.json").read_text()
    assert all(f"http://{node}:8080" in roster for node in NODES)


def test_a_node_serves_with_the_environment_compose_gives_it(
    compose: dict[str, Any], bootstrapped: Bootstrap
) -> None:
    """hosp-b's gunicorn command and environment, with only the bind address, the port and
    the paths made local (and the database URL bootstrap wrote): it serves and is healthy."""
    service = compose["services"]["hosp-b"]
    port = free_port()
    environment = {
        k: str(v).replace("/srv/hrx", str(bootstrapped.root))
        for k, v in service["environment"].items()
    }
    command = list(service["command"])
    command[command.index("-b") + 1] = f"127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", *command[1:]],
        cwd=ROOT,
        env={**os.environ, **environment},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process)
        health = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
        assert health.status_code == 200, health.text
    finally:
        process.terminate()
        process.wait(timeout=20)
