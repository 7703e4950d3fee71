"""What a request handler of any blueprint needs of the request: this process's
:class:`~node.services.Services` (typed), the caller authenticated by its bearer token, and
the :class:`~node.records.audit_trail.Caller` the flows take (who, from which address, with
which client, under which request ID)."""

from __future__ import annotations

from flask import current_app, g, request

from fhir_adapters.errors import Unauthorized
from node.flows.permissions import refuse
from node.identity.tokens import Principal
from node.records.audit_trail import Caller
from node.services import Services

SERVICES = "hrx"  # the key of the Services in the app's extensions


def services() -> Services:
    """This process's services (the app factory hangs them on the app)."""
    found: Services = current_app.extensions[SERVICES]
    return found


def authenticate() -> Principal:
    """The caller of this request, by its bearer token (once per request); 401 otherwise. A
    token presented and refused is recorded."""
    principal: Principal | None = g.get("principal")
    if principal is None:
        header = request.headers.get("Authorization")
        try:
            principal = services().tokens.authenticate(header)
        except Unauthorized as exc:
            if header:  # a token was presented and refused: worth an audit record
                refuse(services(), caller(), "login", str(exc))
            raise
        g.principal = principal
    return principal


def signed_in_as(principal: Principal) -> None:
    """The caller of this request, signed in another way (a browser session)."""
    g.principal = principal


def caller() -> Caller:
    """This request's caller for the flows: whoever is authenticated so far (if anyone), the
    client's address and software, and the request ID."""
    return Caller(
        g.get("principal"),
        request.remote_addr,
        request.headers.get("User-Agent"),
        g.get("request_id"),
    )
