"""``hrx adapters``: feed a node from the hospital's own systems — the LIS over HL7 v2 (MLLP
or files), the PACS over DICOMweb or DICOM files, and LIS exports as CSV — and look after
what could not be taken in (the quarantine) — and load FHIR NDJSON in bulk."""

from __future__ import annotations

import click

from node.cli.bulk import COMMANDS as BULK_COMMANDS
from node.cli.csv import COMMANDS as CSV_COMMANDS
from node.cli.dicom import COMMANDS as DICOM_COMMANDS
from node.cli.hl7 import COMMANDS as HL7_COMMANDS


@click.group("adapters")
def adapters_group() -> None:
    """Take in results from the hospital's LIS and PACS."""


for command in [*HL7_COMMANDS, *DICOM_COMMANDS, *CSV_COMMANDS, *BULK_COMMANDS]:
    adapters_group.add_command(command)
