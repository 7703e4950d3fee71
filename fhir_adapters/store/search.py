"""FHIR search: parse a query, find the matches in the index tables, page them stably.

A search first finds every match, in order, as (res_pk, version) pairs — index-only work,
no stored JSON read. When the matches fill more than one page they are kept as a search set
(``fhir_search_sets``) owned by whoever searched, and every page is cut from that set: pages
never shift when resources change meanwhile, ``Bundle.total`` is exact, and a caller's
access filter (a patient's compartment now, consent later) is applied once, before
counting, so neither totals, pages nor includes can reveal a hidden resource.

Unknown parameters, modifiers and prefixes are refused (400) unless the caller asks for
``Prefer: handling=lenient``; then they are ignored and reported. A search beyond the limits
(:data:`MAX_PARAMETERS`, :data:`MAX_VALUES`, :data:`MAX_VALUE_LENGTH`) is refused before
anything else, lenient or not: each parameter and value becomes part of one SQL statement,
and the databases' own limits (SQLite's expression depth and LIKE pattern length) must never
be what stops it.
"""

from __future__ import annotations

import json
import math
import re
import struct
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql.elements import ColumnElement

from fhir_adapters.errors import InvalidRequest, NotFound, TooCostly
from fhir_adapters.store import tables
from fhir_adapters.store.quantities import Wanted, caveat, parse_wanted
from fhir_adapters.store.resources import RESOURCE_TYPES, check_type
from fhir_adapters.store.search_params import (
    LATITUDE,
    LONGITUDE,
    NARRATIVE,
    NEAR,
    SEARCH_PARAMS,
    SearchParam,
    composite_param,
    date_range,
    normalise_string,
    parse_reference,
    unsupported,
)
from fhir_adapters.store.subsetting import Subsetting, parse_subsetting

DEFAULT_COUNT = 20
MAX_COUNT = 1000
MAX_PARAMETERS = 50  # name=value pairs in one search (_count, _sort, _include... included)
MAX_VALUES = 200  # values in all (a,b,c counts three)
MAX_VALUE_LENGTH = 512  # characters of one value (what an index keeps is 255 at most)
SEARCH_LIMITS = (
    f"a search takes at most {MAX_PARAMETERS} parameters and {MAX_VALUES} values in all "
    f"(a,b,c counts three), each value at most {MAX_VALUE_LENGTH} characters"
)
SEARCH_SET_SECONDS = 3600  # how long a next link stays valid
SEARCH_SETS_PER_OWNER = 50  # the newest kept per caller; older ones' links expire early
RESULT_PARAMS = {"_count", "_sort", "_total", "_include", "_revinclude", "_summary", "_elements"}
FORMAT_PARAMS = {"_format", "_pretty"}
DATE_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
_PAIR = struct.Struct(">qi")

R = tables.resources


@dataclass(frozen=True)
class Criterion:
    """One search parameter with its OR-ed values; ``via`` when it is about other resources
    (a chain, ``subject.name=x``, or ``_has``), ``name`` then being the whole parameter."""

    name: str
    modifier: str | None
    values: tuple[str, ...]
    via: Via | None = None


@dataclass(frozen=True)
class Via:
    """A chain (``kind`` "chain": this type's reference parameter ``param`` points to a
    resource of one of the ``types`` that ``inner`` matches) or a reverse chain ("has": a
    resource of ``types[0]`` that ``inner`` matches points here by its parameter ``param``)."""

    kind: str
    param: str
    types: tuple[str, ...]
    inner: Criterion


@dataclass(frozen=True)
class Include:
    source_type: str
    param: str
    target_type: str | None
    iterate: bool = False  # applied to what is included too, not only to the matches

    def __str__(self) -> str:
        return ":".join(filter(None, (self.source_type, self.param, self.target_type)))


@dataclass
class SearchRequest:
    resource_type: str | None  # None: a compartment search over every type ($everything)
    criteria: list[Criterion] = field(default_factory=list)
    sort: list[tuple[str, bool]] = field(default_factory=list)  # (key, descending)
    count: int = DEFAULT_COUNT
    total: str = "accurate"  # none | estimate | accurate
    includes: list[Include] = field(default_factory=list)
    revincludes: list[Include] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # lenient handling: what was dropped
    notes: list[str] = field(default_factory=list)  # what the caller should know of the answer
    subsetting: Subsetting = field(default_factory=Subsetting)  # _summary, _elements
    compartment: str | None = None  # a patient's id: only resources in their compartment

    def query_string(self) -> str:
        """The parameters this search used, for its ``self`` link (what was ignored is not)."""
        parts: list[str] = []
        for criterion in self.criteria:
            name = criterion.name + (f":{criterion.modifier}" if criterion.modifier else "")
            parts.append(f"{name}={_quote(','.join(criterion.values))}")
        if self.sort:
            parts.append("_sort=" + ",".join(("-" if d else "") + k for k, d in self.sort))
        for name, includes in (("_include", self.includes), ("_revinclude", self.revincludes)):
            parts.extend(
                f"{name}{':iterate' if i.iterate else ''}={_quote(str(i))}" for i in includes
            )
        if self.total != "accurate":
            parts.append(f"_total={self.total}")
        parts.extend(self.subsetting.query())
        parts.append(f"_count={self.count}")
        return "&".join(parts)


def _quote(value: str) -> str:
    return quote(value, safe="|:/,-._~")


@dataclass(frozen=True)
class Access:
    """What a caller may see: everything, or only the compartments of some patients."""

    patients: frozenset[str] | None = None

    def clause(self, res_pk: Any) -> ColumnElement[bool] | None:
        if self.patients is None:
            return None
        clause: ColumnElement[bool] = res_pk.in_(
            sa.select(tables.compartment.c.res_pk).where(
                tables.compartment.c.patient_id.in_(sorted(self.patients))
            )
        )
        return clause

    @property
    def unrestricted(self) -> bool:
        return self.patients is None


