"""Verification on every core (ledger.verify_parallel) gives what serial verification gives: the
same summary, or the same first fault in the same words, on every export and database case of
test_verify.py and test_verify_faults.py (run again here with both compared), and on ledgers
of several chains: faults in more than one chain, chains interleaved, a line routed to another
chain than it holds, break-glass and observed entries in reading order."""

from __future__ import annotations

import inspect
import json
import mmap
import multiprocessing
import os
import pickle
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ledger import keys
from ledger import verify_parallel as parallel
from ledger.errors import LedgerError, VerificationError
from ledger.roster import make_member, make_roster, sign_roster
from ledger.store import ChainStore, ChainWriter
from ledger.verify import Misrouted, Summary, Verifier, verify_database, verify_export, verify_line
from ledger.verify_parallel import (
    NO_FAULT,
    _assign,
    _database_worker,
    _export_worker,
    _mapped,
    _misrouted_first,
    _scan,
    _serve,
    available_cores,
    verify_database_in_parallel,
    verify_export_in_parallel,
)
from tests.helpers.ledgers import BLS_KEY, Ledger
from tests.ledger import test_verify_faults
from tests.ledger.verify_cases import existing_cases, outcome


def _mapped_file(path: Path) -> mmap.mmap:
    mapped = _mapped(path)
    assert mapped is not None
    return mapped


def _compared(serial: Callable[..., Summary], parallel: Callable[..., Summary]) -> Any:
    """``serial`` as the tests call it, after checking that ``parallel`` on two processes
    gives the same outcome (the ledgers of several chains below are also split among three
    and eight)."""

    def verify(*args: Any, **options: Any) -> Summary:
        progress = args[2] if len(args) > 2 else options.pop("progress", None)
        expected = outcome(serial, *args[:2], **options)
        assert outcome(parallel, *args[:2], jobs=2, **options) == expected
        return serial(*args[:2], progress, **options)

    return verify


# The two exhaustive agreements run on SQLite only: most of their cases verify an export, which
# is the same file whichever engine wrote it; the database of several chains is verified on
# both engines below.
SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@SQLITE_ONLY
@pytest.mark.parametrize(("module", "test", "param"), existing_cases())
def test_parallel_verification_agrees_with_serial_on_every_existing_case(
    module: Any,
    test: Callable[..., None],
    param: Any,
    ledger_db: Ledger,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        module, "verify_export", _compared(verify_export, verify_export_in_parallel)
    )
    monkeypatch.setattr(
        module, "verify_database", _compared(verify_database, verify_database_in_parallel)
    )
    fixtures = {"ledger_db": ledger_db, "tmp_path": tmp_path}
    names = list(inspect.signature(test).parameters)
    given = [fixtures[name] for name in names if name in fixtures]
    test(*given, *param)


# -- ledgers of several chains -----------------------------------------------------------------

CHAINS = ("hosp-a", "hosp-b", "hosp-c")


def _consortium(ledger: Ledger, tmp_path: Path, blocks: dict[str, int]) -> dict[str, Any]:
    """A second roster version with hosp-b and hosp-c, and ``blocks[chain]`` blocks of two
    entries on each chain (one of them break-glass on hosp-b and hosp-c); the members' keys."""
    ((roster, _),) = ledger.store.rosters()
    signing = {"hosp-a": ledger.key}
    members = list(roster["members"])
    for chain in CHAINS[1:]:
        signing[chain] = keys.load_or_create_private_key(tmp_path / f"{chain}.pem")
        url = f"https://{chain}.example"
        members.append(make_member(chain, f"Hospital {chain}", url, signing[chain], BLS_KEY))
    body = make_roster("test", members, quorum=1, version=2)
    ledger.store.add_roster(body, sign_roster(body, ledger.authority))
    for chain, count in blocks.items():
        with ChainWriter(ledger.store, chain, signing[chain]) as writer:
            for n in range(count):
                second = ("emergency.access", {"requester_org": chain}) if n == 1 else None
                writer.append_many(
                    [("access.requested", {"n": n}), second or ("access.decided", {"n": n})]
                )
    return signing


def _export(ledger: Ledger, path: Path) -> list[bytes]:
    lines = [line + b"\n" for line in ledger.store.export_lines()]
    path.write_bytes(b"".join(lines))
    return lines


def _same(path: Path, ledger: Ledger, **options: Any) -> Any:
    """The outcome of verifying ``path``, the same serially and on two and three processes."""
    anchor = ledger.authority.public_key()
    expected = outcome(verify_export, path, anchor, **options)
    for jobs in (2, 3):
        assert outcome(verify_export_in_parallel, path, anchor, jobs=jobs, **options) == expected
    return expected


