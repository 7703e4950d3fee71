"""Every request's ID and access line (logger ``hrx.access``): the web side of
:mod:`node.base.logs`. The ID is the caller's ``X-Request-ID`` when it is a sane token, else a
new one; it is returned, attached to every log record made while the request is handled, and
sent on the node's own signed requests to other members. The access line names the route
(the URL rule), never the path or the query string."""

from __future__ import annotations

import time
from collections.abc import Callable

from flask import Flask, Response, g, request

from node.base.logs import (
    REQUEST_ID_HEADER,
    UNMATCHED_ROUTE,
    accepted_request_id,
    access_log,
    bind_request_id,
    unbind_request_id,
)

ResponseObserver = Callable[[str, str, int, float], None]  # method, route, status, seconds


def route_of_request() -> str:
    """The pattern the request matched (``/fhir/<resource_type>/<resource_id>``: a URL rule,
    or what a handler set as ``g.route``), never the path: paths hold resource ids."""
    route: str | None = g.get("route")
    if route:
        return route
    rule = request.url_rule
    return rule.rule if rule is not None else UNMATCHED_ROUTE


def install_request_hooks(app: Flask, observe: ResponseObserver | None = None) -> None:
    """Give every request of ``app`` an ID, an access line and (``observe``) a measurement.

    Register this before any other hook: it must run first on the way in and last on the
    way out (Flask runs ``after_request`` functions in reverse order)."""

    @app.before_request
    def begin() -> None:
        g.request_started = time.perf_counter()
        g.request_id = accepted_request_id(request.headers.get(REQUEST_ID_HEADER))
        g.request_id_token = bind_request_id(g.request_id)

    @app.after_request
    def finish(response: Response) -> Response:
        started = g.get("request_started")
        if started is None:  # before_request never ran (another hook failed first)
            return response
        seconds = time.perf_counter() - started
        route = route_of_request()
        response.headers[REQUEST_ID_HEADER] = g.request_id
        if observe is not None:
            observe(request.method, route, response.status_code, seconds)
        duration_ms = round(seconds * 1000, 1)
        access_log.info(
            "%s %s %s %.1f ms",
            request.method,
            route,
            response.status_code,
            duration_ms,
            extra={
                "method": request.method,
                "route": route,
                "status": response.status_code,
                "duration_ms": duration_ms,
                "remote_addr": request.remote_addr,
            },
        )
        return response

    @app.teardown_request
    def end(_exc: BaseException | None) -> None:
        token = g.pop("request_id_token", None)
        if token is not None:  # a thread serves many requests (gthread): leave it clean
            unbind_request_id(token)
