"""Command line of the benchmarks: ``python -m benchmarks`` and ``emalab bench`` share it.

  python -m benchmarks                                   # the five CPU benchmarks on the default model
  python -m benchmarks --suite activations,unlearn --reps 5
  python -m benchmarks --suite gpu7b --device cuda       # 7B-scale architectures on a GPU
  python -m benchmarks --suite gpu7b --device cpu --tiny # the same code path, CPU-sized
  python -m benchmarks --suite speed --dtype float32      # matmul peak, MFU, prefix cache, judge-aware generation
  python -m benchmarks --only train_phases --dtype float32  # one result: the NPO step's phase breakdown
  python -m benchmarks --only train_phases,containment_step  # and each containment method's step vs retain-CE
  python -m benchmarks --write-md                        # BENCHMARKS.md from the result files
"""

from __future__ import annotations

import argparse
import sys
import time

__all__ = ["add_arguments", "run", "main", "run_suites"]

MODEL_SUITES = ("activations", "refusal", "probes", "unlearn", "speed")
ORDER = ("activations", "refusal", "probes", "unlearn", "speed", "e2e", "gpu7b")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from benchmarks.harness import BenchConfig
    from interp.config import add_config_arguments

    parser.add_argument("--write-md", action="store_true",
                        help="write BENCHMARKS.md from the result files (after running --suite, if given)")
    parser.add_argument("--md", default=None, metavar="PATH",
                        help="with --write-md: where to write (default BENCHMARKS.md at the repository root)")
    parser.add_argument("--config", default=None, help="BenchConfig JSON; options given here override it")
    add_config_arguments(parser, BenchConfig)


def _summary(result) -> str:
    if result.status == "not_measured":
        return f"{result.bench}: not measured ({'; '.join(result.notes)})"
    parts = [f"{k} {v.median_s:.3g}s" for k, v in result.variants.items()]
    parts += [f"{k} ×{r['paired_ratio']:.3g}" + (f" (target {r['target']}: {'met' if r['met'] else 'MISSED'})"
                                                 if "target" in r else "") for k, r in result.ratios.items()]
    return f"{result.bench}{' (PARTIAL, see notes)' if result.status == 'partial' else ''}: " + "; ".join(parts)


def run_suites(cfg, log=print) -> list:
    """Run ``cfg.suite`` in a fixed order (one model load), write each result file, return the results."""
    from benchmarks import activations, e2e, gpu_7b, probing, refusal, speed, unlearn
    from benchmarks.harness import machine_name, write_result

    modules = {"activations": activations, "refusal": refusal, "probes": probing, "unlearn": unlearn, "e2e": e2e,
               "gpu7b": gpu_7b, "speed": speed}
    machine = cfg.machine or machine_name(cfg.device)
    lm = None
    if any(s in MODEL_SUITES for s in cfg.suite):
        from interp.loading import load_model

        t0 = time.perf_counter()
        lm = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
        log(f"[bench] loaded {cfg.model} ({cfg.dtype}, {cfg.device}) in {time.perf_counter() - t0:.0f}s")
    results = []
    for name in (s for s in ORDER if s in cfg.suite):
        t0 = time.perf_counter()
        out = modules[name].run(lm, cfg)
        for result in out if isinstance(out, list) else [out]:
            path = write_result(result, cfg.out_dir, machine)
            log(f"[bench] {_summary(result)}  [{time.perf_counter() - t0:.0f}s → {path}]")
            results.append(result)
    return results


def run(args: argparse.Namespace) -> int:
    from benchmarks.harness import BenchConfig
    from benchmarks.report import write_markdown
    from interp.config import config_from_args

    base = BenchConfig.load(args.config) if args.config else None
    cfg = config_from_args(BenchConfig, args, base=base)
    if args.suite is not None or args.only is not None or args.config or not args.write_md:
        run_suites(cfg)
    if args.write_md:
        print(f"[bench] wrote {write_markdown(cfg.out_dir, args.md)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
