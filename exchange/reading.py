"""Remote reading (基层检查、上级诊断): the signed report a reading member sends back, and the
turnaround of consults computed from the ledger alone (docs/spec.md §15.8).

A report is a FHIR DiagnosticReport. What is signed, hashed and compared is its **content**:
the resource without ``id`` and ``meta`` (each member stores its copy under its own id and
version) and without its reading signature extension, in canonical JSON (RFC 8785).
``consult.reported`` carries the content's SHA-256 (``report_hash``), so a ledger entry
proves which report was sent. The reading member signs the content with its node key as a
detached JWS (RFC 7515 §F: ``<header>..<signature>``, ``alg`` EdDSA, ``kid`` the member id),
which any member verifies against the roster. The JWS
travels in the report itself (extension :data:`READING_SIGNATURE`), so that a member that
receives the report later, released by the requester among its prior results, can tell who
read it (:func:`read_by`): mutual recognition then judges the report by the reading member's
level and accreditation, not the requester's.

:func:`turnaround` reads ``consult.requested``, ``.reported`` and ``.cancelled`` entries: a
consult's turnaround is the time from its request entry to its first report entry; it is
within its deadline when that report's entry is no later than the deadline the request set.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ledger.canonical import canonical_bytes
from ledger.errors import LedgerError
from ledger.keys import b64url_decode, b64url_encode, parse_public_key
from ledger.model import parse_time

PRIORITIES = ("stat", "urgent", "routine")  # most pressing first
REQUESTED, ACCEPTED, REPORTED, CANCELLED = (
    "consult.requested",
    "consult.accepted",
    "consult.reported",
    "consult.cancelled",
)
CONSULT_TYPES = (REQUESTED, ACCEPTED, REPORTED, CANCELLED)
READING_SIGNATURE = "urn:hrx:fhir:StructureDefinition:reading-signature"
MEMBER_SYSTEM = "urn:hrx:member"


class ReportSignatureError(ValueError):
    """A report's signature is malformed or does not verify."""


def report_content(report: Mapping[str, Any]) -> bytes:
    """The canonical bytes of a report's content: the resource without ``id``, ``meta`` and
    its reading signature."""
    content = {k: v for k, v in report.items() if k not in ("id", "meta")}
    kept = [e for e in content.get("extension", []) if e.get("url") != READING_SIGNATURE]
    if kept:
        content["extension"] = kept
    else:
        content.pop("extension", None)
    return canonical_bytes(content)


def with_signature(report: Mapping[str, Any], jws: str) -> dict[str, Any]:
    """The report carrying its reading signature (any earlier one replaced)."""
    kept = [e for e in report.get("extension", []) if e.get("url") != READING_SIGNATURE]
    return {**report, "extension": [*kept, {"url": READING_SIGNATURE, "valueString": jws}]}


