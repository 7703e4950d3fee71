"""``/peer``: what member nodes ask of each other, every request signed (docs/spec.md §10, §15).

- ``POST /peer/heads``: a push hint — "my chain has new blocks"; the replication worker
  runs its next round at once instead of waiting for its interval.
- ``POST /peer/checkpoints/sign``: the epoch's proposer asks for this node's BLS signature of
  a checkpoint. This node signs only heads it holds and has verified, under its newest
  roster, and never two different checkpoints of one epoch.
- ``POST /peer/checkpoints``: a certificate, stored once it verifies.
- ``POST /peer/access``: a member asks for a patient's records
  (:mod:`node.flows.access_decision`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import Blueprint, Response, g, request

from fhir_adapters.errors import FhirError, InvalidRequest
from ledger.canonical import canonical_bytes, parse_json
from ledger.errors import LedgerError
from node.base.errors import Refused
from node.consortium import checkpoints
from node.flows import access_decision
from node.ops import metrics
from node.web.context import caller, services
from node.web.ledger_api import verified_peer

bp = Blueprint("peer", __name__, url_prefix="/peer")

HINT_FILE = "replicate.hint"


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


@bp.errorhandler(Refused)
def refused(exc: Refused) -> Response:
    return _json({"error": str(exc)}, 409)


def _body() -> Any:
    try:
        return parse_json(request.get_data(cache=True))
    except LedgerError as exc:
        raise InvalidRequest(f"the body: {exc}") from None


def hint_path(directory: Path) -> Path:
    return directory / HINT_FILE


@bp.post("/heads")
def heads_hint() -> Response:
    with hint_path(services().config.directory).open("a") as hint:
        hint.write(g.peer + "\n")  # who spoke up: the worker stops backing off from it
    return _json({"ok": True})


@bp.post("/checkpoints/sign")
def sign_checkpoint() -> Response:
    """The epoch's proposer asks for this witness's signature (:func:`checkpoints.vote`)."""
    svc = services()
    return _json(checkpoints.vote(svc.config, svc.chain_store, svc.chain_writes, g.peer, _body()))


@bp.post("/checkpoints")
def receive_certificate() -> Response:
    """A certificate, stored once it verifies (:func:`checkpoints.receive`)."""
    svc = services()
    stored = checkpoints.receive(svc.config, svc.chain_store, svc.chain_writes, _body())
    return _json({"stored": stored})


@bp.post("/access")
def decide_access_request() -> Response:
    """A member asks for a patient's records (:mod:`node.flows.access_decision`)."""
    answered = access_decision.decide_access_request(services(), caller(), g.peer, _body())
    if answered.decision is not None:
        metrics.count_access_decision(
            answered.decision.decision, answered.decision.emergency, requester=g.peer
        )
    return Response(answered.body, mimetype="application/json")
