"""The cross-model table: each claim's verdict and headline numbers per model, side by side (as the
paper does with two models), each model's setup facts and cost below it, and a warning when the runs'
settings differ. Read from saved results only: each directory's ``pipeline.json`` and its experiments'
latest ``metrics.json``.

Setup facts are declared by the experiments (``SETUP_FACTS = {label: dotted path into metrics}``, ``*``
for every key of a mapping), never named here."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from figures import latest_metrics
from interp.io import read_json

__all__ = ["NOT_RUN", "ResultsRun", "load_run", "headline", "setting_differences", "compare_lines"]

NOT_RUN = "not run"
HEADLINE_CHARS = 220
"""A cell's headline keeps the evidence's clauses while they fit in this many characters."""
IGNORED_SETTINGS = ("study.model", "study.results", "study.device", "study.device_map", "study.revision",
                    "study.eval_batch_size", "figures", "report")
"""Settings that differ between comparable runs: the model itself, where it ran and how results are batched."""


@dataclass(frozen=True)
class ResultsRun:
    """One results directory: its ``pipeline.json`` and each experiment's latest metrics (hypothesis order)."""

    path: Path
    pipeline: dict
    metrics: dict[str, dict]

    @property
    def model(self) -> str:
        return str(self.pipeline.get("config", {}).get("study", {}).get("model", "?"))


def _experiment_modules() -> dict:
    from emalab.pipeline import experiment_modules

    return experiment_modules()


def load_run(path: str | Path) -> ResultsRun:
    """Read a results directory; a directory the study has not written is a one-line error naming the fix."""
    path = Path(path)
    fix = f"run `emalab run --results {path}` first"
    if not path.is_dir():
        raise ValueError(f"{path} is not a results directory; {fix}")
    if not (path / "pipeline.json").is_file():
        raise ValueError(f"{path} has no pipeline.json (not a finished `emalab run`); {fix}")
    metrics = {exp: m for exp in _experiment_modules() if (m := latest_metrics(path, exp))}
    if not metrics:
        raise ValueError(f"{path} holds no experiment's metrics.json; {fix}")
    return ResultsRun(path, read_json(path / "pipeline.json"), metrics)


def headline(evidence: str, limit: int = HEADLINE_CHARS) -> str:
    """The number-bearing part of a claim's evidence: its ``; ``-separated clauses that carry numbers, from
    the first, while they fit in ``limit`` characters; ``…`` marks clauses left out. Clauses are kept whole,
    never rewritten, so every number and its qualifier is the evidence's own."""
    clauses = [c.strip() for c in evidence.split("; ") if c.strip()]
    kept = [c for c in clauses if re.search(r"\d", c)] or clauses[:1]
    out = kept[:1]
    for c in kept[1:]:
        if len("; ".join([*out, c])) > limit:
            break
        out.append(c)
    return "; ".join(out) + ("; …" if len(out) < len(clauses) else "")


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _claims(run: ResultsRun) -> dict[str, dict]:
    from emalab.report import claims_in

    return {c["id"]: c for m in run.metrics.values() for c in claims_in(m)}


def _claim_order(cid: str) -> tuple:
    m = re.fullmatch(r"([A-Za-z]*)(\d+)(.*)", cid)
    return (0, m[1], int(m[2]), m[3]) if m else (1, cid, 0, "")


def _lookup(value, parts: list[str]):
    if not parts:
        return value
    if not isinstance(value, dict):
        return None
    head, rest = parts[0], parts[1:]
    if head == "*":
        found = {k: _lookup(v, rest) for k, v in value.items()}
        return {k: v for k, v in found.items() if v not in (None, [], {})} or None
    return _lookup(value.get(head), rest)


