"""Remote reading's pure parts: the report's content, hash and detached JWS (any change after
signing, another key, another header fail), who read a report (:func:`read_by`), mutual
recognition judging a remotely read report by the reading member (both ways), and the
turnaround computed from consult entries."""

from __future__ import annotations

import base64
import json
from datetime import UTC, date, datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from exchange.reading import (
    READING_SIGNATURE,
    ReportSignatureError,
    percentile,
    read_by,
    report_content,
    report_hash,
    sign_report,
    signer_of,
    turnaround,
    verify_report,
    with_signature,
)
from exchange.recognition import load_rules, result_of, verdict
from exchange.referral import reading_of
from ledger import keys
from ledger.keys import b64url_encode

COUNTY, TOWNSHIP = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
MEMBERS = {
    "hosp-b": {
        "id": "hosp-b",
        "level": "二级甲等",
        "ed25519": keys.public_key_text(COUNTY),
        "accreditation": [{"category": "imaging", "scope": "市HR", "until": "2099-12-31"}],
    },
    "hosp-a": {
        "id": "hosp-a",
        "level": "一级",
        "ed25519": keys.public_key_text(TOWNSHIP),
        "accreditation": [],
    },
    "hosp-c": {"id": "hosp-c", "level": "三级甲等", "ed25519": keys.public_key_text(TOWNSHIP)},
}


def a_report(**more: Any) -> dict[str, Any]:
    return {
        "resourceType": "DiagnosticReport",
        "id": "r1",
        "meta": {"versionId": "1"},
        "status": "final",
        "category": [
            {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}
                ]
            },
            {"coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}]},
        ],
        "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4"}]},
        "issued": "2026-12-01T02:00:00.000Z",
        "performer": [{"identifier": {"system": "urn:hrx:member", "value": "hosp-b"}}],
        "conclusion": "右下肺炎。",
        "extension": [
            {
                "url": "http://hl7.org/fhir/StructureDefinition/bodySite",
                "valueCodeableConcept": {"text": "Chest"},
            }
        ],
        **more,
    }


def signed(
    report: dict[str, Any], key: Ed25519PrivateKey = COUNTY, member: str = "hosp-b"
) -> dict[str, Any]:
    return with_signature(report, sign_report(key, member, report))


def test_the_content_leaves_out_id_meta_and_the_signature() -> None:
    report = a_report()
    plain = json.loads(report_content(report))
    assert "id" not in plain and "meta" not in plain and plain["conclusion"] == "右下肺炎。"
    assert report_content(signed(report)) == report_content(report)
    assert report_hash(signed(report)) == report_hash({**report, "id": "elsewhere"})
    bare = {k: v for k, v in report.items() if k != "extension"}
    assert "extension" not in json.loads(report_content(with_signature(bare, "x..y")))
    resigned = with_signature(signed(report), "x..y")
    assert [e["url"] for e in resigned["extension"]].count(READING_SIGNATURE) == 1


def test_a_signature_holds_for_the_signed_content_only() -> None:
    report = a_report()
    jws = sign_report(COUNTY, "hosp-b", report)
    county = keys.parse_public_key(keys.public_key_text(COUNTY))
    township = keys.parse_public_key(keys.public_key_text(TOWNSHIP))
    assert signer_of(jws) == "hosp-b"
    assert verify_report(jws, report, [township, county]) == "hosp-b"
    assert verify_report(jws, {**report, "id": "x", "meta": {}}, [county]) == "hosp-b"
    for changed, keys_given, message in (
        ({**report, "conclusion": "未见异常。"}, [county], "does not verify"),
        (report, [township], "does not verify"),
        (report, [], "does not verify"),
    ):
        with pytest.raises(ReportSignatureError, match=message):
            verify_report(jws, changed, keys_given)
    header, _, signature = jws.split(".")
    forged_header = b64url_encode(b'{"alg":"EdDSA","kid":"hosp-b","x":1}')
    NONE = b64url_encode(b'{"alg":"none","kid":"hosp-b"}')
    NO_KID = b64url_encode(b'{"alg":"EdDSA"}')
    for bad, message in (
        (f"{forged_header}..{signature}", "not the one hrx signs with"),
        (f"{header}.payload.{signature}", "not a detached EdDSA JWS"),
        (f"{NONE}..{signature}", "EdDSA"),
        (f"{NO_KID}..{signature}", "names no signer"),
        ("not a jws", "not a detached JWS"),
        (f"{header}..{signature[:-4]}", "signature"),
    ):
        with pytest.raises(ReportSignatureError, match=message):
            verify_report(bad, report, [county])


def test_who_read_a_report() -> None:
    report = a_report()
    assert read_by(report, MEMBERS) is None  # no reading signature: read where it was written
    assert read_by(signed(report), MEMBERS) == "hosp-b"
    tampered = {**signed(report), "conclusion": "未见异常。"}
    with pytest.raises(ReportSignatureError, match="does not verify"):
        read_by(tampered, MEMBERS)
    with pytest.raises(ReportSignatureError, match="performer is not hosp-c"):
        read_by(signed(report, TOWNSHIP, "hosp-c"), MEMBERS)
    with pytest.raises(ReportSignatureError, match="names hosp-z, no member"):
        read_by(signed(report, COUNTY, "hosp-z"), MEMBERS)
    twice = {**report, "extension": [*report["extension"], *signed(report)["extension"][-1:] * 2]}
    with pytest.raises(ReportSignatureError, match="one reading signature"):
        read_by(twice, MEMBERS)
    keyless = {**MEMBERS, "hosp-b": {"id": "hosp-b"}}
    with pytest.raises(ReportSignatureError, match="no usable key"):
        read_by(signed(report), keyless)


