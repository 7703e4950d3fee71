"""Canonical JSON: byte-identical to the rfc8785 reference, and the ledger's JSON subset."""

from __future__ import annotations

from typing import Any

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.canonical import (
    canonical_bytes,
    check_payload,
    parse_canonical,
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
