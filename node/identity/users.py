"""The people (and systems) who may use a node: usernames, roles, argon2 password hashes, what
they may still do, and how hard anyone may guess their passwords.

A role bounds what a user's tokens may carry (:mod:`node.identity.tokens`); a patient user is
tied to one Patient resource. Passwords are optional (a token issued by an administrator needs
none) and stored only as argon2id hashes.

**Lifecycle.** A user is active, disabled (``hrx user disable``; ``enable`` lets them back in)
or removed. Removing keeps the row, without password, as a tombstone: AuditEvents name users
by username, so a name, once used, must go on meaning that one person and is never given to
anyone else. Each user has a *token generation*, carried by every token (claim ``gen``) and
every portal or clinic session made for them; disabling, removing, a new password and
``hrx token revoke --username`` move it on, which voids every token and session made before.
Tokens the node issues are also listed by their id (``jti``, in ``node_tokens``) so that one
can be revoked alone. A request's token is checked against both in one query of two
primary-key reads (:func:`token_standing`), so a revocation holds from the next request on,
in every process.

**Guessing passwords.** Nobody is locked out; wrong passwords slow down the one guessing.
Failures are counted in three kinds of bucket (``signin_throttle``): the account *from one
address*, the account from *every address it has not signed in from*, and one address
against every account. Each bucket allows :data:`FREE_FAILURES` failures (an address,
:data:`FREE_ADDRESS_FAILURES`: one network address can be many people), then refuses
attempts for a minute, two, four... up to an hour after each further failure; a day without
attempts forgets it. An address from which the account signed in within
:data:`KNOWN_SECONDS` is *known* for it, and an attempt from there counts only in its own
account-and-address bucket. So:

- whoever guesses, from however many addresses, gets :data:`FREE_FAILURES` guesses and then
  about one an hour (ten in the first hour, 24 a day afterwards) at any one account, and one
  address about as few at all accounts together beyond its first :data:`FREE_ADDRESS_FAILURES`;
- the account's owner, signing in from an address they used before, is never held up by
  guesses made anywhere else. Only from a new address may they have to wait as long as the
  guesser (or ask for ``hrx user unlock``, which forgets every bucket of the account).

The attempt is counted *before* the slow argon2 check, in one transaction that first locks
the buckets concerned (``BEGIN IMMEDIATE`` on SQLite, ``SELECT ... FOR UPDATE`` on
PostgreSQL), so no number of guesses in flight at once gets more checks than the buckets
allow; a right password then takes its own count back. IPv6 addresses count by their /64
network (a host picks its own address inside it). Behind a reverse proxy, the address is the
one ``server.trusted_proxies`` lets the node believe.
"""

from __future__ import annotations

import ipaddress
import re
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql.compiler import Compiled

from node.base.errors import UserError
from node.db.schema import throttle_table, tokens_table, users_table

ROLES = ("doctor", "admin", "auditor", "patient")
USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
FREE_FAILURES = 5  # per account (from one address, or from every unknown one)
FREE_ADDRESS_FAILURES = 20  # per address, against every account together
FIRST_WAIT = 60  # seconds after the first failure beyond the free ones; doubles each time
LONGEST_WAIT = 3600
FORGET_SECONDS = 24 * 3600  # a bucket with no attempt for this long starts again
KNOWN_SECONDS = 90 * 24 * 3600  # an address the account signed in from stays known this long
UNKNOWN_ADDRESS = "unknown"
_hasher = PasswordHasher()


@dataclass(frozen=True)
class User:
    username: str
    role: str
    patient_id: str | None
    active: bool
    removed: bool = False
    token_generation: int = 0


_USER_COLUMNS = (
    users_table.c.username,
    users_table.c.role,
    users_table.c.patient_id,
    users_table.c.active,
    users_table.c.removed,
    users_table.c.token_generation,
)


def _user(row: Any) -> User:
    return User(row[0], row[1], row[2], bool(row[3]), row[4] is not None, int(row[5]))


def _check_password_rules(password: str) -> None:
    if len(password) < 8:
        raise UserError("a password must have at least 8 characters")


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
    if password is not None:
        _check_password_rules(password)
    with engine.begin() as conn:
        exists = conn.execute(
            sa.select(users_table.c.removed).where(users_table.c.username == username)
        ).first()
        if exists and exists[0] is not None:
            raise UserError(
                f"user {username!r} was removed, and a username is never given to anyone else "
                "(the audit trail names users by it); choose another"
            )
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
                removed=None,
                token_generation=0,
            )
        )
    return User(username, role, patient_id, True)


