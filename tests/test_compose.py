"""docker-compose.yml, checked without a Docker engine: the file is valid compose (by
docker-compose itself), every command a service runs is a command of the hrx CLI (or gunicorn
serving the node's app) with options it accepts, and the bootstrap service's script, run for
real against this machine's PostgreSQL, makes nodes whose configuration agrees with what
compose gives each service — environment, ports, volumes, database names — and that serve
with exactly that environment."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import requests
import yaml

from node.cli import main as hrx_main
from node.config import load_config
from tests.conftest import POSTGRES_ADMIN, _postgres_admin
from tests.nodes import free_port, wait_healthy

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
NODES = ("hosp-a", "hosp-b", "hosp-c")

pytestmark = pytest.mark.postgres


def docker_compose() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        pytest.fail("docker-compose is missing: run scripts/test-deps.sh (Debian docker-compose)")
    return found


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


def hrx_command(args: list[str]) -> click.Command:
    """Resolve and parse ``hrx ARGS`` as the CLI would, without running it; the command."""
    context = hrx_main.make_context("hrx", list(args))
    command: click.Command = hrx_main
    while isinstance(command, click.Group):
        with warnings.catch_warnings():  # Click 8.2 deprecates protected_args; 9 folds it in args
            warnings.simplefilter("ignore", DeprecationWarning)
            words = [*context.protected_args, *context.args]
        name, sub, rest = command.resolve_command(context, words)
        assert sub is not None, f"hrx has no command {name!r}"
        context = sub.make_context(name or "", rest, parent=context)
        command = sub
    return command


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
            assert command[-1] == "node.wsgi:app", name
            assert command[1:3] == ["-c", "python:node.gunicorn_conf"], name  # metrics, logs
            assert "HRX_NODE_DIR" in service["environment"], name
        else:
            assert command == ["/app/deploy/bootstrap.sh"], name
            assert (ROOT / "deploy" / "bootstrap.sh").stat().st_mode & 0o111
    with pytest.raises(click.UsageError):
        hrx_command(["node", "replicate", "--dri", "/srv/hrx/hosp-a"])  # the check can fail


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Mount point -> volume or host path, from short ("src:dst[:mode]") or long syntax."""
    found = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
            found[target] = source
        else:
            found[volume["target"]] = volume["source"]
    return found


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
        url = service["environment"]["HRX_DATABASE_URL"]
        assert url == f"postgresql://hrx:s3cret@db:5432/{node.replace('-', '_')}", name


def test_published_ports_are_the_ports_served(compose: dict[str, Any]) -> None:
    services = compose["services"]
    published = set()
    for node in NODES:
        service = services[node]
        command = service["command"]
        bind = command[command.index("-b") + 1]
        port = int(bind.rsplit(":", 1)[1])
        assert int(service["environment"]["HRX_SERVER_PORT"]) == port
        (mapping,) = service["ports"]
        assert int(mapping["target"]) == port
        published.add(int(mapping["published"]))
    assert len(published) == len(NODES)
    hl7 = services["hosp-a-hl7"]
    port = int(hl7["command"][hl7["command"].index("--port") + 1])
    assert [int(p["target"]) for p in hl7["ports"]] == [port]
    pacs = services["hosp-a-pacs"]["environment"]["HRX_DICOMWEB_URL"]
    assert pacs.startswith("http://orthanc:8042/")
    assert "8042" in {str(p["target"]) for p in services["orthanc"]["ports"]}


def test_postgres_creates_every_database_the_nodes_use(compose: dict[str, Any]) -> None:
    init = (ROOT / "deploy" / "postgres-init.sql").read_text()
    created = set(re.findall(r"CREATE DATABASE (\w+);", init))
    used = {
        s["environment"]["HRX_DATABASE_URL"].rsplit("/", 1)[1]
        for s in compose["services"].values()
        if "HRX_DATABASE_URL" in s.get("environment", {})
    }
    assert used == created == {"hosp_a", "hosp_b", "hosp_c"}
    init_script = mounts(compose["services"]["db"])["/docker-entrypoint-initdb.d/10-hrx.sql"]
    assert Path(init_script) == ROOT / "deploy" / "postgres-init.sql"


@pytest.fixture(scope="module")
def bootstrapped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """deploy/bootstrap.sh run for real: /srv/hrx is a temporary directory and the databases
    are this machine's PostgreSQL (dropped afterwards)."""
    root = tmp_path_factory.mktemp("srv-hrx")
    suffix = f"_t{uuid.uuid4().hex[:8]}"
    admin = _postgres_admin()
    databases = [f"{node.replace('-', '_')}{suffix}" for node in NODES]
    for database in databases:
        admin.execute(f'CREATE DATABASE "{database}"')
    user, host = POSTGRES_ADMIN.split("://", 1)[1].split("/", 1)[0].split("@")
    try:
        for _ in range(2):  # the second run must change nothing
            answer = subprocess.run(
                [str(ROOT / "deploy" / "bootstrap.sh")],
                capture_output=True,
                text=True,
                env={
                    **os.environ,
                    "HRX_ROOT": str(root),
                    "HRX_DB_HOST": host.split(":")[0],
                    "HRX_DB_USER": user.split(":")[0],
                    "HRX_DB_PASSWORD": "",
                    "HRX_DB_SUFFIX": suffix,
                },
            )
            assert answer.returncode == 0, answer.stdout + answer.stderr
        assert "set up already" in answer.stdout
        yield root
    finally:
        for database in databases:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        admin.close()


def test_bootstrap_makes_the_nodes_compose_runs(
    compose: dict[str, Any], bootstrapped: Path
) -> None:
    services = compose["services"]
    for node in NODES:
        directory = bootstrapped / node
        config = load_config(directory)
        # what bootstrap wrote agrees with what compose gives the node's services
        assert config.node_id == node
        assert config.url == f"http://{node}:{config.port}"
        service = services[node]
        assert int(service["environment"]["HRX_SERVER_PORT"]) == config.port
        assert config.database_url.rsplit("/", 1)[1].startswith(node.replace("-", "_"))
        for name, other in services.items():
            if name.startswith(node) and "environment" in other:
                environment = {
                    k: v for k, v in other["environment"].items() if k != "HRX_DATABASE_URL"
                }
                load_config(directory, {**environment, "HRX_NODE_DIR": str(directory)})
        assert (directory / "keys").stat().st_mode & 0o077 == 0
    roster = (bootstrapped / "consortium" / "roster.json").read_text()
    assert all(f"http://{node}:8080" in roster for node in NODES)


def test_a_node_serves_with_the_environment_compose_gives_it(
    compose: dict[str, Any], bootstrapped: Path
) -> None:
    """hosp-b's gunicorn command and environment, with only the bind address, the port and
    the paths made local (and the database URL bootstrap wrote): it serves and is healthy."""
    service = compose["services"]["hosp-b"]
    port = free_port()
    environment = {
        k: str(v).replace("/srv/hrx", str(bootstrapped))
        for k, v in service["environment"].items()
        if k != "HRX_DATABASE_URL"
    }
    environment["HRX_SERVER_PORT"] = str(port)
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
