"""Replication between real node processes: members converge on the same heads, a tampered
block is refused, a member that signs two blocks at one height is caught with evidence."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa
from click.testing import CliRunner

from ledger import keys
from ledger.canonical import canonical_bytes
from ledger.model import parse_time
from ledger.store import ChainStore, ChainWriter
from node.base.config import load_config
from node.cli import main
from node.consortium.worker import run
from node.demo.harness import Consortium
from tests.helpers.nodes import Node, serving

MEMBERS = ("hosp-a", "hosp-b", "hosp-c")


def hrx(*args: str) -> None:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output


def append(directory: Path, count: int, label: str = "c") -> None:
    config = load_config(directory)
    store = ChainStore(config.database_url)
    try:
        with ChainWriter(store, config.node_id, keys.load_private_key(config.ed25519_key)) as w:
            for number in range(count):
                w.append(
                    "consent.granted", {"consent_id": f"{label}-{number}", "patient": "ab" * 32}
                )
    finally:
        store.close()


def heads(directory: Path) -> dict[str, str]:
    store = ChainStore(load_config(directory).database_url)
    try:
        return {chain: head.hash for chain, head in store.heads().items()}
    finally:
        store.close()


@pytest.fixture
def consortium(tmp_path: Path) -> Iterator[dict[str, Path]]:
    """Three members joined (no process running): their directories by id."""
    group = Consortium(tmp_path, 3, quorum=2)
    try:
        yield {name: member.directory for name, member in group.members.items()}
    finally:
        group.close()


def serve_all(stack: ExitStack, directories: dict[str, Path]) -> dict[str, Node]:
    return {
        name: stack.enter_context(serving(directory, load_config(directory).port))
        for name, directory in directories.items()
    }


def test_members_converge(consortium: dict[str, Path]) -> None:
    for number, directory in enumerate(consortium.values()):
        append(directory, 30 + 500 * number)
    with ExitStack() as stack:
        serve_all(stack, consortium)
        for directory in consortium.values():
            report = run(directory, 0.1, once=True)
            assert not report.refused and not report.evidence, report
        views = [heads(directory) for directory in consortium.values()]
        assert views[0] == views[1] == views[2] and set(views[0]) == set(MEMBERS)
        # new blocks flow on the next round; nothing twice
        append(consortium["hosp-a"], 5, "late")
        report = run(consortium["hosp-c"], 0.1, once=True)
        assert report.pulled == {"hosp-a": 5}
        assert run(consortium["hosp-c"], 0.1, once=True).pulled == {}
    # what a member stores verifies like the author's own copy
    result = CliRunner().invoke(
        main,
        [
            "audit",
            "verify",
            load_config(consortium["hosp-c"]).database_url,
            "--authority",
            str(consortium["hosp-a"].parent / "authority.pem"),
        ],
    )
    assert result.exit_code == 0 and "3 chain(s)" in result.output, result.output


def test_unreachable_member_is_backed_off_and_others_still_replicate(
    consortium: dict[str, Path],
) -> None:
    for directory in consortium.values():
        append(directory, 10)
    with ExitStack() as stack:
        stack.enter_context(serving(consortium["hosp-a"], load_config(consortium["hosp-a"]).port))
        report = run(consortium["hosp-b"], 0.1, once=True)
        assert "hosp-c" in report.unreachable and report.pulled == {"hosp-a": 10}


def test_tampered_block_is_refused(consortium: dict[str, Path]) -> None:
    append(consortium["hosp-a"], 20)
    with ExitStack() as stack:
        nodes = serve_all(stack, consortium)
        run(consortium["hosp-b"], 0.1, once=True)  # b holds a's chain now
        nodes["hosp-a"].process.terminate()  # type: ignore[union-attr]
        nodes["hosp-a"].process.wait()  # type: ignore[union-attr]
        # b turns malicious: it rewrites an entry of a's chain in its copy
        engine = sa.create_engine(load_config(consortium["hosp-b"]).database_url)
        with engine.begin() as conn:
            conn.execute(sa.text("DROP TRIGGER ledger_entries_no_update"))
            data = conn.execute(
                sa.text("SELECT data FROM ledger_entries WHERE chain = 'hosp-a' AND seq = 3")
            ).scalar_one()
            conn.execute(
                sa.text("UPDATE ledger_entries SET data = :d WHERE chain = 'hosp-a' AND seq = 3"),
                {"d": data.replace(b"c-3", b"c-9")},
            )
        engine.dispose()
        report = run(consortium["hosp-c"], 0.1, once=True)
        assert "hosp-b" in report.refused and "hosp-a" not in heads(consortium["hosp-c"])


def test_equivocation_is_caught(consortium: dict[str, Path], tmp_path: Path) -> None:
    # hosp-a keeps a second copy of its database and signs different blocks in each
    config_a = load_config(consortium["hosp-a"])
    append(consortium["hosp-a"], 3)
    twin = tmp_path / "twin"
    shutil.copytree(consortium["hosp-a"], twin)
    append(consortium["hosp-a"], 4, "honest")
    append(twin, 4, "forked")
    with serving(consortium["hosp-a"], config_a.port):
        run(consortium["hosp-b"], 0.1, once=True)
    with serving(twin, config_a.port):  # the same member, showing c another history
        run(consortium["hosp-c"], 0.1, once=True)
    assert heads(consortium["hosp-b"])["hosp-a"] != heads(consortium["hosp-c"])["hosp-a"]
    with ExitStack() as stack:
        b = stack.enter_context(
            serving(consortium["hosp-b"], load_config(consortium["hosp-b"]).port)
        )
        stack.enter_context(serving(consortium["hosp-c"], load_config(consortium["hosp-c"]).port))
        report = run(consortium["hosp-c"], 0.1, once=True)  # hears b's view of hosp-a
        assert report.evidence and report.evidence[0]["chain"] == "hosp-a"
        assert report.evidence[0]["height"] == 6  # both heads: signed by hosp-a, different
        run(consortium["hosp-b"], 0.1, once=True)
        auditor = {"Authorization": f"Bearer {b.token('auditor', 'auditor')}"}
        assert requests.get(f"{b.base}/healthz").json()["frozen_chains"] == ["hosp-a"]
        served = requests.get(f"{b.base}/ledger/evidence", headers=auditor).json()
        assert len(served) == 1 and served[0]["chain"] == "hosp-a"
        hashes = {h["header"]["tree_root"] for h in served[0]["headers"]}
        assert len(hashes) == 2
        # the auditor finds the fork proven
        export = tmp_path / "b.jsonl"
        CliRunner().invoke(
            main, ["ledger", "export", "--dir", str(consortium["hosp-b"]), "--out", str(export)]
        )
        verdict = CliRunner().invoke(main, ["audit", "verify", str(export)])
        assert verdict.exit_code == 1 and "FORK PROVEN: chain hosp-a" in verdict.output
        assert verdict.output.startswith("INVALID: fork proven: chain hosp-a"), verdict.output
        # the chain is frozen: nothing more of it is accepted
        append(consortium["hosp-a"], 2, "after")
        with serving(consortium["hosp-a"], config_a.port):
            assert "hosp-a" not in run(consortium["hosp-b"], 0.1, once=True).pulled


def test_checkpoints_are_cosigned(consortium: dict[str, Path]) -> None:
    from ledger import bls
    from ledger.checkpoint import make_checkpoint, verify_certificate
    from ledger.roster import open_roster
    from node.consortium.checkpoints import CheckpointProposer
    from node.consortium.worker import replicator_for

    for directory in consortium.values():
        append(directory, 12)
    with ExitStack() as stack:
        nodes = serve_all(stack, consortium)
        for directory in consortium.values():
            run(directory, 0.1, once=True)
        config = load_config(consortium["hosp-b"])
        store = ChainStore(config.database_url)
        try:
            peers = replicator_for(config, store).peers
            # certify as soon as one block is new (the rounds above may have certified already)
            eager = dataclasses.replace(config, epoch_blocks=1)
            proposer = CheckpointProposer(eager, store, peers)  # type: ignore[arg-type]
            append(consortium["hosp-b"], 1, "new")
            for directory in consortium.values():
                run(directory, 0.1, once=True)
            epoch = int(time.time()) + 1  # a slot just ahead in which hosp-b (1 of 3) proposes
            epoch += (1 - epoch % 3) % 3
            certificate = proposer.maybe_propose(epoch * config.slot_seconds + 0.5)
            assert certificate is not None
            assert certificate["signers"] == ["hosp-a", "hosp-b", "hosp-c"]
            assert set(certificate["checkpoint"]["heads"]) == set(MEMBERS)
            assert proposer.maybe_propose(epoch * config.slot_seconds + 0.9) is None  # once
            # not its turn
            assert proposer.maybe_propose((epoch + 1) * config.slot_seconds) is None
            # when a checkpoint is due: by blocks, or by time once the chains have grown
            patient = CheckpointProposer(
                dataclasses.replace(config, epoch_blocks=10**6),
                store,
                peers,  # type: ignore[arg-type]
            )
            assert not patient.due(store.heads(), time.time())  # nothing new: never due
            append(consortium["hosp-b"], 1, "newer")
            certified_at = parse_time(certificate["checkpoint"]["time"]).timestamp()
            assert not patient.due(store.heads(), certified_at + 1)
            assert patient.due(store.heads(), certified_at + config.epoch_seconds + 1)
            assert proposer.due(store.heads(), certified_at + 1)  # epoch_blocks=1
            rosters = {
                body["version"]: open_roster(body, signature, None)
                for body, signature in store.rosters()
            }
            # every member stored it, and serves it
            auditor = {"Authorization": f"Bearer {nodes['hosp-c'].token('auditor', 'auditor')}"}
            served = requests.get(
                f"{nodes['hosp-c'].base}/ledger/checkpoints/{epoch}", headers=auditor
            ).json()
            assert served == certificate
            assert verify_certificate(served, rosters)["epoch"] == epoch
            # the rounds above certified the current epoch too: "latest" is the newest
            latest = requests.get(
                f"{nodes['hosp-c'].base}/ledger/checkpoints/latest", headers=auditor
            ).json()
            assert latest["checkpoint"]["epoch"] >= epoch
            verify_certificate(latest, rosters)
            # a member signs one checkpoint per epoch, and only heads it has verified
            other = make_checkpoint(epoch, 1, {})
            from ledger.errors import PeerUnavailable

            with pytest.raises(PeerUnavailable, match="already signed another"):
                peers.post("hosp-a", "/peer/checkpoints/sign", other)  # type: ignore[attr-defined]
            # only the slot's proposer may ask, and only for a slot near now
            with pytest.raises(PeerUnavailable, match="is hosp-c's to propose"):
                peers.post(  # type: ignore[attr-defined]
                    "hosp-a", "/peer/checkpoints/sign", make_checkpoint(epoch + 1, 1, {})
                )
            with pytest.raises(PeerUnavailable, match="not near the current slot"):
                peers.post(  # type: ignore[attr-defined]
                    "hosp-a", "/peer/checkpoints/sign", make_checkpoint(epoch + 3000, 1, {})
                )
            append(consortium["hosp-b"], 1, "unseen")
            ahead = make_checkpoint(epoch + 3, 1, store.heads())
            with pytest.raises(PeerUnavailable, match="not yet verified"):
                peers.post("hosp-a", "/peer/checkpoints/sign", ahead)  # type: ignore[attr-defined]
            # a certificate with too few or wrong signers is refused
            forged = dict(certificate, signers=["hosp-a"])
            with pytest.raises(PeerUnavailable, match="quorum"):
                peers.post("hosp-c", "/peer/checkpoints", forged)  # type: ignore[attr-defined]
            wrong = dict(
                certificate, signature=bls.sign(bls.generate_secret_key(b"x" * 32), b"other").hex()
            )
            with pytest.raises(PeerUnavailable, match="does not verify"):
                peers.post("hosp-c", "/peer/checkpoints", wrong)  # type: ignore[attr-defined]
            # the auditor: from an export of a member's directory, and from its URL
            authority = str(consortium["hosp-a"].parent / "authority.pem")
            export = consortium["hosp-a"].parent / "c.jsonl"
            exported = CliRunner().invoke(
                main, ["ledger", "export", "--dir", str(consortium["hosp-c"]), "--out", str(export)]
            )
            assert exported.exit_code == 0, exported.output
            for target in (str(export), nodes["hosp-c"].base):
                verdict = CliRunner().invoke(
                    main,
                    [
                        "audit",
                        "verify",
                        target,
                        "--authority",
                        authority,
                        "--token",
                        nodes["hosp-c"].token("auditor", "auditor"),
                    ],
                )
                assert verdict.exit_code == 0, verdict.output
                assert "certified up to height" in verdict.output
                assert "checkpoint certificate(s) verified" in verdict.output
            no_token = CliRunner().invoke(main, ["audit", "verify", nodes["hosp-c"].base])
            assert no_token.exit_code == 2 and "--token" in no_token.output
            # a copy cut short (a chain's certified tail block gone, and every certificate)
            # verifies as far as it goes, says it cannot prove its tail, and is caught with a
            # certificate obtained elsewhere
            newest = requests.get(
                f"{nodes['hosp-c'].base}/ledger/checkpoints/latest", headers=auditor
            ).json()
            height = newest["checkpoint"]["heads"]["hosp-b"]["height"]
            cut = consortium["hosp-a"].parent / "cut.jsonl"
            kept = [
                line
                for line in export.read_text().splitlines()
                if '"certificate"' not in line
                and not ('"chain":"hosp-b"' in line and f'"height":{height},' in line)
                and not ('"chain":"hosp-b"' in line and f'"height":{height + 1},' in line)
            ]
            cut.write_text("\n".join(kept) + "\n")
            copy = CliRunner().invoke(main, ["audit", "verify", str(cut), "--authority", authority])
            assert copy.exit_code == 0 and copy.output.startswith("VALID"), copy.output
            assert "cannot prove that nothing was cut off its end" in copy.output
            saved = consortium["hosp-a"].parent / "latest.json"
            saved.write_text(json.dumps(newest))
            for given in (str(saved), nodes["hosp-a"].base):
                caught = CliRunner().invoke(
                    main,
                    [
                        "audit",
                        "verify",
                        str(cut),
                        "--authority",
                        authority,
                        "--checkpoint",
                        given,
                        "--token",
                        nodes["hosp-a"].token("auditor", "auditor"),
                    ],
                )
                assert caught.exit_code == 1, caught.output
                assert caught.output.startswith("INVALID: given checkpoint 1"), caught.output
                assert f"certifies height {height}, but this copy ends at height" in caught.output
            whole = CliRunner().invoke(
                main,
                [
                    "audit",
                    "verify",
                    str(export),
                    "--authority",
                    authority,
                    "--checkpoint",
                    str(saved),
                ],
            )
            assert whole.exit_code == 0, whole.output
            assert f"checkpoint epoch(s) {newest['checkpoint']['epoch']}" in whole.output
        finally:
            store.close()


def test_a_new_member_catches_up_100k_entries(consortium: dict[str, Path]) -> None:
    config = load_config(consortium["hosp-a"])
    store = ChainStore(config.database_url)
    try:
        with ChainWriter(store, "hosp-a", keys.load_private_key(config.ed25519_key)) as writer:
            for start in range(0, 100_000, 1000):
                writer.append_many(
                    [
                        ("access.requested", {"request_id": f"r-{n}", "patient": "ab" * 32})
                        for n in range(start, start + 1000)
                    ]
                )
    finally:
        store.close()
    with serving(consortium["hosp-a"], config.port):
        report = run(consortium["hosp-b"], 0.1, once=True)
    assert report.pulled == {"hosp-a": 100_000}
    assert heads(consortium["hosp-b"])["hosp-a"] == heads(consortium["hosp-a"])["hosp-a"]


def test_blocks_signed_with_a_rotated_key_are_refused(
    consortium: dict[str, Path], tmp_path: Path
) -> None:
    from ledger import bls
    from ledger.roster import make_member

    root = consortium["hosp-a"].parent
    config_a = load_config(consortium["hosp-a"])
    append(consortium["hosp-a"], 3)
    twin = tmp_path / "twin"  # hosp-a's old key and database, kept by whoever stole them
    shutil.copytree(consortium["hosp-a"], twin)
    # hosp-a rotates its key: roster version 2 gives it a new one
    config_a.ed25519_key.unlink()
    new_key = keys.load_or_create_private_key(config_a.ed25519_key)
    member = make_member(
        "hosp-a", "医院 hosp-a", config_a.url, new_key, bls.read_secret_key(config_a.bls_key)
    )
    old = json.loads((consortium["hosp-a"] / "enrollment.json").read_text())
    member["replaces"] = {"ed25519": old["ed25519"], "bls": old["bls"]}  # a rotation
    (consortium["hosp-a"] / "enrollment.json").write_bytes(canonical_bytes(member))
    hrx(
        "consortium",
        "roster",
        "--authority-key",
        str(root / "authority.pem"),
        "--quorum",
        "2",
        "--previous",
        str(root / "roster.json"),
        "--out",
        str(root / "roster-2.json"),
        str(consortium["hosp-a"] / "enrollment.json"),
    )
    for directory in consortium.values():
        hrx("node", "join", "--dir", str(directory), "--roster", str(root / "roster-2.json"))
    append(consortium["hosp-a"], 2, "rotated")  # signed with the new key under version 2
    append(twin, 4, "stolen")  # signed with the old key under version 1
    with serving(twin, config_a.port):
        report = run(consortium["hosp-c"], 0.1, once=True)
    assert "hosp-a" in report.refused and "no longer lists" in report.refused["hosp-a"]
    assert "hosp-a" not in heads(consortium["hosp-c"])
    with serving(consortium["hosp-a"], config_a.port):
        report = run(consortium["hosp-c"], 0.1, once=True)
    assert report.pulled == {"hosp-a": 5}, report  # the old blocks, and the new key's


def certify(directories: dict[str, Path], signers: list[str], chain: str) -> dict[str, object]:
    """A certificate of ``chain``'s head as the first signer holds it, signed by ``signers``."""
    from ledger import bls
    from ledger.checkpoint import make_certificate, make_checkpoint, sign

    store = ChainStore(load_config(directories[signers[0]]).database_url)
    try:
        roster = store.roster()
        checkpoint = make_checkpoint(
            int(time.time()), roster.version, {chain: store.heads()[chain]}
        )
    finally:
        store.close()
    signatures = {
        signer: sign(checkpoint, bls.read_secret_key(load_config(directories[signer]).bls_key))
        for signer in signers
    }
    return make_certificate(checkpoint, signatures)


