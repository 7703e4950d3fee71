"""Reasons, in the words of the page's reader: a hospital's name rather than its member id,
times in the consortium's zone rather than UTC instants, in the page's language. Two kinds:

- why a member did not answer, each reason its consent policy gave (:mod:`consent.policy`
  writes them in English, as they go on the ledger and to auditors), with a consent's id
  shortened to what a person can quote (:func:`explain`);
- why a result is or is not recognised (:mod:`exchange.recognition`, a code and an English
  text) (:func:`explain_recognition`).

A reason this module does not know is shown as it was written.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from datetime import datetime, tzinfo

from node.web.pages.text import TEXT, translate

_CONSENT = r"consent (?P<consent>\S+) \((?P<chain>\S+) seq (?P<seq>\d+)\)"

# (pattern, {language: template}); a template's fields are the pattern's groups, with
# ``hospital`` (the consent's chain's name), ``member`` (a member's name) and ``time`` made
# readable.
_REASONS: tuple[tuple[re.Pattern[str], dict[str, str]], ...] = tuple(
    (re.compile(pattern), templates)
    for pattern, templates in (
        (
            _CONSENT + r" was revoked at (?P<time>\S+)",
            {
                "zh": "患者在{hospital}签署的知情同意（{consent}）已于 {time} 撤回",
                "en": "the consent given at {hospital} ({consent}) was revoked at {time}",
            },
        ),
        (
            _CONSENT + r" is valid only from (?P<time>\S+)",
            {
                "zh": "患者在{hospital}签署的知情同意（{consent}）自 {time} 起才生效",
                "en": "the consent given at {hospital} ({consent}) is valid only from {time}",
            },
        ),
        (
            _CONSENT + r" expired at (?P<time>\S+)",
            {
                "zh": "患者在{hospital}签署的知情同意（{consent}）已于 {time} 到期",
                "en": "the consent given at {hospital} ({consent}) expired at {time}",
            },
        ),
        (
            _CONSENT + r" does not grant (?P<member>\S+)",
            {
                "zh": "患者在{hospital}签署的知情同意（{consent}）未授权{member}调阅",
                "en": "the consent given at {hospital} ({consent}) does not grant {member}",
            },
        ),
        (
            _CONSENT + r" does not cover purpose (?P<purpose>\S+)",
            {
                "zh": "患者在{hospital}签署的知情同意（{consent}）不包括用途：{purpose}",
                "en": "the consent given at {hospital} ({consent}) does not cover {purpose}",
            },
        ),
        (
            _CONSENT + r" does not cover (?P<categories>.+)",
            {
                "zh": "患者在{hospital}签署的知情同意（{consent}）不包括：{categories}",
                "en": "the consent given at {hospital} ({consent}) does not cover {categories}",
            },
        ),
        (
            r"permitted by " + _CONSENT + r".*",
            {
                "zh": "患者在{hospital}签署的知情同意（{consent}）允许本次调阅",
                "en": "permitted by the consent given at {hospital} ({consent})",
            },
        ),
        (
            r"no consent of this patient is recorded",
            {"zh": "该患者没有登记任何知情同意", "en": "the patient has recorded no consent"},
        ),
        (
            r"no consent permits this request",
            {
                "zh": "该患者的知情同意均不允许本次调阅",
                "en": "none of the patient's consents permits this request",
            },
        ),
        (
            r"the request names no data category",
            {"zh": "调阅请求未写明资料类别", "en": "the request names no kind of record"},
        ),
        (
            r"emergency access \(ETREAT\) needs a stated reason",
            {
                "zh": "紧急调阅（急诊抢救）须写明理由",
                "en": "emergency access needs a stated reason",
            },
        ),
        (
            r"(?P<member>\S+) does not read (?P<what>.+) \(it reads (?P<reads>.+)\)",
            {
                "zh": "{member}不开展 {what} 阅片（可阅：{reads}）",
                "en": "{member} does not read {what} (it reads {reads})",
            },
        ),
        (
            r"(?P<member>\S+) reads no modality \(consults\.modalities\)",
            {"zh": "{member}未开展远程阅片", "en": "{member} reads no studies for others"},
        ),
        (
            r"(?P<member>\S+) refuses: \S+ has no grant to read study \S+",
            {
                "zh": "{member}拒绝：没有调阅该检查影像的授权",
                "en": "{member} refuses: there is no grant to read this study",
            },
        ),
        (
            r"(?P<member>\S+) refuses: request \S+ is no longer permitted: .*revoked.*",
            {
                "zh": "{member}拒绝：患者已撤回知情同意，此前的调阅授权已失效",
                "en": "{member} refuses: the patient revoked the consent the read rested on",
            },
        ),
        (
            r"(?P<member>\S+) refuses: the access it was granted at \S+ \(request \S+\) is "
            r"older than \d+ s",
            {
                "zh": "{member}拒绝：调阅授权已过期，请重新调阅既往结果",
                "en": "{member} refuses: the grant has expired; ask for the prior results again",
            },
        ),
        (
            r"purpose '(?P<purpose>[^']*)' is not one of .*",
            {"zh": "调阅用途 {purpose} 不在允许之列", "en": "the purpose {purpose} is not allowed"},
        ),
    )
)

OUTCOMES = {  # what happened to a member's answer (exchange.referral's outcomes)
    "denied": {"zh": "拒绝调阅", "en": "refused"},
    "timeout": {"zh": "未在时限内答复", "en": "did not answer in time"},
    "unreachable": {"zh": "无法连接", "en": "could not be reached"},
    "invalid": {"zh": "答复无法识别", "en": "sent an answer that could not be read"},
}


def explain(
    reason: str,
    language: str,
    names: Mapping[str, str],
    local_time: Callable[[str], str],
) -> str:
    """One policy reason in ``language``; ``names``: member id to hospital name;
    ``local_time``: an instant as the reader's local time."""
    for pattern, templates in _REASONS:
        match = pattern.fullmatch(reason.strip())
        if match is None:
            continue
        fields = match.groupdict()
        if "chain" in fields:
            fields["hospital"] = names.get(fields["chain"], fields["chain"])
        if "consent" in fields:
            fields["consent"] = _short(fields["consent"])
        for name in ("member", "source"):
            if name in fields:
                fields[name] = names.get(fields[name], fields[name])
        if "time" in fields:
            fields["time"] = local_time(fields["time"])
        if "purpose" in fields and f"purpose_{fields['purpose']}" in TEXT:
            fields["purpose"] = translate(language, f"purpose_{fields['purpose']}")
        if "categories" in fields:
            fields["categories"] = "、".join(
                translate(language, f"cat_{c}") if f"cat_{c}" in TEXT else c
                for c in fields["categories"].split(", ")
            )
        return (templates.get(language) or templates["zh"]).format(**fields)
    return reason


