"""A small ledger database (a one-member roster) with the keys behind it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledger import bls, keys, merkle
from ledger.canonical import canonical_bytes
from ledger.model import ZERO_HASH, block_hash
from ledger.roster import make_member, make_roster, sign_roster
from ledger.store import ChainStore

# One BLS key for every test member: making a proof of possession takes py_ecc ~0.15 s.
BLS_KEY = bls.generate_secret_key(b"hrx-tests-bls-seed".ljust(32, b"\0"))


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
    member = make_member(chain, f"Hospital {chain}", f"https://{chain}.example", key, BLS_KEY)
    roster = make_roster("test", [member], quorum=1)
    store = ChainStore(url)
    store.initialise(roster, sign_roster(roster, authority), chain=chain, key_path=key_path)
    return Ledger(url, store, chain, key, key_path, authority)


def signed_block(key: Ed25519PrivateKey, entries: list[Any], **header: Any) -> dict[str, Any]:
    """Block 0 of hosp-a holding ``entries`` exactly as given (well-formed or not), its
    ``tree_root`` computed over them and its header signed with ``key``: the faults of a
    member's own signing, which only the verifier's checks of each entry can find. ``header``
    overrides header fields (before signing)."""
    leaves = merkle.leaf_hashes([canonical_bytes(entry) for entry in entries])
    frontier = merkle.Frontier()
    frontier.extend(leaves)
    fields = {
        "v": 1,
        "chain": "hosp-a",
        "height": 0,
        "prev": ZERO_HASH,
        "first_seq": 0,
        "count": len(entries),
        "tree_size": len(entries),
        "tree_root": frontier.root().hex(),
        "time": "2026-11-22T09:30:00.000Z",
        "roster": 1,
        **header,
    }
    signature = keys.sign(key, keys.BLOCK_DOMAIN, block_hash(fields))
    return {"header": fields, "signature": signature, "entries": entries}


@contextmanager
def rows_changeable(store: ChainStore) -> Iterator[sa.Connection]:
    """A connection that may change and delete ledger rows, as an attacker with the database
    can (the triggers that refuse it are dropped, and made again afterwards)."""
    from ledger.store.schema import LEDGER_TABLES, create_schema

    with store.engine.begin() as conn:
        if store.is_postgres:
            conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
        else:
            for table in LEDGER_TABLES:
                conn.exec_driver_sql(f"DROP TRIGGER {table}_no_update")
                conn.exec_driver_sql(f"DROP TRIGGER {table}_no_delete")
        yield conn
    if not store.is_postgres:
        create_schema(store.engine)
