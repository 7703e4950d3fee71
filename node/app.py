"""The node's Flask app factory: one app per process, one blueprint per concern.

``create_app(directory)`` reads the node's configuration (``node.toml`` plus ``HRX_*``
environment overrides), opens its database (refusing one whose schema is behind: run
``hrx node upgrade``), and registers the blueprints: health, token issuing, FHIR.
For gunicorn, :mod:`node.wsgi` builds the app from ``HRX_NODE_DIR``.
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

    from node import auth_api, fhir_api, health, ledger_api, peer_api

    app.register_blueprint(health.bp)
    app.register_blueprint(auth_api.bp)
    app.register_blueprint(fhir_api.bp)
    app.register_blueprint(ledger_api.bp)
    app.register_blueprint(peer_api.bp)
    return app
