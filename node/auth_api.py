"""``POST /auth/token``: a token for a username and password (OAuth 2.0 password grant,
form-encoded), for clients that cannot run ``hrx token issue``. Wrong passwords count
towards the account lock; every failure gets the same answer."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request
from flask.typing import ResponseReturnValue

from node.errors import UserError
from node.users import check_password

bp = Blueprint("auth", __name__, url_prefix="/auth")


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
    user = check_password(services.database.write_engine, username, password)
    if user is None:
        return _error("invalid_grant", "wrong username or password, or the account is locked", 401)
    ttl = services.config.token_ttl
    try:
        token = services.tokens.issue(user, request.form.get("scope"), ttl)
    except UserError as exc:
        return _error("invalid_scope", str(exc))
    claims_scope = services.tokens.scope_of(token)
    response = jsonify(access_token=token, token_type="Bearer", expires_in=ttl, scope=claims_scope)
    response.headers["Cache-Control"] = "no-store"
    return response
