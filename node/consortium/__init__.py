"""This node as a member of its consortium: the roster and the shared pseudonym secret
(:mod:`.membership`), requests to other members signed and checked (:mod:`.signing`, RFC 9421),
the client that asks them (:mod:`.peers`), the replication worker (:mod:`.worker`), checkpoint
proposing and voting among witnesses (:mod:`.checkpoints`), and a ledger fetched whole for an
auditor (:mod:`.remote_export`).

May import: the domain packages, ``node.base``, ``node.db``."""
