"""Running a node: setting it up, upgrading and joining (:mod:`.setup`), what an operator needs
to know about it (:mod:`.status`), its Prometheus metrics (:mod:`.metrics`) and gunicorn's
settings (:mod:`.gunicorn_conf`).

May import: every room below it (``intake``, ``flows``, ``services`` and down)."""
