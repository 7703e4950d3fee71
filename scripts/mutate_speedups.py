"""Mutation testing of the one C file, ledger/_speedups.c, against tests/ledger/test_speedups.py.

mutmut mutates only Python (scripts/mutation.sh); this script does for the compiled reader and
hashes what mutmut does for the trust core's Python. It copies the repository's source (not
.git, not mutants/) once per worker into a temporary directory, writes each mutant of
ledger/_speedups.c into the copy, compiles it there as setup.py would, and runs the tests from
the copy (where ``import ledger`` is the copy's, which is checked first):

    python3 scripts/mutate_speedups.py              # every mutant, two at a time
    python3 scripts/mutate_speedups.py --list       # the mutants, numbered, without running them
    python3 scripts/mutate_speedups.py --ids 12,40  # only those (numbers as --list prints them)
    python3 scripts/mutate_speedups.py --jobs 1 --timeout 60

It takes some 75 minutes on two cores (about 1000 mutants, a few seconds each; a survivor,
which runs every test, most of a minute).

The operators (only on code: never in comments, strings, or preprocessor lines):

- relational operators, to the boundary and to the negation (``<`` to ``<=`` and ``>=``, ``<=``
  to ``<`` and ``>``, ..., ``==`` and ``!=`` to each other);
- ``&&`` and ``||`` to each other;
- binary ``+`` and ``-`` (and ``+=``/``-=``) to each other; a unary minus before a name deleted;
- integer, hex and character literals (a unary minus counts as part of the literal) to c+1,
  c-1 and 0; but a returned ``-1`` only to ``0`` and a returned ``0`` only to ``-1`` (the
  callers test the sign: ``return -2`` for ``return -1`` would be a crowd of equivalents);
- a whole ``if`` statement without ``else`` deleted (``if (...) return ...;``, ``if (...)
  continue;``, ``if (...) { ... }``);
- the condition of an ``if``, ``while`` or ``for`` negated (not a lone comparison: the
  relational operators negate it already).

The module's tables at the end of the file (PyMethodDef, PyModuleDef, the init function) are
left alone: data the import itself checks, not code of the reader.

Mutants that give the same text are counted once. Each mutant is compiled like setup.py
(``gcc -shared -fPIC`` with the interpreter's CFLAGS, setup.py's ``-O2 -Wall -Wextra
-Werror=implicit-function-declaration``, Python's include directory, ``-lcrypto``); one that
does not compile is not viable. The tests are the file's, as
``python3 -m pytest -q -x -p no:cacheprovider tests/ledger/test_speedups.py`` runs them, with
``-n 0`` (the mutants run two at a time already), hypothesis derandomized, without its example
database and without shrinking (a verdict can be reproduced; a failing example need only be
found, not made small), and without the PostgreSQL cases (the same calls of the module as the
SQLite ones, at twice the time). They run in two steps: the quick tests first, then, for a
mutant they leave alive, the rest (the hypothesis test of generated entries, the verifier's
cases). A mutant the tests fail on, that crashes them, or that runs past the timeout is
killed; one they pass on survives. The script prints each survivor's line and diff, and exits
1 when one survives that is not on ALLOWED or ALLOWED_LINES (the equivalent mutants, each with
its reason).
"""

from __future__ import annotations

import argparse
import difflib
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCE = Path("ledger/_speedups.c")
TESTS = "tests/ledger/test_speedups.py"
PLUGIN = "mutate_speedups_profile"  # written into each copy: hypothesis without shrinking
PROFILE = """from hypothesis import Phase, settings

settings.register_profile(
    "mutants", phases=[Phase.explicit, Phase.generate], database=None, derandomize=True
)
settings.load_profile("mutants")
"""
COMMON = ["-q", "-x", "-p", "no:cacheprovider", "-n", "0", "-p", PLUGIN]
FULL = [*COMMON, "-m", "not postgres", TESTS]
SLOW = "generated_entries or the_verifier_gives"  # a hypothesis test; the verifier's cases
QUICK = [*FULL[:-1], "-k", f"not ({SLOW})", TESTS]
REST = [*FULL[:-1], "-k", SLOW, TESTS]  # with QUICK: FULL
TABLES = "static PyMethodDef"  # from here on: the module's tables and its init function
IGNORED = shutil.ignore_patterns(
    ".git", "mutants", "__pycache__", ".mypy_cache", ".ruff_cache", ".hypothesis", "*.egg-info"
)

