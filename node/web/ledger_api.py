"""The ledger's HTTP read API (docs/spec.md §9), for members and auditors.

``/ledger/roster``, ``/ledger/heads``, ``/ledger/chains/<id>/blocks``,
``/ledger/chains/<id>/entries/<seq>``, ``/ledger/chains/<id>/proof/inclusion`` and
``/proof/consistency``, ``/ledger/checkpoints/latest`` and ``/ledger/evidence``. Blocks and
entries go out as the canonical bytes stored, so what a reader hashes is what was signed.
Readers are member nodes, with requests signed as docs/spec.md §10 says
(:mod:`node.consortium.signing`), and people with a bearer token of an auditor or admin.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, g, request
from werkzeug.exceptions import HTTPException

from fhir_adapters.errors import FhirError, Forbidden, InvalidRequest, NotFound, Unauthorized
from fhir_adapters.store.search import whole_number
from ledger.canonical import canonical_bytes
from ledger.errors import LedgerError, ProofError, StoreError
from ledger.model import check_chain_id
from ledger.store import ChainStore
from node.consortium.signing import verify_request

bp = Blueprint("ledger", __name__, url_prefix="/ledger")

MAX_BLOCKS = 1000
READER_ROLES = ("auditor", "admin")


def store() -> ChainStore:
    services = current_app.extensions["hrx"]
    found: ChainStore = services.chain_store
    return found


def _json(value: Any, status: int = 200) -> Response:
    return Response(canonical_bytes(value), status=status, mimetype="application/json")


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


@bp.before_request
def authenticate() -> None:
    """A member node's signed request, or an auditor's or admin's bearer token."""
    services = current_app.extensions["hrx"]
    if "Signature" in request.headers:
        g.peer = verified_peer()
        return
    principal = services.tokens.authenticate(request.headers.get("Authorization"))
    if principal.role not in READER_ROLES:
        raise Forbidden(f"{principal.username} ({principal.role}) may not read the ledger")


def verified_peer() -> str:
    """The member that signed this request (401 when none did, validly)."""
    services = current_app.extensions["hrx"]
    try:
        roster = services.chain_store.roster()
    except StoreError:
        raise Unauthorized("this node has joined no consortium: it knows no member keys") from None
    target = services.config.url + request.full_path.rstrip("?")
    return verify_request(
        roster,
        services.database.nonce_engine,
        request.method,
        target,
        request.headers.items(),
        request.get_data(cache=True),
    )


@bp.errorhandler(FhirError)
def fhir_error(exc: FhirError) -> Response:
    return _error(exc.status, str(exc))


@bp.errorhandler(LedgerError)
def ledger_error(exc: LedgerError) -> Response:
    status = 404 if isinstance(exc, StoreError | ProofError) else 400
    return _error(status, str(exc))


@bp.errorhandler(HTTPException)
def http_error(exc: HTTPException) -> Response:
    return _error(exc.code or 500, exc.description or exc.name)


def _int_arg(name: str, default: int | None = None) -> int:
    value = request.args.get(name)
    if value is None:
        if default is None:
            raise InvalidRequest(f"{name} is required")
        return default
    return whole_number(name, value)


def _chain(chain: str) -> str:
    check_chain_id(chain)
    if store().head(chain) is None:
        raise NotFound(f"this node holds no chain {chain!r}")
    return chain


@bp.get("/roster")
def roster() -> Response:
    rosters = store().rosters()
    if not rosters:
        raise NotFound("this node has joined no consortium yet")
    body, signature = rosters[-1]
    return _json({"roster": body, "signature": signature})


@bp.get("/rosters")
def all_rosters() -> Response:
    """Every roster version, oldest first (beyond §3: an auditor verifying from a URL needs
    the versions older blocks were signed under)."""
    return _json([{"roster": body, "signature": sig} for body, sig in store().rosters()])


@bp.get("/heads")
def heads() -> Response:
    return _json(
        {
            chain: {"header": head.header, "signature": head.signature}
            for chain, head in store().heads().items()
        }
    )


@bp.get("/chains/<chain>/blocks")
def blocks(chain: str) -> Response:
    _chain(chain)
    start = _int_arg("from", 0)
    limit = min(_int_arg("limit", 100), MAX_BLOCKS)
    lines = [block.wire_bytes() for block in store().block_rows(chain, start, limit)]
    return Response(b"[" + b",".join(lines) + b"]", mimetype="application/json")


@bp.get("/chains/<chain>/entries/<int:seq>")
def entry(chain: str, seq: int) -> Response:
    _chain(chain)
    return _json(store().entry(chain, seq))


@bp.get("/chains/<chain>/proof/inclusion")
def inclusion(chain: str) -> Response:
    _chain(chain)
    tree_size = request.args.get("tree_size")
    return _json(
        store().inclusion_proof(
            chain, _int_arg("seq"), _int_arg("tree_size") if tree_size is not None else None
        )
    )


@bp.get("/chains/<chain>/proof/consistency")
def consistency(chain: str) -> Response:
    _chain(chain)
    proof = store().consistency_proof(chain, _int_arg("first"), _int_arg("second"))
    return _json({"path": proof["path"]})


@bp.get("/checkpoints/latest")
def latest_checkpoint() -> Response:
    certificate = store().certificate()
    if certificate is None:
        raise NotFound("no checkpoint has been certified yet")
    return _json(certificate)


@bp.get("/checkpoints/<int:epoch>")
def checkpoint_of(epoch: int) -> Response:
    certificate = store().certificate(epoch)
    if certificate is None:
        raise NotFound(f"no certificate of epoch {epoch}")
    return _json(certificate)


@bp.get("/evidence")
def evidence() -> Response:
    """Every fork this node has found: two validly signed headers of one chain and height."""
    return _json(store().evidence())