def _fmt(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        if len(value) > 2 and all(isinstance(x, int) for x in value) and list(value) == list(
                range(value[0], value[0] + len(value))):
            return f"{value[0]}–{value[-1]} ({len(value)})"
        return "/".join(_fmt(x) for x in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _facts(run: ResultsRun) -> dict[str, str]:
    """The experiments' declared setup facts, then the run's cost, machine and code commit."""
    from emalab.heartbeat import interrupted_note, peak_rss_note

    out: dict[str, str] = {}
    for exp, module in _experiment_modules().items():
        for label, path in getattr(module, "SETUP_FACTS", {}).items():
            value = _lookup(run.metrics.get(exp), path.split("."))
            if value not in (None, [], {}) and label not in out:
                out[label] = _fmt(value)
    p = run.pipeline
    if p.get("total_s_all_invocations") is not None:
        total, n = p["total_s_all_invocations"], max(len(p.get("invocations", [])), 1)
        note = interrupted_note(p.get("invocations", []))
        out["wall time"] = f"{total / 60:.0f} min ({total:,.0f} s" + (
            f" over {n} invocations{', ' + note if note else ''}; latest {p['timings_s']['total'] / 60:.0f} min)"
            if n > 1 else ")")
    if peak := peak_rss_note(p):
        out["peak RSS"] = peak
    m = p.get("machine") or {}
    if m:
        out["machine"] = ", ".join(str(m[k]) for k in ("machine", "device") if m.get(k)) + (
            f"; training {m['train_dtype']}, measurement {m['eval_dtype']}" if m.get("train_dtype") else "")
    commits = sorted({str(x["commit"]) for x in run.metrics.values() if x.get("commit")})
    if commits:
        out["commit"] = ", ".join(f"`{c}`" for c in commits)
    return out


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _settings(run: ResultsRun) -> dict[str, object]:
    m = run.pipeline.get("machine") or {}
    flat = _flat(run.pipeline.get("config", {}))
    flat |= {f"resolved {k}": m[k] for k in ("train_dtype", "eval_dtype") if k in m}
    return {k: v for k, v in flat.items() if k not in IGNORED_SETTINGS}


def setting_differences(runs: list[ResultsRun], labels: list[str]) -> list[str]:
    """``setting: label value; label value`` for every setting (preset, experiments, overrides, study
    config, resolved dtypes) that is not the same in all runs; the model and where it ran are ignored."""
    settings = [_settings(r) for r in runs]
    keys = list(dict.fromkeys(k for s in settings for k in s))
    out = []
    for k in keys:
        values = [json.dumps(s.get(k, "unset")) for s in settings]
        if len(set(values)) > 1:
            name = k.removeprefix("study.")
            out.append(f"{name} (" + "; ".join(f"{lab} {v}" for lab, v in zip(labels, values)) + ")")
    return out


def _labels(runs: list[ResultsRun]) -> list[str]:
    """Each run's model; runs of the same model are told apart by their directory."""
    seen = Counter(r.model for r in runs)
    return [f"{r.model} ({r.path})" if seen[r.model] > 1 else r.model for r in runs]


def compare_lines(dirs: list[str | Path]) -> list[str]:
    """The ``## Across models`` section: claims × models, then setup × models, then any warning."""
    if len(dirs) < 2:
        raise ValueError("a comparison needs two or more results directories, e.g. "
                         "`emalab compare results results_1.5b`")
    resolved = [Path(d).resolve() for d in dirs]
    if len(set(resolved)) < len(resolved):
        raise ValueError(f"a results directory is named twice in {[str(d) for d in dirs]}; pass each once")
    runs = [load_run(d) for d in dirs]
    labels = _labels(runs)
    claims = [_claims(r) for r in runs]
    ids = sorted({cid for c in claims for cid in c}, key=_claim_order)
    head = "| " + " | ".join(_cell(lab) for lab in labels) + " |"
    rule = "|---|" + "---|" * len(runs)
    lines = ["## Across models", "",
             "Each claim's verdict and headline numbers per model, cut from its evidence (the full evidence is in "
             "each directory's REPORT.md); the setup and the measured cost of each run below.", "",
             "| claim " + head, rule]
    for cid in ids:
        text = next(c[cid]["claim"] for c in claims if cid in c)
        cells = [f"**{c[cid]['status']}** — {headline(c[cid]['evidence'])}" if cid in c else NOT_RUN
                 for c in claims]
        lines.append(f"| {cid}: {_cell(text)} | " + " | ".join(_cell(x) for x in cells) + " |")
    facts = [_facts(r) for r in runs]
    lines += ["", "| setup " + head, rule,
              "| results directory | " + " | ".join(f"`{_cell(r.path)}`" for r in runs) + " |"]
    for label in dict.fromkeys(k for f in facts for k in f):
        lines.append(f"| {_cell(label)} | " + " | ".join(_cell(f.get(label, "–")) for f in facts) + " |")
    lines.append("")
    diffs = setting_differences(runs, labels)
    if diffs:
        lines += ["**Warning: these runs are not comparable as they stand.** Settings differ: " + "; ".join(diffs)
                  + ". A difference in the verdicts may come from the settings, not the model; a setting tuned "
                  "per model must be tuned on the dev split and written down.", ""]
    machines = {json.dumps(r.pipeline.get("machine", {}).get("machine")) for r in runs}
    if len(machines) > 1:
        lines += ["The runs' wall times come from different machines.", ""]
    return lines
