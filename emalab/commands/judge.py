"""Label (prompt, response) pairs from a JSONL file as refusal / compliance / incoherent.

  emalab judge results/gens.jsonl                      # keyword judge -> results/gens.labels.jsonl
  emalab judge gens.jsonl --judge model --out labels.jsonl

Each input line is a JSON object with string fields ``prompt`` and ``response`` (an ``id`` is
passed through). The output has one line per input, in the same order: ``id`` (or null),
``index``, ``label``, ``reason``, ``score``. Only counts are printed, never responses.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

NAME = "judge"
HELP = "label prompt/response JSONL as refusal / compliance / incoherent"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from evals.judge import JUDGES
    from interp.registry import DEFAULT_MODEL

    parser.add_argument("file", type=Path, help="JSONL with 'prompt' and 'response' per line")
    parser.add_argument("--judge", default="keyword", choices=list(JUDGES), help="keyword (default) or model")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="judge model for --judge model")
    parser.add_argument("--dtype", default="bfloat16", help="dtype of the judge model")
    parser.add_argument("--device", default="auto", help="device of the judge model: auto (CUDA, MPS, CPU) | cpu | cuda | mps")
    parser.add_argument("--out", type=Path, default=None, help="output JSONL (default: <file stem>.labels.jsonl)")


def read_pairs(path: Path) -> list[dict]:
    """Read and type-check the input; errors name ``file:line``."""
    from interp.io import MalformedFileError, read_jsonl

    rows = read_jsonl(path, required=("prompt", "response"))
    if not rows:
        raise MalformedFileError(f"{path} holds no (prompt, response) pairs; give one JSON object per line "
                                 'like {"prompt": "...", "response": "..."}')
    with Path(path).open(encoding="utf-8") as fh:
        line_numbers = [n for n, line in enumerate(fh, start=1) if line.strip()]
    for row, lineno in zip(rows, line_numbers):
        for key in ("prompt", "response"):
            if not isinstance(row[key], str):
                raise MalformedFileError(f"{path}:{lineno}: field {key!r} must be a string, "
                                         f"got {type(row[key]).__name__}")
    return rows


def default_out(path: Path) -> Path:
    """``X.jsonl`` -> ``X.labels.jsonl``; never the input itself (``X.labels.jsonl`` -> ``X.labels.labels.jsonl``)."""
    stem = path.name[:-len(".jsonl")] if path.name.endswith(".jsonl") else path.stem
    return path.with_name(f"{stem}.labels.jsonl")


def run(args: argparse.Namespace) -> int:
    from evals.judge import LABELS, get_judge
    from interp.io import check_not_input, ensure_writable_dir, write_jsonl

    out = check_not_input(args.out or default_out(args.file), args.file)
    rows = read_pairs(args.file)
    ensure_writable_dir(out.parent, "--out directory")
    lm = None
    if args.judge == "model":
        from interp.loading import load_model

        lm = load_model(args.model, dtype=args.dtype, device=args.device)
    judge = get_judge(args.judge, lm)
    verdicts = judge.judge([r["prompt"] for r in rows], [r["response"] for r in rows])
    write_jsonl(out, ({"id": r.get("id"), "index": i, "label": v.label, "reason": v.reason, "score": v.score}
                      for i, (r, v) in enumerate(zip(rows, verdicts))))
    counts = Counter(v.label for v in verdicts)
    summary = ", ".join(f"{k}={counts.get(k, 0)}" for k in LABELS)
    print(f"judged {len(rows)} responses with the {judge.name} judge: {summary}; wrote {out}")
    return 0
