"""How the ``hrx`` commands talk to people: output and error consoles, one-line failures with
a non-zero exit, and progress bars for long work."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy import exc as sa_exc

from fhir_adapters.errors import FhirError
from ledger.errors import LedgerError
from node.base.errors import NodeError

err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    sys.exit(code)


@contextmanager
def reported() -> Iterator[None]:
    """Turn ledger errors into one clear line and exit status 1."""
    try:
        yield
    except (LedgerError, NodeError) as exc:
        fail(str(exc))
    except FhirError as exc:
        fail("; ".join(issue.diagnostics for issue in exc.issues))
    except sa_exc.SQLAlchemyError as exc:
        fail(f"database: {exc.__class__.__name__}: {str(exc).splitlines()[0]}")
    except OSError as exc:
        fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))


@contextmanager
def entry_progress(total: int | None, label: str) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr (only on a terminal) advanced by a number of entries."""
    with Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    ) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)
