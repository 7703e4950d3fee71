"""Run a consortium of N member nodes on this machine until Ctrl-C.

Each member is created in DIR (``hrx node init``, one roster signed by a local authority,
``hrx node join``) and runs as two processes: its web server and its replication worker.
Prints each member's URL and an auditor token, then the heads every few seconds.

    python3 scripts/consortium.py --members 3 --dir /tmp/hrx-consortium [--epoch-seconds 10]
"""

from __future__ import annotations

import argparse
import signal
import tempfile
import time
from pathlib import Path

from rich.console import Console

from node.demo.harness import Consortium

ROOT = Path(__file__).resolve().parent.parent

console = Console()


def auditor_token(directory: Path) -> str:
    from click.testing import CliRunner

    from node.cli import main

    runner = CliRunner()
    runner.invoke(
        main, ["user", "add", "--dir", str(directory), "--username", "auditor", "--role", "auditor"]
    )
    result = runner.invoke(
        main, ["token", "issue", "--dir", str(directory), "--username", "auditor"]
    )
    return result.output.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="default: a new temporary one")
    parser.add_argument("--epoch-seconds", type=int, default=10)
    args = parser.parse_args()
    if not 1 <= args.members <= 26:
        raise SystemExit("--members must be 1 to 26")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop cleanly on TERM too
    root = args.dir or Path(tempfile.mkdtemp(prefix="hrx-consortium-"))
    root.mkdir(parents=True, exist_ok=True)
    with console.status(f"creating {args.members} members in {root}"):
        group = Consortium(root, args.members, epoch_seconds=args.epoch_seconds)
    try:
        with console.status("starting web servers and replication workers"):
            group.start_all()
        for name, member in group.members.items():
            console.print(f"[bold]{name}[/] {member.url}  ({member.directory})")
            console.print(f"  auditor token: {auditor_token(member.directory)}")
        console.print(f"authority key: {group.authority_key}; Ctrl-C stops everything")
        while True:
            time.sleep(5)
            console.print(group.describe())
    except KeyboardInterrupt:
        console.print("stopping")
    finally:
        group.close()


if __name__ == "__main__":
    main()
