"""``hrx node``: set up a hospital node (init, join, upgrade), run it (serve, replicate), and
look after it (status, recover after a restore, rotate its keys, install the authority's
resolution of a fork)."""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from ledger import keys
from ledger.canonical import canonical_bytes, parse_json
from ledger.resolution import open_resolution
from ledger.roster import make_member
from ledger.store import ChainStore
from node.base.config import load_config
from node.base.logs import configure_logging
from node.cli.console import err, fail, out, reported
from node.consortium.membership import (
    AUTHORITY_SETTING,
    ENROLLMENT_FILE,
    NEXT_ENROLLMENT_FILE,
    REPLACES,
    next_key_paths,
    quorum_warning,
)
from node.consortium.worker import describe, replicator_for, run
from node.db.engines import open_database, require_current
from node.flows import consults
from node.ops.setup import init_node, join_node, upgrade_node
from node.ops.status import node_status
from node.records.audit_trail import Caller
from node.services import open_services
from node.web.app import create_app, serve_for_development

log = logging.getLogger(__name__)
CONSULT_DELIVERY_SECONDS = 5.0  # how often the replication worker sends what consults wait to send

STYLE = {"ok": "green", "note": "cyan", "warning": "yellow", "problem": "bold red"}
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
        config = init_node(directory, node_id, name, database_url=db, port=port, url=url)
    out.print(f"node [bold]{node_id}[/] created in {config.directory}")
    out.print(f"  database: {config.database_url_redacted}")
    out.print(f"  enrollment file for the consortium authority: {directory / ENROLLMENT_FILE}")
    out.print(f"  next: hrx user add --dir {directory} ...; hrx node serve --dir {directory}")


@node_group.command("upgrade")
@DIR_OPTION
def node_upgrade(directory: Path) -> None:
    """Apply the database migrations this version of hrx needs."""
    shown = [0.0]

    def progress(done: int, total: int) -> None:
        if done == total or time.monotonic() - shown[0] >= 2:
            shown[0] = time.monotonic()
            out.print(f"search index: {done} of {total} resources indexed again")

    with reported():
        before, after = upgrade_node(load_config(directory), progress)
    if before == after:
        out.print(f"the database is current (revision {after})")
    else:
        out.print(f"upgraded the database from revision {before or 'none'} to {after}")


@node_group.command("serve")
@DIR_OPTION
@click.option("--host", default=None, help="Address to listen on (default: server.host).")
@click.option("--port", default=None, type=click.IntRange(1, 65535), help="Default: server.port.")
def node_serve(directory: Path, host: str | None, port: int | None) -> None:
    """Serve the node with the development server (production: gunicorn, see the README).

    Logs go to stderr as the node's [logging] says: JSON lines by default, one access line
    per request (HRX_LOGGING_FORMAT=text for a terminal)."""
    with reported():
        config = load_config(directory)
        configure_logging(config.log_format, config.log_level)
        app = create_app(directory)
    host = host or config.host
    port = port or config.port
    out.print(f"node {config.node_id} serving FHIR at http://{host}:{port}/fhir", highlight=False)
    serve_for_development(app, host, port)


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
    with reported():
        config = load_config(directory)
        if secret_path is None and not config.consortium_key.exists():
            fail("first join: give the consortium's pseudonym secret (--secret)")
        joined = join_node(config, roster_path, secret_path, authority)
    checked = joined.roster
    out.print(
        f"{config.node_id} is a member of {checked.body['consortium']} (roster version "
        f"{checked.version}, {len(checked.member_ids())} members, quorum {checked.quorum}); "
        f"{joined.indexed} patient(s) indexed by pseudonym"
    )
    if joined.rotated:
        out.print(joined.rotated)
    warning = quorum_warning(checked.body)
    if warning:
        err.print(f"[yellow]warning:[/] {warning}")


@node_group.command("resolve-fork")
@DIR_OPTION
@click.argument("resolution_path", type=click.Path(path_type=Path, dir_okay=False, exists=True))
def node_resolve_fork(directory: Path, resolution_path: Path) -> None:
    """Install the authority's resolution of a fork (hrx consortium resolve-fork): the chain
    is followed again here when this node holds the block it keeps."""
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
    help="Seconds between a witness's comparisons of heads with the other witnesses.",
)
@click.option(
    "--once",
    is_flag=True,
    help="Compare heads with every member once, pull what is behind, then exit.",
)
def node_replicate(directory: Path, interval: float, once: bool) -> None:
    """Replicate as this node's roles say: a witness follows every chain, an ordinary member
    sends its own to the witnesses (run beside the web server, as its own process)."""
    with reported():
        config = load_config(directory)
        configure_logging(config.log_format, config.log_level)  # as the web server's
        stop = threading.Event()
        if not once:  # consults and reports a member could not be reached for, sent again
            threading.Thread(
                target=_deliver_consults, args=(directory, stop), daemon=True, name="consults"
            ).start()
        try:
            report = run(directory, interval, once)
        finally:
            stop.set()
    if once:
        out.print(describe(report))


