"""The shell examples of README.md and docs/operations.md cannot drift from the program.

Every fenced ``sh`` block is classified below, keyed by its first command line: **run** here
for real, with bash in a sandbox, on SQLite and on PostgreSQL — in the order the documents
give them, as an operator reading them would type them, with the documented paths, ports,
keys and tokens replaced by the sandbox's (each block's substitutions are listed, and each
must still match the block); **covered** by the named tests; or **not runnable here**, with
the reason. A block nobody classified, or a classification whose block is gone, fails. Every
``hrx`` command of every block — run or not, ``docker compose run --rm hrx ARGS`` and what
``docker compose run --rm init ARGS`` gives ``hrx node init`` included — is parsed by the CLI
itself, so a renamed command or option fails here too, and gunicorn's config and application
must import.

Where the README serves the node with the development server, the node is served under
gunicorn too, as its gunicorn block says, and the README's ``curl`` line asks that server.
The consortium block runs with two members, both served, then one replication round
(``hrx node replicate --once``) and ``hrx audit verify`` of a served member's ledger.
"""

from __future__ import annotations

import ast
import base64
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import tomllib
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import click
import pytest

from ledger import keys
from tests.helpers import ROOT
from tests.helpers.compose import hrx_command
from tests.helpers.databases import postgres_database
from tests.helpers.docs import (
    Block,
    commands,
    gunicorn_targets,
    hrx_arguments,
    logical_lines,
    sh_blocks,
    substitute,
)
from tests.helpers.nodes import Node, free_port, init_node, serving, wait_healthy

DOCUMENTS = ("README.md", "docs/operations.md")
PASSWORD = "wang-s3cret-pass"  # what the operator types for --password-stdin
NEW_PASSWORD = "wang-new-s3cret"


