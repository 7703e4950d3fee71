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

One process takes one core (Python's GIL), and a message's parsing, mapping and validation are
most of its cost; :func:`serve_processes` runs several listener processes behind one port: the
first process accepts every connection and hands it (its file descriptor, over a Unix socket)
to the listener process serving the fewest connections, which stores its messages as above.
Their writes then share the database as any two writers do (SQLite's write lock, PostgreSQL's
row locks); each message is still acknowledged only once committed.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import select
import selectors
import signal
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from fhir_adapters.hl7v2 import Hl7Error, build_ack
from node.base.errors import NodeError
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
        self.server: _Server | None = None
        if port >= 0:  # (a listener process of serve_processes is handed its connections)
            self.server = _Server((host, port), _Connection)
            self.server.listener = self

    @property
    def address(self) -> tuple[str, int]:
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def serve_forever(self) -> None:
        assert self.server is not None
        self.server.serve_forever(poll_interval=0.2)

    def stop(self) -> None:
        """Stop accepting; end every connection once its current message is answered."""
        self.stopping.set()
        if self.server is not None:
            self.server.shutdown()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):  # its reader sees the end; it can still write
                    sock.shutdown(socket.SHUT_RD)
        if self.server is not None:
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


# -- several listener processes behind one port ------------------------------------------------

READY = b"r"  # a listener process to the first: it serves
CLOSED = b"c"  # a listener process to the first: one of its connections ended
START_SECONDS = 120.0  # how long a listener process may take to open the node
RESTART_SECONDS = 5  # between tries to start again a listener process that could not start


@dataclass
class _Process:
    """A listener process, as the accepting process sees it."""

    number: int
    process: Any  # multiprocessing's Process
    channel: socket.socket  # Unix SEQPACKET: connections to it, READY and CLOSED back
    connections: int = 0
    ready: bool = False


def serve_processes(
    open_intake: Callable[[], tuple[Hl7Intake, Callable[[], None]]],
    host: str,
    port: int,
    processes: int,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    ready: Callable[[tuple[str, int]], None] | None = None,
) -> None:
    """Run ``processes`` listener processes behind one port until SIGTERM or SIGINT (see the
    module docstring). Call from the main thread of a process that has started no other thread
    and holds no database connection: the listener processes are forked from it, and each
    opens the node itself with ``open_intake`` (its intake, and what closes it). A listener
    process that dies is replaced; its connections end, unanswered messages unstored, and
    their senders send them again. A replacement that cannot start (the node cannot be opened:
    a key file moved, the database down) is tried again every :data:`RESTART_SECONDS` while the
    others serve; while none is running, connections wait in the port's backlog."""
    listening = socket.create_server((host, port), backlog=128)
    options = {"max_bytes": max_bytes, "idle_timeout": idle_timeout, "read_timeout": read_timeout}
    stop = threading.Event()
    previous = {
        signum: signal.signal(signum, lambda *_: stop.set())
        for signum in (signal.SIGTERM, signal.SIGINT)
    }
    running: list[_Process] = []

    def start(number: int) -> _Process:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        inherited = [listening, ours, *(p.channel for p in running)]
        process = multiprocessing.get_context("fork").Process(
            target=_listener_process,
            args=(number, theirs, inherited, open_intake, options),
            name=f"hl7-listen-{number}",
        )
        process.start()
        theirs.close()
        return _Process(number, process, ours)

    def restart(number: int) -> bool:
        """Start listener process ``number`` again; whether it is serving."""
        replacement = start(number)
        try:
            _await_ready([replacement], stop)
        except NodeError as exc:
            if replacement.process.is_alive():
                replacement.process.terminate()
            replacement.process.join()
            replacement.channel.close()
            log.error("%s; trying again in %d s", exc, RESTART_SECONDS)
            return False
        running.append(replacement)
        running.sort(key=lambda worker: worker.number)
        selector.register(replacement.channel, selectors.EVENT_READ, replacement)
        return True

    selector = selectors.DefaultSelector()
    restarts: dict[int, float] = {}  # listener processes to start again: when
    accepting = False
    try:
        for number in range(1, processes + 1):
            running.append(start(number))
        _await_ready(running, stop)
        for worker in running:
            selector.register(worker.channel, selectors.EVENT_READ, worker)
        listening.setblocking(False)
        if ready is not None:
            host_name, port_number = listening.getsockname()[:2]
            ready((str(host_name), int(port_number)))
        while not stop.is_set():
            for number, when in sorted(restarts.items()):
                if time.monotonic() >= when and not stop.is_set():
                    if restart(number):
                        del restarts[number]
                    else:
                        restarts[number] = time.monotonic() + RESTART_SECONDS
            if bool(running) != accepting:  # no listener process: connections wait
                if running:
                    selector.register(listening, selectors.EVENT_READ, None)
                else:
                    selector.unregister(listening)
                accepting = bool(running)
            for key, _ in selector.select(0.5):
                worker = key.data
                if worker is None:
                    _hand_over(listening, running)
                    continue
                try:
                    news = worker.channel.recv(16)
                except OSError:
                    news = b""
                if news == CLOSED:
                    worker.connections -= 1
                elif not news and not stop.is_set():  # it died: another takes its place
                    selector.unregister(worker.channel)
                    worker.channel.close()
                    worker.process.join()
                    log.error(
                        "listener process %d ended (exit code %s); starting another",
                        worker.number,
                        worker.process.exitcode,
                    )
                    running.remove(worker)
                    restarts[worker.number] = time.monotonic()
        log.info("stopping: letting the messages in hand finish")
    finally:
        selector.close()
        listening.close()
        for worker in running:
            if worker.process.is_alive():
                worker.process.terminate()
            # its channel's end stops it too: one signalled before it set its own handler
            # (forked with this process's) missed the signal, and waits for that
            worker.channel.close()
        for worker in running:
            worker.process.join()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _await_ready(workers: list[_Process], stop: threading.Event) -> None:
    deadline = time.monotonic() + START_SECONDS
    for worker in workers:
        while not worker.ready:
            if stop.is_set():
                return
            if time.monotonic() > deadline:
                raise NodeError(f"listener process {worker.number} did not start in time")
            if select.select([worker.channel], [], [], 0.5)[0]:
                if worker.channel.recv(16) != READY:
                    worker.process.join()
                    raise NodeError(
                        f"listener process {worker.number} could not start (exit code "
                        f"{worker.process.exitcode}): see its log lines"
                    )
                worker.ready = True


