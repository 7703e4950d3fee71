"""Several listener processes behind one port (``hrx adapters hl7-listen --processes``): a real
listener on 127.0.0.1 whose connections are shared out among its processes; every message
sent on any connection is stored exactly once and acknowledged AA, a message sent again is a
duplicate, a listener process that dies is replaced, and SIGTERM stops them all."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa

from fhir_adapters.hl7v2 import parse_ack
from node.base.config import load_config
from node.db.engines import open_database
from node.db.schema import messages_table
from node.intake.mllp import MllpClient
from tests.helpers.hl7_messages import cbc, resident_id
from tests.helpers.nodes import free_port, init_node
from tests.node.intake.test_mllp import HOST, listening

CONNECTIONS = 4
PER_CONNECTION = 6


@pytest.fixture
def node_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "hosp-a"
    init_node(directory, "hosp-a", None, free_port())
    return directory


def _message(connection: int, number: int) -> bytes:
    control = f"PROC-{connection}-{number}"
    resident = resident_id(f"3301062001010{connection:02d}{number:02d}")
    return cbc(control, f"F-{control}", resident, f"MRN-PROC-{connection}-{number}")


def _stored(directory: Path) -> Counter[str]:
    database = open_database(load_config(directory).database_url)
    try:
        with database.engine.connect() as conn:
            return Counter(row[0] for row in conn.execute(sa.select(messages_table.c.message_key)))
    finally:
        database.close()


def _serving_processes(log: Path) -> set[str]:
    return set(re.findall(r"handed to listener process (\d+)", log.read_text(errors="replace")))


def test_messages_on_several_connections_are_each_stored_once_and_acknowledged(
    node_dir: Path,
) -> None:
    with listening(node_dir, "--processes", "2") as running:
        answers: dict[str, list[str]] = {}
        lock = threading.Lock()
        clients = [MllpClient(HOST, running.port) for _ in range(CONNECTIONS)]

        def sender(connection: int) -> None:
            with clients[connection] as client:
                for number in range(PER_CONNECTION):
                    ack = parse_ack(client.send(_message(connection, number)))
                    with lock:
                        answers.setdefault(f"PROC-{connection}-{number}", []).append(ack.code)
                # the first message again, on the same connection: already stored
                again = parse_ack(client.send(_message(connection, 0)))
                with lock:
                    answers[f"PROC-{connection}-0"].append(again.code)

        threads = [threading.Thread(target=sender, args=(n,)) for n in range(CONNECTIONS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=180)
        assert len(answers) == CONNECTIONS * PER_CONNECTION
        for control, codes in answers.items():
            assert set(codes) == {"AA"}, (control, codes)
        # the connections were shared out among both processes
        assert _serving_processes(running.log) == {"1", "2"}
        assert running.alive()
    stored = _stored(node_dir)
    prefix = "XYLIS|HZSY^2.16.156.10011.99.330100^ISO|"
    ours = {key: count for key, count in stored.items() if key.startswith(prefix + "PROC-")}
    assert ours == {prefix + control: 1 for control in answers}


def test_a_listener_process_that_dies_is_replaced_and_sigterm_stops_them_all(
    node_dir: Path,
) -> None:
    with listening(node_dir, "--processes", "2") as running:
        with MllpClient(HOST, running.port) as client:
            assert parse_ack(client.send(_message(0, 0))).code == "AA"
        children = _children(running.process.pid)
        assert len(children) == 2
        os.kill(children[0], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            now = _children(running.process.pid)
            if len(now) == 2 and children[0] not in now:
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"no listener process replaced the one killed: {running.log.read_text()}")
        for number in range(1, 5):  # on new connections, whichever process takes them
            with MllpClient(HOST, running.port) as client:
                assert parse_ack(client.send(_message(0, number))).code == "AA"
        running.process.send_signal(signal.SIGTERM)
        assert running.process.wait(timeout=60) == 0
        assert _children(running.process.pid) == []
    assert "ended (exit code -9); starting another" in running.log.read_text()
    assert sum(_stored(node_dir).values()) == 5


def test_a_listener_process_that_cannot_start_again_is_retried_while_the_other_serves(
    node_dir: Path,
) -> None:
    key = load_config(node_dir).token_key
    aside = key.with_name(key.name + ".moved")
    with listening(node_dir, "--processes", "2") as running:
        children = _children(running.process.pid)
        assert len(children) == 2
        key.rename(aside)  # an operator's mistake: the node cannot be opened again
        try:
            os.kill(children[0], signal.SIGKILL)
            deadline = time.monotonic() + 60
            while "trying again in" not in running.log.read_text(errors="replace"):
                assert time.monotonic() < deadline, running.log.read_text()
                time.sleep(0.2)
            assert running.alive()  # the listener did not end with it
            for number in range(3):  # the other process serves every connection meanwhile
                with MllpClient(HOST, running.port) as client:
                    assert parse_ack(client.send(_message(1, number))).code == "AA"
        finally:
            aside.rename(key)
        deadline = time.monotonic() + 60
        while len(_children(running.process.pid)) != 2:  # the next try starts it
            assert time.monotonic() < deadline, running.log.read_text()
            time.sleep(0.2)
        with MllpClient(HOST, running.port) as client:
            assert parse_ack(client.send(_message(1, 3))).code == "AA"
        running.process.send_signal(signal.SIGTERM)
        assert running.process.wait(timeout=60) == 0
    assert "could not start" in running.log.read_text()
    assert sum(_stored(node_dir).values()) == 4


def _children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return sorted(found)
