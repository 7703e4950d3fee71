"""Shared fixtures: a ledger database on each engine (SQLite file; a fresh PostgreSQL database
per test on the server at 127.0.0.1:5432) with its keys, and a real node per test module; this
process's own log lines, and the check at the end of the run that no log line names a
patient (with xdist, each worker is a process of its own, and the controller checks). The
helpers the fixtures are made with, and everything else the tests share, are in tests/helpers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.browser import browser  # noqa: F401  # a fixture every test module may use
from tests.helpers.databases import postgres_database
from tests.helpers.ledgers import Ledger, make_ledger
from tests.helpers.logs import IN_PROCESS_LOG, leaks_in


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


# -- every log line of the run, for the log privacy check at the end ---------------------------


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


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Once every test is done (with xdist: in the controller, after every worker): no log
    line of the run names a patient (:func:`tests.helpers.logs.leaks_in`). A leak fails the
    run, listing the lines."""
    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller checks
        return
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None or session.testscollected == 0:
        return
    base = factory.getbasetemp()
    if not any(base.rglob(IN_PROCESS_LOG)):
        return  # no test of this run set up the session's logging (none was run)
    leaks = leaks_in(base)
    if leaks:
        session.config.get_terminal_writer().line(
            f"\n{len(leaks)} log line(s) of the run name a patient:\n" + "\n".join(leaks[:20]),
            red=True,
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


UMASK_AT_START = os.umask(0o022)
os.umask(UMASK_AT_START)


@pytest.fixture(autouse=True)
def _umask_kept() -> Iterator[None]:
    """``hrx`` and an app made in this process set the process's umask (077); what a test or a
    module's fixture ran must not change the files later tests make. Each test starts and ends
    with the umask the run started with."""
    os.umask(UMASK_AT_START)
    yield
    os.umask(UMASK_AT_START)