# (code, pattern of the English text, {language: template}) of the recognition reasons
_RECOGNITION: tuple[tuple[str, re.Pattern[str], dict[str, str]], ...] = tuple(
    (code, re.compile(pattern), templates)
    for code, pattern, templates in (
        (
            "status",
            r"status (?P<status>\S+)",
            {"zh": "报告状态：{status}", "en": "status {status}"},
        ),
        (
            "not-final",
            r"status (?P<status>.+)",
            {"zh": "报告状态为 {status}，不是最终报告", "en": "status {status}: not final"},
        ),
        (
            "no-category",
            r".*",
            {
                "zh": "既不是检验结果，也不是影像检查",
                "en": "neither a laboratory nor an imaging result",
            },
        ),
        (
            "accredited",
            r"(?P<member>\S+) accredited for (?P<category>\S+) \((?P<scope>.*)\)"
            r" until (?P<until>\S+)",
            {
                "zh": "{member}具有{category}互认资质（{scope}），有效至 {until}",
                "en": "{member} is accredited for {category} ({scope}) until {until}",
            },
        ),
        (
            "not-accredited",
            r"(?P<member>\S+)'s (?P<category>\S+) accreditation ended (?P<until>\S+)",
            {
                "zh": "{member}的{category}互认资质已于 {until} 到期",
                "en": "{member}'s {category} accreditation ended {until}",
            },
        ),
        (
            "not-accredited",
            r"(?P<member>\S+) is not accredited for (?P<category>\S+)",
            {
                "zh": "{member}没有{category}互认资质",
                "en": "{member} is not accredited for {category}",
            },
        ),
        (
            "read-by",
            r"read and signed by (?P<member>\S+) for (?P<source>\S+): \S+'s level and "
            r"accreditation apply",
            {
                "zh": "由{member}为{source}远程阅片并签名：按{member}的等级和资质互认",
                "en": "read and signed by {member} for {source}: {member}'s level and "
                "accreditation apply",
            },
        ),
        (
            "reading-signature",
            r"its reading signature does not hold: (?P<why>.+)",
            {
                "zh": "远程阅片签名无效（{why}）",
                "en": "its reading signature does not hold ({why})",
            },
        ),
        (
            "not-on-list",
            r"(?P<what>.+) is not on the recognised list",
            {"zh": "{what} 不在互认项目目录中", "en": "{what} is not on the recognised list"},
        ),
        (
            "on-list",
            r".* \((?P<item>[^()]+)\) is on the recognised list",
            {"zh": "{item}在互认项目目录中", "en": "{item} is on the recognised list"},
        ),
        ("no-date", r".*", {"zh": "结果没有日期", "en": "the result has no date"}),
        (
            "within-window",
            r"taken (?P<taken>\S+), valid (?P<days>\d+) days until (?P<until>\S+)",
            {
                "zh": "{taken} 检查，{days} 天内有效，至 {until}",
                "en": "taken {taken}, valid {days} days until {until}",
            },
        ),
        (
            "expired",
            r"expired on (?P<until>\S+) \(taken (?P<taken>\S+), valid (?P<days>\d+) days\)",
            {
                "zh": "已于 {until} 过期（{taken} 检查，有效期 {days} 天）",
                "en": "expired on {until} (taken {taken}, valid {days} days)",
            },
        ),
        (
            "level",
            r"(?P<category>\S+): every member recognises every member",
            {
                "zh": "{category}：各成员机构之间互认",
                "en": "{category}: every member recognises every member",
            },
        ),
        (
            "level",
            r"(?P<category>\S+) from (?P<theirs>\S+) at (?P<mine>\S+): allowed",
            {
                "zh": "{category}：{theirs}机构的结果在{mine}机构可以互认",
                "en": "{category} from a {theirs} member at a {mine} member: allowed",
            },
        ),
        (
            "level-refused",
            r"(?P<category>\S+) from (?P<theirs>\S+) at (?P<mine>\S+):"
            r" not allowed \((?P<policy>.+)\)",
            {
                "zh": "{category}：{theirs}机构的结果在{mine}机构不能互认（须{policy}）",
                "en": "{category} from a {theirs} member at a {mine} member: not allowed "
                "({policy})",
            },
        ),
        (
            "level-unknown",
            r".*",
            {"zh": "成员机构的级别不在互认规则中", "en": "a member's level is not in the rules"},
        ),
    )
)
_POLICIES = {"same or higher": {"zh": "同级或上级", "en": "same or higher"}}
STATUSES = {  # a result's FHIR status, as a clinician reads it
    "registered": {"zh": "已登记"},
    "preliminary": {"zh": "初步"},
    "partial": {"zh": "部分"},
    "final": {"zh": "最终"},
    "amended": {"zh": "已修改"},
    "corrected": {"zh": "已更正"},
    "appended": {"zh": "已补充"},
    "cancelled": {"zh": "已取消"},
    "entered-in-error": {"zh": "录入错误"},
    "available": {"zh": "可用"},
    "unknown": {"zh": "未知"},
    "(none)": {"zh": "无"},
}


