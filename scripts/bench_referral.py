"""Benchmark the referral exchange on real member processes (web server and replication
worker each, SQLite, development server, loopback):

- ``$prior-results`` latency p50/p95 at the requester (hosp-d) for a patient of whom three
  members (hosp-a, hosp-b, hosp-c) hold ``--results`` results each (default 50), every result
  released, recognised and wrapped with its Provenance; ceiling: a plain authenticated FHIR
  read at the requester (``GET Patient/{id}``) in the same run;
- revocation: the patient revokes consent at hosp-a; the time until every source denies the
  next request (sources sync the consent's chain before deciding), and until every member's
  replica holds the revocation (push-driven replication).

    python3 scripts/bench_referral.py [--results 50] [--requests 300] [--replicate-interval 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress

from consent.model import consent_resource
from consent.pseudonym import RESIDENT_ID_SYSTEM
from ledger.store import ChainStore
from node.demo.harness import Consortium
from node.demo.nodes import Node, post

ROOT = Path(__file__).resolve().parent.parent

console = Console()
ZONE = timezone(timedelta(hours=8))
ACCREDITED = [
    {"category": "laboratory", "scope": "省HR", "until": "2099-12-31"},
    {"category": "imaging", "scope": "省HR", "until": "2099-12-31"},
]
CODES = ["718-7", "6690-2", "777-3", "2160-0", "1742-6", "2823-3", "2345-7", "4548-4"]


def node(group: Consortium, name: str) -> Node:
    member = group.members[name]
    return Node(member.directory, member.web_port)


def load(at: Node, patient_id: str, count: int) -> None:
    session = at.session()
    for number in range(count):
        when = datetime.now(ZONE) - timedelta(days=number % 20)
        resource: dict[str, Any] = {
            "resourceType": "Observation",
            "status": "final",
            "category": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                            "code": "laboratory",
                        }
                    ]
                }
            ],
            "code": {"coding": [{"system": "http://loinc.org", "code": CODES[number % 8]}]},
            "subject": {"reference": f"Patient/{patient_id}"},
            "effectiveDateTime": when.isoformat(timespec="seconds"),
            "valueQuantity": {"value": 4.2, "unit": "mmol/L"},
        }
        assert post(session, f"{at.fhir}/Observation", resource).status_code == 201


def cpu_seconds(group: Consortium) -> float:
    """User and system CPU time so far of every member's web server and replication worker."""
    total = 0
    for member in group.members.values():
        for process in (member.web, member.replicator):
            if process is not None:
                fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=int, default=50)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument(
        "--replicate-interval",
        type=float,
        default=1.0,
        help="Seconds between the replication workers' full rounds (hrx node replicate's "
        "default: 1).",
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hrx-bench-referral-"))
    names = ["hosp-a", "hosp-b", "hosp-c", "hosp-d"]
    info = {name: {"level": "三级甲等", "accreditation": ACCREDITED} for name in names}
    group = Consortium(
        root,
        4,
        members_info=info,
        epoch_seconds=5,
        replicate_interval=args.replicate_interval,
    )
    try:
        group.start_all()
        nodes = {name: node(group, name) for name in names}
        resident_id = "3301" + str(uuid.uuid4().int)[:14]
        ids = {}
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("loading", total=3 * args.results)
            for name in names:
                created = post(
                    nodes[name].session(),
                    f"{nodes[name].fhir}/Patient",
                    {
                        "resourceType": "Patient",
                        "identifier": [{"system": RESIDENT_ID_SYSTEM, "value": resident_id}],
                    },
                )
                ids[name] = created.json()["id"]
            for name in names[:3]:
                load(nodes[name], ids[name], args.results)
                progress.advance(task, args.results)
        a = nodes["hosp-a"]
        token = a.token("bench-patient", "patient", patient=ids["hosp-a"])
        consent = post(
            a.session(token),
            f"{a.fhir}/Consent",
            consent_resource(
                ids["hosp-a"], ["*"], ["laboratory", "imaging"], ["TREAT"], None, None
            ),
        ).json()
        group.wait_converged(30)
        d = nodes["hosp-d"]
        doctor = d.session(d.token("bench-doctor", "doctor"))
        url = f"{d.fhir}/Patient/{ids['hosp-d']}/$prior-results"
        first = doctor.get(url).json()
        assert first["total"] == 3 * args.results, first.get("total")
        latencies, ceiling = [], []
        cpu_before, wall_before = cpu_seconds(group), time.perf_counter()
        for _ in range(args.requests):
            started = time.perf_counter()
            answer = doctor.get(url)
            latencies.append((time.perf_counter() - started) * 1000)
            assert answer.status_code == 200
            started = time.perf_counter()
            assert doctor.get(f"{d.fhir}/Patient/{ids['hosp-d']}").status_code == 200
            ceiling.append((time.perf_counter() - started) * 1000)
        cpu_used = cpu_seconds(group) - cpu_before
        wall_used = time.perf_counter() - wall_before
        # revocation: until every source denies, and until every replica holds it
        revoked = {**consent, "status": "inactive"}
        answer = a.session(token).put(
            f"{a.fhir}/Consent/{consent['id']}",
            json=revoked,
            headers={"Content-Type": "application/fhir+json"},
        )
        assert answer.status_code == 200
        started = time.perf_counter()
        enforced = None
        replicated = None
        stores = {name: ChainStore(group.database_url(name)) for name in names}
        patient_pseudonym = stores["hosp-a"].entries_about(None, ["consent.revoked"])[-1]["body"][
            "patient"
        ]
        while (enforced is None or replicated is None) and time.perf_counter() - started < 30:
            if enforced is None:
                bundle = doctor.get(url).json()
                denied = [e for e in bundle["entry"] if e["search"]["mode"] == "outcome"]
                if bundle["total"] == 0 and len(denied) == 3:
                    enforced = time.perf_counter() - started
            if replicated is None and all(
                s.entries_about(patient_pseudonym, ["consent.revoked"]) for s in stores.values()
            ):
                replicated = time.perf_counter() - started
        console.print(
            f"\n4 members, {args.results} results at each of 3 sources ({3 * args.results} "
            f"released per request), {args.requests} requests, one at a time"
        )
        console.print(
            f"$prior-results: p50 {statistics.median(latencies):.1f} ms, p95 "
            f"{percentile(latencies, 0.95):.1f} ms, max {max(latencies):.1f} ms (request "
            f"{latencies.index(max(latencies)) + 1} of {len(latencies)})"
        )
        console.print(
            f"ceiling (GET Patient at the requester): p50 {statistics.median(ceiling):.1f} ms, "
            f"p95 {percentile(ceiling, 0.95):.1f} ms"
        )
        console.print(
            f"CPU time of the 4 members' processes: {cpu_used / args.requests * 1000:.1f} ms per "
            f"request and its ceiling read ({cpu_used / wall_used:.2f} of the "
            f"{os.cpu_count()} cores busy)"
        )
        console.print(
            "revocation at hosp-a: every source denies after "
            + (f"{enforced:.3f} s" if enforced is not None else "more than 30 s (not reached)")
            + "; every replica holds it after "
            + (f"{replicated:.3f} s" if replicated is not None else "more than 30 s")
        )
    finally:
        group.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
