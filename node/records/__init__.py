"""The node's own records about patient data: the AuditEvent trail of every interaction
(:mod:`.audit_trail`), consent changes recorded onto the ledger with the actor passed in
(:mod:`.consents`), and which local patients a pseudonym stands for (:mod:`.pseudonym_index`).

May import: the domain packages, ``node.base``, ``node.db``, ``node.identity``,
``node.consortium``."""