# Mutants no input can tell from the original, with the reason: (line, the original line, the
# mutated line), the lines stripped of surrounding white space. The line numbers and mutant
# numbers (--list) are those of ledger/_speedups.c as this list was made: an entry whose line
# no longer reads so matches nothing, and the mutant is a survivor again to be looked at.
# Prefer a test that kills a mutant to an entry here.
NUL_END = (
    "a bytes object's buffer always ends in a NUL byte (ob_sval[size]); read at the end, it is "
    "refused as the bound check refuses"
)
ALLOWED: dict[tuple[int, str, str], str] = {
    # #18 (literal)
    (
        43,
        "if (b >= '0' && b <= '9') return b - '0';",
        "if (b >= '/' && b <= '9') return b - '0';",
    ): ("hex_digit: a byte below '0' then gives a negative value, refused as -1 is"),
    # #19 (literal)
    (43, "if (b >= '0' && b <= '9') return b - '0';", "if (b >= 0 && b <= '9') return b - '0';"): (
        "hex_digit: a byte below '0' then gives a negative value, refused as -1 is"
    ),
    # #52 (if deleted)
    (50, "if (c->end - c->p < count) return -1;", ""): NUL_END
    + ", and no continuation byte is NUL, so the scan stops there",
    # #54 (relational)
    (50, "if (c->end - c->p < count) return -1;", "if (c->end - c->p <= count) return -1;"): (
        "with exactly `count` bytes left, the string has no closing quote after them: refused"
    ),
    # #70 (literal)
    (52, "for (int i = 1; i < count; i++) {", "for (int i = 0; i < count; i++) {"): (
        "the first continuation byte is checked against [low, high], within [0x80, 0xBF], already"
    ),
    # #86 (return)
    (
        53,
        "if (c->p[i] < 0x80 || c->p[i] > 0xBF) return -1;",
        "if (c->p[i] < 0x80 || c->p[i] > 0xBF) return 0;",
    ): ("the scan goes on at the first continuation byte (in [low, high]), which is no lead byte"),
    # #91 (relational)
    (
        62,
        "if (c->p >= c->end || *c->p != '\"') return -1;",
        "if (c->p > c->end || *c->p != '\"') return -1;",
    ): NUL_END,
    # #99 (relational)
    (64, "while (c->p < c->end) {", "while (c->p <= c->end) {"): NUL_END,
    # #128 (relational)
    (
        70,
        "if (plain || c->p >= c->end) return -1;",
        "if (plain || c->p > c->end) return -1;",
    ): NUL_END,
    # #175 (relational)
    (
        75,
        "if (b != 'u' || c->end - c->p < 4) return -1;",
        "if (b != 'u' || c->end - c->p <= 4) return -1;",
    ): ("an escape \\u00XY is followed by the string's closing quote: 5 bytes at least"),
    # #177 (literal)
    (
        75,
        "if (b != 'u' || c->end - c->p < 4) return -1;",
        "if (b != 'u' || c->end - c->p < 5) return -1;",
    ): ("an escape \\u00XY is followed by the string's closing quote: 5 bytes at least"),
    # #178 (literal)
    (
        75,
        "if (b != 'u' || c->end - c->p < 4) return -1;",
        "if (b != 'u' || c->end - c->p < 3) return -1;",
    ): NUL_END + " (with 3 left, the fourth hex digit read is the NUL)",
    # #179 (literal)
    (
        75,
        "if (b != 'u' || c->end - c->p < 4) return -1;",
        "if (b != 'u' || c->end - c->p < 0) return -1;",
    ): NUL_END + " (hex_digit may then read one byte past the NUL: not observable)",
    # #219 (return)
    (
        78,
        "if (high < 0 || high > 1 || low < 0) return -1;",
        "if (high < 0 || high > 1 || low < 0) return 0;",
    ): ("the scan stops on the escape's first '0' (checked just before), where no caller goes on"),
    # #220 (literal)
    (79, "int code = high * 16 + low;", "int code = high * 17 + low;"): (
        "code is only compared with controls that have short escapes, 0x08-0x0D: high is 0"
    ),
    # #221 (literal)
    (79, "int code = high * 16 + low;", "int code = high * 15 + low;"): (
        "code is only compared with controls that have short escapes, 0x08-0x0D: high is 0"
    ),
    # #250 (return)
    (81, "return -1; /* these have short escapes */", "return 0; /* these have short escapes */"): (
        "the scan stops on the escape's first '0' (checked just before), where no caller goes on"
    ),
    # #253 (literal)
    (82, "c->p += 4;", "c->p += 3;"): (
        "the escape's last hex digit is scanned again as a character, which any ASCII letter is"
    ),
    # #254 (literal)
    (82, "c->p += 4;", "c->p += 0;"): (
        "the escape's 0, 0, X, Y are scanned again as characters, as ASCII digits and letters are"
    ),
    # #295 (literal)
    (
        89,
        "else if (b >= 0xE1 && b <= 0xEC) ok = continuation(c, 2, 0x80, 0xBF);",
        "else if (b >= 0xE0 && b <= 0xEC) ok = continuation(c, 2, 0x80, 0xBF);",
    ): ("0xE0 is taken by the branch before: the condition is the same"),
    # #329 (literal)
    (
        91,
        "else if (b >= 0xEE && b <= 0xEF) ok = continuation(c, 2, 0x80, 0xBF);",
        "else if (b >= 0xED && b <= 0xEF) ok = continuation(c, 2, 0x80, 0xBF);",
    ): ("0xED is taken by the branch before: the condition is the same"),
    # #363 (literal)
    (
        93,
        "else if (b >= 0xF1 && b <= 0xF3) ok = continuation(c, 3, 0x80, 0xBF);",
        "else if (b >= 0xF0 && b <= 0xF3) ok = continuation(c, 3, 0x80, 0xBF);",
    ): ("0xF0 is taken by the branch before: the condition is the same"),
    # #394 (literal)
    (95, "else ok = -1;", "else ok = -2;"): "ok is only tested for < 0",
    # #401 (return)
    (98, "return -1;", "return 0;"): (
        "an unterminated string ends the text, and every caller needs a byte after a string"
    ),
    # #406 (relational)
    (104, "if (c->p < c->end && *c->p == '-') {", "if (c->p <= c->end && *c->p == '-') {"): NUL_END,
    # #413 (literal)
    (105, "negative = 1;", "negative = 2;"): "negative is only tested for truth",
    # #417 (relational)
    (
        108,
        "if (c->p >= c->end || *c->p < '0' || *c->p > '9') return -1;",
        "if (c->p > c->end || *c->p < '0' || *c->p > '9') return -1;",
    ): NUL_END,
    # #423 (literal)
    (
        108,
        "if (c->p >= c->end || *c->p < '0' || *c->p > '9') return -1;",
        "if (c->p >= c->end || *c->p < '/' || *c->p > '9') return -1;",
    ): ("'/' then leaves the cursor where it was, on the '/', which no caller takes after a value"),
    # #428 (literal)
    (
        108,
        "if (c->p >= c->end || *c->p < '0' || *c->p > '9') return -1;",
        "if (c->p >= c->end || *c->p < '0' || *c->p > ':') return -1;",
    ): ("':' then leaves the cursor where it was, on the ':', which no caller takes after a value"),
    # #442 (literal)
    (114, "int digits = 0;", "int digits = -1;"): (
        "a number of 17 digits is above 2**53 - 1 and refused by the MAX_SAFE check anyway"
    ),
    # #444 (relational)
    (
        115,
        "while (c->p < c->end && *c->p >= '0' && *c->p <= '9') {",
        "while (c->p <= c->end && *c->p >= '0' && *c->p <= '9') {",
    ): NUL_END,
    # #461 (literal)
    (116, "if (++digits > 16) return -1;", "if (++digits > 17) return -1;"): (
        "a number of 17 digits is above 2**53 - 1 and refused by the MAX_SAFE check anyway"
    ),
    # #464 (return)
    (116, "if (++digits > 16) return -1;", "if (++digits > 16) return 0;"): (
        "the scan stops on the 17th digit, which no caller takes after a value"
    ),
    # #512 (relational)
    (130, "if (c->p < c->end && *c->p == '}') {", "if (c->p <= c->end && *c->p == '}') {"): NUL_END,
    # #520 (literal)
    (135, "Py_ssize_t previous_length = 0;", "Py_ssize_t previous_length = 1;"): (
        "previous_length is set before it is read (when previous is not NULL)"
    ),
    # #521 (literal)
    (135, "Py_ssize_t previous_length = 0;", "Py_ssize_t previous_length = -1;"): (
        "previous_length is set before it is read (when previous is not NULL)"
    ),
    # #524 (literal)
    (137, "const unsigned char *key = c->p + 1;", "const unsigned char *key = c->p + 0;"): (
        "every key is then compared with its opening quote before it: the same order"
    ),
    # #526 (literal)
    (
        138,
        "if (scan_string(c, 1) < 0) return -1;",
        "if (scan_string(c, 2) < 0) return -1;",
    ): "plain is only tested for truth",
    # #539 (relational)
    (
        141,
        "Py_ssize_t shorter = length < previous_length ? length : previous_length;",
        "Py_ssize_t shorter = length <= previous_length ? length : previous_length;",
    ): "of equal lengths, either is the shorter",
    # #554 (return)
    (
        143,
        "if (order > 0 || (order == 0 && previous_length >= length)) return -1;",
        "if (order > 0 || (order == 0 && previous_length >= length)) return 0;",
    ): ("the scan stops before the ':' after the key, which no caller takes after a value"),
    # #569 (if deleted)
    (148, "if (c->p >= c->end) return -1;", ""): NUL_END,
    # #570 (relational)
    (148, "if (c->p >= c->end) return -1;", "if (c->p > c->end) return -1;"): NUL_END,
    # #572 (return)
    (148, "if (c->p >= c->end) return -1;", "if (c->p >= c->end) return 0;"): (
        "an object ending the text: every caller needs a byte after it"
    ),
    # #587 (relational)
    (
        156,
        "if (c->p >= c->end || depth > MAX_DEPTH) return -1;",
        "if (c->p > c->end || depth > MAX_DEPTH) return -1;",
    ): NUL_END,
    # #592 (return)
    (
        156,
        "if (c->p >= c->end || depth > MAX_DEPTH) return -1;",
        "if (c->p >= c->end || depth > MAX_DEPTH) return 0;",
    ): (
        "a value not read leaves the cursor on its first byte, which no caller takes "
        "after a value; at the end of the text, every caller needs a byte after a value"
    ),
    # #604 (relational)
    (164, "if (c->p < c->end && *c->p == ']') {", "if (c->p <= c->end && *c->p == ']') {"): NUL_END,
    # #622 (relational)
    (
        169,
        "if (scan_value(c, depth + 1) < 0 || c->p >= c->end) return -1;",
        "if (scan_value(c, depth + 1) < 0 || c->p > c->end) return -1;",
    ): NUL_END,
    # #717 (literal)
    (
        235,
        "if (scan_string(c, 1) < 0) return -1;",
        "if (scan_string(c, 2) < 0) return -1;",
    ): "plain is only tested for truth",
    # #749 (literal)
    (
        240,
        "if (scan_string(c, 1) < 0) return -1;",
        "if (scan_string(c, 2) < 0) return -1;",
    ): "plain is only tested for truth",
    # #766 (literal)
    (
        244,
        "if (scan_string(c, 1) < 0) return -1;",
        "if (scan_string(c, 2) < 0) return -1;",
    ): "plain is only tested for truth",
    # #879 (relational)
    (325, "if (c.p < c.end && *c.p == ']') {", "if (c.p <= c.end && *c.p == ']') {"): NUL_END,
    # #900 (if deleted)
    (
        338,
        "if (c.p >= c.end) {\n                outcome = -1;\n                break;\n            }",
        "",
    ): NUL_END,
    # #901 (relational)
    (338, "if (c.p >= c.end) {", "if (c.p > c.end) {"): NUL_END,
    # #903 (literal)
    (339, "outcome = -1;", "outcome = 0;"): (
        "at the end of the text, the header expected next is not there: refused"
    ),
}
# Lines every mutant of which is equivalent: the check after a number is redundant, as every
# caller of scan_integer refuses a '.', 'e', 'E' or digit after it (it takes only ',', '}',
# ']' or the text it expects); deleting the whole check survives too.
REDUNDANT = "the check is redundant: no caller of scan_integer takes . e E or a digit after it"
ALLOWED_LINES: dict[tuple[int, str], str] = {
    (121, "if (c->p < c->end && (*c->p == '.' || *c->p == 'e' || *c->p == 'E' ||"): REDUNDANT,
    (122, "(*c->p >= '0' && *c->p <= '9')))"): REDUNDANT,
    (123, "return -1; /* a float, or a leading zero */"): REDUNDANT,
}

