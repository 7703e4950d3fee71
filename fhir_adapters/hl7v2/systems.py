"""Identifier systems, made in one place: the hospital's own namespaces (orders, patients, results)
as URIs."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from urllib.parse import quote

from consent.pseudonym import RESIDENT_ID_SYSTEM

# -- identifier systems -----------------------------------------------------------------------


@dataclass(frozen=True)
class Systems:
    """The identifier and code systems this node gives what its LIS sends (one place).

    ``node_id`` scopes every local system: ``urn:hrx:member:<node_id>:...``."""

    node_id: str
    match_system: str = RESIDENT_ID_SYSTEM  # consent.identifier_system: members match by it

    def _urn(self, *parts: str) -> str:
        return ":".join(["urn:hrx:member", self.node_id, *parts])

    @property
    def mrn(self) -> str:
        """Medical record numbers (PID-3 of type MR, or untyped)."""
        return self._urn("mrn")

    def patient_id(self, id_type: str) -> str:
        """Other PID-3 identifiers, by their HL7 table 0203 type (PI, PT, AN...)."""
        return self._urn("patient-id", _urn_part(id_type.lower()))

    def local_codes(self, coding_system: str) -> str:
        """The LIS's own codes (OBX-3, OBR-4, units, coded values): coding system L, 99xxx,
        or empty; a named local system gets its own."""
        name = coding_system.strip()
        if name.upper() in ("", "L", "LOCAL", "LN99", "99LOCAL"):
            return self._urn("lis")
        return self._urn("lis", _urn_part(name.lower()))

    def filler_orders(self, namespace: str) -> str:
        """Filler order numbers (OBR-3) of one filler application (its namespace)."""
        return self._urn("lis-order", _urn_part(namespace))

    def placer_orders(self, namespace: str) -> str:
        """Placer order numbers (OBR-2) of one placer application."""
        return self._urn("his-order", _urn_part(namespace))

    def results(self, namespace: str) -> str:
        """Observations: ``<filler order>/<OBX-3 code>[/<OBX-4 sub-ID>]`` of one filler."""
        return self._urn("lis-result", _urn_part(namespace))

    @property
    def specimens(self) -> str:
        return self._urn("lis-specimen")

    @property
    def labs(self) -> str:
        """Performing laboratories named by a local identifier (OBX-23.10, OBX-15)."""
        return self._urn("lab")


def _urn_part(text: str) -> str:
    return quote(text.strip() or "-", safe="-._~")


def resource_id(system: str, value: str) -> str:
    """A stable FHIR id for what an identifier names (the same message twice, the same id)."""
    return "lis-" + hashlib.sha256(f"{system}|{value}".encode()).hexdigest()[:40]


OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")
