"""Every reason the consent policy gives reads, on a page, in the page's language, with
hospital names and local times (node/web/pages/reasons.py): each is made here by the policy
itself, so a reason the policy gains or rewords and the pages do not know fails."""

from __future__ import annotations

import re
from datetime import timedelta, timezone

import pytest

from consent.policy import decide
from node.web.pages.reasons import explain, explain_recognition, in_zone, outcome
from tests.consent.test_policy import grant, request, revoke

NAMES = {
    "hosp-a": "佛山市第一人民医院",
    "hosp-b": "南海区人民医院",
    "hosp-c": "顺德区中医院",
    "hosp-x": "高明区人民医院",
}
LOCAL = in_zone(timezone(timedelta(hours=8)))
UUID = "2456a4a8-1d7e-4a57-9d6c-3f1a2b3c4d5e"


def reasons() -> list[str]:
    """Every kind of reason, as the policy writes it."""
    made = [
        decide([], request()),
        decide([grant(0, UUID), revoke(5, UUID)], request()),
        decide([grant(0, UUID, start="2027-01-01T00:00:00.000Z")], request()),
        decide([grant(0, UUID, end="2026-02-01T00:00:00.000Z")], request()),
        decide([grant(0, UUID)], request(requester="hosp-c")),
        decide([grant(0, UUID, purposes=("ETREAT",))], request()),
        decide([grant(0, UUID, categories=("imaging",))], request()),
        decide([grant(0, UUID)], request(purpose="XYZ")),
        decide([grant(0, UUID)], request(categories=())),
        decide([grant(0, UUID)], request(purpose="ETREAT", reason=" ")),
        decide([grant(0, UUID)], request()),
    ]
    return [reason for decision in made for reason in decision.reasons]


@pytest.mark.parametrize("reason", reasons())
def test_every_policy_reason_reads_in_chinese(reason: str) -> None:
    shown = explain(reason, "zh", NAMES, LOCAL)
    assert shown != reason, reason  # known: not shown as written
    assert not re.search(r"[a-z]{4,}", shown.replace(UUID[:8], "")), shown  # no English words
    assert UUID not in shown  # a consent's id shortened to what a person quotes
    assert "hosp-" not in shown, shown  # names, not member ids
    assert not re.search(r"\d{4}-\d{2}-\d{2}T", shown), shown  # no UTC instant
    english = explain(reason, "en", NAMES, LOCAL)
    assert english != shown and "hosp-a" not in english


def test_names_local_times_and_categories() -> None:
    revoked = decide([grant(0, UUID), revoke(5, UUID)], request()).reasons[1]
    assert explain(revoked, "zh", NAMES, LOCAL) == (
        "患者在佛山市第一人民医院签署的知情同意（2456a4a8…）已于 2026-06-01 08:00 撤回"
    )
    narrow = decide([grant(0, UUID, categories=("imaging",))], request()).reasons[1]
    assert explain(narrow, "zh", NAMES, LOCAL).endswith("不包括：检验结果")
    ungranted = decide([grant(0, UUID)], request(requester="hosp-b2")).reasons[1]
    assert explain(ungranted, "zh", NAMES, LOCAL).endswith("未授权hosp-b2调阅")  # unknown id
    assert explain("something new", "zh", NAMES, LOCAL) == "something new"
    assert outcome("denied", "zh") == "拒绝调阅" and outcome("timeout", "en").startswith("did")
    assert outcome("other", "zh") == "other"


def recognition_reasons() -> list[tuple[str, str]]:
    """(code, text) of every kind of recognition reason, as exchange.recognition writes them."""
    from exchange.recognition import result_of, verdict
    from tests.exchange.test_recognition import (
        HERE,
        RULES,
        SECONDARY,
        TERTIARY,
        TODAY,
        lab,
        study,
    )

    cases = [
        (lab(), TERTIARY),
        (lab(when="2026-11-10T08:00:00+08:00", status="preliminary"), SECONDARY),
        (lab(code="99999-9"), {"id": "hosp-x", "level": "三级甲等"}),
        (study(), SECONDARY),
        (lab(effectiveDateTime=None), {**TERTIARY, "level": "unknown"}),
        ({**lab(), "category": []}, TERTIARY),
    ]
    found: dict[tuple[str, str], None] = {}
    for resource, issuer in cases:
        resource = {k: v for k, v in resource.items() if v is not None}
        for reason in verdict(RULES, result_of(resource, RULES.zone), issuer, HERE, TODAY).reasons:
            found[(reason.code, reason.text)] = None
    return list(found)


@pytest.mark.parametrize(("code", "text"), recognition_reasons())
def test_every_recognition_reason_reads_in_chinese(code: str, text: str) -> None:
    from tests.exchange.test_recognition import RULES

    items = {item.id: item.label("zh") for item in RULES.items}
    shown = explain_recognition(code, text, "zh", NAMES, items)
    assert shown != text, (code, text)
    words = re.sub(r"\S*[|:]\S*", "", shown)  # a code a person needs (LOINC|99999-9) stays
    assert not re.search(r"[a-z]{4,}", words), shown  # no English words
    assert "hosp-" not in shown, shown


def test_recognition_reasons_cover_every_code() -> None:
    codes = {code for code, _ in recognition_reasons()}
    assert codes >= {
        "status",
        "not-final",
        "no-category",
        "accredited",
        "not-accredited",
        "not-on-list",
        "on-list",
        "no-date",
        "within-window",
        "expired",
        "level",
        "level-refused",
        "level-unknown",
    }, codes
