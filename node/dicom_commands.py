"""``hrx adapters dicomweb-sync`` and ``dicom-import``: the PACS over DICOMweb and files."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
