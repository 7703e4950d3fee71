"""The WSGI entry point for gunicorn: the node in ``HRX_NODE_DIR``.

HRX_NODE_DIR=/srv/hrx/hosp-a gunicorn -w 4 -k gthread --threads 8 node.wsgi:app
"""

from __future__ import annotations

import os

from node.app import create_app
from node.errors import ConfigError

_directory = os.environ.get("HRX_NODE_DIR")
if not _directory:
    raise ConfigError("set HRX_NODE_DIR to the node's directory (made by hrx node init)")
app = create_app(_directory)
