"""The node's Flask app factory: one app per process, one blueprint per concern.

``create_app(directory)`` reads the node's configuration (``node.toml`` plus ``HRX_*``
environment overrides), opens its database (refusing one whose schema is behind: run
``hrx node upgrade``), and registers the blueprints: health, token issuing, FHIR, the
ledger's read API, node-to-node calls, and the patient portal. For gunicorn,
:mod:`node.wsgi` builds the app from ``HRX_NODE_DIR``.
"""

from __future__ import annotations

import atexit
from pathlib import Path

from flask import Flask

from node.config import load_config
from node.services import open_services

MAX_BODY_BYTES = 32 * 1024 * 1024


def create_app(directory: str | Path) -> Flask:
    config = load_config(Path(directory))
    services = open_services(config)
    app = Flask("hrx")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.ensure_ascii = False  # type: ignore[attr-defined]
    app.extensions["hrx"] = services
    atexit.register(services.close)

    if config.trusted_proxies:  # TLS ends at a proxy: believe its X-Forwarded-* headers
        from werkzeug.middleware.proxy_fix import ProxyFix

        hops = config.trusted_proxies
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops, x_port=hops
        )

    from node import (
        auth_api,
        clinic,
        fhir_api,
        health,
        ledger_api,
        orders,
        peer_api,
        portal,
        referral_api,
    )

    app.register_blueprint(health.bp)
    app.register_blueprint(auth_api.bp)
    app.register_blueprint(fhir_api.bp)
    app.register_blueprint(referral_api.bp)
    app.register_blueprint(orders.bp)
    app.register_blueprint(ledger_api.bp)
    app.register_blueprint(peer_api.bp)
    app.register_blueprint(portal.bp)
    app.register_blueprint(clinic.bp)
    return app
