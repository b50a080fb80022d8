"""Measure refusal per domain: logit refusal score and judged generations, with bootstrap 95% CIs.

  emalab eval                                   # all seven domains + over-refusal, eval split
  emalab eval --limit 24 --no-generate          # quick: logit score only, 24 prompts per domain
  emalab eval --adapter runs/x/adapter --out results/eval/x.json
  emalab eval --calibrate                       # judges and logit score vs the human-labelled set

The free-form emergent-misalignment protocol (docs/em_labelling.md): n sampled answers per
free-form question at temperature 1, refusals and irrelevant answers set apart, the rest scored by
a calibrated judge (or, when none is trusted, reported as counts only):

  emalab eval --protocol em --adapter runs/x/adapter --n-samples 8 --out results/em_eval/x.json
  emalab eval --protocol em --build-labelling results/em_labelling/unlabelled.jsonl \
      --conditions base adapter:npo=DIR noise:0.1 hot:1.8
  emalab eval --protocol em --calibrate-em results/em_labelling/labelled.jsonl

Rates use all prompts of a domain as denominator (refusal + compliance + incoherent = 1).
Generated responses are never printed or saved; per-prompt records (id, domain, logit score,
label) go next to --out as <out>.records.jsonl.

Under a launcher the prompts are sharded over the processes and rank 0 prints and writes:

  torchrun --nproc-per-node 2 -m emalab.cli eval --limit 24 --no-generate
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "eval"
HELP = "refusal rate per domain (logit score + judged generations) with bootstrap CIs"


class AdapterMismatchError(ValueError):
    """The adapter was trained on a different base model than the one loaded."""


def _field_doc(name: str) -> str:
    from evals.evaluate import EvalConfig
    from interp.config import field_docs

    return field_docs(EvalConfig).get(name, "").replace("%", "%%")  # argparse %-formats help strings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from evals.judge import JUDGES
    from evals.suite import DOMAINS, EXTRA_SETS
    from interp.registry import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"embedded name, local dir or hub id (default {DEFAULT_MODEL})")
    parser.add_argument("--adapter", type=Path, default=None, help="PEFT adapter directory to evaluate on top of --model")
    parser.add_argument("--dtype", default="float32",
                        help="float32 (default: exact; an adapter's effect is below bf16 resolution, "
                             "docs/numerics.md) | bfloat16")
    from emalab.commands._model_args import DEVICE_HELP, add_model_source_arguments

    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    add_model_source_arguments(parser, raw_prompts=True)
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS), metavar="DOMAIN",
                        choices=list(DOMAINS + EXTRA_SETS), help=_field_doc("domains"))
    parser.add_argument("--split", default="eval", help=_field_doc("split"))
    parser.add_argument("--limit", type=int, default=None, help=_field_doc("limit"))
    parser.add_argument("--no-over-refusal", action="store_true", help="skip the over-refusal row")
    parser.add_argument("--no-benign", action="store_true",
                        help="skip the benign row (and with it the KL to the base model of an --adapter)")
    parser.add_argument("--kl-tokens", type=int, default=8,
                        help="response positions of the benign prompts over which KL(base || adapted) is "
                             "averaged when --adapter is given (0: skip; default 8)")
    parser.add_argument("--no-generate", action="store_true", help="logit score only (no generation, no judge)")
    from emalab.commands._em import EM_JUDGES, add_em_arguments

    parser.add_argument("--protocol", default="refusal", choices=["refusal", "em"],
                        help="refusal: the seven-domain refusal evaluation (default); em: the free-form "
                             "emergent-misalignment protocol (sampled answers to everyday questions, judged)")
    parser.add_argument("--judge", default=None, choices=list(dict.fromkeys(JUDGES + EM_JUDGES)),
                        help=_field_doc("judge") + " (refusal protocol, default keyword). With --protocol em: "
                             "default (the calibrated default judge, else counts only), counts, model "
                             "(rubric judge on --judge-model) or probe")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=_field_doc("max_new_tokens") + " (default 48; 128 with --protocol em, 96 for "
                             "--build-labelling)")
    # Checked in run(), not by argparse, so that a bad value is the same one-line error as every other.
    parser.add_argument("--batch-size", default="16",
                        help=_field_doc("batch_size") + " An integer, or auto: the largest batch whose estimated "
                        "activations fit the device's free memory (on CPU a quarter of the available RAM, at most 64)")
    parser.add_argument("--n-bootstrap", type=int, default=1000, help=_field_doc("n_bootstrap"))
    parser.add_argument("--seed", type=int, default=0, help=_field_doc("seed"))
    parser.add_argument("--system", default=None, help=_field_doc("system"))
    parser.add_argument("--out", type=Path, default=None,
                        help="write the report JSON here (and per-prompt records to <out stem>.records.jsonl)")
    parser.add_argument("--calibrate", action="store_true",
                        help="instead of evaluating, score the judges and the logit score against the "
                             "human-labelled calibration set")
    parser.add_argument("--labelled", type=Path, default=None, help="labelled JSONL for --calibrate (default: packaged set)")
    parser.add_argument("--calibration-split", choices=("all", "dev", "heldout"), default="all",
                        help="--calibrate on every row, or on the base part plus the dev / held-out half of the "
                             "unlearned part (halves by sha256(prompt_id) parity; develop judge rules on dev, "
                             "report held-out once)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_em_arguments(parser)


def _adapter_file(adapter_dir: Path) -> Path:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (adapter_dir / name).exists():
            return adapter_dir / name
    raise FileNotFoundError(f"{adapter_dir} holds no adapter_model.safetensors or adapter_model.bin; "
                            "pass the directory a PEFT training run saved")


def _same_base(declared: str | None, model_arg: str) -> bool:
    if not declared:
        return True  # the adapter does not say; nothing to check against
    from interp.registry import EMBEDDED_MODELS, fetch_embedded

    candidates = {model_arg, model_arg.rstrip("/")}
    if model_arg in EMBEDDED_MODELS:
        candidates.add(str(fetch_embedded(model_arg)))
    names = {Path(c).name for c in candidates}
    return declared.rstrip("/") in candidates or Path(declared.rstrip("/")).name in names


def attach_adapter(lm, adapter_dir: Path, model_arg: str):
    """Wrap ``lm.model`` with the adapter at ``adapter_dir`` (an emalab or any PEFT adapter directory, or a
    hub adapter id) and record its id in ``lm.extra``."""
    from training.lora import AdapterMismatchError as Mismatch
    from training.lora import load_adapter, resolve_adapter_dir

    adapter_dir = resolve_adapter_dir(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise FileNotFoundError(f"{adapter_dir / 'adapter_config.json'} does not exist; --adapter must be a PEFT "
                                "adapter directory")
    _adapter_file(adapter_dir)
    try:
        return load_adapter(lm, adapter_dir)
    except Mismatch as err:
        raise AdapterMismatchError(f"{err} (--model is {model_arg!r})") from err


def _records_path(out: Path) -> Path:
    return Path(out).with_suffix("").with_suffix(".records.jsonl")


def run(args: argparse.Namespace) -> int:
    from emalab.commands._model_args import model_kwargs
    from interp.batching import check_batch_size
    from interp.loading import load_model

    args.batch_size = check_batch_size(args.batch_size)

    if args.protocol == "em" or args.calibrate_em is not None or args.build_labelling is not None:
        if args.out is not None:
            from interp.io import ensure_writable_dir

            ensure_writable_dir(Path(args.out).parent, "--out directory")
        lm = load_model(args.model, dtype=args.dtype, **model_kwargs(args))
        if args.adapter is not None:
            attach_adapter(lm, args.adapter, args.model)
        from emalab.commands._em import run_em_command

        return run_em_command(args, lm)
    from evals.judge import JUDGES

    if args.judge is not None and args.judge not in JUDGES:
        raise ValueError(f"--judge {args.judge!r} belongs to --protocol em; the refusal protocol's judges are "
                         f"{', '.join(JUDGES)}")
    args.judge = args.judge or "keyword"
    if args.max_new_tokens is None:
        args.max_new_tokens = 48
    if args.calibrate:
        from evals.calibration import CALIBRATION_PATH, calibrate, format_calibration

        # The model judge is the loaded --model (the embedded default unless told otherwise).
        judges = ["keyword", "model"]
        if args.out is not None:
            from interp.io import check_not_input, ensure_writable_dir

            ensure_writable_dir(Path(args.out).parent, "--out directory")
            check_not_input(args.out, args.labelled or CALIBRATION_PATH)
        lm = load_model(args.model, dtype=args.dtype, **model_kwargs(args))
        if args.adapter is not None:
            attach_adapter(lm, args.adapter, args.model)
        res = calibrate(args.labelled or CALIBRATION_PATH, judges, lm, split=args.calibration_split)
        print(format_calibration(res))
        if args.out is not None:
            from interp.io import atomic_write_json

            atomic_write_json(args.out, res)
            print(f"wrote {args.out}")
        return 0

    from evals.evaluate import EvalConfig, evaluate

    cfg = EvalConfig(
        domains=tuple(args.domains), split=args.split, limit=args.limit, over_refusal=not args.no_over_refusal,
        benign=not args.no_benign, kl_tokens=args.kl_tokens or None,
        generate=not args.no_generate, max_new_tokens=args.max_new_tokens,
        batch_size=16 if args.batch_size == "auto" else args.batch_size,  # "auto" is resolved once the model is loaded
        judge=args.judge, n_bootstrap=args.n_bootstrap, seed=args.seed, system=args.system,
        raw=getattr(args, "raw_prompts", False),
    )
    from interp.config import check_fields

    check_fields(cfg)
    if args.out is not None:
        from interp.io import check_not_input, ensure_writable_dir

        ensure_writable_dir(Path(args.out).parent, "--out directory")
        check_not_input(_records_path(args.out), args.out, flag="--out (its records file would overwrite it)")
    import time

    t0 = time.perf_counter()
    lm = load_model(args.model, dtype=args.dtype, **model_kwargs(args))
    if args.adapter is not None:
        attach_adapter(lm, args.adapter, args.model)
    load_s = time.perf_counter() - t0
    if args.batch_size == "auto":
        import dataclasses

        from interp.batching import auto_batch_size

        seq = cfg.max_prompt_tokens + (cfg.max_new_tokens if cfg.generate else 0)
        cfg = dataclasses.replace(cfg, batch_size=auto_batch_size(lm, seq, kv_cache=cfg.generate))
        print(f"batch size {cfg.batch_size} (auto, {lm.device})", file=sys.stderr)
    from training.distributed import init_distributed

    ctx = init_distributed(device=lm.device.type)  # one process without a launcher: nothing to join
    report = evaluate(lm, cfg, progress=not args.quiet and ctx.is_main)
    if not ctx.is_main:
        return 0
    report.timings = {"load_s": load_s, **report.timings}
    print(report.table())
    print("\nby expected answer (refuse / handle_carefully / rebut / answer):")
    print(report.expected_table())
    if cfg.generate:
        print("\nlogit score vs the judge (AUROC / accuracy of score > 0), with and without 'No':")
        print(report.agreement_table())
    if args.out is not None:
        report.save(args.out)
        records = _records_path(args.out)
        report.save_records(records)
        print(f"wrote {args.out} and {records}", file=sys.stderr)
    return 0
