"""The one error hierarchy of the node package (configuration, setup, users and tokens).

FHIR request errors are :class:`fhir_adapters.errors.FhirError`; ledger errors are
:class:`ledger.errors.LedgerError`. The CLI turns all three into one line and exit status 1.
"""

from __future__ import annotations


class NodeError(Exception):
    """Base of every error the node package raises outside a FHIR request."""


class ConfigError(NodeError):
    """A node directory or its configuration is missing, unreadable or wrong."""


class UserError(NodeError):
    """A user cannot be added, found or given what was asked (role, scope, patient)."""


class Refused(NodeError):
    """What a member asked of this node and this node refuses (answered 409, with why)."""
