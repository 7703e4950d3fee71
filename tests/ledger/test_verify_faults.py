"""The verifier's verdicts on what comes beside the blocks, in the words an auditor reads: fork
evidence (and the authority's resolution of a fork), checkpoint certificates (from the ledger,
and given from elsewhere), roster versions, the warnings of a finished verification, and a chain
resumed from a stored head as replication does it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from ledger import keys, merkle
from ledger.canonical import canonical_bytes
from ledger.checkpoint import make_certificate, make_checkpoint, sign
from ledger.errors import VerificationError
from ledger.model import block_hash
from ledger.resolution import make_resolution, sign_resolution
from ledger.roster import make_member, make_roster, sign_roster
from ledger.store import ChainWriter, Head
from ledger.verify import ChainSummary, Emergency, Verifier, verify_database, verify_export
from tests.helpers.ledgers import BLS_KEY, Ledger, rows_changeable, signed_block


def _fill(ledger: Ledger, blocks: int = 3) -> list[dict[str, Any]]:
    """``blocks`` blocks of two entries each on hosp-a; the blocks as an export holds them."""
    with ChainWriter(ledger.store, "hosp-a", ledger.key) as writer:
        for n in range(blocks):
            writer.append_many([("access.requested", {"n": n}), ("access.decided", {"n": n})])
    return [json.loads(line) for line in ledger.store.export_lines() if b'"header"' in line]


def _verifier(ledger: Ledger, **options: Any) -> Verifier:
    verifier = Verifier(ledger.authority.public_key(), **options)
    for roster, signature in ledger.store.rosters():
        verifier.add_roster(roster, signature, check_possession=False)
    return verifier


def _feed(verifier: Verifier, blocks: list[dict[str, Any]]) -> None:
    for block in blocks:
        verifier.add_block(block["header"], block["signature"], block["entries"])


def _signed(ledger: Ledger, header: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """``header`` with ``changes``, validly signed by the chain's key (as a member that signs
    two blocks at one height does)."""
    changed = {**header, **changes}
    return {
        "header": changed,
        "signature": keys.sign(ledger.key, keys.BLOCK_DOMAIN, block_hash(changed)),
    }


def _evidence(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    return {
        "chain": first["header"]["chain"],
        "height": first["header"]["height"],
        "headers": [first, second],
        "source": "test",
    }


def _certificate(epoch: int, *signed: dict[str, Any], roster: int = 1) -> dict[str, Any]:
    """hosp-a's (the quorum of one) certificate of the blocks ``signed``, a head per chain."""
    heads = {s["header"]["chain"]: Head(s["header"], s["signature"]) for s in signed}
    checkpoint = make_checkpoint(epoch, roster, heads)
    return make_certificate(checkpoint, {"hosp-a": sign(checkpoint, BLS_KEY)})


# -- fork evidence ---------------------------------------------------------------------------


def test_fork_evidence_is_reported_and_the_authoritys_resolution_settles_it(
    ledger_db: Ledger,
) -> None:
    blocks = _fill(ledger_db)
    ours = {"header": blocks[1]["header"], "signature": blocks[1]["signature"]}
    theirs = _signed(ledger_db, ours["header"], tree_root="ab" * 32)
    evidence = _evidence(ours, theirs)
    fork = "chain hosp-a signed two different blocks at height 1"

    verifier = _verifier(ledger_db)
    verifier.add_evidence(evidence)
    assert (verifier.summary.forks, verifier.summary.resolved) == ([fork], [])

    def resolution(height: int, keep: dict[str, Any]) -> dict[str, Any]:
        body = make_resolution("hosp-a", height, block_hash(keep["header"]).hex())
        return sign_resolution(body, ledger_db.authority)

    # Resolutions of another height, or keeping a third block, do not settle it; of two that
    # do, the first given is named.
    resolutions = [
        resolution(2, ours),
        resolution(1, _signed(ledger_db, ours["header"], tree_root="cd" * 32)),
        resolution(1, theirs),
        resolution(1, ours),
    ]
    settled = _verifier(ledger_db, resolutions=resolutions)
    settled.add_evidence(evidence)
    kept = block_hash(theirs["header"]).hex()
    assert settled.summary.forks == []
    assert settled.summary.resolved == [f"{fork}; the authority's resolution keeps {kept}"]
    unsettled = _verifier(ledger_db, resolutions=resolutions[:2])
    unsettled.add_evidence(evidence)
    assert (unsettled.summary.forks, unsettled.summary.resolved) == ([fork], [])

    with pytest.raises(VerificationError) as caught:
        Verifier(None, resolutions=resolutions)
    assert caught.value.what == "a resolution is checked against the authority's key: give it"


