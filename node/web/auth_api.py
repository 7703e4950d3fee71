"""``POST /auth/token``: a token for a username and password (OAuth 2.0 password grant,
form-encoded), for clients that cannot run ``hrx token issue``; the password sign-in the
node's pages share (:func:`password_sign_in`); and SMART discovery,
``.well-known/smart-configuration`` under the FHIR base and at the root, saying what the token
endpoint does (:func:`node.web.fhir.capability.smart_configuration`).

Every wrong password, unknown or disabled account gets the same answer (401 here); attempts
beyond the throttles of :mod:`node.identity.users` are refused unchecked, with 429 and
``Retry-After``. Every sign-in, whether it worked or not, is an AuditEvent (subtype
``login``; outcome 0 or 4; the username tried, the client's address and program, the reason;
never the password), like a refused bearer token (:mod:`node.web.fhir.rest`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flask import Blueprint, current_app, jsonify, request
from flask.typing import ResponseReturnValue

from node.base.errors import UserError
from node.identity.users import ROLES, SignIn, User, sign_in
from node.records.audit_trail import AuditRecord
from node.web.fhir import capability

log = logging.getLogger(__name__)
bp = Blueprint("auth", __name__, url_prefix="/auth")
discovery = Blueprint("smart", __name__)


@discovery.get("/.well-known/smart-configuration")
@discovery.get("/fhir/.well-known/smart-configuration")
def smart_configuration() -> ResponseReturnValue:
    response = jsonify(capability.smart_configuration(current_app.extensions["hrx"].config))
    response.headers["Cache-Control"] = "max-age=3600"
    return response


def password_sign_in(
    username: str,
    password: str,
    roles: tuple[str, ...],
    where: str,
    grant: Callable[[User], str],
) -> SignIn:
    """Sign in from this request's address as a user of one of ``roles``, and audit it.

    ``grant`` runs once the password is right: it makes what the sign-in is for (a token, a
    session) and returns the id the AuditEvent gives it (``agent.altId``); a UserError it
    raises makes the sign-in a refusal, and goes on to the caller. ``where`` names the way in.
    The AuditEvent of a success must be stored, or the request fails (503); that of a
    refusal is tried, and the refusal stands either way."""
    services = current_app.extensions["hrx"]
    result = sign_in(services.database.write_engine, username, password, request.remote_addr)
    record = AuditRecord(
        interaction="login",
        username=username,
        role=None,
        address=request.remote_addr,
        client=request.headers.get("User-Agent"),
        outcome="4",
        description=f"{where}: {result.reason}",
    )
    user = result.user
    if user is not None and user.role not in roles:
        result = SignIn(None, 0, f"the password was right, but a {user.role} cannot sign in here")
    elif user is not None:
        try:
            record.token_id = grant(user)
        except UserError as exc:
            record.description = f"{where}: the password was right, but {exc}"
            _record_refusal(record)
            raise
        record.role, record.outcome = user.role, "0"
        services.audit.record(record)
        return result
    record.description = f"{where}: {result.reason}"
    _record_refusal(record)
    return result


def _record_refusal(record: AuditRecord) -> None:
    try:
        current_app.extensions["hrx"].audit.record(record)
    except Exception:  # a refusal stands even if its record cannot be written
        log.exception("could not record a refused sign-in")


def _error(code: str, description: str, status: int = 400) -> ResponseReturnValue:
    return jsonify(error=code, error_description=description), status


@bp.post("/token")
def token() -> ResponseReturnValue:
    services = current_app.extensions["hrx"]
    if request.form.get("grant_type") != "password":
        return _error("unsupported_grant_type", "grant_type must be password")
    username = request.form.get("username", "")
    password = request.form.get("password", "")
    if not username or not password:
        return _error("invalid_request", "username and password are required")
    ttl = services.config.token_ttl
    issued: list[str] = []

    def issue(user: User) -> str:
        issued.append(services.tokens.issue(user, request.form.get("scope"), ttl))
        return str(services.tokens.id_of(issued[0]))

    try:
        result = password_sign_in(username, password, ROLES, "POST /auth/token", issue)
    except UserError as exc:
        return _error("invalid_scope", str(exc))
    if result.retry_after:
        answer = jsonify(
            error="temporarily_unavailable",
            error_description="too many failed sign-ins for this account or from this address; "
            f"try again in {result.retry_after} s",
        )
        answer.status_code = 429
        answer.headers["Retry-After"] = str(result.retry_after)
        return answer
    if not issued:
        return _error("invalid_grant", "wrong username or password", 401)
    response = jsonify(
        access_token=issued[0],
        token_type="Bearer",
        expires_in=ttl,
        scope=services.tokens.scope_of(issued[0]),
    )
    response.headers["Cache-Control"] = "no-store"
    return response
