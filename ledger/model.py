"""Entries, block headers and blocks exactly as docs/spec.md §2 and §4 define them, and their
checks.

An entry is one ledger event and one Merkle leaf; its leaf data is ``JCS(entry)``. A block
header commits a batch of consecutive entries of one chain: its height, the hash of the
previous header, the range of ``seq`` it adds and the RFC 9162 root of the chain's whole tree
after them. The header's hash is ``SHA-256(JCS(header))`` and the chain's owner signs
``b"hrx/block/v1\\x00" || hash``. Objects here are plain JSON dicts: what is checked is what
goes on the wire.

Rules that §3 leaves open and hrx fixes (checked by :mod:`ledger.verify`):

- a chain id (a member id) is 1-64 characters of ``a-z 0-9 . _ -``, starting with a letter
  or digit;
- an entry type matches ``^[a-z]+(\\.[a-z]+)+$``; a body is a JSON object;
- a block holds at least one entry, and block times never go backwards along a chain; an
  entry's time is not later than its block's time.
"""

from __future__ import annotations

import functools
import hashlib
import re
import time
from datetime import UTC, datetime
from typing import Any

from ledger.canonical import canonical_bytes
from ledger.errors import CanonicalError, EntryError

VERSION = 1
ZERO_HASH = "0" * 64

ENTRY_KEYS = frozenset({"v", "chain", "seq", "time", "type", "body"})
HEADER_KEYS = frozenset(
    {
        "v",
        "chain",
        "height",
        "prev",
        "time",
        "first_seq",
        "count",
        "tree_size",
        "tree_root",
        "roster",
    }
)
BLOCK_KEYS = frozenset({"header", "signature", "entries"})

ENTRY_TYPE = re.compile(r"[a-z]+(\.[a-z]+)+")
CHAIN_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
HEX_HASH = re.compile(r"[0-9a-f]{64}")
TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z", re.ASCII)

Entry = dict[str, Any]
Header = dict[str, Any]
Block = dict[str, Any]


