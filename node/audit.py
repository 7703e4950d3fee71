"""Local audit: an AuditEvent, shaped after IHE BALP, for every interaction with patient data.

Each event names who (the user, with role and network address, and the client program),
what (the interaction: read, search-type, create...; the action C/R/U/D/E), the outcome
(0 success, 4 refused, 8 failed), where (this node), and one entity per resource actually
returned or written — a search lists exactly what its Bundle held, includes too — plus one
entity per patient concerned and, for a search, the query itself.

A write's event commits in the write's own transaction. Reads are fail-closed: the response
leaves only once its event is durable. :class:`AuditWriter` makes that cheap by committing
the events of concurrent requests together (group commit) from one thread per process.
"""

from __future__ import annotations

import base64
import logging
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fhir_adapters.store import ResourceStore, Stored, Writer, format_instant, now_micros

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
    "search-type": "E",
    "operation": "E",
    "create": "C",
    "update": "U",
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


class AuditTrail:
    """Builds a node's AuditEvents and stores them."""

    def __init__(self, store: ResourceStore, node_id: str, node_name: str, flush_ms: int) -> None:
        self.store = store
        self.node_id = node_id
        self.node_name = node_name
        self.writer = AuditWriter(store, flush_ms / 1000)

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

    def record_in(self, writer: Writer, record: AuditRecord) -> None:
        """Store the event inside a write's own transaction."""
        writer.create(self.event(record), checked=True)

    def record(self, record: AuditRecord) -> None:
        """Store the event; returns once it is durable."""
        self.writer.write(self.event(record))

    def close(self) -> None:
        self.writer.close()


class _Waiter:
    __slots__ = ("done", "error", "event")

    def __init__(self, event: dict[str, Any]) -> None:
        self.event = event
        self.done = threading.Event()
        self.error: BaseException | None = None


class AuditWriter:
    """Group commit for AuditEvents: one thread commits what every request thread queued."""

    def __init__(self, store: ResourceStore, gather_seconds: float) -> None:
        self.store = store
        self.gather_seconds = gather_seconds
        self._queue: list[_Waiter] = []
        self._arrived = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._pid_lock = threading.Lock()

    def _ensure_thread(self) -> None:
        # started lazily: gunicorn forks workers after the app is made
        if self._thread is None or not self._thread.is_alive():
            with self._pid_lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(
                        target=self._run, name="audit-writer", daemon=True
                    )
                    self._thread.start()

    def write(self, event: dict[str, Any]) -> None:
        waiter = _Waiter(event)
        self._ensure_thread()
        with self._arrived:
            if self._closed:
                raise RuntimeError("the audit writer is closed")
            self._queue.append(waiter)
            self._arrived.notify()
        waiter.done.wait()
        if waiter.error is not None:
            raise waiter.error

    def _run(self) -> None:
        while True:
            with self._arrived:
                while not self._queue and not self._closed:
                    self._arrived.wait()
                if not self._queue and self._closed:
                    return
                if self.gather_seconds > 0:
                    self._arrived.wait(self.gather_seconds)
                batch, self._queue = self._queue, []
            self._commit(batch)

    def _commit(self, batch: Iterable[_Waiter]) -> None:
        batch = list(batch)
        try:
            with self.store.writing() as writer:
                for waiter in batch:
                    writer.create(waiter.event, checked=True, resource_id=str(uuid.uuid4()))
        except BaseException as exc:  # every waiter must learn of it
            log.exception("could not store %d audit events", len(batch))
            for waiter in batch:
                waiter.error = exc
        for waiter in batch:
            waiter.done.set()

    def close(self) -> None:
        with self._arrived:
            self._closed = True
            self._arrived.notify_all()
        if self._thread is not None:
            self._thread.join()
