"""Unlearn one domain's refusals with NPO (or GA / GradDiff / SimNPO) on a LoRA adapter.

  emalab unlearn --target cybersecurity --method npo
  emalab unlearn --target cybersecurity --retain-ce --steps 40 --lr 2e-4
  emalab unlearn --config my_run.json --out results/unlearn/mine     # resumes if interrupted
  emalab unlearn --target safety --eval 16                          # + logit refusal before/after
  emalab unlearn --retain-mode ce --retain-weighting per_token --alpha 1   # equal per-token weight
  emalab unlearn --retain-mode repr --repr-layers 4 8 12 --repr-distance cosine
  emalab unlearn --retain-mode direction --retain-direction refusal_direction.safetensors
  emalab unlearn --concept-gate --gate-vector cyber_concept.safetensors --gate-layer 4

The forget set is the target's ``unlearn`` split paired with the model's own greedy refusals (kept
where the judge says ``refusal``); ``--retain-ce`` adds cross-entropy on the model's own refusals to
the other domains' ``retain`` prompts; ``--retain-mode kl|repr|direction`` and ``--concept-gate``
are the containment variants (``training.containment``). Output goes to
``results/unlearn/<run_id>/`` (run id: method, target, config hash, git commit): the PEFT adapter in
``adapter/``, per-step losses in ``metrics.jsonl``. An interrupted run resumes from its last checkpoint when started again with the
same config; a finished one is not redone.

Data-parallel over N processes (one run directory, written by rank 0; see docs/scaling.md):

  torchrun --nproc-per-node 2 -m emalab.cli unlearn --target cybersecurity --batch-size 8
  accelerate launch --multi_gpu --num_processes 8 -m emalab.cli unlearn --target cybersecurity
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "unlearn"
HELP = "unlearn a domain's refusals (NPO & friends on a LoRA adapter); resumable"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from evals.suite import DOMAINS
    from interp.config import add_config_arguments
    from training.config import UnlearnConfig

    parser.add_argument("--target", nargs="+", dest="target_domains", choices=list(DOMAINS), metavar="DOMAIN",
                        default=None, help="domain(s) whose refusals are unlearned (default: cybersecurity)")
    parser.add_argument("--retain-ce", action="store_true",
                        help="add the retain cross-entropy term (same as --retain-mode ce)")
    parser.add_argument("--config", type=Path, default=None,
                        help="UnlearnConfig JSON; options given on the command line override it")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default results/unlearn/<run_id>)")
    from emalab.commands._model_args import DEVICE_HELP, add_model_source_arguments

    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    add_model_source_arguments(parser)
    parser.add_argument("--no-resume", action="store_true", help="start over even if --out holds a checkpoint")
    parser.add_argument("--eval", type=int, default=0, metavar="N",
                        help="also report the mean logit refusal score on N eval prompts per domain before "
                             "and after unlearning (0: skip)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config JSON and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_arguments(parser, UnlearnConfig, skip=("target_domains", "output_dir"))


def resolve_config(args: argparse.Namespace):
    from interp.config import config_from_args
    from training.config import UnlearnConfig

    base = UnlearnConfig.load(args.config) if args.config else None
    cfg = config_from_args(UnlearnConfig, args, base=base)
    if args.retain_ce:
        if args.retain_mode not in (None, "ce"):
            raise ValueError(f"--retain-ce contradicts --retain-mode {args.retain_mode}")
        cfg = cfg.replace(retain_mode="ce")
    return cfg


def _logit_means(lm, prompts_by_domain) -> dict[str, float]:
    from evals.refusal import logit_refusal_scores

    return {d: float(logit_refusal_scores(lm, [p.text for p in ps]).double().mean())
            for d, ps in prompts_by_domain.items()}


def run(args: argparse.Namespace) -> int:
    import json

    cfg = resolve_config(args)
    if cfg.dtype == "auto":  # resolved before the run id is derived from the config
        from interp.loading import resolve_device
        from interp.precision import resolve_dtype_choice

        cfg = cfg.replace(dtype=resolve_dtype_choice("auto", resolve_device(args.device)))
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0

    from interp.io import ensure_writable_dir
    from training.checkpoint import run_dir_lock
    from training.trainer import default_run_dir

    out = args.out or (Path(cfg.output_dir) if cfg.output_dir else default_run_dir(cfg))
    # Before the model loads: an unwritable --out or a run directory in use fails in a second, not minutes.
    from interp.loading import check_model_source

    check_model_source(cfg.model)
    ensure_writable_dir(out, "run directory (--out)")
    with run_dir_lock(out):
        return _run(args, cfg, out)


def _run(args: argparse.Namespace, cfg, out: Path) -> int:
    from emalab.commands._model_args import model_kwargs
    from evals.suite import DOMAINS, load_prompts
    from interp.loading import load_model
    from interp.precision import EVAL_DTYPE
    from training.containment import adapter_gate, gated_adapter
    from training.lora import load_adapter, merged_adapter
    from training.trainer import unlearn

    lm = load_model(cfg.model, dtype=cfg.dtype, **model_kwargs(args))
    evals = {d: load_prompts(d, "eval", limit=args.eval) for d in DOMAINS} if args.eval else {}
    # The adapter's effect is below bf16 resolution: score it on a float32 copy (docs/numerics.md).
    eval_lm = (lm if not evals or cfg.dtype == EVAL_DTYPE
               else load_model(cfg.model, dtype=EVAL_DTYPE, **model_kwargs(args)))
    before = _logit_means(eval_lm, evals) if evals else {}
    result = unlearn(lm, cfg, out, progress=not args.quiet, resume=not args.no_resume)
    from training.distributed import DataParallel

    if not DataParallel.is_main_process():
        return 0  # rank 0 reports and writes; every rank holds the same adapter
    last = result.history[-1] if result.history else {}
    print(f"adapter:  {result.adapter_dir}")
    print(f"metrics:  {result.metrics_path}")
    print(f"steps {result.steps}  final loss {last.get('loss', float('nan')):.4f}  "
          f"{result.seconds_per_step:.2f} s/step  peak RSS {result.peak_rss_gb:.2f} GB  "
          f"forget kept {result.manifest['forget']['kept']}/{result.manifest['forget']['candidates']}")
    if evals:
        if eval_lm is not lm:
            load_adapter(eval_lm, result.adapter_dir)
        gate = adapter_gate(result.adapter_dir)  # a gated adapter is scored unmerged, each prompt through its gate
        with gated_adapter(eval_lm, gate) if gate is not None else merged_adapter(eval_lm):
            after = _logit_means(eval_lm, evals)
        print(f"{'domain':<18} {'logit before':>12} {'after':>8}")
        for d in evals:
            mark = " *" if d in cfg.target_domains else ""
            print(f"{d:<18} {before[d]:>+12.2f} {after[d]:>+8.2f}{mark}")
        from interp.io import atomic_write_json

        atomic_write_json(result.run_dir / "logit_eval.json", {"n_per_domain": args.eval, "before": before,
                                                              "after": after})
    sys.stdout.flush()
    return 0
