"""Taking HL7 v2 lab results into a node: one message, one write, one answer.

:class:`Hl7Intake` is what the MLLP listener and ``hrx adapters hl7-import`` both call. For
each message it

* reads and maps it (:mod:`fhir_adapters.hl7v2`); what cannot be read is rejected (AR) and
  what cannot be stored is an application error (AE); either way the message is kept, byte for
  byte, in the quarantine (``adapter_quarantine``) with the reason, and answered with a NAK;
* stores it as **one** write through the resource store (so the store's observers, e.g. the
  pseudonym index, see every Patient write; messages taken in at the same time, from several
  MLLP connections, share a transaction and its commit, each in a savepoint of its own, so one
  refused inside it is undone alone: :mod:`fhir_adapters.store.group_commit`): the Patient
  found by any of its identifiers (resident ID, MRN, an OID-named identifier) or created, its
  demographics updated, each result an Observation and each order a DiagnosticReport under
  stable ids made from the filler order number, the message's row in ``adapter_messages``,
  and an AuditEvent per patient. Only after the commit is the message acknowledged AA;
* takes a message sent again (same sending application, facility and control ID, same content)
  as already stored: AA, nothing written. The same control ID with other content is rejected.

A result already stored is only ever superseded by a newer one (a later OBR-22/MSH-7): a
correction (OBX-11 C) becomes the Observation's next version and the report's; an older message
replayed late changes nothing it would overwrite. A quarantined message can be replayed
(:meth:`Hl7Intake.replay`); once stored, its quarantine row is marked replayed in the same
transaction.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from consent.pseudonym import RESIDENT_ID_SYSTEM
from fhir_adapters.errors import FhirError
from fhir_adapters.hl7v2 import (
    Decoded,
    Header,
    Hl7Error,
    Hl7Message,
    OrderData,
    PatientData,
    PatientResults,
    Systems,
    build_ack,
    decode,
    instant_value,
    masked,
    merged_patient,
    new_patient,
    parse_message,
    read_header,
    read_results,
)
from fhir_adapters.store import (
    NewResource,
    ResourceStore,
    Stored,
    Writer,
    jsonio,
    now_micros,
    tables,
)
from fhir_adapters.store.resources import identical, validate
from node.base.errors import NodeError
from node.db.schema import messages_table, quarantine_table
from node.intake.quarantine import keep_in_quarantine, quarantine_row
from node.records.audit_trail import AuditRecord
from node.services import Services

log = logging.getLogger("hrx.hl7")

ADAPTER = "hl7"

Status = Literal["stored", "duplicate", "quarantined", "refused"]


@dataclass(frozen=True)
class Outcome:
    """What became of one message, and the ACK that says so."""

    status: Status  # refused: NAKed, but the quarantine could not be written either
    ack_code: str  # AA, AE or AR
    ack: bytes  # the acknowledgement, unframed, in the message's character set
    key: str | None  # sending application|facility|control ID, when it could be read
    reason: str | None = None  # why it was refused
    quarantine_id: int | None = None
    written: tuple[str, ...] = ()  # "Type/id/_history/n" of every version written
    note: str | None = None  # e.g. the character set it was read in, when not the declared one

    @property
    def accepted(self) -> bool:
        return self.ack_code == "AA"

    def summary(self) -> str:
        """One line for the CLI's operator (a refusal's reason may name local patients)."""
        if self.status == "stored":
            count = len(self.written)
            text = f"stored: {count} resource version(s) written" if count else "stored: no change"
        elif self.status == "duplicate":
            text = "duplicate: already stored, nothing written"
        elif self.status == "quarantined":
            text = f"quarantined as #{self.quarantine_id}: {self.reason}"
        else:
            text = f"refused (and NOT quarantined): {self.reason}"
        return text + (f" ({self.note})" if self.note else "")

    def log_summary(self) -> str:
        """One line for the log: a refusal's reason can name patients and their identifiers,
        so it stays in the quarantine (``hrx adapters quarantine show N``)."""
        if self.status == "quarantined":
            return f"quarantined as #{self.quarantine_id} (the reason is kept with it)"
        if self.status == "refused":
            return "refused (and NOT quarantined: the quarantine could not be written)"
        return self.summary()


class Hl7Intake:
    """Takes HL7 v2 messages into one node (thread-safe: each message is one write, and
    concurrent messages share commits)."""

    def __init__(self, services: Services, adapter: str = ADAPTER) -> None:
        """``adapter``: what the messages came through, as the adapters' tables and metrics
        count them (``hl7``; ``csv`` for the messages made from an LIS's CSV export)."""
        self.services = services
        self.adapter = adapter
        self.store = services.store
        self.systems = Systems(services.config.node_id, services.config.identifier_system)

    # -- one message ---------------------------------------------------------------------

    def take_in(self, payload: bytes, origin: str, *, replaying: int | None = None) -> Outcome:
        """Store one message (or quarantine it) and say so in an ACK. Never raises for what
        the message holds: every failure is a NAK."""
        try:
            message = parse_message(payload)
        except Hl7Error as refused:
            return self._refused(
                payload, origin, refused, refused.header, refused.charset, replaying
            )
        except Exception as exc:  # a bug must not cost the sender its answer
            log.exception("reading a message from %s", origin)
            unreadable = Hl7Error("AR", 207, f"could not read the message ({type(exc).__name__})")
            return self._refused(payload, origin, unreadable, None, None, replaying)
        failure: Hl7Error | None
        try:
            if self._already_stored(message):  # answered as before, whatever the mapping now
                written, duplicate = self._store(message, [], origin, replaying)
            else:
                groups = read_results(message, self.systems)
                checked = self._validated_before(groups)
                written, duplicate = self._store(message, groups, origin, replaying, checked)
        except Hl7Error as refused:
            failure = refused
        except FhirError as exc:
            text = "; ".join(issue.diagnostics for issue in exc.issues)[:1000]
            failure = Hl7Error("AE", 207, f"the results do not make valid FHIR resources: {text}")
        except Exception as exc:
            log.exception("storing %s from %s", message.key, origin)
            first = (str(exc).splitlines() or [""])[0][:200]
            failure = Hl7Error("AE", 207, f"could not store it: {type(exc).__name__}: {first}")
        else:
            failure = None
        if failure is not None:
            return self._refused(
                payload, origin, failure, message.header, message.charset, replaying
            )
        ack = build_ack(
            message.header,
            "AA",
            codec=message.charset.codec,
            text="already stored" if duplicate else "",
        )
        return Outcome(
            "duplicate" if duplicate else "stored",
            "AA",
            ack,
            message.key,
            written=tuple(stored.location for stored in written),
            quarantine_id=replaying,
            note=message.charset.note,
        )

    def refuse_oversized(self, head: bytes, size: int, limit: int, origin: str) -> Outcome:
        """NAK (AR) a message longer than ``limit`` bytes; its first ``len(head)`` bytes are
        quarantined (a sender could otherwise fill the disk)."""
        error = Hl7Error(
            "AR",
            207,
            f"the message is {size} bytes, more than the {limit}-byte limit (the quarantine "
            f"keeps its first {len(head)} bytes); split it into one message per order",
        )
        header, codec = _answerable(head)
        return self._refused(head, origin, error, header, codec, None)

    def replay(self, quarantine_id: int) -> Outcome:
        """Take a quarantined message in again (after a fix): stored or a duplicate marks the
        row replayed; refused again, the row keeps the message with the new reason."""
        row = quarantine_row(self.services.database.engine, quarantine_id)
        if row.adapter != self.adapter:
            raise NodeError(
                f"quarantine #{quarantine_id} holds a {row.adapter} item; replay it with the "
                f"{row.adapter} adapter's own command"
            )
        if row.replayed_at is not None:
            raise NodeError(f"quarantine #{quarantine_id} was already replayed and stored")
        assert row.payload is not None
        return self.take_in(row.payload, row.origin, replaying=quarantine_id)

    # -- refusals ------------------------------------------------------------------------

    def _refused(
        self,
        payload: bytes,
        origin: str,
        error: Hl7Error,
        header: Header | None,
        charset: Decoded | str | None,
        replaying: int | None,
    ) -> Outcome:
        if header is None or charset is None:
            try:
                found_header, found_codec = _answerable(payload)
            except Exception:  # answer with the defaults rather than not at all
                log.exception("reading the header of a message from %s", origin)
                found_header, found_codec = None, "utf-8"
            header = header or found_header
            charset = charset or found_codec
        codec = charset.codec if isinstance(charset, Decoded) else charset
        key = _key_of(header)
        quarantine_id: int | None = None
        status: Status = "quarantined"
        try:
            with self.services.database.write_engine.begin() as conn:
                quarantine_id = keep_in_quarantine(
                    conn, self.adapter, origin, error.reason, payload, row_id=replaying
                )
        except Exception:
            log.exception("could not quarantine a message from %s", origin)
            status = "refused"
        return Outcome(
            status,
            error.ack_code,
            build_ack(header, error.ack_code, codec=codec, error=error),
            key,
            reason=error.reason,
            quarantine_id=quarantine_id,
            note=charset.note if isinstance(charset, Decoded) else None,
        )

    # -- storing -------------------------------------------------------------------------

    def _store(
        self,
        message: Hl7Message,
        groups: list[PatientResults],
        origin: str,
        replaying: int | None,
        checked: Validated | None = None,
    ) -> tuple[list[Stored], bool]:
        """Everything the message says, in one write (all or nothing, returned once committed);
        (versions written, duplicate). ``checked``: what :meth:`_validated_before` found
        valid."""
        checked = checked or Validated(self.store)
        with self.store.writing() as writer:
            locks = {f"hl7 message {message.key}"}
            for group in groups:
                locks |= {f"hl7 patient {s}|{v}" for s, v in group.patient.match_keys}
            for key in sorted(locks):  # one order for every intake: no deadlocks between them
                writer.lock(key)
            M = messages_table
            row = writer.conn.execute(
                _STORED, {"adapter": self.adapter, "key": message.key}
            ).first()
            if row is not None:
                if row[0] != message.digest:
                    raise Hl7Error(
                        "AR",
                        205,
                        f"control ID {message.control_id!r} of {message.sending_application}"
                        f"|{message.sending_facility} was already used for another message; "
                        "give every message its own control ID",
                        message.msh.at(10),
                    )
                self._mark_replayed(writer.conn, replaying)
                return [], True
            written: list[Stored] = []
            for group in groups:
                patient_id, patient_version = self._patient(writer, group.patient, checked)
                in_group = [patient_version] if patient_version else []
                for order in group.orders:
                    in_group += self._order(writer, order, patient_id, checked)
                if in_group:
                    record = AuditRecord(
                        interaction="transaction",
                        username=f"hl7:{message.sending_application or '-'}",
                        role="system",
                        address=_network_address(origin),
                        client="hrx adapters (HL7 v2 ORU^R01)",
                        description=f"HL7 v2 ORU^R01 {message.key}",
                        entities=list(in_group),
                        patients={patient_id},
                    )
                    in_group.append(writer.create(self.services.audit.event(record), checked=True))
                written += in_group
            writer.conn.execute(
                M.insert().values(
                    adapter=self.adapter,
                    message_key=message.key,
                    received_at=now_micros(),
                    sha256=message.digest,
                    resources=orjson.dumps([s.location for s in written]).decode(),
                )
            )
            self._mark_replayed(writer.conn, replaying)
        return written, False

    def _validated_before(self, groups: list[PatientResults]) -> Validated:
        """The resources the message will most likely write, made and validated before its
        write begins: validation is most of a message's work, and in the write it would hold
        the database's write lock (which the other listener processes wait for).

        Each patient is looked for as :meth:`_patient` will look for it (a new one is given
        its id now); the write still finds it again under its lock, and validates whatever it
        writes that is not exactly what was validated here. What fails here is left to fail
        there, with the same error, if the write gets to it at all."""
        checked = Validated(self.store)
        with self.services.database.engine.connect() as conn:
            for group in groups:
                data = group.patient
                found = {
                    patient_id
                    for system, value in data.match_keys
                    for patient_id in patients_with(conn, system, value)
                }
                if len(found) > 1:
                    continue  # refused in the write
                if found:
                    patient_id = next(iter(found))
                else:
                    patient_id = str(uuid.uuid4())
                    if data.match_keys:  # without any, two PIDs of a message are two patients
                        checked.new_patients[tuple(data.match_keys)] = patient_id
                    checked.check(new_patient(data), "Patient", patient_id)
                for order in group.orders:
                    for result in order.results:
                        checked.check(
                            result.observation(patient_id), "Observation", result.resource_id
                        )
                    checked.check(order.report(patient_id), "DiagnosticReport", order.resource_id)
        return checked

    def _already_stored(self, message: Hl7Message) -> bool:
        """Whether a message with this key was stored (its content is compared under the
        transaction's lock, in :meth:`_store`)."""
        with self.services.database.engine.connect() as conn:
            row = conn.execute(_STORED, {"adapter": self.adapter, "key": message.key}).first()
        return row is not None

    def _mark_replayed(self, conn: Connection, replaying: int | None) -> None:
        if replaying is not None:
            conn.execute(
                quarantine_table.update()
                .where(quarantine_table.c.id == replaying, quarantine_table.c.replayed_at.is_(None))
                .values(replayed_at=now_micros())
            )

    def _patient(
        self, writer: Writer, data: PatientData, checked: Validated
    ) -> tuple[str, Stored | None]:
        """The Patient PID names: found by any identifier it matches by, updated as PID says,
        or created. AE when its identifiers name two patients, or a patient with another
        resident ID."""
        found: dict[str, list[tuple[str, str]]] = {}
        for system, value in data.match_keys:
            for patient_id in patients_with(writer.conn, system, value):
                found.setdefault(patient_id, []).append((system, value))
        where = data.segment.at(3)
        if len(found) > 1:
            named = "; ".join(
                f"Patient/{pid} by {', '.join(_shown(s, v) for s, v in keys)}"
                for pid, keys in sorted(found.items())
            )
            raise Hl7Error(
                "AE",
                207,
                f"the identifiers name different patients here ({named}); merge or correct "
                "them, then replay the message",
                where,
            )
        if not found:
            patient = new_patient(data)
            patient_id = (
                checked.new_patients.get(tuple(data.match_keys)) if data.match_keys else None
            ) or str(uuid.uuid4())
            prepared = checked.prepared(patient, "Patient", patient_id)
            created = writer.create(
                prepared or patient, "Patient", resource_id=patient_id, validated=bool(prepared)
            )
            return created.id, created
        patient_id, keys = next(iter(found.items()))
        existing = self.store.read("Patient", patient_id, writer.conn).resource()
        if data.resident_id is not None:
            others = {
                str(i.get("value", "")).strip().upper()
                for i in existing.get("identifier", [])
                if i.get("system") == RESIDENT_ID_SYSTEM
            } - {data.resident_id}
            if others:
                raise Hl7Error(
                    "AE",
                    207,
                    f"Patient/{patient_id} (found by "
                    f"{', '.join(_shown(s, v) for s, v in keys)}) has resident ID "
                    f"{', '.join(masked(o) for o in sorted(others))}, the message "
                    f"{masked(data.resident_id)}; correct one of them, then replay the message",
                    where,
                )
        merged = merged_patient(existing, data)
        if _same(merged, existing):
            return patient_id, None
        stored, _ = writer.update("Patient", patient_id, merged)
        return patient_id, stored

    def _order(
        self, writer: Writer, order: OrderData, patient_id: str, checked: Validated
    ) -> list[Stored]:
        """The order's Observations and DiagnosticReport, each written only when it changes and
        is not older than what is stored."""
        written: list[Stored] = []
        subject = f"Patient/{patient_id}"
        for result in order.results:
            new = result.observation(patient_id)
            old = self._current(writer, "Observation", result.resource_id)
            if old is not None:
                _same_subject(old, subject, result.segment.at(3), "result")
                if result.hl7_status == "U":  # final, without sending the value again
                    new = _finalised(new, old)
                if _older(new, old) or _same(new, old):
                    continue
            elif result.hl7_status == "U":
                raise Hl7Error(
                    "AE",
                    207,
                    "result status U makes final a result this node never received; send "
                    "the result itself",
                    result.segment.at(11),
                )
            prepared = checked.prepared(new, "Observation", result.resource_id)
            stored, _ = writer.update(
                "Observation",
                result.resource_id,
                new,
                validated=bool(prepared),
                prepared=prepared,
            )
            written.append(stored)
        report = order.report(patient_id)
        old = self._current(writer, "DiagnosticReport", order.resource_id)
        if old is not None:
            _same_subject(old, subject, order.segment.at(3), "order")
            results = _merged_results(old.get("result", []), report.get("result", []))
            if _older(report, old):
                report = {k: v for k, v in old.items() if k != "meta"}
            if results:
                report["result"] = results
            if _same(report, old):
                return written
        prepared = checked.prepared(report, "DiagnosticReport", order.resource_id)
        stored, _ = writer.update(
            "DiagnosticReport",
            order.resource_id,
            report,
            validated=bool(prepared),
            prepared=prepared,
        )
        written.append(stored)
        return written

    def _current(
        self, writer: Writer, resource_type: str, resource_id: str
    ) -> dict[str, Any] | None:
        try:
            return self.store.read(resource_type, resource_id, writer.conn).resource()
        except FhirError:  # not there, or deleted
            return None


class Validated:
    """Resources validated and made ready to be created (their stored bytes and index rows)
    before a message's write, each under the type and id it will be written as, so that the
    write skips that work only for what is exactly one of them
    (:func:`fhir_adapters.store.resources.identical`: the same JSON, of the same types)."""

    def __init__(self, store: ResourceStore) -> None:
        self.store = store
        self.resources: dict[tuple[str, str], tuple[dict[str, Any], NewResource]] = {}
        self.new_patients: dict[tuple[tuple[str, str], ...], str] = {}  # match keys -> id

    def check(self, resource: dict[str, Any], resource_type: str, resource_id: str) -> None:
        """Validate ``resource`` as the write would, and make it ready; kept when valid (what
        is not is validated again, and refused, in the write). Nothing else holds
        ``resource``."""
        try:
            validate(resource, resource_type)
        except FhirError:
            return
        ready = self.store.new_resource(resource, resource_id)
        self.resources[(resource_type, resource_id)] = (resource, ready)

    def prepared(
        self, resource: dict[str, Any], resource_type: str, resource_id: str
    ) -> NewResource | None:
        """What was made ready for this type and id, when ``resource`` is exactly what was
        validated; None otherwise."""
        before = self.resources.get((resource_type, resource_id))
        if before is None or not identical(resource, before[0]):
            return None
        return before[1]


# a message's digest, by its adapter and key
_STORED = sa.select(messages_table.c.sha256).where(
    messages_table.c.adapter == sa.bindparam("adapter"),
    messages_table.c.message_key == sa.bindparam("key"),
)


def _answerable(payload: bytes) -> tuple[Header | None, str]:
    """The header and character set to answer bytes with that could not be read whole."""
    header = read_header(payload)
    try:
        codec = decode(payload.lstrip(b" \t\r\n")).codec
    except Hl7Error:
        codec = "utf-8"
    return header, codec


def _network_address(origin: str) -> str | None:
    """The peer's address when the message came over the network (not from a file)."""
    host = origin.rsplit(":", 1)[0]
    return host if re.fullmatch(r"[0-9.]+|\[[0-9a-fA-F:]+\]", host) else None


def _key_of(header: Header | None) -> str | None:
    if header is None:
        return None
    return f"{header.raw(3)}|{header.raw(4)}|{header.raw(10)}"[:255]


def patients_with(conn: Connection, system: str, value: str) -> list[str]:
    """Current Patients with the identifier ``system|value`` (resident IDs: x or X)."""
    values = {value, value.lower()} if system == RESIDENT_ID_SYSTEM else {value}
    rows = conn.execute(_PATIENTS_WITH, {"system": system, "codes": sorted(values)})
    return sorted({row[0] for row in rows})


_PATIENTS_WITH = (  # built once: building it was a tenth of what a message cost
    sa.select(tables.resources.c.id)
    .select_from(
        tables.tokens.join(tables.resources, tables.resources.c.res_pk == tables.tokens.c.res_pk)
    )
    .where(
        tables.tokens.c.type == "Patient",
        tables.tokens.c.param == "identifier",
        tables.tokens.c.system == sa.bindparam("system"),
        tables.tokens.c.code.in_(sa.bindparam("codes", expanding=True)),
        tables.resources.c.deleted.is_(False),
    )
)


def _shown(system: str, value: str) -> str:
    if system == RESIDENT_ID_SYSTEM:
        return f"resident ID {masked(value)}"
    return f"{system.rsplit(':', 1)[-1]} {value}"


def _without_meta(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k != "meta"}


def _same(new: dict[str, Any], old: dict[str, Any]) -> bool:
    """The same content, decimals digit for digit (``4.10`` is not ``4.1``)."""
    return jsonio.dump(_without_meta(new)) == jsonio.dump(_without_meta(old))


def _older(new: dict[str, Any], old: dict[str, Any]) -> bool:
    """Whether ``new`` was issued before what is stored (a late replay must not undo a
    correction)."""
    try:
        return bool(
            old.get("issued")
            and new.get("issued")
            and instant_value(new["issued"]) < instant_value(old["issued"])
        )
    except ValueError:
        return False


def _same_subject(old: dict[str, Any], subject: str, where: Any, what: str) -> None:
    stored = (old.get("subject") or {}).get("reference")
    if stored != subject:
        raise Hl7Error(
            "AE",
            207,
            f"this {what} is already stored for {stored}, not for {subject} whom the message "
            "names; correct the patient in the LIS (or the Patient here), then replay",
            where,
        )


_KEPT_WHEN_FINALISED = (
    "valueQuantity",
    "valueCodeableConcept",
    "valueString",
    "valueRange",
    "valueRatio",
    "valueTime",
    "valueDateTime",
    "interpretation",
    "referenceRange",
    "note",
)


def _finalised(new: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """OBX-11 U: the stored result, made final by this message (its value kept)."""
    result = dict(new)
    for element in _KEPT_WHEN_FINALISED:
        if element in old and element not in result:
            result[element] = old[element]
    result.pop("dataAbsentReason", None)
    if any(element.startswith("value") for element in result):
        return result
    if "dataAbsentReason" in old:
        result["dataAbsentReason"] = old["dataAbsentReason"]
    return result


def _merged_results(old: Iterable[dict[str, Any]], new: Iterable[dict[str, Any]]) -> list[Any]:
    """The report's results: those stored, then those this message adds (a correction may send
    only the corrected result)."""
    merged: list[dict[str, Any]] = []
    for reference in [*old, *new]:
        if reference not in merged:
            merged.append(reference)
    return merged