# -- the C file's tokens ---------------------------------------------------------------------

TOKEN = re.compile(
    r"""
    (?P<preprocessor>(?m:^)[ \t]*\#[^\n]*(?:\\\n[^\n]*)*)
    |(?P<space>\n|[ \t\r\f\v]+)
    |(?P<comment>//[^\n]*|/\*.*?\*/)
    |(?P<string>"(?:\\.|[^"\\\n])*")
    |(?P<char>'(?:\\.|[^'\\\n])+')
    |(?P<number>0[xX][0-9a-fA-F]+[uUlL]*|[0-9]+[uUlL]*)
    |(?P<name>[A-Za-z_][A-Za-z_0-9]*)
    |(?P<punct><<=|>>=|->|\+\+|--|<=|>=|==|!=|&&|\|\||[-+*/%&|^]=|<<|>>|.)
    """,
    re.S | re.X,
)
KEYWORDS = {"return", "case", "sizeof", "else", "do", "goto"}
RELATIONAL = {
    "<": ["<=", ">="],
    "<=": ["<", ">"],
    ">": [">=", "<="],
    ">=": [">", "<"],
    "==": ["!="],
    "!=": ["=="],
}
SWAPPED = {"&&": "||", "||": "&&", "+": "-", "-": "+", "+=": "-=", "-=": "+="}
CHAR_ESCAPES = {"n": 10, "t": 9, "r": 13, "0": 0, "\\": 92, "'": 39, '"': 34}


