"""The compiled hot paths (ledger._speedups) are held to the pure-Python ones.

The reader of canonical text may refuse what it does not decide itself, never accept what the
Python path would not: on generated values, on every one-byte change of canonical lines, and
on the escapes, numbers and UTF-8 forms that canonical text must or must not hold, whatever it
accepts is canonical by the reference (orjson's parse, written again with sorted keys, gives
the same bytes; keys ASCII; no float; integers within I-JSON) and what it hands back is what the
reference reads. On what hrx writes it must accept, or the fast path would never run. Its
hashes are merkle's. And every export and database case of the verifier's tests, and every
changed byte of a ledger, gets the same verdict, or the same first fault in the same words,
with and without it.
"""

from __future__ import annotations

import inspect
import random
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
from ledger.errors import VerificationError
from ledger.model import ENTRY_KEYS
from ledger.store import ChainWriter
from ledger.verify import Summary, verify_database, verify_export
from tests.helpers.ledgers import Ledger
from tests.ledger import test_verify, test_verify_faults

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
        _speedups.split_block("{}")
    with pytest.raises(TypeError):
        _speedups.leaf_hashes([b"a", "b"])
    with pytest.raises(ValueError):
        _speedups.node_hashes([b"a" * 32])


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


def _outcome(run: Callable[..., Summary], *args: Any, **options: Any) -> Any:
    observed: list[dict[str, Any]] = []
    progressed: list[int] = []
    if "observe" in options:
        options = {**options, "observe": observed.append}
    try:
        summary = run(*args, progressed.append, **options)
    except VerificationError as exc:
        return ("fault", str(exc), exc.what, exc.chain, exc.height, exc.seq)
    return ("valid", summary, list(summary.chains), observed, sum(progressed))


def _both(run: Callable[..., Summary], used: list[int]) -> Callable[..., Summary]:
    def verify(*args: Any, **options: Any) -> Summary:
        progress = args[2] if len(args) > 2 else options.pop("progress", None)
        with _pure_python():
            expected = _outcome(run, *args[:2], **options)
        assert _outcome(run, *args[:2], **options) == expected
        used.append(1)
        return run(*args[:2], progress, **options)

    return verify


def _existing_cases() -> list[Any]:
    cases = []
    for module in (test_verify, test_verify_faults):
        for name, test in vars(module).items():
            source = inspect.getsource(test) if name.startswith("test_") else ""
            if "verify_export(" not in source and "verify_database(" not in source:
                continue
            if name == "test_entries_stored_while_verifying_are_said_to_be_uncovered":
                continue
            marks = [m for m in getattr(test, "pytestmark", []) if m.name == "parametrize"]
            params = marks[0].args[1] if marks else [()]
            cases += [
                pytest.param(module, test, param, id=f"{name}-{n}")
                for n, param in enumerate(params)
            ]
    return cases


@pytest.mark.parametrize(("module", "test", "param"), _existing_cases())
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
                expected = _outcome(verify_export, path, authority)
            assert _outcome(verify_export, path, authority) == expected, (number, position)
    assert fast  # the compiled reader was asked
