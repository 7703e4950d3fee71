"""The FHIR store below the web layer: search sets are bounded per caller, date ranges follow
FHIR precision, parameter values split at unescaped commas, index rows of a resource, and
the parameters searched by other parameters' rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from fhir_adapters.errors import NotFound
from fhir_adapters.store import ResourceStore, tables
from fhir_adapters.store.search import (
    EVERYONE,
    SEARCH_SETS_PER_OWNER,
    match_query,
    page,
    paginate,
    parse_search,
    split_values,
)
from fhir_adapters.store.search_params import SEARCH_PARAMS, date_range, index_values
from ledger.store import open_engine


def test_search_sets_are_bounded_per_owner(tmp_path: Path) -> None:
    engine = open_engine(str(tmp_path / "store.db"))
    tables.metadata.create_all(engine)
    pairs = [(n, 1) for n in range(1, 31)]
    first = paginate(engine, pairs, 10, "alice", "search", {})
    assert first.set_id and first.total == 30 and first.pairs == pairs[:10]
    with engine.connect() as conn:
        assert page(conn, first.set_id, 20, 10, "alice").pairs == pairs[20:]
        with pytest.raises(NotFound, match="not yours"):
            page(conn, first.set_id, 0, 10, "mallory")
    for _ in range(SEARCH_SETS_PER_OWNER):
        paginate(engine, pairs, 10, "alice", "search", {})
    paginate(engine, pairs, 10, "bob", "search", {})
    with engine.connect() as conn:
        owners = dict(
            conn.execute(
                sa.select(tables.search_sets.c.owner, sa.func.count()).group_by(
                    tables.search_sets.c.owner
                )
            ).all()
        )
        assert owners == {"alice": SEARCH_SETS_PER_OWNER, "bob": 1}
        with pytest.raises(NotFound):  # alice's oldest made room
            page(conn, first.set_id, 0, 10, "alice")
    # one page or _count=0: nothing stored
    assert paginate(engine, pairs[:5], 10, "carol", "search", {}).set_id is None
    assert paginate(engine, pairs, 0, "carol", "search", {}).set_id is None
    engine.dispose()


def test_date_ranges_follow_precision_and_zone() -> None:
    day = date_range("2024-03-05")
    assert day[1] - day[0] == 86_400_000_000
    assert date_range("2024-03-05T00:00:00+08:00")[0] == day[0]  # no zone: UTC+08:00
    assert date_range("2024-03-04T16:00:00Z")[0] == day[0]
    year = date_range("2024")
    assert year[1] - year[0] == 366 * 86_400_000_000
    assert date_range("2024-12")[1] == date_range("2025-01")[0]
    instant = date_range("2024-03-05T10:00:00.123Z")
    assert instant[1] - instant[0] == 1000
    for bad in ("2024-13", "24-01-01", "2024-02-30", "2024-01-01T25:00"):
        with pytest.raises(ValueError):
            date_range(bad)


def test_split_values() -> None:
    assert split_values("a,b") == ["a", "b"]
    assert split_values(r"a\,b,c") == ["a,b", "c"]
    assert split_values(r"http://x|a\|b") == [r"http://x|a|b"]
    assert split_values("") == [""]


def test_index_values_of_an_observation() -> None:
    rows = index_values(
        {
            "resourceType": "Observation",
            "id": "o1",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
            "subject": {"reference": "http://node/fhir/Patient/p1"},
            "performer": [{"reference": "Practitioner/d1"}],
            "effectivePeriod": {"start": "2024-01-01"},
        },
        "http://node/fhir",
    )
    assert ("code", "http://loinc.org", "718-7") in rows.tokens
    assert ("patient", "Patient", "p1") in rows.references
    assert rows.compartment == {"p1"}
    assert set(rows.links) == {("Patient", "p1"), ("Practitioner", "d1")}
    assert rows.dates == [("date", date_range("2024-01-01")[0], 2**62)]


def test_url_elements_are_json_strings() -> None:
    """A FHIR url (a Union of AnyUrl and str in the models) is a JSON string, not an object:
    an attachment's url and a contained Endpoint's address validate (they were refused as
    "must be an object"), and an object there is refused."""
    from fhir_adapters.errors import FhirError
    from fhir_adapters.store.resources import validate

    report = {
        "resourceType": "DiagnosticReport",
        "status": "final",
        "code": {"text": "CT chest"},
        "presentedForm": [{"contentType": "application/pdf", "url": "https://pacs/r/1.pdf"}],
    }
    assert validate(report)["presentedForm"][0]["url"] == "https://pacs/r/1.pdf"
    study = {
        "resourceType": "ImagingStudy",
        "status": "available",
        "subject": {"reference": "Patient/p1"},
        "contained": [
            {
                "resourceType": "Endpoint",
                "id": "wado",
                "status": "active",
                "connectionType": {"code": "dicom-wado-rs"},
                "payloadType": [{"text": "DICOM"}],
                "address": "http://pacs/dicom-web/studies/1.2.3",
            }
        ],
        "endpoint": [{"reference": "#wado"}],
    }
    assert validate(study)["contained"][0]["address"].endswith("/studies/1.2.3")
    report["presentedForm"][0]["url"] = {"value": "https://pacs/r/1.pdf"}
    with pytest.raises(FhirError):
        validate(report)


UCUM = "http://unitsofmeasure.org"


def _observation(code: str, value: float | None, components: list[tuple[str, float]]) -> dict:
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}], "text": f"t{code}"},
        "component": [
            {
                "code": {"coding": [{"system": "http://loinc.org", "code": c}]},
                "valueQuantity": {"value": v, "system": UCUM, "code": "mm[Hg]"},
            }
            for c, v in components
        ],
    }
    if value is not None:
        observation["valueQuantity"] = {"value": value, "system": UCUM, "code": "mm[Hg]"}
    if not components:
        del observation["component"]
    return observation


def test_parameters_searched_by_other_parameters_rows(tmp_path: Path) -> None:
    """Observation's unions (combo-*) and its composites over the Observation itself write no
    rows of their own, and find exactly what a brute-force reading of their definitions finds:
    a code on the Observation with a value of the Observation, never a component's value under
    the Observation's code, nor the reverse."""
    params = SEARCH_PARAMS["Observation"]
    assert params["combo-code"].union_of == ("code", "component-code")
    assert params["code-value-quantity"].parts_of == ("code", "value-quantity")
    assert not params["code-value-string"].parts_of  # its part selects less than value-string
    assert not params["component-code-value-quantity"].parts_of  # a component is no resource
    engine = open_engine(str(tmp_path / "store.db"), immediate=True)
    tables.metadata.create_all(engine)
    store = ResourceStore(engine, engine, "http://hrx.test/fhir")
    made = [
        _observation("8480-6", 150, []),  # systolic, high, on the Observation
        _observation("8480-6", 100, [("8462-4", 150)]),  # systolic low; a component's 150
        _observation("85354-9", None, [("8480-6", 150), ("8462-4", 80)]),  # panel: components
        _observation("8462-4", 95, [("8480-6", 100)]),
    ]
    by_pk = {store.create(o).res_pk: o for o in made}
    for observation in made:
        rows = index_values(observation)
        names = {row[0] for row in [*rows.tokens, *rows.strings, *rows.quantities]}
        assert not any(n.startswith(("combo-", "code-value-")) for n in names), names

    def found(name: str, value: str) -> set[int]:
        with engine.connect() as conn:
            query = match_query(parse_search("Observation", [(name, value)]), EVERYONE)
            return {row[0] for row in conn.execute(query)}

    for code in ("8480-6", "8462-4", "85354-9"):
        anywhere = {pk for pk, o in by_pk.items() if code in _codes(o, True) | _codes(o, False)}
        assert found("combo-code", code) == found("combo-code", f"http://loinc.org|{code}")
        assert found("combo-code", code) == anywhere
        on_root = {pk for pk, o in by_pk.items() if code in _codes(o, True)}
        assert found("combo-code:text", f"t{code}") == on_root
        high = {
            root: {pk for pk, o in by_pk.items() if code in _high(o, root)}
            for root in (True, False)
        }
        for token in (code, f"http://loinc.org|{code}"):
            value = f"{token}$gt120|{UCUM}|mm[Hg]"
            assert found("code-value-quantity", value) == high[True], value
            assert found("component-code-value-quantity", value) == high[False], value
            assert found("combo-code-value-quantity", value) == high[True] | high[False]
        assert found("code-value-quantity", f"|{code}$gt1|{UCUM}|mm[Hg]") == set()  # no system
    high_anywhere = {pk for pk, o in by_pk.items() if _high(o, True) | _high(o, False)}
    assert found("combo-value-quantity", f"gt120|{UCUM}|mm[Hg]") == high_anywhere
    # sorted by a union: by the least code of those it unites
    with engine.connect() as conn:
        query = match_query(parse_search("Observation", [("_sort", "combo-code")]), EVERYONE)
        order = [row[0] for row in conn.execute(query)]
    assert order == sorted(
        by_pk, key=lambda pk: min(_codes(by_pk[pk], True) | _codes(by_pk[pk], False))
    )
    # a concept and a date as the other part: the same rule, by their own parameters' rows
    snomed = "http://snomed.info/sct"
    typed = {
        "concept": _observation("11130-6", None, [])
        | {"valueCodeableConcept": {"coding": [{"system": snomed, "code": "260385009"}]}},
        "date": _observation("11130-6", None, []) | {"valueDateTime": "2026-03-01"},
        "elsewhere": _observation("8480-6", None, [])  # the concept under another code
        | {"valueCodeableConcept": {"coding": [{"system": snomed, "code": "260385009"}]}},
    }
    pks = {name: store.create(o).res_pk for name, o in typed.items()}
    concept = f"http://loinc.org|11130-6${snomed}|260385009"
    assert found("code-value-concept", concept) == {pks["concept"]}
    assert found("combo-code-value-concept", concept) == {pks["concept"]}
    assert found("code-value-concept", "11130-6$260385009") == {pks["concept"]}
    assert found("code-value-date", "11130-6$ge2026-02-01") == {pks["date"]}
    assert found("code-value-date", "11130-6$lt2026-02-01") == set()
    engine.dispose()


