"""``hrx adapters hl7-listen``, ``hl7-import`` and ``quarantine``: the LIS over HL7 v2."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