def test_fork_evidence_that_does_not_hold_is_refused_in_words(ledger_db: Ledger) -> None:
    blocks = _fill(ledger_db)
    ours = {"header": blocks[1]["header"], "signature": blocks[1]["signature"]}
    theirs = _signed(ledger_db, ours["header"], tree_root="ab" * 32)
    unknown_roster = _signed(ledger_db, ours["header"], roster=7)
    not_a_member = _signed(ledger_db, ours["header"], chain="hosp-z")
    higher = {"header": blocks[2]["header"], "signature": blocks[2]["signature"]}
    forged = {**theirs, "signature": ours["signature"]}
    cases: list[tuple[Any, str]] = [
        ({**_evidence(ours, theirs), "headers": None}, "holds two signed headers"),
        ({**_evidence(ours, theirs), "headers": [ours]}, "holds two signed headers"),
        (
            {**_evidence(ours, theirs), "headers": [ours, theirs, theirs]},
            "holds two signed headers",
        ),
        ({"chain": "hosp-a", "height": 1}, "does not hold: 'headers'"),
        (_evidence(ours, {"signature": theirs["signature"]}), "does not hold: 'header'"),
        (_evidence(ours, {"header": theirs["header"]}), "does not hold: 'signature'"),
        (
            _evidence(ours, {**theirs, "header": {**theirs["header"], "count": 0}}),
            "does not hold: a block holds at least one entry",
        ),
        (_evidence(ours, forged), "does not hold: Ed25519 signature does not verify"),
        (
            _evidence(ours, unknown_roster),
            "does not hold: chain hosp-a, block height 1: names roster version 7, which is not "
            "given",
        ),
        (
            _evidence(ours, not_a_member),
            "does not hold: chain hosp-z, block height 1: 'hosp-z' is not a member in roster "
            "version 1",
        ),
        (_evidence(ours, ours), "fork evidence: not two different blocks of one height"),
        (_evidence(ours, higher), "fork evidence: not two different blocks of one height"),
    ]
    for evidence, words in cases:
        verifier = _verifier(ledger_db)  # a new one each time: no member key cached
        with pytest.raises(VerificationError) as caught:
            verifier.add_evidence(evidence)
        what = caught.value.what
        if "does not hold" in words or "two signed" in words:
            assert what.startswith("fork evidence does not hold: "), what
        assert what.endswith(words), what
        assert caught.value.chain is None and caught.value.height is None
        assert verifier.summary.forks == [] and verifier.summary.resolved == []


# -- checkpoint certificates ----------------------------------------------------------------


def test_certificates_record_what_they_cover_newest_epoch_first(ledger_db: Ledger) -> None:
    blocks = _fill(ledger_db)
    verifier = _verifier(ledger_db)
    _feed(verifier, blocks)
    verifier.add_certificate(_certificate(5, blocks[2]))
    assert verifier.summary.covered == {"hosp-a": (5, 2)}
    verifier.add_certificate(_certificate(3, blocks[1]))  # older: covers less
    assert verifier.summary.covered == {"hosp-a": (5, 2)}
    verifier.add_certificate(_certificate(9, blocks[0]), given=True)
    assert verifier.summary.covered == {"hosp-a": (9, 0)}
    verifier.add_certificate(_certificate(9, blocks[2]))  # a second of one epoch: not newer
    assert verifier.summary.covered == {"hosp-a": (9, 0)}
    assert (verifier.summary.certificates, verifier.summary.given) == ([5, 3, 9], [9])


def test_a_certificate_the_copy_cannot_match_is_refused_in_words(ledger_db: Ledger) -> None:
    blocks = _fill(ledger_db)
    verifier = _verifier(ledger_db)
    _feed(verifier, blocks[:2])  # the copy ends at height 1
    certificate = _certificate(4, blocks[2])
    with pytest.raises(VerificationError) as caught:
        verifier.add_certificate(certificate)
    assert str(caught.value) == (
        "chain hosp-a: certificate of epoch 4 certifies height 2, but this copy ends at height "
        "1: blocks the consortium certified are missing from it (cut off, or the copy is older "
        "than the certificate)"
    )
    assert (caught.value.chain, caught.value.height) == ("hosp-a", None)

    other = _signed(ledger_db, blocks[1]["header"], tree_root="ab" * 32)
    with pytest.raises(VerificationError) as caught:
        verifier.add_certificate(_certificate(6, other))
    assert str(caught.value) == (
        "chain hosp-a, block height 1: certificate of epoch 6 certifies another block at "
        "height 1: a fork the quorum signed"
    )

    empty = _verifier(ledger_db)
    with pytest.raises(VerificationError) as caught:
        empty.add_certificate(certificate)
    assert str(caught.value) == (
        "chain hosp-a: certificate of epoch 4 certifies height 2, but this copy does not hold "
        "it: blocks the consortium certified are missing from it (cut off, or the copy is older "
        "than the certificate)"
    )

    with pytest.raises(VerificationError) as caught:
        verifier.add_certificate(_certificate(7, blocks[0], roster=2))
    assert str(caught.value) == (
        "certificate: certificate of epoch 7 names roster version 2, which is not known"
    )
    assert verifier.summary.certificates == [] and verifier.summary.covered == {}


