"""Tests of the fhir_adapters package: code systems, the FHIR repository, the HL7 v2 mapper and
the R4 definitions."""
