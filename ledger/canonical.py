"""Canonical JSON for the ledger: RFC 8785 (JCS) bytes, and the checks that keep payloads in
the subset docs/spec.md §1.1 allows (no floating-point numbers, ASCII object keys, JSON types only).

Every hash and signature in the ledger is computed over bytes made here, so two
implementations that follow RFC 8785 agree byte for byte. Within that subset RFC 8785 is plain
compact JSON with sorted keys, integers in decimal and minimal string escapes, which ``orjson``
writes about forty times faster than the pure-Python ``rfc8785`` package; the tests hold the
two to identical bytes, and ``rfc8785`` stays the reference.
"""

from __future__ import annotations

import functools
import gc
import json
from typing import Any

import orjson

from ledger.errors import CanonicalError

JSONValue = Any
"""A value made of dict (str keys), list, str, int, bool and None."""


def check_payload(value: JSONValue, where: str = "body") -> None:
    """Raise :class:`CanonicalError` unless ``value`` is allowed on the ledger.

    Allowed: objects with ASCII string keys, arrays, strings, booleans, null, and integers
    within the I-JSON safe range (|n| <= 2**53 - 1). Floats are refused even when integral:
    money is an integer in fen.
    """
    if value is None or isinstance(value, bool | str):
        return
    if isinstance(value, int):
        if abs(value) > 2**53 - 1:
            raise CanonicalError(f"{where}: integer {value} is outside the I-JSON range ±(2**53-1)")
        return
    if isinstance(value, float):
        raise CanonicalError(
            f"{where}: floating-point number {value!r} is not allowed on the ledger "
            "(use an integer, e.g. money in fen)"
        )
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise CanonicalError(f"{where}: object key {key!r} is not a string")
            if not key.isascii():
                raise CanonicalError(f"{where}: object key {key!r} is not ASCII")
            check_payload(item, f"{where}.{key}")
        return
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            check_payload(item, f"{where}[{index}]")
        return
    raise CanonicalError(f"{where}: {type(value).__name__} is not a JSON value")


_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_STRICT_INTEGER

_DUMP = functools.partial(orjson.dumps, option=_OPTIONS)


def _dump(value: JSONValue) -> bytes:
    try:
        return orjson.dumps(value, option=_OPTIONS)
    except orjson.JSONEncodeError as exc:  # lone surrogates, integers beyond 2**53...
        raise CanonicalError(f"cannot canonicalise: {exc}") from exc


def canonical_bytes_of_checked(value: JSONValue) -> bytes:
    """:func:`canonical_bytes` of a value whose parts were all checked with
    :func:`check_payload` already (the chain writer's entries: checked bodies, fields of its
    own), without walking it again."""
    return _dump(value)


_PLAIN_JSON_TYPES = frozenset({dict, list, str, int, bool, type(None)})


def _only_plain_json(value: JSONValue) -> bool:
    """Whether ``value`` is made of the exact built-in JSON types only, level by level at C
    speed (see :func:`_holds_float`); a level holding anything else is never descended into."""
    level = [value]
    while level:
        if not set(map(type, level)) <= _PLAIN_JSON_TYPES:
            return False
        level = gc.get_referents(*level)
    return True


def canonical_bytes(value: JSONValue, where: str = "value") -> bytes:
    """RFC 8785 canonical form of ``value``, refused (naming the place) unless
    :func:`check_payload` allows it. Plain ASCII JSON, the common case, is checked without a
    Python-level walk."""
    try:
        data: bytes | None = _DUMP(value)
    except orjson.JSONEncodeError:
        data = None
    if data is None or not data.isascii() or not _only_plain_json(value):
        check_payload(value, where)
        data = _dump(value)
    return data


def parse_json(data: bytes | str) -> JSONValue:
    """Parse JSON text (not necessarily canonical), with a clear error."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise CanonicalError(f"not valid JSON: {exc}") from exc


def check_unique_keys(data: bytes) -> None:
    """Refuse JSON text with a duplicate object key anywhere.

    I-JSON (RFC 7493) forbids them, and parsers disagree on which value wins, so a text with
    one could show an auditor's tool other content than the one verified. Canonical text
    cannot hold one (so callers need this only for text that is not canonical).
    """
    try:
        json.loads(data, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:
        raise CanonicalError(f"not valid JSON: {exc}") from exc


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise CanonicalError(f"object key {key!r} appears twice")
        seen.add(key)
    return dict(pairs)


def _holds_float(value: JSONValue) -> bool:
    """Whether parsed JSON holds a float anywhere, level by level at C speed: each
    ``gc.get_referents`` call returns the keys, values and items of every container on one
    level (strings and numbers have no referents), so no Python code runs per element.
    Only for values made by :func:`parse_json`: built-in containers and scalars."""
    level = [value]
    while level:
        level = gc.get_referents(*level)
        if float in map(type, level):
            return True
    return False


def canonical_of_parsed(value: JSONValue, where: str = "value") -> bytes:
    """Canonical bytes of a value from :func:`parse_json` (the verifier's hot path).

    Parsed JSON holds only dicts, lists, strings, ints, floats, booleans and None: a type walk
    finds floats faster than any scan of the text, and ASCII-only output rules out non-ASCII
    keys; only then is the full, place-naming :func:`check_payload` needed.
    """
    data = _dump(value)
    if not data.isascii() or _holds_float(value):
        check_payload(value, where)
    return data


def canonical_many(
    values: list[JSONValue], *, floats_in: list[Any] | None = None
) -> list[bytes] | None:
    """Canonical bytes of many parsed values at once, or None when any of them needs a closer
    look (then :func:`canonical_of_parsed` on each names the fault, or accepts it).
    ``floats_in``: the parts of the values where floats could be, when the caller knows."""
    try:
        datas = list(map(_DUMP, values))
    except orjson.JSONEncodeError:
        return None
    if not all(map(bytes.isascii, datas)) or _holds_float(
        values if floats_in is None else floats_in
    ):
        return None
    return datas


def parse_canonical_many(datas: list[bytes]) -> list[JSONValue] | None:
    """Parse many canonical texts at once, or None when any of them needs a closer look
    (then :func:`parse_canonical` on each names the fault, or accepts it)."""
    try:
        values = list(map(orjson.loads, datas))
        if list(map(_DUMP, values)) != datas:
            return None
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):
        return None
    if not all(map(bytes.isascii, datas)) or _holds_float(values):
        return None
    return values


def parse_canonical(data: bytes | str, where: str = "value") -> JSONValue:
    """Parse JSON text that must already be in canonical form; raise if it is not.

    Used when reading stored or received ledger data: a byte that differs from the canonical
    form would change every hash over it, so it is an error, never silently normalised.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    value = parse_json(raw)
    if canonical_of_parsed(value, where) != raw:
        raise CanonicalError("JSON is not in RFC 8785 canonical form")
    return value
