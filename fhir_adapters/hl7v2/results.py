""":func:`read_results`: one parsed message mapped to its patients with their orders and results."""

from __future__ import annotations

from fhir_adapters.hl7v2.errors import Location, application_error, rejection
from fhir_adapters.hl7v2.message import Hl7Message, Segment
from fhir_adapters.hl7v2.model import OrderSegments, PatientResults
from fhir_adapters.hl7v2.orders import read_order
from fhir_adapters.hl7v2.patients import read_patient
from fhir_adapters.hl7v2.systems import Systems


def read_results(message: Hl7Message, systems: Systems) -> list[PatientResults]:
    """Map a parsed ORU^R01 to what will be stored; AE (or AR for a broken segment order)
    naming the field when it cannot be."""
    groups: list[tuple[Segment | None, list[OrderSegments]]] = []
    notes: list[Segment] | None = None  # where an NTE goes: the latest OBX's notes
    orc: Segment | None = None
    in_specimen = False
    for segment in message.segments[1:]:
        if segment.name == "PID":
            groups.append((segment, []))
            notes, orc = None, None
        elif segment.name == "ORC":
            orc = segment
        elif segment.name == "OBR":
            if not groups:
                groups.append((None, []))
            groups[-1][1].append(OrderSegments(segment, orc))
            notes, orc, in_specimen = None, None, False
        elif segment.name == "OBX":
            if not groups or not groups[-1][1]:
                raise rejection(100, "an OBX comes before any OBR", segment.at())
            if in_specimen:
                continue  # an observation about the specimen (SPM group): not a result
            notes = []
            groups[-1][1][-1].results.append((segment, notes))
        elif segment.name == "NTE":
            if notes is not None:
                notes.append(segment)
        elif segment.name == "SPM":
            if not groups or not groups[-1][1]:
                raise rejection(100, "an SPM comes before any OBR", segment.at())
            groups[-1][1][-1].specimens.append(segment)
            notes, in_specimen = None, True
    if not any(orders for _, orders in groups):
        raise rejection(100, "the message holds no OBR segment: no results to store")
    results: list[PatientResults] = []
    seen_orders: dict[str, Segment] = {}
    for pid, orders in groups:
        if pid is None:
            raise application_error(
                101, "no PID segment: the results name no patient", Location("PID")
            )
        patient = read_patient(pid, systems)
        mapped = []
        for segments in orders:
            order = read_order(message, segments, systems)
            if order.resource_id in seen_orders:
                raise application_error(
                    205,
                    f"repeats the filler order number of {seen_orders[order.resource_id].at(3)}",
                    segments.obr.at(3),
                )
            seen_orders[order.resource_id] = segments.obr
            mapped.append(order)
        results.append(PatientResults(patient, mapped))
    return results