# -- rosters, and the warnings of a finished verification -------------------------------------


def test_roster_versions_come_in_order_and_before_blocks(ledger_db: Ledger) -> None:
    ((roster, signature),) = ledger_db.store.rosters()
    verifier = Verifier(ledger_db.authority.public_key())
    verifier.add_roster(roster, signature)
    with pytest.raises(VerificationError) as caught:
        verifier.add_roster(roster, signature)
    assert caught.value.what == "roster version 1 does not follow version 1"
    with pytest.raises(VerificationError) as caught:
        verifier.add_roster([roster], signature)
    assert caught.value.what.startswith("roster version None: ")
    _feed(verifier, _fill(ledger_db, 1))
    second = make_roster("test", roster["members"], quorum=1, version=2)
    with pytest.raises(VerificationError) as caught:
        verifier.add_roster(second, sign_roster(second, ledger_db.authority))
    assert caught.value.what == "roster version 2 comes after blocks"
    assert verifier.rosters.keys() == {1} and verifier.summary.rosters == [1]


def test_a_chain_signed_under_a_replaced_roster_is_warned_of(
    ledger_db: Ledger, tmp_path: Path
) -> None:
    blocks = _fill(ledger_db, 1)
    ((roster, signature),) = ledger_db.store.rosters()
    rekeyed = make_member(
        "hosp-a", "Hospital hosp-a", "https://hosp-a.example",
        keys.load_or_create_private_key(tmp_path / "new.pem"), BLS_KEY,
    )  # fmt: skip
    other = make_member(
        "hosp-b", "Hospital hosp-b", "https://hosp-b.example",
        keys.load_or_create_private_key(tmp_path / "b.pem"), BLS_KEY,
    )  # fmt: skip
    for members, warning in (
        ([rekeyed], "roster version 2 gives it another key"),
        ([other], "roster version 2 no longer lists it"),
        ([*roster["members"], other], None),
    ):
        newer = make_roster("test", members, quorum=1, version=2)
        verifier = Verifier(ledger_db.authority.public_key())
        verifier.add_roster(roster, signature, check_possession=False)
        verifier.add_roster(newer, sign_roster(newer, ledger_db.authority), check_possession=False)
        _feed(verifier, blocks)
        summary = verifier.finish()
        assert summary.rosters == [1, 2]
        assert summary.warnings == (
            [f"chain hosp-a: its newest block is signed under roster version 1, and {warning}"]
            if warning
            else []
        )


# -- a chain resumed from a stored head (replication) ----------------------------------------


def test_a_resumed_chain_continues_from_its_stored_head(ledger_db: Ledger) -> None:
    blocks = _fill(ledger_db)
    head = blocks[1]["header"]
    leaves = merkle.leaf_hashes([canonical_bytes(e) for b in blocks[:2] for e in b["entries"]])
    assert len(leaves) == head["tree_size"] == 4
    frontier = merkle.Frontier()
    frontier.extend(leaves)

    verifier = _verifier(ledger_db)
    verifier.resume(head, frontier)
    assert verifier.summary.chains == {
        "hosp-a": ChainSummary(
            blocks=0,
            entries=0,
            height=1,
            head_hash=block_hash(head).hex(),
            tree_root=head["tree_root"],
            time=head["time"],
            roster=1,
        )
    }
    _feed(verifier, blocks[2:])
    summary = verifier.finish()
    assert summary.chains["hosp-a"] == ChainSummary(
        blocks=1,
        entries=2,
        height=2,
        head_hash=block_hash(blocks[2]["header"]).hex(),
        tree_root=blocks[2]["header"]["tree_root"],
        time=blocks[2]["header"]["time"],
        roster=1,
    )
    assert summary.warnings == []

    # Resumed from another head, the next block does not follow.
    stray = _verifier(ledger_db)
    stray.resume(blocks[0]["header"], merkle.Frontier())
    with pytest.raises(VerificationError) as caught:
        _feed(stray, blocks[2:])
    assert str(caught.value) == "chain hosp-a, block height 2: expected height 1"
    wrong = _verifier(ledger_db)
    wrong.resume(_signed(ledger_db, head, tree_root="ab" * 32)["header"], frontier.copy())
    with pytest.raises(VerificationError, match=r"^chain hosp-a, block height 2: prev \w+ is not"):
        _feed(wrong, blocks[2:])


# -- certificates and evidence in an export, a database, and given from elsewhere -----------