def _changed(line: bytes, old: bytes, new: bytes) -> bytes:
    assert old in line
    return line.replace(old, new, 1)


@pytest.fixture
def three(ledger_db: Ledger, tmp_path: Path) -> tuple[Ledger, Path, list[bytes]]:
    """hosp-a with 3 blocks, hosp-b with 1, hosp-c with 2, exported as hrx writes them."""
    _consortium(ledger_db, tmp_path, {"hosp-a": 3, "hosp-b": 1, "hosp-c": 2})
    path = tmp_path / "three.jsonl"
    return ledger_db, path, _export(ledger_db, path)


def test_several_chains_verify_alike(three: tuple[Ledger, Path, list[bytes]]) -> None:
    ledger, path, lines = three
    kind, summary, chains, *_ = _same(path, ledger)
    assert (kind, chains, summary.entries) == ("valid", list(CHAINS), 12)
    assert [(e.chain, e.seq) for e in summary.emergencies] == [("hosp-a", 3), ("hosp-c", 3)]
    # every block line's chain is found by its text, as one run per chain
    runs = _scan(_mapped_file(path), 3, len(lines[0]) + len(lines[1]))
    assert {c: len(r) for c, r in runs.by_chain.items()} == {c: 1 for c in CHAINS}
    assert runs.end is None


def test_the_earlier_of_two_faults_in_two_chains_is_named(
    three: tuple[Ledger, Path, list[bytes]],
) -> None:
    """Whichever worker finds its fault first: the fault of the earlier line is serial's."""
    ledger, path, lines = three
    # lines: 2 rosters, hosp-a at 3..5, hosp-b at 6, hosp-c at 7..8
    tampered = list(lines)
    tampered[3] = _changed(lines[3], b'"n":1', b'"n":7')  # hosp-a, height 1 (line 4)
    tampered[7] = _changed(lines[7], b'"n":1', b'"n":7')  # hosp-c, height 1 (line 8)
    path.write_bytes(b"".join(tampered))
    assert _same(path, ledger)[3:] == ("hosp-a", 1, None)
    # hosp-a's worker reaches its fault after two blocks, hosp-c's at once
    tampered[3] = lines[3]
    tampered[4] = b"{not json\n"  # line 5: hosp-a's last block
    tampered[6] = _changed(lines[6], b'"n":0', b'"n":7')  # line 7: hosp-c, height 0
    path.write_bytes(b"".join(tampered))
    assert _same(path, ledger)[1].startswith(f"{path}:5: not valid JSON")
    tampered[2] = _changed(lines[2], b'"n":0', b'"n":7')  # the very first block
    path.write_bytes(b"".join(tampered))
    assert _same(path, ledger)[3:] == ("hosp-a", 0, None)


@SQLITE_ONLY
def test_every_changed_byte_of_a_ledger_of_several_chains_verifies_alike(
    three: tuple[Ledger, Path, list[bytes]],
) -> None:
    ledger, path, lines = three
    for number, line in enumerate(lines):
        for position in range(number, len(line) - 1, 29):
            changed = bytearray(line)
            changed[position] ^= 0x01
            path.write_bytes(b"".join([*lines[:number], bytes(changed), *lines[number + 1 :]]))
            _same(path, ledger)


def test_chains_interleaved_reordered_or_cut_verify_alike(
    three: tuple[Ledger, Path, list[bytes]],
) -> None:
    ledger, path, lines = three
    rosters, a, b, c = lines[:2], lines[2:5], lines[5:6], lines[6:8]
    variants = {
        "interleaved": [*rosters, a[0], c[0], b[0], a[1], b"\n", c[1], a[2]],
        "a height skipped": [*rosters, a[0], c[0], b[0], a[2], c[1], a[1]],
        "c repeated": [*rosters, *c, *a, c[1], *b],
        "a roster after blocks": [*rosters, *a, rosters[1], *b],
        "no roster": [*a, *b, *c],
    }
    outcomes = {}
    for name, variant in variants.items():
        path.write_bytes(b"".join(variant))
        outcomes[name] = _same(path, ledger)
    assert outcomes["interleaved"][0] == "valid"
    assert outcomes["interleaved"][2] == ["hosp-a", "hosp-c", "hosp-b"]
    assert outcomes["a height skipped"][1] == "chain hosp-a, block height 2: expected height 1"
    assert outcomes["c repeated"][1] == "chain hosp-c, block height 1: expected height 2"
    assert outcomes["a roster after blocks"][1] == "roster version 2 does not follow version 2"
    assert outcomes["no roster"][1] == "a block comes before any roster"


