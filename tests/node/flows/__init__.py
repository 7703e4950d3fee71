"""Tests of node.flows: access decisions and referrals between members."""