@dataclass(frozen=True)
class Token:
    kind: str
    text: str
    start: int
    end: int


@dataclass(frozen=True)
class Mutant:
    number: int
    operator: str
    line: int
    text: str  # the whole mutated file
    diff: str
    key: tuple[int, str, str]  # (line, original line, mutated line), stripped: ALLOWED's key


def tokens(source: str) -> list[Token]:
    """The file's tokens, without white space and comments."""
    found = []
    for match in TOKEN.finditer(source):
        kind = match.lastgroup or ""
        if kind not in ("space", "comment"):
            found.append(Token(kind, match.group(), match.start(), match.end()))
    return found


def _closing(code: list[Token], index: int) -> int:
    """The index of the bracket that closes the one at ``index``."""
    opening, closing = code[index].text, {"(": ")", "{": "}", "[": "]"}[code[index].text]
    depth = 0
    for at in range(index, len(code)):
        depth += (code[at].text == opening) - (code[at].text == closing)
        if depth == 0:
            return at
    raise ValueError(f"unbalanced {opening} at {code[index].start}")


def _statement_end(code: list[Token], index: int) -> int:
    """The index of the last token of the statement that starts at ``index``."""
    if code[index].text == "{":
        return _closing(code, index)
    if code[index].text == "if":
        after = _statement_end(code, _closing(code, index + 1) + 1)
        if after + 1 < len(code) and code[after + 1].text == "else":
            return _statement_end(code, after + 2)
        return after
    depth = 0
    for at in range(index, len(code)):
        depth += (code[at].text in "([{") - (code[at].text in ")]}")
        if depth == 0 and code[at].text == ";":
            return at
    raise ValueError(f"no end to the statement at {code[index].start}")


