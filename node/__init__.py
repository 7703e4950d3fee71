"""The hospital node: one hospital's FHIR server, its member side of the consortium, the
adapters that feed it, and the ``hrx`` command. It wires the domain packages (``ledger``,
``consent``, ``fhir_adapters``, ``exchange``) together; none of them imports it.

Rooms, each importing only the rooms listed below it (``a | b``: neither imports the other)::

    cli          the ``hrx`` command; the only room that imports click
    demo         real nodes, a consortium and a PACS on this machine; the ``hrx demo`` story
    web          HTTP: app factory, FHIR API, pages, ledger/peer/health/metrics endpoints;
                 the only room that imports Flask
    ops          setup (init, upgrade, join), status, metrics, gunicorn settings
    intake | flows   the adapters' processes | the use cases (prior results, orders,
                 the source's access decision, permissions), free of Flask
    services     (node/services.py) the composition root: what one running node holds
    records      the AuditEvent trail, consents onto the ledger, the pseudonym index
    identity | consortium   users, tokens, sessions | membership, signed peer requests,
                 replication, checkpoints
    db           engines, the schema in one place, migrations
    base         configuration, errors, logs

The rule is enforced by import-linter (``[tool.importlinter]`` in pyproject.toml, run by
``tests/test_architecture.py``), function-level imports included, with no cycle at any depth.
Function-level imports remain only where the moment of import matters: ``ledger.bls`` (its
BLS library takes half a second to load) and prometheus_client, whose mode is chosen when it
is first imported (``node.web.wsgi``, ``node.ops.gunicorn_conf``).
"""
