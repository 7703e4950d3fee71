"""HL7 v2 messages from several MLLP connections at once, on SQLite and PostgreSQL: each is
acknowledged AA only once it is committed (what the ACK announces is already readable on a
connection of the test's own), and a message refused inside the shared transaction is NAKed
with its reason while the messages sharing that transaction commit."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from fhir_adapters.hl7v2 import parse_ack
from fhir_adapters.store import tables
from node.base.config import load_config
from node.db.schema import messages_table
from node.intake.hl7 import Hl7Intake
from node.intake.mllp import Hl7Listener, MllpClient
from node.services import Services, open_services
from tests.helpers.databases import postgres_database
from tests.helpers.hl7_messages import cbc, resident_id, set_field
from tests.helpers.nodes import free_port, init_node

HOST = "127.0.0.1"
CONNECTIONS = 4
MESSAGES = 12  # per connection


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def services(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Services]:
    directory = tmp_path / "hosp-a"
    if request.param == "sqlite":
        init_node(directory, "hosp-a", None, free_port())
        opened = open_services(load_config(directory))
        yield opened
        opened.close()
    else:
        with postgres_database() as url:
            init_node(directory, "hosp-a", url, free_port())
            opened = open_services(load_config(directory))
            yield opened
            opened.close()


def _message(connection: int, number: int) -> bytes:
    patient = connection * 100 + number // 3  # a few messages per patient
    resident = resident_id(f"330106198{patient:04d}0101"[:17].ljust(17, "1"))
    return cbc(
        f"GC-{connection}-{number}", f"F-GC-{connection}-{number}", resident, f"MRN-GC{patient}"
    )


def _stored(services: Services, key: str) -> bool:
    """Whether the message is committed: read on a connection of its own."""
    with services.database.engine.connect() as conn:
        row = conn.execute(
            sa.select(messages_table.c.resources).where(messages_table.c.message_key == key)
        ).first()
    return row is not None


def test_concurrent_messages_are_acknowledged_after_commit_and_a_bad_one_alone(
    services: Services,
) -> None:
    listener = Hl7Listener(Hl7Intake(services), HOST, 0)
    serving = threading.Thread(target=listener.serve_forever)
    serving.start()
    failures: list[str] = []
    refused: list[tuple[str, str]] = []
    accepted: list[str] = []
    lock = threading.Lock()

    def sender(connection: int) -> None:
        with MllpClient(HOST, listener.address[1]) as client:
            for number in range(MESSAGES):
                message = _message(connection, number)
                bad = connection == 1 and number == 5
                if bad:  # U: made final, a result this node never received (refused in _store)
                    message = set_field(set_field(message, "OBX", 5, ""), "OBX", 11, "U")
                ack = parse_ack(client.send(message))
                key = f"XYLIS|HZSY^2.16.156.10011.99.330100^ISO|GC-{connection}-{number}"
                committed = _stored(services, key)
                with lock:
                    if bad:
                        refused.append((ack.code, ack.text))
                        if committed:
                            failures.append(f"{key}: refused, yet stored")
                    elif ack.code != "AA":
                        failures.append(f"{key}: {ack.code} {ack.text}")
                    elif not committed:
                        failures.append(f"{key}: AA before it was committed")
                    else:
                        accepted.append(key)

    try:
        threads = [threading.Thread(target=sender, args=(n,)) for n in range(CONNECTIONS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        listener.stop()
        serving.join(30)
    assert failures == []
    assert len(accepted) == CONNECTIONS * MESSAGES - 1
    assert len(refused) == 1 and refused[0][0] == "AE"
    assert "result status U" in refused[0][1]
    with services.database.engine.connect() as conn:
        observations = conn.scalar(
            sa.select(sa.func.count())
            .select_from(tables.resources)
            .where(tables.resources.c.type == "Observation")
        )
        patients = conn.scalar(
            sa.select(sa.func.count())
            .select_from(tables.resources)
            .where(tables.resources.c.type == "Patient")
        )
    per_message = observations // len(accepted)
    assert per_message * len(accepted) == observations and per_message >= 1
    assert patients == len({_patient_of(key) for key in accepted})


def _patient_of(key: str) -> int:
    connection, number = (int(part) for part in key.rsplit("|", 1)[1].split("-")[1:])
    return connection * 100 + number // 3


def test_two_new_patients_without_matching_identifiers_in_one_message_are_two(
    services: Services,
) -> None:
    """PIDs whose identifiers are none a patient is matched by (here only PI numbers) name two
    new patients, each created with an id of its own, in one message."""
    message = cbc("GC-PI", "F-GC-PI", None, "")
    message = set_field(message, "PID", 3, "P7^^^^PI")
    head, _, group = message.partition(b"\rPID|")
    second = set_field(b"MSH|^~\\&|\rPID|" + group, "PID", 3, "P8^^^^PI")
    for segment in ("ORC", "OBR"):
        second = set_field(second, segment, 3, "F-GC-PI-2^XYLIS")
    message = head + b"\rPID|" + group.rstrip(b"\r") + b"\r" + second.partition(b"\r")[2]
    outcome = Hl7Intake(services).take_in(message, "test")
    assert outcome.ack_code == "AA", outcome.reason
    created = {w.split("/")[1] for w in outcome.written if w.startswith("Patient/")}
    assert len(created) == 2
