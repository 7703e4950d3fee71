"""Tests of node.identity: authentication, tokens, scopes and user accounts."""
