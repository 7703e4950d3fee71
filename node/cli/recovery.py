"""``hrx node recover``: after a node's database was restored from a backup, take back the
blocks of its own chain that it signed after the backup was made, from the members that hold
them, before the node appends again.

A node's chain is replicated by every member, so a backup that is older than the chain loses
nothing — but a node that appended again from the backup's head would sign a second block at a
height it has already signed: fork evidence against itself, and its chain frozen everywhere.
Its replication worker therefore refuses to take its own chain from others, and the node holds
its signing (no block is signed by any of its processes: ``/healthz`` answers 503 and says why)
from the moment a member shows it its own chain beyond its head — the first block a process
would sign waits for the members' answer. This command is the one way out, with the node
stopped: every block is verified as any replica verifies it (signatures under the roster
version it names, Merkle roots, hash links) before it is stored, and once every member has
been asked, the hold is lifted.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from node.cli.console import err, fail, out, reported
from node.cli.node import DIR_OPTION


@click.command("recover")
@DIR_OPTION
def recover(directory: Path) -> None:
    """Take back this node's own newer blocks from the members (after a restore from a
    backup; stop the node's web server and replication worker first)."""
    from ledger.store import ChainStore
    from node.base.config import load_config
    from node.consortium.worker import replicator_for
    from node.db.engines import open_database, require_current

    with reported():
        config = load_config(directory)
        database = open_database(config.database_url)
        try:
            require_current(database.engine, config.directory)
            reader = ChainStore(database.engine)
            before = reader.heads().get(config.node_id)
            replicator = replicator_for(config, reader, writes=ChainStore(database.write_engine))
            replicator.recovering = True
            report = replicator.run_round()
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