def test_certificates_and_evidence_are_read_from_export_and_database(
    ledger_db: Ledger, tmp_path: Path
) -> None:
    blocks = _fill(ledger_db)
    ours = {"header": blocks[1]["header"], "signature": blocks[1]["signature"]}
    theirs = _signed(ledger_db, ours["header"], tree_root="ab" * 32)
    ledger_db.store.add_certificate(_certificate(2, blocks[1]))
    ledger_db.store.add_evidence(_evidence(ours, theirs))
    export = tmp_path / "e.jsonl"
    export.write_bytes(b"".join(line + b"\n" for line in ledger_db.store.export_lines()))
    given = [_certificate(8, blocks[2])]
    anchor = ledger_db.authority.public_key()
    for summary in (
        verify_database(ledger_db.store, anchor, given=given),
        verify_export(export, anchor, given=given),
    ):
        assert (summary.certificates, summary.given) == ([2], [8])
        assert summary.covered == {"hosp-a": (8, 2)}
        assert summary.forks == ["chain hosp-a signed two different blocks at height 1"]

    # A given certificate the copy does not reach is named by its place among those given.
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(b"".join(export.read_bytes().splitlines(keepends=True)[:3]))
    with pytest.raises(VerificationError) as caught:
        verify_export(cut, anchor, given=[_certificate(2, blocks[1]), *given])
    assert str(caught.value) == (
        "given checkpoint 2: chain hosp-a: certificate of epoch 8 certifies height 2, but this "
        "copy ends at height 1: blocks the consortium certified are missing from it (cut off, "
        "or the copy is older than the certificate)"
    )
    with pytest.raises(VerificationError) as caught:
        verify_database(ledger_db.store, anchor, given=[_certificate(8, theirs)])
    assert caught.value.what.startswith("given checkpoint 1: chain hosp-a, block height 1: ")


def test_only_a_chain_under_a_replaced_key_is_warned_of_among_several(
    ledger_db: Ledger, tmp_path: Path
) -> None:
    """hosp-a signs under the newest roster, hosp-b's newest block under the one before."""
    ((roster, _),) = ledger_db.store.rosters()
    store = ledger_db.store
    b_key = keys.load_or_create_private_key(tmp_path / "b.pem")

    def add_roster(version: int, b_signing: Any) -> None:
        member = make_member(
            "hosp-b", "Hospital hosp-b", "https://hosp-b.example", b_signing, BLS_KEY
        )
        body = make_roster("test", [*roster["members"], member], quorum=1, version=version)
        store.add_roster(body, sign_roster(body, ledger_db.authority))

    add_roster(2, b_key)
    with ChainWriter(store, "hosp-b", b_key) as writer:
        writer.append("access.requested", {"n": 0})
    add_roster(3, keys.load_or_create_private_key(tmp_path / "b2.pem"))
    with ChainWriter(store, "hosp-a", ledger_db.key) as writer:
        writer.append("access.requested", {"n": 0})
    summary = verify_database(store, ledger_db.authority.public_key())
    assert list(summary.chains) == ["hosp-a", "hosp-b"]
    assert summary.warnings == [
        "chain hosp-b: its newest block is signed under roster version 2, and roster version 3 "
        "gives it another key"
    ]


def test_a_roster_whose_proof_of_possession_fails_is_refused(
    ledger_db: Ledger, tmp_path: Path
) -> None:
    from ledger import bls

    ((roster, _),) = ledger_db.store.rosters()
    other = bls.generate_secret_key(b"another-bls-key".ljust(32, b"\0"))
    members = [{**roster["members"][0], "bls_pop": bls.prove_possession(other).hex()}]
    body = make_roster("test", members, quorum=1)
    export = tmp_path / "e.jsonl"
    line = {"roster": body, "signature": sign_roster(body, ledger_db.authority)}
    export.write_text(json.dumps(line) + "\n")
    with pytest.raises(VerificationError) as caught:
        verify_export(export, ledger_db.authority.public_key())
    assert caught.value.what == (
        "roster version 1: roster member hosp-a: BLS proof of possession does not verify"
    )
    # a node's own replicas were checked when it installed them: it may skip the proofs
    verifier = Verifier(ledger_db.authority.public_key())
    verifier.add_roster(body, line["signature"], check_possession=False)
    assert verifier.summary.rosters == [1]


def test_break_glass_accesses_name_their_time_and_an_unknown_requester(
    ledger_db: Ledger,
) -> None:
    with ChainWriter(ledger_db.store, "hosp-a", ledger_db.key) as writer:
        writer.append("access.requested", {"n": 0})
        writer.append_many(
            [
                ("emergency.access", {"request_id": "r1"}),
                ("emergency.access", {"request_id": "r2", "requester_org": ["hosp-b"]}),
                ("emergency.access", {"request_id": "r3", "requester_org": "hosp-c"}),
            ]
        )
    (block,) = [json.loads(b) for b in ledger_db.store.export_lines() if b'"emergency' in b]
    time = [entry["time"] for entry in block["entries"]]
    summary = verify_database(ledger_db.store, ledger_db.authority.public_key())
    assert summary.emergencies == [
        Emergency("hosp-a", 1, time[0], "?"),
        Emergency("hosp-a", 2, time[1], "?"),
        Emergency("hosp-a", 3, time[2], "hosp-c"),
    ]


