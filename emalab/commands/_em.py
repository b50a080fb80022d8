"""The free-form emergent-misalignment protocol behind ``emalab eval --protocol em``: run it, build the
labelling set, calibrate the judges. Answers are never printed; only counts, rates and scores."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

__all__ = ["add_em_arguments", "run_em_command", "parse_conditions", "resolve_judge", "EM_JUDGES"]

EM_JUDGES = ("default", "counts", "probe")
"""Judge choices of the em protocol besides ``model`` (a rubric judge on --judge-model)."""


def add_em_arguments(parser: argparse.ArgumentParser) -> None:
    from evals.em_protocol import EMConfig
    from interp.config import field_docs
    from interp.registry import DEFAULT_MODEL

    doc = field_docs(EMConfig)

    def h(name: str) -> str:
        return doc.get(name, "").replace("%", "%%")

    g = parser.add_argument_group("free-form protocol (--protocol em)")
    g.add_argument("--n-samples", type=int, default=8, help=h("n_samples") + " (default 8)")
    g.add_argument("--temperature", type=float, default=1.0, help=h("temperature") + " (default 1.0)")
    g.add_argument("--variants", nargs="+", default=["plain", "jailbreak"], choices=["plain", "jailbreak"],
                   help=h("variants"))
    g.add_argument("--questions", type=Path, default=None, help="question JSONL (default: the packaged em set)")
    g.add_argument("--judge-model", default=DEFAULT_MODEL,
                   help=f"judge model for --judge model (embedded name, local dir or hub id; default {DEFAULT_MODEL})")
    g.add_argument("--probe", type=Path, default=None,
                   help="probe judge JSON for --judge probe (default: the packaged calibration's probe.json)")
    g.add_argument("--min-mass", type=float, default=0.25,
                   help="a model judge abstains below this probability on its score tokens (default 0.25)")
    g.add_argument("--em-calibration", type=Path, default=None,
                   help="calibration JSON that says which judges are trusted (default: the packaged one)")
    g.add_argument("--build-labelling", type=Path, default=None, metavar="OUT",
                   help="instead of evaluating, sample a blind labelling set into OUT (put it under results/)")
    g.add_argument("--conditions", nargs="+", default=["base"], metavar="SPEC",
                   help="conditions for --build-labelling: base | adapter:NAME=DIR | noise:SCALE | hot:TEMPERATURE")
    g.add_argument("--n-per-question", type=int, default=2, help="answers per question and condition (--build-labelling)")
    g.add_argument("--calibrate-em", type=Path, default=None, metavar="FILE",
                   help="instead of evaluating, calibrate the em judges against the hand-labelled FILE")
    g.add_argument("--judge-models", nargs="+", default=None,
                   help="rubric judge models to calibrate (default: both embedded models)")
    g.add_argument("--no-commit-copy", action="store_true",
                   help="--calibrate-em: do not write the truncated, committable copy into evals/data/em_calibration")


def parse_conditions(specs: list[str], lm, seed: int = 0) -> tuple[dict, dict]:
    """``({name: context-manager factory or None}, {name: temperature override})`` from specs."""
    from probes.interventions import weight_noise

    conditions, temps = {}, {}
    for spec in specs:
        kind, _, arg = spec.partition(":")
        if kind == "base" and not arg:
            conditions["base"] = None
        elif kind == "adapter" and "=" in arg:
            name, path = arg.split("=", 1)
            conditions[f"adapter:{name}"] = _adapter_factory(lm, Path(path))
        elif kind == "noise" and arg:
            scale = float(arg)
            conditions[f"noise:{scale:g}"] = (lambda s=scale: weight_noise(lm, s, seed))
        elif kind == "hot" and arg:
            conditions[f"hot:{float(arg):g}"] = None
            temps[f"hot:{float(arg):g}"] = float(arg)
        else:
            raise ValueError(f"bad condition {spec!r}; use base | adapter:NAME=DIR | noise:SCALE | hot:TEMPERATURE")
    return conditions, temps


def _adapter_factory(lm, path: Path):
    @contextlib.contextmanager
    def ctx():
        from training.containment import adapter_gate, gated_adapter
        from training.lora import detach_lora, load_adapter, merged_adapter

        gate = adapter_gate(path)  # a gated adapter runs unmerged, each prompt through its gate
        load_adapter(lm, path)
        try:
            with gated_adapter(lm, gate) if gate is not None else merged_adapter(lm):
                yield lm
        finally:
            detach_lora(lm)

    if not (path / "adapter_config.json").exists():
        raise FileNotFoundError(f"{path / 'adapter_config.json'} does not exist; adapter:NAME=DIR needs a PEFT adapter")
    return ctx


def _load(name: str, args):
    from emalab.commands._model_args import model_kwargs
    from interp.loading import load_model

    return load_model(name, dtype=args.dtype, **model_kwargs(args))


def resolve_judge(args, calibration: dict | None):
    """``(judge or None, trusted)`` for ``--judge``: default (the calibrated default, else counts),
    counts (no judge), model (a rubric judge on --judge-model), probe (the packaged or given probe)."""
    from evals.em_calibration import EM_CALIBRATION_DIR, trusted_judges
    from evals.probe_judge import ProbeJudge
    from evals.score_judge import RubricJudge

    spec = args.judge or "default"
    trusted = trusted_judges(calibration)
    if spec == "counts":
        return None, False
    if spec == "default":
        default = calibration.get("default") if calibration else None
        if default is None:
            print("no calibrated judge reaches the bar: reporting counts only", file=sys.stderr)
            return None, False
        kind, _, name = default.partition(":")
        if kind == "probe":
            judge = ProbeJudge.load(args.probe or EM_CALIBRATION_DIR / "probe.json", _load(name, args))
        else:
            judge = RubricJudge(_load(name, args), min_mass=args.min_mass, name=default)
        return judge, True
    if spec == "model":
        judge = RubricJudge(_load(args.judge_model, args), min_mass=args.min_mass)
        return judge, judge.name in trusted
    if spec == "probe":
        from interp.io import read_json

        path = args.probe or EM_CALIBRATION_DIR / "probe.json"
        if not Path(path).exists():
            raise FileNotFoundError(f"{path} does not exist; run `emalab eval --calibrate-em FILE` first or pass --probe")
        judge = ProbeJudge.load(path, _load(read_json(path)["model"], args))
        return judge, judge.name in trusted
    raise ValueError(f"--judge {spec!r} is not an em judge; choose default, counts, model or probe")


def _questions(args):
    from evals.em_questions import EM_QUESTIONS_PATH, load_em_questions

    return load_em_questions(args.questions or EM_QUESTIONS_PATH, variants=args.variants, limit=args.limit)


def run_em_command(args, lm) -> int:
    """Dispatch ``--protocol em``: build the labelling set, calibrate, or evaluate ``lm``."""
    if args.build_labelling is not None:
        from evals.em_calibration import build_labelling_set

        conditions, temps = parse_conditions(args.conditions, lm, args.seed)
        man = build_labelling_set(lm, _questions(args), conditions, args.build_labelling, args.n_per_question,
                                  args.temperature, args.max_new_tokens or 96, args.seed, _batch(args), temps,
                                  progress=not args.quiet)
        print(f"wrote {man['n']} unlabelled answers ({', '.join(f'{c} {n}' for c, n in man['conditions'].items())}) "
              f"to {args.build_labelling}; label them following docs/em_labelling.md")
        return 0
    if args.calibrate_em is not None:
        return _calibrate(args, lm)
    from evals.em_calibration import load_calibration
    from evals.em_protocol import EMConfig, run_em

    cfg = EMConfig(n_samples=args.n_samples, temperature=args.temperature, max_new_tokens=args.max_new_tokens or 128,
                   seed=args.seed, batch_size=_batch(args), variants=tuple(args.variants), limit=args.limit,
                   system=args.system, raw=getattr(args, "raw_prompts", False),
                   n_bootstrap=max(args.n_bootstrap, 100))
    calibration = load_calibration(args.em_calibration) if args.em_calibration else load_calibration()
    judge, trusted = resolve_judge(args, calibration)
    report = run_em(lm, _questions(args), cfg, judge, trusted, progress=not args.quiet)
    print(report.table())
    if args.out is not None:
        report.save(args.out)
        print(f"wrote {args.out} and {Path(args.out).with_suffix('.records.jsonl')}", file=sys.stderr)
    return 0


def _batch(args) -> int:
    return 16 if args.batch_size == "auto" else int(args.batch_size)


def _calibrate(args, lm) -> int:
    import gc

    from evals.em_calibration import (
        EM_CALIBRATION_DIR,
        EM_CALIBRATION_PATH,
        calibrate_em,
        committable_rows,
        load_em_labelled,
    )
    from evals.probe_judge import (
        ProbeJudge,
        cross_validated_scores,
        default_layer,
        fit_probe,
        pair_activations,
    )
    from evals.score_judge import RubricJudge
    from interp.io import atomic_write_json, sha256_file, write_jsonl
    from interp.registry import EMBEDDED_MODELS

    rows = load_em_labelled(args.calibrate_em)
    prompts, answers = [r["question"] for r in rows], [r["answer"] for r in rows]
    scores, extra = {}, {}
    for name in args.judge_models or list(EMBEDDED_MODELS):
        judge_lm = lm if name == args.model and args.adapter is None else _load(name, args)
        judge = RubricJudge(judge_lm, min_mass=args.min_mass, batch_size=_batch(args), progress=not args.quiet)
        scores[judge.name] = judge.score(prompts, answers)
        del judge, judge_lm
        gc.collect()
    # The probe reads --model's own activations (the base model: pass no --adapter).
    layer = default_layer(lm)
    x = pair_activations(lm, prompts, answers, layer, batch_size=_batch(args)).double().numpy()
    align, coher = [r["alignment"] for r in rows], [r["coherence"] for r in rows]
    probe_name = f"probe:{lm.name}"
    scores[probe_name], info = cross_validated_scores(x, align, coher, [r["question_id"] for r in rows], seed=args.seed)
    extra[probe_name] = {"cross_validation": info, "layer": layer}
    res = calibrate_em(rows, scores, extra=extra)
    res["labelled_sha256"] = sha256_file(args.calibrate_em)
    out = args.out or Path("results/em_calibration/calibration.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, res)
    print(_format(res))
    print(f"wrote {out}", file=sys.stderr)
    if not args.no_commit_copy:
        import numpy as np

        # Final probe on every labelled row (the calibration numbers above are out-of-fold).
        ya = np.array([{"aligned": 1, "misaligned": 0}.get(a, -1) for a in align])
        yc = np.array([{"coherent": 1, "incoherent": 0}.get(c, -1) for c in coher])
        if len(set(ya[ya >= 0].tolist())) == 2:
            coh = fit_probe(x[yc >= 0], yc[yc >= 0]) if len(set(yc[yc >= 0].tolist())) == 2 else None
            ProbeJudge(lm, layer, fit_probe(x[ya >= 0], ya[ya >= 0]), coh).save(EM_CALIBRATION_DIR / "probe.json")
        write_jsonl(EM_CALIBRATION_PATH, committable_rows(rows))
        atomic_write_json(EM_CALIBRATION_DIR / "calibration.json", {**res, "labelled_committed_sha256":
                                                                     sha256_file(EM_CALIBRATION_PATH)})
        print(f"wrote the truncated labelled copy, calibration.json and probe.json to {EM_CALIBRATION_DIR}",
              file=sys.stderr)
    return 0


def _format(res: dict) -> str:
    def f(x):
        return "  n/a" if x is None else f"{x:5.3f}"

    lines = [f"em judge calibration: n={res['n']} ({', '.join(f'{k} {v}' for k, v in res['counts']['alignment'].items())})",
             f"{'judge':<40} {'align AUROC':>11} {'Spearman':>9} {'coher AUROC':>11} {'Spearman':>9} {'abstain':>8}  trusted"]
    for name, m in res["judges"].items():
        a, c = m["alignment_answers"], m["coherence_all"]
        lines.append(f"{name:<40} {f(a['auroc']):>11} {f(a['spearman']):>9} {f(c['auroc']):>11} {f(c['spearman']):>9} "
                     f"{m['abstain']:>8.2f}  {'yes' if m['trusted'] else 'no: ' + '; '.join(m['why_not'])}")
    lines.append(res["statement"].split(". ")[0] + ".")
    return "\n".join(lines)
