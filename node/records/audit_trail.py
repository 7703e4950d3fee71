"""Local audit: an AuditEvent, shaped after IHE BALP, for every interaction with patient data.

Each event names who (the user, with role and network address, and the client program),
what (the interaction: read, search-type, create...; the action C/R/U/D/E), the outcome
(0 success, 4 refused, 8 failed), where (this node), and one entity per resource actually
returned or written — a search lists exactly what its Bundle held, includes too — plus one
entity per patient concerned and, for a search, the query itself.

A write's event commits in the write's own transaction. A read's event is queued and stored
within milliseconds by :class:`AuditWriter`, many per transaction; when the audit trail
cannot keep up or cannot be written, the node refuses requests (503) rather than serve
unrecorded ones.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from fhir_adapters.errors import FhirError
from fhir_adapters.store import (
    NewResource,
    ResourceStore,
    Stored,
    Writer,
    format_instant,
    now_micros,
)
from fhir_adapters.store.search_params import index_values
from node.identity.tokens import Principal

log = logging.getLogger(__name__)

EVENT_TYPE = {
    "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
    "code": "rest",
    "display": "RESTful Operation",
}
INTERACTION_SYSTEM = "http://hl7.org/fhir/restful-interaction"
ACTIONS = {
    "read": "R",
    "vread": "R",
    "history-instance": "R",
    "history-type": "R",
    "history-system": "R",
    "search-type": "E",
    "search-system": "E",
    "operation": "E",
    "create": "C",
    "update": "U",
    "patch": "U",
    "delete": "D",
    "transaction": "E",
    "batch": "E",
}
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"


@dataclass
class AuditRecord:
    """What happened in one interaction, before it becomes an AuditEvent."""

    interaction: str
    username: str | None
    role: str | None
    address: str | None
    client: str | None
    outcome: str = "0"  # 0 success, 4 minor failure (refused), 8 serious failure
    description: str | None = None
    entities: list[Stored] = field(default_factory=list)
    patients: set[str] = field(default_factory=set)
    query: str | None = None
    token_id: str | None = None
    received: list[tuple[str, str]] = field(default_factory=list)  # from members: (url, sha256)


@dataclass(frozen=True)
class Caller:
    """Who asks, from where, under which request ID: what a flow needs of the request it
    serves (the web room makes one from each HTTP request; the flows never see HTTP)."""

    principal: Principal | None
    address: str | None = None
    client: str | None = None
    request_id: str | None = None

    def record(self, interaction: str, **details: Any) -> AuditRecord:
        """An AuditRecord of ``interaction`` by this caller."""
        principal = self.principal
        return AuditRecord(
            interaction=interaction,
            username=principal.username if principal else None,
            role=principal.role if principal else None,
            address=self.address,
            client=self.client,
            token_id=principal.token_id if principal else None,
            **details,
        )


def per_patient(
    items: list[Stored], patients: dict[tuple[str, str], frozenset[str]]
) -> list[tuple[set[str], list[Stored]]]:
    """The items grouped by patient: each patient's AuditEvent lists only that patient's
    resources, so a patient reading their audit trail learns nothing of anyone else.
    Resources in no patient's compartment (practitioners, organizations) form a group of
    their own."""
    groups: dict[str | None, list[Stored]] = {}
    for item in items:
        for patient in patients.get((item.type, item.id)) or {None}:
            groups.setdefault(patient, []).append(item)
    if not groups:
        return [(set(), [])]
    return [
        ({patient} if patient else set(), group)
        for patient, group in sorted(groups.items(), key=lambda g: g[0] or "")
    ]


class AuditTrail:
    """Builds a node's AuditEvents and stores them."""

    def __init__(self, store: ResourceStore, node_id: str, node_name: str, flush_ms: int) -> None:
        self.store = store
        self.node_id = node_id
        self.node_name = node_name
        self.writer = AuditWriter(store, flush_ms / 1000)

    def flush(self) -> None:
        self.writer.flush()

    def event(self, record: AuditRecord) -> dict[str, Any]:
        agent: dict[str, Any] = {
            "type": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/extra-security-role-type",
                        "code": "humanuser",
                        "display": "human user",
                    }
                ]
            },
            "who": {
                "identifier": {
                    "system": f"urn:hrx:{self.node_id}:user",
                    "value": record.username or "anonymous",
                },
                "display": record.username or "anonymous",
            },
            "requestor": True,
        }
        if record.role:
            agent["role"] = [{"text": record.role}]
        if record.token_id:
            agent["altId"] = record.token_id
        if record.address:
            agent["network"] = {"address": record.address[:255], "type": "2"}
        agents = [agent]
        if record.client:
            agents.append(
                {
                    "type": {
                        "coding": [
                            {
                                "system": "http://dicom.nema.org/resources/ontology/DCM",
                                "code": "110150",
                                "display": "Application",
                            }
                        ]
                    },
                    "who": {"display": record.client[:255]},
                    "requestor": False,
                }
            )
        entities: list[dict[str, Any]] = []
        for patient in sorted(record.patients):
            entities.append(
                {
                    "what": {"reference": f"Patient/{patient}"},
                    "type": {"system": ENTITY_TYPE, "code": "1", "display": "Person"},
                    "role": {"system": OBJECT_ROLE, "code": "1", "display": "Patient"},
                }
            )
        for stored in record.entities:
            entities.append(
                {
                    "what": {"reference": stored.location},
                    "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
                    "role": {"system": OBJECT_ROLE, "code": "4", "display": "Domain Resource"},
                }
            )
        for url, digest in record.received:  # not stored here: named by source and hash
            entities.append(
                {
                    "what": {
                        "identifier": {
                            "system": "urn:ietf:rfc:3986",
                            "value": f"urn:sha256:{digest}",
                        },
                        "display": url[:1000],
                    },
                    "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
                    "role": {"system": OBJECT_ROLE, "code": "3", "display": "Report"},
                }
            )
        if record.query:
            entities.append(
                {
                    "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
                    "role": {"system": OBJECT_ROLE, "code": "24", "display": "Query"},
                    "query": base64.b64encode(record.query.encode()).decode(),
                }
            )
        event: dict[str, Any] = {
            "resourceType": "AuditEvent",
            "type": EVENT_TYPE,
            "subtype": [{"system": INTERACTION_SYSTEM, "code": record.interaction}],
            "action": ACTIONS.get(record.interaction, "E"),
            "recorded": format_instant(now_micros()),
            "outcome": record.outcome,
            "agent": agents,
            "source": {
                "observer": {
                    "identifier": {"system": "urn:hrx:node", "value": self.node_id},
                    "display": self.node_name,
                },
                "type": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                        "code": "4",
                        "display": "Application Server",
                    }
                ],
            },
        }
        if record.description:
            event["outcomeDesc"] = record.description[:1000]
        if entities:
            event["entity"] = entities
        return event

    def created(self, caller: Caller, new: NewResource) -> list[NewResource]:
        """The AuditEvents of creating ``new`` (one per patient, as :meth:`writes` records a
        create), made ready before its write, so that the write only inserts them."""
        # the version the create will store: its location is all an event names of it
        first = Stored(new.type, new.id, 1, 0, new.body, "POST", frozenset(new.rows.compartment))
        patients = {(new.type, new.id): first.patients or frozenset()}
        return [
            self.store.new_resource(
                self.event(caller.record("create", entities=group, patients=group_patients))
            )
            for group_patients, group in per_patient([first], patients)
        ]

    def record_in(self, writer: Writer, record: AuditRecord) -> None:
        """Store the event inside a write's own transaction."""
        writer.create(self.event(record), checked=True)

    def reads(
        self, caller: Caller, interaction: str, items: list[Stored], query: str | None = None
    ) -> None:
        """Record a read-type interaction: one AuditEvent per patient concerned."""
        patients = self.store.patients_by_item(items) if items else {}
        for group_patients, group in per_patient(items, patients):
            record = caller.record(interaction, entities=group, patients=group_patients)
            record.query = query
            self.record(record)

    def writes(
        self,
        writer: Writer,
        caller: Caller,
        interaction: str,
        items: list[Stored],
        before: dict[tuple[str, str], frozenset[str]] | None = None,
    ) -> None:
        """Record a write in its own transaction: one AuditEvent per patient concerned, by the
        version written and, for updates and deletes, the patients of the version before
        (``before``: :meth:`patients_before`), so a resource moved away from a patient or
        deleted still shows up in that patient's trail."""
        patients: dict[tuple[str, str], frozenset[str]] = {}
        for item in items:
            key = (item.type, item.id)
            now = (
                index_values(item.resource(), self.store.base_url).compartment
                if item.body is not None
                else set()
            )
            patients[key] = frozenset(now) | (before or {}).get(key, frozenset())
        for group_patients, group in per_patient(items, patients):
            record = caller.record(interaction, entities=group, patients=group_patients)
            self.record_in(writer, record)

    def patients_before(
        self, writer: Writer, resource_type: str, resource_id: str
    ) -> dict[tuple[str, str], frozenset[str]]:
        """The patients of a resource's current version, read inside a write transaction."""
        try:
            current = self.store.read(resource_type, resource_id, writer.conn)
        except FhirError:
            return {}
        return {(resource_type, resource_id): current.patients or frozenset()}

    def record(self, record: AuditRecord) -> None:
        """Queue the event for storage (see :class:`AuditWriter`)."""
        self.writer.write(self.event(record))

    def close(self) -> None:
        self.writer.close()


