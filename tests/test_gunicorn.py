"""The node under gunicorn with several worker processes against one database: concurrent
writers never fork a resource's history, every worker's audit records land (also those still
queued when the server stops), and reads are served by every worker."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import postgres_database
from tests.nodes import FHIR_JSON, running_node
from tests.test_fhir_api import observation, patient


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def engine_url(request: pytest.FixtureRequest) -> Any:
    if request.param == "sqlite":
        yield None
    else:
        with postgres_database() as url:
            yield url


def test_workers_share_one_consistent_store(tmp_path: Path, engine_url: str | None) -> None:
    with running_node(tmp_path / "node", engine_url, gunicorn_workers=3) as node:
        s = node.session()
        pid = s.post(
            f"{node.fhir}/Patient",
            json=patient(identifier="gunicorn-1"),
            headers={"Content-Type": FHIR_JSON},
        ).json()["id"]
        oid = s.post(
            f"{node.fhir}/Observation", json=observation(pid), headers={"Content-Type": FHIR_JSON}
        ).json()["id"]
        token = node.token()
        successes: list[int] = []
        conflicts: list[int] = []
        errors: list[str] = []

        def updater(worker: int) -> None:
            session = node.session(token)
            for attempt in range(15):
                current = session.get(f"{node.fhir}/Observation/{oid}")
                body = current.json()
                body["valueQuantity"]["value"] = worker * 100 + attempt
                response = session.put(
                    f"{node.fhir}/Observation/{oid}",
                    json=body,
                    headers={"Content-Type": FHIR_JSON, "If-Match": current.headers["ETag"]},
                )
                if response.status_code == 200:
                    successes.append(int(response.json()["meta"]["versionId"]))
                elif response.status_code in (409, 412):
                    conflicts.append(response.status_code)
                else:
                    errors.append(f"{response.status_code} {response.text[:200]}")

        threads = [threading.Thread(target=updater, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        # every successful update made exactly one new version: no gaps, no duplicates
        assert sorted(successes) == list(range(2, 2 + len(successes)))
        history = s.get(f"{node.fhir}/Observation/{oid}/_history?_count=200").json()
        versions = [int(e["resource"]["meta"]["versionId"]) for e in history["entry"]]
        assert versions == list(range(1 + len(successes), 0, -1))
        assert len(successes) + len(conflicts) == 6 * 15
    # the server is stopped: every worker flushed its queued audit records on the way out
    from node.config import load_config
    from node.db import open_database

    database = open_database(load_config(tmp_path / "node").database_url)
    try:
        with database.engine.connect() as conn:
            read_events = conn.execute(
                sa.text(
                    "SELECT count(*) FROM fhir_idx_token t JOIN fhir_resources r "
                    "ON r.res_pk = t.res_pk WHERE t.type = 'AuditEvent' AND t.param = 'subtype' "
                    "AND t.code = 'read'"
                )
            ).scalar_one()
    finally:
        database.close()
    assert read_events == 6 * 15  # one GET before each PUT
