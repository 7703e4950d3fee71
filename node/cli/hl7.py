"""``hrx adapters hl7-listen``, ``hl7-import`` and ``quarantine``: the LIS over HL7 v2.

``hl7-listen`` serves MLLP and stores each ORU^R01 before answering AA; ``hl7-import`` takes
files of messages (one per line group starting at MSH, or MLLP-framed) and reports each one;
``quarantine list|show|replay`` looks after what could not be taken in. How messages map to
FHIR, and what is refused: docs/adapters-hl7.md.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import click

from fhir_adapters.hl7v2 import Hl7Error, decode, message_lines, split_messages
from node.base.config import load_config
from node.base.errors import NodeError
from node.base.logs import configure_logging
from node.cli.console import entry_progress, err, fail, out, reported
from node.cli.node import DIR_OPTION
from node.db.engines import open_database
from node.intake.hl7 import ADAPTER, Hl7Intake
from node.intake.mllp import serve, serve_processes
from node.intake.quarantine import quarantine_row, quarantined
from node.services import open_services

COMMANDS: list[click.Command] = []


def _when(micros: int | None) -> str:
    if micros is None:
        return "-"
    moment = datetime.fromtimestamp(micros / 1_000_000, UTC).astimezone()
    return moment.strftime("%Y-%m-%d %H:%M:%S")


@click.command("hl7-listen")
@DIR_OPTION
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    default=2575,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="TCP port (0: any free port; the port chosen is printed).",
)
@click.option(
    "--max-bytes",
    default=1 << 20,
    show_default=True,
    type=click.IntRange(1024),
    help="Longest message taken in; a longer one is answered AR.",
)
@click.option(
    "--idle-timeout",
    default=600.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds a connection may stay silent between messages.",
)
@click.option(
    "--read-timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds a message may stall half-sent before the connection is closed.",
)
@click.option(
    "--processes",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Listener processes behind the port (one core each; e.g. the machine's cores).",
)
def hl7_listen(
    directory: Path,
    host: str,
    port: int,
    max_bytes: int,
    idle_timeout: float,
    read_timeout: float,
    processes: int,
) -> None:
    """Take lab results (HL7 v2 ORU^R01) from the LIS over MLLP until stopped (SIGTERM).

    Each message is stored in one transaction and only then answered AA; one that cannot be
    read (AR) or stored (AE) is answered with the reason and kept in the quarantine. One log
    line per message goes to stderr. With ``--processes N`` the connections are shared out
    among N listener processes (each message is still one transaction, acknowledged once
    committed)."""
    with reported():
        config = load_config(directory)
        configure_logging(config.log_format, config.log_level)  # the node's log lines
        services = open_services(config)

    def ready(address: tuple[str, int]) -> None:
        out.print(
            f"hl7-listen: node {config.node_id} takes HL7 v2 over MLLP on "
            f"{address[0]}:{address[1]} (stop with Ctrl-C or SIGTERM)",
            highlight=False,
        )
        sys.stdout.flush()

    if processes > 1:
        services.close()  # (opened to check the node; each listener process opens its own)

        def open_intake() -> tuple[Hl7Intake, Callable[[], None]]:
            opened = open_services(config)
            return Hl7Intake(opened), opened.close

        with reported():
            serve_processes(
                open_intake,
                host,
                port,
                processes,
                max_bytes=max_bytes,
                idle_timeout=idle_timeout,
                read_timeout=read_timeout,
                ready=ready,
            )
        out.print("hl7-listen: stopped")
        return
    try:
        with reported():
            serve(
                Hl7Intake(services),
                host,
                port,
                max_bytes=max_bytes,
                idle_timeout=idle_timeout,
                read_timeout=read_timeout,
                ready=ready,
            )
    finally:
        services.close()
    out.print("hl7-listen: stopped")


@click.command("hl7-import")
@DIR_OPTION
@click.argument(
    "files",
    nargs=-1,
    required=True,
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
)
def hl7_import(directory: Path, files: tuple[Path, ...]) -> None:
    """Take lab results (HL7 v2 ORU^R01) from files.

    A file holds one or more messages, each starting at an MSH segment, segments ending in CR,
    LF or CRLF (or MLLP-framed). Each message is reported stored, duplicate or quarantined;
    the exit status is 1 when any was quarantined."""
    with reported():
        config = load_config(directory)
        messages = [
            (path, number, payload)
            for path in files
            for number, payload in enumerate(split_messages(path.read_bytes()), 1)
        ]
        configure_logging(config.log_format, config.log_level)  # the node's log lines
        services = open_services(config)
    if not messages:
        services.close()
        fail("the files hold no HL7 message (none starts with MSH)")
    counts: Counter[str] = Counter()
    try:
        intake = Hl7Intake(services)
        with entry_progress(len(messages), "importing") as advance:
            for path, number, payload in messages:
                outcome = intake.take_in(payload, f"{path.name}#{number}"[:255])
                counts[outcome.status] += 1
                style = "" if outcome.accepted else "[red]"
                out.print(
                    f"{style}{path}#{number} {outcome.key or '-'}: {outcome.summary()}",
                    highlight=False,
                    markup=bool(style),
                )
                advance(1)
    finally:
        services.close()
    out.print(
        f"{len(messages)} message(s): {counts['stored']} stored, {counts['duplicate']} "
        f"duplicate, {counts['quarantined'] + counts['refused']} refused",
        highlight=False,
    )
    if counts["quarantined"] or counts["refused"]:
        err.print(
            "[yellow]some messages were refused:[/] see hrx adapters quarantine list --dir "
            f"{directory}; fix the cause, then hrx adapters quarantine replay --dir {directory} "
            "ID (or send a corrected message)"
        )
        sys.exit(1)


@click.group("quarantine")
def quarantine_group() -> None:
    """What an adapter could not take in: list it, show it, replay it."""


@quarantine_group.command("list")
@DIR_OPTION
@click.option("--all", "everything", is_flag=True, help="Also the rows already replayed.")
@click.option("--adapter", default=None, help="Only this adapter's rows (hl7, dicom, csv).")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def quarantine_list(
    directory: Path, everything: bool, adapter: str | None, limit: int, as_json: bool
) -> None:
    """The quarantine's newest rows, oldest first (by default only those not yet replayed)."""
    with reported():
        config = load_config(directory)
        database = open_database(config.database_url)
        try:
            rows = quarantined(
                database.engine, adapter=adapter, include_replayed=everything, limit=limit
            )
        finally:
            database.close()
    for row in rows:
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "id": row.id,
                        "adapter": row.adapter,
                        "received_at": _when(row.received_at),
                        "origin": row.origin,
                        "bytes": row.size,
                        "replayed_at": _when(row.replayed_at) if row.replayed_at else None,
                        "reason": row.reason,
                    },
                    ensure_ascii=False,
                )
            )
        else:
            state = f"replayed {_when(row.replayed_at)}" if row.replayed_at else "open"
            out.print(
                f"#{row.id:<5} {row.adapter:6} {_when(row.received_at)}  {row.size:>8} B  "
                f"{row.origin}  [{state}]\n       {row.reason}",
                highlight=False,
                markup=False,
            )
    if not as_json:
        what = "row(s)" if everything else "open row(s)"
        out.print(f"{len(rows)} {what}" + (f" (the newest {limit})" if len(rows) == limit else ""))