def _codes(observation: dict[str, Any], root: bool) -> set[str]:
    """The codes of the Observation itself (``root``), or of its components."""
    parts = [observation] if root else observation.get("component", [])
    return {part["code"]["coding"][0]["code"] for part in parts}


def _high(observation: dict[str, Any], root: bool) -> set[str]:
    """The codes of the Observation itself (``root``), or of its components, whose value in
    the same element is above 120."""
    parts = [observation] if root else observation.get("component", [])
    return {
        part["code"]["coding"][0]["code"]
        for part in parts
        if "valueQuantity" in part and part["valueQuantity"]["value"] > 120
    }


def test_an_update_that_creates_takes_what_was_prepared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Writer.update(prepared=...)``: a resource made ready before the write is stored as
    made (its bytes and index rows), with no indexing in the write, exactly as the same update
    without it stores it; one made ready under another type or id is refused, not stored
    under the wrong name."""
    from fhir_adapters.store import repository

    engine = open_engine(str(tmp_path / "store.db"), immediate=True)
    tables.metadata.create_all(engine)
    store = ResourceStore(engine, engine, "http://hrx.test/fhir")
    stored = {}
    indexed: list[str] = []
    index_values = repository.index_values

    def counted(resource: dict[str, Any], *rest: Any) -> Any:
        indexed.append(resource["id"])
        return index_values(resource, *rest)

    monkeypatch.setattr(repository, "index_values", counted)
    for resource_id in ("made-before", "made-in-write"):
        resource = _observation("2345-7", 5.4, []) | {"id": resource_id}
        prepared = (
            store.new_resource(resource, resource_id) if resource_id == "made-before" else None
        )
        indexed.clear()
        with store.writing() as writer:
            stored[resource_id], created = writer.update(
                "Observation", resource_id, resource, validated=True, prepared=prepared
            )
        assert created
        assert indexed == ([] if prepared else [resource_id])  # indexed in the write, or not
    before, during = stored["made-before"], stored["made-in-write"]
    assert _without_meta(before) == _without_meta(during) | {"id": "made-before"}
    assert _index_rows_of(engine, before.res_pk) == _index_rows_of(engine, during.res_pk)
    elsewhere = store.new_resource(_observation("2345-7", 1, []) | {"id": "a"}, "a")
    with pytest.raises(ValueError, match="was prepared"), store.writing() as writer:
        writer.update("Observation", "b", {"resourceType": "Observation"}, prepared=elsewhere)
    engine.dispose()


def _without_meta(stored: Any) -> dict[str, Any]:
    """A stored resource's JSON without its meta (its lastUpdated is the moment it was written)."""
    return {key: value for key, value in json.loads(stored.body).items() if key != "meta"}


def _index_rows_of(engine: sa.Engine, res_pk: int) -> list[tuple[Any, ...]]:
    """Every index row of one resource, without its res_pk, in a stable order."""
    found = []
    with engine.connect() as conn:
        for table in tables.INDEX_TABLES:
            columns = [c for c in table.c if c.name != "res_pk"]
            rows = conn.execute(sa.select(*columns).where(table.c.res_pk == res_pk))
            found += sorted((table.name, *row) for row in rows)
    return found