def explain_recognition(
    code: str,
    text: str,
    language: str,
    names: Mapping[str, str],
    items: Mapping[str, str],
) -> str:
    """One recognition reason in ``language``; ``names``: member id to hospital name,
    ``items``: a recognised item's id to its name in that language."""
    for known, pattern, templates in _RECOGNITION:
        match = pattern.fullmatch(text.strip()) if known == code else None
        if match is None:
            continue
        fields = match.groupdict()
        for name in ("member", "source"):
            if name in fields:
                fields[name] = names.get(fields[name], fields[name])
        if "category" in fields and f"cat_{fields['category']}" in TEXT:
            fields["category"] = translate(language, f"cat_{fields['category']}")
        if "item" in fields:
            fields["item"] = items.get(fields["item"], fields["item"])
        if "status" in fields and fields["status"] in STATUSES:
            fields["status"] = STATUSES[fields["status"]].get(language, fields["status"])
        if "policy" in fields and fields["policy"] in _POLICIES:
            words = _POLICIES[fields["policy"]]
            fields["policy"] = words.get(language) or words["zh"]
        return (templates.get(language) or templates["zh"]).format(**fields)
    return text


def outcome(kind: str, language: str) -> str:
    """What happened to a member's answer, in ``language`` (the kind itself when unknown)."""
    words = OUTCOMES.get(kind)
    return (words.get(language) or words["zh"]) if words else kind


def _short(consent_id: str) -> str:
    """A consent id as a person quotes it: its first 8 characters (a UUID's first group)."""
    return consent_id if len(consent_id) <= 8 else consent_id[:8] + "…"


def in_zone(zone: tzinfo, precision: str = "%Y-%m-%d %H:%M") -> Callable[[str], str]:
    """An instant (``2026-12-06T04:26:42.758Z``) as a time in ``zone``, by default to the
    minute (``2026-12-06 12:26``); anything else (a date, a time without a zone) as it is."""

    def local(moment: str) -> str:
        try:
            parsed = datetime.fromisoformat(str(moment).replace("Z", "+00:00"))
        except (TypeError, ValueError):
            return str(moment)
        if parsed.tzinfo is None:
            return str(moment)
        return parsed.astimezone(zone).strftime(precision)

    return local
