"""Tests of the node package, one folder per room of node/."""