def test_what_follows_the_blocks_is_verified_after_them(
    three: tuple[Ledger, Path, list[bytes]],
) -> None:
    """Certificates, evidence and blocks after them, and blocks spelled otherwise than hrx
    writes them, are verified in the parent, in the same order as serially."""
    ledger, path, lines = three
    spaced = [json.dumps(json.loads(line)).encode() + b"\n" for line in lines]
    certificate = b'{"certificate":{"signers":[]}}\n'
    variants = {
        "certificate after blocks": [*lines, certificate],
        "a block after a certificate": [*lines[:7], certificate, lines[7]],
        "blocks spelled with spaces": spaced,
        "spaced from hosp-c on": [*lines[:6], *spaced[6:]],
        "spaced hosp-a first": [*lines[:2], spaced[2], *lines[3:]],
    }
    outcomes: dict[str, Any] = {}
    for name, variant in variants.items():
        path.write_bytes(b"".join(variant))
        outcomes[name] = _same(path, ledger)
    assert outcomes["certificate after blocks"][1].startswith(f"{path}:9: certificate: ")
    assert outcomes["a block after a certificate"][1].startswith(f"{path}:8: certificate: ")
    for name in ("blocks spelled with spaces", "spaced from hosp-c on", "spaced hosp-a first"):
        assert outcomes[name][0] == "valid", name
        assert outcomes[name][1].entries == 12


def _misrouted(
    ledger: Ledger, tmp_path: Path, hosp_b_blocks: int
) -> tuple[Path, list[bytes], dict[str, Any]]:
    """An export whose third line is a valid block of hosp-a spelled with its signature
    before its header, so that its last ``],"header":{"chain":"`` is in an entry's body and
    names hosp-b; the file, its lines and that block."""
    signing = _consortium(ledger, tmp_path, {"hosp-b": hosp_b_blocks})
    with ChainWriter(ledger.store, "hosp-a", signing["hosp-a"]) as writer:
        writer.append("access.requested", {"a": [1], "header": {"chain": "hosp-b"}})
    path = tmp_path / "routed.jsonl"
    lines = _export(ledger, path)
    block = json.loads(lines[2])
    respelled = {k: block[k] for k in ("entries", "signature", "header")}
    lines[2] = json.dumps(respelled, separators=(",", ":")).encode() + b"\n"
    path.write_bytes(b"".join(lines))
    return path, lines, block


def test_a_block_routed_to_another_chain_by_its_text_is_verified_serially(
    ledger_db: Ledger, tmp_path: Path
) -> None:
    """A valid block of hosp-a, spelled with its signature before its header, whose last
    ``],"header":{"chain":"`` is in an entry's body and names hosp-b."""
    path, lines, _ = _misrouted(ledger_db, tmp_path, 1)
    runs = _scan(_mapped_file(path), 3, len(lines[0]) + len(lines[1]))
    assert list(runs.by_chain) == ["hosp-b"]  # both lines of hosp-b, by their text
    kind, _, chains, *_ = _same(path, ledger_db)
    assert (kind, chains) == ("valid", ["hosp-a", "hosp-b"])
    lines[3] = _changed(lines[3], b'"n":0', b'"n":7')  # and a fault after it, in hosp-b
    path.write_bytes(b"".join(lines))
    assert _same(path, ledger_db)[3:] == ("hosp-b", 0, None)
    lines[2], lines[3] = lines[3], lines[2]  # or before it
    path.write_bytes(b"".join(lines))
    assert _same(path, ledger_db)[3:] == ("hosp-b", 0, None)


def test_observed_and_break_glass_entries_come_in_reading_order(
    three: tuple[Ledger, Path, list[bytes]],
) -> None:
    ledger, path, lines = three
    watch = frozenset({"access.requested", "emergency.access"})
    for variant in (lines, [*lines[:2], lines[6], lines[2], lines[5], lines[7], *lines[3:5]]):
        path.write_bytes(b"".join(variant))
        kind, _, _, observed, entries = _same(path, ledger, watch=watch, observe=None)
        assert (kind, entries, len(observed)) == ("valid", 12, 8)
        blocks = [json.loads(line) for line in variant[2:]]
        assert observed == [e for b in blocks for e in b["entries"] if e["type"] in watch]


