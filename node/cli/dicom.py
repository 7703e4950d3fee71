"""``hrx adapters dicomweb-sync``, ``dicom-import`` and ``dicom-replay``: the PACS over
DICOMweb and files.

``dicomweb-sync`` pulls studies from the PACS's DICOMweb service (once, or every
``[dicomweb] interval_seconds`` with ``--watch``, as a process beside the web server);
``dicom-import`` takes DICOM files and directories; ``dicom-replay`` takes what they kept in
the quarantine in again, once the cause is corrected. All store Patients and ImagingStudies
through :mod:`node.intake.dicom`; what they could not take in is named with the reason (never
with whom it is about: a study refused because it would go to another patient names its
quarantine row, which names the patients), and the command exits non-zero.
"""

from __future__ import annotations

import signal
import threading
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click
from pydicom.charset import python_encoding
from rich.markup import escape

from node.base.config import load_config
from node.base.logs import configure_logging
from node.cli.console import entry_progress, err, fail, out, reported
from node.cli.node import DIR_OPTION
from node.intake.dicom import (
    FILE_ADAPTER,
    SYNC_ADAPTER,
    DicomwebClient,
    DicomwebError,
    SyncReport,
    dicom_files,
    import_files,
    replay,
    sync_round,
    watch,
)
from node.intake.quarantine import quarantined
from node.services import Services, open_services

if TYPE_CHECKING:  # pydicom is imported only by the commands that need it
    from node.intake.dicom import DicomwebClient, ImportReport

DATE_FORMATS = ["%Y-%m-%d", "%Y%m%d"]


@click.command("dicomweb-sync")
@DIR_OPTION
@click.option(
    "--url",
    default=None,
    help="The PACS's DICOMweb root, e.g. http://pacs.example:8042/dicom-web "
    "(default: [dicomweb] url of node.toml).",
)
@click.option(
    "--since",
    type=click.DateTime(DATE_FORMATS),
    default=None,
    metavar="DATE",
    help="Studies from this StudyDate on (YYYY-MM-DD), instead of from where the last sync "
    "came to.",
)
@click.option("--full", is_flag=True, help="Every study the PACS holds, whatever its date.")
@click.option(
    "--watch",
    is_flag=True,
    help="Sync every [dicomweb] interval_seconds until SIGTERM or SIGINT.",
)
@click.option(
    "--interval",
    type=click.IntRange(1),
    default=None,
    help="Seconds between rounds with --watch (default: [dicomweb] interval_seconds).",
)
def dicomweb_sync(
    directory: Path,
    url: str | None,
    since: datetime | None,
    full: bool,
    watch: bool,
    interval: int | None,
) -> None:
    """Take the PACS's studies in over DICOMweb (QIDO-RS) as ImagingStudies."""
    with reported():
        config = load_config(directory)
        url = (url or config.dicomweb_url).rstrip("/")
        if not url:
            fail(
                "no DICOMweb service to sync from: pass --url, or set \\[dicomweb] url in "
                + escape(f"{config.directory / 'node.toml'} (or HRX_DICOMWEB_URL)")
            )
        if not url.startswith(("http://", "https://")):
            fail(escape(f"--url {url!r} is not an http:// or https:// URL (the DICOMweb root)"))
        seconds = interval or config.dicomweb_interval_seconds
        if watch and seconds < 1:
            fail(
                "--watch needs an interval: set \\[dicomweb] interval_seconds in node.toml (or "
                "HRX_DICOMWEB_INTERVAL_SECONDS), or pass --interval"
            )
        if since is not None and full:
            fail("--since and --full exclude each other: --full asks for every study")
        if watch and (since is not None or full):
            fail("--watch continues from the saved cursor; run --since or --full once without it")
        configure_logging(config.log_format, config.log_level)  # the node's log lines
        services = open_services(config)
        client = DicomwebClient(url, config.dicomweb_timeout_ms, config.dicomweb_page_size)
        try:
            if watch:
                _watch(services, client, seconds)
                return
            with entry_progress(None, "studies") as advance:
                try:
                    report: SyncReport = sync_round(
                        services,
                        client,
                        since=since.date() if since is not None else None,
                        full=full,
                        advance=advance,
                    )
                except DicomwebError as exc:  # the PACS unreachable, or answering nonsense
                    fail(escape(str(exc)))
        finally:
            client.close()
            services.close()
    out.print(escape(report.describe()))
    for uid, reason in [*report.failed, *report.refused]:
        err.print(f"[red]study {uid}:[/] {escape(reason)}")
    for uid in report.gone:
        out.print(f"study {uid} failed before and is no longer on the PACS: no longer retried")
    if report.failed or report.refused:
        err.print(
            f"{len(report.failed) + len(report.refused)} studies were not taken in; correct "
            "them in the PACS as the reasons say: the next sync asks for them again (refused "
            "ones: see hrx adapters quarantine show ID)"
        )
        raise SystemExit(1)


