"""The code values of FHIR R4 (4.0.1) elements with a *required* binding, checked on validated
``fhir.resources.R4B`` model instances.

The R4B models check structure and types but not code values (a Patient of gender ``"bogus"``
passes them), and the ``enum_values`` hints in their field metadata are parsed from the short
descriptions, not from the bindings: Observation.status lists ``"+"`` and stops at
``amended``, and Expression.language, whose binding is only extensible, has one too. So the
table below is written from the R4 4.0.1 definitions of the hosted resource types (Patient,
Practitioner, Organization, Observation, DiagnosticReport, ImagingStudy, ServiceRequest,
Consent, AuditEvent, Provenance) and of every datatype they can contain, extensions' values
included. For these ten resources R4B has the same elements as R4 (compared field by
field) and, as far as known, the same required value sets; R4B's two new datatypes
(CodeableReference, RatioRange, allowed as extension values in R4B only) have no coded
elements of their own and are walked like any other.

Required bindings deliberately not checked, because their value set is not a small enumerated
list: Attachment.contentType, Signature.targetFormat and Signature.sigFormat (any MIME type,
BCP 13), Money.currency (ISO 4217), DataRequirement.type and ParameterDefinition.type
(FHIRAllTypes, some 200 codes). Not required in R4, so not checked either: Resource.language
and Attachment.language (preferred), Expression.language and Reference.type (extensible), and
every CodeableConcept or Coding of these resources (none has a required binding in R4).

Codes are case-sensitive: ``"Male"`` is refused. A location is a FHIRPath-style expression
with the JSON names (``Observation.valueQuantity.comparator``, ``Patient.telecom[1].system``,
``Consent.provision.provision[0].type``); a repeating element always has its index, including
``contained[i]``, and the extensions of a primitive are found under the primitive's name
(``Patient.birthDate.extension[0].valueIdentifier.use``).

The walk is generic over the pydantic fields: a plan is made once per model class, keyed by
(R4B class name, JSON element name), listing the code fields to check and the fields that can
hold another model; fields that can hold only primitives are never looked at. Measured with
timeit (100,000 runs, Python 3.11, pydantic 2.13): a typical laboratory Observation
(narrative, identifier, category, LOINC code, subject, valueQuantity, interpretation,
reference range) takes about 7.5 µs, a Patient with name, telecom, address and a contact
about 5 µs; validating that Observation into its R4B model takes about 180 µs.
"""

from __future__ import annotations

import importlib
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from fhir_core.fhirabstractmodel import FHIRAbstractModel

__all__ = ["CodeIssue", "annotation_models", "code_issues", "required_binding"]

_R4B: Final = "fhir.resources.R4B."

# Value sets, each in the order of the R4 4.0.1 specification.
_GENDER: Final = ("male", "female", "other", "unknown")
_COMPARATOR: Final = ("<", "<=", ">=", ">")
_UNITS_OF_TIME: Final = ("s", "min", "h", "d", "wk", "mo", "a")
_DAYS_OF_WEEK: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
# EventTiming: the codes of http://hl7.org/fhir/event-timing, then those it takes from v3
# TimingEvent (the v3 codes IC, ICM, ICD and ICV are not in the R4 value set).
_EVENT_TIMING: Final = (
    "MORN",
    "MORN.early",
    "MORN.late",
    "NOON",
    "AFT",
    "AFT.early",
    "AFT.late",
    "EVE",
    "EVE.early",
    "EVE.late",
    "NIGHT",
    "PHS",
    "HS",
    "WAKE",
    "C",
    "CM",
    "CD",
    "CV",
    "AC",
    "ACM",
    "ACD",
    "ACV",
    "PC",
    "PCM",
    "PCD",
    "PCV",
)
_PROVISION_TYPE: Final = ("deny", "permit")

