"""``hrx user``, ``hrx token`` and ``hrx patient``: who may use a node, their bearer tokens,
and the portal accounts hospital staff open for patients."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ledger import keys
from node.config import load_config
from node.console import err, fail, out, reported
from node.db import open_database
from node.node_commands import DIR_OPTION
from node.users import ROLES, add_user, get_user


@click.group("user")
def user_group() -> None:
    """Manage the people and systems who may use a node."""


@user_group.command("add")
@DIR_OPTION
@click.option("--username", required=True)
@click.option("--role", required=True, type=click.Choice(ROLES))
@click.option("--patient", "patient_id", default=None, help="For a patient: their Patient id.")
@click.option("--password-stdin", is_flag=True, help="Read a password from stdin (one line).")
def user_add(
    directory: Path, username: str, role: str, patient_id: str | None, password_stdin: bool
) -> None:
    """Add a user (a password only with --password-stdin; tokens need none)."""
    password = None
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    with reported():
        config = load_config(directory)
        database = open_database(config.database_url)
        try:
            if patient_id is not None:
                from fhir_adapters.store import ResourceStore

                ResourceStore(database.engine, database.write_engine).read("Patient", patient_id)
            add_user(
                database.write_engine, username, role, patient_id=patient_id, password=password
            )
        finally:
            database.close()
    out.print(f"added {role} [bold]{username}[/]")


@click.group("token")
def token_group() -> None:
    """Issue bearer tokens for a node's users."""


@token_group.command("issue")
@DIR_OPTION
@click.option("--username", required=True)
@click.option("--scope", default=None, help="SMART scopes, space-separated (default: the role's).")
@click.option("--ttl", default=None, type=click.IntRange(1), help="Lifetime in seconds.")
def token_issue(directory: Path, username: str, scope: str | None, ttl: int | None) -> None:
    """Print a bearer token for a user."""
    with reported():
        config = load_config(directory)
        if ttl is not None and ttl > config.token_max_ttl:
            fail(f"--ttl {ttl} is above tokens.max_ttl ({config.token_max_ttl} s)")
        database = open_database(config.database_url)
        try:
            user = get_user(database.engine, username)
            if user is None:
                fail(f"no user {username!r}; add one with: hrx user add --dir {directory} ...")
            from node.auth import TokenAuthority

            authority = TokenAuthority(
                keys.load_private_key(config.token_key), config.fhir_base, lambda _: user
            )
            token = authority.issue(user, scope, ttl or config.token_ttl)
        finally:
            database.close()
    click.echo(token)


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

    The patient sets a username and password with it at /portal/enroll; a patient who already
    has an account gets a new password with it instead."""
    from fhir_adapters.store import ResourceStore
    from node.sessions import issue_enrollment

    with reported():
        config = load_config(directory)
        database = open_database(config.database_url)
        try:
            patient = (
                ResourceStore(database.engine, database.write_engine)
                .read("Patient", patient_id)
                .resource()
            )
            code = issue_enrollment(database.write_engine, patient_id, seconds=days * 86400)
        finally:
            database.close()
    system = config.identifier_system
    if not any(i.get("system") == system for i in patient.get("identifier", [])):
        err.print(
            f"[yellow]warning:[/] Patient/{patient_id} has no identifier of {system}: the "
            "patient can sign in, but cannot grant consent until it is added"
        )
    out.print(f"enrollment code for Patient/{patient_id} (valid {days} days, once):")
    click.echo(code)
    out.print(f"the patient enrolls at {config.url}/portal/enroll")


def register(main: click.Group) -> None:
    for group in (user_group, token_group, patient_group):
        main.add_command(group)
