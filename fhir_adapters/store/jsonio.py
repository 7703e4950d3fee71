"""FHIR JSON in and out, exactly: decimals keep their precision and duplicate keys are refused.

FHIR says a decimal's precision is part of its value (``13.50`` is not ``13.5``), so bodies are
parsed with :class:`decimal.Decimal` and written back digit for digit. Stored resources are
written once, compactly and in UTF-8, and served as those same bytes on every read.

FHIR decimals have no size limit, but most JSON clients read a number as an IEEE double (and
Python's refuses an integer of more than 4300 digits), so what this node stores is kept to
numbers every client can read: :func:`number_problem` says why one is not. :func:`parse`
itself reads any number (a very long integer as a Decimal), so a resource stored by an older
version can always be read back, and :func:`readable` tells whether stored bytes are safe to
hand to a JSON client.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from typing import Any

import simplejson

from fhir_adapters.errors import InvalidRequest

MAX_DIGITS = 32  # significant digits of a number, as written (trailing zeros count)
NUMBER_RULE = (
    f"a number may have at most {MAX_DIGITS} significant digits and must be one an IEEE "
    "double holds: no larger in size than 1.7976931348623157e308 and, unless zero, not so "
    "small that a double reads it as 0 (below about 2.5e-324)"
)
_SHORT_INTEGER = 400  # longer integer literals are read as Decimal (int() stops at 4300 digits)
# what may be a number breaking the rule: a run of more than MAX_DIGITS digits (or points), or
# an exponent of three digits; stored bytes with neither need not be parsed to be trusted
_SUSPECT = re.compile(rb"[0-9.]{%d}|[eE][+-]?[0-9]{3}" % (MAX_DIGITS + 1))


def _refuse_constant(name: str) -> Any:
    raise InvalidRequest(f"{name} is not a JSON number")


def _integer(text: str) -> int | Decimal:
    return int(text) if len(text) <= _SHORT_INTEGER else Decimal(text)


def _decimal(text: str) -> Decimal:
    try:
        return Decimal(text)
    except InvalidOperation:  # an exponent beyond what Decimal holds (10**18 or more)
        raise InvalidRequest(f"the number {text[:40]}... is out of range; {NUMBER_RULE}") from None


def number_problem(value: int | Decimal | float) -> str | None:
    """Why a JSON number cannot be stored (beyond :data:`NUMBER_RULE`), or None."""
    if isinstance(value, bool):
        return None
    number = value if isinstance(value, Decimal) else Decimal(value)
    if not number.is_finite():
        return f"the number is not finite; {NUMBER_RULE}"
    digits = len(number.as_tuple().digits)
    if digits > MAX_DIGITS:
        return f"the number has {digits} significant digits; {NUMBER_RULE}"
    as_double = float(number)
    if math.isinf(as_double):
        return f"the number is too large; {NUMBER_RULE}"
    if as_double == 0 and not number.is_zero():
        return f"the number is too small; {NUMBER_RULE}"
    return None


def numbers_problem(value: Any) -> str | None:
    """The first number in a parsed JSON value that breaks the rule, and why; or None."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            problem = numbers_problem(item)
            if problem:
                return problem
        return None
    if isinstance(value, int | Decimal | float):
        return number_problem(value)
    return None


def readable(body: bytes) -> bool:
    """Whether stored JSON holds only numbers every JSON client reads (see the module)."""
    if not _SUSPECT.search(body):
        return True
    return numbers_problem(parse(body)) is None


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
            parse_float=_decimal,
            parse_int=_integer,
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