@quarantine_group.command("show")
@DIR_OPTION
@click.argument("row_id", type=click.IntRange(1))
@click.option("--raw", is_flag=True, help="Write the payload's bytes, as received, to stdout.")
def quarantine_show(directory: Path, row_id: int, raw: bool) -> None:
    """One row: why it was refused and what it held (HL7: segments on lines)."""
    with reported():
        config = load_config(directory)
        database = open_database(config.database_url)
        try:
            row = quarantine_row(database.engine, row_id)
        finally:
            database.close()
    assert row.payload is not None
    if raw:
        sys.stdout.buffer.write(row.payload)
        return
    state = f"replayed {_when(row.replayed_at)}" if row.replayed_at else "open"
    out.print(
        f"#{row.id} {row.adapter} from {row.origin} at {_when(row.received_at)}, "
        f"{row.size} bytes [{state}]\nreason: {row.reason}",
        highlight=False,
        markup=False,
    )
    try:
        text = decode(row.payload).text if row.adapter == "hl7" else None
    except Hl7Error:
        text = None
    if text is None:
        click.echo(repr(row.payload[:4000]))
    else:
        for line in message_lines(text):
            click.echo(line)


@quarantine_group.command("replay")
@DIR_OPTION
@click.argument("row_ids", nargs=-1, type=click.IntRange(1))
@click.option("--all", "every_open", is_flag=True, help="Every open HL7 row, oldest first.")
def quarantine_replay(directory: Path, row_ids: tuple[int, ...], every_open: bool) -> None:
    """Take quarantined HL7 messages in again (after the cause was fixed).

    A message now stored (or found already stored) marks its row replayed; one refused again
    stays, with the new reason. The exit status is 1 when any was refused again."""
    if bool(row_ids) == every_open:
        fail("name the rows to replay (IDs from hrx adapters quarantine list), or give --all", 2)
    with reported():
        config = load_config(directory)
        configure_logging(config.log_format, config.log_level)  # the node's log lines
        services = open_services(config)
    refused = replayed = 0
    try:
        with reported():
            intake = Hl7Intake(services)
            ids = list(row_ids) or [
                row.id for row in quarantined(services.database.engine, adapter=ADAPTER)
            ]  # every open one: no limit
            for row_id in ids:
                try:
                    outcome = intake.replay(row_id)
                except NodeError as exc:  # no such row, already replayed, another adapter's
                    err.print(f"[yellow]#{row_id}:[/] {exc}", highlight=False)
                    continue
                replayed += 1
                if not outcome.accepted:
                    refused += 1
                out.print(
                    f"#{row_id} {outcome.key or '-'}: {outcome.summary()}",
                    highlight=False,
                    markup=False,
                )
    finally:
        services.close()
    if not ids:
        out.print("the quarantine holds no open HL7 row")
    if refused:
        fail(f"{refused} of {replayed} message(s) refused again; see the reasons above")


COMMANDS.extend([hl7_listen, hl7_import, quarantine_group])
