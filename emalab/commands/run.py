"""Run the whole study on one model: baseline evaluation, activations and concept vectors, the
refusal direction, NPO on cybersecurity and safety with and without retain-CE, the LoRA-SFT
baseline, re-evaluation, entanglement analysis, figures and REPORT.md.

Finished stages are cached under RESULTS/stages; an interrupted run resumes where it stopped."""

from __future__ import annotations

NAME = "run"
HELP = "run the main job (all hypotheses → figures → REPORT.md); resumes after interruption"


def add_arguments(parser) -> None:
    from interp.config import add_config_arguments
    from study import StudyConfig

    parser.add_argument("--preset", choices=["quick", "full"], default="quick",
                        help="quick: H1, H2, H13, H5, H7 with 3 training seeds (the first judged), 24 eval "
                             "prompts per domain, 16-step trajectories (README: measured cost); full: every "
                             "experiment, whole splits, the α × lr grid, seven targets (many hours on CPU)")
    parser.add_argument("--experiments", nargs="+", help="run only these experiment modules")
    parser.add_argument("--no-figures", action="store_true", help="skip figure generation")
    parser.add_argument("--set", dest="settings", action="append", type=parse_setting, default=[],
                        metavar="EXPERIMENT.FIELD=JSON",
                        help="one experiment's Config field (repeatable), a JSON value, e.g. "
                             "'h14_containment_frontier.alpha_grid=[]' or 'h14_containment_frontier.targets=[\"safety\"]'; "
                             "it overrides the preset's value")
    add_config_arguments(parser, StudyConfig)


def parse_setting(text: str) -> tuple[str, str, object]:
    """``EXPERIMENT.FIELD=JSON`` → ``(experiment, field, value)``; argparse turns the ``ValueError``
    into a one-line usage error. The shared ``study`` settings have their own flags."""
    import argparse
    import json

    key, sep, raw = text.partition("=")
    experiment, dot, name = key.partition(".")
    if not (sep and dot and experiment and name):
        raise argparse.ArgumentTypeError(f"expected EXPERIMENT.FIELD=JSON, got {text!r}")
    if name == "study":
        raise argparse.ArgumentTypeError("the study settings have their own flags (--seeds, --lr, ...), not --set")
    try:
        value = json.loads(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{key}: {raw!r} is not JSON (strings need quotes: '\"safety\"')") from None
    return experiment, name, value


def run(args) -> int:
    from dataclasses import replace

    from emalab.pipeline import PRESETS, run_pipeline
    from interp.config import config_from_args
    from study import StudyConfig

    cfg = PRESETS[args.preset]
    cfg = replace(cfg, study=config_from_args(StudyConfig, args, base=cfg.study))
    if args.experiments:
        # The preset's overrides of the experiments chosen come along; the others' are not run.
        cfg = replace(cfg, experiments=tuple(args.experiments),
                      overrides={k: v for k, v in cfg.overrides.items() if k in args.experiments})
    if args.settings:
        overrides = {k: dict(v) for k, v in cfg.overrides.items()}
        for experiment, name, value in args.settings:
            overrides.setdefault(experiment, {})[name] = value
        cfg = replace(cfg, overrides=overrides)  # validated here: an experiment not run is one line
    if args.no_figures:
        cfg = replace(cfg, figures=False)
    out = run_pipeline(cfg)
    print(f"done: {out}")
    return 0