EVERYONE = Access()


def _split_escaped(text: str, separator: str) -> list[str]:
    """Split at each ``separator`` that no backslash escapes, keeping the escapes."""
    parts, current, escaped = [], [], False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            current.append(char)
            escaped = True
        elif char == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _unescape(text: str) -> str:
    """``\\,`` ``\\|`` ``\\$`` ``\\\\`` as the character escaped; any other backslash kept."""
    out, escaped = [], False
    for char in text:
        if escaped:
            out.append(char if char in ",|$\\" else "\\" + char)
            escaped = False
        elif char == "\\":
            escaped = True
        else:
            out.append(char)
    return "".join(out) + ("\\" if escaped else "")


def split_values(text: str) -> list[str]:
    """Split a parameter value at unescaped commas, unescaping ``\\,`` ``\\|`` ``\\$``."""
    return [_unescape(value) for value in _split_escaped(text, ",")]


def criterion_values(kind: str, text: str) -> tuple[str, ...]:
    """A criterion's OR-ed values: unescaped, but for a composite, whose parts are split at
    unescaped ``$`` later (:func:`composite_parts`), escapes kept."""
    if kind == "composite":
        return tuple(_split_escaped(text, ","))
    return tuple(split_values(text))


def composite_parts(value: str) -> list[str]:
    """A composite value's parts (``code$value``), unescaped."""
    return [_unescape(part) for part in _split_escaped(value, "$")]


_WHOLE = re.compile(r"[0-9]{1,9}")


def whole_number(name: str, value: str, maximum: int = 999_999_999) -> int:
    """A non-negative decimal number a client wrote (ASCII digits only), capped at
    ``maximum``; 400 otherwise."""
    if not _WHOLE.fullmatch(value):
        raise InvalidRequest(f"{name}={value[:40]!r} is not a whole number (0 to 999999999)")
    return min(int(value), maximum)


def parse_search(
    resource_type: str | None,
    query: Sequence[tuple[str, str]],
    *,
    lenient: bool = False,
) -> SearchRequest:
    """A search request from query parameters (``?a=1&a=2`` is two AND-ed criteria)."""
    if resource_type is not None:
        check_type(resource_type)
    check_limits(query)
    request = SearchRequest(resource_type)
    params = SEARCH_PARAMS.get(resource_type or "", {})

    def refuse(message: str, name: str) -> None:
        if not lenient:
            raise InvalidRequest(message + " (or send Prefer: handling=lenient to ignore it)")
        request.ignored.append(name)

    summaries: list[str] = []
    elements: list[str] = []
    for raw_name, raw_value in query:
        name, _, modifier = raw_name.partition(":")
        if name in FORMAT_PARAMS:
            continue
        if name == "_count":
            request.count = whole_number("_count", raw_value, MAX_COUNT)
        elif name == "_total":
            if raw_value not in ("none", "estimate", "accurate"):
                raise InvalidRequest("_total must be none, estimate or accurate")
            request.total = raw_value
        elif name in ("_summary", "_elements"):
            (summaries if name == "_summary" else elements).append(raw_value)
            if raw_value == "count" and name == "_summary":
                request.count = 0
        elif name == "_sort":
            for key in split_values(raw_value):
                descending = key.startswith("-")
                key = key.lstrip("-")
                if key not in ("_id", "_lastUpdated") and (
                    key not in params
                    or params[key].type
                    in ("reference", "quantity", "number", "composite", "special")
                ):
                    refuse(f"cannot sort {resource_type} by {key!r}", f"_sort={key}")
                    continue
                request.sort.append((key, descending))
        elif name in ("_include", "_revinclude"):
            if modifier not in ("", "iterate", "recurse"):
                refuse(f"{raw_name} is not supported (only :iterate)", raw_name)
                continue
            iterate = bool(modifier)
            if name == "_include" and raw_value == "*" and resource_type is not None:
                request.includes.extend(
                    Include(resource_type, p, None, iterate)
                    for p, d in sorted(params.items())
                    if d.type == "reference"
                )
                continue
            include = _parse_include(raw_value, iterate)
            if include is None:
                refuse(f"{name}={raw_value!r} is not Type:parameter[:TargetType]", raw_name)
            elif name == "_include" and include.source_type != resource_type and not iterate:
                refuse(
                    f"_include={raw_value} starts from {include.source_type}, but this search "
                    f"returns {resource_type} (send _include:iterate to include from what is "
                    "included)",
                    raw_name,
                )
            else:
                (request.includes if name == "_include" else request.revincludes).append(include)
        elif raw_name.startswith("_has:") or "." in raw_name:
            try:
                if resource_type is None:
                    raise InvalidRequest(f"{raw_name}: chains and _has search one type")
                request.criteria.append(_chained(resource_type, raw_name, raw_value, 1))
            except InvalidRequest as exc:
                refuse(str(exc), raw_name)
        elif name in ("_id", "_lastUpdated") or name in params:
            problem = _check_criterion(resource_type or "", name, modifier or None, raw_value)
            if problem:
                refuse(problem, raw_name)
            else:
                kind = params[name].type if name in params else "token"
                criterion = Criterion(name, modifier or None, criterion_values(kind, raw_value))
                request.criteria.append(criterion)
                if name in params and params[name].type == "quantity" and not modifier:
                    notes = (caveat(parse_wanted(v)) for v in criterion.values)
                    request.notes.extend(n for n in notes if n and n not in request.notes)
                elif name in params and params[name].type == "composite":
                    other_kind = params[name].components[1][0]
                    parts = (composite_parts(v)[1] for v in criterion.values)
                    notes = (caveat(parse_wanted(q)) for q in parts if other_kind == "quantity")
                    request.notes.extend(n for n in notes if n and n not in request.notes)
        elif resource_type and unsupported(resource_type, name):
            refuse(str(unsupported(resource_type, name)), raw_name)
        else:
            known = ", ".join(["_id", "_lastUpdated", *sorted(params)])
            refuse(
                f"unknown search parameter {name!r} for {resource_type}; supported: {known}",
                raw_name,
            )
    try:
        request.subsetting = parse_subsetting(
            (resource_type,) if resource_type else RESOURCE_TYPES, summaries, elements
        )
    except InvalidRequest as exc:
        refuse(str(exc), "_elements" if elements else "_summary")
    return request


