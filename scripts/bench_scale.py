"""Benchmark how a consortium's costs grow with its size: for each size, a consortium of real
member processes on this machine (node.demo.harness.Consortium), measured from the outside
(/proc), so that it measures any replication protocol the nodes run.

    python3 scripts/bench_scale.py --members 4,8,16,32 --witnesses 3 [--rtt-ms 20] --json OUT

Per size N (``--members``: the ordinary members, roles []; the witnesses come on top, so N=4
runs 7 members): ``--witnesses`` witnesses (the first members, hosp-a ...), the first of them
also the registry; a patient with ``--results`` lab results (as scripts/bench_referral.py
makes them) at each of the first three ordinary members, consent given at the first of them;
``$prior-results`` asked at the fourth ordinary member (the requester) by a doctor. Then:

- ``idle_cpu_member``, ``idle_cpu_witness``: cores used by one member of each kind (user +
  system CPU of all its processes, averaged over the members of that kind) over an idle
  window (``--idle-seconds``) after the consortium has settled (the first referral answered
  in full, every witness holding every member's chain as far as the member itself does, then
  ``--settle-seconds``);
- ``referral_p50_ms``, ``referral_p95_ms``: ``$prior-results`` latency at the requester,
  ``--referrals`` requests one at a time after ``--warm-up`` untimed ones;
- ``referral_cpu_ms``: CPU of every process of every member from the first timed referral
  until ``--tail-seconds`` after the last (what the referrals set off, replication included),
  less the idle CPU over the same wall time, per referral;
- ``block_cpu_ms``: a one-entry block appended to an ordinary member's chain (the last
  ordinary member; appended by this script with ledger.store.ChainWriter on the member's
  database, as scripts/bench_consortium.py does, so the signing is not counted, only what the
  member's processes and the others do about the block): CPU of every process of every member
  from the append until every witness holds the block, less idle, averaged over ``--blocks``
  blocks ``--block-spacing`` seconds apart; ``block_cpu_window_ms`` is the same over the
  whole spacing after each append (what ordinary members still do after the witnesses hold
  it), ``block_witness_p50_ms`` the time until every witness holds it;
- ``rss_mb_member``, ``rss_mb_witness``: resident memory of all of a member's processes,
  summed per member and averaged over each kind, read at the end of the size's run;
- the ceiling, in the same run: ``ceiling_read_p50_ms``, ``ceiling_read_p95_ms``,
  ``ceiling_read_cpu_ms``: a plain authenticated FHIR read at the requester
  (``GET Patient/{id}``), ``--reads`` of them, CPU counted as for the referrals.

After the last size, the ratios between the largest and the smallest size of
``referral_cpu_ms``, ``referral_p95_ms``, ``idle_cpu_member`` and ``block_cpu_ms`` (target:
at most 1.3) are printed and written with the runs: ``{"settings", "runs", "ratios"}``
(written after each size too, so a failed run keeps the sizes done).

``--rtt-ms R``: each member's relay (the address the roster gives) holds what it forwards
R/2 ms each way, so every request between members takes R ms more; the script talks to the
requester directly, not through its relay. Connecting is not delayed (a real network would
add a round trip per new connection).

What runs per member, kept as small as the nodes allow: ``hrx node serve`` (Werkzeug's
threaded development server: one process, no worker processes; gunicorn is not used) and
``hrx node replicate`` (one process, ``--replicate-interval``, default 1 s as the command's
own), both with the node's default settings except ``HRX_CHECKPOINTS_EPOCH_SECONDS``
(``--epoch-seconds``, default 30, the node's default). So 2 processes per member, 70 at N=32,
about 200 MiB each member (7 GiB at N=32). Descendants of those processes are counted too,
should a node ever start any. Each size is a fresh consortium; its members start
``--parallel`` at a time. Every process is stopped at the end of each size, on failure, on
Ctrl-C and on SIGTERM; the script then checks that none is left.

Figures net of idle are only as good as the machine is quiet: when the members' idle work
and other jobs (``idle_cpu_other_jobs``: the rest of the machine's CPU meanwhile) keep the
cores busy, background work slows down under load and the net figures understate, even
below zero (the script warns when more than half of the cores are busy while idle;
``referral_busy_cores`` and ``referral_cpu_gross_ms`` show how busy the members were). With
every member replicating every chain, each member's idle work grows with N, so the largest
sizes need a quiet machine, if not more cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from bench_referral import ACCREDITED, load  # the referral bench's lab results, as it makes them
from rich.console import Console
from rich.table import Table

from consent.model import consent_resource
from consent.pseudonym import RESIDENT_ID_SYSTEM
from ledger import keys
from ledger.store import ChainStore, ChainWriter
from node.base.config import load_config
from node.demo.harness import Consortium, member_names
from node.demo.nodes import FHIR_JSON, Node, post

console = Console()
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
RATIO_FIELDS = ["referral_cpu_ms", "referral_p95_ms", "idle_cpu_member", "block_cpu_ms"]
RATIO_TARGET = 1.3
STARTED = time.monotonic()


def say(size: int | None, message: str) -> None:
    where = f"N={size}: " if size is not None else ""
    console.print(f"[dim]{time.monotonic() - STARTED:7.1f} s[/] {where}{message}", highlight=False)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


# --- measuring processes from the outside ------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (field 3 first); None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


@dataclass
class Reading:
    when: float  # time.perf_counter()
    members: dict[str, dict[int, int]]  # per member: process -> user + system CPU, in ticks
    machine: int  # the whole machine's busy CPU so far, in ticks (/proc/stat)


def _machine_ticks() -> int:
    """user, nice, system, irq, softirq and steal ticks of every CPU (not idle, not iowait)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    return sum(int(fields[n]) for n in (0, 1, 2, 5, 6, 7))


