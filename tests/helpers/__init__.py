"""What the tests share, imported from here and never from another test module:

- :data:`ROOT`, the repository's root;
- :mod:`~tests.helpers.databases`: the PostgreSQL server of the tests, a fresh database on it;
- :mod:`~tests.helpers.ledgers`: a small ledger database with its keys;
- :mod:`~tests.helpers.nodes`: real nodes, ``hrx`` run in this process, access requests;
- :mod:`~tests.helpers.fhir`: FHIR resources and answers as the API tests write and read them;
- :mod:`~tests.helpers.cohort`: a synthetic US Core-shaped cohort as transaction Bundles;
- :mod:`~tests.helpers.portal`: a patient enrolled and signed in to the portal;
- :mod:`~tests.helpers.hl7_messages`: HL7 v2 messages for the LIS adapter's tests;
- :mod:`~tests.helpers.dicom`: DICOM files and a node's imaging studies for the PACS tests;
- :mod:`~tests.helpers.compose`: compose files as docker-compose resolves them;
- :mod:`~tests.helpers.logs`: where the run's logs are, and the log privacy check.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
