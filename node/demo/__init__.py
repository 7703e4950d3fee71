"""Real nodes on this machine for the demo, the tests and the benchmarks: one node made with the
same setup code as ``hrx node init`` (:mod:`.nodes`), a consortium of node processes
(:mod:`.harness`), a real PACS (:mod:`.orthanc`) and the story ``hrx demo`` plays
(:mod:`.story`). Nodes run as processes of their own (``python -m node.cli``), never through
the CLI in this process.

May import: every room but ``cli``."""
