"""The check that no log line of the test run names a patient (:func:`tests.helpers.logs.leaks_in`,
which conftest.py runs over every log of the run once every test is done) finds what it must."""

from __future__ import annotations

import json
import sqlite3
import tempfile
from pathlib import Path

from tests.helpers.logs import leaks_in


def test_the_check_finds_a_leak() -> None:
    with tempfile.TemporaryDirectory() as scratch:  # not under the run's directory
        _check_finds_a_leak(Path(scratch))


def _check_finds_a_leak(tmp_path: Path) -> None:
    database = sqlite3.connect(tmp_path / "hrx.db")
    database.execute("CREATE TABLE fhir_versions (type TEXT, body BLOB)")
    patient = {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:oid:x", "value": "MRN-0042-77"}],
        "name": [{"family": "欧阳", "given": ["娜娜"]}],
    }
    database.execute("INSERT INTO fhir_versions VALUES ('Patient', ?)", (json.dumps(patient),))
    database.commit()
    database.close()
    (tmp_path / "quiet.log").write_text('{"message": "GET /fhir/Patient/<id> 200"}\n')
    assert leaks_in(tmp_path) == []
    for leak, found in [
        ("search family=欧阳娜娜", "欧阳娜娜"),
        ("mrn MRN-0042-77 refused", "MRN-0042-77"),
        ("id 330106198503120027", "330106198503120027"),
        ("call 13812345678", "13812345678"),
    ]:
        (tmp_path / "server.log").write_text(leak + "\n")
        (found_line,) = leaks_in(tmp_path)
        assert found in found_line