def _deliver_consults(directory: Path, stop: threading.Event) -> None:
    """Every DELIVERY_SECONDS, send what consults wait to send (:func:`deliver_pending`)."""
    try:
        services = open_services(load_config(directory))
    except Exception:
        log.exception("consults waiting to be sent cannot be sent from this process")
        return
    caller = Caller(None, client="consult delivery")
    try:
        while not stop.wait(CONSULT_DELIVERY_SECONDS):
            try:
                consults.deliver_pending(services, caller)
            except Exception:
                log.exception("sending pending consults failed; trying again")
    finally:
        services.close()


@node_group.command("rotate-keys")
@DIR_OPTION
def rotate_keys(directory: Path) -> None:
    """Make the node's next Ed25519 and BLS keys and enrollment-next.json for the authority."""
    from ledger import bls

    with reported():
        config = load_config(directory)
        next_ed25519, next_bls = next_key_paths(config)
        signing_key = keys.load_or_create_private_key(next_ed25519)
        bls_secret = bls.load_or_create_secret_key(next_bls)
        member = make_member(config.node_id, config.name, config.url, signing_key, bls_secret)
        current = keys.load_private_key(config.ed25519_key)
        replaces = {
            "ed25519": keys.public_key_text(current),
            "bls": bls.public_key(bls.read_secret_key(config.bls_key)).hex(),
        }
        enrollment = directory / NEXT_ENROLLMENT_FILE
        enrollment.write_bytes(canonical_bytes({**member, REPLACES: replaces}) + b"\n")
    out.print(f"next keys of {config.node_id}: {next_ed25519}, {next_bls}")
    out.print(f"  Ed25519 {member['ed25519']}")
    out.print(f"  send {enrollment} to the consortium authority; once it has signed a roster")
    out.print(f"  listing them, run hrx node join --dir {directory} --roster <that roster>")


@node_group.command("recover")
@DIR_OPTION
def recover(directory: Path) -> None:
    """Take back this node's own newer blocks from the members (after a restore from a
    backup; stop the node's web server and replication worker first)."""
    with reported():
        config = load_config(directory)
        database = open_database(config.database_url)
        try:
            require_current(database.engine, config.directory)
            reader = ChainStore(database.engine)
            before = reader.heads().get(config.node_id)
            replicator = replicator_for(config, reader, writes=ChainStore(database.write_engine))
            replicator.recovering = True
            report = replicator.run_round(reader.roster().member_ids())
            if not (report.unreachable or report.refused or report.evidence):
                replicator.writes.release_signing()
            after = reader.heads().get(config.node_id)
            height_before = -1 if before is None else before.header["height"]
            height_after = -1 if after is None else after.header["height"]
        finally:
            database.close()
    members = len(report.unreachable) + len(report.refused)
    for member, why in sorted({**report.unreachable, **report.refused}.items()):
        err.print(f"[yellow]{member}:[/] {why}")
    if report.evidence:
        fail(f"fork evidence found while recovering: {report.evidence[0]}; see hrx audit verify")
    out.print(
        f"{config.node_id}: own chain at height {height_before} before, {height_after} now "
        f"({report.pulled.get(config.node_id, 0)} entries taken back); other chains: "
        + (
            ", ".join(f"{c} +{n}" for c, n in sorted(report.pulled.items()) if c != config.node_id)
            or "up to date"
        )
    )
    if members:
        err.print(
            f"[yellow]{members} member(s) could not be asked[/]: run hrx node recover again "
            "when they can, before starting the node, unless you are sure they hold nothing newer"
        )
        sys.exit(1)


@node_group.command("status")
@DIR_OPTION
def status(directory: Path) -> None:
    """Show the node's state and what to do about each problem (running or not)."""
    with reported():
        config = load_config(directory)
        database = open_database(config.database_url)
        try:
            found = node_status(config, database)
        finally:
            database.close()
    out.print(f"[bold]{escape(config.name)}[/] ({config.node_id}) — {config.directory}")
    table = Table(show_header=False, box=None, pad_edge=False, expand=False)
    table.add_column(no_wrap=True)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    for finding in found.findings:
        style = STYLE[finding.level]
        text = escape(finding.what)
        if finding.do:
            text += f"\n[bold]→[/] {escape(finding.do)}"
        table.add_row(finding.topic, f"[{style}]{finding.level}[/]", text)
    out.print(table)
    if found.worst == "problem":
        sys.exit(1)
