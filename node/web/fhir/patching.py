"""JSON Patch (RFC 6902) applied to a stored resource: what ``PATCH Type/id`` and a Bundle's
``PATCH`` entry share. A Bundle carries the patch as FHIR R4 says, in a Binary whose
``contentType`` is ``application/json-patch+json`` and whose ``data`` is the patch in base64;
FHIRPath Patch (a Parameters resource) is not supported here, alone or in a Bundle."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import jsonpatch
import jsonpointer
from sqlalchemy.engine import Connection

from fhir_adapters.errors import (
    Gone,
    InvalidRequest,
    PreconditionFailed,
    Unprocessable,
    UnsupportedMediaType,
)
from fhir_adapters.store import ResourceStore, jsonio, parse_etag
from node.web.fhir.messages import JSON_PATCH, patch_operations

FHIRPATH_PATCH = "FHIRPath Patch is not supported"


def operations_in_binary(resource: Any) -> list[dict[str, Any]]:
    """The JSON Patch a Bundle entry's Binary holds; 415 for another content type (FHIRPath
    Patch's Parameters included), 400 for data that is no base64 JSON Patch."""
    if isinstance(resource, dict) and resource.get("resourceType") == "Parameters":
        raise UnsupportedMediaType(
            f"a PATCH entry holds a Parameters resource: {FHIRPATH_PATCH}; send a Binary "
            f"with contentType {JSON_PATCH}"
        )
    if not isinstance(resource, dict) or resource.get("resourceType") != "Binary":
        raise InvalidRequest(f"a PATCH entry holds a Binary with contentType {JSON_PATCH}")
    if resource.get("contentType") != JSON_PATCH:
        raise UnsupportedMediaType(
            f"a PATCH entry's Binary has contentType {str(resource.get('contentType'))[:60]!r}: "
            f"this server takes {JSON_PATCH} ({FHIRPATH_PATCH})"
        )
    data = resource.get("data")
    try:
        body = base64.b64decode(data if isinstance(data, str) else "", validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("the PATCH entry's Binary.data is not base64") from None
    if not body:
        raise InvalidRequest("the PATCH entry's Binary holds no data")
    return patch_operations(jsonio.parse(body, "the patch"))


def patched(
    store: ResourceStore,
    conn: Connection,
    resource_type: str,
    resource_id: str,
    operations: list[dict[str, Any]],
    if_match: str | None,
) -> tuple[dict[str, Any], str]:
    """The current version of ``resource_type/resource_id`` with the patch applied, and the
    ETag of the version it was applied to (write it only over that one). 404/410 for a
    resource that is not there, 412 when ``If-Match`` names another version, 400 for a
    malformed patch, 422 for one that cannot be applied or leaves no resource."""
    current = store.current(resource_type, resource_id, conn=conn)
    if current.deleted:
        raise Gone(f"{resource_type}/{resource_id} was deleted")
    if if_match is not None and parse_etag(if_match) != current.version:
        raise PreconditionFailed(
            f"{resource_type}/{resource_id} is at version {current.version}, not "
            f"{parse_etag(if_match)}: read it again and re-apply the patch"
        )
    try:
        result = jsonpatch.JsonPatch(operations).apply(current.resource())
    except jsonpatch.InvalidJsonPatch as exc:
        raise InvalidRequest(f"the patch: {exc}") from None
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
        raise Unprocessable(f"the patch cannot be applied: {exc}") from None
    except (TypeError, KeyError, IndexError):
        # jsonpatch fails so on a "from" that names no value (e.g. the end of a list, "-")
        raise Unprocessable(
            "the patch cannot be applied: a path or from names no value of the resource"
        ) from None
    if not isinstance(result, dict):
        raise Unprocessable("the patch does not leave a resource (a JSON object)")
    return result, current.etag
