"""Tests of node.cli: the hrx command, its node commands and hrx node init."""
