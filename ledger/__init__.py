"""The hrx ledger: the wire format of docs/spec.md §1–9 and everything that keeps it.

Canonical JSON (RFC 8785), RFC 9162 Merkle trees and proofs, Ed25519-signed blocks and
rosters, BLS12-381 keys for checkpoints, the append-only chain store with its
group-committing writer (SQLite or PostgreSQL), and the offline verifier that auditors run
(:mod:`.verify`; its chains on every core: :mod:`.verify_parallel`). Its one compiled part,
``_speedups`` (ledger/_speedups.c: a reader of canonical ledger text and the Merkle hashes), is
optional: without it :mod:`.verify` and :mod:`.merkle` take their pure-Python paths.
It knows nothing of Flask or FHIR, so the auditor and the benchmarks use it on its own.
"""
