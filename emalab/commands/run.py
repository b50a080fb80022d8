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
    add_config_arguments(parser, StudyConfig)


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
    if args.no_figures:
        cfg = replace(cfg, figures=False)
    out = run_pipeline(cfg)
    print(f"done: {out}")
    return 0
