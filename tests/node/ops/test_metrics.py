"""``/metrics`` and the JSON logs of real node processes: ledger appends, block sizes, requests
by route, consent decisions, replication and checkpoints, the adapters' quarantine; counts
added up over gunicorn's workers; the scrape token; request IDs in the logs, in the responses
and across members."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from ledger.store import ChainStore
from node.base.config import load_config
from node.base.errors import ConfigError
from node.base.logs import request_scope
from node.cli import main
from node.db.schema import quarantine_table
from node.demo.harness import Consortium
from tests.helpers import ROOT
from tests.helpers.nodes import Node, a_patient, ask_access, init_node, post, running_node

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
TOKEN = "scrape-" + "x" * 24
BANNER = "serving FHIR at"  # hrx node serve's one line on stdout, in the same log file


def parse(exposition: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def scrape(base: str, **headers: str) -> Samples:
    response = requests.get(f"{base}/metrics", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    return parse(response.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def values_of(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def log_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a node's log, parsed: each is one JSON object (but the banner)."""
    lines = []
    for text in path.read_text(encoding="utf-8").splitlines():
        if BANNER in text and not text.startswith("{"):
            continue
        line = json.loads(text)  # anything else on the console fails here
        assert isinstance(line, dict), text
        assert {"time", "level", "logger", "message", "request_id"} <= set(line), text
        assert datetime.fromisoformat(line["time"]).utcoffset() is not None
        assert line["time"].endswith("Z")
        lines.append(line)
    return lines


def wait_for(condition: Callable[[], Any], seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"not within {seconds} s: {what}")


def append(directory: Path, *bodies: dict[str, Any]) -> None:
    """``hrx ledger append`` to the node's own chain (one call: one batch)."""
    lines = "".join(json.dumps(body) + "\n" for body in bodies)
    result = CliRunner().invoke(
        main, ["ledger", "append", "--dir", str(directory), "--type", "test.metrics"], lines
    )
    assert result.exit_code == 0, result.output


def own_chain(directory: Path) -> tuple[int, int]:
    """(blocks, entries) of the node's own chain, from its database."""
    config = load_config(directory)
    store = ChainStore(config.database_url)
    try:
        head = store.heads().get(config.node_id)
        return (0, 0) if head is None else (head.header["height"] + 1, head.tree_size)
    finally:
        store.close()


def entries_per_block(directory: Path) -> list[int]:
    """The entries in each block of the node's own chain, read block by block."""
    config = load_config(directory)
    engine = sa.create_engine(config.database_url)
    try:
        with engine.connect() as conn:
            sizes = [
                int(size)
                for size in conn.execute(
                    sa.text(
                        "SELECT tree_size FROM ledger_blocks WHERE chain = :chain ORDER BY height"
                    ),
                    {"chain": config.node_id},
                ).scalars()
            ]
    finally:
        engine.dispose()
    return [after - before for before, after in zip([0, *sizes], sizes, strict=False)]


# -- one node, the development server ------------------------------------------------------


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    with running_node(tmp_path_factory.mktemp("metrics") / "node") as served:
        yield served


def test_ledger_appends_and_block_sizes_are_read_from_the_database(node: Node) -> None:
    before = scrape(node.base)
    append(node.directory, {"n": 1}, {"n": 2}, {"n": 3})
    append(node.directory, {"n": 4})
    after = scrape(node.base)
    blocks, entries = own_chain(node.directory)
    assert value(after, "hrx_ledger_entries_total", chain="hosp-a") == entries
    assert value(after, "hrx_ledger_blocks_total", chain="hosp-a") == blocks
    assert entries - value(before, "hrx_ledger_entries_total", chain="hosp-a") == 4
    assert blocks - value(before, "hrx_ledger_blocks_total", chain="hosp-a") >= 2
    # the histogram holds every block of the node's own chain, each by its entries
    assert value(after, "hrx_ledger_block_entries_count") == blocks
    assert value(after, "hrx_ledger_block_entries_sum") == entries
    assert value(after, "hrx_ledger_block_entries_bucket", le="+Inf") == blocks
    assert value(after, "hrx_ledger_block_entries_bucket", le="1") >= 1  # the one-entry append
    per_block = entries_per_block(node.directory)
    assert sum(per_block) == entries and len(per_block) == blocks
    for bound in ("1", "2", "5", "10", "1000"):
        expected = sum(1 for n in per_block if n <= int(bound))
        assert value(after, "hrx_ledger_block_entries_bucket", le=bound) == expected
    assert value(after, "hrx_node_info", node="hosp-a") == 1
    assert value(after, "hrx_roster_version") == 1
    assert value(after, "hrx_ledger_chain_frozen", chain="hosp-a") == 0
    assert value(after, "hrx_database_up") == 1
    assert value(after, "process_resident_memory_bytes") > 0  # prometheus-client's basics