def _hand_over(listening: socket.socket, running: list[_Process]) -> None:
    """Accept a connection and hand it to the listener process serving the fewest."""
    if not running:
        return  # it waits in the backlog for one
    try:
        sock, address = listening.accept()
    except (BlockingIOError, InterruptedError):
        return
    except OSError as exc:  # e.g. out of file descriptors: the next try may work
        log.warning("a connection could not be accepted: %s", exc)
        return
    try:
        worker = min(running, key=lambda w: (w.connections, w.number))
        peer = f"{address[0]} {address[1]}".encode()
        try:
            socket.send_fds(worker.channel, [peer], [sock.fileno()])
        except OSError as exc:
            log.warning("a connection could not be handed to a listener process: %s", exc)
            return
        worker.connections += 1
    finally:
        sock.close()  # the listener process holds its own copy


def _listener_process(
    number: int,
    channel: socket.socket,
    inherited: list[socket.socket],
    open_intake: Callable[[], tuple[Hl7Intake, Callable[[], None]]],
    options: dict[str, Any],
) -> None:
    """A listener process: serves the connections handed to it until SIGTERM, SIGINT or the
    accepting process's end."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    for sock in inherited:  # the accepting process's sockets: not this process's to hold
        sock.close()
    intake, close = open_intake()
    listener = Hl7Listener(intake, port=-1, **options)
    sending = threading.Lock()
    threads: list[threading.Thread] = []

    def tell(news: bytes) -> None:
        with sending, contextlib.suppress(OSError):
            channel.send(news)

    def serve_one(sock: socket.socket, address: tuple[str, int]) -> None:
        try:
            with sock:
                listener.serve_connection(sock, address)
        finally:
            tell(CLOSED)

    try:
        tell(READY)
        while not stop.is_set():
            if not select.select([channel], [], [], 0.5)[0]:
                continue
            try:
                data, fds, _flags, _address = socket.recv_fds(channel, 512, 1)
            except InterruptedError:
                continue
            except OSError:
                break
            if not data and not fds:
                break  # the accepting process is gone
            for fd in fds:
                host, _, port_text = data.decode().rpartition(" ")
                sock = socket.socket(fileno=fd)
                log.info("%s:%s handed to listener process %d", host, port_text, number)
                thread = threading.Thread(
                    target=serve_one, args=(sock, (host, int(port_text))), daemon=False
                )
                thread.start()
                threads = [t for t in threads if t.is_alive()] + [thread]
    finally:
        listener.stop()
        for thread in threads:
            thread.join()
        close()
        channel.close()


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