def test_an_export_reports_progress_and_says_what_it_cannot_read(
    ledger_db: Ledger, tmp_path: Path
) -> None:
    _fill(ledger_db)
    export = tmp_path / "e.jsonl"
    export.write_bytes(b"".join(line + b"\n" for line in ledger_db.store.export_lines()))
    from_export: list[int] = []
    verify_export(export, ledger_db.authority.public_key(), from_export.append)
    from_database: list[int] = []
    verify_database(ledger_db.store, ledger_db.authority.public_key(), from_database.append)
    assert from_export == from_database == [2, 2, 2]  # entries, block by block

    missing = tmp_path / "missing.jsonl"
    with pytest.raises(VerificationError) as caught:
        verify_export(missing, None)
    assert caught.value.what == f"cannot read {missing}: No such file or directory"
    blank = tmp_path / "blank.jsonl"
    blank.write_bytes(b"\n \n")
    with pytest.raises(VerificationError) as caught:
        verify_export(blank, None)
    assert caught.value.what == f"{blank} holds no roster"


# -- a member's own faults: blocks validly signed over entries that break the format ---------

BLOCK_TIME = "2026-11-22T09:30:00.000Z"


def _entry(number: int, **changes: Any) -> dict[str, Any]:
    entry = {
        "v": 1,
        "chain": "hosp-a",
        "seq": number,
        "type": "access.requested",
        "time": "2026-11-22T09:29:59.000Z",
        "body": {"n": number},
    }
    return {**entry, **changes}


def _stored_nodes(datas: list[bytes], frontier: merkle.Frontier | None = None) -> list[bytes]:
    """The Merkle subtree hashes a database stores beside each entry row."""
    frontier = frontier or merkle.Frontier()
    return [b"".join(frontier.append(merkle.leaf_hash(data))) for data in datas]


SECOND_ENTRY_FAULTS: list[tuple[Any, str]] = [
    ({**_entry(1), "extra": 1}, "malformed entry: fields ['body', 'chain', 'extra', 'seq', "
     "'time', 'type', 'v']"),
    ({k: v for k, v in _entry(1).items() if k != "v"}, "malformed entry: fields ['body', "
     "'chain', 'seq', 'time', 'type']"),
    ("oops", "malformed entry: fields str"),
    (_entry(1, seq=True), "entry says seq True where seq 1 belongs"),
    (_entry(1, seq=5), "entry says seq 5 where seq 1 belongs"),
    (_entry(1, chain="hosp-b"), "entry says chain 'hosp-b'"),
    (_entry(1, v=True), "entry version True"),
    (_entry(1, v=2), "entry version 2"),
    (_entry(1, type="Access.Requested"), "entry type 'Access.Requested' is not dotted lowercase "
     "words"),
    (_entry(1, type=5), "entry type 5 is not dotted lowercase words"),
    (_entry(1, body=[1]), "entry body is not a JSON object"),
    (_entry(1, time="2026-11-22T09:30:00.001Z"), "entry time 2026-11-22T09:30:00.001Z is after "
     f"its block's time {BLOCK_TIME}"),
    (_entry(1, time="2026-02-30T00:00:00.000Z"), "entry time '2026-02-30T00:00:00.000Z' is not "
     "a valid date and time"),
    (_entry(1, time=["x"]), "entry time ['x'] is not RFC 3339 UTC with milliseconds and Z"),
]  # fmt: skip


@pytest.mark.parametrize(("fault", "what"), SECOND_ENTRY_FAULTS)
def test_a_signed_block_with_a_malformed_entry_is_refused_at_that_entry(
    ledger_db: Ledger, fault: Any, what: str
) -> None:
    """Signed over its tree root, the block would pass every check but the entry's own: from an
    export (parsed entries) and from a database (stored bytes and subtree hashes) alike."""
    entries = [_entry(0), fault]
    block = signed_block(ledger_db.key, entries)
    datas = [canonical_bytes(entry) for entry in entries]
    for stored in (None, datas):
        verifier = _verifier(ledger_db)
        with pytest.raises(VerificationError) as caught:
            if stored is None:
                verifier.add_block(block["header"], block["signature"], entries)
            else:
                nodes = _stored_nodes(stored)
                verifier.add_block(
                    block["header"], block["signature"], stored=stored, stored_nodes=nodes
                )
        assert caught.value.what == what
        assert (caught.value.chain, caught.value.height, caught.value.seq) == ("hosp-a", 0, 1)
    # the same block with the entry as it should be passes
    good = [_entry(0), _entry(1)]
    block = signed_block(ledger_db.key, good)
    _verifier(ledger_db).add_block(block["header"], block["signature"], good)


