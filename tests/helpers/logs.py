"""Where the run's logs are, and the check that none names a patient: this process's own lines
(conftest.py writes them) beside the node processes' logs, under the run's base temporary
directory (each xdist worker's under its own subdirectory of it). At the end of the run,
conftest.py scans them all (:func:`leaks_in`): the names, identifiers and phone numbers of
every Patient stored in any SQLite node database of the run, and any resident ID number or
mobile number at all, may appear in no log the run wrote — the node processes', the
adapters', the demo's, and the test processes' own."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

IN_PROCESS_LOG = "in-process.log"  # under the run's (a worker's) base temporary directory

RESIDENT_ID = re.compile(r"(?<![0-9A-Za-z])[1-9][0-9]{16}[0-9Xx](?![0-9A-Za-z])")
MOBILE = re.compile(r"(?<![0-9A-Za-z])1[3-9][0-9]{9}(?![0-9A-Za-z])")
CJK = re.compile(r"[\u4e00-\u9fff]")
NOT_OURS = ("orthanc",)  # the PACS's own log is the PACS's


def patients(database: Path) -> Iterator[dict[str, Any]]:
    try:
        connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    except sqlite3.Error:
        return
    try:
        rows = connection.execute(
            "SELECT body FROM fhir_versions WHERE type = 'Patient' AND body IS NOT NULL"
        ).fetchall()
    except sqlite3.Error:  # not a node's database
        rows = []
    finally:
        connection.close()
    for (body,) in rows:
        try:
            yield json.loads(body)
        except ValueError:
            continue


def telling(value: Any) -> bool:
    """Whether a value is specific enough that finding it in a log means it leaked: a name of
    two or more Chinese characters, or eight or more characters with a letter and a digit or
    six or more letters (short or common strings would match log text by chance)."""
    if not isinstance(value, str):
        return False
    value = value.strip()
    if CJK.search(value):
        return len(value) >= 2
    if len(value) >= 8 and any(c.isdigit() for c in value):
        return True
    return len(value) >= 6 and value.isalpha()


def secrets_of(patient: dict[str, Any]) -> set[str]:
    found = set()
    for identifier in patient.get("identifier", []):
        found.add(identifier.get("value"))
    for telecom in patient.get("telecom", []):
        found.add(telecom.get("value"))
    for name in patient.get("name", []):
        given = "".join(name.get("given", []))
        found |= {name.get("text"), name.get("family", "") + given, given}
    return {value.strip() for value in found if telling(value)}


def leaks_in(base: Path) -> list[str]:
    """Every log line under ``base`` that names a patient of a database under ``base``."""
    secrets: set[str] = set()
    for database in base.rglob("*.db"):
        if database.is_file():
            for patient in patients(database):
                secrets |= secrets_of(patient)
    leaks = []
    for log in base.rglob("*.log"):
        if not log.is_file() or any(word in log.name for word in NOT_OURS):
            continue
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            found = [s for s in secrets if s in line]
            found += RESIDENT_ID.findall(line) + MOBILE.findall(line)
            if found:
                leaks.append(f"{log.relative_to(base)}: {sorted(set(found))}: {line[:300]}")
    return leaks
