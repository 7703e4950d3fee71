"""Checkpoints between witnesses: proposing one in this node's slot and gathering the other
witnesses' signatures (:class:`CheckpointProposer`), signing another's proposal
(:func:`vote`), and taking a certificate in (:func:`receive`).

Time is cut into slots of ``checkpoints.slot_seconds``; the proposer of slot e is witness e mod
n of the roster's n witnesses, sorted, and a certificate's epoch is its slot. A witness signs
only heads it holds and has verified, under its newest roster, never two different
checkpoints of one epoch, and never an epoch far from its clock.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ledger import checkpoint as checkpoints
from ledger.checkpoint import (
    make_certificate,
    make_checkpoint,
    verify_certificate,
    verify_signature,
)
from ledger.checkpoint import sign as sign_checkpoint
from ledger.errors import LedgerError, PeerUnavailable
from ledger.model import parse_time
from ledger.store import ChainStore, Head
from node.base.config import NodeConfig
from node.base.errors import Refused
from node.consortium.peers import SignedPeers

log = logging.getLogger(__name__)

EPOCH_TOLERANCE_SLOTS = 120  # how far (in slots) an epoch may be from this node's clock
NOT_YET_VERIFIED = "has not yet verified"  # a refusal the proposer asks again after


def vote(
    config: NodeConfig, store: ChainStore, writes: ChainStore, peer: str, proposal: Any
) -> dict[str, str]:
    """This witness's BLS signature of ``peer``'s proposed checkpoint, or Refused saying why
    not (see the module docstring)."""
    checkpoint = checkpoints.check_checkpoint(proposal)
    roster = store.roster()
    check_epoch(checkpoint["epoch"], config.slot_seconds)
    witnesses = sorted(roster.witnesses())
    if config.node_id not in witnesses:
        raise Refused(f"{config.node_id} is no witness in roster version {roster.version}")
    proposer = witnesses[checkpoint["epoch"] % len(witnesses)]
    if peer != proposer:
        raise Refused(f"epoch {checkpoint['epoch']} is {proposer}'s to propose, not {peer}'s")
    if checkpoint["roster"] != roster.version:
        raise Refused(
            f"the checkpoint names roster version {checkpoint['roster']}; this node is at "
            f"{roster.version}"
        )
    frozen = store.frozen_chains()
    for chain, head in checkpoint["heads"].items():
        if chain in frozen:
            raise Refused(f"chain {chain} is frozen here (fork evidence): not signed")
        ours = store.block_at(chain, head["height"])
        if ours is None:
            raise Refused(f"this node {NOT_YET_VERIFIED} chain {chain} up to {head['height']}")
        if (ours.hash, ours.header["tree_root"], ours.header["tree_size"]) != (
            head["hash"],
            head["tree_root"],
            head["tree_size"],
        ):
            raise Refused(f"chain {chain} at height {head['height']} is another block here")
    if not writes.vote(checkpoint):
        raise Refused(f"this node already signed another checkpoint of epoch {checkpoint['epoch']}")
    from ledger import bls  # py_ecc's import is slow: only when a signature is made

    signature = sign_checkpoint(checkpoint, bls.read_secret_key(config.bls_key))
    return {"member": config.node_id, "signature": signature}


def receive(config: NodeConfig, store: ChainStore, writes: ChainStore, certificate: Any) -> bool:
    """Store a certificate once it verifies under the newest roster (keys a later version
    removed count for nothing now) and names no block other than those held here; False when
    its epoch has one already."""
    roster = store.roster()
    checkpoint = verify_certificate(certificate, {roster.version: roster})
    check_epoch(checkpoint["epoch"], config.slot_seconds)
    for chain, head in checkpoint["heads"].items():
        ours = store.block_at(chain, head["height"])
        if ours is not None and ours.hash != head["hash"]:
            raise Refused(f"the certificate's {chain} at {head['height']} is another block here")
    return writes.add_certificate(certificate)


def check_epoch(epoch: int, slot_seconds: int) -> None:
    """An epoch is a slot of wall time: none far from now is signed or stored (a member must
    not reserve votes for the future, nor pin "latest" with an epoch from far ahead)."""
    now = int(time.time() // slot_seconds)
    if abs(epoch - now) > EPOCH_TOLERANCE_SLOTS:
        raise Refused(f"epoch {epoch} is not near the current slot {now}; check the clocks")


class CheckpointProposer:
    """Proposes checkpoints in this node's turn, gathers the members' signatures and, at the
    quorum, stores and sends the certificate to every witness (ordinary members fetch it when
    they need it: :mod:`node.consortium.worker`).

    Time is cut into slots of ``checkpoints.slot_seconds``; the proposer of slot e is witness
    e mod n of the roster's n witnesses, sorted, and a certificate's epoch is its slot; it asks
    the other witnesses to sign. In its slot a member
    proposes when the chains have grown since the newest certificate and either
    ``checkpoints.epoch_seconds`` have passed since it or the chains have ``epoch_blocks``
    new blocks: checkpoints come by time and by blocks, and a member that is down only costs
    its own slots."""

    RETRIES = 6  # rounds of asking members that have not yet verified the heads
    RETRY_SECONDS = 0.5

    def __init__(self, config: NodeConfig, store: ChainStore, peers: SignedPeers) -> None:
        self.config = config
        self.store = store
        self.peers = peers
        self._tried = -1

    def due(self, heads: dict[str, Head], now: float) -> bool:
        """Whether the chains moved enough since the newest certificate to certify them."""
        latest = self.store.certificate()
        if latest is None:
            return True
        certified = latest["checkpoint"]["heads"]
        grown = sum(
            head.header["height"] - certified.get(chain, {"height": -1})["height"]
            for chain, head in heads.items()
        )
        if grown <= 0:
            return False
        age = now - parse_time(latest["checkpoint"]["time"]).timestamp()
        return age >= self.config.epoch_seconds or grown >= self.config.epoch_blocks

    def maybe_propose(self, now: float) -> dict[str, Any] | None:
        slot = int(now // self.config.slot_seconds)
        if slot <= self._tried:
            return None
        roster = self.store.roster()
        witnesses = sorted(roster.witnesses())
        if witnesses[slot % len(witnesses)] != self.config.node_id:
            return None
        self._tried = slot
        frozen = self.store.frozen_chains()
        heads = {c: h for c, h in self.store.heads().items() if c not in frozen}
        if not heads or not self.due(heads, now):
            return None
        return self.propose(slot, make_checkpoint(slot, roster.version, heads))

    def propose(self, epoch: int, checkpoint: dict[str, Any]) -> dict[str, Any] | None:
        from ledger import bls

        roster = self.store.roster()
        signatures: dict[str, str] = {}
        if self.store.vote(checkpoint):
            secret = bls.read_secret_key(self.config.bls_key)
            signatures[self.config.node_id] = sign_checkpoint(checkpoint, secret)
        waiting = [m for m in sorted(roster.witnesses()) if m != self.config.node_id]
        for attempt in range(self.RETRIES):
            still = []
            for member in waiting:
                try:
                    answer = self.peers.post(member, "/peer/checkpoints/sign", checkpoint)
                    signature = answer.get("signature") if isinstance(answer, dict) else None
                    if not isinstance(signature, str):
                        raise LedgerError("its answer holds no signature")
                    verify_signature(checkpoint, roster, member, signature)
                    signatures[member] = signature
                except PeerUnavailable as exc:
                    if NOT_YET_VERIFIED in str(exc):
                        still.append(member)  # it is catching up: ask again shortly
                    else:
                        log.info("epoch %s: %s does not sign: %s", epoch, member, exc)
                except LedgerError as exc:
                    log.warning("epoch %s: %s's signature refused: %s", epoch, member, exc)
            waiting = still
            if not waiting or (len(signatures) >= roster.quorum and attempt):
                break
            time.sleep(self.RETRY_SECONDS)
        if len(signatures) < roster.quorum:
            log.warning(
                "epoch %s: %d of %d signatures needed; no certificate",
                epoch,
                len(signatures),
                roster.quorum,
            )
            return None
        certificate = make_certificate(checkpoint, signatures)
        verify_certificate(certificate, {roster.version: roster})
        self.store.add_certificate(certificate)
        for member in sorted(roster.witnesses()):  # ordinary members fetch it when they need
            if member != self.config.node_id:
                try:
                    self.peers.post(member, "/peer/checkpoints", certificate)
                except PeerUnavailable as exc:
                    log.info("epoch %s: certificate not delivered to %s: %s", epoch, member, exc)
        log.info("epoch %s certified by %s", epoch, ", ".join(certificate["signers"]))
        return certificate
