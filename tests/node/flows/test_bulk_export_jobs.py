"""A bulk job's thread when its job is cancelled under it (:mod:`node.flows.bulk_jobs`), on a
real node's services: whether the cancellation is seen at a heartbeat, only when the work
ends, or after the work broke, the thread discards what it wrote, forgets the job and logs no
error; a job that ends normally is recorded as done. Kick-offs at the same instant never run
more jobs of a kind than the node takes."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fhir_adapters.errors import NotFound
from node.base.config import load_config
from node.flows import bulk_jobs
from node.services import Services, open_services
from tests.helpers.nodes import joined_node_dir


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    with joined_node_dir(tmp_path_factory.mktemp("jobs") / "hosp-a", "hosp-a", "sqlite") as d:
        services = open_services(load_config(d))
        try:
            yield services
        finally:
            services.close()


def run(svc: Services, work: Callable[[bulk_jobs.Job], dict[str, Any]]) -> tuple[str, list[str]]:
    """Run ``work`` as a job's thread to its end; the job's id and what was discarded."""
    job = bulk_jobs.new_job(svc, "export", "job-owner", {"types": []})
    discarded: list[str] = []
    bulk_jobs.start(svc, job, lambda: work(job), lambda: discarded.append(job.id)).join(60)
    return job.id, discarded


def cancel_then(svc: Services, then: Callable[[bulk_jobs.Job], Any]) -> Any:
    def work(job: bulk_jobs.Job) -> Any:
        assert bulk_jobs.cancel(svc, job.id)
        return then(job)

    return work


def gone(svc: Services, job_id: str) -> bool:
    try:
        bulk_jobs.get_job(svc, job_id, "job-owner")
    except NotFound:
        return True
    return False


def broken(job: bulk_jobs.Job) -> Any:
    raise FileNotFoundError(f"/somewhere/bulk/export-{job.id}/Patient-1.ndjson")


@pytest.mark.parametrize(
    "then",
    [
        lambda svc: lambda job: bulk_jobs.beat(svc, job.id, {}),  # seen at a heartbeat
        lambda svc: lambda job: {"output": []},  # seen only when the work ends
        lambda svc: broken,  # the work broke after the cancellation
    ],
    ids=["at-a-heartbeat", "at-the-end", "after-it-broke"],
)
def test_a_cancelled_job_discards_its_work_quietly(
    svc: Services, then: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="node.flows.bulk_jobs"):
        job_id, discarded = run(svc, cancel_then(svc, then(svc)))
    assert discarded == [job_id] and gone(svc, job_id)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_a_job_that_ends_is_done_and_one_that_breaks_failed(
    svc: Services, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    job_id, discarded = run(svc, lambda job: {"output": ["x"]})
    job = bulk_jobs.get_job(svc, job_id, "job-owner")
    assert (job.state, job.result, discarded) == (bulk_jobs.DONE, {"output": ["x"]}, [])
    with caplog.at_level(logging.ERROR, logger="node.flows.bulk_jobs"):
        job_id, discarded = run(svc, broken)
    job = bulk_jobs.get_job(svc, job_id, "job-owner")
    assert job.state == bulk_jobs.FAILED and discarded == []
    assert job.result == {"error": "FileNotFoundError (the node's log has the details)"}
    assert [r.levelname for r in caplog.records] == ["ERROR"]


@pytest.mark.parametrize("engine", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_kick_offs_at_the_same_instant_take_the_free_places_only(
    tmp_path: Path, engine: str
) -> None:
    """Eight kick-offs released together while one job runs and three may: two get a job,
    six are refused (429, nothing recorded), whatever the interleaving."""
    with joined_node_dir(tmp_path / "hosp-a", "hosp-a", engine) as directory:
        services = open_services(load_config(directory))
        try:
            bulk_jobs.new_job(services, "export", "first", {}, most_running=3)
            together = threading.Barrier(8)
            outcomes: list[str] = []

            def kick_off() -> None:
                together.wait()
                try:
                    bulk_jobs.new_job(services, "export", "racer", {}, most_running=3)
                    outcomes.append("started")
                except bulk_jobs.Busy:
                    outcomes.append("busy")

            threads = [threading.Thread(target=kick_off) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert sorted(outcomes) == ["busy"] * 6 + ["started"] * 2
            with services.database.engine.connect() as conn:
                assert bulk_jobs._running(conn, "export") == 3
            # an import is not an export: its own kind, its own count
            bulk_jobs.new_job(services, "import", "racer", {}, most_running=1)
        finally:
            services.close()