def test_a_database_of_several_chains_verifies_alike(ledger_db: Ledger, tmp_path: Path) -> None:
    from tests.helpers.ledgers import rows_changeable

    _consortium(ledger_db, tmp_path, {"hosp-a": 2, "hosp-b": 3, "hosp-c": 2})
    anchor = ledger_db.authority.public_key()
    watching = {"watch": frozenset({"access.decided", "emergency.access"}), "observe": None}

    def same() -> Any:
        expected = outcome(verify_database, ledger_db.store, anchor, **watching)
        for jobs in (2, 3, 8):
            parallel = outcome(
                verify_database_in_parallel, ledger_db.store, anchor, jobs=jobs, **watching
            )
            assert parallel == expected, jobs
        return expected

    kind, summary, chains, observed, entries = same()
    assert (kind, chains, entries, len(observed)) == ("valid", list(CHAINS), 14, 7)
    assert [(e.chain, e.seq) for e in summary.emergencies] == [
        ("hosp-a", 3),
        ("hosp-b", 3),
        ("hosp-c", 3),
    ]
    with rows_changeable(ledger_db.store) as conn:
        for chain, seq in (("hosp-c", 1), ("hosp-b", 4)):
            conn.exec_driver_sql(
                f"DELETE FROM ledger_entries WHERE chain = '{chain}' AND seq = {seq}"
            )
    assert same()[1] == "chain hosp-b, block height 2, seq 4: entry row is missing"


