"""``hrx user``, ``hrx token`` and ``hrx patient``: who may use a node, their bearer tokens,
and the portal accounts hospital staff open for patients.

Each command acts on the node's database at once: a web server running from the same
database refuses a disabled or removed user's, or a revoked, token from its next request
on, in every worker process (:mod:`node.identity.tokens`). See docs/operations.md, "Users,
passwords and tokens"."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from fhir_adapters.store import ResourceStore
from node.base.config import NodeConfig, load_config
from node.cli.console import err, fail, out, reported
from node.cli.node import DIR_OPTION
from node.db.engines import Database, open_database
from node.identity.sessions import end_sessions_of, issue_enrollment, reset_account
from node.identity.tokens import issue_token
from node.identity.users import (
    ROLES,
    add_user,
    get_user,
    remove_user,
    revoke_token,
    revoke_tokens_of,
    set_active,
    set_password,
    unlock,
)

USERNAME_OPTION = click.option("--username", required=True, help="The user's username.")


@contextmanager
def node_database(directory: Path) -> Iterator[tuple[NodeConfig, Database]]:
    """The node's configuration and database, closed afterwards (errors reported)."""
    with reported():
        config = load_config(directory)
        database = open_database(config.database_url)
        try:
            yield config, database
        finally:
            database.close()


def read_password() -> str:
    """One line of stdin, the password (never a command-line argument: ps would show it)."""
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        fail("give the password on stdin (one line), e.g. from a password manager's pipe")
    return password


@click.group("user")
def user_group() -> None:
    """Manage the people and systems who may use a node."""


@user_group.command("add")
@DIR_OPTION
@USERNAME_OPTION
@click.option("--role", required=True, type=click.Choice(ROLES))
@click.option("--patient", "patient_id", default=None, help="For a patient: their Patient id.")
@click.option("--password-stdin", is_flag=True, help="Read a password from stdin (one line).")
def user_add(
    directory: Path, username: str, role: str, patient_id: str | None, password_stdin: bool
) -> None:
    """Add a user (a password only with --password-stdin; tokens need none)."""
    password = read_password() if password_stdin else None
    with node_database(directory) as (_config, database):
        if patient_id is not None:
            ResourceStore(database.engine, database.write_engine).read("Patient", patient_id)
        add_user(database.write_engine, username, role, patient_id=patient_id, password=password)
    out.print(f"added {role} [bold]{username}[/]")


@user_group.command("disable")
@DIR_OPTION
@USERNAME_OPTION
def user_disable(directory: Path, username: str) -> None:
    """Stop a user at once: no sign-in, and every token and session of theirs void."""
    with node_database(directory) as (_config, database):
        was_active = set_active(database.write_engine, username, False)
    if was_active:
        out.print(
            f"disabled [bold]{username}[/]: they cannot sign in, and their tokens and sessions "
            "no longer work"
        )
    else:
        out.print(
            f"[bold]{username}[/] was already disabled (their tokens and sessions, if any "
            "were made since, are void now too)"
        )


@user_group.command("enable")
@DIR_OPTION
@USERNAME_OPTION
def user_enable(directory: Path, username: str) -> None:
    """Let a disabled user sign in again (the tokens and sessions they had stay void)."""
    with node_database(directory) as (_config, database):
        was_active = set_active(database.write_engine, username, True)
    if was_active:
        out.print(f"[bold]{username}[/] was not disabled; nothing changed")
    else:
        out.print(
            f"enabled [bold]{username}[/]: they can sign in again (tokens issued before they "
            "were disabled stay void)"
        )


@user_group.command("remove")
@DIR_OPTION
@USERNAME_OPTION
def user_remove(directory: Path, username: str) -> None:
    """Remove a user for good; the username stays reserved (the audit trail names it)."""
    with node_database(directory) as (_config, database):
        user = remove_user(database.write_engine, username)
    out.print(
        f"removed {user.role} [bold]{username}[/]: no sign-in, tokens or sessions any more; "
        "the username is kept, unusable, so the audit trail's records of it still mean this "
        "user and no one else"
    )


@user_group.command("reset-password")
@DIR_OPTION
@USERNAME_OPTION
def user_reset_password(directory: Path, username: str) -> None:
    """Set a new password, read from stdin (one line); every token and session of the user
    stops working, and their sign-in throttles are lifted."""
    password = read_password()
    with node_database(directory) as (_config, database):
        set_password(database.write_engine, username, password)

        end_sessions_of(database.write_engine, username)
        user = get_user(database.engine, username)
    out.print(
        f"new password for [bold]{username}[/]; their tokens and sessions were revoked and "
        "their sign-in throttles lifted"
    )
    if user is not None and not user.active:
        err.print(f"[yellow]warning:[/] {username} is disabled: hrx user enable to let them in")