def read_by(report: Mapping[str, Any], members: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The member that read and signed a report: the one its reading signature names, when
    that member is in ``members`` (roster entries, with their ``ed25519`` key), is the
    report's performer, and its signature verifies. None when the report carries no reading
    signature; ReportSignatureError when it carries one that does not hold."""
    signatures = [e for e in report.get("extension", []) if e.get("url") == READING_SIGNATURE]
    if not signatures:
        return None
    jws = signatures[0].get("valueString")
    if len(signatures) != 1 or not isinstance(jws, str):
        raise ReportSignatureError("a report carries one reading signature, as a string")
    member = signer_of(jws)
    if member not in members:
        raise ReportSignatureError(f"the reading signature names {member}, no member")
    performers = {
        (p.get("identifier") or {}).get("value")
        for p in report.get("performer", [])
        if (p.get("identifier") or {}).get("system") == MEMBER_SYSTEM
    }
    if member not in performers:
        raise ReportSignatureError(f"the report's performer is not {member}, its signer")
    try:
        key = parse_public_key(str(members[member]["ed25519"]))
    except (KeyError, LedgerError) as exc:
        raise ReportSignatureError(f"{member} has no usable key in the roster: {exc}") from None
    return verify_report(jws, report, [key])


def report_hash(report: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of :func:`report_content`: what ``consult.reported`` records."""
    return hashlib.sha256(report_content(report)).hexdigest()


def _header(member: str) -> str:
    return b64url_encode(canonical_bytes({"alg": "EdDSA", "kid": member}))


def sign_report(key: Ed25519PrivateKey, member: str, report: Mapping[str, Any]) -> str:
    """A detached JWS of the report's content by ``member``'s node key."""
    header = _header(member)
    signing_input = f"{header}.{b64url_encode(report_content(report))}".encode()
    return f"{header}..{b64url_encode(key.sign(signing_input))}"


def signer_of(jws: str) -> str:
    """The member a report's JWS names as its signer (``kid``); not yet verified."""
    try:
        header, empty, _ = jws.split(".")
        fields = json.loads(b64url_decode(header, what="JWS header"))
    except (ValueError, LedgerError) as exc:
        raise ReportSignatureError(f"not a detached JWS: {exc}") from None
    if empty or not isinstance(fields, dict) or fields.get("alg") != "EdDSA":
        raise ReportSignatureError("not a detached EdDSA JWS")
    kid = fields.get("kid")
    if not isinstance(kid, str) or not kid:
        raise ReportSignatureError("the JWS names no signer (kid)")
    return kid


def verify_report(jws: str, report: Mapping[str, Any], keys: Iterable[Ed25519PublicKey]) -> str:
    """The signing member, once the JWS signs the report's content with one of ``keys`` (the
    signer's keys in the rosters the verifier holds); ReportSignatureError otherwise."""
    member = signer_of(jws)
    header, _, signature = jws.split(".")
    if header != _header(member):
        raise ReportSignatureError("the JWS header is not the one hrx signs with")
    try:
        raw = b64url_decode(signature, length=64, what="Ed25519 signature")
    except LedgerError as exc:
        raise ReportSignatureError(str(exc)) from None
    signing_input = f"{header}.{b64url_encode(report_content(report))}".encode()
    for key in keys:
        try:
            key.verify(raw, signing_input)
            return member
        except InvalidSignature:
            continue
    raise ReportSignatureError(f"the report's signature is not {member}'s: it does not verify")


@dataclass(frozen=True)
class Turnaround:
    """The consults of one reading member and priority: how many were reported, the median
    and 90th percentile of their turnaround (minutes), how many within deadline, and how
    many are still open or were cancelled."""

    reader: str
    priority: str
    reported: int
    median_minutes: float | None
    p90_minutes: float | None
    within_deadline: int
    open: int
    cancelled: int

    @property
    def share_within(self) -> float | None:
        return self.within_deadline / self.reported if self.reported else None


def percentile(values: list[float], share: float) -> float | None:
    """The nearest-rank percentile (``share`` of 1) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def turnaround(
    entries: Iterable[Mapping[str, Any]], since: datetime | None = None
) -> list[Turnaround]:
    """Per reading member and priority, from consult entries (any order, of any chains):
    consults requested at or after ``since`` (None: all)."""
    requested: dict[str, Mapping[str, Any]] = {}
    reported: dict[str, datetime] = {}
    cancelled: set[str] = set()
    for entry in entries:
        body = entry["body"]
        consult = str(body.get("consult_id"))
        at = parse_time(entry["time"])
        if entry["type"] == REQUESTED and entry["chain"] == body.get("requester_org"):
            requested[consult] = entry
        elif entry["type"] == REPORTED and entry["chain"] == body.get("reader_org"):
            if consult not in reported or at < reported[consult]:
                reported[consult] = at
        elif entry["type"] == CANCELLED and entry["chain"] == body.get("requester_org"):
            cancelled.add(consult)
    groups: dict[tuple[str, str], list[tuple[float, bool] | str]] = {}
    for consult, entry in requested.items():
        body = entry["body"]
        start = parse_time(entry["time"])
        if since is not None and start < since:
            continue
        key = (str(body.get("reader_org")), str(body.get("priority")))
        if consult in reported:
            taken = (reported[consult] - start).total_seconds() / 60
            groups.setdefault(key, []).append(
                (taken, reported[consult] <= parse_time(str(body["deadline"])))
            )
        else:
            groups.setdefault(key, []).append("cancelled" if consult in cancelled else "open")
    rows = []
    rank = {p: i for i, p in enumerate(PRIORITIES)}
    for (reader, priority), items in sorted(
        groups.items(), key=lambda g: (g[0][0], rank.get(g[0][1], 9), g[0][1])
    ):
        times = [item for item in items if isinstance(item, tuple)]
        minutes = [m for m, _ in times]
        rows.append(
            Turnaround(
                reader=reader,
                priority=priority,
                reported=len(times),
                median_minutes=percentile(minutes, 0.5),
                p90_minutes=percentile(minutes, 0.9),
                within_deadline=sum(1 for _, within in times if within),
                open=items.count("open"),
                cancelled=items.count("cancelled"),
            )
        )
    return rows
