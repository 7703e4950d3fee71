"""A consortium of real nodes on this machine, for tests, benchmarks and the demo.

:class:`Consortium` creates N member nodes in one directory (``hrx node init``, a roster
signed by a local authority, ``hrx node join``: the same setup code, called directly), runs
each as separate processes — the web
server (``hrx node serve``) and the replication worker (``hrx node replicate``) — and stops
them. Every member's roster URL points at a small TCP relay in front of its web server, so a
test can cut a member off (its relay drops every connection, and its own replication worker
is paused, so it neither hears nor is heard) and heal it again, and a benchmark can put a
network's round trip between members (``relay_delay``: each relay holds what it forwards for
that long in each direction). Members are named hosp-a ... hosp-z, then hosp-aa, hosp-ab ...
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import requests

from ledger.store import ChainStore
from node.base.config import load_config
from node.db.engines import open_database
from node.demo.nodes import form_consortium, free_port
from node.identity.tokens import issue_token
from node.identity.users import add_user, get_user
from node.ops.setup import init_node

ROOT = Path(__file__).resolve().parents[2]


def member_names(size: int) -> list[str]:
    """hosp-a ... hosp-z, then hosp-aa ... hosp-az, hosp-ba ... (as spreadsheet columns)."""
    names = []
    for number in range(size):
        letters = ""
        number += 1
        while number:
            number, rest = divmod(number - 1, 26)
            letters = chr(ord("a") + rest) + letters
        names.append(f"hosp-{letters}")
    return names


class Relay:
    """A TCP relay 127.0.0.1:listen -> 127.0.0.1:target that can drop everything.

    ``delay`` (seconds, may be changed while it runs): every chunk forwarded, either way, is
    sent that long after it came in, so a request and its answer take ``2 * delay`` more (a
    network's round trip); connecting to the relay is not delayed. Each direction of each
    connection has its own reader and sender threads, so connections never wait for each
    other, and chunks keep their order within a connection."""

    def __init__(self, listen: int, target: int, delay: float = 0.0) -> None:
        self.listen, self.target = listen, target
        self.delay = delay
        self.cut = False
        self._server = socket.create_server(("127.0.0.1", listen), reuse_port=False)
        self._server.settimeout(0.2)
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._server.accept()
            except OSError:
                continue
            if self.cut:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            for sock in (client, upstream):  # no Nagle delay: the relay must not add latency
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._open.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                if self.delay > 0:
                    chunks: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()
                    threading.Thread(
                        target=self._read, args=(source, sink, chunks), daemon=True
                    ).start()
                    threading.Thread(
                        target=self._send, args=(source, sink, chunks), daemon=True
                    ).start()
                else:
                    threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while not self.cut:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            self._close(source, sink)

    def _read(
        self,
        source: socket.socket,
        sink: socket.socket,
        chunks: queue.SimpleQueue[tuple[float, bytes]],
    ) -> None:
        """One direction of a delayed connection: what comes in, stamped with when it is due."""
        try:
            while not self.cut:
                data = source.recv(65536)
                if not data:
                    break
                chunks.put((time.monotonic() + self.delay, data))
        except OSError:
            pass
        finally:
            chunks.put((time.monotonic() + self.delay, b""))  # the end: close once it is due

    def _send(
        self,
        source: socket.socket,
        sink: socket.socket,
        chunks: queue.SimpleQueue[tuple[float, bytes]],
    ) -> None:
        """Forward each chunk once it is due, in order; at the end (or when cut) close both."""
        try:
            while True:
                due, data = chunks.get()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if not data or self.cut:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            self._close(source, sink)

    def _close(self, source: socket.socket, sink: socket.socket) -> None:
        for sock in (source, sink):
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        with self._lock:
            self._open.discard(source)
            self._open.discard(sink)

    def set_cut(self, cut: bool) -> None:
        self.cut = cut
        if cut:
            with self._lock:
                for sock in list(self._open):
                    with suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stopped = True
        self.set_cut(True)
        self._server.close()
        self._thread.join(timeout=2)


@dataclass
class Member:
    name: str
    directory: Path
    web_port: int
    relay: Relay
    web: subprocess.Popen[bytes] | None = None
    replicator: subprocess.Popen[bytes] | None = None
    logs: list[object] = field(default_factory=list)

    @property
    def url(self) -> str:
        """What the roster says: the relay in front of the web server."""
        return f"http://127.0.0.1:{self.relay.listen}"

    @property
    def local(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"


class Consortium:
    """N member nodes under ``root``: created, started, stopped, cut off, healed."""

    def __init__(
        self,
        root: Path,
        size: int = 3,
        *,
        quorum: int | None = None,
        epoch_seconds: int = 5,
        replicate_interval: float = 0.5,
        members_info: dict[str, dict[str, object]] | None = None,
        environment: dict[str, str] | None = None,
        display_names: dict[str, str] | None = None,
        consortium_name: str = "hrx-harness",
        witnesses: list[str] | None = None,
        registries: list[str] | None = None,
        relay_delay: float = 0.0,
    ) -> None:
        """``witnesses`` and ``registries``: the members with those roles (default: every
        member a witness, as in a roster without roles; no registry). ``relay_delay``: seconds
        each relay holds what it forwards, each way (see :class:`Relay`)."""
        self.root = root
        self.environment = environment or {}  # HRX_* settings for every member's processes
        self.epoch_seconds = epoch_seconds
        self.replicate_interval = replicate_interval
        self.members: dict[str, Member] = {}
        names = member_names(size)
        for name in names:
            web_port, relay_port = free_port(), free_port()
            directory = root / name
            init_node(
                directory,
                name,
                (display_names or {}).get(name, f"医院 {name}"),
                port=web_port,
                url=f"http://127.0.0.1:{relay_port}",
            )
            relay = Relay(relay_port, web_port, relay_delay)
            self.members[name] = Member(name, directory, web_port, relay)
        self.authority_key = root / "authority.pem"
        form_consortium(
            [m.directory for m in self.members.values()],
            roster=root / "roster.json",
            secret=root / "consortium.key",
            authority_key=self.authority_key,
            name=consortium_name,
            quorum=quorum or (len(witnesses or names) * 2 // 3 + 1),
            members_info=members_info,
            witnesses=witnesses,
            registries=registries,
        )

    def _environment(self, member: Member) -> dict[str, str]:
        return {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "HRX_CHECKPOINTS_EPOCH_SECONDS": str(self.epoch_seconds),
            **self.environment,
        }

    def start(self, name: str, *, timeout: float = 30) -> None:
        """Start the member's web server, wait (at most ``timeout`` s) until it answers, then
        start its replication worker."""
        member = self.members[name]
        log = os.fdopen(  # the node's own log: its user's alone, as the node's files are
            os.open(
                member.directory / "processes.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
            ),
            "ab",
        )
        member.logs.append(log)
        env = self._environment(member)
        member.web = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "node", "serve", "--dir", str(member.directory)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=log,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with suppress(requests.ConnectionError, requests.Timeout):  # not up, or busy starting
                if requests.get(f"{member.local}/healthz", timeout=1).status_code == 200:
                    break
            if member.web.poll() is not None:
                raise RuntimeError(f"{name}'s web server exited; see {log.name}")
            time.sleep(0.05)
        else:
            raise RuntimeError(f"{name}'s web server did not answer within {timeout} s")
        member.replicator = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "node.cli",
                "node",
                "replicate",
                "--dir",
                str(member.directory),
                "--interval",
                str(self.replicate_interval),
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=log,
        )

    def start_all(self, *, parallel: int = 1, timeout: float = 30) -> None:
        """Start every member, ``parallel`` at a time (each as :meth:`start`). When one fails
        to start, the others already starting finish, those not begun are not, and the first
        failure is raised: :meth:`close` stops whatever did start."""
        if parallel <= 1:
            for name in self.members:
                self.start(name, timeout=timeout)
            return
        pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="start")
        try:
            futures = [pool.submit(self.start, name, timeout=timeout) for name in self.members]
            for future in futures:
                future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def stop(self, name: str, *, kill: bool = False) -> None:
        self._stop([self.members[name]], kill=kill)

    def _stop(self, members: list[Member], *, kill: bool = False) -> None:
        """Signal every process of ``members`` at once, then wait for them all (at most 15 s
        together, then SIGKILL): stopping a consortium costs one member's stop, not N."""
        processes = [
            process
            for member in members
            for process in (member.replicator, member.web)
            if process is not None and process.poll() is None
        ]
        for process in processes:
            if kill:
                process.kill()
            else:
                process.terminate()
        deadline = time.monotonic() + 15
        for process in processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for member in members:
            member.web = member.replicator = None

    def cut(self, name: str) -> None:
        """Cut a member off: nobody reaches it, and it reaches nobody."""
        member = self.members[name]
        member.relay.set_cut(True)
        if member.replicator is not None:
            member.replicator.send_signal(signal.SIGSTOP)

    def heal(self, name: str) -> None:
        member = self.members[name]
        member.relay.set_cut(False)
        if member.replicator is not None:
            member.replicator.send_signal(signal.SIGCONT)

    def heads(self, name: str) -> dict[str, str]:
        store = ChainStore(self.database_url(name))
        try:
            return {chain: head.hash for chain, head in store.heads().items()}
        finally:
            store.close()

    def database_url(self, name: str) -> str:
        return load_config(self.members[name].directory).database_url

    def token(self, name: str, username: str, role: str, *, password: str | None = None) -> str:
        """A user of member ``name`` (made when missing, as ``hrx user add`` makes one) and a
        bearer token for it (as ``hrx token issue`` gives one)."""
        config = load_config(self.members[name].directory)
        database = open_database(config.database_url)
        try:
            if get_user(database.engine, username) is None:
                add_user(database.write_engine, username, role, password=password)
            return issue_token(
                config.token_key, config.fhir_base, database, username, None, config.token_ttl
            )
        finally:
            database.close()

    def converged(self) -> bool:
        views = [self.heads(name) for name in self.members]
        return bool(views[0]) and all(view == views[0] for view in views)

    def wait_converged(self, seconds: float) -> float:
        """Seconds until every member holds the same heads of every chain."""
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            if self.converged():
                return time.monotonic() - start
            time.sleep(0.05)
        raise TimeoutError(f"no convergence within {seconds} s: {self.describe()}")

    def describe(self) -> str:
        return "; ".join(
            f"{name}: " + ", ".join(f"{c}@{h[:8]}" for c, h in sorted(self.heads(name).items()))
            for name in self.members
        )

    def close(self) -> None:
        for name in self.members:
            with suppress(Exception):
                self.heal(name)
        self._stop(list(self.members.values()))
        for member in self.members.values():
            member.relay.close()
            for log in member.logs:
                log.close()  # type: ignore[attr-defined]


@contextmanager
def consortium(root: Path, size: int = 3, **options: object) -> Iterator[Consortium]:
    group = Consortium(root, size, **options)  # type: ignore[arg-type]
    try:
        group.start_all()
        yield group
    finally:
        group.close()
