"""Tests of the fhir_adapters package: code systems, the FHIR repository and the HL7 v2 mapper."""