class Meter:
    """CPU and memory of every process of every member: the web server, the replication
    worker and their descendants, found anew at each reading (one pass over /proc)."""

    def __init__(self, group: Consortium) -> None:
        self.group = group
        self.seen: set[int] = set()  # every process ever counted, checked for at the end

    def processes(self) -> dict[str, list[int]]:
        roots = {
            name: [
                p.pid for p in (member.web, member.replicator) if p is not None and p.poll() is None
            ]
            for name, member in self.group.members.items()
        }
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                stat = _stat(int(entry.name))
                if stat is not None:
                    children.setdefault(int(stat[1]), []).append(int(entry.name))
        trees = {}
        for name, pids in roots.items():
            found, todo = [], list(pids)
            while todo:
                pid = todo.pop()
                found.append(pid)
                todo.extend(children.get(pid, []))
            trees[name] = found
            self.seen.update(found)
        return trees

    def cpu(self) -> Reading:
        trees = self.processes()
        reading = Reading(time.perf_counter(), {}, _machine_ticks())
        for name, pids in trees.items():
            reading.members[name] = {}
            for pid in pids:
                stat = _stat(pid)
                if stat is not None:
                    reading.members[name][pid] = int(stat[11]) + int(stat[12])  # utime, stime
        return reading

    def rss_mb(self) -> dict[str, float]:
        """Resident memory per member, all its processes summed, in MiB."""
        sizes = {}
        for name, pids in self.processes().items():
            total = 0
            for pid in pids:
                with suppress(OSError, IndexError):  # gone
                    total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
            sizes[name] = total / 2**20
        return sizes


def used(before: Reading, after: Reading) -> tuple[float, dict[str, float], float]:
    """(wall seconds, CPU seconds per member, CPU seconds of the rest of the machine) between
    two readings. A process that started in between counts whole; one that ended in between
    is lost (none does in this bench)."""
    per_member = {}
    for name, now in after.members.items():
        then = before.members.get(name, {})
        per_member[name] = sum(t - then.get(pid, 0) for pid, t in now.items()) / TICKS
    others = (after.machine - before.machine) / TICKS - sum(per_member.values())
    return after.when - before.when, per_member, others


class Idle:
    """The idle CPU rate (cores) of each member, of all together, and of the rest of the
    machine (other jobs on it: the figures are only as steady as they are)."""

    def __init__(self, wall: float, cpu: dict[str, float], others: float) -> None:
        self.per_member = {name: seconds / wall for name, seconds in cpu.items()}
        self.total = sum(self.per_member.values())
        self.others = others / wall

    def net(self, before: Reading, after: Reading) -> tuple[float, float]:
        """(CPU seconds of all members between two readings beyond their idle rate, cores
        the members used then in all)."""
        wall, cpu, _ = used(before, after)
        return sum(cpu.values()) - self.total * wall, sum(cpu.values()) / wall


# --- one size ------------------------------------------------------------------------------


