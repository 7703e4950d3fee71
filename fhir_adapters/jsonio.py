"""FHIR JSON in and out, exactly: decimals keep their precision and duplicate keys are refused.

FHIR says a decimal's precision is part of its value (``13.50`` is not ``13.5``), so bodies are
parsed with :class:`decimal.Decimal` and written back digit for digit. Stored resources are
written once, compactly and in UTF-8, and served as those same bytes on every read.
"""

from __future__ import annotations

from typing import Any

import simplejson

from fhir_adapters.errors import InvalidRequest


def _refuse_constant(name: str) -> Any:
    raise InvalidRequest(f"{name} is not a JSON number")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise InvalidRequest(f"the JSON object has the key {key!r} twice")
            seen.add(key)
    return result


def parse(data: bytes | str, what: str = "the body") -> Any:
    """Parse FHIR JSON (UTF-8), keeping decimals exact; a clear error naming ``what``."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequest(f"{what} is not UTF-8: byte {exc.start}") from None
    if data.startswith("\ufeff"):
        data = data[1:]
    try:
        return simplejson.loads(
            data,
            use_decimal=True,
            object_pairs_hook=_object,
            parse_constant=_refuse_constant,
        )
    except simplejson.JSONDecodeError as exc:
        raise InvalidRequest(
            f"{what} is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise InvalidRequest(f"{what} is nested too deeply") from None


def dump(value: Any, *, pretty: bool = False) -> bytes:
    """Compact UTF-8 JSON (or indented, for ``_pretty``), decimals digit for digit."""
    if pretty:
        text = simplejson.dumps(value, use_decimal=True, ensure_ascii=False, indent=2)
    else:
        text = simplejson.dumps(value, use_decimal=True, ensure_ascii=False, separators=(",", ":"))
    encoded: bytes = text.encode("utf-8")
    return encoded
