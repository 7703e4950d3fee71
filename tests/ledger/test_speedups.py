"""The compiled hot paths (ledger._speedups) are held to the pure-Python ones.

The reader of canonical text may refuse what it does not decide itself, never accept what the
Python path would not: on generated values, on every one-byte change of canonical lines, and
on the escapes, numbers and UTF-8 forms that canonical text must or must not hold, whatever it
accepts is canonical by the reference (orjson's parse, written again with sorted keys, gives
the same bytes; keys ASCII; no float; integers within I-JSON) and what it hands back is what the
reference reads. On what hrx writes it must accept, or the fast path would never run. Its
hashes are merkle's. And every export and database case of the verifier's tests, and every
changed byte of a ledger, gets the same verdict, or the same first fault in the same words,
with and without it. Each rule of the reader is also taken to its edges one by one (escapes,
UTF-8, key order, numbers, nesting, each part of an entry and of a line, failed allocations):
the mutants of ledger/_speedups.c that scripts/mutate_speedups.py makes are killed by them,
or are on its list of equivalent mutants.
"""

from __future__ import annotations

import inspect
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import _speedups, merkle
from ledger import verify as verify_module
from ledger.model import ENTRY_KEYS
from ledger.store import ChainWriter
from ledger.verify import Summary, verify_database, verify_export
from tests.helpers.ledgers import Ledger
from tests.ledger.verify_cases import existing_cases, outcome

SAFE = 2**53 - 1
BLOCK_KEYS = ["entries", "header", "signature"]


def _dump(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def _in_subset(value: Any) -> bool:
    """The ledger's subset of JSON (docs/spec.md §1.1), as the Python path holds to it."""
    if isinstance(value, dict):
        return all(k.isascii() and _in_subset(v) for k, v in value.items())
    if isinstance(value, list):
        return all(map(_in_subset, value))
    if isinstance(value, float):
        return False
    if isinstance(value, int) and not isinstance(value, bool):
        return abs(value) <= SAFE
    return True


def _canonical(text: bytes) -> Any:
    """The value of ``text`` when it is exactly canonical and in the subset; else a marker."""
    try:
        value = orjson.loads(text)
        if _dump(value) != text or not _in_subset(value):
            return _NOT
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):
        return _NOT
    return value


_NOT = object()


def _entry_fields(value: Any) -> tuple[Any, ...] | None:
    if not isinstance(value, dict) or value.keys() != ENTRY_KEYS:
        return None
    if not isinstance(value["body"], dict):
        return None
    return tuple(value[k] for k in ("seq", "chain", "v", "type", "time"))


def _columns(fields: list[tuple[Any, ...]]) -> tuple[list[Any], ...]:
    return tuple(list(column) for column in zip(*fields, strict=True)) if fields else ([],) * 5


def _check_entries(datas: list[bytes]) -> None:
    """Whatever entry_columns accepts, the reference reads alike."""
    got = _speedups.entry_columns(datas)
    if got is None:
        return
    values = [_canonical(data) for data in datas]
    assert _NOT not in values, datas
    fields = [_entry_fields(value) for value in values]
    assert None not in fields, datas
    assert got == _columns(fields)  # type: ignore[arg-type]
    for column in got:
        for item in column:
            assert type(item) in (int, str)


def _check_line(line: bytes) -> None:
    """Whatever split_block accepts, the reference reads alike."""
    got = _speedups.split_block(line)
    if got is None:
        return
    record = _canonical(line)
    assert record is not _NOT, line
    assert isinstance(record, dict) and sorted(record) == BLOCK_KEYS
    assert isinstance(record["header"], dict) and isinstance(record["signature"], str)
    datas, columns, header, signature = got
    assert datas == [_dump(entry) for entry in record["entries"]]
    fields = [_entry_fields(entry) for entry in record["entries"]]
    assert None not in fields
    assert columns == _columns(fields)  # type: ignore[arg-type]
    assert header == _dump(record["header"])
    assert signature == _dump(record["signature"])


def _entry(number: Any, body: Any, **changes: Any) -> dict[str, Any]:
    entry = {
        "body": body,
        "chain": "hosp-a",
        "seq": number,
        "time": "2026-12-07T08:00:00.000001Z",
        "type": "access.decided",
        "v": 1,
    }
    return {**entry, **changes}


