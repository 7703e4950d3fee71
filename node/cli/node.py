"""``hrx node``, ``hrx report`` and ``hrx consortium``: set up, upgrade and serve a hospital
node, report from its ledger, and what the consortium authority does."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from ledger import keys
from ledger.canonical import canonical_bytes
from ledger.model import check_chain_id
from ledger.roster import make_member
from ledger.store import ChainStore
from node.base.config import CONFIG_FILE, NodeConfig, load_config, write_config
from node.cli.console import err, fail, out, reported
from node.consortium.membership import ENROLLMENT_FILE, NEXT_ENROLLMENT_FILE
from node.db.engines import Database, open_database, upgrade

DIR_OPTION = click.option(
    "--dir",
    "directory",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="The node's directory (made by hrx node init).",
)


@click.group("node")
def node_group() -> None:
    """Create, upgrade and run a hospital node."""


@node_group.command("init")
@click.option(
    "--dir",
    "directory",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Directory to create the node in (empty or absent).",
)
@click.option("--id", "node_id", required=True, help="Member id, e.g. hosp-a (also its chain id).")
@click.option("--name", required=True, help="The hospital's name, e.g. 杭州市第一人民医院.")
@click.option(
    "--db", default=None, help="Database URL (default: hrx.db, SQLite, in the directory)."
)
@click.option("--port", default=8080, type=click.IntRange(1, 65535), show_default=True)
@click.option("--url", default=None, help="Public base URL (default: http://127.0.0.1:PORT).")
def node_init(
    directory: Path, node_id: str, name: str, db: str | None, port: int, url: str | None
) -> None:
    """Create a node: configuration, keys, database and enrollment file.

    The directory is made (or tightened to) 0700 and everything in it 0600: it holds the
    keys, and a SQLite database holds patients' records. When any step fails, what this
    command made is removed again, so that it can simply be run again."""
    with reported():
        check_chain_id(node_id)
        if (directory / CONFIG_FILE).exists():
            fail(f"{directory} already holds a node ({CONFIG_FILE}); choose another --dir")
        made = _Made(directory)
        try:
            config = _init_node(directory, node_id, name, db, port, url)
        except BaseException:
            made.undo()
            raise
    out.print(f"node [bold]{node_id}[/] created in {config.directory}")
    out.print(f"  database: {config.database_url_redacted}")
    out.print(f"  enrollment file for the consortium authority: {directory / ENROLLMENT_FILE}")
    out.print(f"  next: hrx user add --dir {directory} ...; hrx node serve --dir {directory}")


class _Made:
    """What ``hrx node init`` creates in a directory, so that a failed init can take it back:
    the directory itself when it was absent, else every entry that was not there before."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.existed = directory.exists()
        self.before = set(directory.iterdir()) if self.existed else set()

    def undo(self) -> None:
        import shutil

        if not self.existed:
            shutil.rmtree(self.directory, ignore_errors=True)
            return
        for path in set(self.directory.iterdir()) - self.before:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _init_node(
    directory: Path, node_id: str, name: str, db: str | None, port: int, url: str | None
) -> NodeConfig:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    (directory / "keys").mkdir(mode=0o700, exist_ok=True)
    url = (url or f"http://127.0.0.1:{port}").rstrip("/")
    write_config(
        directory,
        {
            "node": {"id": node_id, "name": name, "url": url},
            "server": {"host": "127.0.0.1", "port": port},
            "database": {"url": db or "sqlite:///hrx.db"},
            "keys": {
                "ed25519": "keys/node.pem",
                "bls": "keys/node.bls",
                "token": "keys/token.pem",
            },
        },
    )
    config = load_config(directory, environ={})
    signing_key = keys.load_or_create_private_key(config.ed25519_key)
    keys.load_or_create_private_key(config.token_key)
    from ledger import bls

    bls_secret = bls.load_or_create_secret_key(config.bls_key)
    database = open_database(config.database_url)
    try:
        upgrade(database)
        store = ChainStore(database.write_engine)
        store.set_setting("chain", node_id)
        store.set_setting("key", str(config.ed25519_key))
    finally:
        database.close()
    enrollment = make_member(node_id, name, url, signing_key, bls_secret)
    (directory / ENROLLMENT_FILE).write_bytes(canonical_bytes(enrollment) + b"\n")
    return config