def test_an_ordinary_member_takes_no_chain_that_conflicts_with_the_certified_head(
    tmp_path: Path,
) -> None:
    """hosp-d and hosp-e, ordinary members, need hosp-a's chain for a decision. hosp-a lies:
    to hosp-d it serves another history than the certified one, to hosp-e an older state than
    certified. Each refuses and takes the chain from a witness, up to the certified head."""
    from node.consortium.worker import replicator_for

    group = Consortium(tmp_path / "group", 5, quorum=2, witnesses=["hosp-a", "hosp-b", "hosp-c"])
    try:
        dirs = {name: member.directory for name, member in group.members.items()}
        append(dirs["hosp-a"], 3)
        stale = tmp_path / "stale"
        shutil.copytree(dirs["hosp-a"], stale)  # hosp-a before its next blocks
        forked = tmp_path / "forked"
        shutil.copytree(dirs["hosp-a"], forked)
        append(dirs["hosp-a"], 4, "honest")
        append(forked, 5, "forked")  # other blocks at the same heights, and one more
        port_a = load_config(dirs["hosp-a"]).port
        with serving(dirs["hosp-a"], port_a):
            run(dirs["hosp-b"], 0.1, once=True)  # the witness holds the honest chain
        honest = heads(dirs["hosp-a"])["hosp-a"]
        certificate = certify(dirs, ["hosp-b", "hosp-c"], "hosp-a")
        port_b = load_config(dirs["hosp-b"]).port
        for member, liar, words in (
            (
                "hosp-d",
                forked,
                "its block of chain hosp-a at height 6 is not the one the latest "
                "checkpoint certificate certifies",
            ),
            (
                "hosp-e",
                stale,
                "holds chain hosp-a up to height 2, behind its certified head at height 6",
            ),
        ):
            config = load_config(dirs[member])
            store = ChainStore(config.database_url)
            assert store.add_certificate(certificate)
            replicator = replicator_for(config, store)
            with serving(liar, port_a):
                failed = replicator.sync_chains(["hosp-a"])  # no witness to turn to
            assert words in failed["hosp-a"], failed
            held = store.heads().get("hosp-a")
            assert held is None or held.header["height"] < 6  # nothing conflicting is held
            with serving(liar, port_a), serving(dirs["hosp-b"], port_b):
                failed = replicator.sync_chains(["hosp-a"], ["hosp-b"])
            assert words in failed["hosp-a"], failed
            assert failed["hosp-a"].endswith("; taken from hosp-b"), failed
            assert store.heads()["hosp-a"].hash == honest  # the certified state, no other
            store.close()
    finally:
        group.close()