def _line(entries: list[Any], header: Any = None, signature: Any = "c2lnbmF0dXJl") -> bytes:
    header = {"chain": "hosp-a", "count": len(entries)} if header is None else header
    return _dump({"entries": entries, "header": header, "signature": signature})


# -- values ------------------------------------------------------------------------------------

TEXT = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs"]) | st.sampled_from('"\\\x00\x1f\x7f'),
    max_size=12,
)
KEYS = st.text(st.characters(max_codepoint=0x7E) | st.sampled_from('é\\"\x01'), max_size=6)
LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**60), max_value=2**60)
    | st.sampled_from([SAFE, -SAFE, SAFE + 1, 0, -1, 10**15])
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT
)
VALUES = st.recursive(
    LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(bodies=st.lists(st.dictionaries(KEYS, VALUES, max_size=5), min_size=1, max_size=4))
def test_generated_entries_are_read_as_the_reference_reads_them(bodies: list[Any]) -> None:
    entries = [_entry(n, body) for n, body in enumerate(bodies)]
    datas = []
    for entry in entries:
        try:
            datas.append(_dump(entry))
        except orjson.JSONEncodeError:  # beyond 64-bit integers: not JSON orjson writes
            return
    _check_entries(datas)
    _check_line(_line(entries))
    if all(_in_subset(body) and _plain_keys(body) for body in bodies):
        # what hrx writes is decided here, not handed to the slow path
        assert _speedups.entry_columns(datas) is not None
        assert _speedups.split_block(_line(entries)) is not None


def _plain_keys(value: Any) -> bool:
    """No key with a character the reader leaves to the Python path (a backslash escape)."""
    if isinstance(value, dict):
        return all(
            "\\" not in k and '"' not in k and min(k, default="a") >= " " and _plain_keys(v)
            for k, v in value.items()
        )
    if isinstance(value, list):
        return all(map(_plain_keys, value))
    return True


@settings(max_examples=200, deadline=None)
@given(
    seq=st.one_of(st.integers(-5, 2**60), st.booleans(), st.none(), TEXT),
    chain=st.one_of(TEXT, st.integers()),
    version=st.one_of(st.integers(-2, 3), st.booleans(), TEXT),
    kind=st.one_of(TEXT, st.none()),
    body=st.one_of(st.dictionaries(KEYS, LEAVES, max_size=2), LEAVES, st.lists(LEAVES)),
    drop=st.sampled_from([None, *sorted(ENTRY_KEYS)]),
    extra=st.sampled_from([None, "a", "w", "seqs", "bodx"]),
)
def test_entries_of_other_shapes_are_read_as_the_reference_reads_them(
    seq: Any, chain: Any, version: Any, kind: Any, body: Any, drop: Any, extra: Any
) -> None:
    entry = _entry(0, body, seq=seq, chain=chain, v=version, type=kind)
    if drop:
        del entry[drop]
    if extra:
        entry[extra] = 1
    try:
        data = _dump(entry)
    except orjson.JSONEncodeError:
        return
    _check_entries([data])
    _check_line(_line([entry]))
    _check_line(_line([_entry(0, {}), entry]))


def _mutations(line: bytes, rng: random.Random, count: int) -> Iterator[bytes]:
    inserted = b' \\"{}[],:0-.eE\x00\x1f\x7f\xc3\xa9\xed\xa0\xf4\x90u1'
    for _ in range(count):
        position = rng.randrange(len(line))
        roll = rng.random()
        if roll < 0.4:
            yield (
                line[:position]
                + bytes([line[position] ^ (1 << rng.randrange(8))])
                + line[position + 1 :]
            )
        elif roll < 0.7:
            yield line[:position] + bytes([rng.choice(inserted)]) + line[position:]
        elif roll < 0.9:
            yield line[:position] + line[position + 1 :]
        else:
            yield line[:position]


def test_every_kind_of_changed_byte_is_read_as_the_reference_reads_it() -> None:
    rng = random.Random(20261207)
    bodies = [
        {"a": [1, -2, {"b": None, "c": True}], "n": SAFE, "s": 'é\n\u2028\x1f"\\'},
        {"": {}, "k": [], "x": "plain", "y": -SAFE, "z": False},
        {"deep": [[[[{"e": "中文"}]]]], "zero": 0},
    ]
    line = _line([_entry(n, body) for n, body in enumerate(bodies)])
    assert _speedups.split_block(line) is not None
    datas = [_dump(_entry(n, body)) for n, body in enumerate(bodies)]
    assert _speedups.entry_columns(datas) is not None
    accepted = 0
    for changed in _mutations(line, rng, 20000):
        _check_line(changed)
        accepted += _speedups.split_block(changed) is not None
    for changed in _mutations(datas[0], rng, 10000):
        _check_entries([changed])
        _check_entries([datas[1], changed])
    assert accepted > 0  # some changes leave canonical text (a digit for a digit)


@pytest.mark.parametrize(
    "text",
    [
        # escapes: only those RFC 8785 writes
        '"\\/"',
        '"\\u0041"',
        '"\\u001F"',
        '"\\u000a"',
        '"\\u0008"',
        '"\\u007f"',
        '"\\ud800"',
        '"\\ud83d\\ude00"',
        '"\\x"',
        '"\\u00"',
        '"\\u001"',
        # numbers: shortest decimal integers within I-JSON
        "-0",
        "01",
        "1.0",
        "1e5",
        "1E5",
        "-",
        "9007199254740992",
        "-9007199254740992",
        "99999999999999999",
        "+1",
        # literals and structure
        "tru",
        "nul",
        "True",
        "[1,]",
        "{,}",
        '{"a":1,}',
        '{"b":1,"a":2}',
        '{"a":1,"a":2}',
        '{"a" :1}',
        "[ ]",
    ],
)
def test_text_canonical_form_cannot_hold_is_never_accepted(text: str) -> None:
    entry = (
        b'{"body":{"k":'
        + text.encode()
        + b'},"chain":"hosp-a","seq":0,"time":"2026-12-07T08:00:00Z","type":"t","v":1}'
    )
    assert _speedups.entry_columns([entry]) is None
    line = b'{"entries":[' + entry + b'],"header":{},"signature":"s"}'
    assert _speedups.split_block(line) is None


@pytest.mark.parametrize(
    "raw",
    [
        b"\xc0\x80",  # overlong
        b"\xc1\xbf",
        b"\xe0\x80\x80",
        b"\xed\xa0\x80",  # a surrogate
        b"\xf0\x80\x80\x80",
        b"\xf4\x90\x80\x80",  # above U+10FFFF
        b"\xf5\x80\x80\x80",
        b"\x80",
        b"\xc3",
        b"\xe4\xb8",
        b"\xff",
        b"\x00",
        b"\n",
    ],
)
def test_bytes_that_are_not_canonical_utf8_are_never_accepted(raw: bytes) -> None:
    entry = (
        b'{"body":{"k":"a'
        + raw
        + b'"},"chain":"hosp-a","seq":0,"time":"2026-12-07T08:00:00Z","type":"t","v":1}'
    )
    assert _speedups.entry_columns([entry]) is None
    assert (
        _speedups.split_block(b'{"entries":[' + entry + b'],"header":{},"signature":"s"}') is None
    )


@pytest.mark.parametrize(
    "value",
    [
        "\u0000\u0008\u0009\u000a\u000b\u000c\u000d\u001f\u007f",
        "é中文\U0001f600\u2028\uffff\U0010ffff",
        SAFE,
        -SAFE,
        0,
        [],
        {},
        {"": 1, " ": 2, "A": 3, "a": 4, "~": 5},
    ],
)
def test_what_canonical_text_holds_at_the_edges_is_accepted(value: Any) -> None:
    entry = _entry(0, {"k": value})
    assert _speedups.entry_columns([_dump(entry)]) is not None
    assert _speedups.split_block(_line([entry])) is not None
    _check_line(_line([entry]))


def test_what_is_left_to_the_python_path() -> None:
    """A key with an escape or a non-ASCII character, nesting deeper than the reader goes,
    entry fields it would have to unescape, and an entry's fields out of order."""
    for body in ({'a"b': 1}, {"a\\": 1}, {"\n": 1}, {"é": 1}):
        assert _speedups.entry_columns([_dump(_entry(0, body))]) is None
    deep: Any = 1
    for _ in range(200):
        deep = [deep]
    assert _speedups.entry_columns([_dump(_entry(0, {"d": deep}))]) is None
    assert _speedups.entry_columns([_dump(_entry(0, {}, type='a"b'))]) is None
    assert _speedups.entry_columns([_dump(_entry(0, {}, chain="醫院"))]) is None
    unsorted = b'{"chain":"a","body":{},"seq":0,"time":"t","type":"t","v":1}'
    assert _speedups.entry_columns([unsorted]) is None
    assert _speedups.split_block(b'{"entries":[],"header":{},"signature":"s"} ') is None
    assert _speedups.split_block(b'{"entries":[],"header":{},"signature":"s"}') == (
        [],
        ([], [], [], [], []),
        b"{}",
        b'"s"',
    )


def test_wrong_arguments_are_type_errors() -> None:
    with pytest.raises(TypeError):
        _speedups.entry_columns((b"{}",))
    with pytest.raises(TypeError):
        _speedups.entry_columns(["{}"])
    with pytest.raises(TypeError):
        _speedups.entry_columns([_dump(_entry(0, {})), "{}"])
    with pytest.raises(TypeError):
        _speedups.split_block("{}")
    with pytest.raises(TypeError):
        _speedups.split_block(bytearray(_line([])))
    with pytest.raises(TypeError):
        _speedups.leaf_hashes([b"a", "b"])
    with pytest.raises(TypeError):
        _speedups.leaf_hashes((b"a", b"b"))
    with pytest.raises(TypeError):
        _speedups.node_hashes((b"a", b"b"))
    with pytest.raises(TypeError):
        _speedups.node_hashes([b"a", b"b", b"c", "d"])
    with pytest.raises(ValueError):
        _speedups.node_hashes([b"a" * 32])
    with pytest.raises(ValueError):
        _speedups.node_hashes([b"a"] * 3)


# -- each rule of canonical text, to its edges (the mutants of scripts/mutate_speedups.py) ------


def _body_entry(body: bytes) -> bytes:
    """An entry whose body's one member ``k`` is written as ``body``, byte for byte."""
    return b'{"body":{"k":' + body + b'},"chain":"hosp-a","seq":0,"time":"t","type":"t","v":1}'


def _plain(value: Any) -> bool:
    """A string the reader hands back as it stands: ASCII, nothing escaped."""
    return isinstance(value, str) and all(" " <= ch <= "\x7f" and ch not in '"\\' for ch in value)


def _readable(entry: Any) -> bool:
    """Whether the reader decides ``entry`` (parsed) itself, as an entry; the text is canonical."""
    fields = _entry_fields(entry)
    return (
        fields is not None
        and all(type(fields[n]) is int for n in (0, 2))
        and all(_plain(fields[n]) for n in (1, 3, 4))
    )


def _decided_as_the_reference(entry: bytes) -> None:
    """The reader accepts ``entry`` exactly when it is canonical (and its fields ones the reader
    hands back as they stand), and reads it alike (for texts the reader decides itself: no key it
    leaves to the Python path, no deep nesting)."""
    value = _canonical(entry)
    readable = value is not _NOT and _readable(value)
    assert (_speedups.entry_columns([entry]) is not None) == readable, entry
    _check_entries([entry])
    line = b'{"entries":[' + entry + b'],"header":{},"signature":"s"}'
    assert (_speedups.split_block(line) is not None) == readable, line
    _check_line(line)


def _line_decided_as_the_reference(line: bytes) -> None:
    record = _canonical(line)
    readable = (
        isinstance(record, dict)
        and sorted(record) == BLOCK_KEYS
        and isinstance(record["entries"], list)
        and all(map(_readable, record["entries"]))
        and isinstance(record["header"], dict)
        and isinstance(record["signature"], str)
    )
    assert (_speedups.split_block(line) is not None) == readable, line
    _check_line(line)


def test_every_escape_is_decided_as_the_reference_decides_it() -> None:
    """Each character after a backslash, and each \\u00XY of printable X and Y: only those
    RFC 8785 writes (lower-case hex, controls without a short escape) are canonical."""
    printable = [chr(code) for code in range(0x20, 0x7F)]
    for after in printable:
        _decided_as_the_reference(_body_entry(f'"a\\{after}z"'.encode()))
    accepted = 0
    for high in printable:
        for low in printable:
            entry = _body_entry(f'"\\u00{high}{low}"'.encode())
            _decided_as_the_reference(entry)
            accepted += _speedups.entry_columns([entry]) is not None
    assert accepted == 32 - 5  # the controls, but for \\b \\t \\n \\f \\r


def test_every_control_character_is_accepted_as_canonical_text_writes_it() -> None:
    entry = _entry(0, {"k": "".join(map(chr, range(0x20))) + "\x7f"})
    assert _speedups.entry_columns([_dump(entry)]) is not None
    _check_line(_line([entry]))


def test_every_utf8_lead_and_continuation_byte_is_decided_as_the_reference_decides_it() -> None:
    """Every byte from 0x80 as a sequence's first, with the second and later bytes at the
    edges of the ranges well-formed UTF-8 allows there (RFC 3629's table); in an entry's body,
    and cut short by the end of a block line's string (the signature, last in the line)."""
    edges = [0x00, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xFF]
    tails = [b""] + [bytes([a]) for a in (0x7F, 0x80, 0xBF, 0xC0)]
    tails += [a + b for a in tails[1:] for b in tails[1:]]
    rests = [b""] + [bytes([second]) + tail for second in edges for tail in tails]
    accepted = 0
    for lead in range(0x80, 0x100):
        for rest in rests:
            entry = _body_entry(b'"a' + bytes([lead]) + rest + b'z"')
            _decided_as_the_reference(entry)
            accepted += _speedups.entry_columns([entry]) is not None
            for end in (b"", b"z"):
                signature = b'"a' + bytes([lead]) + rest + end + b'"'
                _line_decided_as_the_reference(_line([]).replace(b'"c2lnbmF0dXJl"', signature))
    assert accepted > 0


def test_key_order_is_decided_as_the_reference_decides_it() -> None:
    """Two keys in each order: strictly increasing bytes, a key before the keys it begins."""
    keys = ["", " ", "!", "#", "A", "a", "a ", "a!", "a#", "aa", "ab", "b", "b ", "~"]
    for first in keys:
        for second in keys:
            body = f'{{"{first}":1,"{second}":2}}'.encode()
            _decided_as_the_reference(_body_entry(body))
            _decided_as_the_reference(_body_entry(b'{"x":' + body + b',"y":1}'))
            expected = first < second
            assert (_speedups.entry_columns([_body_entry(body)]) is not None) == expected


@pytest.mark.parametrize(
    "number",
    [
        "1000000000000000",  # 16 digits, within 2**53 - 1
        "-1000000000000000",
        "9007199254740990",
        "10000000000000000",  # 17 digits
        "18446744073709551616",  # 2**64: read into 64 bits, it would be 0
        "18446744073709551617",
        "-18446744073709551615",
        "36893488147419103233",  # 2**65 + 1
        "100000000000000000000",
        "9223372036854775808",  # 2**63
        "0",
        "7",
        "-7",
        "10",
        "-10",
        "00",
        "0-",
        "-",
        "--1",
        "1-",
        "1a",
    ],
)
def test_numbers_are_decided_as_the_reference_decides_them(number: str) -> None:
    _decided_as_the_reference(_body_entry(number.encode()))
    for name in ("seq", "v"):
        entry = _dump(_entry(1, {}, **{name: 12345}))
        entry = entry.replace(b":12345", b":" + number.encode())
        _decided_as_the_reference(entry)


def test_structure_is_decided_as_the_reference_decides_it() -> None:
    """Near misses of each part of an entry and of a block line."""
    for text in [
        "[]", "[1]", "[1,2]", "[1,[2,[]]]", "[1 2]", "[1;2]", "[1,]", "[,1]", "[", "[1", "]",
        "{}", '{"a":1}', '{"a":[]}', '{"a":{}}', '{"a":1,"b":{"c":[true,false,null]}}',
        '{"a"}', '{"a":}', '{"a":1;"b":2}', '{"a":1 "b":2}', '{"a":1', '{"a"', '{"a":1,',
        '{"a":1,"b"}', "{1:2}", "{'a':1}", '{"a"=1}',
        "true", "false", "null", "tru", "fals", "nulL", "trUe", "t", "f", "n",
        '""', '"a"', '"', '"a', "x",
        "1/", "1/2", "/", "-/", ":", "1:", "9:", "-1/",
        '"\\x', '"a\\/', '"\\ ', '"\\', '"\\u', '"\\"', '{"a\\:1}', '{"a\\":1}',
    ]:  # fmt: skip
        _decided_as_the_reference(_body_entry(text.encode()))
    entry = _dump(_entry(300, {"a": [1]}))
    for near in [
        entry,
        entry[:-1],
        entry + b"}",
        entry + b" ",
        entry.replace(b'"body":{', b'"body":[').replace(b"]},", b"]],"),
        entry.replace(b'"chain":"hosp-a"', b'"chain":1'),
        entry.replace(b'"chain":"hosp-a"', b'"chain":"hosp-a'),
        entry.replace(b'"seq":300', b'"seq":"300"'),
        entry.replace(b'"time":"', b'"time":'),
        entry.replace(b'"type":"', b'"type":'),
        entry.replace(b'"v":1', b'"v":"1"'),
        entry.replace(b'"v":1}', b'"v":1,"w":1}'),
    ]:
        _decided_as_the_reference(near)
        pair = [_dump(_entry(0, {})), near]
        readable = _speedups.entry_columns([near]) is not None
        assert (_speedups.entry_columns(pair) is not None) == readable
        _check_entries(pair)
    line = _line([_entry(300, {"a": [1]}), _entry(301, {})])
    lines = [
        line,
        line[:-1],
        line + b"}",
        line.replace(b'"signature":"c2lnbmF0dXJl"', b'"signature":'),
        line.replace(b'"signature":"c2lnbmF0dXJl"', b'"signature":1'),
        line.replace(b'"signature":"c2lnbmF0dXJl"', b'"signature":null'),
        line.replace(b'"signature":"c2lnbmF0dXJl"', b'"signature":"a'),
        line.replace(b'"signature":"c2lnbmF0dXJl"}', b'"signature":"s"]'),
        line.replace(b'"signature":"c2lnbmF0dXJl"}', b'"signature":"s"}}'),
        line.replace(b'"header":{', b'"header":[').replace(b'"count":2}', b'"count":2]'),
        line.replace(b'"header":{', b'"header":'),
        line.replace(b'},{"body"', b'}{"body"'),
        line.replace(b'},{"body"', b'};{"body"'),
        line.replace(b'}],"header"', b'}},"header"'),
        line.replace(b'}],"header"', b'}]"header"'),
        _line([]),
        _line([]).replace(b"[]", b"[}"),
        _line([]).replace(b"[]", b"[1]"),
        _line([]).replace(b"[]", b"[{}]"),
    ]
    for near in lines:
        _line_decided_as_the_reference(near)


@pytest.mark.parametrize(
    "opening", [b'{"body":{', b',"chain":', b',"seq":', b',"time":', b',"type":', b',"v":', b"}"]
)
def test_an_entry_without_any_one_of_its_keys_is_never_accepted(opening: bytes) -> None:
    """The text an entry reads in the order of its keys, each part left out in turn."""
    entry = _dump(_entry(300, {"a": [1]}))
    position = entry.rindex(opening)
    near = entry[:position] + entry[position + len(opening) :]
    assert _speedups.entry_columns([near]) is None
    assert _speedups.entry_columns([_dump(_entry(0, {})), near]) is None
    line = _line([_entry(300, {"a": [1]})])
    assert _speedups.split_block(line.replace(entry, near)) is None


@pytest.mark.parametrize(
    "part", [b'{"entries":[', b"],", b',"header":{', b"}", b',"signature":', b'"', b"}"]
)
@pytest.mark.parametrize("count", [0, 1, 2])
def test_a_block_line_without_any_one_of_its_parts_is_never_accepted(
    part: bytes, count: int
) -> None:
    """The text a block line reads in the order of its keys, each part left out in turn."""
    line = _line([_entry(300 + n, {"a": [n]}) for n in range(count)], header={"k": 1})
    for position in {line.find(part), line.rfind(part)}:
        near = line[:position] + line[position + len(part) :]
        assert _speedups.split_block(near) is None, near
    header, signature = b',"header":{"k":1}', b',"signature":"c2lnbmF0dXJl"'
    for member in (header, signature):  # a whole member left out
        assert _speedups.split_block(line.replace(member, b"")) is None


@pytest.mark.parametrize("field", ["chain", "time", "type"])
@pytest.mark.parametrize("value", ['a"b', "a\\b", "a\nb", "\x1f", "\x00", "é", "\u2028", "\x7f"])
def test_entry_fields_are_handed_back_only_as_they_stand(field: str, value: str) -> None:
    """A string field the reader would have to unescape is left to the Python path."""
    entry = _entry(0, {}, **{field: value})
    _check_entries([_dump(entry)])
    _check_line(_line([entry]))
    if "\\" in _dump(value).decode():
        assert _speedups.entry_columns([_dump(entry)]) is None
        assert _speedups.split_block(_line([entry])) is None


def test_seq_and_v_are_handed_back_with_their_sign_and_size() -> None:
    entries = [_entry(n, {}, v=v) for n, v in ((-1, -2), (SAFE, 2**31), (-SAFE, 0), (300, 7))]
    datas = [_dump(entry) for entry in entries]
    seqs, _, versions, _, _ = _speedups.entry_columns(datas)
    assert seqs == [-1, SAFE, -SAFE, 300]
    assert versions == [-2, 2**31, 0, 7]
    _check_line(_line(entries))


def test_nesting_is_decided_here_up_to_the_readers_depth() -> None:
    """An entry's body holds 126 nested arrays or objects here, not 127; a header, 127."""

    def nested(depth: int, kind: str) -> bytes:
        opening, closing = (b"[", b"]") if kind == "array" else (b'{"k":', b"}")
        return opening * depth + b"1" + closing * depth

    for kind in ("array", "object"):
        for depth, decided in ((125, True), (126, True), (127, False), (128, False)):
            entry = _body_entry(nested(depth, kind))
            assert (_speedups.entry_columns([entry]) is not None) is decided
            _check_entries([entry])
        for depth, decided in ((127, True), (128, False)):
            line = b'{"entries":[],"header":{"k":' + nested(depth, kind) + b'},"signature":"s"}'
            assert (_speedups.split_block(line) is not None) is decided
            _check_line(line)


_UNDER_FAILING_ALLOCATIONS = """
import sys, _testcapi
from ledger import _speedups
entry = b'{"body":{"k":[300,"x"]},"chain":"hosp-a","seq":%d,"time":"t","type":"t","v":%d}'
entries = [entry % (1000 + n, 2000 + n) for n in range(3)]
line = b'{"entries":[' + b",".join(entries) + b'],"header":{"k":"h"},"signature":"s"}'
calls = [
    ("split_block", line),
    ("entry_columns", entries),
    ("leaf_hashes", entries),
    ("node_hashes", entries + [b"y"]),
]
for name, argument in calls:
    function = getattr(_speedups, name)
    expected = function(argument)
    failed = 0
    for start in range(150):
        # empty CPython's free lists of lists and of the tuples made here (of 4 and 5): a new
        # one is then an allocation too
        got = held = None  # (no list is freed from here to the call)
        held = [[] for _ in range(100)], [tuple(range(n)) for n in (4, 5) for _ in range(2100)]
        _testcapi.set_nomemory(start, start + 1)
        try:
            got = function(argument)
        except MemoryError:
            got = None
        finally:
            _testcapi.remove_mem_hooks()
        if got is None:
            failed += 1
        elif got != expected:
            sys.exit(f"{name}: {got!r} when allocation {start} failed")
    print(name, failed)
"""


def test_a_failed_allocation_is_a_memory_error_never_a_wrong_answer_or_a_crash() -> None:
    """Under CPython's allocator hooks (_testcapi), each allocation in turn fails: the call
    raises MemoryError (not None, not a SystemError) or gives the answer it gives otherwise.
    In a process of its own: a crash fails the test instead of ending the run."""
    pytest.importorskip("_testcapi")
    root = Path(_speedups.__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", _UNDER_FAILING_ALLOCATIONS],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    failed = dict(line.split() for line in done.stdout.splitlines())
    assert set(failed) == {"split_block", "entry_columns", "leaf_hashes", "node_hashes"}
    assert all(int(count) > 0 for count in failed.values()), failed


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=40))
def test_the_hashes_are_merkles(datas: list[bytes]) -> None:
    assert _speedups.leaf_hashes(datas) == list(map(merkle.leaf_hash, datas))
    pairs = datas[: len(datas) // 2 * 2]
    assert _speedups.node_hashes(pairs) == [
        merkle.node_hash(left, right) for left, right in zip(pairs[0::2], pairs[1::2], strict=True)
    ]


# -- the verifier, with and without them --------------------------------------------------------


@contextmanager
def _pure_python() -> Iterator[None]:
    saved = verify_module._speedups, merkle._speedups
    verify_module._speedups = merkle._speedups = None  # type: ignore[assignment]
    try:
        yield
    finally:
        verify_module._speedups, merkle._speedups = saved


def _both(run: Callable[..., Summary], used: list[int]) -> Callable[..., Summary]:
    def verify(*args: Any, **options: Any) -> Summary:
        progress = args[2] if len(args) > 2 else options.pop("progress", None)
        with _pure_python():
            expected = outcome(run, *args[:2], **options)
        assert outcome(run, *args[:2], **options) == expected
        used.append(1)
        return run(*args[:2], progress, **options)

    return verify


# On SQLite only: each existing case asserts its verdict on both engines already, with the
# speedups in use; that the pure-Python reading agrees is a property of the bytes, not of the
# engine that stored them.
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(("module", "test", "param"), existing_cases())
def test_the_verifier_gives_the_same_verdicts_with_and_without_them(
    module: Any,
    test: Callable[..., None],
    param: Any,
    ledger_db: Ledger,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    used: list[int] = []
    monkeypatch.setattr(module, "verify_export", _both(verify_export, used))
    monkeypatch.setattr(module, "verify_database", _both(verify_database, used))
    fixtures = {"ledger_db": ledger_db, "tmp_path": tmp_path}
    names = list(inspect.signature(test).parameters)
    test(*[fixtures[name] for name in names if name in fixtures], *param)
    assert used


def test_every_changed_byte_of_an_export_verifies_alike(
    ledger_db: Ledger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with ChainWriter(ledger_db.store, "hosp-a", ledger_db.key) as writer:
        writer.append_many([("access.requested", {"n": n, "s": "中文\n"}) for n in range(3)])
        writer.append_many([("access.decided", {"n": 9})])
    lines = [line + b"\n" for line in ledger_db.store.export_lines()]
    path = tmp_path / "export.jsonl"
    authority = ledger_db.authority.public_key()
    fast: list[int] = []
    split_block = _speedups.split_block
    monkeypatch.setattr(_speedups, "split_block", lambda line: fast.append(1) or split_block(line))
    for number, line in enumerate(lines):
        for position in range(0, len(line) - 1, 3):
            changed = bytearray(line)
            changed[position] ^= 0x01
            path.write_bytes(b"".join([*lines[:number], bytes(changed), *lines[number + 1 :]]))
            with _pure_python():
                expected = outcome(verify_export, path, authority)
            assert outcome(verify_export, path, authority) == expected, (number, position)
    assert fast  # the compiled reader was asked


def test_a_canonical_lines_entries_are_read_once(
    ledger_db: Ledger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fields the reader cut from a block line go with its entries: they are not read
    again from the entries' bytes."""
    with ChainWriter(ledger_db.store, "hosp-a", ledger_db.key) as writer:
        writer.append_many([("access.requested", {"n": n}) for n in range(3)])
    path = tmp_path / "export.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in ledger_db.store.export_lines()))

    def read_again(datas: list[bytes]) -> None:
        raise AssertionError(f"{len(datas)} entries read again")

    monkeypatch.setattr(_speedups, "entry_columns", read_again)
    assert verify_export(path, ledger_db.authority.public_key()).entries == 3
