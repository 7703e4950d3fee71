"""Where the run's logs are: this process's own lines (conftest.py writes them) beside the node
processes' logs, under the run's base temporary directory."""

from __future__ import annotations

IN_PROCESS_LOG = "in-process.log"  # under the run's base temporary directory
