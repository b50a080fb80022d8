"""One script per hypothesis. Each has a ``Config`` and ``main(cfg)`` and writes
``results/<experiment>/<run_id>/``; none of them plots."""
