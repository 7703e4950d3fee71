"""What every room of the node stands on: its configuration (:mod:`.config`, ``node.toml`` with
environment overrides), its one error hierarchy (:mod:`.errors`, :class:`~.errors.NodeError`)
and its logs (:mod:`.logs`: JSON lines, request IDs, nothing private in them).

May import: the domain packages only; no other room of ``node``."""