def _literal(token: Token) -> tuple[int, str] | None:
    """The value of a number or character token, and how it is written ('x' hex, 'c' char)."""
    if token.kind == "number":
        digits = token.text.rstrip("uUlL")
        return int(digits, 0), "x" if digits[:2] in ("0x", "0X") else "d"
    if token.kind == "char":
        body = token.text[1:-1]
        if not body.startswith("\\"):
            return ord(body), "c"
        if body[1] in CHAR_ESCAPES and len(body) == 2:
            return CHAR_ESCAPES[body[1]], "c"
        return None
    return None


def _written(value: int, style: str, suffix: str) -> str:
    if style == "c" and 0x20 <= value < 0x7F:
        return "'\\''" if value == 39 else "'\\\\'" if value == 92 else f"'{chr(value)}'"
    if style == "x" and value >= 0:
        return f"0x{value:02X}{suffix}"
    return f"{value}{suffix}"


def _operand_before(code: list[Token], index: int) -> bool:
    """Whether the token before ``index`` ends an operand (so the one at ``index`` is binary)."""
    if index == 0:
        return False
    before = code[index - 1]
    if before.kind == "name":
        return before.text not in KEYWORDS
    return before.kind in ("number", "char") or before.text in (")", "]")


def changes(source: str) -> list[tuple[str, int, int, str]]:
    """Every change of the operators: (operator, start, end, replacement)."""
    code = tokens(source)
    found: list[tuple[str, int, int, str]] = []
    for index, token in enumerate(code):
        text = token.text
        if token.kind == "punct" and text in RELATIONAL:
            for other in RELATIONAL[text]:
                found.append(("relational", token.start, token.end, other))
        elif token.kind == "punct" and text in ("&&", "||", "+=", "-="):
            kind = "logical" if text[0] in "&|" else "arithmetic"
            found.append((kind, token.start, token.end, SWAPPED[text]))
        elif token.kind == "punct" and text in ("+", "-"):
            if _operand_before(code, index):
                found.append(("arithmetic", token.start, token.end, SWAPPED[text]))
            elif text == "-" and code[index + 1].kind == "name":
                found.append(("unary minus", token.start, token.end, ""))
        elif token.kind in ("number", "char"):
            found += _literal_changes(code, index)
        elif token.kind == "name" and text == "if" and code[index - 1].text != "else":
            body_end = _statement_end(code, _closing(code, index + 1) + 1)
            if _statement_end(code, index) == body_end:  # no else
                found.append(("if deleted", token.start, code[body_end].end, ""))
        if token.kind == "name" and text in ("if", "while", "for") and code[index + 1].text == "(":
            close = _closing(code, index + 1)
            first, last = code[index + 2], code[close - 1]
            if text == "for":
                semicolons = [at for at in range(index + 2, close) if code[at].text == ";"]
                if semicolons[1] == semicolons[0] + 1:
                    continue  # for (;;)
                first, last = code[semicolons[0] + 1], code[semicolons[1] - 1]
            inside = [t.text for t in code[code.index(first) : code.index(last) + 1]]
            if sum(t in RELATIONAL for t in inside) == 1 and not {"&&", "||", "!", "?"} & set(
                inside
            ):
                continue  # one comparison: its negation is a relational mutant already
            condition = source[first.start : last.end]
            found.append(("negated", first.start, last.end, f"!({condition})"))
    limit = source.index(TABLES)
    return [change for change in found if change[1] < limit]


