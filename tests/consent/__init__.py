"""Tests of the consent package: the consent model and the access policy."""
