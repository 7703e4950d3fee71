"""Mutual recognition of results (检查检验结果互认, docs/spec.md §17): rules as data, and verdicts.

A result from another member is *recognised* (mark ``HR``) when all of these hold, and each is
a reason of the verdict either way:

- its status is final (``final``, ``amended``, ``corrected``, or ``available`` for an
  ImagingStudy);
- the issuing member holds a current accreditation for the result's category in the roster
  (an ``accreditation`` item of that category whose ``until`` date has not passed);
- the item is on the consortium's list: lab items by code (LOINC where known, local codes
  too), imaging by DICOM modality and body site;
- it is within the item's validity window (days from the result's date, inclusive);
- the member levels allow it: per category, ``any_member`` (all members of one 医联体/医共体
  recognise each other), ``same_or_higher`` (a result from a hospital of the same or a higher
  level), or ``same_level``.

The rules — item list, windows, prices in fen, level policies — are a JSON file: the default
(:data:`DEFAULT_RULES`, after Zhejiang's one-month practice for imaging and Jiangsu's level
rules) or the consortium's own (``exchange.rules`` in the node config).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

DEFAULT_RULES = Path(__file__).with_name("rules") / "default.json"
CATEGORIES = ("laboratory", "imaging")
LEVEL_POLICIES = ("any_member", "same_or_higher", "same_level")
FINAL_STATUSES = ("final", "amended", "corrected", "available")
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
DICOM_MODALITY = "http://dicom.nema.org/resources/ontology/DCM"
BODY_SITE = "http://hl7.org/fhir/StructureDefinition/bodySite"  # an imaging report's site
LAB_SECTIONS = {"LAB", "HM", "CH", "SR", "MB", "IMM", "BLB", "SP", "CP", "OSL"}
IMAGING_SECTIONS = {"RAD", "CT", "CTH", "MR", "NMR", "NMS", "RUS", "VUS", "XRC", "OUS", "RX"}


class RulesError(ValueError):
    """A rules file that cannot be used, naming what is wrong in it."""


@dataclass(frozen=True)
class Item:
    id: str
    category: str
    name: Mapping[str, str]
    codes: frozenset[str] = frozenset()  # "system|code"
    modality: str | None = None
    body_sites: frozenset[str] = frozenset()  # SNOMED codes and lower-case words
    validity_days: int = 0
    price_fen: int = 0

    def label(self, language: str = "zh") -> str:
        return self.name.get(language) or self.name.get("zh") or self.id


@dataclass(frozen=True)
class Rules:
    name: str
    version: str
    zone: timezone
    ranks: Mapping[str, int]
    level_policy: Mapping[str, str]
    items: tuple[Item, ...]
    _by_code: dict[str, Item] = field(default_factory=dict, compare=False, repr=False)

    def item_for(self, result: Result) -> Item | None:
        if result.category == "laboratory":
            for code in result.codes:
                if code in self._by_code:
                    return self._by_code[code]
            return None
        if result.category == "imaging":
            for item in self.items:
                if (
                    item.category == "imaging"
                    and item.modality == result.modality
                    and item.body_sites & set(result.body_sites)
                ):
                    return item
        return None

    def item_for_order(self, order: Mapping[str, Any]) -> Item | None:
        """The item a ServiceRequest orders: a lab item by one of its codes, an imaging item
        by a DICOM modality among its codes and its body site."""
        codings = _codings(order.get("code"))
        for coding in codings:
            item = self._by_code.get(f"{coding.get('system')}|{coding.get('code')}")
            if item is not None:
                return item
        modalities = {c.get("code") for c in codings if c.get("system") in (DICOM_MODALITY, None)}
        sites: set[str] = set()
        for site in order.get("bodySite", []):
            for coding in _codings(site):
                sites |= {
                    str(coding.get(k, "")).lower() for k in ("code", "display") if coding.get(k)
                }
            if isinstance(site, dict) and site.get("text"):
                sites.add(str(site["text"]).lower())
        for item in self.items:
            if (
                item.category == "imaging"
                and item.modality in modalities
                and item.body_sites & sites
            ):
                return item
        return None

    def item(self, item_id: str) -> Item | None:
        return next((item for item in self.items if item.id == item_id), None)

    def rank(self, level: str | None) -> int | None:
        for prefix, rank in self.ranks.items():
            if level and level.startswith(prefix):
                return rank
        return None


def load_rules(path: Path | None = None) -> Rules:
    """Read and check a rules file (default: the shipped one)."""
    path = path or DEFAULT_RULES
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RulesError(f"{path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise RulesError(f"{path}: not JSON: {exc}") from None
    return parse_rules(data, str(path))


def parse_rules(data: Any, where: str = "rules") -> Rules:
    def fail(message: str) -> RulesError:
        return RulesError(f"{where}: {message}")

    if not isinstance(data, dict):
        raise fail("a rules file is a JSON object")
    zone_text = data.get("time_zone", "+08:00")
    match = re.fullmatch(r"([+-])([0-9]{2}):([0-9]{2})", str(zone_text))
    if not match:
        raise fail(f"time_zone {zone_text!r} is not like +08:00")
    sign = -1 if match[1] == "-" else 1
    zone = timezone(sign * timedelta(hours=int(match[2]), minutes=int(match[3])))
    levels = data.get("levels") or {}
    ranks = levels.get("ranks") or {}
    if not isinstance(ranks, dict) or not all(type(v) is int for v in ranks.values()):
        raise fail("levels.ranks maps level names to whole numbers")
    policy = {}
    for category in CATEGORIES:
        chosen = levels.get(category, "any_member")
        if chosen not in LEVEL_POLICIES:
            raise fail(f"levels.{category} {chosen!r} is not one of {', '.join(LEVEL_POLICIES)}")
        policy[category] = chosen
    items: list[Item] = []
    seen: set[str] = set()
    for index, raw in enumerate(data.get("items") or []):
        place = f"items[{index}]"
        if not isinstance(raw, dict) or not isinstance(raw.get("id"), str):
            raise fail(f"{place} needs an id")
        if raw["id"] in seen:
            raise fail(f"{place}: id {raw['id']!r} is listed twice")
        seen.add(raw["id"])
        kind = raw.get("category")
        if kind not in CATEGORIES:
            raise fail(f"{place}: category {kind!r} is not one of {', '.join(CATEGORIES)}")
        for number in ("validity_days", "price_fen"):
            if type(raw.get(number)) is not int or raw[number] < 0:
                raise fail(f"{place}: {number} must be a whole number of at least 0")
        name = raw.get("name")
        if not isinstance(name, dict) or not all(isinstance(v, str) for v in name.values()):
            raise fail(f"{place}: name maps languages to text")
        codes = raw.get("codes", [])
        if kind == "laboratory" and (
            not codes or not all(isinstance(c, str) and "|" in c for c in codes)
        ):
            raise fail(f"{place}: a laboratory item lists codes as 'system|code'")
        if kind == "imaging" and (
            not isinstance(raw.get("modality"), str) or not raw.get("body_sites")
        ):
            raise fail(f"{place}: an imaging item names a modality and body_sites")
        items.append(
            Item(
                id=raw["id"],
                category=str(kind),
                name=dict(name),
                codes=frozenset(codes),
                modality=raw.get("modality"),
                body_sites=frozenset(str(s).lower() for s in raw.get("body_sites", [])),
                validity_days=raw["validity_days"],
                price_fen=raw["price_fen"],
            )
        )
    by_code = {code: item for item in items for code in item.codes}
    return Rules(
        name=str(data.get("name", "")),
        version=str(data.get("version", "")),
        zone=zone,
        ranks=dict(ranks),
        level_policy=policy,
        items=tuple(items),
        _by_code=by_code,
    )


# -- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """What a verdict needs of one prior result (Observation, DiagnosticReport, ImagingStudy)."""

    resource_type: str
    category: str | None
    codes: tuple[str, ...]
    modality: str | None
    body_sites: tuple[str, ...]
    when: datetime | None
    status: str


def _codings(concept: Any) -> list[dict[str, Any]]:
    return [c for c in (concept or {}).get("coding", []) if isinstance(c, dict)]


def _when(resource: Mapping[str, Any], zone: timezone) -> datetime | None:
    for name in ("effectiveDateTime", "started", "issued"):
        value = resource.get(name)
        if isinstance(value, str):
            return _parse_time(value, zone)
    period = resource.get("effectivePeriod")
    if isinstance(period, dict) and isinstance(period.get("start"), str):
        return _parse_time(period["start"], zone)
    return None


def _parse_time(text: str, zone: timezone) -> datetime | None:
    try:
        if len(text) == 10:
            return datetime.fromisoformat(text).replace(tzinfo=zone)
        if len(text) in (4, 7):
            return datetime.fromisoformat((text + "-01-01")[:10]).replace(tzinfo=zone)
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return moment if moment.tzinfo else moment.replace(tzinfo=zone)
    except ValueError:
        return None


def result_of(resource: Mapping[str, Any], zone: timezone) -> Result:
    """The facts of a FHIR resource that decide its recognition."""
    kind = str(resource.get("resourceType"))
    status = str(resource.get("status", ""))
    category: str | None = None
    codes: list[str] = []
    modality: str | None = None
    sites: list[str] = []
    if kind in ("Observation", "DiagnosticReport"):
        for concept in resource.get("category", []):
            for coding in _codings(concept):
                code = coding.get("code")
                if coding.get("system") == OBSERVATION_CATEGORY and code in CATEGORIES:
                    category = code
                elif coding.get("system") == V2_0074 and code in LAB_SECTIONS:
                    category = "laboratory"
                elif coding.get("system") == V2_0074 and code in IMAGING_SECTIONS:
                    category = "imaging"
        codes = [f"{c.get('system')}|{c.get('code')}" for c in _codings(resource.get("code"))]
        if kind == "DiagnosticReport" and category == "imaging":  # a read: its study's facts
            modality = next(
                (
                    str(coding.get("code"))
                    for concept in [*resource.get("category", []), resource.get("code")]
                    for coding in _codings(concept)
                    if coding.get("system") == DICOM_MODALITY
                ),
                None,
            )
            for extension in resource.get("extension", []):
                if isinstance(extension, dict) and extension.get("url") == BODY_SITE:
                    concept = extension.get("valueCodeableConcept") or {}
                    sites += [
                        str(c.get(k, "")).lower()
                        for c in _codings(concept)
                        for k in ("code", "display")
                        if c.get(k)
                    ]
                    if isinstance(concept, dict) and concept.get("text"):
                        sites += [w.strip().lower() for w in str(concept["text"]).split(",")]
    elif kind == "ImagingStudy":
        category = "imaging"
        modalities = [c.get("code") for c in resource.get("modality", []) if isinstance(c, dict)]
        for series in resource.get("series", []):
            if isinstance(series, dict):
                modalities.append((series.get("modality") or {}).get("code"))
                site = series.get("bodySite") or {}
                sites += [str(site.get(k, "")).lower() for k in ("code", "display") if site.get(k)]
        modality = next((m for m in modalities if isinstance(m, str)), None)
    return Result(
        kind, category, tuple(codes), modality, tuple(sites), _when(resource, zone), status
    )


# -- verdicts --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reason:
    code: str  # e.g. "expired", "not-accredited": stable, for programs and tests
    text: str
    positive: bool


@dataclass(frozen=True)
class Verdict:
    recognised: bool
    reasons: tuple[Reason, ...]
    item: Item | None
    valid_until: date | None

    @property
    def mark(self) -> str | None:
        return "HR" if self.recognised else None

    def negative(self) -> list[Reason]:
        return [r for r in self.reasons if not r.positive]


def verdict(
    rules: Rules,
    result: Result,
    issuer: Mapping[str, Any],
    here: Mapping[str, Any],
    today: date,
    reading: tuple[Mapping[str, Any] | None, str | None] = (None, None),
) -> Verdict:
    """Is ``result``, issued by roster member ``issuer``, recognised at member ``here`` on
    ``today``? Every condition gives a reason, met or not. ``reading``: for a report read
    remotely, the roster entry of the member whose reading signature it carries (its level
    and accreditation then stand for the issuer's), or why that signature does not hold."""
    reasons: list[Reason] = []

    def add(ok: bool, code: str, text: str) -> None:
        reasons.append(Reason(code, text, ok))

    reader, broken = reading
    if broken is not None:
        add(False, "reading-signature", f"its reading signature does not hold: {broken}")
    elif reader is not None:
        add(
            True,
            "read-by",
            f"read and signed by {reader.get('id')} for {issuer.get('id')}: "
            f"{reader.get('id')}'s level and accreditation apply",
        )
        issuer = reader

    add(
        result.status in FINAL_STATUSES,
        "status" if result.status in FINAL_STATUSES else "not-final",
        f"status {result.status or '(none)'}",
    )
    category = result.category
    issuer_id = str(issuer.get("id"))
    if category not in CATEGORIES:
        add(False, "no-category", "neither a laboratory nor an imaging result")
    else:
        current = [
            a
            for a in issuer.get("accreditation", [])
            if a.get("category") == category and str(a.get("until", "")) >= today.isoformat()
        ]
        lapsed = [a for a in issuer.get("accreditation", []) if a.get("category") == category]
        if current:
            best = max(current, key=lambda a: str(a["until"]))
            add(
                True,
                "accredited",
                f"{issuer_id} accredited for {category} ({best.get('scope')}) "
                f"until {best['until']}",
            )
        elif lapsed:
            until = max(str(a.get("until")) for a in lapsed)
            add(False, "not-accredited", f"{issuer_id}'s {category} accreditation ended {until}")
        else:
            add(False, "not-accredited", f"{issuer_id} is not accredited for {category}")
    item = rules.item_for(result)
    valid_until = None
    if item is None:
        what = (
            ", ".join(result.codes) or "no code"
            if category == "laboratory"
            else f"{result.modality or '?'} {'/'.join(result.body_sites) or '?'}"
        )
        add(False, "not-on-list", f"{what} is not on the recognised list")
    else:
        add(True, "on-list", f"{item.label('en')} ({item.id}) is on the recognised list")
        if result.when is None:
            add(False, "no-date", "the result has no date")
        else:
            taken = result.when.astimezone(rules.zone).date()
            valid_until = taken + timedelta(days=item.validity_days)
            add(
                today <= valid_until,
                "within-window" if today <= valid_until else "expired",
                (
                    f"taken {taken}, valid {item.validity_days} days until {valid_until}"
                    if today <= valid_until
                    else f"expired on {valid_until} (taken {taken}, valid "
                    f"{item.validity_days} days)"
                ),
            )
    if category in CATEGORIES:
        policy = rules.level_policy[category]
        if policy == "any_member":
            add(True, "level", f"{category}: every member recognises every member")
        else:
            mine, theirs = rules.rank(here.get("level")), rules.rank(issuer.get("level"))
            if mine is None or theirs is None:
                add(False, "level-unknown", "a member's level is not in the rules")
            else:
                ok = theirs >= mine if policy == "same_or_higher" else theirs == mine
                add(
                    ok,
                    "level" if ok else "level-refused",
                    f"{category} from {issuer.get('level')} at {here.get('level')}: "
                    + ("allowed" if ok else f"not allowed ({policy.replace('_', ' ')})"),
                )
    recognised = all(r.positive for r in reasons)
    return Verdict(recognised, tuple(reasons), item, valid_until)


# Why a doctor may order an exam again despite a recognised result (2022 national measures):
# condition changed, fast-changing result, critical decision (surgery, transfusion...),
# emergency, forensic or disability appraisal, other (with text).
REORDER_REASONS = (
    "condition-changed",
    "fast-changing",
    "critical-decision",
    "emergency",
    "appraisal",
    "other",
)
