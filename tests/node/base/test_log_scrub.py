"""What a library puts in an error never carries a patient into the node's log: the engines
hide statement parameters, and every line is scrubbed of query strings, resident IDs, mobile
numbers and PostgreSQL's DETAIL lines (node.base.logs.scrub)."""

from __future__ import annotations

import io
import json
import logging

import pytest
import sqlalchemy as sa

from ledger.store import open_engine
from node.base.logs import scrub, stream_handler

RESIDENT_ID = "330106198503120027"
NAME = "欧阳娜娜"


def logged(db_url: str) -> str:
    """The log line of an unhandled unique-key violation whose statement names a patient."""
    engine = open_engine(db_url)
    table = sa.Table(
        "people",
        sa.MetaData(),
        sa.Column("id", sa.String(32), unique=True),
        sa.Column("name", sa.Text),
    )
    table.metadata.create_all(engine)
    stream = io.StringIO()
    log = logging.getLogger("hrx.test.scrub")
    log.addHandler(stream_handler("json", stream))
    log.propagate = False
    try:
        with engine.begin() as conn:
            conn.execute(table.insert().values(id=RESIDENT_ID, name=NAME))
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            try:
                conn.execute(table.insert().values(id=RESIDENT_ID, name=NAME))
            except sa.exc.IntegrityError:
                log.exception("FHIR request failed: POST /fhir/<resource_type>")
                raise
    finally:
        engine.dispose()
    return stream.getvalue()


def test_an_unhandled_database_error_names_no_patient(db_url: str) -> None:
    line = json.loads(logged(db_url))
    assert "IntegrityError" in line["exception"]
    assert RESIDENT_ID not in json.dumps(line, ensure_ascii=False)
    assert NAME not in json.dumps(line, ensure_ascii=False)


@pytest.mark.parametrize(
    ("text", "kept", "removed"),
    [
        ("Invalid request line: 'GET /fhir/Patient?family=张三 HTTP/1.1'", "/fhir/Patient", "张三"),
        ("GET http://h/fhir/Patient?identifier=a|b", "http://h/fhir/Patient", "identifier"),
        ("DETAIL:  Key (code)=(MRN-77) already exists.", "DETAIL", "MRN-77"),
        (f"patient {RESIDENT_ID} unknown", "patient", RESIDENT_ID),
        ("phone 13812345678.", "phone", "13812345678"),
        ("[parameters: ('张三', 3)]\n(Background on this error)", "Background", "张三"),
    ],
)
def test_scrub(text: str, kept: str, removed: str) -> None:
    assert kept in scrub(text) and removed not in scrub(text)


@pytest.mark.parametrize(
    "text",
    [
        "restored from a backup? stop the node",
        "request 18914442414d5f79 at 1733464800123456 us",
        "GET /fhir/<resource_type>/<resource_id> 200 3.1 ms",
    ],
)
def test_scrub_keeps_what_is_not_private(text: str) -> None:
    assert scrub(text) == text
