"""Tests of node.base: log scrubbing."""
