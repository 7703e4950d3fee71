"""``GET /metrics``: :mod:`node.ops.metrics` for Prometheus, to those allowed to scrape: with
``metrics.token`` set, whoever sends ``Authorization: Bearer <token>``; without one, only a
client connected straight from the loopback (127.0.0.0/8 or ::1, and no ``Forwarded`` or
``X-Forwarded-For`` header, so nothing relayed by a proxy on the same host)."""

from __future__ import annotations

import hmac
import ipaddress

from flask import Blueprint, Response, current_app, request
from prometheus_client.exposition import choose_encoder

from node.ops.metrics import scrape_registry

bp = Blueprint("metrics", __name__)


def _direct_loopback_client() -> bool:
    if "Forwarded" in request.headers or "X-Forwarded-For" in request.headers:
        return False  # relayed: the proxy's own address says nothing of the client's
    try:
        return ipaddress.ip_address(request.remote_addr or "").is_loopback
    except ValueError:
        return False


def _refusal(token: str) -> Response | None:
    if token:
        scheme, _, offered = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            offered.strip().encode(), token.encode()
        ):
            return None
        return Response(
            "send the scrape token: Authorization: Bearer <metrics.token>\n",
            401,
            {"WWW-Authenticate": 'Bearer realm="hrx-metrics"'},
            mimetype="text/plain",
        )
    if _direct_loopback_client():
        return None
    return Response(
        "/metrics answers only loopback clients until metrics.token is set "
        "(see docs/operations.md)\n",
        403,
        mimetype="text/plain",
    )


@bp.get("/metrics")
def metrics() -> Response:
    services = current_app.extensions["hrx"]
    refusal = _refusal(services.config.metrics_token)
    if refusal is not None:
        return refusal
    registry = current_app.extensions.get("hrx-metrics")
    if registry is None:
        registry = current_app.extensions["hrx-metrics"] = scrape_registry(services)
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    return Response(encode(registry), headers={"Content-Type": content_type})
