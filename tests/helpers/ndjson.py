"""The synthetic cohort (:mod:`tests.helpers.cohort`) as FHIR NDJSON, one file per type, the way
a Bulk Data export writes it: every resource with its id, references as ``Type/id``."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tests.helpers.cohort import cohort

Json = dict[str, Any]
SERVER_META = ("versionId", "lastUpdated")
URN = re.compile(r'"(urn:uuid:[0-9a-f-]+)"')


def cohort_resources(patients: int, seed: int = 0) -> list[Json]:
    """Every resource of a cohort of ``patients``, each once, with ids and literal references."""
    bundles = cohort(patients, seed, conditional_references=False)
    names: dict[str, str] = {}
    found: dict[tuple[str, str], Json] = {}
    for bundle in bundles:
        for entry in bundle["entry"]:
            resource = entry["resource"]
            if entry["request"]["method"] == "PUT":
                resource_id = entry["request"]["url"].split("/")[1]
            else:
                resource_id = entry["fullUrl"].removeprefix("urn:uuid:")
            names[entry["fullUrl"]] = f"{resource['resourceType']}/{resource_id}"
            found[(resource["resourceType"], resource_id)] = {**resource, "id": resource_id}
    text = json.dumps(list(found.values()), ensure_ascii=False)
    text = URN.sub(lambda m: json.dumps(names.get(m.group(1), m.group(1))), text)
    resources: list[Json] = json.loads(text)
    return resources


def write_ndjson(resources: list[Json], folder: Path) -> list[Path]:
    """One ``<Type>.ndjson`` per type in ``folder``; the files, by name."""
    folder.mkdir(parents=True, exist_ok=True)
    by_type: dict[str, list[str]] = {}
    for resource in resources:
        line = json.dumps(resource, ensure_ascii=False, separators=(",", ":"))
        by_type.setdefault(resource["resourceType"], []).append(line)
    paths = []
    for resource_type, lines in sorted(by_type.items()):
        path = folder / f"{resource_type}.ndjson"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def without_server_meta(resource: Json) -> Json:
    """A resource without what a server sets (``meta.versionId``, ``meta.lastUpdated``), to
    compare what was sent with what was stored."""
    meta = {k: v for k, v in resource.get("meta", {}).items() if k not in SERVER_META}
    plain = {k: v for k, v in resource.items() if k != "meta"}
    return {**plain, "meta": meta} if meta else plain
