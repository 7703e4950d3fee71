"""HL7 v2 laboratory results (ORU^R01, v2.3 to v2.5.1) read and mapped to FHIR R4.

Pure: message bytes in, FHIR resource dicts and ACK bytes out; no database, no network (the
node stores what this makes: :mod:`node.intake.hl7`). In order:

* :func:`decode` finds the character set (MSH-18: ``UNICODE UTF-8``, ``GB 18030-2000`` and
  their usual spellings, ASCII, ISO 8859, Big5; empty means UTF-8, and a message that is not
  UTF-8 then is read as GB18030, with a note saying so);
* :func:`parse_message` splits it with the ``hl7`` package and checks the header: an
  ``ORU^R01`` of a supported version, with a control ID. What fails here is *rejected* (AR);
* :func:`read_results` maps it: PID to a Patient's identifiers and demographics, each OBR to a
  DiagnosticReport, each OBX to an Observation (LOINC or the hospital's local codes, UCUM
  units, reference ranges, abnormal flags, status, times, specimen, performing lab). What
  fails here is an *application error* (AE);
* :func:`build_ack` answers (MSA, and ERR with an HL7 table 0357 code), in the message's own
  separators and character set.

Identifier systems are made in one place, :class:`Systems`. Times without a zone are China
Standard Time (UTC+08:00). Everything refused is an :class:`Hl7Error` naming the field.

The modules follow those steps: ``errors``, ``charsets``, ``header``, ``message``, ``times``,
``systems``, ``codes``, ``model`` (what a message carries), ``results`` (the mapping's entry),
``patients``, ``orders`` (OBR/OBX), ``acks``. This package imports the ``hl7`` library,
:mod:`fhir_adapters.store.jsonio`, :mod:`fhir_adapters.ucum` and the resident-identity system of
:mod:`consent.pseudonym`; nothing of the node.
"""

from fhir_adapters.hl7v2.acks import Ack, build_ack, escape, parse_ack, unescape
from fhir_adapters.hl7v2.charsets import Decoded, charset_codec, decode
from fhir_adapters.hl7v2.errors import Hl7Error, Location
from fhir_adapters.hl7v2.header import Header, read_header
from fhir_adapters.hl7v2.message import (
    SUPPORTED_VERSIONS,
    Hl7Message,
    message_lines,
    parse_message,
    split_messages,
)
from fhir_adapters.hl7v2.model import OrderData, PatientData, PatientResults
from fhir_adapters.hl7v2.orders import VALUE_TYPES, number
from fhir_adapters.hl7v2.patients import masked, merged_patient, new_patient, resident_id_problem
from fhir_adapters.hl7v2.results import read_results
from fhir_adapters.hl7v2.systems import Systems
from fhir_adapters.hl7v2.times import instant_value

__all__ = [
    "SUPPORTED_VERSIONS",
    "VALUE_TYPES",
    "Ack",
    "Decoded",
    "Header",
    "Hl7Error",
    "Hl7Message",
    "Location",
    "OrderData",
    "PatientData",
    "PatientResults",
    "Systems",
    "build_ack",
    "charset_codec",
    "decode",
    "escape",
    "instant_value",
    "masked",
    "merged_patient",
    "message_lines",
    "new_patient",
    "number",
    "parse_ack",
    "parse_message",
    "read_header",
    "read_results",
    "resident_id_problem",
    "split_messages",
    "unescape",
]