def test_a_remote_read_is_recognised_as_the_reading_members_both_ways() -> None:
    """The township (一级, no imaging accreditation) holds the report; the county read and
    signed it: recognised as the county's. Without the county's signature, or with it broken,
    the township's accreditation decides, and it has none."""
    rules = load_rules()
    here = {"id": "hosp-c", "level": "三级甲等"}
    today = date(2026, 12, 5)

    def judged(report: dict[str, Any]) -> Any:
        return verdict(
            rules,
            result_of(report, rules.zone),
            MEMBERS["hosp-a"],
            here,
            today,
            reading_of(report, MEMBERS),
        )

    read = judged(signed(a_report()))
    assert read.recognised and read.item is not None and read.item.id == "ct-chest"
    assert [r.code for r in read.reasons][:2] == ["read-by", "status"]
    assert "hosp-b accredited for imaging" in " ".join(r.text for r in read.reasons)
    unsigned = judged(a_report())
    assert not unsigned.recognised
    assert [r.code for r in unsigned.negative()] == ["not-accredited"]
    broken = judged({**signed(a_report()), "conclusion": "未见异常。"})
    assert not broken.recognised
    assert broken.negative()[0].code == "reading-signature"


def entry(chain: str, kind: str, time: str, **body: Any) -> dict[str, Any]:
    fields = {
        "consult_id": "c-1",
        "patient": "a" * 64,
        "requester_org": "hosp-a",
        "reader_org": "hosp-b",
        "priority": "urgent",
        "deadline": "2026-12-01T03:00:00.000Z",
    }
    return {"chain": chain, "type": kind, "time": time, "body": {**fields, **body}}


def test_turnaround_from_the_ledger() -> None:
    entries = [
        entry("hosp-a", "consult.requested", "2026-12-01T02:00:00.000Z"),
        entry("hosp-b", "consult.accepted", "2026-12-01T02:05:00.000Z"),
        entry("hosp-b", "consult.reported", "2026-12-01T02:40:00.000Z"),  # 40 min, in time
        entry("hosp-b", "consult.reported", "2026-12-01T03:30:00.000Z"),  # an amendment
        entry(
            "hosp-a",
            "consult.requested",
            "2026-12-01T04:00:00.000Z",
            consult_id="c-2",
            deadline="2026-12-01T05:00:00.000Z",
        ),
        entry("hosp-b", "consult.reported", "2026-12-01T05:30:00.000Z", consult_id="c-2"),  # 90
        entry("hosp-a", "consult.requested", "2026-12-01T06:00:00.000Z", consult_id="c-3"),
        entry("hosp-a", "consult.requested", "2026-12-01T06:00:00.000Z", consult_id="c-4"),
        entry("hosp-a", "consult.cancelled", "2026-12-01T06:10:00.000Z", consult_id="c-4"),
        entry(
            "hosp-a",
            "consult.requested",
            "2026-12-01T06:00:00.000Z",
            consult_id="c-5",
            priority="routine",
            reader_org="hosp-c",
            deadline="2026-12-02T06:00:00.000Z",
        ),
        entry(
            "hosp-c",
            "consult.reported",
            "2026-12-01T06:20:00.000Z",
            consult_id="c-5",
            priority="routine",
            reader_org="hosp-c",
        ),
        # entries on chains that are not their author's count for nothing
        entry("hosp-c", "consult.requested", "2026-12-01T06:00:00.000Z", consult_id="c-6"),
        entry("hosp-a", "consult.reported", "2026-12-01T06:01:00.000Z", consult_id="c-3"),
        entry("hosp-b", "consult.cancelled", "2026-12-01T06:01:00.000Z", consult_id="c-3"),
    ]
    rows = turnaround(reversed(entries))
    assert [(r.reader, r.priority) for r in rows] == [("hosp-b", "urgent"), ("hosp-c", "routine")]
    b, c = rows
    assert (b.reported, b.median_minutes, b.p90_minutes, b.within_deadline) == (2, 40, 90, 1)
    assert (b.open, b.cancelled, b.share_within) == (1, 1, 0.5)
    assert (c.reported, c.median_minutes, c.within_deadline, c.share_within) == (1, 20, 1, 1.0)
    since = datetime(2026, 12, 1, 5, 0, tzinfo=UTC)
    later = turnaround(entries, since)
    assert [(r.reader, r.reported, r.open, r.cancelled) for r in later] == [
        ("hosp-b", 0, 1, 1),
        ("hosp-c", 1, 0, 0),
    ]
    assert later[0].median_minutes is None and later[0].share_within is None
    assert turnaround([]) == []


def test_percentiles_are_nearest_rank() -> None:
    assert percentile([], 0.5) is None
    assert percentile([7.0], 0.9) == 7.0
    values = [float(v) for v in range(1, 11)]
    assert (percentile(values, 0.5), percentile(values, 0.9), percentile(values, 1.0)) == (
        5.0,
        9.0,
        10.0,
    )
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0


def test_the_jws_is_the_standard_form() -> None:
    """Any JOSE library can check it: header {"alg":"EdDSA","kid"}, detached payload."""
    jws = sign_report(COUNTY, "hosp-b", a_report())
    header, payload, signature = jws.split(".")
    padded = header + "=" * (-len(header) % 4)
    assert json.loads(base64.urlsafe_b64decode(padded)) == {"alg": "EdDSA", "kid": "hosp-b"}
    assert payload == "" and len(signature) == 86
