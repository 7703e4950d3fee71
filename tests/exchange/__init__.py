"""Tests of the exchange package: recognition, savings, questions, decision replay."""
