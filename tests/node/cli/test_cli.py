"""The ``hrx`` command line, as a user runs it."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from ledger import keys, merkle
from ledger.canonical import canonical_bytes
from node.cli import main
from tests.helpers import ROOT


def hrx(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def init(db: str, directory: Path) -> Result:
    return hrx(
        "ledger", "init", "--db", db, "--chain", "hosp-a",
        "--key", str(directory / "hosp-a.pem"), "--authority-key", str(directory / "authority.pem"),
    )  # fmt: skip


@pytest.fixture
def initialised(db_url: str, tmp_path: Path) -> tuple[str, Path]:
    result = init(db_url, tmp_path)
    assert result.exit_code == 0, result.output
    return db_url, tmp_path


def test_init_creates_private_key_files(initialised: tuple[str, Path]) -> None:
    _, tmp_path = initialised
    for name in ("hosp-a.pem", "authority.pem", "hosp-a.bls"):
        mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
        assert mode == 0o600, (name, oct(mode))
    assert (tmp_path / "hosp-a.pem").read_text().startswith("-----BEGIN PRIVATE KEY-----")
    again = init(initialised[0], tmp_path)
    assert again.exit_code == 1 and "already holds a ledger" in again.output


def test_append_export_prove_verify(initialised: tuple[str, Path]) -> None:
    db, tmp_path = initialised
    first = hrx(
        "ledger",
        "append",
        "--db",
        db,
        "--type",
        "consent.granted",
        input='{"a": 1}\n\n{"b": [1, 2]}\n',
    )
    assert first.exit_code == 0, first.output
    assert first.output.split() == ["0", "1"]
    second = hrx(
        "ledger", "append", "--db", db, "--type", "consent.revoked", input='{"c": "撤回"}\n'
    )
    assert second.output.split() == ["2"]

    export = tmp_path / "ledger.jsonl"
    assert hrx("ledger", "export", "--db", db, "--out", str(export)).exit_code == 0
    lines = [json.loads(line) for line in export.read_text().splitlines()]
    assert set(lines[0]) == {"roster", "signature"}
    assert [line["header"]["height"] for line in lines[1:]] == [0, 1]
    assert lines[2]["entries"][0]["body"] == {"c": "撤回"}

    proof = json.loads(hrx("ledger", "proof", "--db", db, "--chain", "hosp-a", "--seq", "1").output)
    assert set(proof) == {"leaf_index", "tree_size", "audit_path"} and proof["tree_size"] == 3
    root = bytes.fromhex(lines[2]["header"]["tree_root"])
    leaf = merkle.leaf_hash(canonical_bytes(lines[1]["entries"][1]))
    merkle.verify_inclusion(leaf, 1, 3, [bytes.fromhex(h) for h in proof["audit_path"]], root)
    consistency = json.loads(
        hrx("ledger", "proof", "--db", db, "--chain", "hosp-a", "--consistency", "2", "3").output
    )
    merkle.verify_consistency(
        2,
        3,
        bytes.fromhex(lines[1]["header"]["tree_root"]),
        root,
        [bytes.fromhex(h) for h in consistency["path"]],
    )
    unsigned = hrx(
        "ledger", "proof", "--db", db, "--chain", "hosp-a", "--seq", "0", "--tree-size", "1"
    )
    assert unsigned.exit_code == 1 and "signs tree size 1" in unsigned.output

    authority = str(tmp_path / "authority.pem")
    for target in (str(export), db):
        verdict = hrx("audit", "verify", target, "--authority", authority)
        assert verdict.exit_code == 0, verdict.output
        assert "VALID: 1 chain(s), 2 block(s), 3 entries" in verdict.output
        assert "warning" not in verdict.output
    public = keys.public_key_text(keys.load_private_key(Path(authority)))
    assert hrx("audit", "verify", str(export), "--authority", public).exit_code == 0
    unanchored = hrx("audit", "verify", str(export))
    assert unanchored.exit_code == 0 and "NOT checked" in unanchored.output


def test_malformed_line_appends_nothing(initialised: tuple[str, Path]) -> None:
    db, _ = initialised
    for bad, problem in [
        ('{"a": 1}\n{"a": 1.5}\n', "stdin line 2: body.a: floating-point"),
        ('{"a": 1}\n{"a": \n', "stdin line 2: not valid JSON"),
        ("[1]\n", "stdin line 1: entry body must be a JSON object"),
        ('{"名": 1}\n', "stdin line 1: body: object key '名' is not ASCII"),
    ]:
        result = hrx("ledger", "append", "--db", db, "--type", "consent.granted", input=bad)
        assert result.exit_code == 1, result.output
        assert problem in result.output and "nothing was appended" in result.output
    bad_type = hrx("ledger", "append", "--db", db, "--type", "Consent", input="{}\n")
    assert bad_type.exit_code == 1 and "dotted lowercase" in bad_type.output
    heads = json.loads(hrx("ledger", "heads", "--db", db).output)
    assert heads == {}


def test_tampered_export_fails_naming_the_place(initialised: tuple[str, Path]) -> None:
    db, tmp_path = initialised
    hrx("ledger", "append", "--db", db, "--type", "consent.granted", input='{"a": 1}\n')
    hrx("ledger", "append", "--db", db, "--type", "consent.granted", input='{"a": 2}\n{"a": 3}\n')
    export = tmp_path / "ledger.jsonl"
    hrx("ledger", "export", "--db", db, "--out", str(export))
    export.write_text(export.read_text().replace('"a":3', '"a":4'))
    result = hrx("audit", "verify", str(export), "--authority", str(tmp_path / "authority.pem"))
    assert result.exit_code == 1
    assert "INVALID: chain hosp-a, block height 1: tree_root" in result.output


def test_audit_verify_says_the_same_on_any_number_of_processes(
    initialised: tuple[str, Path],
) -> None:
    db, tmp_path = initialised
    hrx("ledger", "append", "--db", db, "--type", "consent.granted", input='{"a": 1}\n')
    hrx("ledger", "append", "--db", db, "--type", "consent.granted", input='{"a": 2}\n{"a": 3}\n')
    export = tmp_path / "ledger.jsonl"
    hrx("ledger", "export", "--db", db, "--out", str(export))
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_text(export.read_text().replace('"a":3', '"a":4'))
    authority = str(tmp_path / "authority.pem")
    for target, verdict in ((str(export), "VALID"), (db, "VALID"), (str(tampered), "INVALID")):
        outputs = {hrx("audit", "verify", target, "--authority", authority).output}
        for jobs in ("1", "3"):
            result = hrx("audit", "verify", target, "--authority", authority, "--jobs", jobs)
            assert result.exit_code == (verdict == "INVALID"), result.output
            outputs.add(result.output)
        assert len(outputs) == 1 and outputs.pop().startswith(f"{verdict}: "), target
    refused = hrx("audit", "verify", str(export), "--jobs", "0")
    assert refused.exit_code == 2 and "--jobs" in refused.output


def test_errors_name_the_problem(tmp_path: Path) -> None:
    missing = hrx("ledger", "heads", "--db", str(tmp_path / "none.db"))
    assert missing.exit_code == 1 and "holds no ledger" in missing.output
    assert hrx("audit", "verify", str(tmp_path / "nope.jsonl")).exit_code == 1
    loose = tmp_path / "loose.pem"
    keys.load_or_create_private_key(loose)
    os.chmod(loose, 0o644)
    result = hrx(
        "ledger",
        "init",
        "--db",
        str(tmp_path / "l.db"),
        "--chain",
        "hosp-a",
        "--key",
        str(loose),
        "--authority-key",
        str(tmp_path / "authority.pem"),
    )
    assert result.exit_code == 1 and f"chmod 600 {loose}" in result.output
    both = hrx("ledger", "proof", "--db", str(tmp_path / "l.db"), "--chain", "x")
    assert both.exit_code == 2 and "either --seq" in both.output
    mixed = hrx(
        "ledger",
        "proof",
        "--db",
        "x.db",
        "--chain",
        "x",
        "--consistency",
        "1",
        "2",
        "--tree-size",
        "2",
    )
    assert mixed.exit_code == 2 and "--tree-size goes with --seq" in mixed.output
    unreachable = hrx("audit", "verify", "postgresql://nobody@127.0.0.1:1/none")
    assert unreachable.exit_code == 1 and "error: database: OperationalError" in unreachable.output


def test_installed_command_and_demo_run(tmp_path: Path) -> None:
    """``hrx demo --keep``: the whole story on real member processes, then the nodes keep
    running and say where to sign in until Ctrl-C; afterwards the auditor verifies a member's
    database offline."""
    import re
    import signal

    import requests

    workdir = tmp_path / "demo"
    process = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "demo", "--keep", "--dir", str(workdir)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "60"},  # narrow: the sign-in URLs must stay whole
        start_new_session=True,  # its nodes with it: on a failure the group is killed
    )
    assert process.stdout is not None
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if "node directories:" in line:
                break
        story = "".join(lines)
        assert "HL7 v2 ORU^R01 over MLLP" in story and "ACK AA" in story, story
        assert "1 studies: 1 created" in story and "1 stored" in story, story
        assert "A denied" in story and "co-signed by 3 members" in story, story
        assert "VALID: 3 chain(s)" in story and "2 exam(s) avoided, ¥320.00 saved" in story
        # remote reading: hosp-c's CT read by hosp-a, the signed report back, the turnaround
        assert "views the study through DICOMweb: 3 frame(s)" in story, story
        assert "the signed report is back at hosp-c: 签名有效：由示范区人民医院签发" in story
        assert "示范区人民医院 (hosp-a) urgent" in story and "1/1 within deadline" in story
        assert "1 read(s) of images checked against their grants" in story, story
        portal = re.search(r"http://127\.0\.0\.1:\d+/portal", story)
        clinic = re.search(r"http://127\.0\.0\.1:\d+/clinic", story)
        assert portal and clinic, story
        assert requests.get(portal.group(0) + "/signin", timeout=10).status_code == 200
        assert requests.get(clinic.group(0) + "/signin", timeout=10).status_code == 200
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the demo and the nodes it started
            process.wait()
    assert process.returncode == 0, rest
    assert "verdict: the ledger is valid" in rest
    with pytest.raises(requests.ConnectionError):  # the nodes stopped with the demo
        requests.get(portal.group(0), timeout=5)
    verdict = subprocess.run(
        [
            sys.executable,
            "-m",
            "node.cli",
            "audit",
            "verify",
            str(workdir / "hosp-b" / "hrx.db"),
            "--authority",
            str(workdir / "authority.pem"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr
    assert "VALID: 3 chain(s)" in verdict.stdout
