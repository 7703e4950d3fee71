"""gunicorn's settings for a node: its address, a control socket of its own, metrics that add
up every worker, and gunicorn's own log lines in the node's log format.

    HRX_NODE_DIR=/srv/hrx/hosp-a gunicorn -c python:node.ops.gunicorn_conf \\
        -w 4 -k gthread --threads 8 node.web.wsgi:app

- The address is the node's ``server.host`` and ``server.port`` (``-b`` on the command line
  takes precedence, as for every setting here).
- gunicorn's control socket (gunicorn 25.1 and later; ``gunicornc`` talks to it) is
  ``DIR/gunicorn.ctl``, not gunicorn's default ``$XDG_RUNTIME_DIR/gunicorn.ctl`` or
  ``~/.gunicorn/gunicorn.ctl``: two nodes served by the same user would share that one, and
  the first to stop would delete it under the other. (A socket's path is at most 107 bytes:
  with a longer one gunicorn logs that it has no control socket and serves all the same.)
- ``PROMETHEUS_MULTIPROC_DIR`` (default ``DIR/prometheus``, created when absent): each worker
  counts requests and decisions in files there and ``/metrics`` adds them all up. When
  gunicorn starts, the files of processes that no longer run are removed (a counter then
  starts again from zero, which Prometheus reads as a restart); when a worker exits, it is
  marked dead. A local disk or tmpfs, not a network share (the files are memory-mapped).
- gunicorn's own lines (``gunicorn.error``: starting, booting workers, timeouts) are written
  as the node's ``[logging]`` says (JSON lines on stderr by default, at its level; gunicorn's
  ``--log-level`` is not used). Leave gunicorn's access log off (no ``--access-logfile``):
  the node writes one access line per request itself, with the route instead of the path
  and query string.

- Unless the command line says otherwise, workers are gthread workers with 8 threads each:
  the writes of a worker's threads share transactions and their commits (group commit), so
  a worker's write throughput grows with the requests it serves at once, and 8 threads per
  worker serve 16 connections with 2 workers without queueing.

Every other gunicorn setting comes from the command line as usual.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gunicorn import glogging  # type: ignore[import-untyped]

from node.base.config import NodeConfig, load_config
from node.base.errors import ConfigError
from node.base.logs import RequestIdFilter, formatter

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
METRICS_SUBDIRECTORY = "prometheus"
CONTROL_SOCKET = "gunicorn.ctl"  # in the node's directory


def _node_directory() -> Path:
    directory = os.environ.get("HRX_NODE_DIR")
    if not directory:
        raise RuntimeError("set HRX_NODE_DIR to the node's directory (made by hrx node init)")
    return Path(directory).resolve()


def _metrics_directory() -> Path:
    configured = os.environ.get(MULTIPROCESS_ENV)
    return Path(configured) if configured else _node_directory() / METRICS_SUBDIRECTORY


def _node_config() -> NodeConfig | None:
    """The node's configuration; None when it cannot be read (the workers then fail with the
    reason, logged as JSON at INFO)."""
    try:
        return load_config(_node_directory())
    except ConfigError:
        return None


metrics_directory = _metrics_directory()
metrics_directory.mkdir(parents=True, exist_ok=True)
# before prometheus_client is imported anywhere: the workers inherit it
os.environ[MULTIPROCESS_ENV] = str(metrics_directory)

control_socket = str(_node_directory() / CONTROL_SOCKET)

_config = _node_config()
_log_format, _log_level = (
    ("json", "INFO") if _config is None else (_config.log_format, _config.log_level)
)
if _config is not None:
    _host = f"[{_config.host}]" if ":" in _config.host else _config.host
    bind = [f"{_host}:{_config.port}"]


class NodeLogger(glogging.Logger):  # type: ignore[misc]
    """gunicorn's logger with its lines (``gunicorn.error``) in the node's format and level;
    its access log stays off unless asked for (``--access-logfile``): the node writes one
    access line per request itself, without the query string gunicorn's would carry."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        self.error_log.setLevel(_log_level)
        for handler in self.error_log.handlers:
            handler.setFormatter(formatter(_log_format))
            handler.addFilter(RequestIdFilter())


logger_class = NodeLogger
worker_class = "gthread"
threads = 8


def on_starting(server: Any) -> None:
    """In the master, before any worker: forget what processes of earlier runs counted."""
    # imported here, not above: prometheus_client picks its mode when first imported, and the
    # environment variable above must be set by then
    from node.ops.metrics import clear_dead_process_files

    removed = clear_dead_process_files(metrics_directory)
    if removed:
        server.log.info(
            "removed %d metrics file(s) of stopped processes from %s",
            len(removed),
            metrics_directory,
        )


def child_exit(server: Any, worker: Any) -> None:
    """In the master, when a worker has exited."""
    from prometheus_client import multiprocess  # here, not above: see on_starting

    multiprocess.mark_process_dead(worker.pid, str(metrics_directory))  # type: ignore[no-untyped-call]
