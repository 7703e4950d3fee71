"""Fetch a node's whole ledger over HTTP into an export file, for the offline auditor.

``hrx audit verify https://node.example --token T`` downloads every roster version, every
block of every chain the node holds (in pages), its newest checkpoint certificate and its
fork evidence, into the same JSON Lines an export has, then verifies that file: nothing the
node says is trusted that the auditor does not check.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from ledger.canonical import canonical_bytes, parse_json
from node.base.errors import NodeError

PAGE_BLOCKS = 1000


def download_export(
    base_url: str, token: str, out_path: Path, progress: Callable[[int], None] | None = None
) -> None:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    base = base_url.rstrip("/")

    def get(path: str, missing_ok: bool = False) -> Any:
        try:
            response = session.get(base + path, timeout=(5, 60))
        except requests.RequestException as exc:
            raise NodeError(f"{base}: {type(exc).__name__}: {exc}") from None
        if missing_ok and response.status_code == 404:
            return None
        if response.status_code != 200:
            raise NodeError(f"{base}{path}: {response.status_code} {response.text[:200]}")
        return parse_json(response.content)

    with out_path.open("wb") as out:
        for roster in get("/ledger/rosters"):
            out.write(canonical_bytes(roster) + b"\n")
        for chain, head in sorted(get("/ledger/heads").items()):
            height = 0
            while height <= head["header"]["height"]:
                blocks = get(f"/ledger/chains/{chain}/blocks?from={height}&limit={PAGE_BLOCKS}")
                if not blocks:
                    raise NodeError(f"{base} serves no block of {chain} at height {height}")
                for block in blocks:
                    out.write(canonical_bytes(block) + b"\n")
                    if progress:
                        progress(len(block.get("entries", [])))
                height += len(blocks)
        certificate = get("/ledger/checkpoints/latest", missing_ok=True)
        if certificate is not None:
            out.write(canonical_bytes({"certificate": certificate}) + b"\n")
        for evidence in get("/ledger/evidence"):
            out.write(canonical_bytes({"evidence": evidence}) + b"\n")
