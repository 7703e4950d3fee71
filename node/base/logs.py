"""The node's logs: one JSON object per line on stderr (or plain text for people), and a request
ID on every line logged while a request is handled.

Every request gets an ID: the caller's ``X-Request-ID`` when it is a sane token (at most 64 of
``A-Z a-z 0-9 . _ -``), else a new random one. It is returned as ``X-Request-ID``, attached to
every log record made while the request is handled, and sent on this node's own signed
requests to other members (:class:`node.consortium.worker.SignedPeers`), so one referral can be
followed through every member's logs. The replication worker gives each round an ID of its
own in the same way.

Each request also makes one access line (logger ``hrx.access``): method, route (the URL rule,
such as ``/fhir/<resource_type>/<resource_id>`` — never the path itself, which can hold a
patient's resource id, and never the query string), status, duration_ms and remote_addr.
Werkzeug's own per-request line is silenced (its logger is set to WARNING), so there is one
access line per request. Bodies are never logged.

What a library puts in a message or an error is not ours to choose, so every line passes
:func:`scrub` on its way out: query strings of URLs and request lines (a search by name), resident
ID numbers, mobile numbers, SQL statement parameters and PostgreSQL's ``DETAIL`` lines (which
quote the values of a violated key) are replaced by a note that something was removed. The
database engines also keep statement parameters out of their errors (``hide_parameters``).

:func:`configure_logging` sets a process up (``hrx node serve``, gunicorn workers through
:mod:`node.web.wsgi`, ``hrx node replicate``); :func:`install_request_hooks` gives a Flask app its
request IDs and access lines.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import secrets
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import IO, Any

from node.base.config import LOG_FORMATS, LOG_LEVELS

REQUEST_ID_HEADER = "X-Request-ID"
ACCESS_LOGGER = "hrx.access"
UNMATCHED_ROUTE = "<unmatched>"  # the route of a request no URL rule matched (404, 405...)

_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "hrx_request_id", default=None
)
# what every LogRecord has; anything else on a record was given with ``extra=`` and is logged
_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "request_id",
    "taskName",
}
ACCESS_FIELDS = ("method", "route", "status", "duration_ms", "remote_addr")

access_log = logging.getLogger(ACCESS_LOGGER)


# -- request IDs ---------------------------------------------------------------------------


def new_request_id() -> str:
    """A fresh request ID: 16 random hex digits."""
    return secrets.token_hex(8)


def accepted_request_id(offered: str | None) -> str:
    """The caller's request ID when it is a sane token, else a new one."""
    if offered is not None and _SANE_REQUEST_ID.fullmatch(offered):
        return offered
    return new_request_id()


def current_request_id() -> str | None:
    """The ID of the request (or replication round) this thread is working on, if any."""
    return _request_id.get()


def bind_request_id(request_id: str) -> contextvars.Token[str | None]:
    """Work done from now on in this context is logged under ``request_id`` (until
    :func:`unbind_request_id` with the token)."""
    return _request_id.set(request_id)


def unbind_request_id(token: contextvars.Token[str | None]) -> None:
    try:
        _request_id.reset(token)
    except ValueError:  # set in another context: this one never saw it
        _request_id.set(None)


@contextmanager
def request_scope(request_id: str) -> Iterator[str]:
    """Work done inside is logged (and asks other members) under ``request_id``."""
    token = _request_id.set(request_id)
    try:
        yield request_id
    finally:
        _request_id.reset(token)


# -- what never reaches a log ---------------------------------------------------------------

_PRIVATE = [
    (re.compile(r"(?<=[\w/])\?[^\s\"'<>]+"), "?<query removed>"),  # a URL's query string
    (re.compile(r"\[parameters: .*?\](?=\n|$)", re.S), "[parameters removed]"),  # SQLAlchemy
    (re.compile(r"DETAIL:[^\n]*"), "DETAIL: <removed>"),  # PostgreSQL quoting key values
    (re.compile(r"(?<![0-9A-Za-z])[1-9][0-9]{16}[0-9Xx](?![0-9A-Za-z])"), "<id removed>"),
    (re.compile(r"(?<![0-9A-Za-z])1[3-9][0-9]{9}(?![0-9A-Za-z])"), "<phone removed>"),
]


