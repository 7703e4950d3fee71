"""The LIS adapter end to end: a real ``hrx adapters hl7-listen`` process fed over real MLLP
sockets on 127.0.0.1 (the samples, concurrent senders, broken streams, a fuzzer of malformed
messages), ``hl7-import`` and the quarantine commands, and what a node then serves over its
FHIR API, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fhir_adapters import hl7v2
from fhir_adapters.hl7v2 import SUPPORTED_VERSIONS, VALUE_TYPES, parse_ack
from fhir_adapters.hl7v2.times import read_moment
from node.base.config import load_config
from node.cli import main
from node.db.engines import Database, open_database
from node.db.schema import messages_table, quarantine_table
from node.intake.mllp import START_BLOCK, FrameReader, MllpClient, frame, send, send_many
from tests.helpers import ROOT
from tests.helpers.databases import postgres_database
from tests.helpers.fhir import poison
from tests.helpers.hl7_messages import (
    ALL_SAMPLES,
    CBC,
    CHEM,
    cbc,
    resident_id,
    sample,
    set_field,
)
from tests.helpers.nodes import Node, free_port, init_node, running_node

HOST = "127.0.0.1"
RESIDENT = "urn:oid:2.16.156.10011.1.3"
SYSTEMS = hl7v2.Systems("hosp-a")


# -- a listener process ---------------------------------------------------------------------------


@dataclass
class Listener:
    directory: Path
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def send(self, message: bytes) -> hl7v2.Ack:
        return parse_ack(send(HOST, self.port, message))

    def alive(self) -> bool:
        return self.process.poll() is None


def _announced_port(process: subprocess.Popen[bytes], log: Path, seconds: float = 60) -> int:
    """The port the listener prints once it listens."""
    assert process.stdout is not None
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.2)
        if ready:
            line = process.stdout.readline().decode()
            if not line:
                break
            if "MLLP on" in line:
                return int(line.split("MLLP on ")[1].split()[0].rsplit(":", 1)[1])
        if process.poll() is not None:
            break
    raise RuntimeError(f"hl7-listen did not start: {log.read_text(errors='replace')}")


@contextmanager
def listening(directory: Path, *options: str) -> Iterator[Listener]:
    log = directory / "hl7-listen.log"
    command = [sys.executable, "-m", "node.cli", "adapters", "hl7-listen", "--dir"]
    command += [str(directory), "--port", "0", *options]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("ab") as errors:
        process = subprocess.Popen(
            command, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=errors
        )
    try:
        yield Listener(directory, _announced_port(process, log), process, log)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        assert process.stdout is not None
        process.stdout.close()


@pytest.fixture(scope="module")
def node_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("mllp") / "hosp-a"
    init_node(directory, "hosp-a", None, free_port())
    return directory


@pytest.fixture(scope="module")
def database(node_dir: Path) -> Iterator[Database]:
    database = open_database(load_config(node_dir).database_url)
    yield database
    database.close()


@pytest.fixture(scope="module")
def listener(node_dir: Path) -> Iterator[Listener]:
    with listening(node_dir) as running:
        yield running


def quarantine_count(database: Database) -> int:
    with database.engine.connect() as conn:
        count: int = conn.execute(
            sa.select(sa.func.count()).select_from(quarantine_table)
        ).scalar_one()
        return count


def stored_keys(database: Database) -> set[str]:
    with database.engine.connect() as conn:
        return {row[0] for row in conn.execute(sa.select(messages_table.c.message_key))}


def current(database: Database, resource_type: str, resource_id: str) -> tuple[int, Any]:
    from fhir_adapters.store import ResourceStore

    stored = ResourceStore(database.engine, database.write_engine).read(resource_type, resource_id)
    return stored.version, stored.resource()


# -- framing --------------------------------------------------------------------------------------


def test_frames_are_cut_from_a_stream_in_any_chunks() -> None:
    one, two = sample(CBC), sample(CHEM)
    stream = b"junk" + frame(one) + frame(two)
    for size in (1, 2, 7, 64, len(stream)):
        reader = FrameReader()
        frames = []
        for start in range(0, len(stream), size):
            frames += [f.payload for f in reader.feed(stream[start : start + size])]
        assert frames == [one, two]
        assert reader.skipped == 4 and not reader.in_frame


def test_a_frame_begun_again_is_dropped_and_a_long_one_is_cut_to_its_head() -> None:
    reader = FrameReader(max_bytes=10)
    frames = list(reader.feed(START_BLOCK + b"half" + frame(b"0123456789ABCDEF") + frame(b"ok")))
    assert [(f.payload, f.size, f.oversized) for f in frames] == [
        (b"0123456789", 16, True),
        (b"ok", 2, False),
    ]
    assert reader.dropped == 1


def test_a_listener_answers_even_when_taking_a_message_in_fails_unexpectedly() -> None:
    from node.intake.mllp import Hl7Listener

    class Failing:
        def take_in(self, payload: bytes, origin: str) -> Any:
            raise RuntimeError("a bug")

    listener = Hl7Listener(Failing(), HOST, 0)  # type: ignore[arg-type]
    thread = threading.Thread(target=listener.serve_forever)
    thread.start()
    try:
        port = listener.address[1]
        for _ in range(2):  # and it goes on answering
            ack = parse_ack(send(HOST, port, sample(CBC)))
            assert (ack.code, ack.error_code) == ("AE", "207")
            assert "not stored" in ack.text
    finally:
        listener.stop()
        thread.join(timeout=30)


# -- the samples and ordinary traffic -------------------------------------------------------------


def test_the_samples_sent_over_mllp_are_stored_before_they_are_acknowledged(
    listener: Listener, database: Database
) -> None:
    acks = [
        parse_ack(ack) for ack in send_many(HOST, listener.port, [sample(n) for n in ALL_SAMPLES])
    ]
    assert [(a.code, a.error_code) for a in acks] == [("AA", "")] * len(ALL_SAMPLES)
    controls = [hl7v2.parse_message(sample(n)).control_id for n in ALL_SAMPLES]
    assert [a.control_id for a in acks] == controls
    keys = stored_keys(database)
    assert {hl7v2.parse_message(sample(n)).key for n in ALL_SAMPLES} <= keys
    chemistry = hl7v2.read_results(hl7v2.parse_message(sample(CHEM)), SYSTEMS)[0].orders[0]
    version, report = current(database, "DiagnosticReport", chemistry.resource_id)
    assert (version, report["status"], len(report["result"])) == (2, "corrected", 9)
    version, creatinine = current(database, "Observation", chemistry.results[3].resource_id)
    assert (version, creatinine["status"], str(creatinine["valueQuantity"]["value"])) == (
        2,
        "corrected",
        "128",
    )
    again = listener.send(sample(CBC))
    assert (again.code, again.text) == ("AA", "already stored")


def test_an_ack_of_a_gb18030_message_is_in_gb18030(listener: Listener) -> None:
    message = set_field(sample(CHEM), "MSH", 12, "2.1", codec="gb18030")
    raw = send(HOST, listener.port, message)
    assert "|浙江省人民医院|" in raw.decode("gb18030")
    ack = parse_ack(raw)
    assert (ack.code, ack.error_code) == ("AR", "203")
    assert "ERR|MSH^1^12^203&Unsupported version id&HL70357" in ack.segments


def test_a_result_of_another_patient_is_refused_and_the_log_names_no_one(
    listener: Listener,
) -> None:
    """The same order sent again for another patient is quarantined (never moved); the
    listener's log line says so without either patient's identifiers or local ids."""
    first = listener.send(cbc("LOG-1", "F-LOG-1", mrn="HZ00077701", name="欧阳^娜娜"))
    assert first.code == "AA"
    other = listener.send(cbc("LOG-2", "F-LOG-1", mrn="HZ00077702", name="司马^光"))
    assert other.code == "AE"
    deadline = time.monotonic() + 10
    while "LOG-2" not in listener.log.read_text(errors="replace"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    text = listener.log.read_text(errors="replace")
    line = next(line for line in text.splitlines() if "LOG-2" in line)
    record = json.loads(line)  # the node's JSON log lines, as every process of a node writes
    assert record["logger"] == "hrx.hl7" and "quarantined as #" in record["message"]
    assert record["time"].endswith("Z")
    for private in ("HZ00077701", "HZ00077702", "欧阳", "娜娜", "司马", "Patient/"):
        assert private not in text, private


def test_many_senders_at_once_are_each_answered_after_storing(
    listener: Listener, database: Database
) -> None:
    answers: dict[str, str] = {}

    def sender(number: int) -> None:
        with MllpClient(HOST, listener.port) as client:
            for index in range(3):
                control = f"MANY-{number}-{index}"
                resident = resident_id(f"330106200001{number:03d}01")
                message = cbc(control, f"F-{control}", resident, f"MRN-MANY-{number}")
                answers[control] = parse_ack(client.send(message)).code

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(answers) == 24 and set(answers.values()) == {"AA"}
    keys = stored_keys(database)
    assert all(f"XYLIS|HZSY^2.16.156.10011.99.330100^ISO|{c}" in keys for c in answers)


def test_a_message_too_long_is_refused_and_the_connection_goes_on(
    listener: Listener, database: Database
) -> None:
    huge = cbc("HUGE-1", "F-HUGE-1", None, "MRN-HUGE")
    huge += b"NTE|1|L|" + b"x" * (1 << 20) + b"\r"
    before = quarantine_count(database)
    with MllpClient(HOST, listener.port) as client:
        refused = parse_ack(client.send(huge))
        assert (refused.code, refused.control_id) == ("AR", "HUGE-1")
        assert "more than the 1048576-byte limit" in refused.text
        fine = parse_ack(client.send(cbc("HUGE-2", "F-HUGE-2", None, "MRN-HUGE")))
        assert fine.code == "AA"
    assert quarantine_count(database) == before + 1
    with database.engine.connect() as conn:
        size = conn.execute(
            sa.select(sa.func.length(quarantine_table.c.payload)).order_by(
                quarantine_table.c.id.desc()
            )
        ).first()
    assert size is not None and size[0] == 1 << 20


@pytest.mark.parametrize(
    ("value_type", "field", "value", "problem"),
    [
        ("NM", 5, "9" * 10_000, "has 10000 significant digits"),
        ("NM", 5, "1" * 33, "has 33 significant digits"),
        ("NM", 5, "<" + "9" * 400, "has 400 significant digits"),
        ("NM", 5, "0." + "0" * 400 + "1", "too small"),
        ("SN", 5, "^" + "9" * 5000, "has 5000 significant digits"),
        ("SN", 5, "^1^-^" + "9" * 309, "has 309 significant digits"),
        ("NM", 7, "1-" + "9" * 5000, "has 5000 significant digits"),
    ],
    ids=["NM-10000", "NM-33", "NM-comparator", "NM-tiny", "SN-5000", "SN-ratio", "range"],
)
def test_a_number_json_clients_cannot_read_is_refused_and_quarantined(
    listener: Listener, database: Database, value_type: str, field: int, value: str, problem: str
) -> None:
    """Was AA: stored, and from then on the patient's results could not be read (500 on
    /peer/access, AE 207 for every later message of the order)."""
    control = f"BIG-{uuid.uuid4().hex[:12]}"
    message = cbc(control, f"F-{control}", None, "MRN-BIG")
    message = set_field(message, "OBX", 2, value_type, occurrence=3)
    message = set_field(message, "OBX", field, value, occurrence=3)
    before = quarantine_count(database)
    ack = listener.send(message)
    assert (ack.code, ack.error_code) == ("AE", "102"), ack
    assert f"OBX[3]-{field}" in ack.text and problem in ack.text, ack.text
    assert "9999999999" not in ack.text and len(ack.text) < 500
    assert quarantine_count(database) == before + 1
    assert not any(key.endswith(f"|{control}") for key in stored_keys(database))
    fine = listener.send(cbc(f"{control}-ok", f"F-{control}", None, "MRN-BIG"))
    assert fine.code == "AA", fine


@pytest.mark.parametrize(
    "value",
    ["1" * 32, "-0." + "0" * 322 + "5", "<0." + "0" * 300 + "1"],
    ids=["32-digits", "smallest", "comparator"],
)
def test_numbers_at_the_edges_of_the_rule_are_taken_in(
    listener: Listener, database: Database, value: str
) -> None:
    control = f"EDGE-{uuid.uuid4().hex[:12]}"
    message = set_field(cbc(control, f"F-{control}", None, "MRN-EDGE"), "OBX", 5, value)
    assert listener.send(message).code == "AA"
    order = hl7v2.read_results(hl7v2.parse_message(message), SYSTEMS)[0].orders[0]
    _, stored = current(database, "Observation", order.results[0].resource_id)
    assert stored["valueQuantity"]["value"] == Decimal(value.lstrip("<"))


def test_a_correction_replaces_a_stored_number_json_clients_cannot_read(
    listener: Listener, database: Database
) -> None:
    """A result an older version stored with a 10,000-digit value: the next message of the
    order (a correction) is taken in and replaces it (was AE 207 for every later message)."""
    resident = resident_id("33010619900101126")
    first = cbc("POISON-1", "F-POISON", resident, "MRN-POISON")
    assert listener.send(first).code == "AA"
    order = hl7v2.read_results(hl7v2.parse_message(first), SYSTEMS)[0].orders[0]
    hemoglobin = order.results[2].resource_id
    poison(database, "Observation", hemoglobin)
    correction = cbc("POISON-2", "F-POISON", resident, "MRN-POISON", reported="20260310113000+0800")
    correction = set_field(correction, "OBX", 5, "131", occurrence=3)
    correction = set_field(correction, "OBX", 11, "C", occurrence=3)
    ack = listener.send(correction)
    assert ack.code == "AA", ack
    version, corrected = current(database, "Observation", hemoglobin)
    assert version == 2 and corrected["status"] == "corrected"
    assert corrected["valueQuantity"]["value"] == Decimal("131")


def test_a_message_never_finished_is_not_stored_nor_answered(
    listener: Listener, database: Database
) -> None:
    whole = cbc("HALF-1", "F-HALF-1", None, "MRN-HALF")
    with socket.create_connection((HOST, listener.port), timeout=30) as sock:
        sock.sendall(START_BLOCK + whole[: len(whole) // 2])
    with MllpClient(HOST, listener.port) as client:
        # a frame begun again inside another: the first is dropped, the second answered
        client.send_raw(START_BLOCK + whole[:100] + b"junk between frames")
        answer = parse_ack(client.send(cbc("HALF-2", "F-HALF-2", None, "MRN-HALF")))
        assert (answer.code, answer.control_id) == ("AA", "HALF-2")
    keys = stored_keys(database)
    assert not any(key.endswith("|HALF-1") for key in keys)
    assert any(key.endswith("|HALF-2") for key in keys)


def test_a_connection_stalled_inside_a_message_is_closed(node_dir: Path) -> None:
    with listening(node_dir, "--read-timeout", "0.5") as short:
        with socket.create_connection((HOST, short.port), timeout=30) as sock:
            sock.sendall(START_BLOCK + b"MSH|^~\\&|LIS")
            assert sock.recv(100) == b""  # closed by the listener, nothing answered
        assert short.send(cbc("STALL-1", "F-STALL-1", None, "MRN-STALL")).code == "AA"
    assert "inside a frame for too long" in short.log.read_text()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_the_listener_stops_cleanly_on_a_signal(node_dir: Path, signum: int) -> None:
    with listening(node_dir) as running:
        idle = socket.create_connection((HOST, running.port), timeout=30)
        assert running.send(cbc(f"SIG-{signum}", f"F-SIG-{signum}", None, "MRN-SIG")).code == "AA"
        running.process.send_signal(signum)
        assert running.process.wait(timeout=30) == 0
        assert idle.recv(10) == b""  # open connections are closed
        idle.close()
        assert running.process.stdout is not None
        assert b"hl7-listen: stopped" in running.process.stdout.read()


# -- malformed messages: each is NAKed, quarantined, and the listener lives on --------------------

_SAFE_TEXT = st.text(
    st.characters(blacklist_characters="|^~\\&\r\n\x0b\x1c", blacklist_categories=["Cs"]),
    max_size=12,
)
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def _not_a_time(text: str) -> bool:
    try:
        read_moment(text)
    except ValueError:
        return True
    return False


@st.composite
def broken_messages(draw: st.DrawFn) -> tuple[bytes, str]:
    """A message that must be refused, and what its NAK's text must name."""
    control = f"FUZZ-{draw(st.uuids()).hex[:16]}"
    message = cbc(control, f"F-{control}", resident_id("33010619900101123"), "MRN-FUZZ")
    kind = draw(
        st.sampled_from(
            [
                "not-msh",
                "type",
                "version",
                "processing",
                "control",
                "identifier",
                "value-type",
                "number",
                "time",
                "charset",
                "order",
                "status",
                "resident",
                "truncated",
            ]
        )
    )
    result = draw(st.integers(1, 7))
    if kind == "not-msh":
        data = draw(st.binary(max_size=300))
        assume(b"\x0b" not in data and b"\x1c" not in data)
        assume(not data.lstrip(b" \t\r\n").removeprefix(b"\xef\xbb\xbf").startswith(b"MSH"))
        return data, "MSH"
    if kind == "type":
        code = draw(st.text(_LETTERS, max_size=4))
        trigger = draw(st.text(_LETTERS, max_size=4))
        assume((code, trigger) != ("ORU", "R01"))
        message, expected = set_field(message, "MSH", 9, f"{code}^{trigger}"), "MSH-9"
    elif kind == "version":
        version = draw(st.text("0123456789.abc", max_size=6))
        assume(version not in SUPPORTED_VERSIONS)
        message, expected = set_field(message, "MSH", 12, version), "MSH-12"
    elif kind == "processing":
        processing = draw(st.text(_LETTERS, max_size=2))
        assume(processing != "P")
        message, expected = set_field(message, "MSH", 11, processing), "MSH-11"
    elif kind == "control":
        message, expected = set_field(message, "MSH", 10, ""), "MSH-10"
    elif kind == "identifier":
        empty = draw(st.sampled_from(["", "^^^HZSY^MR", "~", "^^^CHN^NNCHN"]))
        message, expected = set_field(message, "PID", 3, empty), "PID[1]-3"
    elif kind == "value-type":
        value_type = draw(st.text(_LETTERS, min_size=1, max_size=3))
        assume(value_type not in VALUE_TYPES)
        message = set_field(message, "OBX", 2, value_type, occurrence=result)
        expected = f"OBX[{result}]-2"
    elif kind == "number":
        value = draw(_SAFE_TEXT)
        assume(value != '""' and value.strip() != "" and hl7v2.number(value) is None)
        message = set_field(message, "OBX", 5, value, occurrence=result)
        expected = f"OBX[{result}]-5"
    elif kind == "time":
        value = draw(st.text("0123456789+-.", min_size=1, max_size=18))
        assume(_not_a_time(value))
        message, expected = set_field(message, "OBR", 7, value), "OBR[1]-7"
    elif kind == "charset":
        junk, declared = draw(
            st.sampled_from([(b"\xff\xfe", "UNICODE UTF-8"), (b"\x80\x80", "GB18030")])
        )
        message = set_field(message, "MSH", 18, declared)
        message = message.replace("张".encode(), "张".encode() + junk)
        expected = "MSH-18"
    elif kind == "order":
        lines = message.split(b"\r")
        obr = next(i for i, line in enumerate(lines) if line.startswith(b"OBR"))
        obx = next(i for i, line in enumerate(lines) if line.startswith(b"OBX"))
        lines.insert(obr, lines.pop(obx))
        message, expected = b"\r".join(lines), "OBX"
    elif kind == "status":
        status = draw(st.text(_LETTERS, max_size=2))
        assume(status not in ("C", "D", "F", "I", "N", "O", "P", "R", "S", "U", "W", "X"))
        message = set_field(message, "OBX", 11, status, occurrence=result)
        expected = f"OBX[{result}]-11"
    elif kind == "resident":
        number = draw(st.from_regex(r"[1-6][0-9]{16}", fullmatch=True))
        good = resident_id(number)
        wrong = good[:-1] + draw(st.sampled_from([c for c in "0123456789X" if c != good[-1]]))
        message = set_field(message, "PID", 3, f"{wrong}^^^CHN^NNCHN")
        expected = "resident ID"
    else:  # truncated inside the header, before MSH-12 is complete
        header = message.split(b"\r")[0]
        cut = draw(st.integers(0, header.index(b"|2.5.1") + 3))  # at most "|2.": no version
        message, expected = header[:cut], "MSH"
    if kind != "truncated" and draw(st.booleans()):  # noise the listener must ignore
        noise = f"ZFZ|{draw(_SAFE_TEXT)}|{draw(_SAFE_TEXT)}".encode()
        message = message.replace(b"\rPID|", b"\r" + noise + b"\rPID|", 1)
    return message, expected


