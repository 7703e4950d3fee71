"""Checkpoints (docs/spec.md §6): members co-sign the chain heads they have verified, with BLS.

A checkpoint is ``{"v": 1, "epoch", "time", "roster", "heads": {chain: {"height", "hash",
"tree_size", "tree_root"}}}``. Each member signs ``b"hrx/checkpoint/v1\\x00" +
SHA-256(JCS(checkpoint))`` with its BLS key; a certificate ``{"checkpoint", "signers"
(sorted ids), "signature" (the aggregate)}`` is valid when the signers are witnesses of the
roster version it names (members with the ``witness`` role, or with no roles listed), reach
that roster's quorum, and FastAggregateVerify holds over their keys (whose proofs of
possession the roster carries, ruling out rogue-key sums).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from ledger import keys
from ledger.canonical import canonical_bytes
from ledger.errors import CheckpointError, LedgerError
from ledger.model import check_chain_id, format_time, parse_time
from ledger.roster import Roster
from ledger.store import Head

VERSION = 1
_HEX64 = frozenset("0123456789abcdef")


def make_checkpoint(epoch: int, roster_version: int, heads: Mapping[str, Head]) -> dict[str, Any]:
    """The checkpoint of these heads (every chain with at least one block)."""
    return check_checkpoint(
        {
            "v": VERSION,
            "epoch": epoch,
            "time": format_time(),
            "roster": roster_version,
            "heads": {
                chain: {
                    "height": head.header["height"],
                    "hash": head.hash,
                    "tree_size": head.header["tree_size"],
                    "tree_root": head.header["tree_root"],
                }
                for chain, head in sorted(heads.items())
            },
        }
    )


def _hex64(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX64


def _count(value: Any) -> bool:
    return type(value) is int and 0 <= value < 2**62


def check_checkpoint(checkpoint: Any) -> dict[str, Any]:
    """The checkpoint, if it has exactly the form of §3; CheckpointError naming what is wrong."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError("a checkpoint must be a JSON object")
    if set(checkpoint) != {"v", "epoch", "time", "roster", "heads"}:
        raise CheckpointError("a checkpoint has exactly v, epoch, time, roster and heads")
    if type(checkpoint["v"]) is not int or checkpoint["v"] != VERSION:
        raise CheckpointError(f"checkpoint version {checkpoint['v']!r} is not {VERSION}")
    if not _count(checkpoint["epoch"]) or not _count(checkpoint["roster"]):
        raise CheckpointError("checkpoint epoch and roster must be whole numbers")
    try:
        parse_time(checkpoint["time"])
    except LedgerError as exc:
        raise CheckpointError(f"checkpoint time: {exc}") from None
    heads = checkpoint["heads"]
    if not isinstance(heads, dict):
        raise CheckpointError("checkpoint heads must be an object")
    for chain, head in heads.items():
        check_chain_id(chain)
        if (
            not isinstance(head, dict)
            or set(head) != {"height", "hash", "tree_size", "tree_root"}
            or not _count(head["height"])
            or not _count(head["tree_size"])
            or not _hex64(head["hash"])
            or not _hex64(head["tree_root"])
        ):
            raise CheckpointError(f"checkpoint head of {chain} is malformed")
    return checkpoint


def message(checkpoint: dict[str, Any]) -> bytes:
    """The bytes a member signs."""
    return keys.CHECKPOINT_DOMAIN + hashlib.sha256(canonical_bytes(checkpoint)).digest()


def sign(checkpoint: dict[str, Any], bls_secret_key: bytes) -> str:
    from ledger import bls

    return bls.sign(bls_secret_key, message(check_checkpoint(checkpoint))).hex()


def verify_signature(
    checkpoint: dict[str, Any], roster: Roster, member: str, signature: str
) -> None:
    """One member's signature of a checkpoint (before it is aggregated)."""
    from ledger import bls

    try:
        public = bytes.fromhex(roster.member(member)["bls"])
        raw = bytes.fromhex(signature)
    except (ValueError, LedgerError) as exc:
        raise CheckpointError(f"{member}'s checkpoint signature: {exc}") from None
    if not bls.verify(public, message(checkpoint), raw):
        raise CheckpointError(f"{member}'s checkpoint signature does not verify")


def make_certificate(checkpoint: dict[str, Any], signatures: Mapping[str, str]) -> dict[str, Any]:
    """The certificate of a checkpoint from its members' signatures (checked by the caller)."""
    from ledger import bls

    signers = sorted(signatures)
    aggregate = bls.aggregate([bytes.fromhex(signatures[m]) for m in signers])
    return {"checkpoint": checkpoint, "signers": signers, "signature": aggregate.hex()}


def verify_certificate(certificate: Any, rosters: Mapping[int, Roster]) -> dict[str, Any]:
    """The certificate's checkpoint, if the certificate holds; CheckpointError otherwise.

    ``rosters`` are the roster versions the verifier trusts (anchored), by version."""
    from ledger import bls

    if not isinstance(certificate, dict) or set(certificate) != {
        "checkpoint",
        "signers",
        "signature",
    }:
        raise CheckpointError("a certificate has exactly checkpoint, signers and signature")
    checkpoint = check_checkpoint(certificate["checkpoint"])
    roster = rosters.get(checkpoint["roster"])
    if roster is None:
        raise CheckpointError(
            f"certificate of epoch {checkpoint['epoch']} names roster version "
            f"{checkpoint['roster']}, which is not known"
        )
    signers = certificate["signers"]
    if (
        not isinstance(signers, list)
        or not all(isinstance(s, str) for s in signers)
        or signers != sorted(set(signers))
    ):
        raise CheckpointError("certificate signers must be member ids, sorted, each once")
    members = {m["id"]: m for m in roster.body["members"]}
    strangers = [s for s in signers if s not in members]
    if strangers:
        raise CheckpointError(
            f"certificate signers {strangers} are not in roster version {roster.version}"
        )
    witnesses = set(roster.witnesses())
    others = [s for s in signers if s not in witnesses]
    if others:
        raise CheckpointError(
            f"certificate signers {others} are not witnesses in roster version {roster.version}"
        )
    if len(signers) < roster.quorum:
        raise CheckpointError(
            f"certificate of epoch {checkpoint['epoch']} has {len(signers)} signer(s); the "
            f"quorum is {roster.quorum}"
        )
    try:
        aggregate = bytes.fromhex(certificate["signature"])
    except (TypeError, ValueError):
        raise CheckpointError("certificate signature is not hex") from None
    public_keys = [bytes.fromhex(members[s]["bls"]) for s in signers]
    if not bls.fast_aggregate_verify(public_keys, message(checkpoint), aggregate):
        raise CheckpointError(
            f"certificate of epoch {checkpoint['epoch']}: the aggregate signature does not verify"
        )
    return checkpoint