def test_a_sync_stops_asking_for_pages_when_its_time_runs_out(tmp_path: Path) -> None:
    """A chain taken whole for a decision can be long: no new page is asked for after the
    decision's time for syncing; what was stored stays, and the next sync goes on."""
    from node.consortium.worker import replicator_for

    group = Consortium(tmp_path / "group", 4, quorum=2, witnesses=["hosp-a", "hosp-b", "hosp-c"])
    try:
        dirs = {name: member.directory for name, member in group.members.items()}
        append(dirs["hosp-a"], 450)  # 450 blocks: three pages of 200
        config = load_config(dirs["hosp-d"])
        store = ChainStore(config.database_url)
        replicator = replicator_for(config, store)
        with serving(dirs["hosp-a"], load_config(dirs["hosp-a"]).port):
            failed = replicator.sync_chains(["hosp-a"], seconds=0)
            assert failed == {
                "hosp-a": "still taking chain hosp-a from hosp-a: held up to height -1 when the "
                "time for syncing ran out (the next sync goes on from there)"
            }
            assert store.head("hosp-a") is None
            assert replicator.sync_chains(["hosp-a"], seconds=60) == {}
        assert store.head("hosp-a").header["height"] == 449  # type: ignore[union-attr]
        store.close()
    finally:
        group.close()