def test_requests_are_counted_by_route_never_by_patient(node: Node) -> None:
    session = node.session()
    created = post(session, f"{node.fhir}/Patient", {"resourceType": "Patient", "gender": "male"})
    assert created.status_code == 201, created.text
    patient_id = created.json()["id"]
    route = "/fhir/<resource_type>/<resource_id>"
    before = scrape(node.base)
    for _ in range(5):
        assert session.get(f"{node.fhir}/Patient/{patient_id}").status_code == 200
    assert session.get(f"{node.fhir}/Patient/{uuid.uuid4()}").status_code == 404
    hidden = "identifier-" + uuid.uuid4().hex
    assert session.get(f"{node.fhir}/Patient?identifier={hidden}").status_code == 200
    after = scrape(node.base)
    read = {"method": "GET", "route": route}
    assert (
        value(after, "hrx_http_requests_total", **read, status="200")
        - value(before, "hrx_http_requests_total", **read, status="200")
        == 5
    )
    assert (
        value(after, "hrx_http_requests_total", **read, status="404")
        - value(before, "hrx_http_requests_total", **read, status="404")
        == 1
    )
    assert (
        value(after, "hrx_http_request_duration_seconds_count", **read)
        - value(before, "hrx_http_request_duration_seconds_count", **read)
        == 6
    )
    text = requests.get(f"{node.base}/metrics", timeout=30).text
    assert patient_id not in text and hidden not in text
    for (_name, labels), _value in after.items():
        assert all(patient_id not in v and hidden not in v for _k, v in labels)
    log = (node.directory / "server.log").read_text(encoding="utf-8")
    assert patient_id not in log and hidden not in log  # routes, never paths or queries


def test_request_ids_come_back_and_are_on_the_log_lines(node: Node) -> None:
    given = f"trace.{uuid.uuid4().hex[:12]}_A-1"
    answer = node.session().get(f"{node.fhir}/Patient", headers={"X-Request-ID": given})
    assert answer.status_code == 200 and answer.headers["X-Request-ID"] == given
    fresh = []
    for offered in ("not sane!", "x" * 65, ""):
        response = requests.get(f"{node.base}/livez", headers={"X-Request-ID": offered})
        assert response.headers["X-Request-ID"] != offered
        fresh.append(response.headers["X-Request-ID"])
    assert all(len(f) == 16 and int(f, 16) >= 0 for f in fresh) and len(set(fresh)) == 3

    lines = log_lines(node.directory / "server.log")
    mine = [line for line in lines if line["request_id"] == given]
    (access,) = [line for line in mine if line["logger"] == "hrx.access"]
    assert access["method"] == "GET" and access["route"] == "/fhir/<resource_type>"
    assert access["status"] == 200 and access["remote_addr"] == "127.0.0.1"
    assert isinstance(access["duration_ms"], int | float) and access["level"] == "INFO"
    # one access line per request: werkzeug's own is gone
    assert not [line for line in lines if line["logger"] == "werkzeug"]
    assert sum(1 for line in lines if line["request_id"] in fresh) == 3


def test_without_a_token_only_direct_loopback_clients_may_scrape(node: Node) -> None:
    assert requests.get(f"{node.base}/metrics", timeout=30).status_code == 200
    for relayed in ({"X-Forwarded-For": "10.1.2.3"}, {"Forwarded": "for=10.1.2.3"}):
        refused = requests.get(f"{node.base}/metrics", headers=relayed, timeout=30)
        assert refused.status_code == 403 and "metrics.token" in refused.text


def test_the_token_is_required_once_set(tmp_path: Path) -> None:
    with running_node(tmp_path / "node", env={"HRX_METRICS_TOKEN": TOKEN}) as served:
        url = f"{served.base}/metrics"
        assert requests.get(url, timeout=30).status_code == 401
        wrong = requests.get(url, headers={"Authorization": "Bearer " + "y" * 31}, timeout=30)
        assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"].startswith("Bearer")
        assert requests.get(url, headers={"Authorization": TOKEN}, timeout=30).status_code == 401
        relayed = {"Authorization": f"Bearer {TOKEN}", "X-Forwarded-For": "10.1.2.3"}
        samples = scrape(served.base, **relayed)  # with the token, from anywhere
        assert value(samples, "hrx_node_info", node="hosp-a") == 1


def test_metrics_can_be_turned_off(tmp_path: Path) -> None:
    with running_node(tmp_path / "node", env={"HRX_METRICS_ENABLED": "false"}) as served:
        assert requests.get(f"{served.base}/metrics", timeout=30).status_code == 404