MAX_CHAIN = 3  # links of chains and _has in one parameter


def _criterion(types: tuple[str, ...], raw_name: str, raw_value: str, depth: int) -> Criterion:
    """A criterion on resources of ``types`` (one, or a chain's several targets), chained or
    plain; InvalidRequest saying why it cannot be searched."""
    if raw_name.startswith("_has:") or "." in raw_name:
        if len(types) > 1:
            raise InvalidRequest(
                f"{raw_name}: name the type the chain goes through (e.g. subject:Patient.x)"
            )
        return _chained(types[0], raw_name, raw_value, depth + 1)
    name, _, modifier = raw_name.partition(":")
    for resource_type in types:
        if name not in ("_id", "_lastUpdated") and name not in SEARCH_PARAMS[resource_type]:
            raise InvalidRequest(f"{resource_type} has no search parameter {name!r}")
        problem = _check_criterion(resource_type, name, modifier or None, raw_value)
        if problem:
            raise InvalidRequest(problem)
    if name not in ("_id", "_lastUpdated") and (
        len({SEARCH_PARAMS[t][name].type for t in types}) > 1
    ):
        raise InvalidRequest(f"{raw_name}: {name} is not of one kind in {', '.join(types)}")
    kind = SEARCH_PARAMS[types[0]][name].type if name in SEARCH_PARAMS[types[0]] else "token"
    return Criterion(name, modifier or None, criterion_values(kind, raw_value))


def _chained(resource_type: str, raw_name: str, raw_value: str, depth: int) -> Criterion:
    """``param[:Type].rest`` (a chain) or ``_has:Type:param:rest`` (a reverse chain) on
    ``resource_type``."""
    if depth > MAX_CHAIN:
        raise InvalidRequest(f"{raw_name}: at most {MAX_CHAIN} chained or _has links")
    if raw_name.startswith("_has:"):
        parts = raw_name.split(":", 3)
        if len(parts) != 4 or not parts[3]:
            raise InvalidRequest("_has is _has:Type:reference-parameter:parameter=value")
        _, source, param_name, rest = parts
        if source not in RESOURCE_TYPES:
            raise InvalidRequest(f"_has: this server does not host {source[:64]!r}")
        param = SEARCH_PARAMS[source].get(param_name)
        if (
            param is None
            or param.type != "reference"
            or (param.targets and resource_type not in param.targets)
        ):
            raise InvalidRequest(
                f"_has: {source} has no reference parameter {param_name!r} that may point "
                f"to a {resource_type}"
            )
        inner = _criterion((source,), rest, raw_value, depth)
        return Criterion(raw_name, None, inner.values, Via("has", param_name, (source,), inner))
    head, _, rest = raw_name.partition(".")
    param_name, _, target = head.partition(":")
    param = SEARCH_PARAMS[resource_type].get(param_name)
    if param is None or param.type != "reference":
        raise InvalidRequest(
            f"{raw_name}: {resource_type} has no reference parameter {param_name!r} to chain"
        )
    if target and (target not in RESOURCE_TYPES or (param.targets and target not in param.targets)):
        raise InvalidRequest(f"{raw_name}: {param_name} does not point to {target[:64]!r}")
    inner_name = rest.split(":")[0].split(".")[0]
    candidates = (target,) if target else (param.targets or RESOURCE_TYPES)
    types = tuple(
        t
        for t in candidates
        if inner_name in ("_id", "_lastUpdated", "_has") or inner_name in SEARCH_PARAMS[t]
    )
    if not types:
        raise InvalidRequest(
            f"{raw_name}: no type that {param_name} may point to has a parameter {inner_name!r}"
        )
    inner = _criterion(types, rest, raw_value, depth)
    return Criterion(raw_name, None, inner.values, Via("chain", param_name, types, inner))


def check_limits(query: Sequence[tuple[str, str]]) -> None:
    """TooCostly (400) naming the limit when a search is beyond :data:`SEARCH_LIMITS`."""
    if len(query) > MAX_PARAMETERS:
        raise TooCostly(f"{len(query)} search parameters: {SEARCH_LIMITS}")
    values = 0
    for name, value in query:
        if len(name) > MAX_VALUE_LENGTH:
            raise TooCostly(f"a parameter name of {len(name)} characters: {SEARCH_LIMITS}")
        if len(value) > 2 * (MAX_VALUE_LENGTH + 1) * MAX_VALUES:  # longer than all may be,
            # escapes (\\,) and commas included: not worth splitting
            raise TooCostly(f"{name[:40]}: {len(value)} characters: {SEARCH_LIMITS}")
        split = split_values(value)
        values += len(split)
        if values > MAX_VALUES:
            raise TooCostly(f"more than {MAX_VALUES} search values: {SEARCH_LIMITS}")
        longest = max(len(item) for item in split)
        if longest > MAX_VALUE_LENGTH:
            raise TooCostly(f"{name[:40]}: a value of {longest} characters: {SEARCH_LIMITS}")


