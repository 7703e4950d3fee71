"""Tests of node.web: the FHIR API (with real clients, fuzzing) and the patient portal."""
