"""What one running node holds: its configuration, database, resource store, token authority
and audit trail. The app factory makes one :class:`Services` per process and hangs it on the
Flask app; the CLI makes one to act on a node's directory without serving it."""

from __future__ import annotations

from dataclasses import dataclass

from fhir_adapters.store import ResourceStore
from ledger.store import ChainStore
from node.base.config import NodeConfig
from node.db.engines import Database, open_database, require_current
from node.identity.tokens import TokenAuthority, token_authority
from node.records.audit_trail import AuditTrail
from node.records.consents import ConsentRecorder


@dataclass
class Services:
    config: NodeConfig
    database: Database
    store: ResourceStore
    tokens: TokenAuthority
    audit: AuditTrail
    chain_store: ChainStore  # reads
    chain_writes: ChainStore  # what the node records itself: votes, certificates, evidence
    consents: ConsentRecorder

    def close(self) -> None:
        self.audit.close()
        self.consents.close()
        self.database.close()


def open_services(config: NodeConfig, *, check_schema: bool = True) -> Services:
    database = open_database(config.database_url)
    if check_schema:
        require_current(database.engine, config.directory)
    store = ResourceStore(database.engine, database.write_engine, config.fhir_base)
    tokens = token_authority(config.token_key, config.fhir_base, database)
    audit = AuditTrail(store, config.node_id, config.name, config.audit_flush_ms)
    chain_store = ChainStore(database.engine)
    chain_writes = ChainStore(database.write_engine)  # on SQLite: the write lock up front
    consents = ConsentRecorder(config, chain_store)
    store.observe("Consent", consents.on_write)
    store.observe("Patient", consents.on_patient_write)
    return Services(config, database, store, tokens, audit, chain_store, chain_writes, consents)
