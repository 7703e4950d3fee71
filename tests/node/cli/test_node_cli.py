"""Setting up a node from the command line: ``hrx node init|upgrade``, ``hrx user add``,
``hrx token issue``, configuration overrides, and migrations that match the models."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from click.testing import CliRunner, Result

from ledger.canonical import canonical_bytes
from ledger.store import ChainStore
from ledger.store.schema import entries_table, subjects_table
from node.base.config import load_config
from node.base.errors import ConfigError
from node.cli import main
from node.db.engines import MODEL_METADATA, current_revision, head_revision, open_database
from node.db.schema import messages_table
from node.identity.users import get_user, sign_in


def hrx(*args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=stdin)


@pytest.fixture
def node_dir(tmp_path: Path, db_url: str) -> Path:
    directory = tmp_path / "hosp-b"
    result = hrx(
        "node",
        "init",
        "--dir",
        str(directory),
        "--id",
        "hosp-b",
        "--name",
        "浙江大学医学院附属第二医院",
        "--db",
        db_url,
        "--port",
        "18181",
    )
    assert result.exit_code == 0, result.output
    return directory


def test_init_makes_keys_config_database_and_enrollment(node_dir: Path) -> None:
    for key in ("node.pem", "node.bls", "token.pem"):
        mode = stat.S_IMODE((node_dir / "keys" / key).stat().st_mode)
        assert mode == 0o600, (key, oct(mode))
    config = load_config(node_dir, environ={})
    assert config.node_id == "hosp-b" and config.port == 18181
    assert config.fhir_base == "http://127.0.0.1:18181/fhir"
    enrollment = json.loads((node_dir / "enrollment.json").read_text())
    assert enrollment["id"] == "hosp-b" and enrollment["name"] == "浙江大学医学院附属第二医院"
    assert set(enrollment) == {"id", "name", "url", "ed25519", "bls", "bls_pop"}
    from ledger import bls

    assert bls.verify_possession(
        bytes.fromhex(enrollment["bls"]), bytes.fromhex(enrollment["bls_pop"])
    )
    database = open_database(config.database_url)
    try:
        assert current_revision(database.engine) == head_revision()
        store = ChainStore(database.engine)
        assert store.setting("chain") == "hosp-b"
        # the migrations made exactly what the models describe
        with database.engine.connect() as conn:
            differences = compare_metadata(MigrationContext.configure(conn), MODEL_METADATA)
        assert differences == []
        # and the ledger tables refuse changes
        with database.engine.begin() as c:
            c.execute(sa.text("INSERT INTO ledger_entries VALUES ('x', 0, :d, :d)"), {"d": b"x"})
        with pytest.raises(sa.exc.DBAPIError, match="append-only"), database.engine.begin() as c:
            c.execute(sa.text("DELETE FROM ledger_entries"))
    finally:
        database.close()


def test_init_refuses_an_existing_node_and_bad_ids(node_dir: Path, tmp_path: Path) -> None:
    again = hrx("node", "init", "--dir", str(node_dir), "--id", "hosp-b", "--name", "x")
    assert again.exit_code == 1 and "already holds a node" in again.output
    bad = hrx("node", "init", "--dir", str(tmp_path / "bad"), "--id", "Hosp B!", "--name", "x")
    assert bad.exit_code == 1 and "chain id" in bad.output


def test_upgrade_is_idempotent(node_dir: Path) -> None:
    result = hrx("node", "upgrade", "--dir", str(node_dir))
    assert result.exit_code == 0 and "is current" in result.output


def test_environment_overrides_and_config_errors(node_dir: Path) -> None:
    config = load_config(node_dir, environ={"HRX_SERVER_PORT": "9999", "HRX_NODE_NAME": "改名"})
    assert config.port == 9999 and config.name == "改名"
    with pytest.raises(ConfigError, match="HRX_SERVER_PORT"):
        load_config(node_dir, environ={"HRX_SERVER_PORT": "eighty"})
    text = (node_dir / "node.toml").read_text()
    (node_dir / "node.toml").write_text(text + "\n[server]\ncolour = 1\n")
    with pytest.raises(ConfigError):
        load_config(node_dir, environ={})
    (node_dir / "node.toml").write_text(text.replace("[server]", "[server]\ncolour = 1"))
    with pytest.raises(ConfigError, match=r"unknown setting server\.colour"):
        load_config(node_dir, environ={})
    missing = hrx("node", "upgrade", "--dir", str(node_dir.parent / "nowhere"))
    assert missing.exit_code == 1 and "hrx node init" in missing.output


def test_users_and_tokens(node_dir: Path) -> None:
    assert (
        hrx(
            "user",
            "add",
            "--dir",
            str(node_dir),
            "--username",
            "wang",
            "--role",
            "doctor",
            "--password-stdin",
            stdin="a long password\n",
        ).exit_code
        == 0
    )
    twice = hrx("user", "add", "--dir", str(node_dir), "--username", "wang", "--role", "doctor")
    assert twice.exit_code == 1 and "already exists" in twice.output
    no_patient = hrx("user", "add", "--dir", str(node_dir), "--username", "p", "--role", "patient")
    assert no_patient.exit_code == 1 and "--patient" in no_patient.output
    unknown = hrx(
        "user",
        "add",
        "--dir",
        str(node_dir),
        "--username",
        "p",
        "--role",
        "patient",
        "--patient",
        "nobody",
    )
    assert unknown.exit_code == 1 and "Patient/nobody is not known" in unknown.output
    short = hrx(
        "user",
        "add",
        "--dir",
        str(node_dir),
        "--username",
        "li",
        "--role",
        "doctor",
        "--password-stdin",
        stdin="short\n",
    )
    assert short.exit_code == 1 and "8 characters" in short.output
    token = hrx(
        "token",
        "issue",
        "--dir",
        str(node_dir),
        "--username",
        "wang",
        "--scope",
        "user/Observation.rs",
    )
    assert token.exit_code == 0 and token.output.count(".") == 2
    import jwt

    claims = jwt.decode(token.output.strip(), options={"verify_signature": False})
    assert claims["scope"] == "user/Observation.rs" and claims["sub"] == "wang"
    too_long = hrx(
        "token", "issue", "--dir", str(node_dir), "--username", "wang", "--ttl", "999999"
    )
    assert too_long.exit_code == 1 and "max_ttl" in too_long.output
    bad_scope = hrx(
        "token", "issue", "--dir", str(node_dir), "--username", "wang", "--scope", "user/*.xyz"
    )
    assert bad_scope.exit_code == 1 and "cruds" in bad_scope.output
    nobody = hrx("token", "issue", "--dir", str(node_dir), "--username", "ghost")
    assert nobody.exit_code == 1 and "no user" in nobody.output


def test_user_lifecycle_commands(node_dir: Path) -> None:
    import jwt

    directory = str(node_dir)

    def user(command: str, username: str, stdin: str | None = None) -> Result:
        return hrx("user", command, "--dir", directory, "--username", username, stdin=stdin)

    assert user("add", "wang", stdin=None).exit_code == 2  # --role is required
    added = hrx("user", "add", "--dir", directory, "--username", "wang", "--role", "doctor",
                "--password-stdin", stdin="a long password\n")  # fmt: skip
    assert added.exit_code == 0, added.output
    config = load_config(node_dir, environ={})
    database = open_database(config.database_url)
    try:
        engine = database.write_engine
        for command in ("disable", "enable", "remove", "unlock"):
            unknown = user(command, "ghost")
            assert unknown.exit_code == 1 and "no user 'ghost'" in unknown.output, command
        unknown = user("reset-password", "ghost", stdin="a long password\n")
        assert unknown.exit_code == 1 and "no user 'ghost'" in unknown.output

        disabled = user("disable", "wang")
        assert disabled.exit_code == 0 and "disabled wang" in disabled.output
        assert "already disabled" in user("disable", "wang").output
        refused = hrx("token", "issue", "--dir", directory, "--username", "wang")
        assert refused.exit_code == 1 and "disabled" in refused.output
        assert sign_in(engine, "wang", "a long password", "192.0.2.1").user is None
        assert "enabled wang" in user("enable", "wang").output
        assert "was not disabled" in user("enable", "wang").output
        assert sign_in(engine, "wang", "a long password", "192.0.2.1").user is not None

        for _ in range(5):
            assert sign_in(engine, "wang", "wrong password", "192.0.2.2").user is None
        assert sign_in(engine, "wang", "a long password", "192.0.2.3").retry_after > 0
        assert "sign-in throttle(s) holding wang" in user("unlock", "wang").output
        assert "no sign-in throttle was holding wang" in user("unlock", "wang").output
        assert sign_in(engine, "wang", "a long password", "192.0.2.3").user is not None

        empty = user("reset-password", "wang", stdin="")
        assert empty.exit_code == 1 and "stdin" in empty.output
        short = user("reset-password", "wang", stdin="short\n")
        assert short.exit_code == 1 and "8 characters" in short.output
        before = hrx("token", "issue", "--dir", directory, "--username", "wang").output.strip()
        reset = user("reset-password", "wang", stdin="another long one\n")
        assert reset.exit_code == 0 and "tokens and sessions were revoked" in reset.output
        assert sign_in(engine, "wang", "a long password", "192.0.2.3").user is None
        user_now = sign_in(engine, "wang", "another long one", "192.0.2.3").user
        assert user_now is not None
        assert jwt.decode(before, options={"verify_signature": False})["gen"] == (
            user_now.token_generation - 1
        )

        token = hrx("token", "issue", "--dir", directory, "--username", "wang").output.strip()
        token_id = jwt.decode(token, options={"verify_signature": False})["jti"]
        revoke = ("token", "revoke", "--dir", directory)
        neither = hrx(*revoke)
        assert neither.exit_code == 2 and "--id" in neither.output
        both = hrx(*revoke, "--id", token_id, "--username", "wang")
        assert both.exit_code == 2
        nowhere = hrx(*revoke, "--id", "no-such-token")
        assert nowhere.exit_code == 1 and "no token with id 'no-such-token'" in nowhere.output
        done = hrx(*revoke, "--id", token_id)
        assert done.exit_code == 0 and f"revoked token {token_id} of wang" in done.output
        assert "already revoked" in hrx(*revoke, "--id", token_id).output
        everything = hrx(*revoke, "--username", "wang")
        assert everything.exit_code == 0 and "every token and session of wang" in everything.output
        assert hrx(*revoke, "--username", "ghost").exit_code == 1

        removed = user("remove", "wang")
        assert removed.exit_code == 0 and "removed doctor wang" in removed.output
        for command in ("disable", "enable", "remove", "unlock"):
            gone = user(command, "wang")
            assert gone.exit_code == 1 and "was removed" in gone.output, command
        reused = hrx("user", "add", "--dir", directory, "--username", "wang", "--role", "auditor")
        assert reused.exit_code == 1 and "never given to anyone else" in reused.output
        assert sign_in(engine, "wang", "another long one", "192.0.2.3").user is None
        no_token = hrx("token", "issue", "--dir", directory, "--username", "wang")
        assert no_token.exit_code == 1 and "removed" in no_token.output
        assert get_user(engine, "wang") is not None  # the row stays: the name stays taken
    finally:
        database.close()


def test_app_refuses_a_database_behind(node_dir: Path) -> None:
    from node.web.app import create_app

    config = load_config(node_dir, environ={})
    database = open_database(config.database_url)
    try:
        with database.write_engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = 'old'"))
    finally:
        database.close()
    with pytest.raises(ConfigError, match="hrx node upgrade"):
        create_app(node_dir)


def undo_revision_0011(conn: sa.Connection) -> None:
    """What revision 0011 and the later ones add taken away again, as in a database an
    earlier hrx made."""
    for table in ("node_bulk_jobs", "fhir_import_positions", "fhir_import_lines"):  # 0013
        conn.execute(sa.text(f"DROP TABLE {table}"))
    conn.execute(sa.text("DROP TABLE fhir_idx_quantity"))
    conn.execute(sa.text("ALTER TABLE fhir_idx_string DROP COLUMN exact"))


def test_upgrade_applies_pending_migrations(node_dir: Path) -> None:
    config = load_config(node_dir, environ={})
    # turn the database back into one an earlier hrx made: only the first migration applied
    database = open_database(config.database_url)
    try:
        with database.write_engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE peer_nonces"))
            for table in (
                "ledger_evidence",
                "ledger_checkpoints",
                "ledger_checkpoint_votes",
                "ledger_subjects",
                "portal_sessions",
                "portal_enrollments",
                "patient_pseudonyms",
                "adapter_quarantine",
                "adapter_messages",
                "adapter_sync_state",
                "node_tokens",
                "signin_throttle",
                "node_users",
                "locator_holdings",
            ):
                conn.execute(sa.text(f"DROP TABLE {table}"))
            undo_revision_0011(conn)
            # the users' table as the first migration made it, with a user locked out then
            conn.execute(
                sa.text(
                    "CREATE TABLE node_users (username VARCHAR(64) PRIMARY KEY, role VARCHAR(16) "
                    "NOT NULL, patient_id VARCHAR(64), password_hash VARCHAR(255), active BOOLEAN "
                    "NOT NULL, created BIGINT NOT NULL, failed_logins INTEGER DEFAULT '0' NOT "
                    "NULL, locked_until BIGINT DEFAULT '0' NOT NULL)"
                )
            )
            conn.execute(
                sa.text(
                    "INSERT INTO node_users VALUES ('wang', 'doctor', NULL, NULL, true, 1, 0, 0), "
                    "('li', 'doctor', NULL, NULL, true, 1, 0, :until)"
                ),
                {"until": int(time.time()) + 600},
            )
            conn.execute(sa.text("UPDATE alembic_version SET version_num = '0001'"))
            # an entry stored before the patient index existed: the upgrade indexes it
            entry = {
                "v": 1,
                "chain": "hosp-a",
                "seq": 0,
                "time": "2026-11-25T00:00:00.000Z",
                "type": "consent.revoked",
                "body": {"consent_id": "c1", "patient": "f" * 64},
            }
            conn.execute(
                entries_table.insert().values(
                    chain="hosp-a", seq=0, data=canonical_bytes(entry), nodes=b""
                )
            )
    finally:
        database.close()
    result = hrx("node", "upgrade", "--dir", str(node_dir))
    assert result.exit_code == 0 and "from revision 0001 to 0014" in result.output, result.output
    database = open_database(config.database_url)
    try:
        assert current_revision(database.engine) == head_revision() == "0014"
        # the users are kept, and the one locked out then is still held from unknown addresses
        wang, li = get_user(database.engine, "wang"), get_user(database.engine, "li")
        assert wang is not None and wang.active and not wang.removed
        assert li is not None and li.token_generation == 0
        held = sign_in(database.write_engine, "li", "any password", "192.0.2.1")
        assert held.user is None and 590 <= held.retry_after <= 600
        assert sa.inspect(database.engine).has_table("peer_nonces")
        assert sa.inspect(database.engine).has_table("ledger_evidence")
        assert sa.inspect(database.engine).has_table("adapter_quarantine")
        with database.engine.connect() as conn:
            assert conn.execute(sa.select(subjects_table)).all() == [
                ("f" * 64, "hosp-a", 0, "consent.revoked")
            ]
    finally:
        database.close()


def test_an_upgrade_across_a_reindexing_revision_indexes_what_was_stored(node_dir: Path) -> None:
    """Resources stored before hrx searched every R4 parameter are found by the new ones once
    ``hrx node upgrade`` has crossed revision 0011 (their index is built again)."""
    from fhir_adapters.store import ResourceStore, tables

    config = load_config(node_dir, environ={})
    database = open_database(config.database_url)
    store = ResourceStore(database.engine, write_engine=database.write_engine)
    try:
        patient = store.create({"resourceType": "Patient", "gender": "female"})
        observation = {
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
            "method": {"coding": [{"system": "http://snomed.info/sct", "code": "702659008"}]},
            "valueQuantity": {"value": 13.5, "system": "http://unitsofmeasure.org", "code": "g/dL"},
            "subject": {"reference": f"Patient/{patient.id}"},
        }
        stored = [store.create(observation) for _ in range(3)]
        tokens = tables.tokens
        with database.write_engine.begin() as conn:  # as an earlier hrx indexed them
            conn.execute(tokens.delete().where(tokens.c.param == "method"))
            undo_revision_0011(conn)
            conn.execute(sa.text("UPDATE alembic_version SET version_num = '0010'"))

        def methods() -> set[str]:
            with database.engine.connect() as conn:
                rows = conn.execute(sa.select(tokens.c.res_pk).where(tokens.c.param == "method"))
                return {str(row[0]) for row in rows}

        assert methods() == set()
    finally:
        database.close()
    result = hrx("node", "upgrade", "--dir", str(node_dir))
    assert result.exit_code == 0, result.output
    assert "search index: 4 of 4 resources indexed again" in result.output
    database = open_database(config.database_url)
    try:
        assert methods() == {str(s.res_pk) for s in stored}
        with database.engine.connect() as conn:  # the new quantity index filled as well
            quantities = conn.execute(sa.select(tables.quantities.c.res_pk)).all()
            composites = conn.execute(  # the composites' rows (revision 0012), but not of
                # a composite over the Observation itself (revision 0014)
                sa.select(tables.quantities.c.param).where(tables.quantities.c.param.contains("$"))
            ).all()
        assert {str(row[0]) for row in quantities} == {str(s.res_pk) for s in stored}
        assert composites == []
        with database.engine.connect() as conn:  # and nothing twice
            count = conn.execute(
                sa.select(sa.func.count()).select_from(tables.compartment)
            ).scalar_one()
        assert count == 4  # the patient and the three observations, in its compartment
    finally:
        database.close()


def test_upgrade_deletes_the_rows_of_parameters_searched_by_others(node_dir: Path) -> None:
    """Revision 0014: the rows an earlier hrx wrote for Observation's union parameters and its
    composites over the Observation itself are deleted; every other row stays, and searches
    find the same Observations after as before."""
    from fhir_adapters.store import ResourceStore, tables
    from fhir_adapters.store.search import EVERYONE, match_query, parse_search
    from fhir_adapters.store.search_params import composite_param

    config = load_config(node_dir, environ={})
    database = open_database(config.database_url)
    store = ResourceStore(database.engine, write_engine=database.write_engine)
    ucum = "http://unitsofmeasure.org"
    try:
        glucose = store.create(
            {
                "resourceType": "Observation",
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
                "valueQuantity": {"value": 8.1, "system": ucum, "code": "mmol/L"},
                "effectiveDateTime": "2026-12-01",
            }
        )
        kept = {table.name: _index_rows(database.engine, table) for table in tables.INDEX_TABLES}
        earlier = [  # as an earlier hrx wrote them beside those
            (
                tables.tokens,
                {"param": "combo-code", "system": "http://loinc.org", "code": "2345-7"},
            ),
            (tables.tokens, {"param": "combo-value-concept:of-type", "system": "", "code": "x"}),
            (
                tables.tokens,
                {"param": composite_param("code-value-concept", "x"), "system": "", "code": "y"},
            ),
            (tables.strings, {"param": "combo-code:text", "value": "glucose", "exact": "Glucose"}),
            (
                tables.dates,
                {"param": composite_param("code-value-date", "2345-7"), "low": 0, "high": 1},
            ),
            *(
                (
                    tables.quantities,
                    {
                        "param": name,
                        "system": ucum,
                        "code": "mmol/L",
                        "value": 8.1,
                        "dimension": "mol/L",
                        "base": 0.0081,
                        "derived": False,
                    },
                )
                for name in (
                    "combo-value-quantity",
                    composite_param("code-value-quantity", "2345-7"),
                )
            ),
        ]
        with database.write_engine.begin() as conn:
            for table, row in earlier:
                conn.execute(
                    table.insert().values(res_pk=glucose.res_pk, type="Observation", **row)
                )
            # a composite over components keeps its rows (its parts are not one element)
            component = composite_param("component-code-value-quantity", "8462-4")
            conn.execute(
                tables.quantities.insert().values(
                    res_pk=glucose.res_pk,
                    type="Observation",
                    param=component,
                    system=ucum,
                    code="mm[Hg]",
                    value=95,
                    dimension="",
                    base=95,
                    derived=False,
                )
            )
            conn.execute(sa.text("UPDATE alembic_version SET version_num = '0013'"))
        kept["fhir_idx_quantity"].add((glucose.res_pk, "Observation", component))
    finally:
        database.close()
    result = hrx("node", "upgrade", "--dir", str(node_dir))
    assert result.exit_code == 0 and "from revision 0013 to 0014" in result.output, result.output
    database = open_database(config.database_url)
    try:
        after = {table.name: _index_rows(database.engine, table) for table in tables.INDEX_TABLES}
        assert after == kept
        for query in (
            ("combo-code", "2345-7"),
            ("combo-value-quantity", f"gt8|{ucum}|mmol/L"),
            ("code-value-quantity", f"http://loinc.org|2345-7$gt8|{ucum}|mmol/L"),
        ):
            with database.engine.connect() as conn:
                found = conn.execute(match_query(parse_search("Observation", [query]), EVERYONE))
                assert [row[0] for row in found] == [glucose.res_pk], query
    finally:
        database.close()


def _index_rows(engine: sa.Engine, table: sa.Table) -> set[tuple[Any, ...]]:
    """Each row of an index table, by resource and parameter (the compartment's and links',
    by resource and target)."""
    if table.name == "fhir_compartment":
        columns = [table.c.res_pk, table.c.patient_id]
    elif "param" not in table.c:
        columns = [table.c.res_pk, table.c.target_id]
    else:
        columns = [table.c.res_pk, table.c.type, table.c.param]
    with engine.connect() as conn:
        return {tuple(row) for row in conn.execute(sa.select(*columns))}


def test_messages_made_from_csv_exports_are_counted_as_csv(tmp_path: Path) -> None:
    """Migration 0009: what CSV imports stored before they were counted apart moves to csv."""
    node_dir = tmp_path / "hosp-a"
    hrx("node", "init", "--dir", str(node_dir), "--id", "hosp-a", "--name", "甲", "--port", "8080")
    database = open_database(load_config(node_dir).database_url)
    try:
        with database.write_engine.begin() as conn:
            for key in ("HRX-CSV|HZZY|R1", "LIS|HZSY|M1"):
                conn.execute(
                    messages_table.insert().values(
                        adapter="hl7",
                        message_key=key,
                        received_at=1,
                        sha256="0" * 64,
                        resources="[]",
                    )
                )
            conn.execute(sa.text("DROP TABLE locator_holdings"))  # made by a later migration
            undo_revision_0011(conn)
            conn.execute(sa.text("UPDATE alembic_version SET version_num = '0008'"))
    finally:
        database.close()
    assert hrx("node", "upgrade", "--dir", str(node_dir)).exit_code == 0
    database = open_database(load_config(node_dir).database_url)
    try:
        with database.engine.connect() as conn:
            rows = conn.execute(
                sa.select(messages_table.c.message_key, messages_table.c.adapter).order_by(
                    messages_table.c.message_key
                )
            ).all()
    finally:
        database.close()
    assert [tuple(r) for r in rows] == [("HRX-CSV|HZZY|R1", "csv"), ("LIS|HZSY|M1", "hl7")]