def test_adapter_messages_and_the_quarantine(tmp_path: Path) -> None:
    """What the adapters stored and refused, read from their tables whichever process did it:
    here an HL7 import (its own process's work) and quarantine rows."""
    from click.testing import CliRunner

    from node.cli import main
    from node.web.app import create_app

    directory = tmp_path / "node"
    init_node(directory, "hosp-a", None, 8080)
    app = create_app(directory)
    services = app.extensions["hrx"]
    try:
        client = app.test_client()
        before = parse(client.get("/metrics").get_data(as_text=True))
        assert value(before, "hrx_adapter_messages_stored_total", adapter="hl7") == 0
        samples_dir = ROOT / "fhir_adapters" / "samples"
        sample = samples_dir / "hl7" / "hosp-a-cbc-v251-utf8.hl7"
        imported = CliRunner().invoke(
            main, ["adapters", "hl7-import", "--dir", str(directory), str(sample), str(sample)]
        )
        assert imported.exit_code == 0, imported.output  # stored once, then a duplicate
        with services.database.write_engine.begin() as conn:
            for replayed_at in (None, None, 1_700_000_000_000_000):
                conn.execute(
                    quarantine_table.insert().values(
                        adapter="hl7",
                        received_at=1_700_000_000_000_000,
                        origin="127.0.0.1:50000",
                        reason="no such test",
                        payload=b"MSH|...",
                        replayed_at=replayed_at,
                    )
                )
        samples = parse(client.get("/metrics").get_data(as_text=True))
        assert value(samples, "hrx_adapter_messages_stored_total", adapter="hl7") == 1
        assert value(samples, "hrx_adapter_quarantined_total", adapter="hl7") == 3
        assert value(samples, "hrx_adapter_quarantine_open", adapter="hl7") == 2
        assert (
            "hrx_adapter_quarantine_open",
            frozenset({("adapter", "dicom")}),
        ) in samples  # known adapters are there, at 0, before anything goes wrong
        # a node that has joined no consortium: no replication or checkpoint metrics
        assert not values_of(samples, "hrx_replication_synced_age_seconds")
        assert not values_of(samples, "hrx_checkpoint_age_seconds")
    finally:
        services.close()


def test_metrics_and_logging_settings_are_checked(tmp_path: Path) -> None:
    directory = tmp_path / "node"
    init_node(directory, "hosp-a", None, 8080)
    config = load_config(directory, environ={})
    assert (config.metrics_enabled, config.metrics_token) == (True, "")
    assert (config.log_format, config.log_level) == ("json", "INFO")
    config = load_config(
        directory,
        environ={
            "HRX_METRICS_ENABLED": "false",
            "HRX_METRICS_TOKEN": TOKEN,
            "HRX_LOGGING_FORMAT": "text",
            "HRX_LOGGING_LEVEL": "warning",
        },
    )
    assert (config.metrics_enabled, config.metrics_token) == (False, TOKEN)
    assert (config.log_format, config.log_level) == ("text", "WARNING")
    assert load_config(directory, environ={"HRX_METRICS_TOKEN": ""}).metrics_token == ""
    for environ, words in [
        ({"HRX_METRICS_TOKEN": "short"}, "at least 16"),
        ({"HRX_METRICS_TOKEN": "has a space in it, sixteen+"}, "without spaces"),
        ({"HRX_METRICS_ENABLED": "maybe"}, "true or false"),
        ({"HRX_LOGGING_FORMAT": "xml"}, "json, text"),
        ({"HRX_LOGGING_LEVEL": "LOUD"}, "DEBUG"),
    ]:
        with pytest.raises(ConfigError, match=words):
            load_config(directory, environ=environ)


# -- gunicorn: several workers, one set of counts --------------------------------------------


@pytest.mark.slow
def test_gunicorn_workers_counts_add_up(tmp_path: Path) -> None:
    env = {"GUNICORN_CMD_ARGS": "--config python:node.ops.gunicorn_conf"}
    with running_node(tmp_path / "node", gunicorn_workers=2, env=env) as served:
        log = served.directory / "server.log"
        sent = 0

        def served_by() -> set[int]:
            return {line["pid"] for line in log_lines(log) if line.get("route") == "/livez"}

        # new connections until both workers have answered some (bounded: 50 rounds of 10)
        for _ in range(50):
            for _ in range(10):
                assert requests.get(f"{served.base}/livez", timeout=10).status_code == 200
                sent += 1
            if len(served_by()) == 2:
                break
        assert len(served_by()) == 2, "one worker answered everything"
        livez = {"method": "GET", "route": "/livez", "status": "200"}
        pids = set()
        for _ in range(4):  # whichever worker answers the scrape, it counts every worker's
            samples = scrape(served.base)
            assert value(samples, "hrx_http_requests_total", **livez) == sent
            pids |= {
                dict(labels)["pid"] for labels in values_of(samples, "process_cpu_seconds_total")
            }
        assert {str(pid) for pid in served_by()} < pids  # the workers and the master, by pid
        assert (served.directory / "prometheus").is_dir()
        lines = log_lines(log)  # gunicorn's own lines too are JSON
        assert any(line["logger"] == "gunicorn.error" for line in lines)
        assert not any(line["logger"] == "gunicorn.access" for line in lines)


