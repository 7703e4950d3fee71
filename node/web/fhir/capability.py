"""The CapabilityStatement at ``/fhir/metadata``: exactly what this server supports, built
from the same tables the server runs on (types, search parameters, includes), and the limits
it holds requests to, from the same constants that enforce them. The Bulk Data export is
declared as the Bulk Data Access IG asks (its operations by their canonical definitions, and
``instantiates`` its CapabilityStatement); ``$import`` is not, since the import proposal
publishes no OperationDefinition to name."""

from __future__ import annotations

from functools import cache
from importlib.metadata import version
from typing import Any

from fhir_adapters import definitions
from fhir_adapters.store.jsonio import NUMBER_RULE
from fhir_adapters.store.resources import RESOURCE_TYPES
from fhir_adapters.store.search import SEARCH_LIMITS
from fhir_adapters.store.search_params import SEARCH_PARAMS
from node.base.config import NodeConfig
from node.web.fhir.limits import MAX_BODY_BYTES, MAX_ENTRIES

PARAM_DEFINITIONS = "http://hl7.org/fhir/SearchParameter/"
OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
SCOPES_SUPPORTED = ["patient/*.rs", "user/*.cruds", "system/*.cruds", "patient/*.read", "user/*.*"]
BULK_DATA = "http://hl7.org/fhir/uv/bulkdata/"  # the Bulk Data Access IG's canonical URLs
BULK_EXPORTS = {  # where $export runs: the server (None), every Patient, one Group
    None: BULK_DATA + "OperationDefinition/export",
    "Patient": BULK_DATA + "OperationDefinition/patient-export",
    "Group": BULK_DATA + "OperationDefinition/group-export",
}
COMMON_PARAMS = [
    {"name": "_id", "type": "token", "definition": PARAM_DEFINITIONS + "Resource-id"},
    {
        "name": "_lastUpdated",
        "type": "date",
        "definition": PARAM_DEFINITIONS + "Resource-lastUpdated",
    },
]


def _definition_url(resource_type: str, name: str) -> str:
    official = definitions.search_parameters(resource_type).get(name)
    return official.url if official else f"{PARAM_DEFINITIONS}{resource_type}-{name}"


def _definition_type(resource_type: str, name: str, kind: str) -> str:
    """The kind R4 gives the parameter (``_text`` is a string there, searched by a rule of
    this server's own), or the index's kind for the node's own parameters."""
    official = definitions.search_parameters(resource_type).get(name)
    return official.type if official else kind


def _resource(resource_type: str) -> dict[str, Any]:
    params = SEARCH_PARAMS[resource_type]
    writable = resource_type != "AuditEvent"
    interactions = ["read", "vread", "search-type", "history-instance", "history-type"]
    if writable:
        interactions += ["create", "update", "patch", "delete"]
    entry: dict[str, Any] = {
        "type": resource_type,
        "profile": f"http://hl7.org/fhir/StructureDefinition/{resource_type}",
        "interaction": [{"code": code} for code in interactions],
        "versioning": "versioned-update",
        "readHistory": True,
        "updateCreate": writable,
        "conditionalCreate": writable,
        "conditionalRead": "full-support",
        "conditionalUpdate": writable,
        "conditionalDelete": "single" if writable else "not-supported",
        "referencePolicy": ["literal", "enforced", "local"],
        "searchInclude": sorted(
            f"{resource_type}:{name}" for name, p in params.items() if p.type == "reference"
        ),
        "searchRevInclude": sorted(
            f"{source}:{name}"
            for source, source_params in SEARCH_PARAMS.items()
            for name, p in source_params.items()
            if p.type == "reference" and (not p.targets or resource_type in p.targets)
        ),
        "searchParam": COMMON_PARAMS
        + [
            {
                "name": name,
                "type": _definition_type(resource_type, name, p.type),
                "definition": _definition_url(resource_type, name),
            }
            for name, p in sorted(params.items())
        ],
    }
    for key in ("searchInclude", "searchRevInclude"):
        if not entry[key]:
            del entry[key]  # FHIR JSON has no empty arrays
    operations = []
    if resource_type == "Patient":
        operations.append(
            {
                "name": "everything",
                "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
            }
        )
    if resource_type in BULK_EXPORTS:
        operations.append({"name": "export", "definition": BULK_EXPORTS[resource_type]})
    if operations:
        entry["operation"] = operations
    return entry


def limits() -> str:
    """The limits this server holds every request to, in words (``rest.documentation``)."""
    return (
        f"Limits: a request body is at most {MAX_BODY_BYTES // (1024 * 1024)} MiB (413 "
        f"beyond), UTF-8 (415 for another charset); a batch or transaction has at most "
        f"{MAX_ENTRIES} entries (413 beyond); {SEARCH_LIMITS} (400 beyond); in a resource, "
        f"{NUMBER_RULE} (400 otherwise)."
    )


@cache
def _resources() -> tuple[dict[str, Any], ...]:
    """Every type's entry (the same for every node and request: made once, 24 ms; not to be
    changed by a caller)."""
    return tuple(_resource(t) for t in RESOURCE_TYPES)


def token_endpoint(config: NodeConfig) -> str:
    return config.url.rstrip("/") + "/auth/token"


def smart_configuration(config: NodeConfig) -> dict[str, Any]:
    """``.well-known/smart-configuration`` (SMART App Launch 2.x), saying what the token
    endpoint really does: the password grant with SMART v2 scopes; no authorization endpoint,
    so no app launch and no PKCE."""
    return {
        "token_endpoint": token_endpoint(config),
        "grant_types_supported": ["password"],
        "token_endpoint_auth_methods_supported": ["none"],
        "scopes_supported": SCOPES_SUPPORTED,
        "response_types_supported": [],
        "code_challenge_methods_supported": [],
        "capabilities": ["permission-v1", "permission-v2", "permission-patient", "permission-user"],
    }


def capability_statement(config: NodeConfig) -> dict[str, Any]:
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-24",
        "publisher": config.name,
        "kind": "instance",
        "instantiates": [BULK_DATA + "CapabilityStatement/bulk-data"],
        "software": {"name": "hrx", "version": version("hrx")},
        "implementation": {"description": f"hrx node {config.node_id}", "url": config.fhir_base},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [
            {
                "mode": "server",
                "security": {
                    "extension": [
                        {
                            "url": OAUTH_URIS,
                            "extension": [
                                {"url": "token", "valueUri": token_endpoint(config)},
                            ],
                        }
                    ],
                    "service": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/"
                                    "restful-security-service",
                                    "code": "OAuth",
                                }
                            ]
                        }
                    ],
                    "description": "Bearer tokens (EdDSA JWT) with SMART v2 scopes, issued by "
                    "this node: hrx token issue, or POST /auth/token (OAuth 2.0 password "
                    "grant). No SMART app launch: there is no authorization endpoint "
                    "(.well-known/smart-configuration says the same).",
                },
                "documentation": limits(),
                "resource": list(_resources()),
                "interaction": [
                    {"code": kind, "documentation": f"at most {MAX_ENTRIES} entries"}
                    for kind in ("transaction", "batch")
                ],
                "operation": [{"name": "export", "definition": BULK_EXPORTS[None]}],
            }
        ],
    }