@node_group.command("upgrade")
@DIR_OPTION
def node_upgrade(directory: Path) -> None:
    """Apply the database migrations this version of hrx needs."""
    with reported():
        config = load_config(directory)
        database = open_database(config.database_url)
        try:
            before, after = upgrade(database)
            if before != after and config.consortium_key.exists():
                _index_patients(config, database)
        finally:
            database.close()
    if before == after:
        out.print(f"the database is current (revision {after})")
    else:
        out.print(f"upgraded the database from revision {before or 'none'} to {after}")


def _index_patients(config: NodeConfig, database: Database) -> int:
    """Index every Patient by its pseudonym (once the node holds the consortium's key)."""
    from node.records.consents import ConsentRecorder
    from node.records.pseudonym_index import rebuild

    recorder = ConsentRecorder(config, ChainStore(database.engine))
    return rebuild(database.write_engine, recorder.pseudonym_of)


@node_group.command("serve")
@DIR_OPTION
@click.option("--host", default=None, help="Address to listen on (default: server.host).")
@click.option("--port", default=None, type=click.IntRange(1, 65535), help="Default: server.port.")
def node_serve(directory: Path, host: str | None, port: int | None) -> None:
    """Serve the node with the development server (production: gunicorn, see the README).

    Logs go to stderr as the node's [logging] says: JSON lines by default, one access line
    per request (HRX_LOGGING_FORMAT=text for a terminal)."""
    with reported():
        from node.base.logs import configure_logging
        from node.web.app import create_app

        config = load_config(directory)
        configure_logging(config.log_format, config.log_level)
        app = create_app(directory)
    host = host or config.host
    port = port or config.port
    out.print(f"node {config.node_id} serving FHIR at http://{host}:{port}/fhir", highlight=False)
    from werkzeug.serving import run_simple

    # not app.run: its banner would be the one line on the console that is not a log line
    run_simple(host, port, app, threaded=True, use_reloader=False)


@click.group("report")
def report_group() -> None:
    """Reports computed from the ledger this node holds (every member's chain)."""


@report_group.command("savings")
@DIR_OPTION
@click.option("--from", "start", default=None, type=click.DateTime(["%Y-%m-%d"]))
@click.option("--to", "end", default=None, type=click.DateTime(["%Y-%m-%d"]))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def report_savings(directory: Path, start: Any, end: Any, as_json: bool) -> None:
    """Exams avoided by mutual recognition and the cost saved, by member, item and month."""
    import json

    from exchange.recognition import load_rules
    from exchange.savings import RESULT_TYPES, savings, yuan

    with reported():
        config = load_config(directory)
        rules = load_rules(config.recognition_rules)
        database = open_database(config.database_url)
        try:
            entries = ChainStore(database.engine).entries_about(None, RESULT_TYPES)
        finally:
            database.close()
    report = savings(
        entries, rules.zone, start.date() if start else None, end.date() if end else None
    )
    if as_json:
        click.echo(json.dumps(report.to_json(), ensure_ascii=False, indent=2))
        return
    names = {item.id: item.label() for item in rules.items}
    span = f"{start:%Y-%m-%d} .. " if start else "… "
    span += f"{end:%Y-%m-%d}" if end else "now"
    out.print(
        f"mutual recognition, {span}: {report.exams_avoided} exam(s) avoided, "
        f"¥{yuan(report.fen_saved)} saved",
        highlight=False,
    )
    for title, position in (("by member", 0), ("by item", 1), ("by month", 2)):
        out.print(f"[bold]{title}[/]")
        for key, count, fen in report.by(position):
            label = f"{key} {names[key]}" if position == 1 and key in names else key
            out.print(f"  {label:32} {count:6} exam(s)  ¥{yuan(fen):>12}", highlight=False)
    if report.reordered:
        out.print("[bold]ordered again despite a recognised result[/]")
        for (member, reason), count in sorted(report.reordered.items()):
            out.print(f"  {member:12} {reason:20} {count}", highlight=False)


@click.group("consortium")
def consortium_group() -> None:
    """What the consortium authority does: sign rosters, make the pseudonym secret."""