# -- what each block is -------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """Run for real in the sandbox: the block's text with ``substitutions`` made in order
    (replacements name the sandbox's values as ``{name}``: :meth:`Sandbox.value`)."""

    substitutions: Mapping[str, str]
    stdin: str = ""
    background: bool = False  # a server: started, waited for (healthz) and left running
    prepare: Callable[[Sandbox], None] | None = None
    check: Callable[[Sandbox, str], None] | None = None


@dataclass(frozen=True)
class Covered:
    """Exercised by these tests (``path::function``)."""

    tests: tuple[str, ...]


@dataclass(frozen=True)
class NotRunnable:
    reason: str


# -- the sandbox ----------------------------------------------------------------------------


@dataclass
class Sandbox:
    """Where the blocks run, one after another, for one database engine: the root stands for
    /srv/hrx and is every block's working directory; ``bin`` holds the ``hrx`` and ``gunicorn``
    of this checkout, first on PATH."""

    engine: str
    root: Path
    databases: dict[str, str]  # "ledger", "hosp-a", "hosp-b" -> URL (PostgreSQL only)
    stack: ExitStack
    port_a: int = field(default_factory=free_port)
    port_b: int = field(default_factory=free_port)
    runs: int = 0

    @property
    def env(self) -> dict[str, str]:
        environment = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("HRX_", "PROMETHEUS_")) and k != "TOKEN"
        }
        return {
            **environment,
            "PATH": f"{self.root / 'bin'}{os.pathsep}{environment['PATH']}",
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
            "NEW_PASSWORD": NEW_PASSWORD,
        }

    def value(self, name: str) -> str:
        """A sandbox value a substitution names, worked out when the block runs."""
        match name:
            case "root":
                return str(self.root)
            case "port_a":
                return str(self.port_a)
            case "url_a":
                return f"http://127.0.0.1:{self.port_a}"
            case "ledger_db":
                return self.databases.get("ledger", "hosp-a.db")
            case "db_option_a":
                return f"--db {self.databases['hosp-a']}" if self.databases else ""
            case "key":  # the authority's public key, as hrx consortium roster prints it
                authority = keys.load_private_key(self.root / "authority.pem")
                return keys.public_key_text(authority)
            case "auditor_token":
                node = Node(self.root / "hosp-a", self.port_a)
                try:
                    return node.token("li", "auditor")
                finally:
                    node.close()
            case "jti":  # the id of the token the README's block issued
                payload = (self.root / "token.txt").read_text().split(".")[1]
                claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
                return str(claims["jti"])
            case "wait_a":
                return (
                    "for i in $(seq 400); do curl -sf -o /dev/null "
                    f"http://127.0.0.1:{self.port_a}/healthz && break; sleep 0.05; done"
                )
        raise KeyError(name)

    def script(self, block: Block, run: Run) -> str:
        lazy = _Lazy(self)
        filled = {p: r.format_map(lazy) for p, r in run.substitutions.items()}
        return "set -euo pipefail\n" + substitute(block.text, filled)

    def bash(self, script: str, log_name: str, stdin: str = "", timeout: float = 120) -> str:
        """Run the script with bash in its own process group; its output. The group is
        killed afterwards, so that nothing the script left in the background outlives it."""
        self.runs += 1
        log = self.root / f"block-{self.runs}-{log_name}.log"
        with log.open("wb") as output:  # a file, not a pipe: a server left running holds it
            process = self._start(script, output, subprocess.PIPE)
            try:
                assert process.stdin is not None
                process.stdin.write(stdin.encode())
                process.stdin.close()
                process.wait(timeout=timeout)
            finally:
                stop_group(process)
        text = log.read_text(errors="replace")
        assert process.returncode == 0, f"{log_name} failed ({process.returncode}):\n{text}"
        return text

    def background(self, script: str, log_name: str, base: str) -> None:
        """Start the script (a server) in its own process group, wait until ``base`` is
        healthy, and stop the group when the sandbox closes."""
        self.runs += 1
        log = (self.root / f"block-{self.runs}-{log_name}.log").open("wb")
        process = self._start(script, log, subprocess.DEVNULL)
        self.stack.callback(log.close)
        self.stack.callback(stop_group, process)
        wait_healthy(base, process, seconds=60)  # type: ignore[arg-type]

    def _start(self, script: str, output: IO[bytes], stdin: int) -> subprocess.Popen[bytes]:
        """bash running ``script`` in the sandbox, in a process group of its own."""
        return subprocess.Popen(
            ["bash", "-c", script],
            cwd=self.root,
            env=self.env,
            stdin=stdin,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


class _Lazy(dict[str, str]):
    def __init__(self, sandbox: Sandbox) -> None:
        super().__init__()
        self.sandbox = sandbox

    def __missing__(self, key: str) -> str:
        self[key] = self.sandbox.value(key)
        return self[key]


def stop_group(process: subprocess.Popen[str] | subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process's group, SIGKILL when it does not end within 15 s."""
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    with suppress(ProcessLookupError):  # what the group left behind (a server started with &)
        os.killpg(process.pid, signal.SIGKILL)


# -- what the runnable blocks need beyond their text, and what they must show ----------------


def ledger_valid(sandbox: Sandbox, output: str) -> None:
    assert '"tree_size":2' in output and '{"path":[' in output, output
    assert "VALID: 1 chain(s), 2 block(s), 2 entries" in output, output


def patients_listed(sandbox: Sandbox, output: str) -> None:
    assert '"resourceType":"Bundle"' in output.replace(" ", ""), output
    assert (sandbox.root / "hosp-a" / "node.toml").exists()


def the_curl_line_asks_gunicorn(sandbox: Sandbox, output: str) -> None:
    """The README's curl line, as the node block runs it, against gunicorn."""
    node_block = block_named("README.md", "hrx node init --dir /srv/hrx/hosp-a")
    script = sandbox.script(node_block, classification(node_block))  # type: ignore[arg-type]
    curl = [line for line in logical_lines(script) if line.startswith("curl ")]
    assert len(curl) == 1, script
    answer = sandbox.bash("set -euo pipefail\n" + curl[0], "curl-gunicorn")
    assert '"resourceType":"Bundle"' in answer.replace(" ", ""), answer


def a_second_member_served(sandbox: Sandbox) -> None:
    """hosp-b, made as the README's node block made hosp-a, and served; hosp-a is still
    served by gunicorn."""
    directory = sandbox.root / "hosp-b"
    init_node(directory, "hosp-b", sandbox.databases.get("hosp-b"), sandbox.port_b)
    sandbox.stack.enter_context(serving(directory, sandbox.port_b))


def consortium_formed(sandbox: Sandbox, output: str) -> None:
    assert output.count("is a member of 杭州市医联体 (roster version 1, 2 members, quorum 2)") == 2
    assert "up to date" in output, output  # the replication round found every chain current
    assert "VALID: " in output and "roster version(s) 1" in output, output


def savings_and_decisions(sandbox: Sandbox, output: str) -> None:
    assert "VALID: 1 chain(s)" in output and "access decision(s) replayed" in output, output


def token_revoked(sandbox: Sandbox, output: str) -> None:
    assert "wang" in output and sandbox.value("jti") in output, output


# -- the classification of every block -------------------------------------------------------

README_NODE = (
    "hrx node init --dir /srv/hrx/hosp-a --id hosp-a --name 杭州市第一人民医院 --port 8080"
)

CLASSIFICATION: dict[tuple[str, str], Run | Covered | NotRunnable] = {
    ("README.md", "python3 -m pip install -e '.[fast-bls]' && hrx demo"): Covered(
        ("tests/node/cli/test_cli.py::test_installed_command_and_demo_run",)
    ),
    (
        "README.md",
        "scripts/test-deps.sh && python3 -m pip install -e '.[test,fast-bls]' && python3 -m pytest",
    ): NotRunnable("apt-get install (root, the network) and the whole test suite itself"),
    (
        "README.md",
        "hrx ledger init --db hosp-a.db --chain hosp-a --key hosp-a.pem "
        "--authority-key authority.pem",
    ): Run({"--db hosp-a.db": "--db {ledger_db}"}, check=ledger_valid),
    ("README.md", README_NODE): Run(
        {
            "[--db postgresql://hrx@db.internal/hosp_a]": "{db_option_a}",
            "--port 8080": "--port {port_a}",
            # the token it prints, kept for the curl line's $TOKEN
            "--scope 'user/*.cruds'": "--scope 'user/*.cruds' > token.txt",
            "$TOKEN": "$(cat token.txt)",
            # the development server in the background, and the curl line once it answers
            "hrx node serve --dir /srv/hrx/hosp-a": (
                "hrx node serve --dir /srv/hrx/hosp-a & {wait_a}"
            ),
            "curl -G": "curl -fsS -G",  # a status >= 400 fails the block
            "http://127.0.0.1:8080": "{url_a}",
            "/srv/hrx": "{root}",
        },
        stdin=PASSWORD + "\n",
        check=patients_listed,
    ),
    (
        "README.md",
        "HRX_NODE_DIR=/srv/hrx/hosp-a gunicorn -c python:node.ops.gunicorn_conf -w 4 -k gthread "
        "--threads 8",
    ): Run(
        {"-w 4": "-w 2", "127.0.0.1:8080": "127.0.0.1:{port_a}", "/srv/hrx": "{root}"},
        background=True,
        check=the_curl_line_asks_gunicorn,
    ),
    ("README.md", "hrx consortium secret --out consortium.key"): Run(
        {
            "--quorum 3": "--quorum 2",  # two members
            " hosp-c/enrollment.json hosp-d/enrollment.json": "",
            # each member joins: hosp-b as hosp-a
            "hrx node join --dir /srv/hrx/hosp-a --roster roster.json --secret consortium.key "
            "--authority <KEY>": "hrx node join --dir /srv/hrx/hosp-a --roster roster.json "
            "--secret consortium.key --authority <KEY>\nhrx node join --dir /srv/hrx/hosp-b "
            "--roster roster.json --secret consortium.key --authority <KEY>",
            "hrx node replicate --dir": "hrx node replicate --once --dir",  # one round
            "https://hosp-a.example": "{url_a}",
            "<KEY>": "{key}",
            "<TOKEN>": "{auditor_token}",
            "/srv/hrx": "{root}",
        },
        prepare=a_second_member_served,
        check=consortium_formed,
    ),
    ("README.md", "hrx patient enroll --dir /srv/hrx/hosp-a --patient 7d3c…"): Covered(
        (
            "tests/node/web/test_portal.py::test_enroll_sign_in_grant_narrow_and_revoke",
            "tests/node/web/test_portal.py::test_a_receipt_downloads_and_verifies",
        )
    ),
    (
        "README.md",
        "hrx report savings --dir /srv/hrx/hosp-b --from 2026-01-01",
    ): Run({"<KEY>": "{key}", "/srv/hrx": "{root}"}, check=savings_and_decisions),
    (
        "README.md",
        "hrx adapters hl7-listen --dir /srv/hrx/hosp-a --port 2575",
    ): Covered(
        (
            "tests/node/intake/test_mllp.py::"
            "test_the_samples_sent_over_mllp_are_stored_before_they_are_acknowledged",
            "tests/node/intake/test_mllp.py::"
            "test_import_reports_each_message_and_fails_when_any_is_quarantined",
            "tests/node/intake/test_csv_import.py::test_the_sample_export_is_stored_once",
            "tests/node/intake/test_dicomweb.py::test_since_filters_and_pages",
            "tests/node/intake/test_dicomweb.py::test_watch_runs_rounds_until_sigterm",
            "tests/node/intake/test_dicomweb.py::test_dicom_import_gives_the_same_resources",
            "tests/node/intake/test_csv_import.py::"
            "test_rows_that_make_no_message_are_quarantined_and_the_rest_stored",
            "tests/node/flows/test_bulk_import.py::"
            "test_a_cohort_is_stored_whole_with_its_text_and_decimals",
        )
    ),
    (
        "docs/operations.md",
        "apt-get install python3 python3-venv python3-dev gcc libssl-dev postgresql nginx",
    ): Covered(
        # apt-get and createuser are not run; install-node.sh is, as root in a namespace
        ("tests/e2e/test_deploy.py::test_install_node_sets_up_a_node_its_user_runs",)
    ),
    ("docs/operations.md", "systemctl enable --now hrx-web@hosp-a hrx-replicate@hosp-a"): (
        NotRunnable("systemctl needs a running systemd (PID 1); the units are checked by reading")
    ),
    ("docs/operations.md", "cd /opt/src/hrx/deploy/hospital"): NotRunnable(
        "docker compose build needs a Docker engine, the network and base images "
        "(tests/e2e/test_deploy.py runs the compose file's init script and web command)"
    ),
    (
        "docs/operations.md",
        "install -o 10001 -g 10001 -m 600 consortium.key /srv/hrx/hosp-a/keys/consortium.key",
    ): NotRunnable("chown to the image's user needs root, docker compose run a Docker engine"),
    ("docs/operations.md", "docker compose -f deploy/trial/docker-compose.yml up -d"): NotRunnable(
        "needs a Docker engine (tests/e2e/test_compose.py checks the file and runs its bootstrap)"
    ),
    ("docs/operations.md", "cd /srv/hrx/hosp-a/keys"): NotRunnable(
        "runuser -u hrx needs root and the user hrx; systemctl reload a running systemd"
    ),
    (
        "docs/operations.md",
        "deploy/authority/authority.sh /media/authority/consortium secret",
    ): Covered(
        ("tests/e2e/test_deploy.py::test_the_authority_tooling_makes_what_a_hospital_joins_with",)
    ),
    (
        "docs/operations.md",
        "printf '%s\\n' \"$NEW_PASSWORD\" | hrx user reset-password --dir /srv/hrx/hosp-a "
        "--username wang",
    ): Run({"3GZkV8m2qPq1x5Yb0wQmTg": "{jti}", "/srv/hrx": "{root}"}, check=token_revoked),
}


def all_blocks() -> list[Block]:
    return [block for document in DOCUMENTS for block in sh_blocks(ROOT, document)]


def classification(block: Block) -> Run | Covered | NotRunnable:
    return CLASSIFICATION[(block.path, block.key)]


def block_named(path: str, start: str) -> Block:
    found = [b for b in all_blocks() if b.path == path and b.key.startswith(start)]
    assert len(found) == 1, (path, start, found)
    return found[0]


# -- every block accounted for ----------------------------------------------------------------


def test_every_block_is_classified_and_every_classification_names_a_block() -> None:
    blocks = all_blocks()
    keys_found = [(b.path, b.key) for b in blocks]
    assert len(set(keys_found)) == len(keys_found), "two blocks start with the same line"
    unclassified = [
        f"{b.where}: {b.key!r}" for b in blocks if (b.path, b.key) not in CLASSIFICATION
    ]
    assert not unclassified, (
        "classify these blocks in CLASSIFICATION of tests/e2e/test_docs_commands.py (Run, "
        "Covered or NotRunnable), keyed by their first command line:\n" + "\n".join(unclassified)
    )
    stale = [key for key in CLASSIFICATION if key not in keys_found]
    assert not stale, f"classified, but no such block any more: {stale}"
    assert len(blocks) >= 15  # the extraction finds the blocks


def test_covered_blocks_name_tests_that_exist() -> None:
    for key, kind in CLASSIFICATION.items():
        if not isinstance(kind, Covered):
            continue
        assert kind.tests, key
        for node_id in kind.tests:
            path, _, name = node_id.partition("::")
            module = ROOT / path
            assert module.is_file(), f"{key}: no test file {path}"
            tree = ast.parse(module.read_text(encoding="utf-8"))
            functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
            assert name in functions, f"{key}: {path} has no test function {name}"


def test_not_runnable_blocks_say_why() -> None:
    for key, kind in CLASSIFICATION.items():
        if isinstance(kind, NotRunnable):
            assert len(kind.reason) > 20, key


def test_every_substitution_still_matches_its_block() -> None:
    dummy = _Dummy()
    for block in all_blocks():
        kind = classification(block)
        if isinstance(kind, Run):
            substitute(block.text, {p: r.format_map(dummy) for p, r in kind.substitutions.items()})
    with pytest.raises(AssertionError, match="matches nothing"):
        substitute("hrx node serve\n", {"hrx node serves": ""})  # the check can fail


class _Dummy(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return f"<{key}>"


# -- every hrx and gunicorn command names what exists ------------------------------------------


def test_every_hrx_command_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each hrx command, resolved and parsed by the CLI (not run). The files it names need
    not exist here (click.Path(exists=True) is not checked); all else is."""
    convert = click.Path.convert

    def without_existence(self: click.Path, value: Any, param: Any, ctx: Any) -> Any:
        exists, self.exists = self.exists, False
        try:
            return convert(self, value, param, ctx)
        finally:
            self.exists = exists

    monkeypatch.setattr(click.Path, "convert", without_existence)
    parsed, problems = 0, []
    for block in all_blocks():
        for line, words in commands(block):
            arguments = hrx_arguments(words)
            if arguments is None:
                arguments = init_service_arguments(words)
            if arguments is None:
                continue
            try:
                hrx_command(arguments)
                parsed += 1
            except (click.ClickException, AssertionError) as exc:
                problems.append(f"{block.where}: {line}\n    {exc}")
    assert not problems, "\n".join(problems)
    assert parsed >= 32
    with pytest.raises(click.UsageError):  # the check can fail
        hrx_command(["node", "join", "--dir", "x", "--rooster", "roster.json"])


def init_service_arguments(words: list[str]) -> list[str] | None:
    """``docker compose run --rm init ARGS`` of the hospital's compose file: init-node.sh
    runs ``hrx node init --dir "$DIR" --db "$INIT_DATABASE_URL" "$@"`` with ARGS as ``$@``."""
    if words[:5] != ["docker", "compose", "run", "--rm", "init"]:
        return None
    script = (ROOT / "deploy" / "hospital" / "init-node.sh").read_text()
    found = re.search(r"^\s+hrx (node init .*)$", script, re.M)
    assert found is not None, "init-node.sh runs hrx node init no more"
    line = found.group(1).replace('"$DIR"', "/srv/hrx/node")
    line = line.replace('"$INIT_DATABASE_URL"', "postgresql://hrx@db/hrx")
    assert line.endswith(' "$@"'), line
    return [*shlex.split(line.removesuffix(' "$@"')), *words[5:]]


def test_the_hrx_of_the_sandbox_is_the_console_script() -> None:
    """The sandbox's ``hrx`` runs ``python3 -m node.cli``: what pyproject installs as hrx."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["hrx"] == "node.cli:main"
    assert "main()" in (ROOT / "node" / "cli" / "__main__.py").read_text()


def test_gunicorn_commands_name_a_config_and_an_app_that_import(tmp_path: Path) -> None:
    targets = {
        gunicorn_targets(words)
        for block in all_blocks()
        for _, words in commands(block)
        if gunicorn_targets(words) is not None
    }
    assert targets == {("python:node.ops.gunicorn_conf", "node.web.wsgi:app")}, targets
    node = tmp_path / "hosp-a"
    init_node(node, "hosp-a", None, free_port())
    checks = []
    for config, application in sorted(t for t in targets if t is not None):
        assert config.startswith("python:"), config
        module, _, attribute = application.partition(":")
        checks.append(
            f"import importlib; importlib.import_module({config.removeprefix('python:')!r}); "
            f"getattr(importlib.import_module({module!r}), {attribute!r})"
        )
    answer = subprocess.run(
        [sys.executable, "-c", "\n".join(checks)],
        cwd=ROOT,
        env={**os.environ, "HRX_NODE_DIR": str(node), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert answer.returncode == 0, answer.stderr


# -- the runnable blocks, run --------------------------------------------------------------
#
# Each engine's sandbox runs the blocks in a thread of its own, both engines at once (the
# blocks are one process after another, so each keeps one core busy): the test of an engine
# waits for its run and reports what it found.

ENGINES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
IN_PROCESS = threading.Lock()  # what a run does in this process (init_node, a token), one at a time


class EngineRun(threading.Thread):
    """The runnable blocks, in the documents' order, in one engine's sandbox; every process
    it started is stopped when it ends, whatever happened."""

    def __init__(self, sandbox: Sandbox) -> None:
        super().__init__(name=f"docs-{sandbox.engine}", daemon=True)
        self.sandbox = sandbox
        self.ran: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.sandbox.stack:
                for block in all_blocks():
                    kind = classification(block)
                    if isinstance(kind, Run):
                        self.run_block(block, kind)
                        self.ran.append(block.where)
        except BaseException as exc:  # reported by the engine's test
            self.error = exc

    def run_block(self, block: Block, kind: Run) -> None:
        sandbox = self.sandbox
        if kind.prepare is not None:
            with IN_PROCESS:
                kind.prepare(sandbox)
        with IN_PROCESS:
            script = sandbox.script(block, kind)
        name = block.where.replace("/", "-").replace(":", "-")
        try:
            if kind.background:
                sandbox.background(script, name, sandbox.value("url_a"))
                output = ""
            else:
                output = sandbox.bash(script, name, kind.stdin)
            if kind.check is not None:
                kind.check(sandbox, output)
        except BaseException as exc:
            raise AssertionError(f"{block.where}: {exc}") from exc


@pytest.fixture(scope="module")
def engine_runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, EngineRun | BaseException]]:
    """The run of every engine whose test was selected, started at once."""
    selected = {
        item.callspec.id  # type: ignore[attr-defined]
        for item in request.session.items
        if getattr(item, "originalname", "") == "test_the_runnable_blocks_run_in_order"
    }
    runs: dict[str, EngineRun | BaseException] = {}
    with ExitStack() as stack:
        for engine in sorted(selected):
            databases = {}
            if engine == "postgres":
                try:
                    for name in ("ledger", "hosp-a", "hosp-b"):
                        databases[name] = stack.enter_context(postgres_database())
                except (pytest.skip.Exception, pytest.fail.Exception) as exc:
                    runs[engine] = exc  # the engine's test skips or fails with it
                    continue
            root = tmp_path_factory.mktemp(f"docs-{engine}")
            tools = root / "bin"
            tools.mkdir()
            for name, module in (("hrx", "node.cli"), ("gunicorn", "gunicorn")):
                (tools / name).write_text(f'#!/bin/sh\nexec {sys.executable} -m {module} "$@"\n')
                (tools / name).chmod(0o755)
            run = EngineRun(Sandbox(engine, root, databases, ExitStack()))
            runs[engine] = run
            run.start()
        try:
            yield runs
        finally:  # before the databases are dropped
            for run in runs.values():
                if isinstance(run, EngineRun):
                    run.join(timeout=600)


@pytest.mark.parametrize("engine", ENGINES)
def test_the_runnable_blocks_run_in_order(
    engine: str, engine_runs: dict[str, EngineRun | BaseException]
) -> None:
    run = engine_runs[engine]
    if isinstance(run, BaseException):
        raise run
    run.join(timeout=400)
    assert not run.is_alive(), f"the blocks did not finish in 400 s (done: {run.ran})"
    if run.error is not None:
        raise run.error
    runnable = [b.where for b in all_blocks() if isinstance(classification(b), Run)]
    assert run.ran == runnable and len(runnable) == 6, run.ran
