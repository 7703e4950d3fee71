"""The way into the node's pages: patients' enrollment codes, and server-side sessions.

Hospital staff register a patient and hand over an enrollment code (``hrx patient enroll``):
16 random characters (80 bits), valid for a week, usable once, kept only as a SHA-256 hash.
With it the patient chooses a username and password (argon2, :mod:`node.identity.users`); a patient
who already has an account gets a new password instead, which is how a forgotten (or stolen)
password is reset — at the hospital's desk, never by e-mail or SMS. Such a reset takes effect
when the code is made: the old password, the patient's tokens and their portal sessions stop
working then (and the tokens and sessions made in between, when the code is used).

A session is a random cookie value the node keeps only as a hash, with the CSRF token of
its forms and its user's token generation. It ends at sign-out, after 30 minutes idle, after
12 hours in any case, and as soon as its user is disabled or removed or every token of theirs
is revoked (a new password does that too: the generation moves on); ending it server-side
ends it for good, unlike a signed cookie.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from node.base.errors import UserError
from node.db.schema import enrollments_table, sessions_table, users_table
from node.identity.users import USERNAME, User, add_user, get_user, set_password

CODE_ALPHABET = "ABCDEFGHJKMNPQRSTVWXYZ23456789"  # no 0/O, 1/I/L, U: read out loud safely
CODE_LENGTH = 16
ENROLLMENT_SECONDS = 7 * 24 * 3600
IDLE_SECONDS = 30 * 60
LIFETIME_SECONDS = 12 * 3600
SEEN_RESOLUTION = 60  # a session's last use is written at most once a minute


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def normalize_code(text: str) -> str:
    return "".join(c for c in text.upper() if c.isalnum())


def format_code(code: str) -> str:
    return "-".join(code[i : i + 4] for i in range(0, len(code), 4))


def issue_enrollment(engine: Engine, patient_id: str, *, seconds: int = ENROLLMENT_SECONDS) -> str:
    """A new enrollment code for the patient (shown once; only its hash is kept)."""
    code = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))
    now = int(time.time())
    with engine.begin() as conn:
        conn.execute(
            enrollments_table.insert().values(
                code_hash=_hash(code),
                patient_id=patient_id,
                created=now,
                expires=now + seconds,
                used=None,
            )
        )
    return format_code(code)


def redeem_enrollment(engine: Engine, code: str, username: str, password: str) -> User:
    """Use an enrollment code: a new patient account, or a new password for the patient's
    existing one (whose username stays). The code works once; every failure says the same."""
    if len(password) < 8:
        raise UserError("a password must have at least 8 characters")
    now = int(time.time())
    code_hash = _hash(normalize_code(code))
    with engine.begin() as conn:
        row = conn.execute(
            sa.select(enrollments_table.c.patient_id).where(
                enrollments_table.c.code_hash == code_hash,
                enrollments_table.c.used.is_(None),
                enrollments_table.c.expires > now,
            )
        ).first()
        if row is None:
            raise UserError("this enrollment code is not valid: it is wrong, used or expired")
        patient_id = row[0]
        existing = conn.execute(_account_of(patient_id)).first()
        if existing is None:
            if not USERNAME.fullmatch(username):
                raise UserError(
                    "a username is 1-64 letters, digits or _ . @ - (starting with a letter or "
                    "digit)"
                )
            if conn.execute(
                sa.select(users_table.c.username).where(users_table.c.username == username)
            ).first():
                raise UserError(f"the username {username!r} is taken; choose another")
        used = conn.execute(
            enrollments_table.update()
            .where(enrollments_table.c.code_hash == code_hash, enrollments_table.c.used.is_(None))
            .values(used=now)
        )
        if used.rowcount != 1:
            raise UserError("this enrollment code is not valid: it is wrong, used or expired")
    if existing is None:
        return add_user(engine, username, "patient", patient_id=patient_id, password=password)
    set_password(engine, existing[0], password)  # voids every token and session made before
    end_sessions_of(engine, existing[0])
    user = get_user(engine, existing[0])
    assert user is not None
    return user


def _account_of(patient_id: str) -> sa.Select[str]:
    return sa.select(users_table.c.username).where(
        users_table.c.role == "patient",
        users_table.c.patient_id == patient_id,
        users_table.c.removed.is_(None),
    )


def reset_account(engine: Engine, patient_id: str) -> User | None:
    """The patient's portal account (None when they have none yet), its password cleared and
    every token and session of theirs void: what a new enrollment code does to an account."""
    with engine.connect() as conn:
        existing = conn.execute(_account_of(patient_id)).first()
    if existing is None:
        return None
    set_password(engine, existing[0], None)
    end_sessions_of(engine, existing[0])
    return get_user(engine, existing[0])


@dataclass(frozen=True)
class Session:
    username: str
    role: str
    patient_id: str  # "" for users who stand for no patient
    csrf: str

    def csrf_matches(self, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(self.csrf, token)


def start_session(engine: Engine, user: User) -> str:
    """A new session for a user; returns the cookie value (the pages check the role)."""
    token = secrets.token_urlsafe(32)
    now = int(time.time())
    with engine.begin() as conn:
        conn.execute(
            sessions_table.insert().values(
                token_hash=_hash(token),
                username=user.username,
                csrf=secrets.token_urlsafe(32),
                created=now,
                seen=now,
                generation=user.token_generation,
            )
        )
    return token


def find_session(engine: Engine, write_engine: Engine, token: str | None) -> Session | None:
    """The live session a cookie value stands for, or None (and an expired one is ended)."""
    if not token:
        return None
    token_hash = _hash(token)
    now = int(time.time())
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(
                sessions_table.c.username,
                sessions_table.c.csrf,
                sessions_table.c.created,
                sessions_table.c.seen,
                sessions_table.c.generation,
            ).where(sessions_table.c.token_hash == token_hash)
        ).first()
    if row is None:
        return None
    user = get_user(engine, row[0])
    if (
        user is None
        or not user.active
        or user.token_generation != row[4]
        or now - row[3] > IDLE_SECONDS
        or now - row[2] > LIFETIME_SECONDS
    ):
        end_session(write_engine, token)
        return None
    if now - row[3] >= SEEN_RESOLUTION:
        with write_engine.begin() as conn:
            conn.execute(
                sessions_table.update()
                .where(sessions_table.c.token_hash == token_hash)
                .values(seen=now)
            )
    return Session(row[0], user.role, user.patient_id or "", row[1])


def end_session(engine: Engine, token: str | None) -> None:
    if not token:
        return
    with engine.begin() as conn:
        conn.execute(sessions_table.delete().where(sessions_table.c.token_hash == _hash(token)))


def end_sessions_of(engine: Engine, username: str) -> None:
    with engine.begin() as conn:
        conn.execute(sessions_table.delete().where(sessions_table.c.username == username))