@consortium_group.command("roster")
@click.option(
    "--authority-key",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="The authority's Ed25519 key (PEM); created when absent.",
)
@click.option(
    "--quorum",
    default=None,
    type=click.IntRange(1),
    help="Signers a checkpoint needs (default: that of --previous; else required).",
)
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--consortium",
    "name",
    default=None,
    help="The consortium's name (default: that of --previous, else required).",
)
@click.option(
    "--previous",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="The roster this one replaces (or every version so far, as a member's /ledger/rosters "
    "serves them): the new one starts from it and gets the next version.",
)
@click.option(
    "--members-info",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help='JSON {"member id": {"level": ..., "accreditation": [...]}}: what changes.',
)
@click.option("--remove", multiple=True, help="A member to take out of the roster (repeatable).")
@click.argument(
    "enrollments",
    nargs=-1,
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
)
def consortium_roster(
    authority_key: Path,
    quorum: int | None,
    out_path: Path,
    name: str | None,
    previous: Path | None,
    members_info: Path | None,
    remove: tuple[str, ...],
    enrollments: tuple[Path, ...],
) -> None:
    """Sign the next roster: the previous one with what changes — the members whose
    enrollment files are given (new members, new keys from hrx node rotate-keys, new names
    or URLs), levels and accreditation from --members-info, members taken out with --remove.
    A consortium's first roster lists exactly the enrollments given."""
    from ledger.canonical import parse_json
    from ledger.roster import open_roster, sign_roster
    from node.consortium.membership import next_roster, read_roster_history

    with reported():
        history = read_roster_history(previous) if previous is not None else []
        if not history and not enrollments:
            fail("a consortium's first roster needs the members' enrollment files")
        info: dict[str, Any] = {}
        if members_info is not None:
            info = parse_json(members_info.read_bytes())
            if not isinstance(info, dict):
                fail(f"{members_info} must hold a JSON object keyed by member id")
        read = []
        for path in enrollments:
            member = parse_json(path.read_bytes())
            if not isinstance(member, dict) or "id" not in member:
                fail(f"{path} is not an enrollment file (made by hrx node init)")
            read.append(member)
        made = next_roster(history, read, info, name=name, quorum=quorum, remove=remove)
        roster = made.roster
        authority = keys.load_or_create_private_key(authority_key)
        signature = sign_roster(roster, authority)
        open_roster(roster, signature, authority.public_key())  # every proof of possession
        out_path.write_bytes(canonical_bytes({"roster": roster, "signature": signature}) + b"\n")
    out.print(
        f"roster version {roster['version']} of {roster['consortium']}: "
        f"{len(roster['members'])} members, quorum {roster['quorum']}"
    )
    out.print(f"authority public key: {keys.public_key_text(authority)}")
    for warning in made.warnings:
        err.print(f"[bold yellow]warning:[/] {warning}")


@consortium_group.command("resolve-fork")
@click.option(
    "--authority-key",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="The authority's Ed25519 key (PEM).",
)
@click.option("--chain", required=True, help="The member whose chain forked.")
@click.option("--height", required=True, type=click.IntRange(0), help="The height of the fork.")
@click.option(
    "--keep", required=True, help="The hash of the block kept at that height (hex, 64 digits)."
)
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path, dir_okay=False))
def consortium_resolve_fork(
    authority_key: Path, chain: str, height: int, keep: str, out_path: Path
) -> None:
    """Sign the resolution of a fork: which block is the chain's at the height it forked
    (members install it with hrx node resolve-fork; docs/operations.md)."""
    from ledger.resolution import make_resolution, sign_resolution

    with reported():
        document = sign_resolution(
            make_resolution(chain, height, keep.lower()), keys.load_private_key(authority_key)
        )
        out_path.write_bytes(canonical_bytes(document) + b"\n")
    out.print(f"resolution of {chain}'s fork at height {height}: block {keep.lower()} is kept")
    out.print(f"give {out_path} to every member: hrx node resolve-fork --dir DIR {out_path}")


@consortium_group.command("secret")
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path, dir_okay=False))
def consortium_secret(out_path: Path) -> None:
    """Make the consortium's pseudonym secret (once; give it to every member)."""
    from node.consortium.membership import write_secret

    with reported():
        write_secret(out_path)
    out.print(f"wrote {out_path} (mode 0600): give it to each member over a secure channel")


