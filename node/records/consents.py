"""Recording consent on the node: every change to a privacy Consent goes on the ledger with it.

The resource store calls :meth:`ConsentRecorder.on_write` inside the write transaction of
every Consent create, update and delete, whoever writes it (the FHIR API, a transaction
Bundle, the portal). For a privacy consent (scope ``patient-privacy``) it appends
``consent.granted`` or ``consent.revoked`` to this node's chain *in that same transaction*
(:meth:`ledger.store.ChainWriter.append_in`): the Consent and its ledger entry are stored
together or not at all, and the call returns only once both are durable.

Who may do what:

- a patient (a ``patient/*`` token or the portal) grants, narrows and revokes their own
  consents, and no one else's;
- staff (doctor, admin) may record a consent on a patient's behalf, from a signed paper
  form: the Consent must then name its witness (the ``consent-Witness`` extension), and the
  node records the staff member as the enterer in a Provenance written in the same
  transaction;
- a granted consent is never deleted: it is revoked (status ``inactive``), so the record of
  what was shared, and under what, stays whole.

The ledger carries no name or identifier: the patient appears as the pseudonym of the
Patient's identifier of the consortium's system (``consent.identifier_system``), and the
Consent as the SHA-256 of its stored JSON. A node that has not joined a consortium has no
chain to record on, and refuses privacy consents until it joins.
"""

from __future__ import annotations

import threading
from typing import Any

from consent.errors import ConsentError
from consent.model import (
    GRANTING,
    WITNESS_URL,
    granted_body,
    is_exchange_consent,
    ledger_action,
    patient_reference,
    revoked_body,
    terms_of,
)
from consent.pseudonym import pseudonym
from fhir_adapters.errors import Conflict, FhirError, Forbidden, Unprocessable
from fhir_adapters.store import Stored, Writer, format_instant, now_micros
from ledger import keys
from ledger.errors import LedgerError
from ledger.model import format_time
from ledger.store import ChainStore, ChainWriter
from node.base.config import NodeConfig
from node.base.errors import ConfigError
from node.consortium.membership import read_secret
from node.consortium.worker import confirm_own_head
from node.identity.tokens import Principal
from node.records.pseudonym_index import set_pseudonym

USER_SYSTEM = "urn:hrx:user"  # Identifier.system of a node user's username (+ ":" node id)
NOT_JOINED = (
    "this node has not joined a consortium (hrx node join), so it has no ledger to record "
    "privacy consents on"
)


