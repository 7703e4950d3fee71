"""Receipts: one ledger entry with everything needed to check it offline.

A receipt (JSON) holds the entry; its RFC 9162 inclusion proof in a signed tree of its chain;
that block's header and signature; the rosters whose keys sign the block and the checkpoint;
and the newest checkpoint certificate that covers the entry, when there is one, in which
case the proof is made to exactly the tree the certificate names::

    {"receipt": 1, "entry": {...}, "inclusion": {"leaf_index", "tree_size", "audit_path"},
     "block": {"header": {...}, "signature": "..."},
     "rosters": [{"roster": {...}, "signature": "..."}], "certificate": {...} | null}

:func:`verify_receipt` checks all of it and says what it proves: that the member who keeps
the chain signed a tree containing exactly this entry and, with a certificate, that a quorum
of members co-signed that tree, so the entry cannot be altered or withdrawn without the
change showing as a fork. The roster's signature proves the members' keys only when the
verifier is given the authority's public key, the trust anchor handed out of band.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ledger import keys, merkle
from ledger.canonical import canonical_bytes
from ledger.checkpoint import verify_certificate
from ledger.errors import LedgerError, VerificationError
from ledger.model import block_hash, check_entry, check_header
from ledger.roster import Roster, open_roster
from ledger.store import ChainStore

VERSION = 1


def entry_proof(store: ChainStore, chain: str, seq: int) -> dict[str, Any]:
    """Entry ``seq`` of ``chain`` with its inclusion proof in the newest signed block of the
    chain and that block: ``{"entry", "inclusion", "block"}``, a receipt without rosters or
    certificate, for a reader who holds the rosters already (:func:`check_entry_proof`)."""
    entry = store.entry(chain, seq)
    block = store.head(chain)
    if block is None or block.header["tree_size"] <= seq:
        raise VerificationError(f"chain {chain} has no signed block holding seq {seq}")
    return {
        "entry": entry,
        "inclusion": store.inclusion_proof(chain, seq, block.header["tree_size"]),
        "block": {"header": block.header, "signature": block.signature},
    }


def check_entry_proof(proof: Any, roster_of: Callable[[int], Roster]) -> dict[str, Any]:
    """The entry of an :func:`entry_proof`, once its block's signature (by the key that
    ``roster_of(version)`` gives the chain) and its inclusion in the block's tree hold;
    VerificationError naming what does not."""
    try:
        if not isinstance(proof, dict) or set(proof) != {"entry", "inclusion", "block"}:
            raise VerificationError('an entry proof is {"entry", "inclusion", "block"}')
        entry = check_entry(proof["entry"])
        header = check_header(proof["block"]["header"])
        _check_signed_inclusion(
            entry, proof["inclusion"], proof["block"], roster_of(header["roster"])
        )
        return entry
    except VerificationError:
        raise
    except (LedgerError, KeyError, TypeError, ValueError) as exc:
        raise VerificationError(f"entry proof: {exc}") from None


def _check_signed_inclusion(
    entry: dict[str, Any], inclusion: Any, block: Any, roster: Roster
) -> tuple[dict[str, Any], bytes]:
    """The block's header and hash, once the block is signed by ``entry``'s chain under
    ``roster`` and the inclusion proof puts ``entry`` in the tree the block signs."""
    chain, seq = entry["chain"], entry["seq"]
    header = check_header(block["header"])
    if header["chain"] != chain:
        raise VerificationError(f"the block is of chain {header['chain']}, the entry of {chain}")
    if header["roster"] != roster.version:
        raise VerificationError(
            f"the block names roster version {header['roster']}, not {roster.version}"
        )
    digest = block_hash(header)
    try:
        keys.verify(roster.ed25519_key(chain), keys.BLOCK_DOMAIN, digest, block["signature"])
    except LedgerError as exc:
        raise VerificationError(f"block {header['height']} of {chain}: {exc}") from None
    if inclusion["leaf_index"] != seq or inclusion["tree_size"] != header["tree_size"]:
        raise VerificationError(
            "the inclusion proof is not for this entry in the tree the block signs"
        )
    merkle.verify_inclusion(
        merkle.leaf_hash(canonical_bytes(entry)),
        seq,
        header["tree_size"],
        [bytes.fromhex(h) for h in inclusion["audit_path"]],
        bytes.fromhex(header["tree_root"]),
    )
    return header, digest


def make_receipt(store: ChainStore, chain: str, seq: int) -> dict[str, Any]:
    """The receipt of entry ``seq`` of ``chain`` from a store (StoreError when unknown)."""
    entry = store.entry(chain, seq)
    certificate = store.certificate()
    covered = certificate is not None and (
        certificate["checkpoint"]["heads"].get(chain, {}).get("tree_size", 0) > seq
    )
    if covered and certificate is not None:
        height = certificate["checkpoint"]["heads"][chain]["height"]
        block = store.block_at(chain, height)
    else:
        certificate = None
        block = store.head(chain)
    if block is None:
        raise VerificationError(f"chain {chain} has no signed block holding seq {seq}")
    tree_size = block.header["tree_size"]
    proof = store.inclusion_proof(chain, seq, tree_size)
    versions = {block.header["roster"]}
    if certificate is not None:
        versions.add(certificate["checkpoint"]["roster"])
    rosters = [
        {"roster": body, "signature": signature}
        for body, signature in store.rosters()
        if body["version"] in versions
    ]
    return {
        "receipt": VERSION,
        "entry": entry,
        "inclusion": proof,
        "block": {"header": block.header, "signature": block.signature},
        "rosters": rosters,
        "certificate": certificate,
    }


def receipt_of_proof(store: ChainStore, proof: dict[str, Any]) -> dict[str, Any]:
    """The receipt of an :func:`entry_proof` received from another member (a chain this store
    does not hold), with the roster its block names from this store and no certificate."""
    version = proof["block"]["header"]["roster"]
    rosters = [
        {"roster": body, "signature": signature}
        for body, signature in store.rosters()
        if body["version"] == version
    ]
    return {"receipt": VERSION, **proof, "rosters": rosters, "certificate": None}


@dataclass(frozen=True)
class ReceiptSummary:
    chain: str
    seq: int
    entry_type: str
    time: str
    tree_size: int
    height: int
    anchored: bool  # the rosters' signatures were checked against the authority's key
    epoch: int | None  # the certificate's epoch, when the receipt has one
    signers: tuple[str, ...]
    quorum: int | None

    def describe(self) -> str:
        lines = [
            f"entry {self.seq} of chain {self.chain} ({self.entry_type}, {self.time}) is in the "
            f"tree of size {self.tree_size} that {self.chain} signed in block {self.height}",
        ]
        if self.epoch is not None:
            lines.append(
                f"checkpoint epoch {self.epoch} covers that tree, co-signed by "
                f"{len(self.signers)} members ({', '.join(self.signers)}; quorum {self.quorum}): "
                f"{self.chain} cannot alter or withdraw the entry without a visible fork"
            )
        else:
            lines.append(
                "no checkpoint certificate covers it yet: only the chain's own member vouches "
                "for it; fetch a new receipt after the next checkpoint"
            )
        if self.anchored:
            lines.append("the members' keys are those the consortium authority signed")
        else:
            lines.append(
                "the roster's signature was not checked against the authority's key "
                "(give --authority): the members' keys are taken on trust"
            )
        return "\n".join(lines)


def verify_receipt(receipt: Any, authority: Ed25519PublicKey | None = None) -> ReceiptSummary:
    """Check a receipt; VerificationError naming the first thing that does not hold."""
    try:
        return _verify(receipt, authority)
    except VerificationError:
        raise
    except (LedgerError, KeyError, TypeError, ValueError) as exc:
        raise VerificationError(f"receipt: {exc}") from None


def _verify(receipt: Any, authority: Ed25519PublicKey | None) -> ReceiptSummary:
    if not isinstance(receipt, dict) or receipt.get("receipt") != VERSION:
        raise VerificationError(f"not a receipt of version {VERSION}")
    entry = check_entry(receipt["entry"])
    chain, seq = entry["chain"], entry["seq"]
    rosters: dict[int, Roster] = {}
    for item in receipt["rosters"]:
        roster = open_roster(item["roster"], item["signature"], authority)
        rosters[roster.version] = roster
    version = check_header(receipt["block"]["header"])["roster"]
    if version not in rosters:
        raise VerificationError(f"the receipt lacks roster version {version}")
    header, digest = _check_signed_inclusion(
        entry, receipt["inclusion"], receipt["block"], rosters[version]
    )
    certificate = receipt.get("certificate")
    epoch, signers, quorum = None, (), None
    if certificate is not None:
        checkpoint = verify_certificate(certificate, rosters)
        head = checkpoint["heads"].get(chain)
        if head is None or head["hash"] != digest.hex() or head["tree_size"] != header["tree_size"]:
            raise VerificationError(
                f"checkpoint epoch {checkpoint['epoch']} does not name block {header['height']} "
                f"of {chain}"
            )
        epoch, signers = checkpoint["epoch"], tuple(certificate["signers"])
        quorum = rosters[checkpoint["roster"]].quorum
    return ReceiptSummary(
        chain=chain,
        seq=seq,
        entry_type=entry["type"],
        time=entry["time"],
        tree_size=header["tree_size"],
        height=header["height"],
        anchored=authority is not None,
        epoch=epoch,
        signers=signers,
        quorum=quorum,
    )
