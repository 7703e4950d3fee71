"""Compose files as docker-compose resolves them: the tool itself, the ``hrx`` command a
service runs (parsed as the CLI would, not run), and a service's mounts and published ports."""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from typing import Any

import click
import pytest

from node.cli import main as hrx_main


def docker_compose() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        pytest.fail("docker-compose is missing: run scripts/test-deps.sh (Debian docker-compose)")
    return found


def hrx_command(args: list[str]) -> click.Command:
    """Resolve and parse ``hrx ARGS`` as the CLI would, without running it; the command."""
    context = hrx_main.make_context("hrx", list(args))
    command: click.Command = hrx_main
    while isinstance(command, click.Group):
        with warnings.catch_warnings():  # Click 8.2 deprecates protected_args; 9 folds it in args
            warnings.simplefilter("ignore", DeprecationWarning)
            words = [*context.protected_args, *context.args]
        name, sub, rest = command.resolve_command(context, words)
        assert sub is not None, f"hrx has no command {name!r}"
        context = sub.make_context(name or "", rest, parent=context)
        command = sub
    return command


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Mount point -> volume or host path, from short ("src:dst[:mode]") or long syntax."""
    found = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
            found[target] = source
        else:
            found[volume["target"]] = volume["source"]
    return found


@dataclass(frozen=True)
class Published:
    host_ip: str  # "" when the port is published on every interface
    port: int  # on the host
    target: int  # in the container


def published_ports(service: dict[str, Any]) -> list[Published]:
    """A service's ``ports``, short ("[IP:]PUBLISHED:TARGET") or long syntax, as compose
    resolved them."""
    found = []
    for mapping in service.get("ports", []):
        if isinstance(mapping, dict):
            found.append(
                Published(
                    str(mapping.get("host_ip", "")),
                    int(mapping["published"]),
                    int(mapping["target"]),
                )
            )
            continue
        text, _, _protocol = str(mapping).partition("/")
        *address, port, target = ["", "0", *text.split(":")][-3:]
        found.append(Published(":".join(address), int(port or 0), int(target)))
    return found
