"""The ``hrx`` command: its root group, which finds each command group in its own module.

A group's module is imported only when that group runs (or ``--help`` lists it), so every
``hrx`` process loads only what its command needs: starting ``hrx node serve`` does not import
the demo, the adapters or the BLS library. Every command reports a problem as one line naming
it and what to do next, and exits non-zero.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import click

PRIVATE_UMASK = 0o077  # what hrx writes (databases, keys, logs, exports): its user's alone
GROUPS = {  # command -> "module:attribute", in the order --help lists them
    "node": "node.cli.node:node_group",
    "user": "node.cli.accounts:user_group",
    "token": "node.cli.accounts:token_group",
    "patient": "node.cli.accounts:patient_group",
    "adapters": "node.cli.adapters:adapters_group",
    "consortium": "node.cli.consortium:consortium_group",
    "ledger": "node.cli.ledger:ledger",
    "audit": "node.cli.audit:audit",
    "report": "node.cli.report:report_group",
    "demo": "node.cli.demo:demo",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported when first used (:data:`GROUPS`)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(GROUPS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = GROUPS.get(cmd_name)
        if target is None:
            return None
        module, _, attribute = target.partition(":")
        command: Any = getattr(importlib.import_module(module), attribute)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hrx")
def main() -> None:
    """hrx: a cross-institution health-record exchange with a verifiable ledger."""
    os.umask(PRIVATE_UMASK)


if __name__ == "__main__":  # pragma: no cover
    main()