def test_entries_that_canonical_json_cannot_hold_are_named_as_entries(ledger_db: Ledger) -> None:
    entries = [_entry(0), _entry(1)]
    block = signed_block(ledger_db.key, entries)
    floating = [*entries[:1], _entry(1, body={"fee": 1.5})]
    with pytest.raises(VerificationError) as caught:
        _verifier(ledger_db).add_block(block["header"], block["signature"], floating)
    assert caught.value.what.startswith("entry.body.fee: floating-point number 1.5 ")
    assert caught.value.seq == 1
    datas = [canonical_bytes(entry) for entry in entries]
    stored = [datas[0], datas[1].replace(b'"n":1', b'"n":1.5')]
    with pytest.raises(VerificationError) as caught:
        _verifier(ledger_db).add_block(
            block["header"], block["signature"], stored=stored, stored_nodes=_stored_nodes(datas)
        )
    assert caught.value.what.startswith("entry.body.n: floating-point number 1.5 ")
    assert caught.value.seq == 1


# -- headers: each check of a block against the chain before it, in its words ----------------


def test_each_header_fault_is_named_in_words(ledger_db: Ledger) -> None:
    blocks = _fill(ledger_db)
    (b0, b1, b2) = blocks
    h0, h1 = b0["header"], b1["header"]

    def refused(*feed: dict[str, Any], verifier: Verifier | None = None) -> VerificationError:
        verifier = verifier or _verifier(ledger_db)
        with pytest.raises(VerificationError) as caught:
            for block in feed:
                entries = block.get("entries", b1["entries"])
                verifier.add_block(block["header"], block["signature"], entries)
        return caught.value

    fault = refused(b0, verifier=Verifier(ledger_db.authority.public_key()))
    assert str(fault) == "a block comes before any roster"
    fault = refused({**b0, "header": [h0]})
    assert str(fault) == "malformed header: a block header must be a JSON object, not an array"
    fault = refused({**b0, "header": {**h0, "chain": 5}})
    assert (fault.chain, fault.height) == (None, 0)
    assert fault.what.startswith("malformed header: ")
    fault = refused({**b0, "header": {**h0, "height": "0"}})
    assert str(fault) == (
        "chain hosp-a: malformed header: header height '0' is not a non-negative integer"
    )
    assert str(refused(b0, b2)) == "chain hosp-a, block height 2: expected height 1"
    moved = _signed(ledger_db, h1, prev="ab" * 32)
    assert str(refused(b0, {**b1, **moved})) == (
        f"chain hosp-a, block height 1: prev {'ab' * 32} is not the hash "
        f"{block_hash(h0).hex()} of the block before"
    )
    assert str(refused({**b0, **_signed(ledger_db, h0, roster=7)})) == (
        "chain hosp-a, block height 0: names roster version 7, which is not given"
    )
    assert str(refused({**b0, "signature": b1["signature"]})) == (
        "chain hosp-a, block height 0: block signature: Ed25519 signature does not verify"
    )
    earlier = _signed(ledger_db, h1, time="2000-01-01T00:00:00.000Z")
    assert str(refused(b0, {**b1, **earlier})) == (
        "chain hosp-a, block height 1: block time 2000-01-01T00:00:00.000Z is before the "
        f"previous block's {h0['time']}"
    )
    skipped = _signed(ledger_db, h1, first_seq=3, tree_size=5)
    assert str(refused(b0, {**b1, **skipped})) == (
        "chain hosp-a, block height 1: first_seq 3 should be 2"
    )
    assert str(refused(b0, {**b1, "entries": b1["entries"][:1]})) == (
        "chain hosp-a, block height 1: the block holds 1 entries, its header says 2"
    )
    rooted = _signed(ledger_db, h1, tree_root="ab" * 32)
    assert str(refused(b0, {**b1, **rooted})) == (
        f"chain hosp-a, block height 1: tree_root {'ab' * 32} is not the root "
        f"{h1['tree_root']} of entries 0..3"
    )


def test_a_block_may_not_go_back_to_an_older_roster(ledger_db: Ledger) -> None:
    blocks = _fill(ledger_db, 2)
    ((roster, _),) = ledger_db.store.rosters()
    second = make_roster("test", roster["members"], quorum=1, version=2)
    ledger_db.store.add_roster(second, sign_roster(second, ledger_db.authority))
    first = _signed(ledger_db, blocks[0]["header"], roster=2)
    back = _signed(ledger_db, blocks[1]["header"], prev=block_hash(first["header"]).hex())
    verifier = _verifier(ledger_db)
    verifier.add_block(first["header"], first["signature"], blocks[0]["entries"])
    with pytest.raises(VerificationError) as caught:
        verifier.add_block(back["header"], back["signature"], blocks[1]["entries"])
    assert str(caught.value) == ("chain hosp-a, block height 1: roster version 1 goes back from 2")