# (R4B model class name, JSON element name) -> the codes its required binding allows.
# Backbone elements are named as in fhir.resources: Patient.link is PatientLink,
# Timing.repeat is TimingRepeat, Consent.provision (at any depth) is ConsentProvision.
_BINDINGS: Final[dict[tuple[str, str], tuple[str, ...]]] = {
    # Datatypes
    ("Address", "use"): ("home", "work", "temp", "old", "billing"),
    ("Address", "type"): ("postal", "physical", "both"),
    ("ContactPoint", "system"): ("phone", "fax", "email", "pager", "url", "sms", "other"),
    ("ContactPoint", "use"): ("home", "work", "temp", "old", "mobile"),
    ("HumanName", "use"): ("usual", "official", "temp", "nickname", "anonymous", "old", "maiden"),
    ("Identifier", "use"): ("usual", "official", "temp", "secondary", "old"),
    ("Narrative", "status"): ("generated", "extensions", "additional", "empty"),
    # Quantity and its specialisations (SimpleQuantity and MoneyQuantity are Quantity here).
    ("Quantity", "comparator"): _COMPARATOR,
    ("Age", "comparator"): _COMPARATOR,
    ("Count", "comparator"): _COMPARATOR,
    ("Distance", "comparator"): _COMPARATOR,
    ("Duration", "comparator"): _COMPARATOR,
    ("TimingRepeat", "durationUnit"): _UNITS_OF_TIME,
    ("TimingRepeat", "periodUnit"): _UNITS_OF_TIME,
    ("TimingRepeat", "dayOfWeek"): _DAYS_OF_WEEK,
    ("TimingRepeat", "when"): _EVENT_TIMING,
    ("Contributor", "type"): ("author", "editor", "reviewer", "endorser"),
    ("DataRequirementSort", "direction"): ("ascending", "descending"),
    ("ParameterDefinition", "use"): ("in", "out"),
    ("RelatedArtifact", "type"): (
        "documentation",
        "justification",
        "citation",
        "predecessor",
        "successor",
        "derived-from",
        "depends-on",
        "composed-of",
    ),
    ("TriggerDefinition", "type"): (
        "named-event",
        "periodic",
        "data-changed",
        "data-added",
        "data-modified",
        "data-removed",
        "data-accessed",
        "data-access-ended",
    ),
    # Resources (Organization has no coded element with a required binding of its own)
    ("Patient", "gender"): _GENDER,
    ("PatientContact", "gender"): _GENDER,
    ("PatientLink", "type"): ("replaced-by", "replaces", "refer", "seealso"),
    ("Practitioner", "gender"): _GENDER,
    ("Observation", "status"): (
        "registered",
        "preliminary",
        "final",
        "amended",
        "corrected",
        "cancelled",
        "entered-in-error",
        "unknown",
    ),
    ("DiagnosticReport", "status"): (
        "registered",
        "partial",
        "preliminary",
        "final",
        "amended",
        "corrected",
        "appended",
        "cancelled",
        "entered-in-error",
        "unknown",
    ),
    ("ImagingStudy", "status"): (
        "registered",
        "available",
        "cancelled",
        "entered-in-error",
        "unknown",
    ),
    ("ServiceRequest", "status"): (
        "draft",
        "active",
        "on-hold",
        "revoked",
        "completed",
        "entered-in-error",
        "unknown",
    ),
    ("ServiceRequest", "intent"): (
        "proposal",
        "plan",
        "directive",
        "order",
        "original-order",
        "reflex-order",
        "filler-order",
        "instance-order",
        "option",
    ),
    ("ServiceRequest", "priority"): ("routine", "urgent", "asap", "stat"),
    ("Consent", "status"): (
        "draft",
        "proposed",
        "active",
        "rejected",
        "inactive",
        "entered-in-error",
    ),
    ("ConsentProvision", "type"): _PROVISION_TYPE,
    ("ConsentProvisionData", "meaning"): ("instance", "related", "dependents", "authoredby"),
    ("AuditEvent", "action"): ("C", "R", "U", "D", "E"),
    ("AuditEvent", "outcome"): ("0", "4", "8", "12"),
    ("AuditEventAgentNetwork", "type"): ("1", "2", "3", "4", "5"),
    ("ProvenanceEntity", "role"): ("derivation", "revision", "quotation", "source", "removal"),
}

# Declared types that stand for any resource (or element): what such a field holds is only
# known from the instance, so it is always walked.
_ABSTRACT: Final = frozenset({"Resource", "DomainResource", "Element", "BackboneElement"})


@dataclass(frozen=True)
class CodeIssue:
    """A code value that the required binding of its element refuses."""

    expression: str  # FHIRPath-style location, e.g. "Patient.telecom[1].system"
    value: str  # the value found
    allowed: tuple[str, ...]  # the allowed codes, in spec order


_ModelClass = type[FHIRAbstractModel]


@dataclass(frozen=True, slots=True)
class _Step:
    """One field of a plan: a code to check (``allowed`` set) or models to walk into."""

    attr: str  # the pydantic field name (``class_fhir``, ``gender__ext``)
    name: str  # the JSON element name (``class``; ``gender`` for ``_gender``)
    allowed: tuple[str, ...] | None
    allowed_set: frozenset[str] | None


_Plan = tuple[_Step, ...]
_PLANS: dict[type, _Plan] = {}
_LIVE: dict[type, bool] = {}  # class -> whether any instance of it can hold a checked code


def code_issues(resource: FHIRAbstractModel) -> list[CodeIssue]:
    """Every code value in a validated R4B model instance that its required binding refuses.

    ``resource`` is an instance of a ``fhir.resources.R4B`` model class (a resource or any
    element), contained resources and extensions included. The issues come in document order
    (the specification's order of elements).
    """
    root = _r4b_base(type(resource))
    if root is None:
        raise TypeError(
            f"code_issues checks fhir.resources.R4B models, not {type(resource).__qualname__} "
            f"from {type(resource).__module__}"
        )
    issues: list[CodeIssue] = []
    _walk(resource, root.__name__, [], issues)
    return issues


