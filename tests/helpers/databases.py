"""The PostgreSQL server of the tests (127.0.0.1:5432, or ``HRX_TEST_POSTGRES``) and a fresh
database on it; without a server the test is skipped (failed when ``CI`` is set)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

POSTGRES_ADMIN = os.environ.get(
    "HRX_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def postgres_admin() -> Any:
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


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database for as long as the block runs."""
    admin = postgres_admin()
    name = f"hrx_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
