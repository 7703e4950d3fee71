"""Tests of node.demo: the harness's relay."""