def get_user(engine: Engine, username: str) -> User | None:
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(*_USER_COLUMNS).where(users_table.c.username == username)
        ).first()
    return None if row is None else _user(row)


def _existing(conn: Connection, username: str) -> User:
    """The user, locked for this transaction's changes, or a UserError naming the problem."""
    query = sa.select(*_USER_COLUMNS).where(users_table.c.username == username)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update()
    row = conn.execute(query).first()
    if row is None:
        raise UserError(f"no user {username!r}")
    user = _user(row)
    if user.removed:
        raise UserError(f"user {username!r} was removed")
    return user


def _next_generation(conn: Connection, username: str, **values: object) -> None:
    conn.execute(
        users_table.update()
        .where(users_table.c.username == username)
        .values(token_generation=users_table.c.token_generation + 1, **values)
    )


def set_active(engine: Engine, username: str, active: bool) -> bool:
    """Enable or disable a user; returns whether it was active before. Disabling voids every
    token and session of theirs (enabling again does not bring them back)."""
    with engine.begin() as conn:
        user = _existing(conn, username)
        if active:
            conn.execute(
                users_table.update().where(users_table.c.username == username).values(active=True)
            )
        else:
            _next_generation(conn, username, active=False)
    return user.active


def remove_user(engine: Engine, username: str) -> User:
    """Remove a user for good: no password, no tokens, no sessions, no way back. The row stays
    so that the username is never given to anyone else (the audit trail names it)."""
    with engine.begin() as conn:
        user = _existing(conn, username)
        _next_generation(conn, username, active=False, removed=int(time.time()), password_hash=None)
        _forget_throttles(conn, username)
    return user


def set_password(engine: Engine, username: str, password: str | None) -> None:
    """A new password, or none (``None``: no password sign-in until one is set). Every token
    and session made before stops working, and the account's sign-in throttles are lifted."""
    if password is not None:
        _check_password_rules(password)
    password_hash = None if password is None else _hasher.hash(password)
    with engine.begin() as conn:
        _existing(conn, username)
        _next_generation(conn, username, password_hash=password_hash)
        _forget_throttles(conn, username)


def revoke_tokens_of(engine: Engine, username: str) -> None:
    """Void every token and session the user holds (new ones can still be had)."""
    with engine.begin() as conn:
        _existing(conn, username)
        _next_generation(conn, username)


def unlock(engine: Engine, username: str) -> int:
    """Forget every sign-in throttle of the account; returns how many were holding it."""
    now = int(time.time())
    with engine.begin() as conn:
        _existing(conn, username)
        holding = conn.execute(
            sa.select(sa.func.count())
            .select_from(throttle_table)
            .where(throttle_table.c.username == username, throttle_table.c.blocked_until > now)
        ).scalar_one()
        _forget_throttles(conn, username)
    return int(holding)


def _forget_throttles(conn: Connection, username: str) -> None:
    """The account's failure counts go; the addresses it is known from stay known."""
    conn.execute(
        throttle_table.delete().where(
            throttle_table.c.username == username, throttle_table.c.last_success.is_(None)
        )
    )
    conn.execute(
        throttle_table.update()
        .where(throttle_table.c.username == username)
        .values(failures=0, blocked_until=0)
    )


# -- tokens by id ------------------------------------------------------------------------------


def record_token(engine: Engine, jti: str, username: str, issued: int, expires: int) -> None:
    """List a token the node issued (so it can be revoked by its id); expired ones go."""
    with engine.begin() as conn:
        expired = sa.select(tokens_table.c.jti).where(tokens_table.c.expires < issued).limit(100)
        if conn.dialect.name == "postgresql":  # not those another issuer is deleting: no wait
            expired = expired.with_for_update(skip_locked=True)
        conn.execute(tokens_table.delete().where(tokens_table.c.jti.in_(expired)))
        conn.execute(
            tokens_table.insert().values(
                jti=jti, username=username, issued=issued, expires=expires, revoked=None
            )
        )


@dataclass(frozen=True)
class IssuedToken:
    jti: str
    username: str
    issued: int
    expires: int
    revoked: int | None