class ConsentRecorder:
    """Puts this node's privacy consents on its chain; see the module docstring."""

    def __init__(self, config: NodeConfig, chain_store: ChainStore) -> None:
        self.config = config
        self.chain_store = chain_store  # reads; appends go through the writer's connection
        self._secret: bytes | None = None
        self._writer: ChainWriter | None = None
        self._lock = threading.Lock()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    # -- what the node needs from its membership ------------------------------------------

    def secret(self) -> bytes:
        if self._secret is None:
            if not self.config.consortium_key.exists():
                raise Conflict(NOT_JOINED)
            try:
                self._secret = read_secret(self.config.consortium_key)
            except ConfigError as exc:
                raise Conflict(f"the consortium secret cannot be used: {exc}") from None
        return self._secret

    def chain_writer(self) -> ChainWriter:
        """This process's writer of the node's chain; made once the members have confirmed
        that none holds the chain beyond its head here (:func:`confirm_own_head`)."""
        with self._lock:
            if self._writer is None:
                try:
                    writer = ChainWriter(
                        self.chain_store,
                        self.config.node_id,
                        keys.load_private_key(self.config.ed25519_key),
                    )
                except LedgerError as exc:
                    raise Conflict(f"{NOT_JOINED}: {exc}") from None
                try:
                    confirm_own_head(self.config, self.chain_store, self.chain_store)
                except LedgerError as exc:
                    writer.close()
                    raise Conflict(f"nothing can be recorded on the ledger now: {exc}") from None
                self._writer = writer
            return self._writer

    def members(self) -> list[str]:
        try:
            return self.chain_store.roster().member_ids()
        except LedgerError:
            raise Conflict(NOT_JOINED) from None

    def patient_pseudonym(self, writer: Writer, patient_id: str) -> str:
        """The pseudonym of a local Patient, read in the write transaction."""
        try:
            patient = writer.store.read("Patient", patient_id, writer.conn).resource()
        except FhirError:
            raise Unprocessable(
                f"Patient/{patient_id} is not known here", expression="Consent.patient"
            ) from None
        found = self.pseudonym_of(patient)
        if found is not None:
            return found
        system = self.config.identifier_system
        raise Unprocessable(
            f"Patient/{patient_id} has no identifier of system {system}, which the consortium "
            "matches patients by; add it to the Patient before recording a privacy consent",
            expression="Consent.patient",
        )

    def pseudonym_of(self, patient: dict[str, Any]) -> str | None:
        """The pseudonym of a Patient resource, None when it lacks the consortium's identifier."""
        system = self.config.identifier_system
        for identifier in patient.get("identifier", []):
            if identifier.get("system") == system and str(identifier.get("value", "")).strip():
                return pseudonym(self.secret(), system, identifier["value"])
        return None

    # -- the observers ----------------------------------------------------------------------

    def on_patient_write(self, writer: Writer, before: Stored | None, after: Stored) -> None:
        """Keep the pseudonym index (:mod:`.pseudonym_index`) in step with the Patient."""
        if not self.config.consortium_key.exists():
            return  # not joined yet: hrx node join indexes every Patient
        patient = after.resource() if after.body is not None else None
        set_pseudonym(writer.conn, after.id, self.pseudonym_of(patient) if patient else None)

    def on_write(self, writer: Writer, before: Stored | None, after: Stored) -> None:
        try:
            self._record(writer, before, after)
        except ConsentError as exc:
            raise Unprocessable(str(exc), expression=exc.expression) from None

    def _record(self, writer: Writer, before: Stored | None, after: Stored) -> None:
        old = before.resource() if before is not None and before.body is not None else None
        new = after.resource() if after.body is not None else None
        old_granted = old is not None and is_exchange_consent(old) and old.get("status") == GRANTING
        new_exchange = new is not None and is_exchange_consent(new)
        actor = writer.actor if isinstance(writer.actor, Principal) else None  # None: an operator
        self._authorise(actor, old, new)
        if new is None and old_granted:
            raise Conflict(
                f"Consent/{after.id} is granted; revoke it (status inactive) instead of deleting "
                "it: the ledger keeps what it granted either way"
            )
        entries: list[tuple[str, dict[str, Any]]] = []
        if new is not None and new_exchange:
            patient_id = patient_reference(new)
            if old_granted and old is not None and patient_reference(old) != patient_id:
                raise ConsentError(
                    "a granted consent cannot move to another patient; revoke it and record "
                    "a new one for that patient",
                    "Consent.patient",
                )
            action = ledger_action(str(new.get("status")))
            if action == "granted":
                terms = terms_of(new, self.members(), format_time())
                entries.append(
                    (
                        "consent.granted",
                        granted_body(
                            after.id,
                            self.patient_pseudonym(writer, patient_id),
                            terms,
                            after.sha256(),
                        ),
                    )
                )
            elif old_granted:  # revoked, or back to draft: no longer granted
                entries.append(
                    (
                        "consent.revoked",
                        revoked_body(after.id, self.patient_pseudonym(writer, patient_id)),
                    )
                )
        elif old_granted and old is not None:  # no longer a privacy consent
            entries.append(
                (
                    "consent.revoked",
                    revoked_body(after.id, self.patient_pseudonym(writer, patient_reference(old))),
                )
            )
        if not entries:
            return
        if actor is not None and actor.role != "patient" and new is not None:
            self._require_witness(new)
            self._record_enterer(writer, actor, after)
        try:
            self.chain_writer().append_in(writer.conn, entries)
        except LedgerError as exc:
            raise Conflict(f"the consent could not be recorded on the ledger: {exc}") from None

    def _authorise(
        self, actor: Principal | None, old: dict[str, Any] | None, new: dict[str, Any] | None
    ) -> None:
        """A patient writes only privacy consents, and only their own."""
        if actor is None or actor.role != "patient":
            return
        for version in (old, new):
            if version is None:
                continue
            if not is_exchange_consent(version):
                raise Forbidden("a patient may record only privacy consents (patient-privacy)")
            try:
                own = patient_reference(version) == actor.patient_id
            except ConsentError:
                own = False
            if not own:
                raise Forbidden("a patient may record consents for themselves only")

    @staticmethod
    def _require_witness(resource: dict[str, Any]) -> None:
        witnesses = [e for e in resource.get("extension", []) if e.get("url") == WITNESS_URL]
        if not witnesses or not witnesses[0].get("valueReference"):
            raise ConsentError(
                "staff recording a consent on a patient's behalf must name its witness "
                f"(extension {WITNESS_URL} with a valueReference)",
                "Consent.extension",
            )

    def _record_enterer(self, writer: Writer, actor: Principal, consent: Stored) -> None:
        """A Provenance naming the staff member who entered the consent (from paper)."""
        provenance = {
            "resourceType": "Provenance",
            "target": [{"reference": f"Consent/{consent.id}/_history/{consent.version}"}],
            "recorded": format_instant(now_micros()),
            "activity": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                        "code": "CREATE" if consent.version == 1 else "UPDATE",
                    }
                ]
            },
            "agent": [
                {
                    "type": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/"
                                "provenance-participant-type",
                                "code": "enterer",
                            }
                        ]
                    },
                    "who": {
                        "identifier": {
                            "system": f"{USER_SYSTEM}:{self.config.node_id}",
                            "value": actor.username,
                        },
                        "display": f"{actor.username} ({actor.role})",
                    },
                }
            ],
            "entity": [{"role": "source", "what": {"display": "signed paper consent form"}}],
        }
        writer.create(provenance, "Provenance", checked=True)
