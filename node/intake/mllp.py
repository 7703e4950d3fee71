"""HL7 v2 over MLLP: the listener ``hrx adapters hl7-listen`` runs, and a small client.

MLLP (HL7's minimal lower layer protocol) frames each message as ``0x0B message 0x1C 0x0D``
on a TCP stream; the answer comes back framed the same way on the same connection. The
listener serves many connections at once (a thread each; the messages of connections sending
at the same time share a write transaction and its commit, so N senders cost about one commit
per N messages: :mod:`fhir_adapters.store.group_commit`), answers each complete frame with the
ACK :class:`node.intake.hl7.Hl7Intake` gives it — AA only once the message is committed — and
logs one line per message.

It never dies on what a sender does: a frame longer than ``max_bytes`` is read to its end and
answered AR (its head quarantined); bytes outside frames are skipped (and logged); a frame left
unfinished (the connection closed, the read timed out, or a new frame began inside it) is
dropped unanswered, never stored, so the sender sends it again whole. A connection idle for
``idle_timeout`` seconds, or stalled inside a frame for ``read_timeout``, is closed. SIGTERM and
SIGINT stop accepting, let the messages being stored finish and answer, and exit.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import socketserver
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from fhir_adapters.hl7v2 import Hl7Error, build_ack
from node.intake.hl7 import Hl7Intake

log = logging.getLogger("hrx.hl7")

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c"
CARRIAGE_RETURN = b"\x0d"
DEFAULT_PORT = 2575  # IANA: HL7 over MLLP
DEFAULT_MAX_BYTES = 1 << 20
DEFAULT_IDLE_TIMEOUT = 600.0
DEFAULT_READ_TIMEOUT = 30.0
RECEIVE_SIZE = 65536


def frame(message: bytes) -> bytes:
    return START_BLOCK + message + END_BLOCK + CARRIAGE_RETURN


@dataclass(frozen=True)
class Frame:
    """A complete frame: the message, or for one too long its head and full size."""

    payload: bytes
    size: int
    oversized: bool = False


class FrameReader:
    """Cuts a byte stream into MLLP frames, holding at most ``max_bytes`` of any one."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.in_frame = False
        self.buffer = bytearray()
        self.size = 0
        self.skipped = 0  # bytes outside frames, and of frames dropped unfinished
        self.dropped = 0  # frames dropped unfinished
        self._after_end = False  # the 0x0D after 0x1C may come in the next chunk

    def feed(self, data: bytes) -> Iterator[Frame]:
        position = 0
        if self._after_end and data[:1] == CARRIAGE_RETURN:
            position = 1
        self._after_end = False
        while position < len(data):
            if not self.in_frame:
                start = data.find(START_BLOCK, position)
                if start < 0:
                    self.skipped += len(data) - position
                    return
                self.skipped += start - position
                self.in_frame, self.size = True, 0
                self.buffer.clear()
                position = start + 1
                continue
            end = data.find(END_BLOCK, position)
            restart = data.find(START_BLOCK, position)
            if restart >= 0 and (end < 0 or restart < end):
                # a new frame began before this one ended: drop this one, unanswered
                self._take(data[position:restart])
                self.drop()
                position = restart
                continue
            if end < 0:
                self._take(data[position:])
                return
            self._take(data[position:end])
            position = end + 1
            if data[position : position + 1] == CARRIAGE_RETURN:
                position += 1
            elif position == len(data):
                self._after_end = True
            self.in_frame = False
            yield Frame(bytes(self.buffer), self.size, self.size > self.max_bytes)
            self.buffer.clear()

    def _take(self, chunk: bytes) -> None:
        self.size += len(chunk)
        room = self.max_bytes - len(self.buffer)
        if room > 0:
            self.buffer += chunk[:room]

    def drop(self) -> None:
        """Forget an unfinished frame."""
        if self.in_frame:
            self.skipped += self.size
            self.dropped += 1
        self.in_frame, self.size = False, 0
        self.buffer.clear()


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = False  # server_close waits for connections storing a message
    block_on_close = True
    listener: Hl7Listener