def _walk(
    model: FHIRAbstractModel,
    root: str,
    path: list[tuple[str, int]],
    issues: list[CodeIssue],
) -> None:
    cls = type(model)
    plan = _PLANS.get(cls)
    if plan is None:
        plan = _plan(cls)
    values = model.__dict__
    for step in plan:
        value = values.get(step.attr)
        if value is None:
            continue
        allowed_set = step.allowed_set
        if allowed_set is not None:
            if isinstance(value, list):
                for index, code in enumerate(value):
                    if code is not None and code not in allowed_set:
                        issues.append(_issue(root, path, step, index, code))
            elif value not in allowed_set:
                issues.append(_issue(root, path, step, -1, value))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if item is not None:
                    path.append((step.name, index))
                    _walk(item, root, path, issues)
                    path.pop()
        else:
            path.append((step.name, -1))
            _walk(value, root, path, issues)
            path.pop()


def _issue(
    root: str, path: list[tuple[str, int]], step: _Step, index: int, value: object
) -> CodeIssue:
    parts = [root]
    for name, at in [*path, (step.name, index)]:
        parts.append(f".{name}[{at}]" if at >= 0 else f".{name}")
    assert step.allowed is not None
    return CodeIssue("".join(parts), str(value), step.allowed)


def required_binding(cls: type, name: str) -> tuple[str, ...] | None:
    """The codes the required binding of element ``name`` (its JSON name) of the R4B model
    class ``cls`` allows, in spec order; None when it has none that is checked."""
    base = _r4b_base(cls)
    return None if base is None else _BINDINGS.get((base.__name__, name))


def _r4b_base(cls: type) -> type | None:
    """The first fhir.resources R4B model class in ``cls``'s MRO (``cls`` itself, usually)."""
    for base in cls.__mro__:
        if base.__module__.startswith(_R4B) and issubclass(base, FHIRAbstractModel):
            return base
    return None


def _plan(cls: _ModelClass) -> _Plan:
    """The fields of ``cls`` worth looking at: its checked codes, and the fields that can hold a
    model with a checked code somewhere below (or any resource, for ``contained``)."""
    base = _r4b_base(cls)
    steps: list[_Step] = []
    for attr, field in cls.model_fields.items():
        name = (field.alias or attr).removeprefix("_")
        allowed = _BINDINGS.get((base.__name__, name)) if base is not None else None
        if allowed is not None and not attr.endswith("__ext"):
            steps.append(_Step(attr, name, allowed, frozenset(allowed)))
            continue
        targets, abstract = _field_models(field.annotation)
        if abstract or any(_live(target) for target in targets):
            steps.append(_Step(attr, name, None, None))
    # In the specification's order, so that the issues come in document order.
    order = {name: index for index, name in enumerate(cls.elements_sequence())}
    plan = tuple(sorted(steps, key=lambda step: order.get(step.name, len(order))))
    _PLANS[cls] = plan
    return plan


def _live(cls: _ModelClass) -> bool:
    """Whether an instance of ``cls`` can hold a checked code (at any depth)."""
    known = _LIVE.get(cls)
    if known is not None:
        return known
    # Everything reachable from cls whose answer is not known yet, then a fixed point over it
    # (the graph has cycles: Identifier -> Extension -> Identifier).
    edges: dict[_ModelClass, list[_ModelClass]] = {}
    todo = [cls]
    while todo:
        current = todo.pop()
        if current in edges or current in _LIVE:
            continue
        edges[current] = []
        base = _r4b_base(current)
        live = False
        for attr, field in current.model_fields.items():
            name = (field.alias or attr).removeprefix("_")
            if base is not None and (base.__name__, name) in _BINDINGS:
                live = True
            targets, abstract = _field_models(field.annotation)
            live = live or abstract
            edges[current].extend(targets)
            todo.extend(targets)
        if live:
            _LIVE[current] = True
    changed = True
    while changed:
        changed = False
        for current, targets in edges.items():
            if current not in _LIVE and any(_LIVE.get(target) for target in targets):
                _LIVE[current] = True
                changed = True
    for current in edges:
        _LIVE.setdefault(current, False)
    return _LIVE[cls]


def _field_models(annotation: object) -> tuple[list[_ModelClass], bool]:
    """The concrete model classes a field annotation can hold, and whether it can hold an
    abstract one (Resource), whose instances are only known at run time."""
    targets: list[_ModelClass] = []
    abstract = False
    for model in annotation_models(annotation):
        if model.__name__ in _ABSTRACT:
            abstract = True
        else:
            targets.append(model)
    return targets, abstract


def annotation_models(annotation: object) -> Iterator[_ModelClass]:
    if isinstance(annotation, type):
        if issubclass(annotation, FHIRAbstractModel):
            yield annotation
            return
        # fhir.resources declares model fields with stand-in types (fhirtypes.IdentifierType)
        # that name the model class they validate into.
        target = getattr(annotation, "_model_klass", None)
        if isinstance(target, str):
            module, _, name = target.rpartition(".")
            model = getattr(importlib.import_module(module), name)
            if isinstance(model, type) and issubclass(model, FHIRAbstractModel):
                yield model
            return
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is not None:
        for argument in typing.get_args(annotation):
            yield from annotation_models(argument)
