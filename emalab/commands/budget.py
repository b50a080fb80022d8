"""Choose a model's unlearning learning rate on the dev split, before its study runs.

  emalab budget --model qwen2.5-coder-1.5b-instruct --target cybersecurity --lrs 3e-5,1e-4,2e-4

Trains NPO alone on the target at each rate (ascending, the preset's trajectory settings) and reads
where the target's refusal on its probe prompts first reaches the operating level; the eval prompts
play no part. Stops at the first rate that reaches it (--all-lrs trains every rate). Prints one line
per rate, the chosen rate and the `emalab run` command that uses it; writes results/budget/<run>/.
Each run is a cached stage: the one at the chosen rate is the run the study's H1 reads (seed 0).
"""

from __future__ import annotations

import argparse

NAME = "budget"
HELP = "choose a model's unlearning lr on the dev split (the operating level within the trajectory's steps)"

_SKIP = ("lr",)


def parse_lrs(text: str) -> tuple[float, ...]:
    """``3e-5,1e-4`` → ``(3e-05, 0.0001)``; argparse turns the ``ValueError`` into a one-line usage error."""
    from study.budget import check_lrs

    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    try:
        return check_lrs(values)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from interp.config import add_config_arguments
    from study import StudyConfig

    parser.add_argument("--target", required=True, help="the domain unlearned (a suite domain)")
    parser.add_argument("--lrs", type=parse_lrs, required=True,
                        help="candidate learning rates, comma-separated and ascending, e.g. 3e-5,1e-4,2e-4")
    parser.add_argument("--preset", choices=["quick", "full"], default="quick",
                        help="the study settings (trajectory steps, probe prompts) of the `emalab run` preset "
                             "this budget is for (default: quick)")
    parser.add_argument("--all-lrs", action="store_true", help="train every rate, not only up to the first that reaches the level")
    parser.add_argument("--no-untouched", action="store_true",
                        help="skip the other domains' dev refusal at each operating point")
    add_config_arguments(parser, StudyConfig, skip=_SKIP)


def run(args: argparse.Namespace) -> int:
    import shlex

    from emalab.pipeline import PRESETS
    from interp.config import config_flags_given, config_from_args
    from interp.runs import run_dir, write_run
    from study import Study, StudyConfig
    from study.budget import choose_lr

    cfg = config_from_args(StudyConfig, args, base=PRESETS[args.preset].study)
    result = choose_lr(Study(cfg), args.target, args.lrs, all_lrs=args.all_lrs, untouched=not args.no_untouched)
    for row in result["lrs"]:
        extra = (f", untouched {row['untouched_dev_refusal']:.3f}" if "untouched_dev_refusal" in row else "")
        print(f"lr {row['lr']:g}: dev refusal {row['dev_refusal']:.3f} at step {row['step']}/{result['steps']} "
              f"({'reached' if row['reached'] else 'not reached'} {result['level']:g}{extra})")
    if result["base_untouched_dev_refusal"] is not None:
        print(f"base model: untouched dev refusal {result['base_untouched_dev_refusal']:.3f}")
    config = {"study": cfg.to_dict(), "target": args.target, "lrs": list(args.lrs), "preset": args.preset,
              "all_lrs": args.all_lrs}
    path = run_dir(cfg.results, "budget", config)
    write_run(path, config, result)
    if result["chosen"] is None:
        print(f"chosen: none: {result['reason']}")
        print(f"saved: {path}")
        return 1
    print(f"chosen: lr {result['chosen']:g} ({result['reason']})")
    print(f"saved: {path}")
    flags = config_flags_given(StudyConfig, args, skip=_SKIP)
    print("next: " + shlex.join(["emalab", "run", "--preset", args.preset, *flags, "--lr", f"{result['chosen']:g}"]))
    return 0