def _parse_include(text: str, iterate: bool = False) -> Include | None:
    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[0] not in RESOURCE_TYPES:
        return None
    param = SEARCH_PARAMS[parts[0]].get(parts[1])
    if param is None or param.type != "reference":
        return None
    target = parts[2] if len(parts) == 3 else None
    if target is not None and target not in RESOURCE_TYPES:
        return None
    return Include(parts[0], parts[1], target, iterate)


def _check_criterion(
    resource_type: str, name: str, modifier: str | None, raw_value: str
) -> str | None:
    """Why a criterion cannot be searched, or None."""
    if name == "_id":
        kind = "token"
    elif name == "_lastUpdated":
        kind = "date"
    else:
        kind = SEARCH_PARAMS[resource_type][name].type
    if modifier == "missing":
        if kind == "composite":
            return f"{name} is a composite parameter: :missing is not supported on it"
        return None if raw_value in ("true", "false") else f"{name}:missing takes true or false"
    allowed = {
        "token": (None, "not", "text", "of-type"),
        "uri": (None, "below", "above"),
        "quantity": (None,),
        "number": (None,),
        "string": (None, "exact", "contains"),
        "date": (None,),
        "reference": (None, "identifier", *RESOURCE_TYPES),
        "composite": (None,),
        "special": (None,),
    }[kind]
    if modifier not in allowed:
        return f"the modifier :{modifier} is not supported on {name} ({kind})"
    if kind == "special":
        for value in split_values(raw_value):
            try:
                _near(value) if name == NEAR else _words(name, value)
            except ValueError as exc:
                return str(exc)
        return None
    if kind != "composite":
        problems = (_value_problem(kind, name, modifier, v) for v in split_values(raw_value))
        return next(filter(None, problems), None)
    other_kind = SEARCH_PARAMS[resource_type][name].components[1][0]
    for value in criterion_values(kind, raw_value):
        parts = composite_parts(value)
        if len(parts) != 2:
            return f"{name} takes two parts joined by $ (e.g. code$value), not {value[:80]!r}"
        token, other = parts
        if token == "" or token.endswith("|"):
            return f"{name}: the first part of {value[:80]!r} must name a code"
        problem = _value_problem("token", name, None, token) or _value_problem(
            other_kind, name, None, other
        )
        if problem:
            return problem
    return None


def _value_problem(kind: str, name: str, modifier: str | None, value: str) -> str | None:
    """Why one value of a criterion cannot be searched, or None."""
    if value == "":
        return f"{name} has an empty value"
    if any(ord(char) < 32 for char in value):
        return f"{name} holds a control character"
    if modifier == "of-type" and value.count("|") < 2:
        return f"{name}:of-type takes type-system|type-code|value"
    if kind in ("quantity", "number"):
        if kind == "number" and "|" in value:
            return f"{name} is a number: it takes no unit"
        try:
            parse_wanted(value)
        except ValueError as exc:
            return f"{name}: {exc}"
    if kind == "date":
        prefix = value[:2] if value[:2].isalpha() else "eq"
        if prefix not in DATE_PREFIXES:
            return f"{name}: the prefix {prefix!r} is not supported"
        try:
            date_range(value[2:] if value[:2].isalpha() else value)
        except ValueError as exc:
            return f"{name}: {exc}"
    return None


# -- compiling criteria to SQL -----------------------------------------------------------------


