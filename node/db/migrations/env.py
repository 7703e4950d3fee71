"""Alembic environment for a node's database: run with the engine the caller hands over
(``config.attributes["engine"]``), never a URL from an ini file."""

from __future__ import annotations

from alembic import context

from node.db.engines import MODEL_METADATA


def run_migrations_online() -> None:
    engine = context.config.attributes["engine"]
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=MODEL_METADATA,
            render_as_batch=engine.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


run_migrations_online()
