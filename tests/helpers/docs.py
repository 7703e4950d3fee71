"""The shell examples of the documentation, as tests read them: every fenced ``sh`` block of a
Markdown file with its line number, its commands (continuations joined, comments dropped),
the ``hrx`` arguments and gunicorn targets in them, and a block's text with its documented
paths and placeholders substituted for a sandbox's."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

FENCE = re.compile(r"^(?P<indent>\s*)```(?P<info>[^`\s]*)\s*$")
PLACEHOLDER = re.compile(r"<([A-Z][A-Z0-9_]*)>")  # <KEY>: a value to fill in, not a redirection
OPERATORS = {"|", "||", "&", "&&", ";", ";;", "(", ")"}
WRAPPERS = {"runuser", "sudo", "env", "exec"}  # commands that run the command after "--"


@dataclass(frozen=True)
class Block:
    path: str  # relative to the repository
    line: int  # of the opening fence, counted from 1
    text: str  # the block's lines, without the fences and the list item's indent

    @property
    def key(self) -> str:
        """The block's first line that is not a comment, without its trailing comment or
        continuation: how tests name it."""
        for line in self.text.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                return re.sub(r"(\s+#\s.*)?\s*\\?$", "", line.strip())
        raise ValueError(f"{self.where} holds no command")

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def sh_blocks(root: Path, relative: str) -> list[Block]:
    """Every fenced ``sh`` block of the Markdown file ``root/relative``."""
    blocks = []
    lines = (root / relative).read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent = len(opening["indent"])
        end = index + 1
        while end < len(lines) and not re.match(r"^\s*```\s*$", lines[end]):
            end += 1
        if end == len(lines):
            raise ValueError(f"{relative}:{index + 1}: a fence that is never closed")
        if opening["info"] == "sh":
            body = [
                line[indent:] if line[:indent].isspace() else line
                for line in lines[index + 1 : end]
            ]
            blocks.append(Block(relative, index + 1, "\n".join(body) + "\n"))
        index = end + 1
    return blocks


def logical_lines(text: str) -> list[str]:
    """The block's lines with ``\\`` continuations joined, blank lines and comment lines
    left out."""
    joined: list[str] = []
    pending = ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        whole = (pending + line).strip()
        pending = ""
        if whole and not whole.startswith("#"):
            joined.append(whole)
    if pending.strip():
        joined.append(pending.strip())
    return joined


def simple_commands(line: str) -> Iterator[list[str]]:
    """The words of each simple command of a shell line (split at pipes, ``&&``, ``;`` …),
    with its trailing ``# comment`` dropped; a placeholder ``<KEY>`` is the word ``KEY``."""
    lexer = shlex.shlex(PLACEHOLDER.sub(r"\1", line), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    words: list[str] = []
    for token in lexer:
        if token in OPERATORS:
            if words:
                yield words
            words = []
        else:
            words.append(token)
    if words:
        yield words


def _command_proper(words: list[str]) -> list[str]:
    """The command without leading ``NAME=value`` assignments and wrappers (``runuser -u U
    --``, ``sudo``)."""
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        words = words[1:]
    if words and words[0] in WRAPPERS:
        words = words[words.index("--") + 1 :] if "--" in words else words[1:]
        return _command_proper(words)
    return words


def optional_words(words: list[str]) -> list[str]:
    """Words with the brackets of documented optional parts (``[--db URL]``) taken off."""
    return [w.removeprefix("[").removesuffix("]") for w in words if w not in ("[", "]")]


def hrx_arguments(words: list[str]) -> list[str] | None:
    """The arguments of ``hrx`` when the command runs it — ``hrx ARGS``, a path ending in
    ``/hrx``, or ``docker compose run [--rm] hrx ARGS`` (the hospital's one-off service whose
    entrypoint is hrx) — else None."""
    words = _command_proper(words)
    if not words:
        return None
    if words[0] == "hrx" or words[0].endswith("/hrx"):
        return optional_words(words[1:])
    for prefix in (["docker", "compose", "run"], ["docker-compose", "run"]):
        if words[: len(prefix)] == prefix:
            rest = words[len(prefix) :]
            while rest and rest[0].startswith("-"):  # --rm
                rest = rest[1:]
            if rest and rest[0] == "hrx":
                return optional_words(rest[1:])
    return None


def gunicorn_targets(words: list[str]) -> tuple[str, str] | None:
    """``(config, application)`` of a gunicorn command (``-c python:MODULE``, the last
    argument ``MODULE:ATTRIBUTE``), else None."""
    words = _command_proper(words)
    if not words or words[0] != "gunicorn":
        return None
    config = words[words.index("-c") + 1] if "-c" in words else ""
    return config, words[-1]


def commands(block: Block) -> Iterator[tuple[str, list[str]]]:
    """Each simple command of the block, with the logical line it is on."""
    for line in logical_lines(block.text):
        for words in simple_commands(line):
            yield line, words


def substitute(text: str, substitutions: Mapping[str, str]) -> str:
    """The text with each pattern replaced, in order; a pattern that does not occur (any more)
    is an error naming it, so that a substitution which silently stopped matching fails."""
    for pattern, replacement in substitutions.items():
        if pattern not in text:
            raise AssertionError(f"the substitution of {pattern!r} matches nothing in:\n{text}")
        text = text.replace(pattern, replacement)
    return text
