"""Mutual recognition verdicts (docs/spec.md §17): every condition gives a reason, met or not."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from exchange.recognition import (
    DEFAULT_RULES,
    RulesError,
    load_rules,
    parse_rules,
    result_of,
    verdict,
)

RULES = load_rules()
TODAY = date(2026, 11, 25)
LOINC = "http://loinc.org"
CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
TERTIARY = {
    "id": "hosp-a",
    "level": "三级甲等",
    "accreditation": [
        {"category": "laboratory", "scope": "省HR", "until": "2027-12-31"},
        {"category": "imaging", "scope": "省HR", "until": "2027-12-31"},
    ],
}
SECONDARY = {
    "id": "hosp-c",
    "level": "二级甲等",
    "accreditation": [
        {"category": "laboratory", "scope": "市HR", "until": "2027-06-30"},
        {"category": "imaging", "scope": "市HR", "until": "2026-05-01"},
    ],
}
HERE = {"id": "hosp-b", "level": "三级乙等", "accreditation": []}


def lab(code: str = "718-7", when: str = "2026-11-20T09:30:00+08:00", **extra: Any) -> Any:
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [{"coding": [{"system": CATEGORY, "code": "laboratory"}]}],
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "effectiveDateTime": when,
        **extra,
    }


def study(modality: str = "CT", site: str = "51185008", started: str = "2026-11-10") -> Any:
    return {
        "resourceType": "ImagingStudy",
        "status": "available",
        "started": started,
        "series": [
            {
                "uid": "1.2.3",
                "modality": {
                    "system": "http://dicom.nema.org/resources/ontology/DCM",
                    "code": modality,
                },
                "bodySite": {"system": "http://snomed.info/sct", "code": site},
            }
        ],
    }


CASES = [
    ("recent haemoglobin from a tertiary hospital", lab(), TERTIARY, True, set()),
    ("expired: 7-day window", lab(when="2026-11-10T08:00:00+08:00"), TERTIARY, False, {"expired"}),
    ("last day of the window", lab(when="2026-11-18T23:00:00+08:00"), TERTIARY, True, set()),
    ("off the list", lab(code="99999-9"), TERTIARY, False, {"not-on-list"}),
    ("preliminary", lab(status="preliminary"), TERTIARY, False, {"not-final"}),
    ("lab from a lower level", lab(), SECONDARY, False, {"level-refused"}),
    ("CT chest within a month", study(), TERTIARY, True, set()),
    # the code the PACS adapter gives DICOM's CHEST (PS3.16 Annex L, CID 4031)
    ("CT chest as DICOM codes it", study(site="43799004"), TERTIARY, True, set()),
    (
        "imaging from a lower level: any member",
        study(),
        {**SECONDARY, "accreditation": TERTIARY["accreditation"]},
        True,
        set(),
    ),
    ("imaging accreditation lapsed", study(), SECONDARY, False, {"not-accredited"}),
    (
        "no accreditation at all",
        lab(),
        {"id": "hosp-x", "level": "三级甲等"},
        False,
        {"not-accredited"},
    ),
    ("CT of an unlisted site", study(site="76752008"), TERTIARY, False, {"not-on-list"}),
    ("old CT", study(started="2026-09-01"), TERTIARY, False, {"expired"}),
    (
        "several faults at once",
        lab(code="99999-9", status="preliminary"),
        SECONDARY,
        False,
        {"not-on-list", "not-final", "level-refused"},
    ),
]


@pytest.mark.parametrize(
    ("resource", "issuer", "recognised", "negative"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_verdicts(
    resource: Any, issuer: dict[str, Any], recognised: bool, negative: set[str]
) -> None:
    result = result_of(resource, RULES.zone)
    found = verdict(RULES, result, issuer, HERE, TODAY)
    assert found.recognised == recognised, found.reasons
    assert {r.code for r in found.negative()} == negative
    assert found.mark == ("HR" if recognised else None)
    assert len(found.reasons) >= 4  # status, accreditation, list (and window), level


def test_reasons_name_dates_and_items() -> None:
    expired = verdict(
        RULES, result_of(lab(when="2026-11-10T08:00:00+08:00"), RULES.zone), TERTIARY, HERE, TODAY
    )
    (reason,) = expired.negative()
    assert reason.text == "expired on 2026-11-17 (taken 2026-11-10, valid 7 days)"
    fine = verdict(RULES, result_of(lab(), RULES.zone), TERTIARY, HERE, TODAY)
    assert fine.valid_until == date(2026, 11, 27)
    assert fine.item is not None and fine.item.id == "hgb" and fine.item.price_fen == 500
    lapsed = verdict(RULES, result_of(study(), RULES.zone), SECONDARY, HERE, TODAY)
    assert "imaging accreditation ended 2026-05-01" in lapsed.negative()[0].text


def test_a_result_time_is_read_in_the_consortiums_zone() -> None:
    # 2026-11-17T20:00Z is 2026-11-18 04:00 in UTC+08:00: the last day of a 7-day window
    late = verdict(
        RULES, result_of(lab(when="2026-11-17T20:00:00Z"), RULES.zone), TERTIARY, HERE, TODAY
    )
    assert late.recognised and late.valid_until == date(2026, 11, 25)


def test_default_rules_are_valid_and_bad_rules_are_named(tmp_path: Path) -> None:
    data = json.loads(DEFAULT_RULES.read_text(encoding="utf-8"))
    assert len(parse_rules(data).items) == len(data["items"])
    for change, words in [
        ({"time_zone": "CST"}, "time_zone"),
        ({"levels": {"laboratory": "anyone"}}, "levels.laboratory"),
        ({"items": [{"id": "x", "category": "genetics"}]}, "category"),
        ({"items": [{**data["items"][0], "price_fen": 12.5}]}, "price_fen"),
        ({"items": [data["items"][0], data["items"][0]]}, "listed twice"),
        ({"items": [{**data["items"][0], "codes": ["718-7"]}]}, "system|code"),
    ]:
        with pytest.raises(RulesError, match=words):
            parse_rules({**data, **change})
    path = tmp_path / "rules.json"
    path.write_text("{", encoding="utf-8")
    with pytest.raises(RulesError, match="not JSON"):
        load_rules(path)
