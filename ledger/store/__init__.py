"""The chain store: the ledger's tables on SQLAlchemy 2 (SQLite by default, PostgreSQL by URL),
the group-committing writer of a node's own chain, and reads, proofs and exports.

Tables (``ledger_roster``, ``ledger_blocks``, ``ledger_entries``) are append-only: triggers in
the database refuse UPDATE, DELETE (and, on PostgreSQL, TRUNCATE). Each entry row keeps the
entry's canonical bytes and the hashes of the Merkle subtrees that entry completes (see
:class:`ledger.merkle.Frontier`), so any inclusion or consistency proof takes O(log n) row
look-ups and no tree is ever rebuilt. ``ledger_settings`` is ordinary configuration (which
chain this database writes, where its key is), not part of the ledger.

Writing: :class:`ChainWriter` batches concurrent appenders (threads) into blocks — one
signature and one transaction per block — and returns from :meth:`ChainWriter.append` only
once that transaction has committed. Writers in other processes are serialised by the database
(SQLite ``BEGIN IMMEDIATE``; PostgreSQL ``pg_advisory_xact_lock`` on the chain), and every
transaction re-reads the chain head under that lock, so the chain never forks itself.

Modules: ``schema`` (tables, engines, triggers), ``chains`` (:class:`ChainStore`, every chain
held) and ``writer`` (:class:`ChainWriter`, the node's own chain).
"""

from ledger.store.chains import ChainStore, Head, StoredBlock
from ledger.store.schema import database_url, open_engine
from ledger.store.writer import ChainWriter

__all__ = ["ChainStore", "ChainWriter", "Head", "StoredBlock", "database_url", "open_engine"]
