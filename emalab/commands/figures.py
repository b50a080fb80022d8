"""Regenerate every figure from saved results (no model is loaded)."""

from __future__ import annotations

NAME = "figures"
HELP = "regenerate all figures (PNG + PDF) from a results directory"


def add_arguments(parser) -> None:
    parser.add_argument("results", nargs="?", default="results", help="results directory (default: results)")


def run(args) -> int:
    from pathlib import Path

    from figures import make_all

    results = Path(args.results)
    if not results.is_dir():
        raise FileNotFoundError(f"{results} is not a results directory; run `emalab run` first")
    paths = make_all(results)
    for p in paths:
        print(p)
    print(f"{len(paths)} files written")
    return 0