def _date_condition(
    low: ColumnElement[int], high: ColumnElement[int], value: str
) -> ColumnElement[bool]:
    """A date criterion against index ranges [low, high), by the FHIR prefix semantics."""
    prefix = value[:2] if value[:2].isalpha() else "eq"
    pl, ph = date_range(value[2:] if value[:2].isalpha() else value)
    if prefix == "ap":  # R4: within 10 % of the gap between now and the date, either way
        slack = abs(time.time_ns() // 1000 - (pl + ph) // 2) // 10
        return sa.and_(low < ph + slack, high > pl - slack)
    if prefix == "eq":
        return sa.and_(low >= pl, high <= ph)
    if prefix == "ne":
        return sa.not_(sa.and_(low >= pl, high <= ph))
    if prefix == "gt":
        return high > ph
    if prefix == "lt":
        return low < pl
    if prefix == "ge":
        return high > pl
    if prefix == "le":
        return low < ph
    if prefix == "sa":
        return low >= ph
    return high <= pl  # eb


def _quantity_condition(table: sa.Table, wanted: Wanted) -> ColumnElement[bool]:
    """A quantity criterion against index rows: by base value in the wanted unit's dimension
    (rows derived by molar mass included), or by value as written (unit for unit when one is
    named)."""
    conditions: list[ColumnElement[bool]] = []
    if wanted.dimension:
        column = table.c.base
        conditions.append(table.c.dimension == wanted.dimension)
    else:
        column = table.c.value
        conditions.append(table.c.derived.is_(False))
        if wanted.system:
            conditions.append(table.c.system == wanted.system)
        if wanted.code:
            conditions.append(table.c.code == wanted.code)
    number, low, high = wanted.number, wanted.low, wanted.high
    within = sa.and_(column >= low, column < high)
    compare = {
        "eq": within,
        "ne": sa.not_(within),
        "gt": column > number,
        "sa": column > number,
        "lt": column < number,
        "eb": column < number,
        "ge": column >= number,
        "le": column <= number,
        "ap": sa.and_(
            column >= min(low, number - abs(number) / 10),
            column <= max(high, number + abs(number) / 10),
        ),
    }[wanted.prefix]
    return sa.and_(*conditions, compare)


def _token_condition(table: sa.Table, value: str) -> ColumnElement[bool]:
    if "|" in value:
        system, code = value.split("|", 1)
        if code == "":
            return table.c.system == system
        return sa.and_(table.c.code == code, table.c.system == system)
    return table.c.code == value


def _reference_target(
    param: SearchParam, modifier: str | None, value: str, base_url: str
) -> tuple[str | None, str]:
    target = parse_reference(value, base_url)
    if target is not None:
        return target
    if "/" in value:
        raise InvalidRequest(f"{param.name}={value!r} is not a reference this server holds")
    target_type = modifier or (param.targets[0] if len(param.targets) == 1 else None)
    return target_type, value


def selectivity_rank(resource_type: str, criterion: Criterion) -> int:
    """How narrow a criterion usually is (lower: fewer matches). The narrowest one drives the
    search from its index; the others are checked per candidate."""
    if criterion.modifier in ("not", "missing"):
        return 9
    if criterion.via is not None:
        return 3
    if criterion.name == "_id":
        return 0
    if criterion.name == "_lastUpdated":
        return 6
    param = SEARCH_PARAMS[resource_type][criterion.name]
    if param.type == "reference":
        return 1
    if param.type in ("quantity", "number"):
        return 5
    if param.type == "composite":  # a code and a value: rows of one code, usually few
        return 2
    if param.type == "special":  # words are read from every string of the type
        return 7
    if param.type == "token":
        return 2 if criterion.name == "identifier" else 4
    return 3 if param.type == "string" else 5


def criterion_clause(
    resource_type: str | tuple[str, ...],
    criterion: Criterion,
    base_url: str = "",
    *,
    driver: bool = True,
    resources: sa.FromClause = R,
    access: Access | None = None,
) -> ColumnElement[bool]:
    """The SQL condition on ``fhir_resources`` (as ``resources``: ``R`` unless it is a chain's
    inner criterion) for one criterion on resources of ``resource_type`` (or of several types,
    the targets of a chain): as the set of matching rows (``driver``), or as a check of one
    candidate row. ``access``: what the resources a chain or ``_has`` reaches must be in."""
    types = (resource_type,) if isinstance(resource_type, str) else resource_type
    name, modifier, values = criterion.name, criterion.modifier, criterion.values
    if criterion.via is not None:
        return _via_clause(types[0], criterion.via, base_url, resources, access)
    if name in ("_id", "_lastUpdated") and modifier == "missing":  # every resource has both
        return sa.false() if values[0] == "true" else sa.true()
    if name == "_id":
        clause = resources.c.id.in_(values)
        return sa.not_(clause) if modifier == "not" else clause
    if name == "_lastUpdated":
        return sa.or_(
            *(
                _date_condition(resources.c.last_updated, resources.c.last_updated + 1000, v)
                for v in values
            )
        )
    param = SEARCH_PARAMS[types[0]][name]
    names = param.union_of or (name,)  # whose rows hold the values
    if modifier in ("identifier", "of-type"):  # rows of their own in the token index
        words = tables.tokens
        matched = []
        for value in values:
            if modifier == "of-type":
                system, _, rest = value.partition("|")
                matched.append(sa.and_(words.c.system == system, words.c.code == rest))
            else:
                matched.append(_token_condition(words, value))
        return resources.c.res_pk.in_(
            sa.select(words.c.res_pk).where(
                words.c.type == types[0] if len(types) == 1 else words.c.type.in_(types),
                _param_in(words, [f"{n}:{modifier}" for n in names]),
                sa.or_(*matched),
            )
        )
    if modifier == "text":  # a token's words: a concept's text, its codings' displays
        words = tables.strings
        texts = [normalise_string(v) for v in values]
        return resources.c.res_pk.in_(
            sa.select(words.c.res_pk).where(
                words.c.type == types[0] if len(types) == 1 else words.c.type.in_(types),
                _param_in(words, [f"{n}:text" for n in names]),
                sa.or_(
                    *(words.c.value.startswith(t, autoescape=True) for t in texts),
                    *(words.c.value.contains(" " + t, autoescape=True) for t in texts),
                ),
            )
        )
    if param.type == "composite":
        return _composite_clause(types, param, values, resources, driver=driver)
    if param.type == "special":
        return _special_clause(types, name, values, resources)
    table = TABLE_OF[param.type]
    of_type = table.c.type == types[0] if len(types) == 1 else table.c.type.in_(types)
    rows = sa.select(table.c.res_pk).where(of_type, _param_in(table, names))
    if modifier == "missing":
        present = resources.c.res_pk.in_(rows)
        return sa.not_(present) if values[0] == "true" else present
    conditions = [
        _value_condition(param.type, table, modifier, value, param, base_url) for value in values
    ]
    if driver or modifier == "not":
        matching = resources.c.res_pk.in_(rows.where(sa.or_(*conditions)))
        return sa.not_(matching) if modifier == "not" else matching
    return sa.exists().where(
        table.c.res_pk == resources.c.res_pk, _param_in(table, names), sa.or_(*conditions)
    )


def _param_in(table: sa.FromClause, names: Sequence[str]) -> ColumnElement[bool]:
    """The rows of ``table`` under one of ``names`` (a parameter, or those it unites)."""
    return table.c.param == names[0] if len(names) == 1 else table.c.param.in_(names)


TABLE_OF: dict[str, sa.Table] = {
    "token": tables.tokens,
    "uri": tables.tokens,  # the whole URI as the code, with no system
    "string": tables.strings,
    "reference": tables.references,
    "date": tables.dates,
    "quantity": tables.quantities,
    "number": tables.quantities,
}


def _value_condition(
    kind: str,
    table: sa.Table,
    modifier: str | None,
    value: str,
    param: SearchParam,
    base_url: str,
) -> ColumnElement[bool]:
    """The condition an index row of ``table`` meets when it matches one value."""
    if kind == "token":
        return _token_condition(table, value)
    if kind == "uri":
        if modifier == "below":  # the URI or one under it, segment by segment
            condition = sa.or_(
                table.c.code == value,
                table.c.code.startswith(value.rstrip("/") + "/", autoescape=True),
            )
        elif modifier == "above":  # the URI or one it is under
            condition = sa.or_(
                table.c.code == value, sa.literal(value).startswith(table.c.code + "/")
            )
        else:
            condition = table.c.code == value
        return sa.and_(table.c.system == "", condition)
    if kind == "string":
        text = normalise_string(value)
        if modifier == "exact":  # as written (the normalised form narrows it first)
            return sa.and_(table.c.value == text, table.c.exact == value.strip())
        if modifier == "contains":
            return table.c.value.contains(text, autoescape=True)
        return table.c.value.startswith(text, autoescape=True)
    if kind == "date":
        return _date_condition(table.c.low, table.c.high, value)
    if kind in ("quantity", "number"):
        return _quantity_condition(table, parse_wanted(value))
    target_type, target_id = _reference_target(param, modifier, value, base_url)
    condition = table.c.target_id == target_id
    if target_type:
        condition = sa.and_(condition, table.c.target_type == target_type)
    return condition


def _composite_clause(
    types: tuple[str, ...],
    param: SearchParam,
    values: tuple[str, ...],
    resources: sa.FromClause,
    *,
    driver: bool,
) -> ColumnElement[bool]:
    """A composite criterion: for ``code$value``, a row of the other part's kind that matches
    ``value`` under the parameter name that carries ``code`` (of this composite, or of each
    composite it is the union of). A composite over the resource itself has no rows of its
    own: the resource has a row of its token part's parameter matching ``code`` and one of its
    other part's matching ``value`` (:attr:`SearchParam.parts_of`)."""
    kind = param.components[1][0]
    table, tokens = TABLE_OF[kind], tables.tokens
    own: list[str] = []  # the composites searched by rows of their own
    matched: list[ColumnElement[bool]] = []
    for name in param.union_of or (param.name,):
        parts_of = SEARCH_PARAMS[types[0]][name].parts_of
        if not parts_of:
            own.append(name)
            continue
        for value in values:
            token, other = composite_parts(value)
            code = sa.and_(tokens.c.param == parts_of[0], _token_condition(tokens, token))
            value_of = sa.and_(
                table.c.param == parts_of[1],
                _value_condition(kind, table, None, other, param, ""),
            )
            matched.append(
                sa.and_(
                    _rows_clause(types, tokens, code, resources, driver=driver),
                    _rows_clause(types, table, value_of, resources, driver=driver),
                )
            )
    if own:
        conditions = []
        for value in values:
            token, other = composite_parts(value)
            conditions.append(
                sa.and_(
                    table.c.param.in_([composite_param(n, token) for n in own]),
                    _value_condition(kind, table, None, other, param, ""),
                )
            )
        matched.append(_rows_clause(types, table, sa.or_(*conditions), resources, driver=driver))
    return sa.or_(*matched)


def _rows_clause(
    types: tuple[str, ...],
    table: sa.Table,
    condition: ColumnElement[bool],
    resources: sa.FromClause,
    *,
    driver: bool,
) -> ColumnElement[bool]:
    """The resource has a row of ``table`` meeting ``condition``: as a set of rows
    (``driver``) or as a check of one candidate."""
    of_type = table.c.type == types[0] if len(types) == 1 else table.c.type.in_(types)
    if driver:
        return resources.c.res_pk.in_(sa.select(table.c.res_pk).where(of_type, condition))
    return sa.exists().where(table.c.res_pk == resources.c.res_pk, of_type, condition)


_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")
NEAR_DEFAULT_KM = 5.0  # R4 leaves "near" without a distance to the server
_KM_PER_UNIT = {"km": 1.0, "m": 0.001, "[mi_i]": 1.609344, "mi": 1.609344}
_KM_PER_DEGREE = 111.195  # of latitude (a sphere of the Earth's mean radius)


def _words(name: str, value: str) -> list[str]:
    """The normalised words of a ``_text``/``_content`` value; ValueError when it has none."""
    words = re.findall(r"\w+", normalise_string(value))
    if not words:
        raise ValueError(f"{name}={value[:40]!r} holds no word to search for")
    return words


def _near(value: str) -> tuple[float, float, float]:
    """(latitude, longitude, distance in km) of ``near=latitude|longitude[|distance[|unit]]``
    (the unit km, m or [mi_i]; km when none is named); ValueError saying what is wrong."""
    parts = value.split("|")
    if not 2 <= len(parts) <= 4:
        raise ValueError("near takes latitude|longitude|distance|unit")
    try:
        latitude, longitude = float(parts[0]), float(parts[1])
        distance = float(parts[2]) if len(parts) > 2 and parts[2] else NEAR_DEFAULT_KM
    except ValueError:
        raise ValueError(
            f"near={value[:60]!r}: latitude, longitude and distance are numbers"
        ) from None
    unit = parts[3] if len(parts) > 3 and parts[3] else "km"
    if unit not in _KM_PER_UNIT:
        raise ValueError(f"near: the unit {unit[:20]!r} is not km, m or [mi_i]")
    if not (-90 <= latitude <= 90 and -180 <= longitude <= 180 and 0 <= distance <= 20_000):
        raise ValueError("near: latitude, longitude or distance out of range")
    return latitude, longitude, distance * _KM_PER_UNIT[unit]


def _special_clause(
    types: tuple[str, ...], name: str, values: tuple[str, ...], resources: sa.FromClause
) -> ColumnElement[bool]:
    """``_text`` and ``_content``: every word of a value begins a word of one of the
    resource's passages (``_text``) or strings (``_content``), or, for Chinese, is within
    one; values OR-ed. ``near``: Location.position within the distance, on a local flat
    approximation of the sphere (good to well under 1 % within a few hundred km; the 180th
    meridian is not crossed)."""
    matching: list[ColumnElement[bool]] = []
    for value in values:
        if name == NEAR:
            matching.append(resources.c.res_pk.in_(_near_rows(types, value)))
            continue
        required: list[ColumnElement[bool]] = []
        for word in _words(name, value):
            words = tables.strings.alias()
            condition = (
                words.c.value.contains(word, autoescape=True)
                if _CJK.search(word)
                else sa.or_(
                    words.c.value.startswith(word, autoescape=True),
                    words.c.value.contains(" " + word, autoescape=True),
                )
            )
            of_type = words.c.type == types[0] if len(types) == 1 else words.c.type.in_(types)
            rows = sa.select(words.c.res_pk).where(of_type, condition)
            if name == NARRATIVE:
                rows = rows.where(words.c.param == NARRATIVE)
            required.append(resources.c.res_pk.in_(rows))
        matching.append(sa.and_(*required))
    return sa.or_(*matching)


def _near_rows(types: tuple[str, ...], value: str) -> sa.Select[Any]:
    latitude, longitude, km = _near(value)
    degrees = km / _KM_PER_DEGREE  # of latitude
    shrink = max(math.cos(math.radians(latitude)), 1e-6)  # a degree of longitude, relative
    north, east = tables.quantities.alias(), tables.quantities.alias()
    return (
        sa.select(north.c.res_pk)
        .join(east, sa.and_(east.c.res_pk == north.c.res_pk, east.c.param == LONGITUDE))
        .where(
            north.c.type.in_(types),
            north.c.param == LATITUDE,
            north.c.value.between(latitude - degrees, latitude + degrees),
            east.c.value.between(longitude - degrees / shrink, longitude + degrees / shrink),
            (north.c.value - latitude) * (north.c.value - latitude)
            + (east.c.value - longitude) * (east.c.value - longitude) * (shrink * shrink)
            <= degrees * degrees,
        )
    )


def _unindexed(column: ColumnElement[str]) -> ColumnElement[str]:
    """``column`` in a form no index serves. The resources a chain or ``_has`` reaches are
    found from the inner criterion's own index rows (few, usually); without this, SQLite's
    planner, which has no statistics, prefers the index on the type and reads every resource
    (or reference) of the type to check each against them: 169 ms instead of a few at
    100,000 Observations."""
    return sa.func.coalesce(column, "")


def _via_clause(
    resource_type: str, via: Via, base_url: str, resources: sa.FromClause, access: Access | None
) -> ColumnElement[bool]:
    """A chain: this resource's reference ``via.param`` names a resource that ``via.inner``
    matches. ``_has``: a resource that ``via.inner`` matches names this one by ``via.param``.
    The resources reached must be current and, for a restricted caller, within ``access``
    (a patient learns nothing of resources outside their compartments this way either)."""
    other = tables.resources.alias()
    ref = tables.references.alias()
    of_type = _unindexed(other.c.type)
    reached: list[ColumnElement[bool]] = [
        of_type == via.types[0] if len(via.types) == 1 else of_type.in_(via.types),
        other.c.deleted.is_(False),
        criterion_clause(via.types, via.inner, base_url, resources=other, access=access),
    ]
    restriction = access.clause(other.c.res_pk) if access is not None else None
    if restriction is not None:
        reached.append(restriction)
    if via.kind == "chain":
        pointing = sa.select(ref.c.res_pk).where(
            ref.c.type == resource_type,
            ref.c.param == via.param,
            ref.c.target_type.in_(via.types),
            sa.tuple_(ref.c.target_type, ref.c.target_id).in_(
                sa.select(other.c.type, other.c.id).where(*reached)
            ),
        )
        return resources.c.res_pk.in_(pointing)
    pointed = sa.select(ref.c.target_id).where(
        ref.c.res_pk.in_(sa.select(other.c.res_pk).where(*reached)),
        _unindexed(ref.c.type) == via.types[0],
        _unindexed(ref.c.param) == via.param,
        ref.c.target_type == resource_type,
    )
    return sa.and_(resources.c.type == resource_type, resources.c.id.in_(pointed))


def _sort_key(resource_type: str, key: str, descending: bool) -> ColumnElement[Any]:
    if key == "_id":
        return R.c.id
    if key == "_lastUpdated":
        return R.c.last_updated
    param = SEARCH_PARAMS[resource_type][key]
    if param.type == "date":
        column = sa.func.max(tables.dates.c.high) if descending else sa.func.min(tables.dates.c.low)
        table = tables.dates
    elif param.type == "string":
        column = (
            sa.func.max(tables.strings.c.value)
            if descending
            else sa.func.min(tables.strings.c.value)
        )
        table = tables.strings
    else:
        column = (
            sa.func.max(tables.tokens.c.code) if descending else sa.func.min(tables.tokens.c.code)
        )
        table = tables.tokens
    return (
        sa.select(column)
        .where(table.c.res_pk == R.c.res_pk, _param_in(table, param.union_of or (key,)))
        .scalar_subquery()
    )


def match_query(
    request: SearchRequest, access: Access, base_url: str = "", *, limit: int | None = None
) -> sa.Select[Any]:
    """SELECT res_pk, version of every current match, in the request's order."""
    assert request.resource_type is not None
    resource_type = request.resource_type
    criteria = sorted(request.criteria, key=lambda c: selectivity_rank(resource_type, c))
    conditions: list[ColumnElement[bool]] = [R.c.deleted.is_(False)]
    if criteria and selectivity_rank(resource_type, criteria[0]) < 9:
        # the narrowest criterion's index rows (of this type only) find the candidates
        driver, criteria = criteria[0], criteria[1:]
        conditions.append(criterion_clause(resource_type, driver, base_url, access=access))
        if driver.name in ("_id", "_lastUpdated"):  # columns of R itself, not index rows
            conditions.append(R.c.type == resource_type)
    else:
        conditions.append(R.c.type == resource_type)
    conditions.extend(
        criterion_clause(resource_type, c, base_url, driver=False, access=access) for c in criteria
    )
    if request.compartment is not None:
        conditions.append(
            R.c.res_pk.in_(
                sa.select(tables.compartment.c.res_pk).where(
                    tables.compartment.c.patient_id == request.compartment
                )
            )
        )
    restriction = access.clause(R.c.res_pk)
    if restriction is not None:
        conditions.append(restriction)
    order: list[Any] = []
    for key, descending in request.sort:
        expression = _sort_key(request.resource_type, key, descending)
        order.append(expression.is_(None))  # resources without a value last, either way
        order.append(expression.desc() if descending else expression.asc())
    order.append(R.c.res_pk)
    query = sa.select(R.c.res_pk, R.c.version).where(*conditions).order_by(*order)
    return query if limit is None else query.limit(limit)


def match_query_across(
    requests: Sequence[SearchRequest], access: Access, base_url: str = ""
) -> sa.Select[Any]:
    """SELECT res_pk, version of every current match of several types' requests (one query,
    one ``_sort`` shared by all), merged in that order: each type's sort key taken as that
    type defines the parameter (resources without a value last, either way)."""
    sort = requests[0].sort
    parts = [
        match_query(request, access, base_url)
        .order_by(None)
        .add_columns(
            *(
                _sort_key(str(request.resource_type), key, descending).label(f"k{i}")
                for i, (key, descending) in enumerate(sort)
            )
        )
        for request in requests
    ]
    merged = sa.union_all(*parts).subquery()
    order: list[Any] = []
    for i, (_key, descending) in enumerate(sort):
        column = merged.c[f"k{i}"]
        order.extend((column.is_(None), column.desc() if descending else column.asc()))
    return sa.select(merged.c.res_pk, merged.c.version).order_by(*order, merged.c.res_pk)


# -- search sets and pages ---------------------------------------------------------------------


@dataclass
class Matches:
    """An ordered result: every match, or a page of a stored search set."""

    total: int
    pairs: list[tuple[int, int]]  # (res_pk, version) of this page
    offset: int
    count: int
    set_id: str | None  # the stored search set, when there is more than one page
    request: dict[str, Any]  # what produced it (for links)


def pack(pairs: Sequence[tuple[int, int]]) -> bytes:
    return b"".join(_PAIR.pack(pk, version) for pk, version in pairs)


def unpack(data: bytes) -> list[tuple[int, int]]:
    return [_PAIR.unpack_from(data, offset) for offset in range(0, len(data), _PAIR.size)]


def paginate(
    write_engine: Engine,
    pairs: list[tuple[int, int]],
    count: int,
    owner: str,
    kind: str,
    request: dict[str, Any],
) -> Matches:
    """The first page of ``pairs``; the whole list kept as a search set when it has more
    (the only time a search writes). ``request`` is kept with it, ``kind`` included."""
    request = {**request, "kind": kind}
    set_id = None
    if len(pairs) > count > 0:
        set_id = str(uuid.uuid4())
        now = time.time_ns() // 1000
        with write_engine.begin() as conn:
            conn.execute(
                tables.search_sets.delete().where(
                    tables.search_sets.c.created < now - SEARCH_SET_SECONDS * 1_000_000
                )
            )
            stale = (
                conn.execute(
                    sa.select(tables.search_sets.c.id)
                    .where(tables.search_sets.c.owner == owner)
                    .order_by(tables.search_sets.c.created.desc(), tables.search_sets.c.id)
                    .offset(SEARCH_SETS_PER_OWNER - 1)
                )
                .scalars()
                .all()
            )
            if stale:  # a caller's oldest sets make room: searching cannot fill the disk
                conn.execute(tables.search_sets.delete().where(tables.search_sets.c.id.in_(stale)))
            conn.execute(
                tables.search_sets.insert().values(
                    id=set_id,
                    created=now,
                    owner=owner,
                    kind=kind,
                    total=len(pairs),
                    request=json.dumps(request, sort_keys=True),
                    matches=pack(pairs),
                )
            )
    return Matches(len(pairs), pairs[:count], 0, count, set_id, request)


def page(conn: Connection, set_id: str, offset: int, count: int, owner: str) -> Matches:
    """A page of a stored search set; only its owner may read it."""
    gone = NotFound(f"the search {set_id[:36]!r} has expired or is not yours; run it again")
    try:
        uuid.UUID(set_id)
    except ValueError:
        raise gone from None
    row = conn.execute(
        sa.select(
            tables.search_sets.c.owner,
            tables.search_sets.c.total,
            tables.search_sets.c.request,
            tables.search_sets.c.created,
        ).where(tables.search_sets.c.id == set_id)
    ).first()
    limit = time.time_ns() // 1000 - SEARCH_SET_SECONDS * 1_000_000
    if row is None or row[0] != owner or row[3] < limit:
        raise gone
    total = int(row[1])
    offset = min(offset, total)
    count = min(count, total - offset)
    pairs: list[tuple[int, int]] = []
    if count > 0:
        data = conn.execute(
            sa.select(
                sa.func.substr(
                    tables.search_sets.c.matches,
                    sa.cast(offset * _PAIR.size + 1, sa.Integer),
                    sa.cast(count * _PAIR.size, sa.Integer),
                )
            ).where(tables.search_sets.c.id == set_id)
        ).scalar_one()
        pairs = unpack(bytes(data or b""))
    return Matches(total, pairs, offset, count, set_id, json.loads(row[2]))