def test_one_process_is_serial_verification(
    three: tuple[Ledger, Path, list[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one job, or a file that cannot be mapped, no worker is started."""
    ledger, path, _ = three
    monkeypatch.setattr(parallel, "_run", None)  # a worker would fail
    anchor = ledger.authority.public_key()
    assert verify_export_in_parallel(path, anchor, jobs=1).entries == 12
    assert verify_database_in_parallel(ledger.store, anchor, jobs=1).entries == 12
    empty, missing = path.with_name("empty.jsonl"), path.with_name("missing.jsonl")
    empty.write_bytes(b"")
    with pytest.raises(VerificationError) as caught:
        verify_export_in_parallel(empty, anchor, jobs=2)
    assert caught.value.what == f"{empty} holds no roster"
    with pytest.raises(VerificationError) as caught:
        verify_export_in_parallel(missing, anchor, jobs=2)
    assert caught.value.what == f"cannot read {missing}: No such file or directory"
    assert 1 <= available_cores() <= (os.cpu_count() or 1)


def test_a_worker_that_dies_or_fails_is_an_error(
    three: tuple[Ledger, Path, list[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger, path, _ = three
    anchor = ledger.authority.public_key()

    def dies(*_: Any) -> Any:
        os._exit(3)

    def cannot_answer(*_: Any) -> Any:
        return lambda: None  # cannot be pickled

    monkeypatch.setattr(parallel, "_export_worker", dies)
    with pytest.raises(LedgerError, match=r"^a verifying process ended without an answer$"):
        verify_export_in_parallel(path, anchor, jobs=2)
    monkeypatch.setattr(parallel, "_export_worker", cannot_answer)
    with pytest.raises(LedgerError, match=r"^a verifying process failed: "):
        verify_export_in_parallel(path, anchor, jobs=2)


def test_a_store_is_verified_by_workers_that_open_their_own_connections(
    three: tuple[Ledger, Path, list[bytes]],
) -> None:
    ledger, _, _ = three
    store = ChainStore(ledger.url)
    try:
        summary = verify_database_in_parallel(store, ledger.authority.public_key(), jobs=2)
        assert summary.entries == 12
        assert store.chains() == list(CHAINS)  # the parent's connections still work
    finally:
        store.close()


# -- the workers, run in this process -------------------------------------------------------


class _Sent(list[Any]):
    """A results queue: what a worker sends."""

    def put(self, message: Any) -> None:
        self.append(message)


def _stop(value: int = NO_FAULT) -> Any:
    stop = multiprocessing.get_context("fork").Value("q", value)
    return stop


def _rostered(ledger: Ledger, **watching: Any) -> Verifier:
    verifier = Verifier(ledger.authority.public_key(), **watching)
    for roster, signature in ledger.store.rosters():
        verifier.add_roster(roster, signature, check_possession=False)
    return verifier


def test_an_export_worker_verifies_its_runs_and_tags_what_it_collects(
    three: tuple[Ledger, Path, list[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger, path, lines = three
    monkeypatch.setattr(parallel, "PROGRESS_EVERY", 4)
    mapped = _mapped_file(path)
    runs = _scan(mapped, 3, len(lines[0]) + len(lines[1]))
    (work,) = _assign(runs, 1)
    assert [(chain, number) for chain, number, _, _ in work] == [
        ("hosp-a", 3), ("hosp-b", 6), ("hosp-c", 7)
    ]  # fmt: skip
    sent, stop = _Sent(), _stop()
    watch = frozenset({"emergency.access"})
    verifier = _rostered(ledger, watch=watch, observe=lambda _: None)
    outcome = _export_worker(verifier, path, mapped, work, sent, stop)
    assert sent == [("progress", 4), ("progress", 4), ("progress", 4)]
    assert (outcome.fault, outcome.misrouted, stop.value) == (None, NO_FAULT, NO_FAULT)
    assert [(where, chain) for where, chain, _ in outcome.chains] == [
        (3, "hosp-a"), (6, "hosp-b"), (7, "hosp-c")
    ]  # fmt: skip
    assert [(where, e.chain, e.seq) for where, e in outcome.emergencies] == [
        (4, "hosp-a", 3), (8, "hosp-c", 3)
    ]  # fmt: skip
    assert [(where, e["chain"], e["seq"]) for where, e in outcome.observed] == [
        (4, "hosp-a", 3), (8, "hosp-c", 3)
    ]  # fmt: skip
    assert verifier.summary.chains == {} and verifier.summary.emergencies == []

    # a fault stops it at its line, and tells the others; lines after a known fault are skipped
    tampered = path.with_name("tampered.jsonl")
    tampered.write_bytes(b"".join([*lines[:3], b"[]\n", *lines[4:]]))
    sent, stop = _Sent(), _stop()
    outcome = _export_worker(_rostered(ledger), tampered, _mapped_file(tampered), work, sent, stop)
    assert outcome.fault is not None and outcome.fault[0] == stop.value == 4
    assert str(outcome.fault[1]).startswith(f"{tampered}:4: a block is ")
    assert [(where, chain) for where, chain, _ in outcome.chains] == [(3, "hosp-a")]
    assert sent == [("progress", 2)]
    sent, stop = _Sent(), _stop(5)
    outcome = _export_worker(_rostered(ledger), path, mapped, work, sent, stop)
    assert (outcome.fault, stop.value) == (None, 5)
    assert [(where, chain) for where, chain, _ in outcome.chains] == [(3, "hosp-a")]
    assert outcome.chains[0][2].summary.height == 2  # lines 3..5 verified, none after

    # a line routed to hosp-b whose header names hosp-a
    sent, stop = _Sent(), _stop()
    routed = [("hosp-b", number, start, end) for _, number, start, end in work]
    outcome = _export_worker(_rostered(ledger), path, mapped, routed, sent, stop)
    assert (outcome.misrouted, stop.value, outcome.fault, outcome.chains) == (3, 3, None, [])

    # the same with lines spelled otherwise than hrx writes them (white space in the entries),
    # which the Python path reads: routed to their own chains, or to another
    spaced_lines = [line.replace(b'"n":', b'"n": ') for line in lines]
    spaced = path.with_name("spaced.jsonl")
    spaced.write_bytes(b"".join(spaced_lines))
    spaced_map = _mapped_file(spaced)
    (spaced_work,) = _assign(_scan(spaced_map, 3, len(spaced_lines[0]) + len(spaced_lines[1])), 1)
    outcome = _export_worker(_rostered(ledger), spaced, spaced_map, spaced_work, _Sent(), _stop())
    assert (outcome.fault, outcome.misrouted) == (None, NO_FAULT)
    assert [(where, chain) for where, chain, _ in outcome.chains] == [
        (3, "hosp-a"), (6, "hosp-b"), (7, "hosp-c")
    ]  # fmt: skip
    routed = [("hosp-b", number, start, end) for _, number, start, end in spaced_work]
    outcome = _export_worker(_rostered(ledger), spaced, spaced_map, routed, _Sent(), _stop())
    assert (outcome.misrouted, outcome.fault, outcome.chains) == (3, None, [])


def test_a_database_worker_takes_chains_in_turn(
    three: tuple[Ledger, Path, list[bytes]],
) -> None:
    from tests.helpers.ledgers import rows_changeable

    ledger, _, _ = three
    chains = ledger.store.chains()
    taken, sent, stop = _stop(1), _Sent(), _stop()
    verifier = _rostered(ledger, watch=frozenset({"emergency.access"}), observe=lambda _: None)
    outcome = _database_worker(verifier, ledger.store, chains, taken, sent, stop)
    assert taken.value == 4 and sent == [("progress", 6)]  # hosp-b and hosp-c, then none left
    assert [(where, chain) for where, chain, _ in outcome.chains] == [(1, "hosp-b"), (2, "hosp-c")]
    assert [(where, e.chain) for where, e in outcome.emergencies] == [(2, "hosp-c")]
    assert [(where, e["chain"]) for where, e in outcome.observed] == [(2, "hosp-c")]
    taken, stop = _stop(0), _stop(0)
    outcome = _database_worker(_rostered(ledger), ledger.store, chains, taken, _Sent(), stop)
    assert (outcome.chains, taken.value) == ([(0, "hosp-a", outcome.chains[0][2])], 2)
    with rows_changeable(ledger.store) as conn:
        conn.exec_driver_sql("DELETE FROM ledger_entries WHERE chain = 'hosp-b' AND seq = 1")
    taken, stop = _stop(1), _stop()
    outcome = _database_worker(_rostered(ledger), ledger.store, chains, taken, _Sent(), stop)
    assert outcome.fault is not None and (outcome.fault[0], stop.value) == (1, 1)
    assert str(outcome.fault[1]) == "chain hosp-b, block height 0, seq 1: entry row is missing"
    assert outcome.chains == [] and taken.value == 2


def test_a_worker_sends_its_outcome_or_why_it_has_none() -> None:
    sent = _Sent()
    _serve(lambda results, stop: parallel._Outcome(misrouted=7), (), sent, _stop())
    ((kind, pickled),) = sent
    assert kind == "done" and pickle.loads(pickled) == parallel._Outcome(misrouted=7)

    def fails(results: Any, stop: Any) -> Any:
        raise KeyError("x")

    sent = _Sent()
    _serve(fails, (), sent, _stop())
    assert sent == [("crashed", "KeyError: 'x'")]


def test_the_first_fault_wins_and_a_misrouted_line_before_it_means_serial() -> None:
    first, later = VerificationError("first"), VerificationError("later")
    Outcome = parallel._Outcome
    assert not _misrouted_first([Outcome(), Outcome()])
    assert _misrouted_first([Outcome(misrouted=9), Outcome(fault=(12, later))])
    assert _misrouted_first([Outcome(misrouted=9), Outcome(fault=(9, later))])
    with pytest.raises(VerificationError) as caught:
        _misrouted_first([Outcome(fault=(12, later)), Outcome(fault=(8, first), misrouted=10)])
    assert caught.value is first


def test_every_job_gets_a_worker_up_to_one_per_chain(
    three: tuple[Ledger, Path, list[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Verification with more than one job does run in workers, as many as jobs or chains."""
    ledger, path, _ = three
    anchor = ledger.authority.public_key()
    started: list[int] = []
    run = parallel._run

    def counted(context: Any, targets: list[Any], progress: Any) -> Any:
        started.append(len(targets))
        return run(context, targets, progress)

    monkeypatch.setattr(parallel, "_run", counted)
    progressed: list[int] = []
    for jobs in (2, 3, 8):
        assert verify_export_in_parallel(path, anchor, progressed.append, jobs=jobs).anchored
        assert verify_database_in_parallel(ledger.store, anchor, progressed.append, jobs=jobs)
    assert started == [2, 2, 3, 3, 3, 3]
    assert sum(progressed) == 6 * 12
    serial: list[int] = []
    assert verify_database_in_parallel(ledger.store, anchor, serial.append, jobs=1).anchored
    assert verify_export_in_parallel(path, anchor, serial.append, jobs=1).anchored
    assert serial == [2] * 12 and started == [2, 2, 3, 3, 3, 3]


def test_the_cores_are_those_this_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert available_cores() == 1
    monkeypatch.delattr(os, "sched_getaffinity")
    assert available_cores() == 64
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert available_cores() == 1


# -- what mutation testing found unchecked --------------------------------------------------------


def test_given_certificates_and_watching_reach_every_path(
    three: tuple[Ledger, Path, list[bytes]],
) -> None:
    """Certificates given from elsewhere, and the entries watched, are held to and observed
    alike with workers and with one job, from an export and from a database."""
    ledger, path, lines = three
    given = [test_verify_faults._certificate(8, json.loads(lines[4]), roster=2)]  # hosp-a's head
    watching = {"watch": frozenset({"emergency.access"}), "observe": None}
    anchor = ledger.authority.public_key()
    expected = outcome(verify_export, path, anchor, given=given, **watching)
    assert expected[0] == "valid" and len(expected[3]) == 2
    assert (expected[1].given, expected[1].covered) == ([8], {"hosp-a": (8, 2)})
    stored = outcome(verify_database, ledger.store, anchor, given=given, **watching)
    assert stored[1].given == [8] and len(stored[3]) == 2
    for jobs in (1, 2):
        export = outcome(
            verify_export_in_parallel, path, anchor, jobs=jobs, given=given, **watching
        )
        assert export == expected, jobs
        database = outcome(
            verify_database_in_parallel, ledger.store, anchor, jobs=jobs, given=given, **watching
        )
        assert database == stored, jobs


def test_a_worker_is_given_its_arguments_the_results_and_the_stop() -> None:
    sent, stop = _Sent(), _stop(4)

    def target(first: int, second: int, results: Any, stop: Any) -> Any:
        assert results is sent
        return parallel._Outcome(misrouted=first * 10 + second + stop.value)

    _serve(target, (1, 2), sent, stop)
    ((kind, pickled),) = sent
    assert kind == "done" and pickle.loads(pickled) == parallel._Outcome(misrouted=16)


def test_a_verifier_of_further_chains_shares_the_rosters_and_hands_its_chains_over(
    three: tuple[Ledger, Path, list[bytes]],
) -> None:
    ledger, path, lines = three
    observed: list[dict[str, Any]] = []
    verifier = _rostered(ledger, watch=frozenset({"emergency.access"}), observe=lambda _: None)
    other = verifier.for_chains(observed.append)
    assert other.authority is verifier.authority and other.rosters is verifier.rosters
    assert other.summary.rosters is verifier.summary.rosters == [1, 2]
    assert other.summary.anchored
    for number, line in enumerate(lines[2:5], start=3):
        verify_line(other, path, number, line, None, "hosp-a")
    assert [(e["chain"], e["seq"]) for e in observed] == [("hosp-a", 3)]
    assert verifier.summary.chains == {} and list(other.chain_states()) == ["hosp-a"]
    emergencies = list(other.summary.emergencies)
    verifier.adopt(other.chain_states().items(), emergencies)
    assert verifier.summary.chains == other.summary.chains
    assert verifier.summary.emergencies == emergencies != []
    assert verifier.chain_states() == other.chain_states()


def test_a_database_worker_takes_every_chain_and_leaves_the_parents_connections_open(
    three: tuple[Ledger, Path, list[bytes]],
) -> None:
    ledger, _, _ = three
    with ledger.store.engine.connect() as conn:
        raw = conn.connection.dbapi_connection  # back in the parent's pool
    assert raw is not None
    chains = ledger.store.chains()
    taken = _stop(0)
    outcome = _database_worker(_rostered(ledger), ledger.store, chains, taken, _Sent(), _stop())
    assert outcome.fault is None and taken.value == 4
    assert [(where, chain) for where, chain, _ in outcome.chains] == list(enumerate(CHAINS))
    raw.cursor().execute("SELECT 1")  # the worker dropped the pool, closing nothing


def test_blank_lines_anywhere_and_no_newline_at_the_end_verify_alike(
    three: tuple[Ledger, Path, list[bytes]],
) -> None:
    ledger, path, lines = three
    certificate = b'{"certificate":{"signers":[]}}'
    variants = {
        "no newline at the end": [*lines[:-1], lines[-1].rstrip(b"\n")],
        "nor after a certificate": [*lines, certificate],
        "blank first": [b"\n", *lines],
        "blanks between chains": [*lines[:5], b"\n", b" \n", *lines[5:], b"\n"],
        "blank in a chain": [*lines[:3], b"\n", *lines[3:]],
        "only blanks": [b"\n", b"  \n", b"\n"],
    }
    outcomes = {}
    for name, variant in variants.items():
        path.write_bytes(b"".join(variant))
        outcomes[name] = _same(path, ledger)
    assert outcomes["nor after a certificate"][1].startswith(f"{path}:9: certificate: ")
    for name in (
        "no newline at the end",
        "blank first",
        "blanks between chains",
        "blank in a chain",
    ):
        assert outcomes[name][0] == "valid" and outcomes[name][1].entries == 12, name
    assert outcomes["only blanks"][1] == f"{path} holds no roster"


def test_chains_are_shared_out_by_size_the_largest_first_to_the_least_loaded(
    three: tuple[Ledger, Path, list[bytes]],
) -> None:
    _, path, lines = three
    runs = _scan(_mapped_file(path), 3, len(lines[0]) + len(lines[1]))
    size = {
        "hosp-a": sum(map(len, lines[2:5])),
        "hosp-b": len(lines[5]),
        "hosp-c": sum(map(len, lines[6:8])),
    }
    assert runs.size == size and size["hosp-a"] > size["hosp-c"] > size["hosp-b"]
    start = sum(map(len, lines[:2]))
    assert runs.by_chain["hosp-a"] == [(3, start, start + size["hosp-a"])]
    assert [[(chain, number) for chain, number, _, _ in work] for work in _assign(runs, 2)] == [
        [("hosp-a", 3)],
        [("hosp-b", 6), ("hosp-c", 7)],
    ]
    assert [[chain for chain, *_ in work] for work in _assign(runs, 3)] == [
        ["hosp-a"], ["hosp-c"], ["hosp-b"]
    ]  # fmt: skip


def _answers_at_once(results: Any, stop: Any) -> Any:
    return parallel._Outcome(misrouted=1)


def _answers_later(results: Any, stop: Any) -> Any:
    time.sleep(2.5)  # the others have answered and ended by now
    results.put(("progress", 5))
    return parallel._Outcome(misrouted=2)


def _fails(results: Any, stop: Any) -> Any:
    raise KeyError("x")


def _hangs(results: Any, stop: Any) -> Any:
    time.sleep(60)
    return parallel._Outcome()


def test_workers_are_waited_for_while_one_works_and_killed_when_one_fails() -> None:
    context = multiprocessing.get_context("fork")
    before = set(multiprocessing.active_children())
    progressed: list[int] = []
    targets = [(_answers_at_once, ()), (_answers_later, ())]
    outcomes = parallel._run(context, targets, progressed.append)
    assert sorted(o.misrouted for o in outcomes) == [1, 2] and progressed == [5]
    started = time.monotonic()
    with pytest.raises(LedgerError, match=r"^a verifying process failed: KeyError: 'x'$"):
        parallel._run(context, [(_hangs, ()), (_fails, ())], None)
    assert time.monotonic() - started < 30  # waited for a while (5 s), not for its end
    time.sleep(0.5)
    assert set(multiprocessing.active_children()) == before  # the one that hangs was killed


def test_a_line_is_routed_by_its_last_header_and_only_to_a_chain_id(tmp_path: Path) -> None:
    """Routing reads the text of a line as hrx writes it (the header after the entries); a
    line it cannot route ends the part verified by workers."""
    lines = {
        b'{"entries":[{"body":{"a":[1],"header":{"chain":"hosp-b"}}}],"header":{"chain":"hosp-a"'
        b',"height":0},"signature":"AA"}\n': "hosp-a",
        b'{"entries":[],"header":{"chain":"hosp-c"}}\n': "hosp-c",
        '{"entries":[],"header":{"chain":"hösp"}}\n'.encode(): None,
        b'{"entries":[],"header":{"chain":"Hosp"}}\n': None,
        b'{"entries":[],"header":{"chain":""}}\n': None,
        b'{"entries":[],"signature":"AA"}\n': None,
        b'{"header":{"chain":"hosp-a"},"entries":[]}\n': None,
        b'{"entries":[],"header":{"chain":"hosp-ab': None,  # the last line, cut off
    }
    path = tmp_path / "lines.jsonl"
    path.write_bytes(b"".join(lines))
    mapped, start = _mapped_file(path), 0
    for line, chain in lines.items():
        assert parallel._routed_chain(mapped, start, start + len(line)) == chain, line
        start += len(line)


def test_given_certificates_and_watching_reach_the_serial_verification_of_a_misrouted_file(
    ledger_db: Ledger, tmp_path: Path
) -> None:
    path, lines, block = _misrouted(ledger_db, tmp_path, 2)
    assert list(_scan(_mapped_file(path), 3, len(lines[0]) + len(lines[1])).by_chain) == ["hosp-b"]
    given = [test_verify_faults._certificate(8, block, roster=2)]
    watching = {"watch": frozenset({"emergency.access"}), "observe": None}
    kind, summary, chains, observed, _ = _same(path, ledger_db, given=given, **watching)
    assert (kind, chains, summary.given, len(observed)) == ("valid", ["hosp-a", "hosp-b"], [8], 1)


def test_a_line_routed_by_its_text_whose_header_is_no_object_is_misrouted(
    three: tuple[Ledger, Path, list[bytes]],
) -> None:
    ledger, path, lines = three
    odd = b'{"entries":[{"a":[1],"header":{"chain":"hosp-a"}}],"header":5,"signature":"AA"}\n'
    verifier = _rostered(ledger)
    with pytest.raises(Misrouted, match=r"^line 8 holds a block of another chain "):
        verify_line(verifier, path, 8, odd, None, "hosp-a")
    path.write_bytes(b"".join([*lines[:7], odd]))
    assert (
        _same(path, ledger)[1]
        == "malformed header: a block header must be a JSON object, not a number"
    )
