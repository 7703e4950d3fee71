"""The people (and systems) who may use a node: usernames, roles, argon2 password hashes.

A role bounds what a user's tokens may carry (:mod:`node.auth`); a patient user is tied to
one Patient resource. Passwords are optional (a token issued by an administrator needs
none) and stored only as argon2id hashes. Repeated wrong passwords lock the account for a
while; disabling a user voids every token already issued to them.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import sqlalchemy as sa
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy.engine import Engine

from node.errors import UserError

metadata = sa.MetaData()

users_table = sa.Table(
    "node_users",
    metadata,
    sa.Column("username", sa.String(64), primary_key=True),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("patient_id", sa.String(64), nullable=True),
    sa.Column("password_hash", sa.String(255), nullable=True),
    sa.Column("active", sa.Boolean, nullable=False),
    sa.Column("created", sa.BigInteger, nullable=False),
    sa.Column("failed_logins", sa.Integer, nullable=False, server_default="0"),
    sa.Column("locked_until", sa.BigInteger, nullable=False, server_default="0"),
)

ROLES = ("doctor", "admin", "auditor", "patient")
USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
MAX_FAILED_LOGINS = 5
LOCK_SECONDS = 900
_hasher = PasswordHasher()


@dataclass(frozen=True)
class User:
    username: str
    role: str
    patient_id: str | None
    active: bool


def add_user(
    engine: Engine,
    username: str,
    role: str,
    *,
    patient_id: str | None = None,
    password: str | None = None,
) -> User:
    if not USERNAME.fullmatch(username):
        raise UserError(
            f"username {username!r} must be 1-64 letters, digits or _ . @ - (starting with a "
            "letter or digit)"
        )
    if role not in ROLES:
        raise UserError(f"role {role!r} is not one of {', '.join(ROLES)}")
    if (role == "patient") != (patient_id is not None):
        raise UserError(
            "a patient user needs --patient ID (the Patient resource it stands for)"
            if role == "patient"
            else f"--patient is only for patient users, not {role}"
        )
    if password is not None and len(password) < 8:
        raise UserError("a password must have at least 8 characters")
    with engine.begin() as conn:
        exists = conn.execute(
            sa.select(users_table.c.username).where(users_table.c.username == username)
        ).first()
        if exists:
            raise UserError(f"user {username!r} already exists")
        conn.execute(
            users_table.insert().values(
                username=username,
                role=role,
                patient_id=patient_id,
                password_hash=_hasher.hash(password) if password is not None else None,
                active=True,
                created=int(time.time()),
                failed_logins=0,
                locked_until=0,
            )
        )
    return User(username, role, patient_id, True)


def get_user(engine: Engine, username: str) -> User | None:
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(users_table.c.role, users_table.c.patient_id, users_table.c.active).where(
                users_table.c.username == username
            )
        ).first()
    return None if row is None else User(username, row[0], row[1], bool(row[2]))


def set_active(engine: Engine, username: str, active: bool) -> None:
    with engine.begin() as conn:
        result = conn.execute(
            users_table.update().where(users_table.c.username == username).values(active=active)
        )
    if result.rowcount != 1:
        raise UserError(f"no user {username!r}")


def set_password(engine: Engine, username: str, password: str) -> None:
    """A new password (which also lifts a lock)."""
    if len(password) < 8:
        raise UserError("a password must have at least 8 characters")
    with engine.begin() as conn:
        result = conn.execute(
            users_table.update()
            .where(users_table.c.username == username)
            .values(password_hash=_hasher.hash(password), failed_logins=0, locked_until=0)
        )
    if result.rowcount != 1:
        raise UserError(f"no user {username!r}")


def check_password(engine: Engine, username: str, password: str) -> User | None:
    """The user, when the password is right and the account is neither disabled nor locked.

    Every failure looks the same to the caller; wrong passwords count towards a lock. The
    (slow) argon2 check runs outside any transaction; the counters change atomically."""
    now = int(time.time())
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(
                users_table.c.role,
                users_table.c.patient_id,
                users_table.c.active,
                users_table.c.password_hash,
                users_table.c.locked_until,
            ).where(users_table.c.username == username)
        ).first()
    if row is None or not row[2] or row[3] is None or row[4] > now:
        _hasher.hash(password)  # the same work as a real check: no timing oracle
        return None
    try:
        _hasher.verify(row[3], password)
    except (VerificationError, InvalidHashError):
        with engine.begin() as conn:
            failed = conn.execute(
                users_table.update()
                .where(users_table.c.username == username)
                .values(failed_logins=users_table.c.failed_logins + 1)
                .returning(users_table.c.failed_logins)
            ).scalar_one()
            if failed >= MAX_FAILED_LOGINS:
                conn.execute(
                    users_table.update()
                    .where(users_table.c.username == username)
                    .values(failed_logins=0, locked_until=now + LOCK_SECONDS)
                )
        return None
    with engine.begin() as conn:
        conn.execute(
            users_table.update()
            .where(users_table.c.username == username, users_table.c.failed_logins != 0)
            .values(failed_logins=0)
        )
    return User(username, row[0], row[1], True)
