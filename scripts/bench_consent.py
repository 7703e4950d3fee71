"""Benchmark consent: the policy, access decisions, consent writes and the patient portal.

Makes a node that is the one member of a consortium of its own, loads P patients (default
2,000) with two privacy consents each (every consent on the ledger, as in production), then
measures, each figure beside its ceiling from the same run:

- policy: ``consent.policy.decide`` over a patient's consent entries, against a loop that only
  touches each entry (the least any decision must do);
- access decision: ``exchange.decisions.decide_access`` against the node's database (heads, the
  patient index, the policy), against reading the heads alone;
- under gunicorn (2 workers, gthread) with wrk from another process: the portal's pages
  signed in (my consents, who accessed my records, a receipt) against ``GET /livez``, and
  consent grants (``POST /fhir/Consent`` by the patient: one ledger block in the Consent's own
  transaction each) against Observation creates (the same write path without the ledger).

    python3 scripts/bench_consent.py [--patients 2000] [--db URL] [--seconds 10]
        [--connections 16]

Needs wrk (Debian: apt-get install wrk).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import requests
from rich.console import Console
from rich.progress import Progress

from consent.model import consent_resource
from consent.policy import CONSENT_TYPES, AccessRequest, decide
from consent.pseudonym import RESIDENT_ID_SYSTEM
from exchange.decisions import decide_access
from ledger.model import format_time
from node.base.config import load_config
from node.demo.nodes import Node, free_port, init_node, join_alone, wait_healthy
from node.identity.sessions import issue_enrollment, redeem_enrollment
from node.services import open_services
from scripts.bench_fhir import gunicorn, lua_paths, wrk

ROOT = Path(__file__).resolve().parent.parent

console = Console()


def load(directory: Path, patients: int) -> tuple[list[str], list[str]]:
    """Patients with two consents each; returns their ids and pseudonyms."""
    services = open_services(load_config(directory))
    ids: list[str] = []
    pseudonyms: list[str] = []
    started = time.perf_counter()
    batch = 100
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("loading", total=patients)
        for start in range(0, patients, batch):
            with services.store.writing() as writer:
                for number in range(start, min(patients, start + batch)):
                    patient = {
                        "resourceType": "Patient",
                        "identifier": [
                            {"system": RESIDENT_ID_SYSTEM, "value": f"33010219800101{number:04d}"}
                        ],
                        "name": [{"family": "张", "given": [f"三{number}"]}],
                    }
                    stored = writer.create(patient, "Patient")
                    ids.append(stored.id)
                    pseudonyms.append(services.consents.pseudonym_of(patient) or "")
                    for categories in (["laboratory"], ["imaging"]):
                        writer.create(
                            consent_resource(
                                stored.id, ["hosp-a"], categories, ["TREAT"], "2026-01-01", None
                            ),
                            "Consent",
                        )
            progress.advance(task, min(batch, patients - start))
    elapsed = time.perf_counter() - started
    console.print(
        f"loaded {patients:,} patients and {2 * patients:,} consents in {elapsed:.1f} s "
        f"({2 * patients / elapsed:,.0f} consents/s, each on the ledger, 100 per transaction)"
    )
    services.close()
    return ids, pseudonyms


def rate(function: object, seconds: float = 2.0) -> float:
    """Calls per second of a function of no arguments."""
    call = function  # type: ignore[assignment]
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(100):
            call()  # type: ignore[operator]
        count += 100
    return count / (time.perf_counter() - started)


def in_process(directory: Path, pseudonyms: list[str]) -> None:
    services = open_services(load_config(directory))
    try:
        store = services.chain_store
        entries = store.entries_about(pseudonyms[0], CONSENT_TYPES)
        request = AccessRequest(pseudonyms[0], "hosp-a", "TREAT", ("imaging",), format_time())
        policy = rate(lambda: decide(entries, request))
        touch = rate(lambda: [e["body"] for e in entries])
        access = rate(lambda: decide_access(store, request), 3.0)
        heads = rate(lambda: store.heads(), 3.0)
        console.print(
            f"\n{'':44} {'per s':>10} {'ceiling':>10} {'of ceiling':>10}\n"
            f"{'policy decide (' + str(len(entries)) + ' entries)':44} {policy:10,.0f} "
            f"{touch:10,.0f} {policy / touch:10.1%}\n"
            f"{'access decision (heads, index, policy)':44} {access:10,.0f} "
            f"{heads:10,.0f} {access / heads:10.1%}"
        )
    finally:
        services.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=2000)
    parser.add_argument("--db", default=None, help="PostgreSQL URL (default: SQLite)")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    work = Path(tempfile.mkdtemp(prefix="hrx-bench-consent-"))
    directory = work / "hosp-a"
    port = free_port()
    init_node(directory, "hosp-a", args.db, port)
    join_alone(directory)
    patient_ids, pseudonyms = load(directory, args.patients)
    in_process(directory, pseudonyms)
    node = Node(directory, port)
    database = node.database
    code = issue_enrollment(database.write_engine, patient_ids[0])
    redeem_enrollment(database.write_engine, code, "bench.patient", "bench password 1")
    doctor = node.token("bench", "doctor")
    patient_token = node.token("bench-p", "patient", patient=patient_ids[1])
    server = gunicorn(directory, port, 2, 4)
    try:
        wait_healthy(node.base, server)
        base = node.base
        browser = requests.Session()
        form = browser.get(f"{base}/portal/signin").text
        csrf = form.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
        browser.post(
            f"{base}/portal/signin",
            data={"csrf_token": csrf, "username": "bench.patient", "password": "bench password 1"},
        )
        cookie = f"Cookie: hrx_portal={browser.cookies['hrx_portal']}"
        page = browser.get(f"{base}/portal/consents").text
        receipt = page.split('href="/portal/receipts/', 1)[1].split('"', 1)[0]
        consent = json.dumps(
            consent_resource(patient_ids[1], ["hosp-a"], ["laboratory"], ["TREAT"], None, None)
        )
        observation = json.dumps(
            {
                "resourceType": "Observation",
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
                "subject": {"reference": f"Patient/{patient_ids[1]}"},
                "valueQuantity": {"value": 13.5, "unit": "g/dL"},
            }
        )
        seconds, connections = args.seconds, args.connections
        wrk(base, lua_paths(["/portal/consents"]), None, 2, connections, headers=(cookie,))
        ceiling = wrk(base, lua_paths(["/livez"]), None, seconds, connections)
        results = {
            "portal: my consents": wrk(
                base, lua_paths(["/portal/consents"]), None, seconds, connections, headers=(cookie,)
            ),
            "portal: who accessed my records": wrk(
                base, lua_paths(["/portal/access"]), None, seconds, connections, headers=(cookie,)
            ),
            "portal: a receipt": wrk(
                base,
                lua_paths([f"/portal/receipts/{receipt}"]),
                None,
                seconds,
                connections,
                headers=(cookie,),
            ),
        }
        again = wrk(base, lua_paths(["/livez"]), None, seconds, connections)
        ceiling = again if again["rate"] > ceiling["rate"] else ceiling
        creates = wrk(
            base,
            lua_paths(["/fhir/Observation"], "POST", observation),
            doctor,
            seconds,
            connections,
            "application/fhir+json",
        )
        grants = wrk(
            base,
            lua_paths(["/fhir/Consent"], "POST", consent),
            patient_token,
            seconds,
            connections,
            "application/fhir+json",
        )
        console.print(
            f"\n{'':36} {'req/s':>9} {'ceiling':>9} {'of ceiling':>10} {'p50 ms':>8} {'p99 ms':>8}"
        )
        for name, figures in results.items():
            console.print(
                f"{name:36} {figures['rate']:9,.0f} {ceiling['rate']:9,.0f} "
                f"{figures['rate'] / ceiling['rate']:10.1%} {figures['p50']:8.2f} "
                f"{figures['p99']:8.2f}"
            )
        console.print(
            f"{'consent grant (ledger in the tx)':36} {grants['rate']:9,.0f} "
            f"{creates['rate']:9,.0f} {grants['rate'] / creates['rate']:10.1%} "
            f"{grants['p50']:8.2f} {grants['p99']:8.2f}   (ceiling: Observation creates)"
        )
    finally:
        server.terminate()
        server.wait()
        node.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
