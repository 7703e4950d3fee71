"""The shortcut of validation (:mod:`fhir_adapters.store.shapes`) held to the full validation:
on every hosted R4B type, on resources that use every element, and on thousands of changes of
them, ``validate`` gives the same verdict and the same issues with the shortcut as without it,
and the shortcut is taken for the resources a node is usually sent."""

from __future__ import annotations

import copy
import random
import typing
from decimal import Decimal
from typing import Any

import pydantic
import pytest

from fhir_adapters.errors import FhirError
from fhir_adapters.hl7v2 import Systems, new_patient, parse_message, read_results
from fhir_adapters.store import resources, shapes
from fhir_adapters.store.resources import R4_ONLY, RESOURCE_TYPES, model_class, validate
from tests.helpers.hl7_messages import ALL_SAMPLES, sample
from tests.helpers.minimal import minimal
from tests.helpers.ndjson import cohort_resources

R4B_TYPES = [t for t in RESOURCE_TYPES if t not in R4_ONLY and t != "Parameters"]

# A valid value of each primitive, by the marker class of its annotation.
_PRIMITIVES: dict[str, Any] = {
    "Id": "a-1.b",
    "Uri": "urn:x:甲",
    "Code": "x",
    "String": "甲 x\ny",
    "DateTime": "2024-03-01T08:00:00+08:00",
    "Decimal": Decimal("1.50"),
    "Markdown": "**x**",
    "EncodedBytes": "eA==",
    "UnsignedInt": 0,
    "Url": "http://x.test/a",
    "Canonical": "http://x.test/c|1",
    "PositiveInt": 1,
    "Date": "2024-03",
    "Integer": -1,
    "Time": "08:00:00",
    "Instant": "2024-03-01T08:00:00.000+08:00",
    "Oid": "urn:oid:1.2.3",
    "Xhtml": '<div xmlns="http://www.w3.org/1999/xhtml">x</div>',
}


def _primitive_value(model_type: Any, json_name: str) -> Any:
    attribute = shapes.field_kinds(model_type)[json_name][0]
    item = shapes._item_annotation(model_type.model_fields[attribute].annotation)
    if item is bool:
        return True
    marker = typing.get_args(item)[1:]
    return _PRIMITIVES[type(marker[0]).__name__]


def full(model_type: Any, depth: int = 0) -> dict[str, Any]:
    """An instance of ``model_type`` with every element it may hold filled (one form of each
    choice): primitives everywhere, complex elements to two levels and required ones below."""
    shape = shapes.shape_of(model_type)
    skipped = {name for names, _ in shape.choices for name in names[1:]}
    out: dict[str, Any] = {}
    for name, element in shape.elements.items():
        needed = name in shape.required or any(
            names[0] == name and required for names, required in shape.choices
        )
        if name in skipped or (element.primitive is None and depth >= 2 and not needed):
            continue
        if element.primitive is None and element.shape is None:  # contained
            value = {"resourceType": "Specimen", "id": "c1", "type": {"text": "全血"}}
        elif element.primitive is not None:
            allowed = element.primitive.allowed
            value = sorted(allowed)[0] if allowed else _primitive_value(model_type, name)
        else:
            target = next(t for t in shapes.annotation_models(_annotation(model_type, name)))
            value = full(target, depth + 1)
            if not value:
                continue
        out[name] = [value] if element.is_list else value
    for names, needed in shape.choices:
        if needed and not any(n in out for n in names):
            return out  # cannot fill it at this depth: the resource is left invalid
    return out


def _annotation(model_type: Any, json_name: str) -> Any:
    attribute = shapes.field_kinds(model_type)[json_name][0]
    return model_type.model_fields[attribute].annotation


def outcome(resource: Any, resource_type: str | None = None) -> Any:
    """What ``validate`` does with a copy of ``resource``: the resource, or the error."""
    try:
        return ("stored", validate(copy.deepcopy(resource), resource_type))
    except FhirError as exc:
        return (type(exc).__name__, str(exc), [vars(issue) for issue in exc.issues])


