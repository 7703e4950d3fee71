"""The worked examples of docs/spec.md, computed by hrx's own code from fixed keys and times.

    python3 scripts/spec_examples.py            # print them (what docs/spec.md shows)

A small consortium of two members (``hosp-a``, ``hosp-b``) whose keys come from fixed seeds:
the roster the authority signs, the pseudonym of one resident ID, three entries on ``hosp-a``'s
chain (a consent, and a break-glass access decision recorded with its ``emergency.access``),
the RFC 9162 hashes, roots and proofs over them, the two blocks that commit them, a checkpoint
both members co-sign with BLS, and one signed request between the members (RFC 9421).

Every figure is printed as ``label: value`` under a ``#`` heading; tests/test_spec_examples.py
holds docs/spec.md to exactly this output and checks each figure against the rules the spec
states, with other code than hrx's where there is some. The keys are public: never use them.
"""

from __future__ import annotations

import base64
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from http_message_signatures import (
    HTTPMessageSigner,
    HTTPSignatureKeyResolver,
    algorithms,
)

from consent.model import Terms, granted_body
from consent.policy import AccessRequest, decide
from consent.pseudonym import RESIDENT_ID_SYSTEM, normalized, pseudonym
from exchange.decisions import Decided, decided_body, emergency_body
from ledger import bls, keys, merkle
from ledger.canonical import canonical_bytes
from ledger.checkpoint import check_checkpoint, make_certificate
from ledger.checkpoint import message as checkpoint_message
from ledger.checkpoint import sign as sign_checkpoint
from ledger.model import (
    ZERO_HASH,
    block_bytes,
    block_hash,
    entry_data,
    make_entry,
    make_header,
    parse_time,
)
from ledger.roster import make_member, make_roster, roster_digest, sign_roster
from node.consortium.signing import COVERED, LABEL, TAG, Message

ROOT = Path(__file__).resolve().parent.parent

CHAIN = "hosp-a"
RESIDENT_ID = "11010519491231002x"  # the sample number of GB 11643, check character written "x"
CONSENT_TIME = "2026-11-22T08:00:00.000Z"
DECIDED_AT = "2026-11-22T09:30:00.120Z"
DECISION_TIME = "2026-11-22T09:30:00.125Z"
CHECKPOINT_TIME = "2026-11-22T09:31:00.000Z"
REQUEST_ID = "3f1c2b9e-8d4a-4c1e-9f6b-2a7d5e0c4b18"
EMERGENCY_TEXT = "患者昏迷送至急诊，需查近期血常规以决定是否输血"
NONCE = "spec-example-nonce-0001"
REQUEST_URL = "https://hosp-a.example/peer/heads"


def seed(label: str) -> bytes:
    """32 bytes that anyone can recompute: SHA-256 of a label."""
    return hashlib.sha256(f"hrx spec example: {label}".encode()).digest()


