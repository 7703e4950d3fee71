"""``python -m node.cli``: the ``hrx`` command."""

from node.cli import main

main()
