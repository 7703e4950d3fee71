"""The node's use cases, free of Flask and of HTTP: each takes its inputs explicitly — the
services, the caller (:class:`node.records.audit_trail.Caller`), what was asked — and returns
what the web room then answers. The requester's prior results (:mod:`.prior_results`), orders
and mutual recognition (:mod:`.orders`), the source's access decision
(:mod:`.access_decision`), who may do what (:mod:`.permissions`), and bulk data: ``$export``
(:mod:`.bulk_export`), bulk import and ``$import`` (:mod:`.bulk_import`) and the jobs that
run them (:mod:`.bulk_jobs`).

May import: the domain packages, ``node.base``, ``node.identity``, ``node.consortium``,
``node.records``, ``node.db`` and the composition root ``node.services``."""