# -- the Merkle subtree hashes stored beside the entry rows ----------------------------------


def test_stored_subtree_hashes_that_differ_are_named_at_their_row(ledger_db: Ledger) -> None:
    blocks = _fill(ledger_db, 2)
    datas = [[canonical_bytes(e) for e in block["entries"]] for block in blocks]
    nodes = _stored_nodes(datas[0] + datas[1])
    rows = [nodes[:2], nodes[2:]]  # seq 0..1 in block 0, seq 2..3 in block 1

    def fault(block: int, stored_nodes: list[bytes]) -> str:
        verifier = _verifier(ledger_db)
        for height in range(block + 1):
            header, signature = blocks[height]["header"], blocks[height]["signature"]
            given = stored_nodes if height == block else rows[height]
            verifier.add_block(header, signature, stored=datas[height], stored_nodes=given)
        return "verified"

    subtree = "stored Merkle subtree hashes differ from the recomputed ones"
    for block, changed, words in (
        (1, [rows[1][0] + bytes(32), rows[1][1]], f"block height 1, seq 2: {subtree}"),
        (0, [rows[0][0], _flipped(rows[0][1], 40)], f"block height 0, seq 1: "
         f"{subtree}"),
        (1, [_flipped(rows[1][0], 0), rows[1][1]], "block height 1, seq 2: the entry's bytes do "
         "not hash to the leaf hash stored with it"),
        (0, [*rows[0], rows[1][0]], f"block height 0: {subtree}"),  # a row more than entries
    ):  # fmt: skip
        with pytest.raises(VerificationError) as caught:
            fault(block, changed)
        assert str(caught.value) == f"chain hosp-a, {words}"
    assert fault(1, rows[1]) == "verified"


def _flipped(data: bytes, at: int) -> bytes:
    """``data`` with every bit of the byte at ``at`` inverted: changed whatever that byte was
    (setting it to a fixed value changes nothing when it already holds that value, as a hash
    byte does once in 256 runs)."""
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


def test_a_block_of_one_undotted_entry_type_is_refused(ledger_db: Ledger) -> None:
    entries = [_entry(0, type="Access.Requested"), _entry(1, type="Access.Requested")]
    block = signed_block(ledger_db.key, entries)
    with pytest.raises(VerificationError) as caught:
        _verifier(ledger_db).add_block(block["header"], block["signature"], entries)
    assert str(caught.value) == (
        "chain hosp-a, block height 0, seq 0: entry type 'Access.Requested' is not dotted "
        "lowercase words"
    )


def test_only_the_watched_entries_are_observed(ledger_db: Ledger) -> None:
    blocks = _fill(ledger_db)
    seen: list[dict[str, Any]] = []
    verifier = _verifier(ledger_db, watch=frozenset({"access.decided"}), observe=seen.append)
    _feed(verifier, blocks)
    assert [(e["type"], e["seq"]) for e in seen] == [
        ("access.decided", 1),
        ("access.decided", 3),
        ("access.decided", 5),
    ]


def test_break_glass_in_a_block_read_entry_by_entry_is_listed(
    ledger_db: Ledger, tmp_path: Path
) -> None:
    """A body that is not ASCII sends its block down the entry-by-entry path."""
    with ChainWriter(ledger_db.store, "hosp-a", ledger_db.key) as writer:
        writer.append_many(
            [
                ("access.requested", {"reason": "复诊"}),
                ("emergency.access", {"request_id": "r1", "requester_org": "hosp-b"}),
            ]
        )
    export = tmp_path / "e.jsonl"
    export.write_bytes(b"".join(line + b"\n" for line in ledger_db.store.export_lines()))
    anchor = ledger_db.authority.public_key()
    for summary in (verify_export(export, anchor), verify_database(ledger_db.store, anchor)):
        assert [(e.chain, e.seq, e.requester) for e in summary.emergencies] == [
            ("hosp-a", 1, "hosp-b")
        ]


# -- export lines and database rows --------------------------------------------------------