class Failed(Exception):
    pass


def wait_for(what: str, check: Any, seconds: float, pause: float = 0.2) -> float:
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if check():
            return time.monotonic() - started
        time.sleep(pause)
    raise Failed(f"{what}: not within {seconds:.0f} s")


def own_heads(group: Consortium, names: list[str]) -> dict[str, int]:
    """Each member's own chain's size, as the member holds it."""
    sizes = {}
    for name in names:
        store = ChainStore(group.database_url(name))
        try:
            head = store.heads().get(name)
            sizes[name] = head.tree_size if head is not None else 0
        finally:
            store.close()
    return sizes


def witnesses_hold(stores: dict[str, ChainStore], sizes: dict[str, int]) -> bool:
    for store in stores.values():
        heads = store.heads()
        for chain, size in sizes.items():
            head = heads.get(chain)
            if size and (head is None or head.tree_size < size):
                return False
    return True


def timed(session: requests.Session, url: str, count: int, check: Any) -> list[float]:
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        answer = session.get(url, timeout=60)
        latencies.append((time.perf_counter() - started) * 1000)
        check(answer)
    return latencies


def run_size(size: int, args: argparse.Namespace, stray: list[str]) -> dict[str, Any]:
    total = size + args.witnesses
    names = member_names(total)
    witnesses, ordinary = names[: args.witnesses], names[args.witnesses :]
    holders, requester, appender = ordinary[:3], ordinary[3], ordinary[-1]
    root = Path(tempfile.mkdtemp(prefix=f"hrx-bench-scale-{size}-"))
    say(size, f"making {total} members ({args.witnesses} witnesses, {size} ordinary) in {root}")
    started = time.perf_counter()
    info: dict[str, dict[str, object]] = {
        name: {"level": "三级甲等", "accreditation": ACCREDITED} for name in names
    }
    try:  # nothing runs yet: only the directories to remove on failure
        group = Consortium(
            root,
            total,
            members_info=info,
            epoch_seconds=args.epoch_seconds,
            replicate_interval=args.replicate_interval,
            witnesses=witnesses,
            registries=witnesses[:1],
            relay_delay=args.rtt_ms / 2000,
            consortium_name="hrx-bench-scale",
        )
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    meter = Meter(group)
    nodes: dict[str, Node] = {}
    stores: dict[str, ChainStore] = {}
    try:
        made = time.perf_counter() - started
        say(
            size,
            f"made in {made:.1f} s; starting {2 * total} processes, {args.parallel} "
            "members at a time",
        )
        started = time.perf_counter()
        group.start_all(parallel=args.parallel, timeout=180)
        start_seconds = time.perf_counter() - started
        say(size, f"started in {start_seconds:.1f} s")

        # the patient, the results, the consent
        nodes = {
            name: Node(group.members[name].directory, group.members[name].web_port)
            for name in [*holders, requester]
        }
        resident_id = "3301" + str(uuid.uuid4().int)[:14]
        ids = {}
        for name, at in nodes.items():
            created = post(
                at.session(),
                f"{at.fhir}/Patient",
                {
                    "resourceType": "Patient",
                    "identifier": [{"system": RESIDENT_ID_SYSTEM, "value": resident_id}],
                },
            )
            assert created.status_code == 201, created.text
            ids[name] = created.json()["id"]
        for name in holders:
            load(nodes[name], ids[name], args.results)
        first = nodes[holders[0]]
        token = first.token("bench-patient", "patient", patient=ids[holders[0]])
        answer = post(
            first.session(token),
            f"{first.fhir}/Consent",
            consent_resource(
                ids[holders[0]], ["*"], ["laboratory", "imaging"], ["TREAT"], None, None
            ),
        )
        assert answer.status_code == 201, answer.text
        say(size, f"{args.results} results at each of {', '.join(holders)}; consent given")

        doctor = requests.Session()
        doctor.headers["Accept"] = FHIR_JSON
        doctor.headers["Authorization"] = (
            f"Bearer {group.token(requester, 'bench-doctor', 'doctor')}"
        )
        base = f"{group.members[requester].local}/fhir"
        referral = f"{base}/Patient/{ids[requester]}/$prior-results"
        read = f"{base}/Patient/{ids[requester]}"
        expected = 3 * args.results
        incomplete = []

        def full_answer() -> bool:
            answer = doctor.get(referral, timeout=60)
            return answer.status_code == 200 and answer.json().get("total") == expected

        waited = wait_for("a $prior-results answered in full", full_answer, 120, 1)
        say(size, f"first $prior-results answered in full after {waited:.1f} s")
        stores = {name: ChainStore(group.database_url(name)) for name in witnesses}
        sizes = own_heads(group, names)
        try:
            waited = wait_for(
                "every witness holding every member's chain",
                lambda: witnesses_hold(stores, sizes),
                180,
            )
            say(size, f"every witness holds every chain after {waited:.1f} s")
        except Failed as exc:  # not needed for what follows: measure all the same
            say(size, f"[yellow]warning:[/] {exc}")
        say(size, f"settling {args.settle_seconds:g} s, then idle for {args.idle_seconds:g} s")
        time.sleep(args.settle_seconds)

        # idle
        before = meter.cpu()
        time.sleep(args.idle_seconds)
        after = meter.cpu()
        idle = Idle(*used(before, after))
        idle_member = statistics.mean(idle.per_member[n] for n in ordinary)
        idle_witness = statistics.mean(idle.per_member[n] for n in witnesses)
        say(
            size,
            f"idle: {idle_member:.3f} cores per member, {idle_witness:.3f} per witness, "
            f"{idle.total:.2f} all together; other jobs on the machine {idle.others:.2f}",
        )
        cores = os.cpu_count() or 1
        if idle.total + idle.others > cores / 2:
            say(
                size,
                f"[yellow]warning:[/] more than half of the {cores} cores busy while idle: the "
                "figures net of idle understate (background work slows down when the CPU is "
                "contended)",
            )

        # referrals, then the ceiling
        def referral_check(answer: requests.Response) -> None:
            if answer.status_code != 200:
                raise Failed(f"$prior-results answered {answer.status_code}: {answer.text[:300]}")
            if answer.json().get("total") != expected:
                incomplete.append(answer.json().get("total"))

        def read_check(answer: requests.Response) -> None:
            if answer.status_code != 200:
                raise Failed(f"GET Patient answered {answer.status_code}: {answer.text[:300]}")

        timed(doctor, referral, args.warm_up, referral_check)
        before = meter.cpu()
        referrals = timed(doctor, referral, args.referrals, referral_check)
        time.sleep(args.tail_seconds)
        after = meter.cpu()
        referral_cpu, referral_busy = idle.net(before, after)
        referral_cpu /= args.referrals
        referral_gross = sum(used(before, after)[1].values()) / args.referrals
        say(
            size,
            f"{args.referrals} referrals: p50 {statistics.median(referrals):.1f} ms, "
            f"p95 {percentile(referrals, 0.95):.1f} ms, CPU {referral_cpu * 1000:.1f} ms each"
            f" (the members used {referral_busy:.2f} cores meanwhile)"
            + (f"; {len(incomplete)} not answered in full" if incomplete else ""),
        )
        timed(doctor, read, args.warm_up, read_check)
        before = meter.cpu()
        reads = timed(doctor, read, args.reads, read_check)
        time.sleep(args.tail_seconds)
        read_cpu, _ = idle.net(before, meter.cpu())
        read_cpu /= args.reads
        say(
            size,
            f"{args.reads} reads (ceiling): p50 {statistics.median(reads):.1f} ms, "
            f"CPU {read_cpu * 1000:.1f} ms each",
        )

        # blocks
        config = load_config(group.members[appender].directory)
        own = ChainStore(config.database_url)
        block_cpu, window_cpu, reached = [], [], []
        try:
            with ChainWriter(own, appender, keys.load_private_key(config.ed25519_key)) as writer:
                for number in range(args.blocks):
                    before = meter.cpu()
                    writer.append(
                        "access.requested",
                        {"request_id": f"bench-scale-{number}", "patient": "ab" * 32},
                    )
                    head = own.heads()[appender]
                    wait_for(
                        f"every witness holding {appender}'s block {head.header['height']}",
                        lambda head=head: witnesses_hold(stores, {appender: head.tree_size}),
                        60,
                        0.02,
                    )
                    held = meter.cpu()
                    reached.append((held.when - before.when) * 1000)
                    block_cpu.append(idle.net(before, held)[0])
                    time.sleep(max(0.0, before.when + args.block_spacing - time.perf_counter()))
                    window_cpu.append(idle.net(before, meter.cpu())[0])
        finally:
            own.close()
        say(
            size,
            f"{args.blocks} blocks: every witness holds each after "
            f"{statistics.median(reached):.0f} ms (p50); CPU "
            f"{statistics.mean(block_cpu) * 1000:.1f} ms each until then, "
            f"{statistics.mean(window_cpu) * 1000:.1f} ms over "
            f"{args.block_spacing:.0f} s",
        )
        rss = meter.rss_mb()
        return {
            "members": size,
            "witnesses": args.witnesses,
            "rtt_ms": args.rtt_ms,
            "processes": sum(len(p) for p in meter.processes().values()),
            "idle_cpu_member": round(idle_member, 4),
            "idle_cpu_witness": round(idle_witness, 4),
            "idle_cpu_all": round(idle.total, 3),
            "idle_cpu_other_jobs": round(idle.others, 3),
            "referral_p50_ms": round(statistics.median(referrals), 1),
            "referral_p95_ms": round(percentile(referrals, 0.95), 1),
            "referral_max_ms": round(max(referrals), 1),
            "referral_cpu_ms": round(referral_cpu * 1000, 1),
            "referral_incomplete": len(incomplete),
            "referral_busy_cores": round(referral_busy, 2),
            "referral_cpu_gross_ms": round(referral_gross * 1000, 1),
            "block_cpu_ms": round(statistics.mean(block_cpu) * 1000, 1),
            "block_cpu_window_ms": round(statistics.mean(window_cpu) * 1000, 1),
            "block_witness_p50_ms": round(statistics.median(reached), 1),
            "rss_mb_member": round(statistics.mean(rss[n] for n in ordinary), 1),
            "rss_mb_witness": round(statistics.mean(rss[n] for n in witnesses), 1),
            "ceiling_read_p50_ms": round(statistics.median(reads), 1),
            "ceiling_read_p95_ms": round(percentile(reads, 0.95), 1),
            "ceiling_read_cpu_ms": round(read_cpu * 1000, 1),
            "make_seconds": round(made, 1),
            "start_seconds": round(start_seconds, 1),
        }
    finally:
        say(size, "stopping every member")
        meter.processes()  # every process running now is checked for below
        for at in nodes.values():
            at.close()
        for store in stores.values():
            store.close()
        group.close()
        left = [pid for pid in sorted(meter.seen) if _stat(pid) is not None and _is_node(pid)]
        if left:
            stray.append(f"N={size}: processes still running after close: {left}")
            console.print(f"[bold red]{stray[-1]}[/]")
        shutil.rmtree(root, ignore_errors=True)