# -- two members: decisions, replication, checkpoints, request IDs across members -----------


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Consortium]:
    consortium = Consortium(tmp_path_factory.mktemp("metrics-group"), 2, epoch_seconds=2)
    try:
        consortium.start_all()
        yield consortium
    finally:
        consortium.close()


@pytest.mark.slow
def test_decisions_replication_and_checkpoints(group: Consortium) -> None:
    member = group.members["hosp-a"]
    source = Node(member.directory, member.web_port)
    _, patient = a_patient(source)  # its pseudonym
    before = scrape(source.base)

    def ask(purpose: str, reason: str | None, request_id: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "request_id": str(uuid.uuid4()),
            "patient": patient,
            "purpose": purpose,
            "categories": ["laboratory"],
        }
        if reason is not None:
            body["reason"], body["reason_code"] = reason, "unconscious"
        with request_scope(request_id):  # as a referral's request would carry its own ID
            return ask_access(group.members["hosp-b"].directory, "hosp-a", body)

    trace = f"referral-{uuid.uuid4().hex[:8]}"
    assert ask("TREAT", None, trace)["decision"] == "deny"
    assert ask("ETREAT", "车祸昏迷，无家属陪同，需查既往检查", trace + "-2")["emergency"]
    after = scrape(source.base)
    for labels, count in (
        ({"decision": "deny", "emergency": "false", "requester": "hosp-b"}, 1),
        ({"decision": "permit", "emergency": "true", "requester": "hosp-b"}, 1),
    ):
        assert (
            value(after, "hrx_access_decisions_total", **labels)
            - value(before, "hrx_access_decisions_total", **labels)
            == count
        )
    assert (
        value(after, "hrx_http_requests_total", method="POST", route="/peer/access", status="200")
        >= 2
    )

    # the caller's request ID is on the source's access line: one referral, followed
    accesses = [line for line in log_lines(member.directory / "processes.log") if "route" in line]
    (access,) = [line for line in accesses if line["request_id"] == trace]
    assert access["route"] == "/peer/access" and access["status"] == 200

    # hosp-b replicates hosp-a's decisions: its worker's round ID is on hosp-a's access lines
    group.wait_converged(30)
    reader = group.members["hosp-b"]
    pulled = wait_for(
        lambda: [
            line
            for line in log_lines(reader.directory / "processes.log")
            if line["logger"] == "node.consortium.worker"
            and line["message"].startswith(("following hosp-a's notice:", "comparing heads:"))
            and "hosp-a +" in line["message"]
        ],
        30,
        "hosp-b's worker logs that it pulled from hosp-a",
    )
    assert all(line["request_id"] for line in pulled)
    served_ids = {
        line["request_id"]
        for line in log_lines(member.directory / "processes.log")
        if line.get("route") == "/ledger/chains/<chain>/blocks"
    }
    assert {line["request_id"] for line in pulled} & served_ids

    # what hosp-b holds of hosp-a, how fresh, and the checkpoints
    blocks, entries = own_chain(member.directory)
    seen = wait_for(
        lambda: (
            samples
            if value(samples := scrape(reader.local), "hrx_ledger_blocks_total", chain="hosp-a")
            == blocks
            and "hrx_checkpoint_epoch" in {name for name, _ in samples}
            else None
        ),
        30,
        "hosp-b holds hosp-a's chain and a certified checkpoint",
    )
    assert value(seen, "hrx_ledger_entries_total", chain="hosp-a") == entries
    ages = values_of(seen, "hrx_replication_synced_age_seconds")
    assert set(ages) == {frozenset({("chain", "hosp-a")})}  # every other member, not itself
    assert 0 <= ages[frozenset({("chain", "hosp-a")})] < 60
    assert value(seen, "hrx_checkpoint_epoch") > 0
    assert 0 <= value(seen, "hrx_checkpoint_age_seconds") < 3600
    assert value(seen, "hrx_config_checkpoint_epoch_seconds") == 2
    assert value(seen, "hrx_replication_certified_blocks_behind", chain="hosp-a") >= 0
    # the access request body held the pseudonym; no label and no log line does
    assert not any(patient in v for (_n, labels) in seen for _k, v in labels)
    for name in ("hosp-a", "hosp-b"):
        assert patient not in (group.members[name].directory / "processes.log").read_text()
