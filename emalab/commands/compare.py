"""Print the cross-model table of two or more results directories (the same study on different models):
each claim's verdict and headline numbers per model side by side, each run's setup and measured cost,
and a warning when the runs' settings differ. Reads saved results only; no model is loaded.

`emalab figures RESULTS --compare OTHER` writes the same table into RESULTS/REPORT.md."""

from __future__ import annotations

NAME = "compare"
HELP = "print the cross-model table (markdown) of two or more results directories"


def add_arguments(parser) -> None:
    parser.add_argument("dirs", nargs="+", metavar="DIR",
                        help="results directories of `emalab run`, e.g. results results_1.5b")


def run(args) -> int:
    from emalab.cross_model import compare_lines

    print("\n".join(compare_lines(args.dirs)))
    return 0