@node_group.command("join")
@DIR_OPTION
@click.option(
    "--roster",
    "roster_path",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
)
@click.option(
    "--secret",
    "secret_path",
    default=None,
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="The consortium's pseudonym secret (needed on the first join).",
)
@click.option(
    "--authority",
    default=None,
    help="The authority's public key (base64url or PEM file); needed on the first join.",
)
def node_join(
    directory: Path, roster_path: Path, secret_path: Path | None, authority: str | None
) -> None:
    """Join a consortium, or install a newer roster version of it."""
    from ledger import bls
    from node.consortium.membership import (
        install_roster,
        listed_next_keys,
        put_next_keys_in_place,
        read_roster_file,
        read_secret,
    )

    with reported():
        config = load_config(directory)
        roster, signature = read_roster_file(roster_path)
        upcoming = listed_next_keys(config, roster)  # hrx node rotate-keys made them
        secret_file = config.consortium_key
        if secret_path is not None:
            read_secret(secret_path)
        elif not secret_file.exists():
            fail("first join: give the consortium's pseudonym secret (--secret)")
        database = open_database(config.database_url)
        try:
            store = ChainStore(database.write_engine)
            if upcoming is not None:
                signing_key, bls_public = upcoming
            else:
                signing_key = keys.load_private_key(config.ed25519_key)
                bls_public = bls.public_key(bls.read_secret_key(config.bls_key))
            checked = install_roster(
                store, config.node_id, signing_key, bls_public, roster, signature, authority
            )
        finally:
            database.close()
        rotated = None
        if upcoming is not None:  # only once the roster listing them is installed
            rotated = put_next_keys_in_place(config, checked.version)
            (directory / NEXT_ENROLLMENT_FILE).unlink(missing_ok=True)
        # one enrollment file, with the keys the roster lists now: never a stale one to send
        listed = checked.member(config.node_id)
        enrollment = {k: listed[k] for k in ("id", "name", "url", "ed25519", "bls", "bls_pop")}
        (directory / ENROLLMENT_FILE).write_bytes(canonical_bytes(enrollment) + b"\n")
        if secret_path is not None and secret_path.resolve() != secret_file.resolve():
            if secret_file.exists() and read_secret(secret_file) != read_secret(secret_path):
                fail(f"{secret_file} holds another consortium secret; it is never replaced")
            descriptor = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "wb") as handle:  # never readable by others, not once
                handle.write(secret_path.read_bytes())
        database = open_database(config.database_url)
        try:
            indexed = _index_patients(config, database)
        finally:
            database.close()
    out.print(
        f"{config.node_id} is a member of {checked.body['consortium']} (roster version "
        f"{checked.version}, {len(checked.member_ids())} members, quorum {checked.quorum}); "
        f"{indexed} patient(s) indexed by pseudonym"
    )
    if rotated:
        out.print(rotated)
    from node.consortium.membership import quorum_warning

    warning = quorum_warning(checked.body)
    if warning:
        err.print(f"[yellow]warning:[/] {warning}")


@node_group.command("resolve-fork")
@DIR_OPTION
@click.argument("resolution_path", type=click.Path(path_type=Path, dir_okay=False, exists=True))
def node_resolve_fork(directory: Path, resolution_path: Path) -> None:
    """Install the authority's resolution of a fork (hrx consortium resolve-fork): the chain
    is followed again here when this node holds the block it keeps."""
    from ledger.canonical import parse_json
    from ledger.resolution import open_resolution
    from node.consortium.membership import AUTHORITY_SETTING

    with reported():
        config = load_config(directory)
        database = open_database(config.database_url)
        try:
            store = ChainStore(database.write_engine)
            anchor = store.setting(AUTHORITY_SETTING)
            if anchor is None:
                fail("this node has joined no consortium: it knows no authority key")
            document = parse_json(resolution_path.read_bytes())
            body = open_resolution(document, keys.parse_public_key(anchor))
            store.add_resolution(document)
            held = store.block_at(body["chain"], body["height"])
            frozen = body["chain"] in store.frozen_chains()
        finally:
            database.close()
    where = f"chain {body['chain']} at height {body['height']}"
    if frozen:
        err.print(
            f"[bold yellow]{where}: this node holds the block the authority did not keep "
            f"({held.hash if held else '?'}); the chain stays frozen here[/]"
        )
        sys.exit(1)
    out.print(
        f"{where}: the authority keeps block {body['keep']}; "
        + (
            "this node holds it and follows the chain again"
            if held is not None
            else "this node will take it from the members that hold it"
        )
    )


@node_group.command("replicate")
@DIR_OPTION
@click.option(
    "--interval",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0.05),
    help="Seconds between rounds.",
)
@click.option("--once", is_flag=True, help="One round, then exit (prints what it did).")
def node_replicate(directory: Path, interval: float, once: bool) -> None:
    """Pull and verify every member's chain (run beside the web server, as its own process)."""
    from node.base.logs import configure_logging
    from node.consortium.worker import describe, run

    with reported():
        config = load_config(directory)
        configure_logging(config.log_format, config.log_level)  # as the web server's
        report = run(directory, interval, once)
    if once:
        out.print(describe(report))


def register(main: click.Group) -> None:
    for group in (
        node_group,
        report_group,
        consortium_group,
    ):
        main.add_command(group)
