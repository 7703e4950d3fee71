"""``GET /healthz``: whether this process can serve — its database answers, its schema is
current, and it may sign its chain (not held after a restore: ``hrx node recover``) — and the
chains it froze on fork evidence. ``GET /livez``: only that the process
answers (a liveness probe that does no work, and the ceiling the benchmarks measure the FHIR
API against). Neither reveals any patient data."""

from __future__ import annotations

import sqlalchemy as sa
from flask import Blueprint, current_app, jsonify
from flask.typing import ResponseReturnValue

from node.db.engines import current_revision, head_revision

bp = Blueprint("health", __name__)


@bp.get("/livez")
def livez() -> ResponseReturnValue:
    return "ok", 200, {"Content-Type": "text/plain"}


@bp.get("/healthz")
def healthz() -> ResponseReturnValue:
    services = current_app.extensions["hrx"]
    try:
        with services.database.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        revision = current_revision(services.database.engine)
    except sa.exc.SQLAlchemyError as exc:
        return jsonify(status="fail", database=type(exc).__name__), 503
    head = head_revision()
    status = "pass" if revision == head else "fail"
    body: dict[str, object] = {
        "status": status,
        "node": services.config.node_id,
        "schema": revision,
    }
    if revision == head:
        # chains this node froze on fork evidence: operators must see them at a glance
        body["frozen_chains"] = sorted(services.chain_store.frozen_chains())
        hold = services.chain_store.signing_hold()
        if hold is not None:  # it records nothing (consents, accesses) until recovered
            body["status"], body["signing"] = "fail", f"held: {hold}"
    else:
        body["needs"] = head
    return jsonify(body), 200 if body["status"] == "pass" else 503
