"""Tests of node.consortium: membership, rosters, replication, key rotation and fork resolution."""
