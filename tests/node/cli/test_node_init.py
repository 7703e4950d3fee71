"""``hrx node init``: a node's files are its user's alone, and a failed init leaves nothing
behind, so that it can simply be run again."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from tests.helpers.nodes import free_port, invoke, running_node


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_node_is_private_to_its_user(tmp_path: Path) -> None:
    directory = tmp_path / "hosp-a"
    with running_node(directory) as node:
        assert node.token()  # served: SQLite has made its journal files by now
        assert mode(directory) == 0o700 and mode(directory / "keys") == 0o700
        files = [p for p in directory.rglob("*") if p.is_file()]
        names = {p.name for p in files}
        assert {"hrx.db", "hrx.db-wal", "node.toml", "node.pem", "enrollment.json"} <= names
        for path in files:  # node.toml holds no secret: its group (the hrx admins) may read it
            private = 0o037 if path.name == "node.toml" else 0o077
            assert mode(path) & private == 0, f"{path.relative_to(directory)} is {oct(mode(path))}"


@pytest.mark.postgres
def test_a_failed_init_leaves_nothing_and_can_be_run_again(
    tmp_path: Path, postgres_url: str
) -> None:
    absent = tmp_path / "absent" / "hosp-a"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README").write_text("the operator's own file")
    wrong = postgres_url + "_nonexistent"
    for directory in (absent, empty):
        args = ["node", "init", "--dir", str(directory), "--id", "hosp-a", "--name", "甲医院"]
        args += ["--port", str(free_port())]
        failed = invoke(*args, "--db", wrong)
        assert failed.exit_code == 1, failed.output
        assert "does not exist" in failed.output or "connect" in failed.output, failed.output
        if directory is absent:
            assert not directory.exists()
        else:
            assert [p.name for p in directory.iterdir()] == ["README"]
    again = invoke(*args[:-2], "--port", str(free_port()), "--db", postgres_url)
    assert again.exit_code == 0, again.output  # the same command, the database now right
    assert (empty / "node.toml").is_file() and (empty / "README").is_file()