def _is_node(pid: int) -> bool:
    try:
        return b"node.cli" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


# --- the report ------------------------------------------------------------------------------


def ratios(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    """Each ratio field at the largest size over the smallest ({} with one size only)."""
    if len({r["members"] for r in runs}) < 2:
        return {}
    smallest = min(runs, key=lambda r: r["members"])
    largest = max(runs, key=lambda r: r["members"])
    found: dict[str, float | None] = {}
    for name in RATIO_FIELDS:
        low, high = smallest[name], largest[name]
        found[name] = round(high / low, 2) if low > 0 else None  # None: not measurable
    return found


ROWS = [  # (field, what, format); the table has a column per size
    ("idle_cpu_member", "idle CPU per ordinary member (cores)", "{:.3f}"),
    ("idle_cpu_witness", "idle CPU per witness (cores)", "{:.3f}"),
    ("idle_cpu_all", "idle CPU of all members (cores)", "{:.2f}"),
    ("idle_cpu_other_jobs", "  other jobs on the machine meanwhile (cores)", "{:.2f}"),
    ("referral_p50_ms", "$prior-results p50 (ms)", "{:.1f}"),
    ("referral_p95_ms", "$prior-results p95 (ms)", "{:.1f}"),
    ("ceiling_read_p50_ms", "  ceiling: GET Patient p50 (ms)", "{:.1f}"),
    ("ceiling_read_p95_ms", "  ceiling: GET Patient p95 (ms)", "{:.1f}"),
    ("referral_cpu_ms", "CPU per referral, all members (ms)", "{:.1f}"),
    ("referral_busy_cores", "  cores the members used during them", "{:.2f}"),
    ("ceiling_read_cpu_ms", "  ceiling: CPU per GET Patient (ms)", "{:.1f}"),
    ("block_cpu_ms", "CPU per block until every witness holds it (ms)", "{:.1f}"),
    ("block_cpu_window_ms", "CPU per block over its whole spacing (ms)", "{:.1f}"),
    ("block_witness_p50_ms", "block at every witness after, p50 (ms)", "{:.0f}"),
    ("rss_mb_member", "RSS per ordinary member (MiB)", "{:.0f}"),
    ("rss_mb_witness", "RSS per witness (MiB)", "{:.0f}"),
    ("referral_incomplete", "referrals not answered in full", "{}"),
    ("start_seconds", "start of every member (s)", "{:.1f}"),
]


def report(runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, float | None]:
    table = Table(
        title=f"{args.witnesses} witnesses + N ordinary members, rtt {args.rtt_ms:g} ms, "
        f"{os.cpu_count()} cores"
    )
    table.add_column("figure")
    for run in runs:
        table.add_column(f"N={run['members']}", justify="right")
    for key, what, form in ROWS:
        table.add_row(what, *(form.format(run[key]) for run in runs))
    console.print(table)
    found = ratios(runs)
    if found:
        low = min(r["members"] for r in runs)
        high = max(r["members"] for r in runs)
        console.print(f"ratios N={high} / N={low} (target: at most {RATIO_TARGET}x):")
        for name, ratio in found.items():
            verdict = (
                "not measurable (zero or less at the smallest size)"
                if ratio is None
                else ("met" if ratio <= RATIO_TARGET else "[bold]not met[/]")
            )
            shown = "—" if ratio is None else f"{ratio:.2f}x"
            console.print(f"  {name:18} {shown:>7}  {verdict}")
    return found


def write(path: Path | None, args: argparse.Namespace, runs: list[dict[str, Any]]) -> None:
    if path is None or not runs:
        return
    settings = {
        key: getattr(args, key)
        for key in (
            "witnesses",
            "rtt_ms",
            "results",
            "referrals",
            "reads",
            "warm_up",
            "blocks",
            "block_spacing",
            "idle_seconds",
            "settle_seconds",
            "tail_seconds",
            "replicate_interval",
            "epoch_seconds",
            "parallel",
        )
    }
    settings["cores"] = os.cpu_count()
    document = {"settings": settings, "runs": runs, "ratios": ratios(runs)}
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--members", default="4,8,16,32", help="Sizes: ordinary members, comma-separated (≥ 4)."
    )
    parser.add_argument("--witnesses", type=int, default=3)
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="Round trip between members.")
    parser.add_argument("--json", type=Path, default=None, help="Write the figures here.")
    parser.add_argument("--results", type=int, default=10, help="Results at each holder.")
    parser.add_argument("--referrals", type=int, default=30)
    parser.add_argument("--reads", type=int, default=100, help="Ceiling reads.")
    parser.add_argument("--warm-up", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--block-spacing", type=float, default=3.0)
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--settle-seconds", type=float, default=10.0)
    parser.add_argument(
        "--tail-seconds",
        type=float,
        default=2.0,
        help="CPU counted this long after the last referral or read.",
    )
    parser.add_argument("--replicate-interval", type=float, default=1.0)
    parser.add_argument("--epoch-seconds", type=int, default=30)
    parser.add_argument("--parallel", type=int, default=4, help="Members started at a time.")
    args = parser.parse_args()
    sizes = [int(s) for s in args.members.split(",") if s.strip()]
    if not sizes or min(sizes) < 4:
        parser.error("--members: every size must be at least 4 (3 holders and a requester)")
    if args.witnesses < 1:
        parser.error("--witnesses must be at least 1")
    for signum in (signal.SIGTERM, signal.SIGHUP):  # stop the members on these too
        signal.signal(signum, lambda number, _: sys.exit(128 + number))
    runs: list[dict[str, Any]] = []
    stray: list[str] = []
    try:
        for size in sizes:
            runs.append(run_size(size, args, stray))
            write(args.json, args, runs)
    except (Failed, KeyboardInterrupt) as exc:
        console.print(f"[bold red]stopped[/]: {str(exc) or type(exc).__name__}")
        if runs:
            report(runs, args)
        sys.exit(1)
    report(runs, args)
    if args.json is not None:
        console.print(f"written to {args.json}")
    if stray:
        sys.exit("; ".join(stray))


if __name__ == "__main__":
    main()
