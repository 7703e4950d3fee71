"""Canonical JSON: byte-identical to the rfc8785 reference, and the ledger's JSON subset."""

from __future__ import annotations

from typing import Any

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.canonical import (
    canonical_bytes,
    canonical_of_parsed,
    check_payload,
    check_unique_keys,
    parse_canonical,
    parse_json,
)
from ledger.errors import CanonicalError

ascii_keys = st.text(st.characters(min_codepoint=0, max_codepoint=127), max_size=8)
texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
scalars = st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | texts
payloads = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(ascii_keys, inner, max_size=5),
    max_leaves=30,
)


@settings(max_examples=500, deadline=None)
@given(payloads)
def test_identical_to_rfc8785(value: Any) -> None:
    assert canonical_bytes(value) == rfc8785.dumps(value)
    assert parse_canonical(rfc8785.dumps(value)) == value


@pytest.mark.parametrize(
    "value",
    [
        {"a": 1.5},
        {"a": 2.0},
        {"a": [1, {"b": 1e300}]},
        {"名字": 1},
        {"a": 2**53},
        {"a": -(2**53)},
        {1: 2},
        {"a": {1, 2}},
        {"a": "\ud800"},
    ],
)
def test_refused(value: Any) -> None:
    with pytest.raises(CanonicalError):
        canonical_bytes(value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_numbers_are_refused_not_written_as_null(value: float) -> None:
    with pytest.raises(CanonicalError, match="floating-point"):
        canonical_bytes({"x": value})


def test_non_json_types_are_refused() -> None:
    import datetime
    import uuid

    for value in (datetime.datetime.now(), uuid.uuid4(), b"raw", 1 + 2j):
        with pytest.raises(CanonicalError, match="is not a JSON value"):
            canonical_bytes({"x": value})


def test_error_names_the_place() -> None:
    with pytest.raises(CanonicalError, match=r"body\.fee\[1\]"):
        check_payload({"fee": [1, 2.5]}, "body")


@pytest.mark.parametrize(
    "text",
    [b'{"b":1,"a":2}', b'{"a": 1}', b'{"a":1,"a":1}', b'{"a":1.0}', b'{"a":"\\u0041"}', b"nope"],
)
def test_parse_canonical_refuses_other_forms(text: bytes) -> None:
    with pytest.raises(CanonicalError):
        parse_canonical(text)


def test_many_at_once_agrees_with_one_by_one() -> None:
    from ledger.canonical import canonical_many, parse_canonical_many

    good = [{"a": [1, {"b": "x"}]}, {"c": None, "d": True}]
    datas = canonical_many(good)
    assert datas == [rfc8785.dumps(v) for v in good]
    assert parse_canonical_many(datas) == good
    # Anything that needs a closer look is handed back (None), never accepted.
    for bad in ([{"a": [1, {"b": 0.5}]}], [{"a": 2**60}], [{"名": 1}], [{"a": "\ud800"}]):
        assert canonical_many(bad) is None
    for raw in ([b'{"a":0.5}'], [b'{"b":1,"a":2}'], [b'{"a":1} '], [b"{"], ['{"名":1}'.encode()]):
        assert parse_canonical_many(raw) is None


@pytest.mark.parametrize("n", [2**53, -(2**53), 2**53 + 1, 2**54])
def test_check_payload_alone_holds_the_i_json_range(n: int) -> None:
    """The writer checks bodies with check_payload and then writes them without another walk
    (canonical_bytes_of_checked): the range must hold there, to the unit."""
    check_payload({"n": 2**53 - 1, "m": -(2**53 - 1)})
    with pytest.raises(CanonicalError) as refused:
        check_payload({"n": n})
    assert str(refused.value) == f"body.n: integer {n} is outside the I-JSON range ±(2**53-1)"


FLOAT_FAULT = (
    "floating-point number 1.5 is not allowed on the ledger (use an integer, e.g. money in fen)"
)


@pytest.mark.parametrize(
    ("call", "fault"),
    [
        (lambda: check_payload({"a": 1.5}), f"body.a: {FLOAT_FAULT}"),
        (lambda: check_payload({1: 2}), "body: object key 1 is not a string"),
        (lambda: check_payload({"名": 1}), "body: object key '名' is not ASCII"),
        (lambda: check_payload([{1, 2}], "entry"), "entry[0]: set is not a JSON value"),
        (lambda: canonical_of_parsed(parse_json(b'{"a":[1.5]}')), f"value.a[0]: {FLOAT_FAULT}"),
        (
            lambda: canonical_of_parsed(parse_json(b'{"a":1.5}'), "entry 7"),
            f"entry 7.a: {FLOAT_FAULT}",
        ),
        (lambda: parse_canonical(b'{"a":1.5}'), f"value.a: {FLOAT_FAULT}"),
        (lambda: canonical_bytes({"a": 1.5}), f"value.a: {FLOAT_FAULT}"),
        (lambda: canonical_bytes({"a": 1.5}, "entry 9"), f"entry 9.a: {FLOAT_FAULT}"),
        (lambda: parse_canonical(b'{"a":1.5}', "entry 3"), f"entry 3.a: {FLOAT_FAULT}"),
        (lambda: parse_canonical(b'{"b":1,"a":2}'), "JSON is not in RFC 8785 canonical form"),
        (lambda: parse_json(b"nope"), "not valid JSON: "),
        (lambda: check_unique_keys(b"nope"), "not valid JSON: "),
    ],
)
def test_a_refusal_names_the_place_and_the_fault(call: Any, fault: str) -> None:
    with pytest.raises(CanonicalError) as refused:
        call()
    assert str(refused.value).startswith(fault)


def test_a_value_that_is_not_json_is_refused_at_the_top_too() -> None:
    """orjson writes datetimes, UUIDs and dataclasses itself: they are refused however deep
    they are, the outermost level included."""
    import dataclasses
    import datetime
    import uuid

    @dataclasses.dataclass
    class Point:
        x: int

    for value in (datetime.datetime(2026, 1, 1), uuid.UUID(int=1), Point(1)):
        with pytest.raises(CanonicalError, match="is not a JSON value"):
            canonical_bytes(value)


def test_parse_canonical_takes_text_as_well_as_bytes() -> None:
    assert parse_canonical('{"a":"é","b":[1]}') == {"a": "é", "b": [1]}
