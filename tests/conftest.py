"""Shared fixtures: a ledger database on each engine (SQLite file; a fresh PostgreSQL database
per test on the server at 127.0.0.1:5432) with its keys, and a real node per test module; this
process's own log lines, kept for tests/test_log_privacy.py, which runs last. The helpers the
fixtures are made with, and everything else the tests share, are in tests/helpers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.databases import postgres_database
from tests.helpers.ledgers import Ledger, make_ledger
from tests.helpers.logs import IN_PROCESS_LOG


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database, dropped after the test."""
    with postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def ledger_db(db_url: str, tmp_path: Path) -> Iterator[Ledger]:
    ledger = make_ledger(db_url, tmp_path)
    yield ledger
    ledger.store.close()


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def node(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real node process on each engine, shared by one test module."""
    from tests.helpers.nodes import running_node

    directory = tmp_path_factory.mktemp("node") / "hosp-a"
    if request.param == "sqlite":
        with running_node(directory) as server:
            yield server
    else:
        with postgres_database() as url, running_node(directory, url) as server:
            yield server


# -- every log line of the run, for tests/test_log_privacy.py ----------------------------------


@pytest.fixture(scope="session", autouse=True)
def _log_in_process_lines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Everything this process logs at INFO and above, formatted and filtered as a node's
    lines are, into a file beside the node processes' logs of the run."""
    import logging

    from node.base.logs import prepare_handler

    handler = prepare_handler(
        logging.FileHandler(tmp_path_factory.getbasetemp() / IN_PROCESS_LOG, encoding="utf-8")
    )
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(min(level, logging.INFO) or logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


def pytest_sessionstart(session: pytest.Session) -> None:
    """Byte-compile the project's packages once, before any test starts a node or a CLI
    process: each of those imports about a hundred of the project's modules, and where
    PYTHONDONTWRITEBYTECODE is set (it is on the machines CI runs on) every process would
    compile them all from source again, a quarter of a second each time."""
    import compileall

    root = Path(__file__).resolve().parent.parent
    for package in ("ledger", "consent", "exchange", "fhir_adapters", "node"):
        compileall.compile_dir(root / package, quiet=1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The log privacy check reads every log the run wrote: it runs last."""
    last = [item for item in items if item.module.__name__.endswith("test_log_privacy")]
    items[:] = [item for item in items if item not in last] + last


@pytest.fixture(autouse=True)
def _umask_kept() -> Iterator[None]:
    """``hrx`` sets its process's umask (077) when it runs; a command run in this process by a
    test must not change the files later tests make."""
    umask = os.umask(0o022)
    os.umask(umask)
    yield
    os.umask(umask)