def without_shortcut(monkeypatch: pytest.MonkeyPatch, resource: Any) -> Any:
    with monkeypatch.context() as patch:
        patch.setattr(resources, "certainly_valid", lambda resource, model_type: False)
        return outcome(resource)


@pytest.fixture(scope="module")
def samples() -> list[dict[str, Any]]:
    found = [{"resourceType": t, **full(model_class(t))} for t in R4B_TYPES]
    found += [minimal(t, "Patient/p1") for t in R4B_TYPES]
    for name in ALL_SAMPLES:  # what the HL7 adapter makes of the sample messages
        for group in read_results(parse_message(sample(name)), Systems("hosp-a")):
            found.append(new_patient(group.patient))
            for order in group.orders:
                found.append(order.report("p1"))
                found += [result.observation("p1") for result in order.results]
    seen: set[str] = set()
    for resource in cohort_resources(3):
        if resource["resourceType"] not in seen:
            seen.add(resource["resourceType"])
            found.append(resource)
    return found


def test_the_shortcut_is_taken_for_valid_resources_of_every_type(
    samples: list[dict[str, Any]],
) -> None:
    refused = []
    for resource in samples:
        verdict = outcome(resource)
        if verdict[0] == "stored" and not shapes.certainly_valid(
            resource, model_class(resource["resourceType"])
        ):
            refused.append(resource["resourceType"])
    assert not refused, refused
    assert sum(outcome(r)[0] == "stored" for r in samples) >= 2 * len(R4B_TYPES) + 20


# What a value may be changed into: wrong JSON types, nulls and empties, strings each
# primitive refuses or barely accepts, numbers at their limits, extensions and objects.
_REPLACEMENTS: list[Any] = [
    None,
    "",
    " ",
    "\x01x",
    "x",
    " a",
    "a  b",
    "a\tb",
    "bogus",
    "final",
    "男",
    "a" * 65,
    "eA=",
    "2024-02-30",
    "2024-03-01T08:00:00",
    "2024-03-01T08:00",
    "2016-12-31T23:59:60Z",
    "2024-03-01T24:00:00+08:00",
    "24:00:00",
    "0001-01-01",
    "urn:oid:1.02",
    "http://x y",
    "urn:uuid:c757873d-ec9a-4326-a141-556f43239520",
    0,
    -1,
    1,
    2**31,
    -(2**31) - 1,
    10**40,
    Decimal("1.5"),
    Decimal("-0.0"),
    Decimal("1E+400"),
    Decimal("1" * 40),
    True,
    False,
    {},
    [],
    [None],
    ["x"],
    ["x", None],
    {"x": 1},
    {"extension": [{"url": "urn:x", "valueString": "x"}]},
    {"reference": "Patient/p1"},
    {"resourceType": "Patient"},
]
_ADDED_KEYS: list[tuple[str, Any]] = [
    ("foo", "x"),
    ("fhir_comments", "x"),
    ("resourceType", "Patient"),
    ("extension", [{"url": "urn:x", "valueString": "x"}]),
    ("extension", [{"url": "urn:x"}]),
    ("extension", [{"url": "urn:x", "valueString": "x", "valueBoolean": True}]),
    ("modifierExtension", [{"url": "urn:x", "valueCode": "x"}]),
    ("id", "a b"),
    ("contained", [{"resourceType": "Patient", "id": "c1"}]),
    ("text", {"status": "generated", "div": "<div>x</div>"}),
]


_VALUE_FORMS = ("valueString", "valueQuantity", "valueBoolean")