def revoke_token(engine: Engine, jti: str) -> IssuedToken:
    """Revoke one token by its id; returns it as it was before."""
    with engine.begin() as conn:
        row = conn.execute(
            sa.select(
                tokens_table.c.jti,
                tokens_table.c.username,
                tokens_table.c.issued,
                tokens_table.c.expires,
                tokens_table.c.revoked,
            ).where(tokens_table.c.jti == jti)
        ).first()
        if row is None:
            raise UserError(
                f"no token with id {jti!r} is on record here (an expired token is no longer "
                "listed; one issued before this hrx version never was: revoke all of its "
                "user's tokens with --username)"
            )
        if row[4] is None:
            conn.execute(
                tokens_table.update()
                .where(tokens_table.c.jti == jti)
                .values(revoked=int(time.time()))
            )
    return IssuedToken(row[0], row[1], row[2], row[3], row[4])


_STANDING = sa.select(
    *_USER_COLUMNS,
    sa.select(tokens_table.c.revoked)
    .where(tokens_table.c.jti == sa.bindparam("jti"), tokens_table.c.revoked.is_not(None))
    .scalar_subquery(),
).where(users_table.c.username == sa.bindparam("username"))
_compiled_standing: dict[str, Compiled] = {}


def token_standing(engine: Engine, username: str, jti: str) -> tuple[User | None, bool]:
    """The token's user (None when there is none), and whether the token was revoked by its
    id: one query, reading two rows by their primary keys.

    Every request runs it, so it runs as compiled SQL on a pooled DBAPI connection: on SQLite
    a SQLAlchemy connection's transaction (the BEGIN, the ROLLBACK) cost five times the
    reads (scripts/bench_auth.py)."""
    compiled = _compiled_standing.get(engine.dialect.name)
    if compiled is None:
        compiled = _compiled_standing[engine.dialect.name] = _STANDING.compile(engine)
    values = {"username": username, "jti": jti}
    positions = compiled.positiontup  # type: ignore[attr-defined]
    params = [values[name] for name in positions] if positions else values
    connection = engine.raw_connection()
    try:
        cursor = connection.cursor()
        cursor.execute(compiled.string, params)
        row = cursor.fetchone()
        cursor.close()
    finally:
        connection.close()  # back to the pool, which ends any transaction
    if row is None:
        return None, False
    return _user(row), row[6] is not None


# -- signing in --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignIn:
    """What became of a password sign-in: the user when it worked; otherwise how many seconds
    to wait when the attempt was throttled (not checked at all), and why, for the audit trail
    (the one signing in is told no more than "wrong username or password")."""

    user: User | None
    retry_after: int
    reason: str


def client_address(address: str | None) -> str:
    """The address a bucket counts: an IPv4 address, or an IPv6 address's /64 network."""
    if not address:
        return UNKNOWN_ADDRESS
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.IPv6Network((parsed, 64), strict=False))
    return str(parsed)


def wait_after(failures: int, free: int) -> int:
    """Seconds to refuse attempts after the ``failures``-th failure in a bucket."""
    if failures < free:
        return 0
    return min(FIRST_WAIT << min(failures - free, 16), LONGEST_WAIT)


def sign_in(engine: Engine, username: str, password: str, address: str | None) -> SignIn:
    """Check a password, within the throttles of the module docstring.

    The attempt is counted first, atomically, in every bucket it falls in; only then does the
    slow argon2 check run (outside any transaction); a right password takes its count back.
    Unknown, disabled and removed accounts are counted and checked the same way, so that the
    answer and its timing tell nothing about whether an account exists."""
    if not username:
        raise UserError("a sign-in needs a username")
    account = username[:64]
    where = client_address(address)
    now = int(time.time())
    with engine.begin() as conn:
        retry_after, counted = _count_attempt(conn, account, where, now)
        if retry_after:
            return SignIn(None, retry_after, f"throttled: {retry_after} s to wait")
        row = conn.execute(
            sa.select(*_USER_COLUMNS, users_table.c.password_hash).where(
                users_table.c.username == username
            )
        ).first()
    password_hash = None if row is None else row[6]
    try:
        if password_hash is None:
            raise VerificationError
        _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        if password_hash is None:
            _hasher.hash(password)  # the same work as a real check: no timing oracle
        if row is None:
            return SignIn(None, 0, "no such user")
        user = _user(row)
        if user.removed:
            return SignIn(None, 0, "the account was removed")
        if password_hash is None:
            return SignIn(None, 0, "the account has no password")
        return SignIn(None, 0, "wrong password")
    user = _user(row)
    if not user.active:
        return SignIn(None, 0, "the account is disabled (the password was right)")
    with engine.begin() as conn:
        _take_back(conn, account, where, counted, int(time.time()))
    return SignIn(user, 0, "signed in with a password")


