"""The ``hrx`` command line: the only room that imports click. One module per command group
(:mod:`node.cli.hrx` is the root group and registers the others); each command parses its
options, calls the rooms below it and prints what they did. It may import every room of
``node`` but ``demo``'s harness (the ``demo`` command is its one way in)."""

from node.cli.hrx import main

__all__ = ["main"]