def _literal_changes(code: list[Token], index: int) -> list[tuple[str, int, int, str]]:
    token = code[index]
    literal = _literal(token)
    if literal is None:
        return []
    value, style = literal
    start = token.start
    negative = code[index - 1].text == "-" and not _operand_before(code, index - 1)
    if negative:
        value, start = -value, code[index - 1].start
    if code[index - 1 - negative].text == "return" and value in (0, -1):
        return [("return", start, token.end, "0" if value else "-1")]
    suffix = token.text[len(token.text.rstrip("uUlL")) :] if token.kind == "number" else ""
    found = []
    for other in dict.fromkeys((value + 1, value - 1, 0)):
        if other != value:
            found.append(("literal", start, token.end, _written(other, style, suffix)))
    return found


def mutants(source: str) -> list[Mutant]:
    lines = source.splitlines(keepends=True)
    found: list[Mutant] = []
    seen = {source}
    for operator, start, end, replacement in changes(source):
        text = source[:start] + replacement + source[end:]
        if text in seen:
            continue
        seen.add(text)
        mutated = text.splitlines(keepends=True)
        line = source.count("\n", 0, start) + 1
        diff = "".join(difflib.unified_diff(lines, mutated, str(SOURCE), f"{SOURCE} (mutant)", n=0))
        changed_from = "".join(lines[line - 1 : line + source.count("\n", start, end)]).strip()
        last = line + text.count("\n", start, start + len(replacement))
        changed_to = "".join(mutated[line - 1 : last]).strip()
        key = (line, changed_from, changed_to)
        found.append(Mutant(len(found) + 1, operator, line, text, diff, key))
    return found


