"""Regenerate every figure and REPORT.md from saved results (no model is loaded)."""

from __future__ import annotations

NAME = "figures"
HELP = "regenerate all figures (PNG + PDF) and REPORT.md from a results directory"


def add_arguments(parser) -> None:
    parser.add_argument("results", nargs="?", default="results", help="results directory (default: results)")
    parser.add_argument("--no-report", action="store_true", help="figures only; leave REPORT.md as it is")
    parser.add_argument("--compare", nargs="+", metavar="OTHER_RESULTS",
                        help="add to REPORT.md the cross-model table of RESULTS beside these results directories "
                             "(the same study on other models; see `emalab compare`)")


def run(args) -> int:
    from pathlib import Path

    from figures import make_all

    results = Path(args.results)
    if not results.is_dir():
        raise FileNotFoundError(f"{results} is not a results directory; run `emalab run` first")
    if args.compare:
        if args.no_report:
            raise ValueError("--compare writes into REPORT.md; drop --no-report, or print the table with "
                             "`emalab compare`")
        from emalab.cross_model import compare_lines

        compare_lines([results, *args.compare])  # a bad directory fails here, before any figure is redrawn
    paths = make_all(results)
    for p in paths:
        print(p)
    print(f"{len(paths)} files written")
    if not args.no_report:
        from emalab.report import write_report

        print(f"report: {write_report(results, args.compare)}")
    return 0
