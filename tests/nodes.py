"""Real hospital nodes for tests: ``hrx node init`` into a temporary directory, then the node
served by its own process (the development server, or gunicorn) on a free 127.0.0.1 port,
and users and tokens made straight in its database."""

from __future__ import annotations

import atexit
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
from click.testing import CliRunner

from ledger import keys
from ledger.store import ChainStore
from node.identity.tokens import TokenAuthority
from node.cli import main
from node.base.config import load_config
from node.db.engines import Database, open_database
from node.identity.users import add_user, get_user

ROOT = Path(__file__).resolve().parent.parent
FHIR_JSON = "application/fhir+json"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def init_node(directory: Path, node_id: str, db_url: str | None, port: int) -> None:
    args = ["node", "init", "--dir", str(directory), "--id", node_id, "--name", f"医院 {node_id}"]
    args += ["--port", str(port)]
    if db_url:
        args += ["--db", db_url]
    hrx(*args)


def hrx(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def invoke(*args: str, stdin: str | None = None) -> Any:
    """``hrx ARGS`` in this process, its Result whatever the exit status (cf. :func:`hrx`)."""
    return CliRunner().invoke(main, list(args), input=stdin)


def append_requests(directory: Path, *request_ids: str) -> None:
    """Append ``access.requested`` entries to a node's own chain (``hrx ledger append``)."""
    bodies = "".join(f'{{"request_id": "{r}", "patient": "{"ab" * 32}"}}\n' for r in request_ids)
    answer = invoke(
        "ledger", "append", "--dir", str(directory), "--type", "access.requested", stdin=bodies
    )
    assert answer.exit_code == 0, answer.output


def join_alone(directory: Path) -> None:
    """Make an initialised node the one member of a consortium of its own (its authority
    key and pseudonym secret beside its directory), as ``hrx node join`` does for real."""
    root = directory.parent
    authority_key = root / f"{directory.name}-authority.pem"
    secret = root / f"{directory.name}-consortium.key"
    roster = root / f"{directory.name}-roster.json"
    hrx("consortium", "secret", "--out", str(secret))
    hrx(
        "consortium",
        "roster",
        "--authority-key",
        str(authority_key),
        "--quorum",
        "1",
        "--consortium",
        "hrx-test",
        "--out",
        str(roster),
        str(directory / "enrollment.json"),
    )
    authority = keys.public_key_text(keys.load_private_key(authority_key))
    hrx(
        "node",
        "join",
        "--dir",
        str(directory),
        "--roster",
        str(roster),
        "--secret",
        str(secret),
        "--authority",
        authority,
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
            authority = TokenAuthority(
                keys.load_private_key(config.token_key), config.fhir_base, lambda _: user
            )
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
    log = (directory / "server.log").open("ab")
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


_askers: dict[Path, Any] = {}


def asked(asker: Path, body: dict[str, Any], *, username: str = "dr-test") -> dict[str, Any]:
    """An access request ``body`` with its proof (``asked``), after recording the question on
    the chain of the member whose directory is ``asker``, as a referral does (the body's
    ``request_id``, ``patient``, ``purpose`` and ``categories``)."""
    from node.flows.prior_results import record_question
    from node.services import open_services

    services = _askers.get(asker)
    if services is None:
        services = _askers[asker] = open_services(load_config(asker))
        atexit.register(services.close)
    proof = record_question(
        services,
        body["request_id"],
        body["patient"],
        username,
        body["purpose"],
        list(body["categories"]),
    )
    return {**body, "asked": proof}


def ask_access(asker: Path, source: str, body: dict[str, Any]) -> dict[str, Any]:
    """``POST /peer/access`` to member ``source``, signed by the member whose directory is
    ``asker``, with the question recorded on its chain first (:func:`asked`)."""
    from node.consortium.peers import SignedPeers

    config = load_config(asker)
    peers = SignedPeers(
        _askers[asker].chain_store if asker in _askers else ChainStore(config.database_url),
        config.node_id,
        keys.load_private_key(config.ed25519_key),
    )
    answer: dict[str, Any] = peers.post(source, "/peer/access", asked(asker, body))
    return answer
