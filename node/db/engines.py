"""A node's database: its engines and its schema, kept current by Alembic migrations.

One database holds the ledger, the FHIR store and the node's users. ``engine`` reads;
``write_engine`` writes (on SQLite its transactions take the write lock when they begin, so
concurrent writers queue instead of failing). ``upgrade`` applies every migration not yet
applied (``hrx node upgrade``); a node refuses to serve a database that is behind.

On SQLite, the nonces of signed peer requests are kept in a file of their own beside the
database (``<database>-nonces``): checking a request then never queues behind a ledger commit
or a FHIR write for SQLite's one write lock (on a busy member that wait was most of a peer
request's time). The file is only a replay cache: it can be deleted while the node is stopped,
needs no backup and no migration (its one table is created when missing). PostgreSQL keeps
the nonces in its ``peer_nonces`` table, where inserts do not queue behind other writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from fhir_adapters.store.tables import metadata as fhir_metadata
from ledger.store import database_url, open_engine
from ledger.store.schema import metadata as ledger_metadata
from node.base.errors import ConfigError
from node.db.schema import metadata as node_metadata
from node.db.schema import nonces_table

MIGRATIONS = Path(__file__).with_name("migrations")
MODEL_METADATA = [ledger_metadata, fhir_metadata, node_metadata]  # what the migrations build


@dataclass
class Database:
    url: str
    engine: Engine
    write_engine: Engine
    # writes that must survive the process crashing, not the machine losing power: the nonces
    # of signed requests (a replay needs the nonce's request within minutes, and the machine
    # to have lost power in between); they then cost no wait for the disk
    nonce_engine: Engine

    def close(self) -> None:
        for engine in {self.engine, self.write_engine, self.nonce_engine}:
            engine.dispose()


def open_database(url: str) -> Database:
    engine = open_engine(url)
    if engine.dialect.name != "sqlite":
        return Database(url, engine, engine, engine)
    write_engine = open_engine(url, immediate=True)
    nonce_engine = open_engine(nonce_file_url(url), immediate=True, durable=False)
    nonces_table.create(nonce_engine, checkfirst=True)
    return Database(url, engine, write_engine, nonce_engine)


def nonce_file_url(url: str) -> str:
    """Where a SQLite database's replay nonces are kept (see the module docstring)."""
    parsed = sa.engine.make_url(database_url(url))
    if parsed.database in (None, "", ":memory:"):
        return url
    return parsed.set(database=f"{parsed.database}-nonces").render_as_string(hide_password=False)


def _alembic_config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = engine
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(
        _alembic_config(sa.create_engine("sqlite://"))
    ).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(database: Database) -> tuple[str | None, str]:
    """Apply every pending migration; returns (revision before, revision after)."""
    before = current_revision(database.write_engine)
    command.upgrade(_alembic_config(database.write_engine), "head")
    return before, head_revision()


def require_current(engine: Engine, directory: Path) -> None:
    current, head = current_revision(engine), head_revision()
    if current != head:
        raise ConfigError(
            f"the database is at schema revision {current or 'none'}, this hrx needs {head}; "
            f"apply the migrations with: hrx node upgrade --dir {directory}"
        )
