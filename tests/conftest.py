"""Shared fixtures: a ledger database on each engine (SQLite file; a fresh PostgreSQL database
per test on the server at 127.0.0.1:5432), keys, and a helper to build a small ledger."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledger import bls, keys
from ledger.roster import make_member, make_roster, sign_roster
from ledger.store import ChainStore

POSTGRES_ADMIN = os.environ.get(
    "HRX_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)
# One BLS key for every test member: making a proof of possession takes py_ecc ~0.15 s.
_BLS_KEY = bls.generate_secret_key(b"hrx-tests-bls-seed".ljust(32, b"\0"))


def _postgres_admin() -> Any:
    import psycopg

    try:
        return psycopg.connect(
            POSTGRES_ADMIN,
            autocommit=True,
            connect_timeout=3,
        )
    except psycopg.OperationalError as exc:
        message = f"no PostgreSQL server at {POSTGRES_ADMIN}: {exc}".strip()
        if os.environ.get("CI"):
            pytest.fail(f"{message} (CI is set: PostgreSQL tests must run)")
        pytest.skip(f"{message}; start one or set HRX_TEST_POSTGRES to run these tests")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database, dropped after the test."""
    admin = _postgres_admin()
    name = f"hrx_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@dataclass
class Ledger:
    """A ledger database with a one-member roster, and the keys behind it."""

    url: str
    store: ChainStore
    chain: str
    key: Ed25519PrivateKey
    key_path: Path
    authority: Ed25519PrivateKey


def make_ledger(url: str, directory: Path, chain: str = "hosp-a") -> Ledger:
    key_path = directory / f"{chain}.pem"
    key = keys.load_or_create_private_key(key_path)
    authority = keys.load_or_create_private_key(directory / "authority.pem")
    member = make_member(chain, f"Hospital {chain}", f"https://{chain}.example", key, _BLS_KEY)
    roster = make_roster("test", [member], quorum=1)
    store = ChainStore(url)
    store.initialise(roster, sign_roster(roster, authority), chain=chain, key_path=key_path)
    return Ledger(url, store, chain, key, key_path, authority)


@pytest.fixture
def ledger_db(db_url: str, tmp_path: Path) -> Iterator[Ledger]:
    ledger = make_ledger(db_url, tmp_path)
    yield ledger
    ledger.store.close()


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database for as long as the block runs."""
    admin = _postgres_admin()
    name = f"hrx_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def node(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real node process on each engine, shared by one test module."""
    from tests.nodes import running_node

    directory = tmp_path_factory.mktemp("node") / "hosp-a"
    if request.param == "sqlite":
        with running_node(directory) as server:
            yield server
    else:
        with postgres_database() as url, running_node(directory, url) as server:
            yield server


# -- every log line of the run, for tests/test_log_privacy.py ----------------------------------

IN_PROCESS_LOG = "in-process.log"  # under the run's base temporary directory


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
