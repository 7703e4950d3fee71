"""The verifier's outcomes compared across ways of verifying (on every core, with and without
the compiled reader): what a verification gives, and every export and database case of
test_verify.py and test_verify_faults.py to run again under another way."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest

from ledger.errors import VerificationError
from ledger.verify import Summary
from tests.ledger import test_verify, test_verify_faults


def outcome(run: Callable[..., Summary], *args: Any, **options: Any) -> Any:
    """What a verification gives: its summary (and the order of its chains), what it observed
    and how many entries it reported, or its fault in every detail."""
    observed: list[dict[str, Any]] = []
    progressed: list[int] = []
    if "observe" in options:
        options = {**options, "observe": observed.append}
    try:
        summary = run(*args, progressed.append, **options)
    except VerificationError as exc:
        return ("fault", str(exc), exc.what, exc.chain, exc.height, exc.seq)
    return ("valid", summary, list(summary.chains), observed, sum(progressed))


def existing_cases() -> list[Any]:
    """Every test of test_verify.py and test_verify_faults.py that verifies an export or a
    database, each parametrized case on its own (but the one whose store appends while it is
    verified: a second verification finds more entries)."""
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
