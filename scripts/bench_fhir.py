"""Benchmark a node's FHIR API under gunicorn with a load generator in another process.

Loads N Observations (default 100,000, over N/50 patients) into a fresh node, serves it with
gunicorn (2 workers, gthread), and drives it with wrk from a separate process:

- read: GET Observation/{id} over random ids;
- search: GET Observation?patient=P&code=C&date=geD (random patients) with _count=20;
- create: POST Observation;
- chained: GET Observation?subject:Patient.identifier=ID (a patient's 50, by their card number);
- _has: GET Patient?_has:Observation:patient:code=C (the patients with a rare result);
- quantity: GET Observation?patient=P&value-quantity=gt7|UCUM|mmol/L (across units: glucose
  is stored in mg/dL, sodium and potassium in mmol/L);
- composite: GET Observation?patient=P&code-value-quantity=LOINC|C$gt7|UCUM|mmol/L (a
  glucose above 7 mmol/L: the code and the value of one Observation, across units);
- ceiling: GET /livez under the same gunicorn (a request that does no work).

Every FHIR request carries a bearer token and leaves a durable AuditEvent, as in production.
Prints each figure beside the ceiling measured in the same run. Creates are measured with
``--connections`` at once (their writes share commits: group commit) and with one connection
(what a lone client waits). ``--only create`` measures the ceiling and the creates alone, over
a store of ``--observations`` (default then 1,000), each ``--rounds`` times in one run (the
machine may be shared: every round is printed, and the range), and then the CPU one create
costs in this process (the node's app without HTTP), which bounds the creates all the cores
could make.

    python3 scripts/bench_fhir.py [--observations 100000] [--db URL] [--workers 2]
        [--threads 8] [--seconds 10] [--connections 16] [--only create] [--rounds 3]

Needs wrk (Debian: apt-get install wrk).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from fhir_adapters.store import ResourceStore
from node.base.config import load_config
from node.db.engines import open_database
from node.demo.nodes import free_port, init_node, wait_healthy

ROOT = Path(__file__).resolve().parent.parent

console = Console()
LOINC = [
    "718-7",
    "789-8",
    "2345-7",
    "2160-0",
    "1742-6",
    "6690-2",
    "777-3",
    "2951-2",
    "2823-3",
    "1920-8",
]
RARE = "94500-6"  # one result in 5,000 (a notifiable result): what a _has search looks for
UNITS = {  # (low, high, UCUM unit) of a code's values; others 10-17 g/dL
    "2345-7": (60.0, 250.0, "mg/dL"),  # glucose
    "2951-2": (130.0, 150.0, "mmol/L"),  # sodium
    "2823-3": (3.0, 6.0, "mmol/L"),  # potassium
}


def load(directory: Path, observations: int) -> tuple[list[str], list[str]]:
    config = load_config(directory)
    database = open_database(config.database_url)
    store = ResourceStore(database.engine, database.write_engine, config.fhir_base)
    patients = max(1, observations // 50)
    patient_ids: list[str] = []
    observation_ids: list[str] = []
    rng = random.Random(7)
    started = time.perf_counter()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("loading", total=patients + observations)
        batch = 500
        for start in range(0, patients, batch):
            with store.writing() as writer:
                for number in range(start, min(patients, start + batch)):
                    stored = writer.create(
                        {
                            "resourceType": "Patient",
                            "identifier": [
                                {
                                    "system": "urn:oid:2.16.156.10011.1.1",
                                    "value": f"3301021980{number:08d}",
                                }
                            ],
                            "name": [{"family": "张", "given": [f"三{number}"]}],
                            "gender": "male" if number % 2 else "female",
                            "birthDate": f"19{50 + number % 50}-01-02",
                        }
                    )
                    patient_ids.append(stored.id)
            progress.advance(task, min(batch, patients - start))
        for start in range(0, observations, batch):
            with store.writing() as writer:
                for number in range(start, min(observations, start + batch)):
                    day = rng.randrange(0, 1000)
                    code = RARE if rng.random() < 0.0002 else rng.choice(LOINC)
                    low, high, unit = UNITS.get(code, (10.0, 17.0, "g/dL"))
                    stored = writer.create(
                        {
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
                            "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                            "subject": {"reference": f"Patient/{patient_ids[number % patients]}"},
                            "effectiveDateTime": time.strftime(
                                "%Y-%m-%dT%H:%M:%S+08:00", time.gmtime(1.6e9 + day * 86400)
                            ),
                            "valueQuantity": {
                                "value": round(rng.uniform(low, high), 1),
                                "unit": unit,
                                "system": "http://unitsofmeasure.org",
                                "code": unit,
                            },
                        }
                    )
                    observation_ids.append(stored.id)
            progress.advance(task, min(batch, observations - start))
    elapsed = time.perf_counter() - started
    console.print(
        f"loaded {patients:,} patients and {observations:,} observations in "
        f"{elapsed:.0f} s ({(patients + observations) / elapsed:,.0f} resources/s, "
        "validated, one transaction per 500)"
    )
    database.close()
    return patient_ids, observation_ids


def lua_paths(paths: list[str], method: str = "GET", body: str | None = None) -> str:
    listed = ",\n".join(json.dumps(p) for p in paths)
    body_line = f"wrk.body = {json.dumps(body)}\n" if body else ""
    return (
        f"wrk.method = {json.dumps(method)}\n{body_line}"
        f"local paths = {{\n{listed}\n}}\n"
        "local n = 0\n"
        "request = function()\n"
        "  n = n + 1\n"
        "  return wrk.format(nil, paths[(n % #paths) + 1])\n"
        "end\n"
    )


def wrk(
    url: str,
    script: str,
    token: str | None,
    seconds: int,
    connections: int,
    content_type: str | None = None,
    headers: tuple[str, ...] = (),
) -> dict[str, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(script)
    command = [
        "wrk",
        "-t",
        str(min(2, connections)),
        "-c",
        str(connections),
        "-d",
        f"{seconds}s",
        "--latency",
        "-s",
        handle.name,
    ]
    if token:
        command += ["-H", f"Authorization: Bearer {token}"]
    if content_type:
        command += ["-H", f"Content-Type: {content_type}"]
    for header in headers:
        command += ["-H", header]
    output = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout
    os.unlink(handle.name)

    def latency(label: str) -> float:
        match = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)", output, re.M)
        if not match:
            return float("nan")
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[match.group(2)]
        return float(match.group(1)) * scale

    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if errors:
        raise SystemExit(f"{errors.group(1)} requests failed:\n{output}")
    return {"rate": rate, "p50": latency("50"), "p90": latency("90"), "p99": latency("99")}


def gunicorn(
    directory: Path,
    port: int,
    workers: int,
    threads: int,
    environment: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """The node in ``directory`` served by gunicorn (gthread) on 127.0.0.1:``port``; its log
    lines (one access line per request) go to ``gunicorn.log`` there, not between the
    figures."""
    log = (directory / "gunicorn.log").open("ab")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-w",
            str(workers),
            "-k",
            "gthread",
            "--threads",
            str(threads),
            "-b",
            f"127.0.0.1:{port}",
            "--log-level",
            "warning",
            "node.web.wsgi:app",
        ],
        cwd=ROOT,
        env={**os.environ, "HRX_NODE_DIR": str(directory), **(environment or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def create_cpu_ms(directory: Path, token: str, body: str, count: int = 300) -> float:
    """The CPU one create costs, in ms: the node's app in this process (Flask's test client,
    no HTTP, no other writer), ``count`` creates one after another, after a warm-up."""
    from node.web.app import create_app

    client = create_app(directory).test_client()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}

    def create() -> None:
        answer = client.post("/fhir/Observation", data=body, headers=headers)
        assert answer.status_code == 201, answer.get_data(as_text=True)

    for _ in range(count // 5):  # warm-up
        create()
    started = time.process_time()
    for _ in range(count):
        create()
    return (time.process_time() - started) / count * 1000


def creates_beside_ceiling(
    directory: Path, base: str, token: str, body: str, args: argparse.Namespace
) -> None:
    """``--rounds`` rounds of: the ceiling (GET /livez), creates with ``--connections`` at
    once, and creates one at a time; each round printed, then the ranges."""
    create = lua_paths(["/fhir/Observation"], "POST", body)
    rounds = []
    console.print(
        f"{'round':>5} {'livez/s':>9} {'creates/s':>10} {'of ceiling':>10} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'alone/s':>8} {'alone p50 ms':>12}"
    )
    for number in range(1, args.rounds + 1):
        ceiling = wrk(base, lua_paths(["/livez"]), None, args.seconds, args.connections)
        many = wrk(base, create, token, args.seconds, args.connections, "application/fhir+json")
        alone = wrk(base, create, token, args.seconds, 1, "application/fhir+json")
        rounds.append((ceiling["rate"], many["rate"], alone["rate"]))
        console.print(
            f"{number:5} {ceiling['rate']:9,.0f} {many['rate']:10,.0f} "
            f"{many['rate'] / ceiling['rate']:10.1%} {many['p50']:7.1f} {many['p99']:7.1f} "
            f"{alone['rate']:8,.0f} {alone['p50']:12.2f}"
        )
    ceilings, creates, lone = zip(*rounds, strict=True)
    console.print(
        f"\ncreates with {args.connections} connections: {min(creates):,.0f}-{max(creates):,.0f}/s "
        f"beside a ceiling (GET /livez) of {min(ceilings):,.0f}-{max(ceilings):,.0f}/s; "
        f"one connection: {min(lone):,.0f}-{max(lone):,.0f}/s"
    )
    cpu = create_cpu_ms(directory, token, body)
    cores = os.cpu_count() or 1
    console.print(
        f"one create's CPU in one process (no HTTP): {cpu:.2f} ms, so at most "
        f"{cores * 1000 / cpu:,.0f}/s on {cores} cores with nothing else running"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--observations", type=int, default=100_000)
    parser.add_argument("--db", default=None, help="PostgreSQL URL (default: SQLite)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--only", choices=["create"], default=None)
    parser.add_argument("--rounds", type=int, default=3, help="with --only create")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    if args.only == "create" and args.observations == 100_000:
        args.observations = 1000
    work = Path(tempfile.mkdtemp(prefix="hrx-bench-"))
    directory = work / "node"
    port = free_port()
    init_node(directory, "hosp-a", args.db, port)
    patient_ids, observation_ids = load(directory, args.observations)
    from node.demo.nodes import Node

    node = Node(directory, port)
    token = node.token("bench", "doctor")
    server = gunicorn(directory, port, args.workers, args.threads)
    try:
        wait_healthy(node.base, server)
        base = node.base
        rng = random.Random(11)
        reads = [
            f"/fhir/Observation/{i}"
            for i in rng.sample(observation_ids, min(2000, len(observation_ids)))
        ]
        searches = [
            f"/fhir/Observation?patient={rng.choice(patient_ids)}&code=http://loinc.org|"
            f"{rng.choice(LOINC)}&date=ge2021-01-01&_count=20"
            for _ in range(2000)
        ]
        chained = [
            "/fhir/Observation?subject:Patient.identifier=urn:oid:2.16.156.10011.1.1|"
            f"3301021980{rng.randrange(len(patient_ids)):08d}&_count=20"
            for _ in range(2000)
        ]
        has = [
            "/fhir/Patient?_has:Observation:patient:code=http://loinc.org|" + RARE + "&_count=20"
        ]
        quantity = [
            f"/fhir/Observation?patient={rng.choice(patient_ids)}"
            "&value-quantity=gt7|http://unitsofmeasure.org|mmol/L&_count=20"
            for _ in range(2000)
        ]
        composite = [
            f"/fhir/Observation?patient={rng.choice(patient_ids)}"
            "&code-value-quantity=http://loinc.org|2345-7$gt7|http://unitsofmeasure.org|mmol/L"
            "&_count=20"
            for _ in range(2000)
        ]
        broad = [
            f"/fhir/Observation?code=http://loinc.org|{rng.choice(LOINC)}&_count=20&_total=none"
            for _ in range(200)
        ]
        body = json.dumps(
            {
                "resourceType": "Observation",
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
                "subject": {"reference": f"Patient/{patient_ids[0]}"},
                "effectiveDateTime": "2024-01-02T10:00:00+08:00",
                "valueQuantity": {"value": 13.5, "unit": "g/dL"},
            }
        )
        console.print(
            f"gunicorn: {args.workers} workers x {args.threads} threads; wrk: 2 "
            f"threads, {args.connections} connections, {args.seconds} s per figure"
        )
        wrk(base, lua_paths(reads), token, 2, args.connections)  # warm up
        if args.only == "create":
            creates_beside_ceiling(directory, base, token, body, args)
            return
        results = {
            "ceiling (GET /livez)": wrk(
                base, lua_paths(["/livez"]), None, args.seconds, args.connections
            ),
            "read": wrk(base, lua_paths(reads), token, args.seconds, args.connections),
            "search patient+code+date": wrk(
                base, lua_paths(searches), token, args.seconds, args.connections
            ),
            "search code only (5k+ matches)": wrk(
                base, lua_paths(broad), token, args.seconds, args.connections
            ),
            "create": wrk(
                base,
                lua_paths(["/fhir/Observation"], "POST", body),
                token,
                args.seconds,
                args.connections,
                "application/fhir+json",
            ),
        }
        # latency at one request at a time (no queueing): what a single user sees
        single = {
            "create": wrk(
                base,
                lua_paths(["/fhir/Observation"], "POST", body),
                token,
                args.seconds,
                1,
                "application/fhir+json",
            ),
            "read": wrk(base, lua_paths(reads), token, args.seconds, 1),
            "search patient+code+date": wrk(base, lua_paths(searches), token, args.seconds, 1),
            "chained (subject:Patient.identifier)": wrk(
                base, lua_paths(chained), token, args.seconds, 1
            ),
            "_has (patients with a rare result)": wrk(base, lua_paths(has), token, args.seconds, 1),
            "quantity (patient, gt7 mmol/L across units)": wrk(
                base, lua_paths(quantity), token, args.seconds, 1
            ),
            "composite (patient, glucose gt7 mmol/L)": wrk(
                base, lua_paths(composite), token, args.seconds, 1
            ),
        }
        # the ceiling again at the end: the better of the two (the machine is shared)
        again = wrk(base, lua_paths(["/livez"]), None, args.seconds, args.connections)
        if again["rate"] > results["ceiling (GET /livez)"]["rate"]:
            results["ceiling (GET /livez)"] = again
        ceiling = results["ceiling (GET /livez)"]["rate"]
        console.print(
            f"\n{'':46} {'req/s':>9} {'of ceiling':>10} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}"
        )
        for name, figures in results.items():
            console.print(
                f"{name:46} {figures['rate']:9,.0f} {figures['rate'] / ceiling:10.1%} "
                f"{figures['p50']:8.2f} {figures['p90']:8.2f} {figures['p99']:8.2f}"
            )
        console.print("\none connection (no queueing):")
        for name, figures in single.items():
            console.print(
                f"{name:46} {figures['rate']:9,.0f} {'':10} {figures['p50']:8.2f} "
                f"{figures['p90']:8.2f} {figures['p99']:8.2f}"
            )
    except SystemExit:
        log = directory / "gunicorn.log"
        failed = [
            line
            for line in log.read_text(errors="replace").splitlines()
            if re.search(r'"status": ?[45]\d\d', line) or "Traceback" in line or "Error" in line
        ]
        console.print("what the node logged of the failed requests:", *failed[-20:], sep="\n")
        raise
    finally:
        server.terminate()
        server.wait()
        node.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
