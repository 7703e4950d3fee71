"""Entries and block headers exactly as docs/spec.md §2 and §4 define them."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import pytest
import rfc8785

from ledger.errors import EntryError
from ledger.model import (
    ZERO_HASH,
    block_hash,
    check_entry,
    check_header,
    entry_data,
    format_time,
    make_entry,
    make_header,
    parse_time,
)

ENTRY = {
    "v": 1,
    "chain": "hosp-a",
    "seq": 41,
    "time": "2026-11-22T08:00:00.000Z",
    "type": "consent.granted",
    "body": {"consent_id": "c-1", "grantees": ["*"]},
}


def test_entry_leaf_data_is_jcs() -> None:
    entry = make_entry("hosp-a", 41, "2026-11-22T08:00:00.000Z", "consent.granted", ENTRY["body"])
    assert entry == ENTRY
    assert entry_data(entry) == rfc8785.dumps(ENTRY)
    assert entry_data(entry).startswith(b'{"body":{"consent_id":"c-1"')


@pytest.mark.parametrize("entry_type", ["consent.granted", "a.b.c", "result.recognized"])
def test_entry_types_accepted(entry_type: str) -> None:
    check_entry({**ENTRY, "type": entry_type})


@pytest.mark.parametrize(
    "entry_type", ["consent", "Consent.granted", "consent.", ".x", "a..b", "a.b1", "a.b\n", ""]
)
def test_entry_types_refused(entry_type: str) -> None:
    with pytest.raises(EntryError, match="entry type"):
        check_entry({**ENTRY, "type": entry_type})


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"body": {"fee": 1.0}}, "floating-point"),
        ({"body": {"é": 1}}, "not ASCII"),
        ({"body": [1]}, "must be a JSON object, not an array"),
        ({"body": "x"}, "not a string"),
        ({"seq": -1}, "seq"),
        ({"seq": True}, "seq"),
        ({"v": 2}, "version"),
        ({"time": "2026-11-22T08:00:00Z"}, "milliseconds"),
        ({"time": "2026-11-22T08:00:00.000+08:00"}, "milliseconds"),
        ({"chain": "Hosp A"}, "chain id"),
        ({"extra": 1}, "entry fields"),
    ],
)
def test_malformed_entries_refused(change: dict[str, Any], problem: str) -> None:
    with pytest.raises(EntryError, match=problem.replace("(", r"\(")):
        check_entry({**ENTRY, **change})


def test_times() -> None:
    moment = datetime(2026, 11, 22, 8, 0, 0, 123456, tzinfo=UTC)
    assert format_time(moment) == "2026-11-22T08:00:00.123Z"
    assert parse_time("2026-11-22T08:00:00.123Z") == moment.replace(microsecond=123000)
    with pytest.raises(EntryError, match="not a valid date"):
        parse_time("2026-02-30T08:00:00.000Z")


def _header(**change: Any) -> dict[str, Any]:
    header = make_header(
        chain="hosp-a",
        height=7,
        prev="ab" * 32,
        time="2026-11-22T08:00:00.000Z",
        first_seq=40,
        count=3,
        tree_size=43,
        tree_root=bytes(32),
        roster=1,
    )
    header.update(change)
    return header


def test_block_hash_is_sha256_of_jcs() -> None:
    header = check_header(_header())
    assert block_hash(header) == hashlib.sha256(rfc8785.dumps(header)).digest()


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"tree_size": 44}, "is not tree_size"),
        ({"count": 0, "first_seq": 43}, "at least one entry"),
        ({"prev": ZERO_HASH}, "64 zeros exactly at height 0"),
        ({"height": 0}, "64 zeros exactly at height 0"),
        ({"prev": "AB" * 32}, "lowercase hex"),
        ({"tree_root": "00"}, "lowercase hex"),
        ({"roster": -1}, "roster"),
    ],
)
def test_malformed_headers_refused(change: dict[str, Any], problem: str) -> None:
    with pytest.raises(EntryError, match=problem):
        check_header(_header(**change))