def format_time(moment: datetime | None = None) -> str:
    """RFC 3339 UTC with milliseconds and ``Z``: ``2026-11-22T08:00:00.000Z`` (default: now)."""
    if moment is None:  # every append asks: keep it cheap
        seconds, milliseconds = divmod(time.time_ns() // 1_000_000, 1000)
        return f"{_utc_second(seconds)}.{milliseconds:03d}Z"
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@functools.lru_cache(maxsize=8)
def _utc_second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def parse_time(text: Any, what: str = "time") -> datetime:
    """The moment a ledger time names; anything but the exact §3 form is an error."""
    if not isinstance(text, str) or not TIME.fullmatch(text):
        raise EntryError(f"{what} {text!r} is not RFC 3339 UTC with milliseconds and Z")
    try:
        return datetime.fromisoformat(text[:-1]).replace(tzinfo=UTC)
    except ValueError as exc:
        raise EntryError(f"{what} {text!r} is not a valid date and time") from exc


def check_chain_id(chain: Any) -> str:
    if not isinstance(chain, str) or not CHAIN_ID.fullmatch(chain):
        raise EntryError(
            f"chain id {chain!r} must be 1-64 characters of a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return chain


def check_entry_type(entry_type: Any) -> str:
    if not isinstance(entry_type, str) or not ENTRY_TYPE.fullmatch(entry_type):
        raise EntryError(
            f"entry type {entry_type!r} must be dotted lowercase words, e.g. consent.granted"
        )
    return entry_type


def check_body(body: Any) -> dict[str, Any]:
    """A body must be a JSON object within the ledger's JSON subset (no floats, ASCII keys)."""
    if not isinstance(body, dict):
        raise EntryError(f"entry body must be a JSON object, not {_json_kind(body)}")
    try:
        canonical_bytes(body, "body")
    except CanonicalError as exc:
        raise EntryError(str(exc)) from exc
    return body


def make_entry(chain: str, seq: int, time: str, entry_type: str, body: dict[str, Any]) -> Entry:
    check_chain_id(chain)
    check_entry_type(entry_type)
    check_body(body)
    return {
        "v": VERSION,
        "chain": chain,
        "seq": seq,
        "time": time,
        "type": entry_type,
        "body": body,
    }


def _is_count(value: Any) -> bool:
    return type(value) is int and 0 <= value <= 2**53 - 1


def check_entry(entry: Any) -> Entry:
    """Raise :class:`EntryError` unless ``entry`` is a well-formed version-1 entry."""
    if not isinstance(entry, dict):
        raise EntryError(f"an entry must be a JSON object, not {_json_kind(entry)}")
    if entry.keys() != ENTRY_KEYS:
        raise EntryError(f"entry fields are {sorted(entry)}, expected {sorted(ENTRY_KEYS)}")
    if entry["v"] != VERSION or type(entry["v"]) is not int:
        raise EntryError(f"entry version {entry['v']!r} is not {VERSION}")
    check_chain_id(entry["chain"])
    if not _is_count(entry["seq"]):
        raise EntryError(f"entry seq {entry['seq']!r} is not a non-negative integer")
    parse_time(entry["time"], "entry time")
    check_entry_type(entry["type"])
    check_body(entry["body"])
    return entry


def entry_data(entry: Entry) -> bytes:
    """The Merkle leaf data of an entry: ``JCS(entry)``."""
    return canonical_bytes(entry)


def make_header(
    *,
    chain: str,
    height: int,
    prev: str,
    time: str,
    first_seq: int,
    count: int,
    tree_size: int,
    tree_root: bytes,
    roster: int,
) -> Header:
    return {
        "v": VERSION,
        "chain": chain,
        "height": height,
        "prev": prev,
        "time": time,
        "first_seq": first_seq,
        "count": count,
        "tree_size": tree_size,
        "tree_root": tree_root.hex(),
        "roster": roster,
    }


def check_header(header: Any) -> Header:
    """Raise :class:`EntryError` unless ``header`` is a well-formed version-1 block header."""
    if not isinstance(header, dict):
        raise EntryError(f"a block header must be a JSON object, not {_json_kind(header)}")
    if header.keys() != HEADER_KEYS:
        raise EntryError(f"header fields are {sorted(header)}, expected {sorted(HEADER_KEYS)}")
    if header["v"] != VERSION or type(header["v"]) is not int:
        raise EntryError(f"header version {header['v']!r} is not {VERSION}")
    check_chain_id(header["chain"])
    for field in ("height", "first_seq", "count", "tree_size", "roster"):
        if not _is_count(header[field]):
            raise EntryError(f"header {field} {header[field]!r} is not a non-negative integer")
    for field in ("prev", "tree_root"):
        if not isinstance(header[field], str) or not HEX_HASH.fullmatch(header[field]):
            raise EntryError(f"header {field} {header[field]!r} is not 64 lowercase hex digits")
    parse_time(header["time"], "block time")
    if header["count"] < 1:
        raise EntryError("a block holds at least one entry")
    if header["first_seq"] + header["count"] != header["tree_size"]:
        raise EntryError(
            f"first_seq {header['first_seq']} + count {header['count']} "
            f"is not tree_size {header['tree_size']}"
        )
    if (header["height"] == 0) != (header["prev"] == ZERO_HASH):
        raise EntryError("prev is 64 zeros exactly at height 0")
    return header


def block_hash(header: Header) -> bytes:
    """``SHA-256(JCS(header))``, raw 32 bytes."""
    return hashlib.sha256(canonical_bytes(header)).digest()


def block_bytes(entry_data: list[bytes], header_bytes: bytes, signature: str) -> bytes:
    """``JCS({"entries", "header", "signature"})`` of a block, from the canonical bytes of its
    entries and header (canonical JSON nests: a container's form holds its members' forms)."""
    return (
        b'{"entries":['
        + b",".join(entry_data)
        + b'],"header":'
        + header_bytes
        + b',"signature":'
        + canonical_bytes(signature)
        + b"}"
    )


def check_block_shape(block: Any) -> Block:
    """The outer shape of a block on the wire: ``{"header", "signature", "entries"}``."""
    if not isinstance(block, dict) or block.keys() != BLOCK_KEYS:
        raise EntryError('a block is {"header": ..., "signature": ..., "entries": [...]}')
    if not isinstance(block["signature"], str):
        raise EntryError("block signature is not a string")
    if not isinstance(block["entries"], list):
        raise EntryError("block entries are not a list")
    return block


def _json_kind(value: Any) -> str:
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "a number"
    return kinds.get(type(value), type(value).__name__)
