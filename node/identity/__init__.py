"""Who may use the node: people and systems with their roles and password hashes
(:mod:`.users`), bearer tokens with SMART scopes (:mod:`.tokens`), patients' enrollment codes
and browser sessions (:mod:`.sessions`).

May import: the domain packages, ``node.base``, ``node.db``."""