class AuditBacklog(FhirError):
    """503: audit records cannot be stored, so nothing more is served until they can."""

    status = 503
    code = "transient"


class AuditWriter:
    """Stores AuditEvents in batches from one thread per process.

    A read returns as soon as its event is queued; the thread commits what is queued at
    least every ``flush_seconds``, many events per transaction. Fail-closed: when the queue
    holds ``max_queue`` events, or the last commit failed, requests are refused (503) until
    the store takes events again. Stopping the process flushes the queue first; only a hard
    crash can lose what was queued in the last ``flush_seconds``.
    """

    def __init__(self, store: ResourceStore, flush_seconds: float, max_queue: int = 10_000) -> None:
        self.store = store
        self.flush_seconds = flush_seconds
        self.max_queue = max_queue
        self._queue: list[dict[str, Any]] = []
        self._queued_total = 0  # events ever queued, and of those, stored (for flush)
        self._stored_total = 0
        self._failure: str | None = None
        self._changed = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._pid = 0

    def _ensure_thread(self) -> None:
        # started lazily, and again in a forked child (gunicorn forks after the app is made)
        if self._thread is None or self._pid != os.getpid():
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
            self._thread.start()

    def write(self, event: dict[str, Any]) -> None:
        with self._changed:
            self._ensure_thread()
            if self._closed:
                raise AuditBacklog("the audit trail is closed; this node is stopping")
            if self._failure is not None:
                raise AuditBacklog(f"audit records cannot be stored ({self._failure}); refused")
            if len(self._queue) >= self.max_queue:
                raise AuditBacklog("the audit trail is behind; try again shortly")
            self._queue.append(event)
            self._queued_total += 1
            if len(self._queue) == 1:
                self._changed.notify_all()

    def flush(self) -> None:
        """Wait until everything queued before this call is stored (or storing failed);
        what others queue meanwhile is not waited for, so this returns under any load."""
        with self._changed:
            target = self._queued_total
            while self._stored_total < target and self._failure is None:
                self._ensure_thread()
                self._changed.notify_all()
                self._changed.wait(1.0)

    def _run(self) -> None:
        backoff = 0.1
        while True:
            with self._changed:
                while not self._queue and not self._closed:
                    self._changed.wait()
                if not self._queue and self._closed:
                    return
                batch, self._queue = self._queue[:1000], self._queue[1000:]
            try:
                with self.store.writing() as writer:
                    writer.create_many_checked(batch)
            except Exception as exc:
                log.exception("could not store %d audit events; retrying", len(batch))
                with self._changed:
                    self._queue[:0] = batch
                    self._failure = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                    self._changed.notify_all()
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            with self._changed:
                self._stored_total += len(batch)
                self._failure = None
                self._changed.notify_all()
            if not self._closed:
                time.sleep(self.flush_seconds)  # let the next batch gather

    def close(self) -> None:
        self.flush()
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        if self._thread is not None and self._pid == os.getpid():
            self._thread.join(timeout=10)
