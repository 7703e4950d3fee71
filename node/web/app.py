"""The node's Flask app factory: one app per process, one blueprint per concern.

``create_app(directory)`` reads the node's configuration (``node.toml`` plus ``HRX_*``
environment overrides), opens its database (refusing one whose schema is behind: run
``hrx node upgrade``), and registers the blueprints: health, token issuing, FHIR, the
ledger's read API, node-to-node calls, the patient portal, and ``/metrics``. Every request
gets an ID, an access log line and a measurement (:mod:`node.base.logs`, :mod:`node.ops.metrics`);
setting up the process's logging is for the entry points (``hrx node serve``,
:mod:`node.web.wsgi`, which builds the app from ``HRX_NODE_DIR`` for gunicorn).
"""

from __future__ import annotations

import atexit
import os
from pathlib import Path
from types import TracebackType

from flask import Flask, request
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.serving import run_simple

from node.base.config import load_config
from node.ops.metrics import observe_request
from node.services import open_services
from node.web import auth_api, bulk_api, dicomweb_api, health, ledger_api, metrics, peer_api
from node.web.fhir import rest
from node.web.pages import clinic, portal
from node.web.request_log import install_request_hooks, route_of_request

MAX_BODY_BYTES = 32 * 1024 * 1024

ExcInfo = tuple[type[BaseException], BaseException, TracebackType] | tuple[None, None, None]


class NodeApp(Flask):
    """Flask, but an unhandled error's log line names the route, never the path."""

    def log_exception(self, exc_info: ExcInfo) -> None:
        """An unhandled error, logged with the route, not the path (paths hold ids)."""
        self.logger.error(
            "unhandled exception in %s %s", request.method, route_of_request(), exc_info=exc_info
        )


def create_app(directory: str | Path) -> Flask:
    os.umask(0o077)  # the database files SQLite makes as it runs: this user's alone
    config = load_config(Path(directory))
    services = open_services(config)
    app = NodeApp("hrx")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.ensure_ascii = False  # type: ignore[attr-defined]
    app.extensions["hrx"] = services
    # BLS (py_ecc) is imported here, before any request is served: importing it raises the
    # recursion limit until ledger.bls restores it, and a deeply nested JSON body parsed in
    # that moment would overflow a thread's C stack
    from ledger import bls  # noqa: F401

    atexit.register(services.close)

    if config.trusted_proxies:  # TLS ends at a proxy: believe its X-Forwarded-* headers
        hops = config.trusted_proxies
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops, x_port=hops
        )

    install_request_hooks(app, observe_request)  # before any blueprint's hooks

    app.register_blueprint(health.bp)
    app.register_blueprint(auth_api.bp)
    app.register_blueprint(auth_api.discovery)
    app.register_blueprint(bulk_api.bp)  # before /fhir's catch-all
    app.register_blueprint(rest.bp)
    app.register_blueprint(ledger_api.bp)
    app.register_blueprint(peer_api.bp)
    app.register_blueprint(dicomweb_api.bp)
    app.register_blueprint(portal.bp)
    app.register_blueprint(clinic.bp)
    if config.metrics_enabled:
        app.register_blueprint(metrics.bp)
    return app


def serve_for_development(app: Flask, host: str, port: int) -> None:
    """Werkzeug's development server (``hrx node serve``); production runs gunicorn."""
    # not app.run: its banner would be the one line on the console that is not a log line
    run_simple(host, port, app, threaded=True, use_reloader=False)
