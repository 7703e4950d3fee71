"""Tests of node.records: the audit trail and the consent API."""