@user_group.command("unlock")
@DIR_OPTION
@USERNAME_OPTION
def user_unlock(directory: Path, username: str) -> None:
    """Lift the sign-in throttles of an account (from every address)."""
    with node_database(directory) as (_config, database):
        holding = unlock(database.write_engine, username)
    if holding:
        out.print(f"lifted the {holding} sign-in throttle(s) holding [bold]{username}[/]")
    else:
        out.print(f"no sign-in throttle was holding [bold]{username}[/]; its counts are reset")


@click.group("token")
def token_group() -> None:
    """Issue and revoke bearer tokens for a node's users."""


@token_group.command("issue")
@DIR_OPTION
@USERNAME_OPTION
@click.option("--scope", default=None, help="SMART scopes, space-separated (default: the role's).")
@click.option("--ttl", default=None, type=click.IntRange(1), help="Lifetime in seconds.")
def token_issue(directory: Path, username: str, scope: str | None, ttl: int | None) -> None:
    """Print a bearer token for a user (its id, the claim jti, is what revokes it alone)."""
    with node_database(directory) as (config, database):
        if ttl is not None and ttl > config.token_max_ttl:
            fail(f"--ttl {ttl} is above tokens.max_ttl ({config.token_max_ttl} s)")
        if get_user(database.engine, username) is None:
            fail(f"no user {username!r}; add one with: hrx user add --dir {directory} ...")
        token = issue_token(
            config.token_key, config.fhir_base, database, username, scope, ttl or config.token_ttl
        )
    click.echo(token)


@token_group.command("revoke")
@DIR_OPTION
@click.option("--id", "token_id", default=None, help="One token's id (its claim jti).")
@click.option("--username", default=None, help="Every token and session of this user.")
def token_revoke(directory: Path, token_id: str | None, username: str | None) -> None:
    """Revoke one token by its id, or every token (and portal or clinic session) of a user.

    A token's id is in the AuditEvents of what it did (agent.altId) and of the sign-in that
    got it. Revoked tokens are refused from the next request on."""
    if (token_id is None) == (username is None):
        fail("give either --id TOKEN_ID or --username USERNAME", 2)
    with node_database(directory) as (_config, database):
        if username is not None:
            revoke_tokens_of(database.write_engine, username)

            end_sessions_of(database.write_engine, username)
        else:
            assert token_id is not None
            token = revoke_token(database.write_engine, token_id)
    if username is not None:
        out.print(f"revoked every token and session of [bold]{username}[/]")
    elif token.revoked is not None:
        out.print(f"token {token_id} of [bold]{token.username}[/] was already revoked")
    elif token.expires <= time.time():
        out.print(f"token {token_id} of [bold]{token.username}[/] had expired already")
    else:
        out.print(f"revoked token {token_id} of [bold]{token.username}[/]")


@click.group("patient")
def patient_group() -> None:
    """What hospital staff do for patients: let them into the portal."""


@patient_group.command("enroll")
@DIR_OPTION
@click.option("--patient", "patient_id", required=True, help="The Patient resource's id.")
@click.option(
    "--days", default=7, show_default=True, type=click.IntRange(1, 30), help="Days the code works."
)
def patient_enroll(directory: Path, patient_id: str, days: int) -> None:
    """Print an enrollment code for the patient portal (once; it works once).

    The patient sets a username and password with it at /portal/enroll. For a patient who
    already has an account it is a reset: their password, tokens and portal sessions stop
    working now, and the code sets a new password (the username stays)."""
    with node_database(directory) as (config, database):
        patient = (
            ResourceStore(database.engine, database.write_engine)
            .read("Patient", patient_id)
            .resource()
        )
        account = reset_account(database.write_engine, patient_id)
        code = issue_enrollment(database.write_engine, patient_id, seconds=days * 86400)
    system = config.identifier_system
    if not any(i.get("system") == system for i in patient.get("identifier", [])):
        err.print(
            f"[yellow]warning:[/] Patient/{patient_id} has no identifier of {system}: the "
            "patient can sign in, but cannot grant consent until it is added"
        )
    if account is not None:
        out.print(
            f"Patient/{patient_id} has a portal account, [bold]{account.username}[/]: its "
            "password, tokens and sessions no longer work; the code sets a new password"
        )
        if not account.active:
            err.print(
                f"[yellow]warning:[/] {account.username} is disabled: it cannot sign in until "
                "hrx user enable"
            )
    out.print(f"enrollment code for Patient/{patient_id} (valid {days} days, once):")
    click.echo(code)
    out.print(f"the patient enrolls at {config.url}/portal/enroll")
