"""Tests of node.ops: status, metrics, gunicorn, backup and restore, and the node's processes."""
