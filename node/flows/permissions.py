"""Who may do what, checked and, when refused, recorded: every refusal is an AuditEvent."""

from __future__ import annotations

import logging

from fhir_adapters.errors import FhirError, Unauthorized
from fhir_adapters.store.search import Access
from node.records.audit_trail import Caller
from node.services import Services

log = logging.getLogger(__name__)


def permit(
    services: Services, caller: Caller, resource_type: str, action: str, interaction: str
) -> Access:
    """What ``caller`` may see of ``resource_type`` for ``action`` (a letter of ``cruds``);
    403 (recorded) when no scope or role allows it."""
    if caller.principal is None:
        raise Unauthorized("this server needs a bearer token (Authorization: Bearer ...)")
    if resource_type == "AuditEvent" and action in "rs":
        services.audit.flush()  # reading the trail: this process's queued records first
    try:
        return caller.principal.require(resource_type, action)
    except FhirError as exc:
        refuse(services, caller, interaction, str(exc))
        raise


def refuse(services: Services, caller: Caller, interaction: str, reason: str) -> None:
    """Record a refused interaction (outcome 4). A refusal stands even if its record cannot
    be written."""
    record = caller.record(interaction, outcome="4", description=reason)
    try:
        services.audit.record(record)
    except Exception:
        log.exception("could not record a refused request")
