"""The WSGI entry point for gunicorn: the node in ``HRX_NODE_DIR``.

HRX_NODE_DIR=/srv/hrx/hosp-a gunicorn -c python:node.ops.gunicorn_conf -w 4 -k gthread \\
    --threads 8 -b 127.0.0.1:8080 node.web.wsgi:app

It sets up the worker's logging (``[logging]`` of the node's configuration: JSON lines on
stderr by default) and always counts metrics in files shared by the workers, under
``PROMETHEUS_MULTIPROC_DIR`` — which :mod:`node.ops.gunicorn_conf` sets (default
``DIR/prometheus``) and clears of dead processes' files when gunicorn starts. Without that
configuration the same default directory is used, so ``/metrics`` still adds up every worker,
but files of earlier runs are never cleared (a warning says so).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from flask import Flask

from node.base.config import load_config
from node.base.errors import ConfigError
from node.base.logs import configure_logging

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"  # as node.ops.metrics, which must not be imported yet
METRICS_SUBDIRECTORY = "prometheus"  # the default, in the node's directory


def _application() -> Flask:
    directory = os.environ.get("HRX_NODE_DIR")
    if not directory:
        raise ConfigError("set HRX_NODE_DIR to the node's directory (made by hrx node init)")
    prepared = bool(os.environ.get(MULTIPROCESS_ENV))
    if not prepared:  # before prometheus_client is imported: it chooses its mode then
        os.environ[MULTIPROCESS_ENV] = str(Path(directory).resolve() / METRICS_SUBDIRECTORY)

    from node.web.app import create_app  # only now: it imports prometheus_client

    config = load_config(Path(directory))
    configure_logging(config.log_format, config.log_level)
    if not prepared:
        logging.getLogger(__name__).warning(
            "gunicorn was started without -c python:node.ops.gunicorn_conf: metrics are counted "
            "in %s, whose files of earlier runs and dead workers are never cleared",
            os.environ[MULTIPROCESS_ENV],
        )
    return create_app(directory)


app = _application()
