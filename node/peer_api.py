"""``/peer``: what member nodes ask of each other, every request signed (DESIGN §7).

- ``POST /peer/heads``: a push hint — "my chain has new blocks"; the replication worker
  runs its next round at once instead of waiting for its interval.
- ``POST /peer/checkpoints/sign``: the epoch's proposer asks for this node's BLS signature of
  a checkpoint. This node signs only heads it holds and has verified, under its newest
  roster, and never two different checkpoints of one epoch.
- ``POST /peer/checkpoints``: a certificate, stored once it verifies.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, current_app, g, request

from fhir_adapters.errors import Conflict, FhirError, InvalidRequest
from ledger import checkpoint as checkpoints
from ledger.canonical import canonical_bytes, parse_json
from ledger.errors import LedgerError
from node.ledger_api import verified_peer

bp = Blueprint("peer", __name__, url_prefix="/peer")

HINT_FILE = "replicate.hint"
EPOCH_TOLERANCE_SLOTS = 120  # how far (in slots) an epoch may be from this node's clock


def _json(value: Any, status: int = 200) -> Response:
    return Response(canonical_bytes(value), status=status, mimetype="application/json")


@bp.before_request
def authenticate() -> None:
    g.peer = verified_peer()


@bp.errorhandler(FhirError)
def fhir_error(exc: FhirError) -> Response:
    return _json({"error": str(exc)}, exc.status)


@bp.errorhandler(LedgerError)
def ledger_error(exc: LedgerError) -> Response:
    return _json({"error": str(exc)}, 400)


def _body() -> Any:
    try:
        return parse_json(request.get_data(cache=True))
    except LedgerError as exc:
        raise InvalidRequest(f"the body: {exc}") from None


def hint_path(directory: Path) -> Path:
    return directory / HINT_FILE


@bp.post("/heads")
def heads_hint() -> Response:
    services = current_app.extensions["hrx"]
    with hint_path(services.config.directory).open("a") as hint:
        hint.write(g.peer + "\n")  # who spoke up: the worker stops backing off from it
    return _json({"ok": True})


@bp.post("/checkpoints/sign")
def sign_checkpoint() -> Response:
    services = current_app.extensions["hrx"]
    store = services.chain_store
    checkpoint = checkpoints.check_checkpoint(_body())
    roster = store.roster()
    _check_epoch(checkpoint["epoch"], services.config.slot_seconds)
    members = sorted(roster.member_ids())
    proposer = members[checkpoint["epoch"] % len(members)]
    if g.peer != proposer:
        raise Conflict(f"epoch {checkpoint['epoch']} is {proposer}'s to propose, not {g.peer}'s")
    if checkpoint["roster"] != roster.version:
        raise Conflict(
            f"the checkpoint names roster version {checkpoint['roster']}; this node is at "
            f"{roster.version}"
        )
    frozen = store.frozen_chains()
    for chain, head in checkpoint["heads"].items():
        if chain in frozen:
            raise Conflict(f"chain {chain} is frozen here (fork evidence): not signed")
        ours = store.block_at(chain, head["height"])
        if ours is None:
            raise Conflict(f"this node has not yet verified chain {chain} up to {head['height']}")
        if (ours.hash, ours.header["tree_root"], ours.header["tree_size"]) != (
            head["hash"],
            head["tree_root"],
            head["tree_size"],
        ):
            raise Conflict(f"chain {chain} at height {head['height']} is another block here")
    if not services.chain_writes.vote(checkpoint):
        raise Conflict(
            f"this node already signed another checkpoint of epoch {checkpoint['epoch']}"
        )
    from ledger import bls

    signature = checkpoints.sign(checkpoint, bls.read_secret_key(services.config.bls_key))
    return _json({"member": services.config.node_id, "signature": signature})


@bp.post("/checkpoints")
def receive_certificate() -> Response:
    services = current_app.extensions["hrx"]
    store = services.chain_store
    certificate = _body()
    roster = store.roster()
    # only under the newest roster: keys a later version removed count for nothing now
    checkpoint = checkpoints.verify_certificate(certificate, {roster.version: roster})
    _check_epoch(checkpoint["epoch"], services.config.slot_seconds)
    for chain, head in checkpoint["heads"].items():
        ours = store.block_at(chain, head["height"])
        if ours is not None and ours.hash != head["hash"]:
            raise Conflict(f"the certificate's {chain} at {head['height']} is another block here")
    stored = services.chain_writes.add_certificate(certificate)
    return _json({"stored": stored})


def _check_epoch(epoch: int, slot_seconds: int) -> None:
    """An epoch is a slot of wall time: none far from now is signed or stored (a member must
    not reserve votes for the future, nor pin "latest" with an epoch from far ahead)."""
    now = int(time.time() // slot_seconds)
    if abs(epoch - now) > EPOCH_TOLERANCE_SLOTS:
        raise Conflict(f"epoch {epoch} is not near the current slot {now}; check the clocks")
