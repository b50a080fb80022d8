"""Grow the human-labelled calibration set from unlearned models: generate, label by hand, add.

  emalab calibration generate --out results/calibration/unlabelled.jsonl     # trains/reuses adapters
  (label each row by hand: "label": refusal | compliance | incoherent | rebuttal, "labeller": your name)
  emalab calibration add results/calibration/unlabelled.jsonl                 # appends to the packaged set

``generate`` evaluates the conditions that decide the claims (NPO, NPO+retain-CE, LoRA-SFT and a
deliberately degenerate high-lr NPO run, on cybersecurity and safety targets) with the study's own
cached stages and measurement path, on eval prompts past those already labelled, and writes their
40-token greedy responses under ``results/`` (gitignored). ``add`` checks every label, cuts compliant
answers to harmful requests to their first sentence (the stored policy), and appends the rows to
``evals/data/calibration/labelled.jsonl`` with their provenance in the manifest.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

NAME = "calibration"
HELP = "grow the human-labelled judge calibration set from unlearned models (generate, then add)"

# name -> (target, method, retain, StudyConfig overrides)
CONDITIONS: dict[str, tuple[str, str, bool, dict]] = {
    "npo-cybersecurity": ("cybersecurity", "npo", False, {}),
    "npo-safety": ("safety", "npo", False, {}),
    "npo_retain-cybersecurity": ("cybersecurity", "npo", True, {}),
    "sft-cybersecurity": ("cybersecurity", "sft", False, {}),
    "npo_highlr-safety": ("safety", "npo", False, {"lr": 2e-4, "steps": 30}),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    g = sub.add_parser("generate", help="responses of unlearned models to label by hand")
    g.add_argument("--out", type=Path, default=Path("results/calibration/unlabelled.jsonl"))
    g.add_argument("--results", default="results", help="results root of the cached study stages")
    g.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=list(CONDITIONS))
    g.add_argument("--per-domain", type=int, default=6, help="eval prompts per domain and condition")
    g.add_argument("--skip", type=int, default=10, help="eval prompts per domain to skip (already labelled)")
    g.add_argument("--max-new-tokens", type=int, default=40)
    g.add_argument("--dtype", default="float32",
                   help="measurement dtype of the generating models (float32: the study's path; bfloat16 is "
                        "~2.6x faster on a CPU with AVX512-BF16, and the judge only needs the outputs' kind)")
    a = sub.add_parser("add", help="append hand-labelled rows to the packaged calibration set")
    a.add_argument("labelled", type=Path, help="the generated JSONL with 'label' and 'labeller' filled in")
    a.add_argument("--to", type=Path, default=None, help="calibration set (default: the packaged one)")


def _first_sentence(text: str) -> str:
    m = re.search(r"(.+?[.!?:])(\s|$)", text.strip(), re.DOTALL)
    return (m.group(1) if m else text.strip().split("\n")[0]).strip()


def _generate(args: argparse.Namespace) -> int:
    for flag, value, least in (("--per-domain", args.per_domain, 1), ("--skip", args.skip, 0),
                               ("--max-new-tokens", args.max_new_tokens, 1)):
        if value < least:
            raise ValueError(f"{flag} must be >= {least}, got {value}")
    from interp.io import ensure_writable_dir

    ensure_writable_dir(args.out.parent, "--out directory")
    from evals.refusal import logit_refusal_scores
    from evals.suite import DOMAINS, load_prompts
    from interp.generate import generate
    from interp.io import read_jsonl, write_jsonl
    from study import Study, StudyConfig

    prompts = [p for d in DOMAINS for p in load_prompts(d, "eval", limit=args.skip + args.per_domain)[args.skip:]]
    texts = [p.text for p in prompts]
    # Written after each condition, so an interrupted build keeps what it finished and resumes there.
    rows = read_jsonl(args.out) if args.out.exists() else []
    done = {r["condition"] for r in rows}
    for name in args.conditions:
        if name in done:
            print(f"{name}: already in {args.out}")
            continue
        target, method, retain, overrides = CONDITIONS[name]
        study = Study(StudyConfig(results=args.results, eval_dtype=args.dtype, **overrides))
        ablation, ablation_id = study.ablation() if method == "sft" else (None, None)
        run = study.unlearn(target, method, None if retain else (), ablation=ablation, ablation_id=ablation_id)
        with study.with_adapter(run / "adapter") as lm:
            responses = generate(lm, texts, max_new_tokens=args.max_new_tokens, batch_size=16, progress=True)
            scores = logit_refusal_scores(lm, texts).tolist()
        rows += [{"prompt_id": p.id, "domain": p.domain, "condition": name, "expected": p.expected,
                  "prompt": p.text, "response": r, "label": "", "labeller": "", "logit_score": round(s, 4),
                  "dtype": args.dtype}
                 for p, r, s in zip(prompts, responses, scores)]
        write_jsonl(args.out, rows)
        print(f"{name}: {len(prompts)} responses")
    print(f"wrote {len(rows)} unlabelled rows to {args.out} (gitignored; label them by hand, then `add`)")
    return 0


def _add(args: argparse.Namespace) -> int:
    from evals.calibration import CALIBRATION_PATH, load_labelled
    from evals.judge import LABELS
    from interp.io import MalformedFileError, read_jsonl, write_jsonl

    target = args.to or CALIBRATION_PATH
    rows = read_jsonl(args.labelled, required=("prompt_id", "domain", "condition", "prompt", "response", "label",
                                               "labeller", "logit_score"))
    for i, r in enumerate(rows, start=1):
        if r["label"] not in LABELS:
            raise MalformedFileError(f"{args.labelled}:{i}: label {r['label']!r} is not one of {LABELS}; "
                                     "label every row by hand before adding")
        if not str(r["labeller"]).strip():
            raise MalformedFileError(f"{args.labelled}:{i}: 'labeller' is empty; say who labelled the row")
    existing = load_labelled(target)
    seen = {(r["prompt_id"], r["condition"]) for r in existing}
    start = len(existing)
    new = []
    for r in rows:
        if (r["prompt_id"], r["condition"]) in seen:
            continue
        harmful = r.get("expected", "refuse") != "answer"
        cut = harmful and r["label"] == "compliance"
        new.append({"id": f"cal-{start + len(new):03d}", "prompt_id": r["prompt_id"], "domain": r["domain"],
                    "condition": r["condition"], "prompt": r["prompt"],
                    "response": _first_sentence(r["response"]) if cut else r["response"],
                    "label": r["label"], "labeller": r["labeller"], "logit_score": r["logit_score"],
                    "truncated": "first_sentence" if cut else "40_tokens"})
    everything = [*existing, *new]
    write_jsonl(target, everything)
    _update_manifest(target, everything, new, args.labelled)
    print(f"added {len(new)} rows to {target} ({len(rows) - len(new)} already present)")
    return 0


def _update_manifest(target: Path, rows: list[dict], new: list[dict], source: Path) -> None:
    """Counts, digest and the provenance of the added part, in the manifest beside the set."""
    from collections import Counter

    from interp.io import atomic_write_json, read_json, sha256_file

    path = target.parent / "manifest.json"
    manifest = read_json(path) if path.exists() else {}
    by_cond: dict[str, Counter] = {}
    for r in rows:
        by_cond.setdefault(r["condition"], Counter())[r["label"]] += 1
    manifest.update({
        "n": len(rows),
        "counts": {"label": dict(Counter(r["label"] for r in rows)),
                   "condition": dict(Counter(r["condition"] for r in rows)),
                   "domain": dict(Counter(r["domain"] for r in rows)),
                   "label_by_condition": {c: dict(v) for c, v in by_cond.items()},
                   "truncated_first_sentence": sum(r.get("truncated") == "first_sentence" for r in rows)},
        "labelled_sha256": sha256_file(target),
    })
    if new:
        manifest.setdefault("additions", []).append({
            "ids": [new[0]["id"], new[-1]["id"]], "n": len(new), "from": str(source),
            "conditions": dict(Counter(r["condition"] for r in new)),
            "labels": dict(Counter(r["label"] for r in new)),
            "generation": "emalab calibration generate (greedy, the study's cached adapters, eval prompts past "
                          "the first 10 per domain); see the command's docstring",
        })
    atomic_write_json(path, manifest)


def run(args: argparse.Namespace) -> int:
    return _generate(args) if args.action == "generate" else _add(args)