def _count_attempt(
    conn: Connection, account: str, address: str, now: int
) -> tuple[int, list[tuple[str, str]]]:
    """Count an attempt in its buckets, or, when one of them is holding, refuse it: returns
    (seconds to wait, 0 when counted; the buckets counted in)."""
    _forget_expired(conn, now)
    pair = (account, address)
    buckets = [pair]
    found = _locked_bucket(conn, pair)
    state = {pair: found}
    last_success = found[3] if found else None
    if last_success is None or last_success < now - KNOWN_SECONDS:
        for key in ((account, ""), ("", address)):  # always in this order: no deadlock
            buckets.append(key)
            state[key] = _locked_bucket(conn, key)
    counts = {}
    for key in buckets:
        found = state[key]
        failures, blocked_until = (0, 0) if found is None else (found[0], found[1])
        if found is not None and found[2] < now - FORGET_SECONDS:
            failures = 0
        if blocked_until > now:
            return blocked_until - now, []
        counts[key] = failures
    for key, failures in counts.items():
        failures += 1
        free = FREE_ADDRESS_FAILURES if key[0] == "" else FREE_FAILURES
        blocked_until = now + wait_after(failures, free)
        found = state[key]
        success = found[3] if found else None
        expires = max(now + FORGET_SECONDS, blocked_until, (success or 0) + KNOWN_SECONDS)
        values = {
            "failures": failures,
            "blocked_until": blocked_until if blocked_until > now else 0,
            "last_attempt": now,
            "expires": expires,
        }
        if found is None:
            conn.execute(
                throttle_table.insert().values(
                    username=key[0], address=key[1], last_success=None, **values
                )
            )
        else:
            conn.execute(
                throttle_table.update()
                .where(throttle_table.c.username == key[0], throttle_table.c.address == key[1])
                .values(**values)
            )
    return 0, buckets


def _forget_expired(conn: Connection, now: int) -> None:
    """Delete buckets past their time (on PostgreSQL only those no one else holds locked:
    waiting for them could deadlock with that transaction)."""
    expired = throttle_table.c.expires < now
    if conn.dialect.name != "postgresql":
        conn.execute(throttle_table.delete().where(expired))
        return
    key = sa.tuple_(throttle_table.c.username, throttle_table.c.address)
    free = (
        sa.select(throttle_table.c.username, throttle_table.c.address)
        .where(expired)
        .limit(100)
        .with_for_update(skip_locked=True)
    )
    conn.execute(throttle_table.delete().where(key.in_(free)))


def _locked_bucket(
    conn: Connection, key: tuple[str, str]
) -> tuple[int, int, int, int | None] | None:
    """A bucket's (failures, blocked_until, last_attempt, last_success), locked until the
    transaction ends; None when it has no row. On PostgreSQL a missing row is made first, so
    that there is one to lock (SQLite's transactions already hold the database's write lock)."""
    where = (throttle_table.c.username == key[0], throttle_table.c.address == key[1])
    query = sa.select(
        throttle_table.c.failures,
        throttle_table.c.blocked_until,
        throttle_table.c.last_attempt,
        throttle_table.c.last_success,
    ).where(*where)
    row = None
    if conn.dialect.name != "postgresql":
        row = conn.execute(query).first()
    else:
        blank = insert(throttle_table).values(
            username=key[0],
            address=key[1],
            failures=0,
            blocked_until=0,
            last_attempt=0,
            last_success=None,
            expires=0,
        )
        while row is None:  # (a row deleted as expired between the two statements: again)
            conn.execute(blank.on_conflict_do_nothing())
            row = conn.execute(query.with_for_update()).first()
    if row is None:
        return None
    return int(row[0]), int(row[1]), int(row[2]), None if row[3] is None else int(row[3])


def _take_back(
    conn: Connection, account: str, address: str, counted: list[tuple[str, str]], now: int
) -> None:
    """A right password: its own account-and-address bucket starts again (and knows the
    address from now on); the other buckets it was counted in lose that one count."""
    conn.execute(
        throttle_table.update()
        .where(throttle_table.c.username == account, throttle_table.c.address == address)
        .values(failures=0, blocked_until=0, last_success=now, expires=now + KNOWN_SECONDS)
    )
    for key in counted[1:]:
        free = FREE_ADDRESS_FAILURES if key[0] == "" else FREE_FAILURES
        failures = throttle_table.c.failures
        conn.execute(
            throttle_table.update()
            .where(throttle_table.c.username == key[0], throttle_table.c.address == key[1])
            .values(
                failures=sa.case((failures > 0, failures - 1), else_=0),
                blocked_until=sa.case(
                    (failures - 1 < free, 0), else_=throttle_table.c.blocked_until
                ),
            )
        )