class _Connection(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        self.server.listener.serve_connection(self.request, self.client_address)


class Hl7Listener:
    """An MLLP server feeding one node's :class:`Hl7Intake`."""

    def __init__(
        self,
        intake: Hl7Intake,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
    ) -> None:
        self.intake = intake
        self.max_bytes = max_bytes
        self.idle_timeout = idle_timeout
        self.read_timeout = read_timeout
        self.stopping = threading.Event()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.server = _Server((host, port), _Connection)
        self.server.listener = self

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def serve_forever(self) -> None:
        self.server.serve_forever(poll_interval=0.2)

    def stop(self) -> None:
        """Stop accepting; end every connection once its current message is answered."""
        self.stopping.set()
        self.server.shutdown()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):  # its reader sees the end; it can still write
                    sock.shutdown(socket.SHUT_RD)
        self.server.server_close()

    def serve_connection(self, sock: socket.socket, address: Any) -> None:
        peer = f"{address[0]}:{address[1]}"
        reader = FrameReader(self.max_bytes)
        with self._lock:
            self._open.add(sock)
        log.info("%s connected", peer)
        try:
            while not self.stopping.is_set():
                sock.settimeout(self.read_timeout if reader.in_frame else self.idle_timeout)
                try:
                    data = sock.recv(RECEIVE_SIZE)
                except TimeoutError:
                    state = "inside a frame" if reader.in_frame else "idle"
                    log.info("%s closed: %s for too long", peer, state)
                    break
                except OSError as exc:
                    log.info("%s closed: %s", peer, exc)
                    break
                if not data:
                    break
                skipped = reader.skipped
                for complete in reader.feed(data):
                    self._answer(sock, peer, complete)
                if reader.skipped > skipped:
                    log.warning(
                        "%s: %d byte(s) outside MLLP frames ignored", peer, reader.skipped - skipped
                    )
        finally:
            if reader.in_frame:
                log.warning(
                    "%s: an unfinished message (%d bytes) dropped unanswered", peer, reader.size
                )
            with self._lock:
                self._open.discard(sock)
            log.info("%s disconnected", peer)

    def _answer(self, sock: socket.socket, peer: str, complete: Frame) -> None:
        try:
            if complete.oversized:
                outcome = self.intake.refuse_oversized(
                    complete.payload, complete.size, self.max_bytes, peer
                )
            else:
                outcome = self.intake.take_in(complete.payload, peer)
        except Exception:  # the intake answers every message; this is the last resort
            log.exception("%s: a message could not be handled", peer)
            error = Hl7Error("AE", 207, "internal error; the message was not stored, send it again")
            ack, key = build_ack(None, "AE", error=error), None
            log.info("%s - AE not stored: %s", peer, error.reason)
        else:
            ack, key = outcome.ack, outcome.key
            log.info("%s %s %s %s", peer, key or "-", outcome.ack_code, outcome.log_summary())
        try:
            sock.sendall(frame(ack))
        except OSError as exc:
            log.warning("%s: the ACK for %s could not be sent: %s", peer, key or "-", exc)


def serve(
    intake: Hl7Intake,
    host: str,
    port: int,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    ready: Callable[[tuple[str, int]], None] | None = None,
) -> None:
    """Run a listener until SIGTERM or SIGINT (call from the main thread)."""
    listener = Hl7Listener(
        intake,
        host,
        port,
        max_bytes=max_bytes,
        idle_timeout=idle_timeout,
        read_timeout=read_timeout,
    )
    stop = threading.Event()
    previous = {
        signum: signal.signal(signum, lambda *_: stop.set())
        for signum in (signal.SIGTERM, signal.SIGINT)
    }
    thread = threading.Thread(target=listener.serve_forever, name="mllp-accept", daemon=True)
    thread.start()
    try:
        if ready is not None:
            ready(listener.address)
        while not stop.wait(0.5):
            pass
        log.info("stopping: letting the messages in hand finish")
    finally:
        listener.stop()
        thread.join()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# -- the client side ---------------------------------------------------------------------------


class MllpError(Exception):
    """The peer closed the connection, or sent something that is not an MLLP frame."""


class MllpClient:
    """One MLLP connection: send a message, get its ACK (unframed), as often as needed."""

    def __init__(self, host: str, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.reader = FrameReader(DEFAULT_MAX_BYTES)
        self.pending: list[Frame] = []

    def send(self, message: bytes) -> bytes:
        self.sock.sendall(frame(message))
        return self.receive()

    def send_raw(self, data: bytes) -> None:
        """Bytes as they are (for tests of what a broken sender does)."""
        self.sock.sendall(data)

    def receive(self) -> bytes:
        """The next frame the listener sends."""
        while not self.pending:
            data = self.sock.recv(RECEIVE_SIZE)
            if not data:
                raise MllpError("the listener closed the connection before answering")
            self.pending.extend(self.reader.feed(data))
        return self.pending.pop(0).payload

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> MllpClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def send(host: str, port: int, message: bytes, timeout: float = 30.0) -> bytes:
    """Send one message over a new MLLP connection; its ACK, unframed."""
    with MllpClient(host, port, timeout) as client:
        return client.send(message)


def send_many(host: str, port: int, messages: list[bytes], timeout: float = 30.0) -> list[bytes]:
    """Send messages one after another over one connection; their ACKs, in order."""
    with MllpClient(host, port, timeout) as client:
        return [client.send(message) for message in messages]
