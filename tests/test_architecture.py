"""The import rules of pyproject.toml's [tool.importlinter] hold (rooms, Flask and click kept
in their rooms, no cycle at any depth), and node/ keeps its shape: rooms, not loose files."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT

PACKAGES = ("ledger", "consent", "fhir_adapters", "exchange", "node")


def test_import_contracts_are_kept() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_node_holds_rooms_and_its_composition_root_only() -> None:
    loose = sorted(p.name for p in (ROOT / "node").glob("*.py"))
    assert loose == ["__init__.py", "services.py"]


def test_every_package_says_what_it_holds() -> None:
    for package in PACKAGES:
        for init in sorted((ROOT / package).rglob("__init__.py")):
            if "migrations" in init.parts:
                continue
            docstring = ast.get_docstring(ast.parse(init.read_text()))
            assert docstring and "TODO" not in docstring, f"{init.relative_to(ROOT)}"


def test_nothing_reads_outside_the_repository() -> None:
    """The repository is self-contained: no code, test, script or CI file names the folder
    beside it."""
    outside = "../" + "shared"
    for path in ROOT.rglob("*"):
        if ".git" in path.parts or not path.is_file() or path.suffix in {".dcm", ".png", ".pdf"}:
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        assert outside not in text, path.relative_to(ROOT)
