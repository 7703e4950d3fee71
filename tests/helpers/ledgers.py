"""A small ledger database (a one-member roster) with the keys behind it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledger import bls, keys
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