# -- building and testing in a copy ----------------------------------------------------------


def compile_command(copy: Path) -> list[str]:
    """How setup.py's build compiles and links the module (setuptools: CC, CFLAGS, CCSHARED,
    the extension's extra_compile_args, then LDSHARED with -lcrypto), in one gcc call."""
    flags = (sysconfig.get_config_var("CFLAGS") or "").split()
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    return [
        "gcc",
        "-shared",
        "-fPIC",
        *flags,
        "-O2",
        "-Wall",
        "-Wextra",
        "-Werror=implicit-function-declaration",
        f"-I{sysconfig.get_paths()['include']}",
        str(copy / SOURCE),
        "-o",
        str(copy / f"ledger/_speedups{suffix}"),
        "-lcrypto",
    ]


def build(copy: Path, text: str) -> bool:
    (copy / SOURCE).write_text(text)
    done = subprocess.run(compile_command(copy), capture_output=True, text=True, check=False)
    return done.returncode == 0


def run_tests(copy: Path, arguments: list[str], timeout: float) -> str:
    """'passed', 'failed' or 'timeout': the tests from the copy's directory."""
    process = subprocess.Popen(
        [sys.executable, "-m", "pytest", *arguments],
        cwd=copy,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        code = process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return "timeout"
    if code in (3, 4, 5):  # an internal error, a usage error, no tests: not the mutant's doing
        raise RuntimeError(f"pytest exited {code} in {copy} ({' '.join(arguments)})")
    return "passed" if code == 0 else "failed"


def check_import(copy: Path) -> None:
    """The tests run from the copy import the copy's ledger and its compiled module."""
    shown = subprocess.run(
        [sys.executable, "-c", "import ledger._speedups as s; print(s.__file__)"],
        cwd=copy,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(shown).resolve().is_relative_to(copy.resolve()), (shown, copy)


def outcome(copy: Path, mutant: Mutant, timeout: float) -> str:
    """'not viable', 'timeout', 'killed' or 'survived'."""
    if not build(copy, mutant.text):
        return "not viable"
    for arguments, limit in ((QUICK, timeout), (REST, 3 * timeout)):
        result = run_tests(copy, arguments, limit)
        if result != "passed":
            return "timeout" if result == "timeout" else "killed"
    return "survived"


def equivalent(mutant: Mutant) -> str | None:
    """Why ``mutant`` is on the allow-list, if it is."""
    first_line = mutant.key[1].splitlines()[0].strip() if mutant.key[1] else ""
    return ALLOWED.get(mutant.key) or ALLOWED_LINES.get((mutant.line, first_line))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="mutants at a time (default 2)")
    parser.add_argument(
        "--timeout", type=float, default=30, help="seconds for the quick tests (the rest: 3x)"
    )
    parser.add_argument("--ids", default="", help="only these mutants: 3,17,...")
    parser.add_argument("--list", action="store_true", help="print the mutants, run nothing")
    options = parser.parse_args()

    original = (REPO / SOURCE).read_text()
    every = mutants(original)
    chosen = every
    if options.ids:
        wanted = {int(number) for number in options.ids.split(",")}
        chosen = [mutant for mutant in every if mutant.number in wanted]
    if options.list:
        for mutant in chosen:
            print(f"#{mutant.number} line {mutant.line} ({mutant.operator})\n{mutant.diff}")
        print(f"{len(chosen)} mutants")
        return 0

    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mutate-speedups-") as temporary:
        copies: queue.Queue[Path] = queue.Queue()
        for worker in range(options.jobs):
            copy = Path(temporary) / f"copy{worker}"
            shutil.copytree(REPO, copy, ignore=IGNORED)
            (copy / f"{PLUGIN}.py").write_text(PROFILE)
            if not build(copy, original):
                print("the unchanged file does not compile", file=sys.stderr)
                return 2
            check_import(copy)
            copies.put(copy)
        first = copies.get()
        if run_tests(first, FULL, 3 * options.timeout) != "passed":
            print("the tests fail on the unchanged file", file=sys.stderr)
            return 2
        copies.put(first)
        print(f"{len(chosen)} mutants of {SOURCE}, {options.jobs} at a time", flush=True)

        def test(mutant: Mutant) -> tuple[Mutant, str]:
            copy = copies.get()
            try:
                verdict = outcome(copy, mutant, options.timeout)
            finally:
                copies.put(copy)
            print(f"#{mutant.number} line {mutant.line} {mutant.operator}: {verdict}", flush=True)
            return mutant, verdict

        with ThreadPoolExecutor(options.jobs) as pool:
            results = list(pool.map(test, chosen))

    elapsed = time.monotonic() - began
    counts = {verdict: 0 for verdict in ("killed", "timeout", "survived", "not viable")}
    for _, verdict in results:
        counts[verdict] += 1
    survivors = [mutant for mutant, verdict in results if verdict == "survived"]
    allowed = [mutant for mutant in survivors if equivalent(mutant)]
    for mutant in survivors:
        reason = equivalent(mutant)
        status = f"equivalent (allowed): {reason}" if reason else "SURVIVED"
        print(f"\n#{mutant.number} line {mutant.line} ({mutant.operator}): {status}")
        print(mutant.diff, end="")
    print(
        f"\nmutants: {len(results)}  killed: {counts['killed'] + counts['timeout']}"
        f" (of which timed out: {counts['timeout']})  survived: {len(survivors)}"
        f" (allowed as equivalent: {len(allowed)})  not viable: {counts['not viable']}"
        f"  time: {elapsed:.0f} s"
    )
    return 1 if len(survivors) > len(allowed) else 0


if __name__ == "__main__":
    sys.exit(main())