def scrub(text: str) -> str:
    """``text`` without what may identify a patient though nobody meant to log it (see the
    module docstring)."""
    for pattern, note in _PRIVATE:
        text = pattern.sub(note, text)
    return text


class PrivacyFilter(logging.Filter):
    """Scrubs every record's message (:func:`scrub`) before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        scrubbed = scrub(message)
        if scrubbed != message:
            record.msg, record.args = scrubbed, None
        return True


# -- formatting ----------------------------------------------------------------------------


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRIBUTES}


class RequestIdFilter(logging.Filter):
    """Puts the current request ID on every record (``request_id``, None outside requests)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = _request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (ISO 8601, UTC, ms), level, logger, message,
    request_id, pid, the fields given with ``extra=`` and, for an error with a traceback,
    exception."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
            "pid": record.process,
        }
        line.update(_extras(record))
        if record.exc_info:
            line["exception"] = scrub(self.formatException(record.exc_info))
        elif record.exc_text:
            line["exception"] = scrub(record.exc_text)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER [REQUEST-ID] MESSAGE key=value...``, for people reading a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None) or "-"
        text = f"{_timestamp(record)} {record.levelname} {record.name} [{request_id}] "
        text += record.getMessage()
        extras = _extras(record)
        if extras and record.name != ACCESS_LOGGER:  # the access message already says it all
            text += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        if record.exc_info:
            text += "\n" + scrub(self.formatException(record.exc_info))
        elif record.exc_text:
            text += "\n" + scrub(record.exc_text)
        return text


def formatter(log_format: str) -> logging.Formatter:
    if log_format not in LOG_FORMATS:
        raise ValueError(f"the log format is one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    return JsonFormatter() if log_format == "json" else TextFormatter()


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record comes (not the one it was made
    with: a command run inside a test swaps stderr and closes the one it swapped in)."""

    @property
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, _value: IO[str]) -> None:
        pass


def stream_handler(log_format: str = "json", stream: IO[str] | None = None) -> logging.Handler:
    """A handler writing ``log_format`` lines to ``stream`` (default: stderr), with request IDs."""
    handler: logging.Handler = _StderrHandler() if stream is None else logging.StreamHandler(stream)
    prepare_handler(handler, log_format)
    handler._hrx = True  # type: ignore[attr-defined]  # ours: replaced, not stacked, next time
    return handler


def prepare_handler(handler: logging.Handler, log_format: str = "json") -> logging.Handler:
    """Give ``handler`` the node's line format, request IDs and privacy filter."""
    handler.setFormatter(formatter(log_format))
    handler.addFilter(RequestIdFilter())
    handler.addFilter(PrivacyFilter())
    return handler


def configure_logging(
    log_format: str = "json", level: str = "INFO", stream: IO[str] | None = None
) -> None:
    """Send every logger's records to stderr as ``log_format`` lines at ``level`` and above.

    Handlers this function installed before are replaced (calling it twice does not double
    the lines); werkzeug's per-request lines are silenced (the access line replaces them), and
    so are alembic's notes on each schema check; Python warnings are logged like everything
    else."""
    if level.upper() not in LOG_LEVELS:
        raise ValueError(f"the log level is one of {', '.join(LOG_LEVELS)}, not {level!r}")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_hrx", False):
            root.removeHandler(handler)
    root.addHandler(stream_handler(log_format, stream))
    root.setLevel(level.upper())
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    # /healthz compares the schema's revision: two lines of alembic's per probe otherwise
    logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)
    logging.captureWarnings(True)
