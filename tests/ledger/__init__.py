"""Tests of the ledger package: entries, Merkle tree, signatures, rosters, store, verification."""