def _places(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a parsed JSON value, as a path of keys and indexes."""
    found = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _places(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _places(item, (*path, index))
    return found


def _at(value: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        value = value[step]
    return value


def changed(resource: dict[str, Any], chance: random.Random) -> dict[str, Any]:
    """``resource`` with one or two random changes."""
    out = copy.deepcopy(resource)
    for _ in range(chance.choice((1, 1, 2))):
        places = _places(out)
        path = chance.choice(places[1:] or places)
        parent = _at(out, path[:-1]) if path else out
        key = path[-1] if path else None
        how = chance.randrange(9)
        target = _at(out, path)
        if how == 0 and isinstance(parent, dict) and key is not None:
            del parent[key]
        elif how == 1 and isinstance(target, dict):
            name, value = chance.choice(_ADDED_KEYS)
            target[name] = copy.deepcopy(value)
        elif how == 2 and isinstance(target, dict) and target:
            # a sibling's value, another form of a choice, a primitive's extension, the
            # models' Python spelling of a name
            name = chance.choice(list(target))
            other = chance.choice(list(target))
            target[chance.choice((f"_{name}", f"{name}__ext", f"{name}_fhir", other + "X"))] = (
                copy.deepcopy(target[other])
            )
        elif how == 3 and isinstance(target, dict):  # a form of value[x], maybe a second one
            target[chance.choice(_VALUE_FORMS)] = chance.choice(("x", {"value": 1}, True))
        elif how == 4 and key is not None:
            parent[key] = target[0] if isinstance(target, list) and target else [target]
        elif key is not None:
            parent[key] = copy.deepcopy(chance.choice(_REPLACEMENTS))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_changed_resources_get_the_same_verdict_and_issues_with_the_shortcut_as_without(
    samples: list[dict[str, Any]], seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    chance = random.Random(seed)
    taken = 0
    for resource in samples:
        for _ in range(3):
            variant = changed(resource, chance)
            with_shortcut = outcome(variant)
            assert with_shortcut == without_shortcut(monkeypatch, variant), variant
            taken += with_shortcut[0] == "stored" and shapes.certainly_valid(
                variant, model_class(variant["resourceType"])
            )
    assert taken >= len(samples) // 3  # changes the shortcut vouched for were among them


def _observation(**changes: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": "o1",
        "status": "final",
        "category": [{"coding": [{"system": "urn:x", "code": "laboratory"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}], "text": "血红蛋白"},
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": "2024-03-01T08:00:00+08:00",
        "valueQuantity": {"value": Decimal("13.50"), "unit": "g/dL", "code": "g/dL"},
        "referenceRange": [{"low": {"value": 12}, "high": {"value": Decimal("15.5")}}],
    }
    for name, value in changes.items():
        if value is _GONE:
            del resource[name]
        else:
            resource[name] = value
    return resource


_GONE = object()


def _nested_extension(levels: int) -> dict[str, Any]:
    """An extension holding an extension ... ``levels`` deep (two JSON levels each)."""
    inner: dict[str, Any] = {"url": "urn:x", "valueString": "x"}
    for _ in range(levels):
        inner = {"url": "urn:x", "extension": [inner]}
    return inner


# Each rule of the shortcut, broken once: the shortcut must not vouch for any of these.
NOT_VOUCHED = {
    "an unknown element": _observation(foo="x"),
    "a primitive's extension": _observation(_status={"extension": [{"url": "urn:x"}]}),
    "a contained resource's own contained": _observation(
        contained=[
            {"resourceType": "Patient", "id": "c", "contained": [{"resourceType": "Patient"}]}
        ]
    ),
    "a contained resource of no type": _observation(contained=[{"id": "c"}]),
    "a contained resource of an unknown type": _observation(contained=[{"resourceType": "Foo"}]),
    "a contained datatype": _observation(contained=[{"resourceType": "Coding", "code": "x"}]),
    "a contained resource of a type in R4 only": _observation(
        contained=[{"resourceType": "SubstancePolymer", "id": "c"}]
    ),
    "a contained resource refused by its type": _observation(
        contained=[{"resourceType": "Patient", "id": "c", "gender": "x"}]
    ),
    "the models' Python name": _observation(status__ext={"id": "x"}),
    "a comment": _observation(fhir_comments="x"),
    "a resourceType inside": _observation(subject={"reference": "Patient/p", "resourceType": "x"}),
    "a null": _observation(issued=None),
    "a null in an array": _observation(category=[None]),
    "an empty object": _observation(subject={}),
    "an empty array": _observation(category=[]),
    "an empty string": _observation(status=""),
    "a blank string": _observation(valueString=" ", valueQuantity=_GONE),
    "a control character": _observation(valueString="a\x07", valueQuantity=_GONE),
    "a string for a boolean": _observation(valueBoolean="true", valueQuantity=_GONE),
    "a number for a dateTime": _observation(effectiveDateTime=7),
    "a decimal for an integer": _observation(valueInteger=Decimal("7.0"), valueQuantity=_GONE),
    "a boolean for an integer": _observation(valueInteger=True, valueQuantity=_GONE),
    "a string for a decimal": _observation(valueQuantity={"value": "13.5"}),
    "an array for a single value": _observation(subject=[{"reference": "Patient/p1"}]),
    "a single value for an array": _observation(category={"text": "x"}),
    "a string for an object": _observation(code="718-7"),
    "an object for a string": _observation(status={"code": "final"}),
    "an integer too long": _observation(valueInteger=10**40, valueQuantity=_GONE),
    "a decimal too precise": _observation(valueQuantity={"value": Decimal("1." + "1" * 40)}),
    "an integer out of range": _observation(valueInteger=2**31, valueQuantity=_GONE),
    "no such date": _observation(effectiveDateTime="2024-02-30"),
    "a time without its zone": _observation(effectiveDateTime="2024-03-01T08:00:00"),
    "a code with two spaces": _observation(language="zh  CN"),
    "two forms of a choice": _observation(valueString="x"),
    "two forms of a choice inside": _observation(
        component=[{"code": {"text": "x"}, "valueString": "x", "valueBoolean": True}]
    ),
    "a required choice missing": {
        "resourceType": "MedicationRequest",
        "status": "active",
        "intent": "order",
        "subject": {"reference": "Patient/p1"},
    },
    "a required element missing": _observation(code=_GONE),
    "a required primitive missing": _observation(status=_GONE),
    "nested too deeply for the walk": _observation(extension=[_nested_extension(16)]),
}


@pytest.mark.parametrize("case", NOT_VOUCHED)
def test_the_shortcut_does_not_vouch_for_what_breaks_one_of_its_rules(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    resource = NOT_VOUCHED[case]
    assert not shapes.certainly_valid(resource, model_class(resource["resourceType"]))
    assert outcome(resource) == without_shortcut(monkeypatch, resource)


def test_the_rules_hold_at_their_edges() -> None:
    observation = model_class("Observation")
    assert shapes.certainly_valid(_observation(), observation)
    assert shapes.certainly_valid(_observation(extension=[_nested_extension(14)]), observation)
    assert shapes.certainly_valid(
        _observation(valueInteger=2**31 - 1, valueQuantity=_GONE), observation
    )
    assert shapes.certainly_valid(_observation(valueQuantity={"value": 13}), observation)
    assert shapes.certainly_valid(
        _observation(valueBoolean=False, valueQuantity=_GONE), observation
    )
    assert shapes.certainly_valid(_observation(effectiveDateTime="2024"), observation)
    contained = {"resourceType": "Specimen", "id": "s", "type": {"text": "全血"}}
    assert shapes.certainly_valid(_observation(contained=[contained]), observation)


def test_a_string_accepted_for_one_element_is_not_taken_for_another() -> None:
    assert shapes.certainly_valid(_observation(status="final"), model_class("Observation"))
    patient = {"resourceType": "Patient", "gender": "final"}
    assert not shapes.certainly_valid(patient, model_class("Patient"))
    with pytest.raises(FhirError, match="is not one of male"):
        validate(patient)


def test_the_strings_remembered_are_bounded() -> None:
    observation = model_class("Observation")
    for number in range(shapes._SEEN_LIMIT + 10):
        assert shapes.certainly_valid(
            _observation(valueString=f"v{number}", valueQuantity=_GONE), observation
        )
    remembered = shapes.shape_of(observation).elements["valueString"].primitive
    assert remembered is not None and 0 < len(remembered.seen) <= shapes._SEEN_LIMIT


def test_a_class_with_rules_of_its_own_is_left_to_the_models() -> None:
    from fhir.resources.R4B.coding import Coding

    class StrictCoding(Coding):
        @pydantic.field_validator("code")
        @classmethod
        def upper(cls, value: Any) -> Any:
            return value

    assert shapes.shape_of(StrictCoding).elements == {}
    assert shapes.shape_of(Coding).elements
    assert not shapes.certainly_valid({"code": "x"}, StrictCoding)
