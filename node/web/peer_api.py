"""``/peer``: what member nodes ask of each other, every request signed (docs/spec.md §10, §15).

- ``POST /peer/heads``: a notice — ``{"chain", "head"}``, the signed head a chain has grown
  to (sent by its author when it grows, and by an idle ordinary member as its heartbeat); a
  witness's replication worker follows it at once. The answer names the newest certificate
  held here (``{"certificate": epoch or null}``), so a member learns that it lacks one.
- ``POST /peer/checkpoints/sign``: the epoch's proposer asks for this node's BLS signature of
  a checkpoint. This node signs only heads it holds and has verified, under its newest
  roster, and never two different checkpoints of one epoch.
- ``POST /peer/checkpoints``: a certificate, stored once it verifies.
- ``POST /peer/access``: a member asks for a patient's records
  (:mod:`node.flows.access_decision`).
- ``POST /peer/export``: a member asks for the results of a cohort of patients at once, each
  decided as an access request; the answer streams as NDJSON
  (:mod:`node.flows.cohort_release`).
- ``POST /peer/consent-chains`` (and ``/peer/consent-chains/cohort``): an ordinary member
  deciding such a request (or a cohort's) asks a witness which chains hold the patients'
  consents.
- ``POST /peer/patient-history``: an ordinary member whose patient asks in its portal who
  accessed their records asks a witness for the entries about the patient, with their proofs
  (:mod:`node.flows.patient_history`).
- ``POST /peer/consults``, ``/peer/consults/report``, ``/peer/consults/cancel``: a member asks
  this one to read a study, sends back the signed report of one it asked, or cancels one
  (:mod:`node.flows.consults`).
- ``POST /peer/locator/holdings`` and ``POST /peer/locator/lookup``: a member updates the
  record locator with its holdings, or asks it which members hold a patient's results
  (registries only: :mod:`node.consortium.locator`, :mod:`node.flows.locator_lookup`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import Blueprint, Response, g, request

from fhir_adapters.errors import FhirError, InvalidRequest
from ledger.canonical import canonical_bytes, parse_json
from ledger.errors import LedgerError
from node.base.errors import Refused
from node.consortium import checkpoints, locator
from node.flows import access_decision, cohort_release, consults, locator_lookup, patient_history
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
def head_notice() -> Response:
    """A member's notice that a chain has grown (its signed head); the replication worker
    checks and follows it (nothing here is trusted before it is verified there)."""
    body = _body()
    if not isinstance(body, dict) or not isinstance(body.get("chain"), str):
        raise InvalidRequest('a notice is {"chain": <chain id>, "head": {header, signature}}')
    head = body.get("head")
    if head is not None and not isinstance(head, dict):
        raise InvalidRequest("a notice's head is {header, signature}")
    svc = services()
    line = canonical_bytes({"source": g.peer, "chain": body["chain"], "head": head})
    with hint_path(svc.config.directory).open("ab") as hint:
        hint.write(line + b"\n")  # one write: appends of several workers do not interleave
    return _json({"certificate": svc.chain_store.certificate_epoch()})


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


@bp.post("/patient-history")
def patient_history_entries() -> Response:
    """A witness sends an ordinary member the ledger entries about a patient who asked, in
    that member's portal, who accessed their records (:func:`patient_history.answer_history`)."""
    return _json(patient_history.answer_history(services(), caller(), g.peer, _body()))


@bp.post("/consent-chains")
def consent_chains() -> Response:
    """An ordinary member deciding an access request asks this witness which chains hold the
    patient's consents (:func:`access_decision.consent_chains`)."""
    return _json(access_decision.consent_chains(services(), g.peer, _body()))


@bp.post("/consent-chains/cohort")
def cohort_consent_chains() -> Response:
    """The same for a cohort export request, every patient at once
    (:func:`cohort_release.cohort_consent_chains`)."""
    return _json(cohort_release.cohort_consent_chains(services(), g.peer, _body()))


@bp.post("/locator/holdings")
def locator_holdings() -> Response:
    """A member's update of the record locator: which pseudonyms it holds results for, by
    category, with the newest date (:mod:`node.consortium.locator`); registries only."""
    svc = services()
    if svc.config.node_id not in svc.chain_store.roster().registries():
        raise Refused(f"{svc.config.node_id} runs no record locator (it has no registry role)")
    body = _body()
    holdings = locator.check_holdings(body.get("holdings") if isinstance(body, dict) else None)
    return _json({"stored": locator.record_holdings(svc.database.write_engine, g.peer, holdings)})


@bp.post("/locator/lookup")
def locator_lookup_request() -> Response:
    """A member asks which members hold a patient's results (:func:`locator_lookup.lookup`)."""
    return _json(locator_lookup.lookup(services(), caller(), g.peer, _body()))


@bp.post("/access")
def decide_access_request() -> Response:
    """A member asks for a patient's records (:mod:`node.flows.access_decision`)."""
    answered = access_decision.decide_access_request(services(), caller(), g.peer, _body())
    if answered.decision is not None:
        metrics.count_access_decision(
            answered.decision.decision, answered.decision.emergency, requester=g.peer
        )
    return Response(answered.body, mimetype="application/json")


@bp.post("/export")
def export_cohort() -> Response:
    """A member asks for a cohort's results (:mod:`node.flows.cohort_release`): every
    decision is made and recorded before the first byte is sent, then the lines stream."""
    svc = services()
    release = cohort_release.release_cohort(svc, caller(), g.peer, _body())
    for decision in release.decided:
        metrics.count_access_decision(decision, False, requester=g.peer)
    return Response(cohort_release.released_lines(svc, release), mimetype="application/x-ndjson")


@bp.post("/consults")
def receive_consult() -> Response:
    """A member asks this one to read a study (:func:`consults.receive_consult`)."""
    return _json(consults.receive_consult(services(), g.peer, _body()))


@bp.post("/consults/report")
def receive_report() -> Response:
    """The reader's signed report of a consult this node asked (:func:`consults.receive_report`)."""
    return _json(consults.receive_report(services(), g.peer, _body()))


@bp.post("/consults/cancel")
def receive_cancel() -> Response:
    """The requester cancelled a consult it asked of this node."""
    return _json(consults.receive_cancel(services(), g.peer, _body()))
