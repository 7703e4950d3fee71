"""What one message carries once read: patients, orders (DiagnosticReports) and results
(Observations), before they are stored."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fhir_adapters.hl7v2.codes import OBSERVATION_CATEGORY
from fhir_adapters.hl7v2.message import Segment

# -- the results of one message ---------------------------------------------------------------


@dataclass
class PatientData:
    """What PID says about the patient."""

    segment: Segment
    identifiers: list[dict[str, Any]]
    match_keys: list[tuple[str, str]]  # (system, value) an existing Patient is found by
    resident_id: str | None
    demographics: dict[str, Any]  # name, telecom, gender, birthDate, address


@dataclass
class ResultData:
    """One OBX as an Observation, but for its subject."""

    segment: Segment
    resource_id: str
    identifier: dict[str, Any]
    status: str
    hl7_status: str  # OBX-11 as sent
    elements: dict[str, Any]  # the Observation's elements after subject, in order
    issued: str

    def observation(self, patient: str) -> dict[str, Any]:
        resource: dict[str, Any] = {"resourceType": "Observation", "id": self.resource_id}
        specimen = self.elements.get("specimen")
        if specimen is not None:
            resource["contained"] = [specimen]
        resource["identifier"] = [self.identifier]
        resource["status"] = self.status
        resource["category"] = [
            {
                "coding": [
                    {"system": OBSERVATION_CATEGORY, "code": "laboratory", "display": "Laboratory"}
                ]
            }
        ]
        resource["code"] = self.elements["code"]
        resource["subject"] = {"reference": f"Patient/{patient}"}
        for name, value in self.elements.items():
            if name not in ("code", "specimen"):
                resource[name] = value
        if specimen is not None:
            resource["specimen"] = {"reference": "#specimen"}
        return resource


@dataclass
class OrderData:
    """One OBR and its OBX segments: a DiagnosticReport and its Observations."""

    segment: Segment
    resource_id: str
    identifiers: list[dict[str, Any]]
    status: str
    code: dict[str, Any]
    category: list[dict[str, Any]]
    effective: str | None
    issued: str
    performer: dict[str, Any] | None
    specimen: dict[str, Any] | None
    results: list[ResultData] = field(default_factory=list)

    def report(self, patient: str) -> dict[str, Any]:
        resource: dict[str, Any] = {"resourceType": "DiagnosticReport", "id": self.resource_id}
        if self.specimen is not None:
            resource["contained"] = [self.specimen]
        resource["identifier"] = self.identifiers
        resource["status"] = self.status
        resource["category"] = self.category
        resource["code"] = self.code
        resource["subject"] = {"reference": f"Patient/{patient}"}
        if self.effective:
            resource["effectiveDateTime"] = self.effective
        resource["issued"] = self.issued
        if self.performer:
            resource["performer"] = [self.performer]
        if self.specimen is not None:
            resource["specimen"] = [{"reference": "#specimen"}]
        if self.results:
            resource["result"] = [
                {"reference": f"Observation/{result.resource_id}"} for result in self.results
            ]
        return resource


@dataclass
class PatientResults:
    """One PATIENT_RESULT group: the patient and the orders reported for them."""

    patient: PatientData
    orders: list[OrderData]


@dataclass
class OrderSegments:
    """The segments of one ORDER_OBSERVATION group."""

    obr: Segment
    orc: Segment | None  # the ORC just before the OBR
    results: list[tuple[Segment, list[Segment]]] = field(default_factory=list)  # OBX, NTEs
    specimens: list[Segment] = field(default_factory=list)
