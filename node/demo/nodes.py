"""One real hospital node, for tests, benchmarks and the demo: made with the same setup code
as ``hrx node init`` and ``hrx node join`` (a consortium of its own), served by its own
process (the development server, or gunicorn) on a free 127.0.0.1 port, with users and
tokens made straight in its database."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from ledger import keys
from ledger.canonical import canonical_bytes, parse_json
from ledger.roster import sign_roster
from node.base.config import load_config
from node.consortium.membership import ENROLLMENT_FILE, next_roster, write_secret
from node.db.engines import Database, open_database
from node.identity.tokens import token_authority
from node.identity.users import add_user, get_user
from node.ops.setup import init_node as setup_node
from node.ops.setup import join_node

ROOT = Path(__file__).resolve().parents[2]
FHIR_JSON = "application/fhir+json"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def form_consortium(
    directories: list[Path],
    *,
    roster: Path,
    secret: Path,
    authority_key: Path,
    name: str,
    quorum: int,
    members_info: dict[str, dict[str, object]] | None = None,
    witnesses: list[str] | None = None,
    registries: list[str] | None = None,
) -> None:
    """What the authority and the members do to form a consortium, as ``hrx consortium secret``,
    ``hrx consortium roster`` and ``hrx node join`` do it: the pseudonym secret, the first
    roster of the members' enrollments (with their levels and accreditations), signed by a
    local authority key, and each member's join."""
    write_secret(secret)
    enrollments = [parse_json((d / ENROLLMENT_FILE).read_bytes()) for d in directories]
    body = next_roster(
        [],
        enrollments,
        members_info or {},
        name=name,
        quorum=quorum,
        witnesses=witnesses,
        registries=registries,
    ).roster
    authority = keys.load_or_create_private_key(authority_key)
    signed = {"roster": body, "signature": sign_roster(body, authority)}
    roster.write_bytes(canonical_bytes(signed) + b"\n")
    for directory in directories:
        join_node(load_config(directory), roster, secret, keys.public_key_text(authority))


def init_node(directory: Path, node_id: str, db_url: str | None, port: int) -> None:
    """A node as ``hrx node init`` makes one, named 医院 <id>."""
    setup_node(directory, node_id, f"医院 {node_id}", database_url=db_url, port=port)


def join_alone(directory: Path) -> None:
    """Make an initialised node the one member of a consortium of its own (its authority
    key and pseudonym secret beside its directory), as ``hrx node join`` does for real."""
    root = directory.parent
    form_consortium(
        [directory],
        roster=root / f"{directory.name}-roster.json",
        secret=root / f"{directory.name}-consortium.key",
        authority_key=root / f"{directory.name}-authority.pem",
        name="hrx-test",
        quorum=1,
    )


@dataclass
class Node:
    directory: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    _database: Database | None = None
    _tokens: dict[tuple[str, str | None], str] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def fhir(self) -> str:
        return f"{self.base}/fhir"

    @property
    def database(self) -> Database:
        if self._database is None:
            self._database = open_database(load_config(self.directory).database_url)
        return self._database

    def user(self, username: str, role: str, patient: str | None = None) -> None:
        if get_user(self.database.engine, username) is None:
            add_user(self.database.write_engine, username, role, patient_id=patient)

    def token(
        self,
        username: str = "doctor",
        role: str = "doctor",
        *,
        scope: str | None = None,
        patient: str | None = None,
        ttl: int = 3600,
    ) -> str:
        key = (username, scope)
        if key not in self._tokens or ttl != 3600:
            self.user(username, role, patient)
            config = load_config(self.directory)
            user = get_user(self.database.engine, username)
            assert user is not None
            authority = token_authority(config.token_key, config.fhir_base, self.database)
            token = authority.issue(user, scope, ttl)
            if ttl != 3600:
                return token
            self._tokens[key] = token
        return self._tokens[key]

    def session(self, token: str | None = None) -> requests.Session:
        session = requests.Session()
        session.headers["Accept"] = FHIR_JSON
        session.headers["Authorization"] = f"Bearer {token or self.token()}"
        return session

    def close(self) -> None:
        if self._database is not None:
            self._database.close()
            self._database = None


def wait_healthy(base: str, process: subprocess.Popen[bytes], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the node exited with {process.returncode}")
        try:
            if requests.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):  # not up yet, or busy starting
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{base} did not become healthy")


@contextmanager
def running_node(
    directory: Path,
    db_url: str | None = None,
    *,
    node_id: str = "hosp-a",
    gunicorn_workers: int = 0,
    env: dict[str, str] | None = None,
    joined: bool = True,
) -> Iterator[Node]:
    """A node, initialised (and, unless ``joined`` is False, the one member of a consortium of
    its own) and served; stopped (and its process reaped) afterwards."""
    port = free_port()
    init_node(directory, node_id, db_url, port)
    if joined:
        join_alone(directory)
    with serving(directory, port, gunicorn_workers=gunicorn_workers, env=env) as node:
        yield node


@contextmanager
def serving(
    directory: Path,
    port: int | None = None,
    *,
    gunicorn_workers: int = 0,
    env: dict[str, str] | None = None,
) -> Iterator[Node]:
    """An existing node directory served by its own process on ``port`` (default: free)."""
    node = Node(directory, port or free_port())
    environment = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    if gunicorn_workers:
        environment["HRX_NODE_DIR"] = str(directory)
        environment["HRX_SERVER_PORT"] = str(node.port)
        command = [
            sys.executable,
            "-m",
            "gunicorn",
            "-w",
            str(gunicorn_workers),
            "-k",
            "gthread",
            "--threads",
            "4",
            "-b",
            f"127.0.0.1:{node.port}",
            "node.web.wsgi:app",
        ]
    else:
        command = [
            sys.executable,
            "-m",
            "node.cli",
            "node",
            "serve",
            "--dir",
            str(directory),
            "--port",
            str(node.port),
        ]
    log = os.fdopen(  # the node's own log: its user's alone, as the node's files are
        os.open(directory / "server.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab"
    )
    node.process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=log, stderr=log)
    try:
        wait_healthy(node.base, node.process)
        yield node
    finally:
        node.process.terminate()
        try:
            node.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait()
        log.close()
        node.close()


def post(session: requests.Session, url: str, resource: dict[str, Any], **headers: str) -> Any:
    return session.post(url, json=resource, headers={"Content-Type": FHIR_JSON, **headers})
