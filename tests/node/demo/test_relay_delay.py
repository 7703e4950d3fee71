"""The harness's relay (node.demo.harness.Relay): with a delay, a round trip through it takes
at least twice the delay, chunks keep their order, and it still cuts and heals."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import suppress

import pytest

from node.demo.harness import Relay, member_names
from node.demo.nodes import free_port


@pytest.fixture
def echo() -> Iterator[int]:
    """A TCP echo server on 127.0.0.1; yields its port."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stopped = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn, suppress(OSError):
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while not stopped.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stopped.set()
    thread.join(timeout=2)
    server.close()


def round_trip(port: int, message: bytes) -> tuple[bytes, float]:
    """Send ``message`` and read as many bytes back; what came back, and the seconds it took."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        started = time.monotonic()
        conn.sendall(message)
        received = b""
        while len(received) < len(message):
            data = conn.recv(65536)
            if not data:
                break
            received += data
        return received, time.monotonic() - started


def test_a_delayed_relay_delays_each_round_trip_and_keeps_order(echo: int) -> None:
    relay = Relay(free_port(), echo, delay=0.15)
    try:
        received, seconds = round_trip(relay.listen, b"ping")
        assert received == b"ping"
        assert seconds >= 0.25  # 0.15 s each way; only a lower bound: the machine may be slow
        with socket.create_connection(("127.0.0.1", relay.listen), timeout=10) as conn:
            chunks = [f"chunk {n};".encode() for n in range(50)]
            for chunk in chunks:  # many small writes, forwarded as they come
                conn.sendall(chunk)
            expected = b"".join(chunks)
            received = b""
            while len(received) < len(expected):
                data = conn.recv(65536)
                assert data, "the relay closed the connection"
                received += data
            assert received == expected
    finally:
        relay.close()


def test_a_delayed_relay_still_cuts_and_heals(echo: int) -> None:
    relay = Relay(free_port(), echo, delay=0.05)
    try:
        held = socket.create_connection(("127.0.0.1", relay.listen), timeout=10)
        held.sendall(b"before")
        assert held.recv(65536) == b"before"
        relay.set_cut(True)
        with suppress(OSError):  # the open connection is dropped: it ends or fails
            held.sendall(b"during")
            assert held.recv(65536) == b""
        held.close()
        with (
            socket.create_connection(("127.0.0.1", relay.listen), timeout=10) as conn,
            suppress(OSError),  # a new one is closed at once
        ):
            conn.sendall(b"during")
            assert conn.recv(65536) == b""
        relay.set_cut(False)
        received, seconds = round_trip(relay.listen, b"after")
        assert received == b"after"
        assert seconds >= 0.08
    finally:
        relay.close()


def test_member_names_go_on_past_z() -> None:
    names = member_names(30)
    assert names[:3] == ["hosp-a", "hosp-b", "hosp-c"]
    assert names[25:] == ["hosp-z", "hosp-aa", "hosp-ab", "hosp-ac", "hosp-ad"]
    assert len(set(member_names(800))) == 800
