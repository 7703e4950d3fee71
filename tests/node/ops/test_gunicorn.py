"""The node under gunicorn with several worker processes against one database: concurrent
writers never fork a resource's history, every worker's audit records land (also those still
queued when the server stops), and reads are served by every worker. Two nodes served by
gunicorn on one machine, as one user, each keep their own control socket."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.helpers import ROOT
from tests.helpers.databases import postgres_database
from tests.helpers.fhir import observation, patient
from tests.helpers.nodes import FHIR_JSON, free_port, init_node, running_node, wait_healthy


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def engine_url(request: pytest.FixtureRequest) -> Any:
    if request.param == "sqlite":
        yield None
    else:
        with postgres_database() as url:
            yield url


def test_workers_share_one_consistent_store(tmp_path: Path, engine_url: str | None) -> None:
    with running_node(tmp_path / "node", engine_url, gunicorn_workers=3) as node:
        s = node.session()
        pid = s.post(
            f"{node.fhir}/Patient",
            json=patient(identifier="gunicorn-1"),
            headers={"Content-Type": FHIR_JSON},
        ).json()["id"]
        oid = s.post(
            f"{node.fhir}/Observation", json=observation(pid), headers={"Content-Type": FHIR_JSON}
        ).json()["id"]
        token = node.token()
        successes: list[int] = []
        conflicts: list[int] = []
        errors: list[str] = []

        def updater(worker: int) -> None:
            session = node.session(token)
            for attempt in range(15):
                current = session.get(f"{node.fhir}/Observation/{oid}")
                body = current.json()
                body["valueQuantity"]["value"] = worker * 100 + attempt
                response = session.put(
                    f"{node.fhir}/Observation/{oid}",
                    json=body,
                    headers={"Content-Type": FHIR_JSON, "If-Match": current.headers["ETag"]},
                )
                if response.status_code == 200:
                    successes.append(int(response.json()["meta"]["versionId"]))
                elif response.status_code in (409, 412):
                    conflicts.append(response.status_code)
                else:
                    errors.append(f"{response.status_code} {response.text[:200]}")

        threads = [threading.Thread(target=updater, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        # every successful update made exactly one new version: no gaps, no duplicates
        assert sorted(successes) == list(range(2, 2 + len(successes)))
        history = s.get(f"{node.fhir}/Observation/{oid}/_history?_count=200").json()
        versions = [int(e["resource"]["meta"]["versionId"]) for e in history["entry"]]
        assert versions == list(range(1 + len(successes), 0, -1))
        assert len(successes) + len(conflicts) == 6 * 15
    # the server is stopped: every worker flushed its queued audit records on the way out
    from node.base.config import load_config
    from node.db.engines import open_database

    database = open_database(load_config(tmp_path / "node").database_url)
    try:
        with database.engine.connect() as conn:
            read_events = conn.execute(
                sa.text(
                    "SELECT count(*) FROM fhir_idx_token t JOIN fhir_resources r "
                    "ON r.res_pk = t.res_pk WHERE t.type = 'AuditEvent' AND t.param = 'subtype' "
                    "AND t.code = 'read'"
                )
            ).scalar_one()
    finally:
        database.close()
    assert read_events == 6 * 15  # one GET before each PUT


def control(socket_path: Path, command: str, seconds: float = 20) -> dict[str, Any]:
    """Ask a gunicorn master over its control socket (gunicornc's protocol); the answer.
    The master closes and reopens its socket around each fork, so a refusal is tried again
    until ``seconds`` have passed."""
    from gunicorn.ctl.client import ControlClient, ControlClientError

    deadline = time.monotonic() + seconds
    while True:
        try:
            with ControlClient(str(socket_path), timeout=10) as client:
                answer: dict[str, Any] = client.send_command(command)
                return answer
        except ControlClientError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_two_nodes_keep_their_own_control_sockets(tmp_path: Path) -> None:
    """gunicorn 25.1+ opens a control socket, by default one per user ($XDG_RUNTIME_DIR or
    ~/.gunicorn/gunicorn.ctl): two nodes would share it, and stopping one deleted the other's.
    With node.ops.gunicorn_conf each has DIR/gunicorn.ctl, and serves at server.host:server.port
    without -b."""
    from gunicorn.config import KNOWN_SETTINGS

    if "control_socket" not in {setting.name for setting in KNOWN_SETTINGS}:
        pytest.skip("this gunicorn has no control socket (25.1 and later have)")
    home = tmp_path / "home"  # gunicorn's default socket would be here
    home.mkdir()
    masters: dict[str, tuple[Path, int, subprocess.Popen[bytes]]] = {}
    try:
        for node_id in ("hosp-a", "hosp-b"):
            directory, port = tmp_path / node_id, free_port()
            init_node(directory, node_id, None, port)
            environment = {
                **os.environ,
                "HOME": str(home),
                "HRX_NODE_DIR": str(directory),
                "PYTHONUNBUFFERED": "1",
            }
            for name in ("XDG_RUNTIME_DIR", "PROMETHEUS_MULTIPROC_DIR"):
                environment.pop(name, None)
            command = ["-c", "python:node.ops.gunicorn_conf", "-w", "1", "node.web.wsgi:app"]
            with (directory / "server.log").open("ab") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "gunicorn", *command],
                    cwd=ROOT,
                    env=environment,
                    stdout=log,
                    stderr=log,
                )
            masters[node_id] = directory, port, process
            wait_healthy(f"http://127.0.0.1:{port}", process)
        for directory, port, _process in masters.values():
            listeners = control(directory / "gunicorn.ctl", "show listeners")["listeners"]
            assert [item["address"] for item in listeners] == [f"http://127.0.0.1:{port}"]

        a_directory, _, a_process = masters["hosp-a"]
        a_process.terminate()
        assert a_process.wait(timeout=60) == 0
        assert not (a_directory / "gunicorn.ctl").exists()  # removed by its own master

        b_directory, b_port, b_process = masters["hosp-b"]
        assert b_process.poll() is None
        assert (b_directory / "gunicorn.ctl").is_socket()
        listeners = control(b_directory / "gunicorn.ctl", "show listeners")["listeners"]
        assert [item["address"] for item in listeners] == [f"http://127.0.0.1:{b_port}"]
        assert not (home / ".gunicorn").exists()
    finally:
        for _directory, _port, process in masters.values():
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=60)
