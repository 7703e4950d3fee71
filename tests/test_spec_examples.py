"""docs/spec.md's worked examples: exactly what the code computes, and right by the spec's rules.

The first test holds the spec's example block to the output of scripts/spec_examples.py, so
the spec cannot drift from the code. The others read the figures *from the spec* and check
each against the rule the spec states, with other code than hrx's wherever there is some
(``rfc8785``, ``hashlib``, ``hmac``, ``cryptography``, ``py_ecc``): a figure that follows
hrx's code but not the spec fails here. The last one verifies the example ledger as an
export with hrx's auditor, access decision replay included.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from py_ecc.bls.ciphersuites import G2ProofOfPossession

from scripts.spec_examples import compute, render
from tests.helpers import ROOT

SPEC = ROOT / "docs" / "spec.md"
BLOCK = re.compile(
    r"<!-- spec-examples:begin -->\n```text\n(?P<text>.*?)```\n<!-- spec-examples:end -->",
    re.DOTALL,
)
RESIDENT_ID_SYSTEM = "urn:oid:2.16.156.10011.1.3"
# the reference BLS implementation, called untyped (its NewTypes are not worth casting to here)
Bls: Any = G2ProofOfPossession


def spec_block() -> str:
    found = BLOCK.search(SPEC.read_text(encoding="utf-8"))
    assert found, "docs/spec.md lost its spec-examples block"
    return found["text"]


@pytest.fixture(scope="module")
def figures() -> dict[str, str]:
    """The spec's figures: ``label: value`` lines, headings and blank lines left out."""
    values: dict[str, str] = {}
    for line in spec_block().splitlines():
        if not line or line.startswith("# "):
            continue
        label, value = line.split(": ", 1)
        assert label not in values, f"label {label!r} appears twice"
        values[label] = value
    return values


def b64url(text: str) -> bytes:
    assert "=" not in text
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def jcs(text: str) -> bytes:
    """The shown JCS text as bytes, after checking it is RFC 8785's form of its value."""
    data = text.encode("utf-8")
    assert rfc8785.dumps(json.loads(data)) == data
    return data


def ed25519_public(figures: dict[str, str], who: str) -> Ed25519PublicKey:
    key = Ed25519PublicKey.from_public_bytes(b64url(figures[f"{who} Ed25519 public key"]))
    private = Ed25519PrivateKey.from_private_bytes(
        bytes.fromhex(figures[f"{who} Ed25519 private key (hex)"])
    )
    assert private.public_key() == key
    return key


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def test_spec_shows_what_the_code_computes() -> None:
    assert spec_block() == render(), (
        "docs/spec.md's worked examples differ from what the code computes: run "
        "python3 scripts/spec_examples.py and paste its output between the spec-examples "
        "markers (or find out why the code changed)"
    )


def test_roster_and_pseudonym(figures: dict[str, str]) -> None:
    roster = jcs(figures["roster JCS"])
    digest = sha256(roster)
    assert figures["roster digest SHA-256(JCS(roster))"] == digest.hex()
    signed = b"hrx/roster/v1\x00" + digest
    assert figures["roster signed bytes (hex)"] == signed.hex()
    authority = ed25519_public(figures, "authority")
    authority.verify(b64url(figures["roster signature"]), signed)
    body = json.loads(roster)
    members = {m["id"]: m for m in body["members"]}
    assert [m["id"] for m in body["members"]] == sorted(members)
    # no roles: a witness; ["witness"]: a witness; the quorum counts witnesses
    witnesses = [m for m in members.values() if "witness" in m.get("roles", ["witness"])]
    assert "roles" not in members["hosp-a"] and members["hosp-b"]["roles"] == ["witness"]
    assert 1 <= body["quorum"] <= len(witnesses)
    for who in ("hosp-a", "hosp-b"):
        assert members[who]["ed25519"] == figures[f"{who} Ed25519 public key"]
        ed25519_public(figures, who)

    system, value = figures["identifier"].split("|", 1)
    assert system == RESIDENT_ID_SYSTEM and value.endswith("x")
    message = f"{system}|{value.strip().upper()}"
    assert figures["HMAC message"] == message
    secret = bytes.fromhex(figures["consortium pseudonym secret (hex)"])
    assert len(secret) == 32
    expected = hmac.new(secret, message.encode(), hashlib.sha256).hexdigest()
    assert figures["pseudonym"] == expected


