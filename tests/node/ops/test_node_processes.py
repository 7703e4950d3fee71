"""Every process of a node refuses a database whose schema is behind (the web server, the
replication worker, the adapters), and the replication worker logs when it starts and stops."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa

from node.base.config import load_config
from tests.helpers import ROOT
from tests.helpers.nodes import init_node, invoke, join_alone


def test_a_stale_schema_is_refused_by_every_process(tmp_path: Path) -> None:
    directory = tmp_path / "hosp-a"
    init_node(directory, "hosp-a", None, 8124)
    join_alone(directory)
    engine = sa.create_engine(load_config(directory).database_url)
    with engine.begin() as conn:  # as a database an older hrx left behind would say
        head = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one()
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0006'"))
    sample = ROOT / "fhir_adapters" / "samples" / "hl7" / "hosp-a-cbc-v251-utf8.hl7"
    for command in (
        ["node", "replicate", "--dir", str(directory), "--once"],
        ["adapters", "hl7-import", "--dir", str(directory), str(sample)],
    ):
        refused = invoke(*command)
        assert refused.exit_code == 1, (command, refused.output)
        assert "schema revision 0006" in refused.output and "hrx node upgrade" in refused.output
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = :v"), {"v": head})
    engine.dispose()
    assert invoke("node", "replicate", "--dir", str(directory), "--once").exit_code == 0


def test_the_replication_worker_logs_its_start_and_stop(tmp_path: Path) -> None:
    directory = tmp_path / "hosp-a"
    init_node(directory, "hosp-a", None, 8125)
    join_alone(directory)
    log = tmp_path / "worker.log"
    with log.open("wb") as output:
        worker = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "node", "replicate", "--dir", str(directory)],
            cwd=ROOT,
            stdout=output,
            stderr=output,
        )
        try:
            deadline = time.monotonic() + 30
            while "started" not in log.read_text():
                assert worker.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=30) == 0
        finally:
            if worker.poll() is None:
                worker.kill()
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    messages = [line["message"] for line in lines]
    assert any("replication worker of hosp-a started" in m for m in messages), messages
    assert any("replication worker of hosp-a stopped" in m for m in messages), messages
