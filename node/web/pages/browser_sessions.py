"""Browser sign-in for the node's pages (the patient portal, the doctors' clinic): server-side
sessions in a cookie, and the CSRF token every form carries.

The cookie holds a random token the node keeps only hashed (:mod:`node.identity.sessions`); it is
``HttpOnly``, ``SameSite=Lax``, scoped to its pages' path, and ``Secure`` whenever the request
came over TLS. A form's CSRF token is its session's, or before sign-in a double-submit cookie.
Each set of pages admits its own roles: a patient's session is no doctor's, and the reverse.
"""

from __future__ import annotations

import hmac
import secrets

from flask import abort, current_app, g, request
from werkzeug.wrappers import Response as BaseResponse

from node.identity.sessions import Session, end_session, find_session, start_session
from node.identity.users import User


class BrowserSessions:
    def __init__(self, name: str, path: str, roles: tuple[str, ...]) -> None:
        self.cookie = f"hrx_{name}"
        self.csrf_cookie = f"hrx_{name}_csrf"
        self.path = path
        self.roles = roles
        self._key = f"{name}_session"

    def set_cookie(
        self, response: BaseResponse, name: str, value: str, max_age: int | None = None
    ) -> None:
        response.set_cookie(
            name,
            value,
            max_age=max_age,
            path=self.path,
            secure=request.is_secure,
            httponly=True,
            samesite="Lax",
        )

    def current(self) -> Session | None:
        """This request's live session of one of the admitted roles, or None."""
        if self._key not in g:
            database = current_app.extensions["hrx"].database
            session = find_session(
                database.engine, database.write_engine, request.cookies.get(self.cookie)
            )
            g.setdefault(self._key, session if session and session.role in self.roles else None)
        found: Session | None = g.get(self._key)
        return found

    def start(self, response: BaseResponse, user: User) -> None:
        database = current_app.extensions["hrx"].database
        self.set_cookie(response, self.cookie, start_session(database.write_engine, user))

    def end(self, response: BaseResponse) -> None:
        end_session(
            current_app.extensions["hrx"].database.write_engine, request.cookies.get(self.cookie)
        )
        response.delete_cookie(self.cookie, path=self.path)

    def csrf_token(self) -> str:
        session = self.current()
        if session is not None:
            return session.csrf
        token = request.cookies.get(self.csrf_cookie) or g.get(self._key + "_csrf")
        if not token:
            token = secrets.token_urlsafe(32)
            g.setdefault(self._key + "_csrf", token)
        return str(token)

    def check_csrf(self, message: str) -> None:
        """Refuse (400, ``message``) a form without the right CSRF token."""
        sent = request.form.get("csrf_token")
        session = self.current()
        if session is not None:
            valid = session.csrf_matches(sent)
        else:
            cookie = request.cookies.get(self.csrf_cookie) or ""
            valid = bool(cookie) and sent is not None and hmac.compare_digest(cookie, sent)
        if not valid:
            abort(400, message)

    def after_request(self, response: BaseResponse) -> None:
        """What every page of these sessions answers with: strict security headers (no script,
        no framing, nothing cached), and the double-submit cookie a page of this request made."""
        response.headers["Content-Security-Policy"] = (
            "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'"
        )
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"
        token = g.get(self._key + "_csrf")
        if token:
            self.set_cookie(response, self.csrf_cookie, token)
