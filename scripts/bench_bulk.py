"""Bulk data benchmark: bulk import and ``$export``, each printed beside its ceiling measured in
the same run.

- **import** (``hrx adapters bulk-import``'s engine) of a synthetic cohort as NDJSON, one file
  per type, on SQLite and PostgreSQL; ceilings: the same lines parsed, validated and indexed
  alone on every core (no database), and that preparation's rows inserted raw; beside them the
  preparation in one worker process, and one line's step by step (µs per step, in this
  process).
- **export** (``$export`` of a real node over HTTP, from kick-off to the manifest) of
  ``--export`` resources (the imported ones copied in SQL until there are that many);
  ceiling: the same stored bytes read raw and written to a file; the node's memory (RSS)
  sampled while it exports.

    python3 scripts/bench_bulk.py                 # --patients 300 --export 1000000
    python3 scripts/bench_bulk.py --postgres none # without a PostgreSQL server
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests
import sqlalchemy as sa
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fhir_adapters.store import ResourceStore, jsonio
from fhir_adapters.store.bulk_import import (
    BulkImport,
    Prepared,
    collecting_rarely,
    prepare_in_worker,
    preparing_pool,
)
from fhir_adapters.store.repository import UNSTAMPED, local_targets, stored_form
from fhir_adapters.store.resources import validate
from fhir_adapters.store.search_params import index_values
from node.base.config import load_config
from node.db.engines import MODEL_METADATA, open_database
from node.demo.nodes import free_port, init_node, join_alone, serving
from tests.helpers.ndjson import cohort_resources, write_ndjson

console = Console()


def lines_of(files: list[Path]) -> list[tuple[int, int, bytes | None]]:
    found: list[tuple[int, int, bytes | None]] = []
    for path in files:
        for number, line in enumerate(path.read_bytes().splitlines(), 1):
            found.append((number, 0, line))
    return found


def prepare_ceiling(
    lines: list[tuple[int, int, bytes | None]], workers: int
) -> tuple[float, list[Prepared]]:
    chunks = [lines[i : i + 200] for i in range(0, len(lines), 200)]
    # the import's pool, and its garbage collection in this process too
    with preparing_pool(workers) as pool, collecting_rarely(len(chunks) + 1):
        pool.starmap(prepare_in_worker, [("", chunks[0][:1])] * workers)  # started, imported
        started = time.perf_counter()
        prepared = pool.starmap(prepare_in_worker, [("http://bench/fhir", c) for c in chunks])
        seconds = time.perf_counter() - started
    return len(lines) / seconds, [p for chunk in prepared for p in chunk]


def preparation_stages(lines: list[tuple[int, int, bytes | None]]) -> dict[str, float]:
    """µs per line of each step of a line's preparation (as ``_prepare`` takes them), in this
    one process, every line through one step before the next."""
    texts = [text for _, _, text in lines if text is not None]
    prepare_in_worker("http://bench/fhir", lines[:200])  # the models built, imports done
    steps: dict[str, float] = {}

    def timed(name: str, step: Any, values: list[Any]) -> list[Any]:
        started = time.perf_counter()
        results = [step(value) for value in values]
        steps[name] = (time.perf_counter() - started) / len(values) * 1e6
        return results

    with collecting_rarely(10**9):
        parsed = timed("parse", lambda text: jsonio.parse(text, "the line"), texts)
        valid = timed("validate", validate, parsed)
        stored = timed("stored form", lambda r: stored_form(r, r["id"], "1", UNSTAMPED), valid)
        timed("local references", lambda r: local_targets(r, "http://bench/fhir"), stored)
        timed("index rows", lambda r: index_values(r, "http://bench/fhir"), stored)
        timed("bytes", jsonio.dump, stored)
    return steps


def insert_ceiling(url: str, prepared: list[Prepared]) -> float:
    """The prepared rows inserted as the import inserts them, 1,000 a transaction, with no
    reading, checking or waves around them."""
    database = open_database(url)
    for metadata in MODEL_METADATA:
        metadata.create_all(database.write_engine)
    started = time.perf_counter()
    for start in range(0, len(prepared), 1000):
        with database.write_engine.begin() as conn:
            BulkImport.create_many(conn, prepared[start : start + 1000])
    seconds = time.perf_counter() - started
    database.close()
    return len(prepared) / seconds


def import_rate(url: str, files: list[Path], count: int, workers: int) -> float:
    database = open_database(url)
    for metadata in MODEL_METADATA:
        metadata.create_all(database.write_engine)
    store = ResourceStore(database.engine, database.write_engine, "http://bench/fhir")
    started = time.perf_counter()
    counts = BulkImport(store, "bench", files, workers=workers).run()
    seconds = time.perf_counter() - started
    database.close()
    assert counts.created == count, counts
    return count / seconds


def postgres_url(base: str, name: str) -> str:
    admin = sa.create_engine(f"{base}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return f"{base}/{name}"


def multiply(url: str, wanted: int) -> int:
    """Copy the stored resources (new ids, same bodies) until there are ``wanted``."""
    database = open_database(url)
    with database.write_engine.begin() as conn:
        have = conn.execute(sa.text("SELECT count(*) FROM fhir_resources")).scalar_one()
        base = have
        copy = 0
        while have < wanted:
            copy += 1
            conn.execute(
                sa.text(
                    "INSERT INTO fhir_resources (type, id, version, last_updated, deleted) "
                    "SELECT type, id || '-c' || :copy, 1, last_updated, deleted FROM "
                    "fhir_resources WHERE res_pk <= :base AND id NOT LIKE '%-c%'"
                ),
                {"copy": copy, "base": base + 10**9},
            )
            conn.execute(
                sa.text(
                    "INSERT INTO fhir_versions (res_pk, version, type, last_updated, method, body) "
                    "SELECT n.res_pk, 1, n.type, n.last_updated, 'POST', v.body FROM "
                    "fhir_resources n JOIN fhir_resources o ON o.type = n.type AND "
                    "n.id = o.id || '-c' || :copy JOIN fhir_versions v ON v.res_pk = o.res_pk"
                ),
                {"copy": copy},
            )
            have = conn.execute(sa.text("SELECT count(*) FROM fhir_resources")).scalar_one()
    database.close()
    return int(have)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def timed_export(session: requests.Session, url: str) -> tuple[float, int]:
    """Seconds from kick-off to manifest, and the resources exported."""
    started = time.perf_counter()
    kick = session.get(url, headers={"Prefer": "respond-async"}, timeout=60)
    assert kick.status_code == 202, kick.text
    while True:
        status = session.get(kick.headers["Content-Location"], timeout=60)
        if status.status_code == 200:
            break
        assert status.status_code == 202, status.text
        time.sleep(0.2)
    seconds = time.perf_counter() - started
    return seconds, sum(item["count"] for item in status.json()["output"])


def export_figures(directory: Path, port: int, total: int) -> tuple[float, float, int, int, float]:
    """(resources/s through $export, raw read-and-write ceiling/s, RSS before, RSS peak,
    resources/s through Patient/$export)."""
    url = load_config(directory).database_url
    database = open_database(url)
    out = directory / "raw.ndjson"
    started = time.perf_counter()
    with database.engine.connect() as conn, out.open("wb") as handle:
        rows = conn.execution_options(stream_results=True, yield_per=1000).execute(
            sa.text(
                "SELECT v.body FROM fhir_resources r JOIN fhir_versions v ON v.res_pk = r.res_pk "
                "AND v.version = r.version ORDER BY r.type, r.last_updated, r.res_pk"
            )
        )
        for (body,) in rows:
            handle.write(bytes(body))
            handle.write(b"\n")
    ceiling = total / (time.perf_counter() - started)
    database.close()
    with serving(directory, port) as node:
        token = node.token("bench-export", "admin", scope="system/*.rs")
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {token}"
        assert node.process is not None
        pid = node.process.pid
        before = rss_kb(pid)
        peak = [before]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss_kb(pid))
                time.sleep(0.1)

        sampler = threading.Thread(target=sample)
        sampler.start()
        time.sleep(2.2)  # what was just written settles (transactionTime)
        seconds, exported = timed_export(session, f"{node.fhir}/$export")
        assert exported == total, (exported, total)
        done.set()
        sampler.join()
        patient_seconds, in_compartments = timed_export(session, f"{node.fhir}/Patient/$export")
    return total / seconds, ceiling, before, peak[0], in_compartments / patient_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patients", type=int, default=300)
    parser.add_argument("--export", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hrx-bench-bulk-"))
    rows: list[list[str]] = []
    try:
        resources = cohort_resources(args.patients)
        files = write_ndjson(resources, work / "ndjson")
        lines = lines_of(files)
        count = len(resources)
        console.print(f"{count:,} resources, {sum(p.stat().st_size for p in files) / 1e6:.1f} MB")
        steps = preparation_stages(lines)
        rows.append(
            [
                "— one line's preparation in one process, step by step: "
                + ", ".join(f"{name} {us:,.0f}" for name, us in steps.items()),
                f"{sum(steps.values()):,.0f} µs",
                "",
                "",
            ]
        )
        alone, _ = prepare_ceiling(lines, 1)
        rows.append(["— the same in one worker process", f"{alone:,.0f}/s", "", ""])
        prepare, prepared = prepare_ceiling(lines, args.workers)
        rows.insert(
            0,
            [
                f"parse, validate, index {count:,} lines, {args.workers} processes (no database)",
                f"{prepare:,.0f}/s",
                "",
                "",
            ],
        )

        def sqlite_url(name: str) -> str:
            return f"sqlite:///{work}/{name}.db"

        def pg_url(name: str) -> str:
            return postgres_url(args.postgres, f"hrx_bench_bulk_{name}")

        engines = [("SQLite", sqlite_url)]
        if args.postgres != "none":
            engines.append(("PostgreSQL", pg_url))
        for label, make in engines:
            raw = insert_ceiling(make("raw"), prepared)
            rows.append(
                [
                    f"{label}: the prepared rows inserted raw, 1,000 a transaction",
                    f"{raw:,.0f}/s",
                    "",
                    "",
                ]
            )
            rate = import_rate(make("import"), files, count, args.workers)
            ceiling = 1 / (1 / prepare + 1 / raw)
            rows.append(
                [
                    f"{label}: bulk import, validated and indexed",
                    f"{rate:,.0f}/s",
                    f"{ceiling:,.0f}/s",
                    f"{rate / ceiling:.0%}",
                ]
            )
            console.print(rows[-1])
        directory = work / "node" / "hosp-a"
        port = free_port()
        init_node(directory, "hosp-a", None, port)
        join_alone(directory)
        url = load_config(directory).database_url
        database = open_database(url)
        store = ResourceStore(database.engine, database.write_engine, "http://bench/fhir")
        BulkImport(store, "bench", files, workers=args.workers).run()
        database.close()
        total = multiply(url, args.export)
        rate, ceiling, before, peak, patients = export_figures(directory, port, total)
        rows.append(
            [
                f"$export of {total:,} resources (kick-off to manifest)",
                f"{rate:,.0f}/s",
                f"{ceiling:,.0f}/s",
                f"{rate / ceiling:.0%}",
            ]
        )
        rows.append(
            ["Patient/$export of the same (every compartment)", f"{patients:,.0f}/s", "", ""]
        )
        rows.append(
            [
                "the node's memory while exporting (RSS)",
                f"{before / 1024:,.0f} → {peak / 1024:,.0f} MB",
                "",
                "",
            ]
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = Table("figure", "measured", "ceiling", "of ceiling", title="hrx bulk data benchmark")
    for row in rows:
        table.add_row(*row)
    console.print(table)


if __name__ == "__main__":
    main()