def _watch(services: Services, client: DicomwebClient, seconds: int) -> None:
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())

    def on_report(report: SyncReport) -> None:
        out.print(f"{_now()} {escape(report.describe())}")
        for uid, reason in [*report.failed, *report.refused]:
            err.print(f"{_now()} study {uid}: {escape(reason)}")

    def on_error(exc: BaseException) -> None:
        message = str(exc) if str(exc) else type(exc).__name__
        err.print(f"{_now()} sync round failed, trying again in {seconds} s: {escape(message)}")

    out.print(
        escape(f"{_now()} syncing from {client.public_url} every {seconds} s (stop: SIGTERM)")
    )
    watch(services, client, seconds, stop, on_report, on_error)
    out.print(f"{_now()} stopped")


def _now() -> str:
    return datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S")


@click.command("dicom-import")
@DIR_OPTION
@click.option(
    "--charset",
    default=None,
    help="The character set of files that name none in (0008,0005), as DICOM names it: e.g. "
    "GB18030 for modalities that write Chinese without saying so.",
)
@click.argument(
    "paths", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="FILES_OR_DIRS..."
)
def dicom_import(directory: Path, charset: str | None, paths: tuple[Path, ...]) -> None:
    """Take DICOM files (and every file under directories) in as ImagingStudies."""
    _check_charset(charset)
    with reported():
        config = load_config(directory)
        configure_logging(config.log_format, config.log_level)  # the node's log lines
        services = open_services(config)
        found = dicom_files(paths)
        try:
            with entry_progress(len(found.files), "files") as advance:
                report = import_files(services, found, default_charset=charset, advance=advance)
        finally:
            services.close()
    _print_files(report)
    if report.links:
        err.print(
            f"{len(report.links)} symbolic links point out of the directories given (or loop): "
            "they were not followed and what they point to was not read"
        )
    if report.bad:
        err.print(
            f"{len(report.bad)} files were not taken in (kept in the quarantine with the "
            "reason); the others were. Correct those files and import them again, or correct "
            "the cause and hrx adapters dicom-replay the quarantine rows."
        )
    if report.bad or report.links:
        raise SystemExit(1)


def _print_files(report: ImportReport) -> None:
    out.print(escape(report.describe()))
    for name, why in report.skipped:
        out.print(escape(f"skipped {name}: {why}"))
    for name, reason in [*report.links, *report.bad]:
        err.print(f"[red]{escape(name)}:[/] {escape(reason)}")


@click.command("dicom-replay")
@DIR_OPTION
@click.argument("row_ids", nargs=-1, type=click.IntRange(1))
@click.option(
    "--all", "every_open", is_flag=True, help="Every open DICOM row (dicom and dicomweb)."
)
@click.option(
    "--url",
    default=None,
    help="The PACS's DICOMweb root, for studies a sync refused (default: [dicomweb] url).",
)
@click.option(
    "--charset",
    default=None,
    help="The character set of files that name none in (0008,0005), as for dicom-import.",
)
def dicom_replay(
    directory: Path,
    row_ids: tuple[int, ...],
    every_open: bool,
    url: str | None,
    charset: str | None,
) -> None:
    """Take quarantined DICOM in again, once the cause is corrected.

    A file (adapter dicom) is read from the bytes kept, the rows of one study stored
    together; a study a sync refused (adapter dicomweb) is asked for again from the PACS, as
    it is now. A row stored is marked replayed; one refused again keeps the new reason. The
    exit status is 1 when any was not stored."""
    if bool(row_ids) == every_open:
        fail("name the rows to replay (IDs from hrx adapters quarantine list), or give --all", 2)
    _check_charset(charset)
    with reported():
        config = load_config(directory)
        url = (url or config.dicomweb_url).rstrip("/")
        configure_logging(config.log_format, config.log_level)  # the node's log lines
        services = open_services(config)
        client = (
            DicomwebClient(url, config.dicomweb_timeout_ms, config.dicomweb_page_size)
            if url
            else None
        )
        try:
            ids = list(row_ids) or [
                row.id
                for adapter in (FILE_ADAPTER, SYNC_ADAPTER)
                for row in quarantined(services.database.engine, adapter=adapter)
            ]
            report = replay(services, sorted(ids), client, default_charset=charset)
        finally:
            if client is not None:
                client.close()
            services.close()
    if not ids:
        out.print("the quarantine holds no open DICOM row")
        return
    if report.files.files or report.files.bad:
        _print_files(report.files)
    if report.asked:
        out.print(escape(f"{report.asked} studies asked for again: {report.studies.describe()}"))
    for row_id, reason in [*report.refused, *report.not_replayed]:
        err.print(f"[red]#{row_id}:[/] {escape(reason)}")
    if report.files.bad or report.refused or report.not_replayed:
        fail("not everything was replayed; see the reasons above")


def _check_charset(charset: str | None) -> None:
    if charset is not None and charset not in python_encoding:
        fail(
            escape(
                f"--charset {charset!r} is not a DICOM character set; e.g. GB18030, GBK, "
                "ISO_IR 192 (UTF-8), ISO_IR 100 (Latin-1)"
            )
        )


COMMANDS: list[click.Command] = [dicomweb_sync, dicom_import, dicom_replay]