def ed25519_key(label: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(seed(label))


@dataclass
class Lines:
    """The printed figures, in order."""

    lines: list[str]

    def heading(self, text: str) -> None:
        if self.lines:
            self.lines.append("")
        self.lines.append(f"# {text}")

    def add(self, label: str, value: str | bytes) -> None:
        shown = value.decode("utf-8") if isinstance(value, bytes) else value
        self.lines.append(f"{label}: {shown}")


def _keys(out: Lines) -> dict[str, Any]:
    out.heading("Keys (from fixed seeds: SHA-256 of 'hrx spec example: <label>'; never use them)")
    found: dict[str, Any] = {}
    for label in ("authority", "hosp-a", "hosp-b"):
        key = ed25519_key(f"{label} ed25519")
        found[f"{label} ed25519"] = key
        out.add(f"{label} Ed25519 private key (hex)", seed(f"{label} ed25519").hex())
        out.add(f"{label} Ed25519 public key", keys.public_key_text(key))
    for label in ("hosp-a", "hosp-b"):
        secret = bls.generate_secret_key(seed(f"{label} bls"))
        found[f"{label} bls"] = secret
        out.add(f"{label} BLS secret key (hex)", secret.hex())
    secret = seed("pseudonym secret")
    found["pseudonym secret"] = secret
    out.add("consortium pseudonym secret (hex)", secret.hex())
    return found


def _roster(out: Lines, found: dict[str, Any]) -> dict[str, Any]:
    members = [
        make_member(
            "hosp-a",
            "示例市第一人民医院",
            "https://hosp-a.example",
            found["hosp-a ed25519"],
            found["hosp-a bls"],
            level="三级甲等",
            accreditation=[{"category": "laboratory", "scope": "省HR", "until": "2027-12-31"}],
        ),
        make_member(
            "hosp-b",
            "示例县人民医院",
            "https://hosp-b.example",
            found["hosp-b ed25519"],
            found["hosp-b bls"],
            level="二级甲等",
            roles=["witness"],
        ),
    ]
    roster = make_roster("示例医联体", members, quorum=2)
    digest = roster_digest(roster)
    out.heading("Roster, version 1 (signed by the authority)")
    out.add("roster JCS", canonical_bytes(roster))
    out.add("roster digest SHA-256(JCS(roster))", digest.hex())
    out.add("roster signed bytes (hex)", (keys.ROSTER_DOMAIN + digest).hex())
    out.add("roster signature", sign_roster(roster, found["authority ed25519"]))
    return roster


def _entries(out: Lines, found: dict[str, Any]) -> list[dict[str, Any]]:
    secret = found["pseudonym secret"]
    patient = pseudonym(secret, RESIDENT_ID_SYSTEM, RESIDENT_ID)
    out.heading("Pseudonym of a resident ID")
    out.add("identifier", f"{RESIDENT_ID_SYSTEM}|{RESIDENT_ID}")
    out.add("HMAC message", f"{RESIDENT_ID_SYSTEM}|{normalized(RESIDENT_ID_SYSTEM, RESIDENT_ID)}")
    out.add("pseudonym", patient)

    consent_hash = hashlib.sha256(b'{"resourceType":"Consent","id":"consent-1"}').hexdigest()
    terms = Terms(
        grantees=("hosp-b",),
        categories=("laboratory",),
        purposes=("TREAT",),
        start=CONSENT_TIME,
        end="2027-11-22T15:59:59.999Z",
    )
    granted = make_entry(
        CHAIN,
        0,
        CONSENT_TIME,
        "consent.granted",
        granted_body("consent-1", patient, terms, consent_hash),
    )
    request = AccessRequest(
        patient=patient,
        requester="hosp-b",
        purpose="ETREAT",
        categories=("laboratory",),
        time=DECIDED_AT,
        reason=EMERGENCY_TEXT,
        reason_code="unconscious",
    )
    decision = decide([granted], request)
    released = [hashlib.sha256(b'{"resourceType":"Observation","id":"obs-1"}').hexdigest()]
    decided = make_entry(
        CHAIN,
        1,
        DECISION_TIME,
        "access.decided",
        decided_body(REQUEST_ID, request, Decided(decision, {CHAIN: 1}), released),
    )
    emergency = make_entry(
        CHAIN, 2, DECISION_TIME, "emergency.access", emergency_body(REQUEST_ID, request)
    )
    out.add("emergency reason text (kept off the ledger)", EMERGENCY_TEXT)
    entries = [granted, decided, emergency]
    for entry in entries:
        out.heading(f"Entry {entry['seq']} of {CHAIN} ({entry['type']})")
        data = entry_data(entry)
        out.add(f"entry {entry['seq']} JCS", data)
        out.add(
            f"entry {entry['seq']} leaf hash SHA-256(0x00 || JCS)", merkle.leaf_hash(data).hex()
        )
    return entries


def _tree(out: Lines, entries: list[dict[str, Any]]) -> list[bytes]:
    leaves = [merkle.leaf_hash(entry_data(entry)) for entry in entries]
    out.heading("Merkle tree of the chain (RFC 9162)")
    for size in (1, 2, 3):
        out.add(f"root of size {size}", merkle.root_of(leaves[:size]).hex())
    for seq, size in ((0, 3), (2, 3)):
        path = merkle.assemble(merkle.inclusion_plan(seq, size), lambda n: _node(leaves, n))
        merkle.verify_inclusion(leaves[seq], seq, size, path, merkle.root_of(leaves[:size]))
        out.add(f"inclusion proof of seq {seq} in size {size}", ", ".join(h.hex() for h in path))
    path = merkle.assemble(merkle.consistency_plan(1, 3), lambda n: _node(leaves, n))
    merkle.verify_consistency(1, 3, leaves[0], merkle.root_of(leaves), path)
    out.add("consistency proof from size 1 to size 3", ", ".join(h.hex() for h in path))
    return leaves


def _node(leaves: list[bytes], node: merkle.NodeId) -> bytes:
    level, index = node
    return merkle.root_of(leaves[index << level : (index + 1) << level])


def _blocks(
    out: Lines, found: dict[str, Any], entries: list[dict[str, Any]], leaves: list[bytes]
) -> list[dict[str, Any]]:
    blocks = []
    prev = ZERO_HASH
    for height, (first, count, time) in enumerate(((0, 1, CONSENT_TIME), (1, 2, DECISION_TIME))):
        header = make_header(
            chain=CHAIN,
            height=height,
            prev=prev,
            time=time,
            first_seq=first,
            count=count,
            tree_size=first + count,
            tree_root=merkle.root_of(leaves[: first + count]),
            roster=1,
        )
        digest = block_hash(header)
        signature = keys.sign(found["hosp-a ed25519"], keys.BLOCK_DOMAIN, digest)
        held = entries[first : first + count]
        out.heading(f"Block {height} of {CHAIN}")
        out.add(f"block {height} header JCS", canonical_bytes(header))
        out.add(f"block {height} hash SHA-256(JCS(header))", digest.hex())
        out.add(f"block {height} signed bytes (hex)", (keys.BLOCK_DOMAIN + digest).hex())
        out.add(f"block {height} signature", signature)
        wire = block_bytes([entry_data(e) for e in held], canonical_bytes(header), signature)
        out.add(f"block {height} on the wire (JCS)", wire)
        blocks.append({"header": header, "signature": signature, "entries": held})
        prev = digest.hex()
    return blocks


def _checkpoint(
    out: Lines, found: dict[str, Any], roster: dict[str, Any], head: dict[str, Any]
) -> dict[str, Any]:
    header = head["header"]
    moment = parse_time(CHECKPOINT_TIME)
    checkpoint = check_checkpoint(
        {
            "v": 1,
            "epoch": int(moment.timestamp()),  # slots of 1 s: the epoch is the unix second
            "time": CHECKPOINT_TIME,
            "roster": roster["version"],
            "heads": {
                CHAIN: {
                    "height": header["height"],
                    "hash": block_hash(header).hex(),
                    "tree_size": header["tree_size"],
                    "tree_root": header["tree_root"],
                }
            },
        }
    )
    out.heading("Checkpoint and its certificate (BLS)")
    for member in ("hosp-a", "hosp-b"):
        body = next(m for m in roster["members"] if m["id"] == member)
        out.add(f"{member} BLS public key", body["bls"])
        out.add(f"{member} BLS proof of possession", body["bls_pop"])
    out.add("checkpoint JCS", canonical_bytes(checkpoint))
    out.add("checkpoint signed message (hex)", checkpoint_message(checkpoint).hex())
    signatures = {m: sign_checkpoint(checkpoint, found[f"{m} bls"]) for m in ("hosp-a", "hosp-b")}
    for member, signature in signatures.items():
        out.add(f"{member} checkpoint signature", signature)
    certificate = make_certificate(checkpoint, signatures)
    out.add("certificate JCS", canonical_bytes(certificate))
    return certificate


def _signed_request(out: Lines, found: dict[str, Any]) -> None:
    """hosp-b's push hint to hosp-a, signed as node.consortium.signing signs it, at a fixed time and
    with a fixed nonce (a node uses the current time and a random nonce)."""
    body = canonical_bytes({"chain": "hosp-b"})
    created = parse_time("2026-11-22T09:30:01.000Z")
    message = Message("POST", REQUEST_URL, {"Content-Type": "application/json"})

    class Key(HTTPSignatureKeyResolver):
        def resolve_private_key(self, key_id: str) -> Ed25519PrivateKey:
            private: Ed25519PrivateKey = found[f"{key_id} ed25519"]
            return private

    HTTPMessageSigner(signature_algorithm=algorithms.ED25519, key_resolver=Key()).sign(
        message,
        key_id="hosp-b",
        created=created,
        nonce=NONCE,
        label=LABEL,
        tag=TAG,
        covered_component_ids=COVERED,
        body=body,
    )
    headers = message.headers
    params = headers["Signature-Input"].split("=", 1)[1]
    base = "\n".join(
        [
            f'"@method": {message.method}',
            f'"@target-uri": {REQUEST_URL}',
            f'"content-digest": {headers["Content-Digest"]}',
            f'"@signature-params": {params}',
        ]
    )
    out.heading("A signed request: hosp-b's push hint to hosp-a (RFC 9421)")
    out.add("request", f"POST {REQUEST_URL}")
    out.add("request body", body)
    out.add("Content-Digest", headers["Content-Digest"])
    out.add("Signature-Input", headers["Signature-Input"])
    for number, line in enumerate(base.split("\n"), start=1):
        out.add(f"signature base line {number}", line)
    out.add("Signature", headers["Signature"])
    # the base shown is the one signed: the signature must verify over it
    raw = base64.b64decode(headers["Signature"].split(":")[1])
    found["hosp-b ed25519"].public_key().verify(raw, base.encode())


def compute() -> tuple[list[str], dict[str, Any]]:
    """The printed lines, and the objects they were made of (the roster with its signature,
    the blocks and the certificate) for checking them."""
    out = Lines([])
    found = _keys(out)
    roster = _roster(out, found)
    entries = _entries(out, found)
    leaves = _tree(out, entries)
    blocks = _blocks(out, found, entries, leaves)
    certificate = _checkpoint(out, found, roster, blocks[-1])
    _signed_request(out, found)
    made = {
        "roster": roster,
        "roster_signature": sign_roster(roster, found["authority ed25519"]),
        "authority": found["authority ed25519"].public_key(),
        "blocks": blocks,
        "certificate": certificate,
    }
    return out.lines, made


def render() -> str:
    return "\n".join(compute()[0]) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