def test_malformed_messages_are_each_refused_quarantined_and_survived(
    listener: Listener, database: Database
) -> None:
    seen: list[str] = []

    @settings(
        max_examples=200,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(broken_messages())
    def one(broken: tuple[bytes, str]) -> None:
        message, expected = broken
        before = quarantine_count(database)
        ack = listener.send(message)
        assert ack.code in ("AE", "AR"), (message, ack)
        assert ack.error_code and ack.text and expected in ack.text, (message, ack)
        assert any(segment.startswith("ERR|") for segment in ack.segments)
        assert quarantine_count(database) == before + 1
        seen.append(expected)

    one()
    assert len(seen) >= 100
    assert listener.alive()
    good = listener.send(cbc("FUZZ-AFTER", "F-FUZZ-AFTER", None, "MRN-FUZZ-AFTER"))
    assert good.code == "AA"


# -- files and the quarantine commands ------------------------------------------------------------


def hrx(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


def test_import_reports_each_message_and_fails_when_any_is_quarantined(
    node_dir: Path, tmp_path: Path, database: Database
) -> None:
    good = cbc("FILE-1", "F-FILE-1", None, "MRN-FILE")
    bad = set_field(cbc("FILE-2", "F-FILE-2", None, "MRN-FILE"), "OBX", 2, "ED", occurrence=2)
    as_lines = tmp_path / "results.hl7"
    as_lines.write_bytes((good + bad).replace(b"\r", b"\n"))
    framed = tmp_path / "framed.hl7"
    framed.write_bytes(frame(cbc("FILE-3", "F-FILE-3", None, "MRN-FILE")))
    result = hrx("adapters", "hl7-import", "--dir", str(node_dir), str(as_lines), str(framed))
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert any("results.hl7#1" in line and "stored: 1" in line for line in lines)
    assert any("results.hl7#2" in line and "quarantined as #" in line for line in lines)
    assert any("framed.hl7#1" in line and "stored" in line for line in lines)
    assert "3 message(s): 2 stored, 0 duplicate, 1 refused" in result.output
    again = hrx("adapters", "hl7-import", "--dir", str(node_dir), str(framed))
    assert again.exit_code == 0 and "duplicate" in again.output

    listed = hrx("adapters", "quarantine", "list", "--dir", str(node_dir), "--json")
    assert listed.exit_code == 0
    rows = [json.loads(line) for line in listed.output.splitlines()]
    [row] = [r for r in rows if r["origin"] == "results.hl7#2"]
    assert "OBX[2]-2" in row["reason"] and row["replayed_at"] is None
    shown = hrx("adapters", "quarantine", "show", "--dir", str(node_dir), str(row["id"]))
    assert shown.exit_code == 0 and "OBX|2|ED|" in shown.output
    raw = hrx("adapters", "quarantine", "show", "--dir", str(node_dir), str(row["id"]), "--raw")
    assert raw.stdout_bytes == bad  # kept byte for byte

    replayed = hrx("adapters", "quarantine", "replay", "--dir", str(node_dir), str(row["id"]))
    assert replayed.exit_code == 1 and "refused again" in replayed.output
    # the sender fixes the message and sends it under a new control ID
    fixed = tmp_path / "fixed.hl7"
    fixed.write_bytes(set_field(set_field(bad, "OBX", 2, "NM", occurrence=2), "MSH", 10, "FILE-2b"))
    assert hrx("adapters", "hl7-import", "--dir", str(node_dir), str(fixed)).exit_code == 0
    assert "FILE-2b" in {key.rsplit("|", 1)[1] for key in stored_keys(database)}
    missing = hrx("adapters", "quarantine", "replay", "--dir", str(node_dir))
    assert missing.exit_code == 2


def test_replay_stores_a_message_once_its_cause_is_fixed(
    node_dir: Path, listener: Listener, database: Database
) -> None:
    resident = resident_id("33010619900101124")
    finalise = cbc("REPLAY-2", "F-REPLAY", resident, "MRN-REPLAY")
    finalise = set_field(set_field(finalise, "OBX", 5, ""), "OBX", 11, "U")
    assert listener.send(finalise).code == "AE"
    row = _open_rows(database)[-1]
    assert row[1].startswith("AE 207 OBX[1]-11: result status U")
    preliminary = set_field(cbc("REPLAY-1", "F-REPLAY", resident, "MRN-REPLAY"), "OBX", 11, "P")
    assert listener.send(preliminary).code == "AA"
    result = hrx("adapters", "quarantine", "replay", "--dir", str(node_dir), "--all")
    assert f"#{row[0]} " in result.output and "stored" in result.output, result.output
    assert row[0] not in [r[0] for r in _open_rows(database)]


def _open_rows(database: Database) -> list[tuple[int, str]]:
    Q = quarantine_table
    with database.engine.connect() as conn:
        return [
            (row[0], row[1])
            for row in conn.execute(
                sa.select(Q.c.id, Q.c.reason).where(Q.c.replayed_at.is_(None)).order_by(Q.c.id)
            )
        ]


# -- what the node then serves --------------------------------------------------------------------


def _get(session: Any, url: str, **params: str) -> Any:
    response = session.get(url, params=params)
    assert response.status_code == 200, response.text
    return json.loads(response.text, parse_float=Decimal)


def _send_at_once(running: Listener, messages: list[bytes]) -> list[str]:
    """Each message from its own connection, all at once; the ACK codes."""
    codes: list[str] = []
    threads = [
        threading.Thread(target=lambda m=message: codes.append(running.send(m).code))
        for message in messages
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return codes


def _check_served(node: Node, directory: Path) -> None:
    race_resident = resident_id("33010619900101125")
    with listening(directory) as running:
        acks = [running.send(sample(name)) for name in ALL_SAMPLES]
        assert [a.code for a in acks] == ["AA"] * len(ALL_SAMPLES), acks
        # one message sent four times at once, and three messages for one new patient
        same = cbc("RACE-1", "F-RACE-1", race_resident, "MRN-RACE")
        one_patient = [
            cbc(f"RACE-{n}", f"F-RACE-{n}", race_resident, "MRN-RACE") for n in (2, 3, 4)
        ]
        assert _send_at_once(running, [same] * 4 + one_patient) == ["AA"] * 7
    session = node.session()
    racer = _get(session, f"{node.fhir}/Patient", identifier=f"{RESIDENT}|{race_resident}")
    assert racer["total"] == 1
    race_reports = _get(
        session, f"{node.fhir}/DiagnosticReport", patient=racer["entry"][0]["resource"]["id"]
    )
    assert race_reports["total"] == 4
    assert {e["resource"]["meta"]["versionId"] for e in race_reports["entry"]} == {"1"}
    found = _get(session, f"{node.fhir}/Patient", identifier=f"{RESIDENT}|330102197208224326")
    assert found["total"] == 1
    patient = found["entry"][0]["resource"]
    assert patient["name"][0]["text"] == "李四"
    results = _get(
        session, f"{node.fhir}/Observation", subject=f"Patient/{patient['id']}", _count="50"
    )
    assert results["total"] == 9
    by_code = {
        coding["code"]: entry["resource"]
        for entry in results["entry"]
        for coding in entry["resource"]["code"]["coding"]
    }
    creatinine = by_code["14682-9"]
    assert creatinine["status"] == "corrected"
    assert creatinine["valueQuantity"] == {
        "value": 128,
        "unit": "μmol/L",
        "system": "http://unitsofmeasure.org",
        "code": "umol/L",
    }
    assert creatinine["meta"]["versionId"] == "2"
    history = _get(session, f"{node.fhir}/Observation/{creatinine['id']}/_history")
    assert history["total"] == 2
    potassium = _get(
        session, f"{node.fhir}/Observation", patient=patient["id"], code="http://loinc.org|2823-3"
    )
    assert potassium["total"] == 1
    assert str(potassium["entry"][0]["resource"]["valueQuantity"]["value"]) == "4.10"
    reports = _get(session, f"{node.fhir}/DiagnosticReport", patient=patient["id"])
    assert reports["total"] == 1
    report = reports["entry"][0]["resource"]
    assert report["status"] == "corrected" and len(report["result"]) == 9
    other = _get(session, f"{node.fhir}/Patient", identifier=f"{RESIDENT}|330106198503150016")
    wbc = _get(
        session,
        f"{node.fhir}/Observation",
        patient=other["entry"][0]["resource"]["id"],
        code="http://loinc.org|6690-2",
    )["entry"][0]["resource"]
    assert wbc["valueQuantity"]["code"] == "10*9/L"
    assert wbc["performer"][0]["display"] == "杭州市第一人民医院检验科"
    with node.database.engine.connect() as conn:  # the pseudonym index saw the new Patient
        indexed = conn.execute(
            sa.text("SELECT count(*) FROM patient_pseudonyms WHERE patient_id = :id"),
            {"id": patient["id"]},
        ).scalar_one()
    assert indexed == 1


def test_results_taken_in_are_served_by_the_node_on_sqlite(tmp_path: Path) -> None:
    with running_node(tmp_path / "hosp-a") as node:
        _check_served(node, node.directory)


@pytest.mark.postgres
def test_results_taken_in_are_served_by_the_node_on_postgresql(tmp_path: Path) -> None:
    with postgres_database() as url, running_node(tmp_path / "hosp-a", url) as node:
        _check_served(node, node.directory)
