"""A node's database: engines for SQLite or PostgreSQL (:mod:`.engines`), the node's own tables
in one place (:mod:`.schema`), and the Alembic migrations that keep a database current
(``migrations/``, which copy the table shapes they need instead of importing live tables).

May import: the domain packages, ``node.base``."""