def test_entries_tree_and_blocks(figures: dict[str, str]) -> None:
    leaves = []
    for seq in range(3):
        data = jcs(figures[f"entry {seq} JCS"])
        entry = json.loads(data)
        assert set(entry) == {"v", "chain", "seq", "time", "type", "body"}
        assert (entry["v"], entry["chain"], entry["seq"]) == (1, "hosp-a", seq)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
        assert entry["body"]["patient"] == figures["pseudonym"]
        leaf = sha256(b"\x00" + data)
        assert figures[f"entry {seq} leaf hash SHA-256(0x00 || JCS)"] == leaf.hex()
        leaves.append(leaf)
    emergency = json.loads(figures["entry 2 JCS"])["body"]
    reason = " ".join(figures["emergency reason text (kept off the ledger)"].split())
    assert emergency["reason_hash"] == hashlib.sha256(reason.encode()).hexdigest()

    def node(left: bytes, right: bytes) -> bytes:
        return sha256(b"\x01" + left + right)

    roots = {1: leaves[0], 2: node(leaves[0], leaves[1])}
    roots[3] = node(roots[2], leaves[2])  # split at 2, the largest power of two below 3
    for size, root in roots.items():
        assert figures[f"root of size {size}"] == root.hex()
    assert figures["inclusion proof of seq 0 in size 3"] == f"{leaves[1].hex()}, {leaves[2].hex()}"
    assert figures["inclusion proof of seq 2 in size 3"] == roots[2].hex()
    assert figures["consistency proof from size 1 to size 3"] == (
        f"{leaves[1].hex()}, {leaves[2].hex()}"
    )

    hosp_a = ed25519_public(figures, "hosp-a")
    prev = "0" * 64
    for height, (first, size) in enumerate(((0, 1), (1, 3))):
        data = jcs(figures[f"block {height} header JCS"])
        header = json.loads(data)
        assert (header["height"], header["prev"], header["first_seq"]) == (height, prev, first)
        assert header["first_seq"] + header["count"] == header["tree_size"] == size
        assert header["tree_root"] == roots[size].hex()
        digest = sha256(data)
        assert figures[f"block {height} hash SHA-256(JCS(header))"] == digest.hex()
        signed = b"hrx/block/v1\x00" + digest
        assert figures[f"block {height} signed bytes (hex)"] == signed.hex()
        signature = figures[f"block {height} signature"]
        hosp_a.verify(b64url(signature), signed)
        entries = [json.loads(figures[f"entry {s} JCS"]) for s in range(first, size)]
        wire = {"header": header, "signature": signature, "entries": entries}
        assert figures[f"block {height} on the wire (JCS)"].encode() == rfc8785.dumps(wire)
        prev = digest.hex()


def test_checkpoint_certificate(figures: dict[str, str]) -> None:
    checkpoint = jcs(figures["checkpoint JCS"])
    head = json.loads(checkpoint)["heads"]["hosp-a"]
    assert head["hash"] == figures["block 1 hash SHA-256(JCS(header))"]
    assert head["tree_root"] == figures["root of size 3"]
    message = b"hrx/checkpoint/v1\x00" + sha256(checkpoint)
    assert figures["checkpoint signed message (hex)"] == message.hex()
    roster = {m["id"]: m for m in json.loads(figures["roster JCS"])["members"]}
    keys, signatures = [], []
    for who in ("hosp-a", "hosp-b"):
        secret = int(figures[f"{who} BLS secret key (hex)"], 16)
        public = Bls.SkToPk(secret)
        assert figures[f"{who} BLS public key"] == public.hex() == roster[who]["bls"]
        proof = bytes.fromhex(figures[f"{who} BLS proof of possession"])
        assert proof.hex() == roster[who]["bls_pop"] and Bls.PopVerify(public, proof)
        signature = Bls.Sign(secret, message)
        assert figures[f"{who} checkpoint signature"] == signature.hex()
        keys.append(public)
        signatures.append(signature)
    certificate = json.loads(jcs(figures["certificate JCS"]))
    assert certificate["signers"] == ["hosp-a", "hosp-b"]
    assert rfc8785.dumps(certificate["checkpoint"]) == checkpoint
    aggregate = bytes.fromhex(certificate["signature"])
    assert aggregate == Bls.Aggregate(signatures)
    assert Bls.FastAggregateVerify(keys, message, aggregate)


def test_signed_request(figures: dict[str, str]) -> None:
    method, url = figures["request"].split(" ")
    body = figures["request body"].encode()
    digest = base64.b64encode(sha256(body)).decode()
    assert figures["Content-Digest"] == f"sha-256=:{digest}:"
    label, params = figures["Signature-Input"].split("=", 1)
    assert label == "hrx"
    assert params.startswith('("@method" "@target-uri" "content-digest");created=')
    assert 'keyid="hosp-b"' in params and 'alg="ed25519"' in params and 'tag="hrx"' in params
    base = "\n".join(
        [
            f'"@method": {method}',
            f'"@target-uri": {url}',
            f'"content-digest": {figures["Content-Digest"]}',
            f'"@signature-params": {params}',
        ]
    )
    assert "\n".join(figures[f"signature base line {n}"] for n in range(1, 5)) == base
    signature = figures["Signature"]
    assert signature.startswith("hrx=:") and signature.endswith(":")
    ed25519_public(figures, "hosp-b").verify(base64.b64decode(signature[5:-1]), base.encode())


def test_example_ledger_verifies(tmp_path: Path) -> None:
    from exchange.decision_replay import WATCHED, DecisionReplay
    from ledger.canonical import canonical_bytes
    from ledger.verify import verify_export

    _, made = compute()
    export = tmp_path / "ledger.jsonl"
    lines: list[Any] = [{"roster": made["roster"], "signature": made["roster_signature"]}]
    lines += made["blocks"]
    lines.append({"certificate": made["certificate"]})
    export.write_bytes(b"".join(canonical_bytes(line) + b"\n" for line in lines))
    decisions = DecisionReplay()
    summary = verify_export(export, made["authority"], watch=WATCHED, observe=decisions.observe)
    assert summary.anchored and summary.entries == 3 and summary.certificates
    assert summary.covered["hosp-a"][1] == 1
    assert [e.seq for e in summary.emergencies] == [2]
    assert len(decisions.decisions) == 1 and decisions.findings() == []
