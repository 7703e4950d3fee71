"""``/dicomweb``: the node's PACS as standard DICOMweb (QIDO-RS, WADO-RS with ``/rendered``
and ``/thumbnail``), read under consent, and ``/dicomweb/members/<id>``: another member's.

A request signed by a member node (RFC 9421, as on ``/peer``) is a member's read; any other
needs a bearer token of this node. The views parse the path (:mod:`node.flows.dicomweb_paths`),
call the flow (:mod:`node.flows.dicomweb`) and stream its answer. Only GET is served: images
come into the node from the PACS, never through here. An error is a JSON object
``{"error": ...}`` with its status, and the reason also in a ``Warning`` header (PS3.18 §8.7.3).
A web viewer served from another origin (OHIF) may call it when ``dicomweb.cors_origins`` names
that origin (CORS; preflights are answered by Flask's automatic OPTIONS). Behind the
deployment's nginx, which asks for the decision alone (``X-Hrx-Decide``, nginx's
``auth_request``), a refusal is answered 401 or 403 only: any other status would be nginx's
500.
"""

from __future__ import annotations

from collections.abc import Iterator

from flask import Blueprint, Response, request, stream_with_context

from fhir_adapters.errors import FhirError
from ledger.canonical import canonical_bytes
from ledger.errors import LedgerError
from node.flows import dicomweb
from node.flows.dicomweb_paths import parse_target
from node.web.context import authenticate, caller, services
from node.web.ledger_api import verified_peer

bp = Blueprint("dicomweb", __name__, url_prefix="/dicomweb")
DECIDE_HEADER = "X-Hrx-Decide"  # nginx asking for the decision alone (auth_request)


@bp.after_request
def cross_origin(response: Response) -> Response:
    """CORS headers for an origin ``dicomweb.cors_origins`` names (none for any other)."""
    origin = request.headers.get("Origin")
    if origin and origin in services().config.dicomweb_cors_origins:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Headers"] = "Authorization, Accept"
        response.headers["Access-Control-Allow-Methods"] = "GET, OPTIONS"
        response.headers["Access-Control-Expose-Headers"] = "Content-Location, Warning"
        response.headers["Access-Control-Max-Age"] = "600"
    if origin:
        response.vary.add("Origin")
    return response


@bp.errorhandler(FhirError)
def fhir_error(exc: FhirError) -> Response:
    if request.headers.get(DECIDE_HEADER) and exc.status not in (401, 403):
        return _error(403, str(exc))  # a proxy asking for the decision takes 2xx, 401 or 403
    return _error(exc.status, str(exc))


@bp.errorhandler(LedgerError)
def ledger_error(exc: LedgerError) -> Response:
    return _error(400, str(exc))


def _error(status: int, message: str) -> Response:
    response = Response(canonical_bytes({"error": message}), status, mimetype="application/json")
    response.headers["Warning"] = '299 hrx "' + message.replace('"', "'")[:300] + '"'
    if status == 503:
        response.headers["Retry-After"] = "30"
    return response


def _root() -> str:
    """This node's ``/dicomweb`` at its public URL (``node.url``: not the Host header, which
    clients set as they like — dicomweb-client drops the port from it)."""
    return services().config.url.rstrip("/") + "/dicomweb"


def streamed(answer: dicomweb.Answer) -> Response:
    """A flow's streamed answer as a response, the PACS's connection closed once sent."""

    def chunks() -> Iterator[bytes]:
        try:
            yield from answer.chunks
        finally:
            answer.close()

    response = Response(stream_with_context(chunks()), answer.status, headers=answer.headers)
    response.headers["Cache-Control"] = "private, no-store"
    return response


@bp.get("/members/<member>/<path:path>")
def member_resource(member: str, path: str) -> Response:
    """Member ``member``'s study, for a user of this node (:func:`dicomweb.relay`)."""
    authenticate()
    target = parse_target(path, list(request.args.items(multi=True)))
    answer = dicomweb.relay(
        services(),
        caller(),
        member,
        target,
        request.headers.get("Accept"),
        f"{_root()}/members/{member}",
    )
    return streamed(answer)


@bp.get("/<path:path>")
def resource(path: str) -> Response:
    """One of this node's studies, for a member or a user of this node."""
    target = parse_target(path, list(request.args.items(multi=True)))
    accept = request.headers.get("Accept")
    if "Signature" in request.headers:
        member = verified_peer()
        answer = dicomweb.read_for_member(services(), caller(), member, target, accept)
    else:
        authenticate()
        answer = dicomweb.read_local(services(), caller(), target, accept, _root())
    return streamed(answer)