def test_export_line_faults_are_named_by_file_and_line(ledger_db: Ledger, tmp_path: Path) -> None:
    _fill(ledger_db)
    lines = list(ledger_db.store.export_lines())  # roster, three blocks
    anchor = ledger_db.authority.public_key()
    path = tmp_path / "e.jsonl"

    def verified(*variant: bytes) -> Any:
        path.write_bytes(b"\n".join(variant) + b"\n")
        return verify_export(path, anchor)

    def refused(*variant: bytes) -> str:
        with pytest.raises(VerificationError) as caught:
            verified(*variant)
        return str(caught.value)

    summary = verified(lines[0], b"", lines[1], b"  ", lines[2], lines[3])  # blank lines skip
    assert (summary.blocks, summary.entries) == (3, 6)
    assert refused(lines[0], lines[1], b"{not json").startswith(f"{path}:3: ")
    roster = json.loads(lines[0])
    assert refused(json.dumps({**roster, "extra": 1}).encode(), *lines[1:]) == (
        f'{path}:1: a roster line is {{"roster", "signature"}}'
    )
    twice = lines[0][:-1] + b',"signature":"x"}'
    assert refused(twice, *lines[1:]) == f"{path}:1: object key 'signature' appears twice"
    assert refused(lines[0], b"5", *lines[1:]) == (
        f'{path}:2: a block is {{"header": ..., "signature": ..., "entries": [...]}}'
    )
    assert refused(*lines, b'{"certificate":{}}') == (
        f"{path}:5: certificate: a certificate has exactly checkpoint, signers and signature"
    )


def test_database_rows_outside_the_chains_are_named(ledger_db: Ledger, tmp_path: Path) -> None:
    from ledger.store import ChainStore

    empty = ChainStore(f"sqlite:///{tmp_path / 'empty.db'}")
    empty.create_schema()
    with pytest.raises(VerificationError) as caught:
        verify_database(empty, None)
    assert str(caught.value) == "the database holds no roster"
    empty.close()

    _fill(ledger_db)
    anchor = ledger_db.authority.public_key()
    with rows_changeable(ledger_db.store) as conn:
        conn.execute(
            sa.text(
                "INSERT INTO ledger_entries (chain, seq, data, nodes) "
                "VALUES ('hosp-z', 0, :empty, :empty)"
            ),
            {"empty": b""},
        )
    with pytest.raises(VerificationError) as caught:
        verify_database(ledger_db.store, anchor)
    assert str(caught.value) == (
        "chain hosp-z: 1 entry rows numbered 0..0, but the verified chain has 0 entries"
    )
    with rows_changeable(ledger_db.store) as conn:
        conn.execute(sa.text("DELETE FROM ledger_entries WHERE chain = 'hosp-z'"))
        conn.execute(sa.text("DELETE FROM ledger_entries WHERE chain = 'hosp-a' AND seq = 5"))
    with pytest.raises(VerificationError) as caught:
        verify_database(ledger_db.store, anchor)
    assert str(caught.value) == "chain hosp-a, block height 2, seq 5: entry row is missing"


def test_database_block_rows_that_disagree_are_named(ledger_db: Ledger) -> None:
    _fill(ledger_db)
    anchor = ledger_db.authority.public_key()

    def change(statement: str) -> None:
        with rows_changeable(ledger_db.store) as conn:
            conn.execute(sa.text(statement))

    def refused() -> str:
        with pytest.raises(VerificationError) as caught:
            verify_database(ledger_db.store, anchor)
        return str(caught.value)

    change("UPDATE ledger_blocks SET tree_size = 99 WHERE height = 1")
    assert refused() == "chain hosp-a, block height 1: the row's tree_size 99 is not the header's"
    change("UPDATE ledger_blocks SET tree_size = 4 WHERE height = 1")
    change("UPDATE ledger_blocks SET height = 5 WHERE height = 2")
    assert refused() == (
        "chain hosp-a, block height 5: the row's key (chain hosp-a, height 5) is not the "
        "header's (chain hosp-a, height 2)"
    )
    change("UPDATE ledger_blocks SET height = 2 WHERE height = 5")
    verify_database(ledger_db.store, anchor)
    change(
        "INSERT INTO ledger_blocks (chain, height, tree_size, header, signature) "
        "SELECT chain, -1, 99, header, signature FROM ledger_blocks WHERE height = 0"
    )
    assert refused() == (
        "chain hosp-a: 4 block rows numbered -1..2, but the verified chain has 3 blocks"
    )


def test_entries_stored_while_verifying_are_said_to_be_uncovered(ledger_db: Ledger) -> None:
    """A live node appends after the verification read its chain, before the rows are counted."""
    from ledger.store import ChainStore

    _fill(ledger_db)

    class LiveStore(ChainStore):
        def row_stats_snapshot(self) -> Any:
            with ChainWriter(ledger_db.store, "hosp-a", ledger_db.key) as writer:
                writer.append_many([("access.requested", {"n": 9}), ("access.decided", {})])
            return super().row_stats_snapshot()

    live = LiveStore(ledger_db.url)
    try:
        summary = verify_database(live, ledger_db.authority.public_key())
    finally:
        live.close()
    assert summary.entries == 6
    assert summary.warnings == [
        "chain hosp-a: 2 entries were stored while verifying; they are not covered by this "
        "verification"
    ]
