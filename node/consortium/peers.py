"""Asking other members, every request signed with this node's key (RFC 9421:
:mod:`node.consortium.signing`) and sent to the URL the roster gives; their JSON answers, or
:class:`~ledger.errors.PeerUnavailable` saying why."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import requests

from ledger.canonical import canonical_bytes, parse_json
from ledger.errors import LedgerError, PeerTimeout, PeerUnavailable
from ledger.store import ChainStore
from node.base.logs import REQUEST_ID_HEADER, current_request_id
from node.consortium.signing import sign_request

CONNECT_SECONDS = 2.0
READ_SECONDS = 30.0
MAX_RESPONSE_BYTES = 256 * 1024 * 1024  # a page of 200 full blocks is about 60 MB


def _read_capped(response: requests.Response) -> bytes:
    """The body, refused beyond MAX_RESPONSE_BYTES (a peer cannot exhaust our memory)."""
    chunks, size = [], 0
    for chunk in response.iter_content(1 << 20):
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            response.close()
            raise requests.RequestException(f"answer over {MAX_RESPONSE_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class SignedPeers:
    """Fetches ledger JSON from members, each request signed with this node's key."""

    def __init__(
        self, store: ChainStore, own: str, key: Any, *, timeout: float = READ_SECONDS
    ) -> None:
        self.store = store
        self.own = own
        self.key = key
        self.timeout = timeout  # for each request
        self.session = requests.Session()

    def _request(self, member: str, method: str, path: str, value: Any = None) -> Any:
        """A signed request to a member; its JSON answer, or PeerUnavailable saying why
        (the member's own message included)."""
        content = self.fetch(member, method, path, value, self.timeout)
        try:
            return parse_json(content)
        except LedgerError as exc:
            raise PeerUnavailable(f"{member} sent what is not JSON: {exc}") from None

    def fetch(
        self,
        member: str,
        method: str,
        path: str,
        value: Any = None,
        timeout: float = READ_SECONDS,
        session: requests.Session | None = None,
        request_id: str | None = None,
    ) -> bytes:
        """A signed request to a member; the bytes of its 200 answer, or PeerUnavailable
        saying why. ``session``: another than this object's (one per thread). ``request_id``:
        sent as ``X-Request-ID`` (default: the ID of the request or round this thread is
        handling; a thread of a pool handles none, so work handed to one must pass it)."""
        with self._answer(member, method, path, value, timeout, session, request_id) as answer:
            return _read_capped(answer)

    def lines(
        self, member: str, path: str, value: Any, timeout: float, max_line: int
    ) -> Iterator[bytes]:
        """A signed POST to a member whose answer is NDJSON: its lines as they arrive (without
        the newline), none over ``max_line`` bytes; PeerUnavailable saying why it failed,
        whenever it fails (``timeout``: for the connection and between two reads)."""
        with self._answer(member, "POST", path, value, timeout) as answer:
            pending = b""
            for chunk in answer.iter_content(1 << 20):
                pending += chunk
                *complete, pending = pending.split(b"\n")
                if len(pending) > max_line or any(len(line) > max_line for line in complete):
                    raise PeerUnavailable(f"{member} sent a line over {max_line} bytes")
                yield from complete
            if pending:
                raise PeerUnavailable(f"{member}'s answer ended inside a line")

    @contextmanager
    def _answer(
        self,
        member: str,
        method: str,
        path: str,
        value: Any,
        timeout: float,
        session: requests.Session | None = None,
        request_id: str | None = None,
    ) -> Iterator[requests.Response]:
        """A signed request to a member, its 200 answer streaming inside the block: reading
        it fails as PeerTimeout or PeerUnavailable too; another status is PeerUnavailable
        with the member's own message."""
        try:
            base = self.store.roster().member(member)["url"].rstrip("/")
        except LedgerError as exc:
            raise PeerUnavailable(str(exc)) from None
        url = base + path
        body = b"" if value is None else canonical_bytes(value)
        headers = sign_request(
            self.own, self.key, method, url, body, {"Content-Type": "application/json"}
        )
        request_id = request_id or current_request_id()
        if request_id is not None:  # not signed (nor need it be): it only links the logs
            headers[REQUEST_ID_HEADER] = request_id
        try:
            with (session or self.session).request(
                method,
                url,
                data=body or None,
                headers=headers,
                timeout=(min(CONNECT_SECONDS, timeout), timeout),
                stream=True,
            ) as response:
                if response.status_code != 200:
                    raise PeerUnavailable(
                        f"{member} answered {response.status_code}: "
                        + _read_capped(response)[:300].decode("utf-8", "replace")
                    )
                yield response
        except requests.Timeout:
            raise PeerTimeout(f"{member} at {base} did not answer within {timeout:g} s") from None
        except requests.RequestException as exc:
            raise PeerUnavailable(f"{member} at {base}: {type(exc).__name__}") from None

    def fetch_json(self, member: str, method: str, path: str, value: Any, timeout: float) -> Any:
        """A signed request with its own timeout; its JSON answer."""
        content = self.fetch(member, method, path, value, timeout)
        try:
            return parse_json(content)
        except LedgerError as exc:
            raise PeerUnavailable(f"{member} sent what is not JSON: {exc}") from None

    def get(self, member: str, path: str) -> Any:
        """GET from a member; its JSON answer."""
        return self._request(member, "GET", path)

    def post(self, member: str, path: str, value: Any) -> Any:
        """POST canonical JSON to a member; its JSON answer."""
        return self._request(member, "POST", path, value)

    def heads(self, member: str) -> dict[str, Any]:
        heads = self.get(member, "/ledger/heads")
        if not isinstance(heads, dict):
            raise PeerUnavailable(f"{member}: /ledger/heads is not a JSON object")
        return heads

    def blocks(self, member: str, chain: str, start: int, limit: int) -> list[dict[str, Any]]:
        blocks = self.get(member, f"/ledger/chains/{chain}/blocks?from={start}&limit={limit}")
        if not isinstance(blocks, list):
            raise PeerUnavailable(f"{member}: blocks are not a JSON array")
        return blocks
