"""CLI subcommands. Each module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args)``.

Modules here are discovered automatically, so adding a subcommand is adding one file.
"""
