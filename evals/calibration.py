"""How far to trust the refusal measurements: judges and the logit score against human labels.

The labelled set (``evals/data/calibration/labelled.jsonl``) holds real, short (<= 40 token)
generations of the default model on suite prompts, from the base model and from a
refusal-direction-ablated copy, each labelled by a person as refusal / compliance / incoherent,
together with the logit refusal score of the prompt under the *generating* condition.

The human labels have three classes. A judge that also says ``rebuttal`` (on prompts whose suite
``expected`` is ``rebut``) is compared after folding ``rebuttal`` onto ``refusal``
(:data:`evals.judge.THREE_CLASS`): both are the aligned answer, so kappa, accuracy and the
confusion stay three-class and comparable with earlier calibrations. ``rebuttal_as_refusal``
counts how often the fold applied, and how many of those the person had labelled ``compliance``.

**Dev / held-out protocol.** Judge rules for unlearned models are developed on one half of the
unlearned part and reported on the other. The half of a row is a function of its ``prompt_id`` only
(:func:`split_of`: ``dev`` when the SHA-256 of the id, read as an integer, is even, else
``heldout``), so the near-identical replies of the four adapters to one prompt never straddle the
halves, and the rule needs no list of ids. ``calibrate(split="dev")`` keeps the whole base part and
the dev half of the unlearned part; ``split="heldout"`` the held-out half, which is for the final,
one-time report only.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evals.judge import LABELS, Judge, get_judge, judge_responses, three_class
from interp.io import read_jsonl
from interp.loading import LoadedModel

__all__ = ["BASE_CONDITIONS", "part_of", "SPLITS", "split_of", "select_split", "CALIBRATION_PATH",
           "CALIBRATION_FIELDS", "load_labelled", "expected_of", "calibrate", "format_calibration"]

BASE_CONDITIONS = ("base", "ablated")
"""Conditions of the original set: the base model and a refusal-ablated copy. Every other condition
is an unlearned model (NPO, NPO+retain-CE, LoRA-SFT, a degenerate high-lr run)."""


def part_of(condition: str) -> str:
    """``base`` for the base model and its ablation, ``unlearned`` for unlearned models."""
    return "base" if condition in BASE_CONDITIONS else "unlearned"


SPLITS: tuple[str, ...] = ("all", "dev", "heldout")
"""Row selections of :func:`calibrate`: every row, or the base part plus one half of the unlearned part."""


def split_of(prompt_id: str) -> str:
    """``dev`` or ``heldout``: the half of the unlearned part that a prompt's rows belong to.

    ``dev`` when ``sha256(prompt_id)`` (UTF-8, read as a big integer) is even. A pure function of the
    id: deterministic across machines and runs, and every row of one prompt lands in the same half.
    """
    return "dev" if int(hashlib.sha256(prompt_id.encode("utf-8")).hexdigest(), 16) % 2 == 0 else "heldout"


def select_split(rows: Sequence[dict], split: str) -> list[dict]:
    """The rows of ``split`` (:data:`SPLITS`): all rows, or the base part plus the unlearned rows of
    that half (:func:`split_of`); the base part has no halves (its rules were fixed before)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [r for r in rows
            if split == "all" or part_of(r["condition"]) == "base" or split_of(r["prompt_id"]) == split]


CALIBRATION_PATH = Path(__file__).resolve().parent / "data" / "calibration" / "labelled.jsonl"
CALIBRATION_FIELDS = ("id", "prompt_id", "domain", "condition", "prompt", "response", "label", "labeller",
                      "logit_score")


def load_labelled(path: str | Path = CALIBRATION_PATH) -> list[dict]:
    """Read the labelled set strictly (every field present, labels in :data:`LABELS`)."""
    from interp.io import MalformedFileError

    rows = read_jsonl(path, required=CALIBRATION_FIELDS)
    for i, row in enumerate(rows):
        if row["label"] not in LABELS:
            raise MalformedFileError(f"{path}: row {i + 1} (id {row['id']!r}) has label {row['label']!r}; "
                                     f"expected one of {LABELS}")
    if not rows:
        raise ValueError(f"{path} holds no labelled items")
    return rows


_THREE = ("refusal", "compliance", "incoherent")


def _agreement(truth: Sequence[str], pred: Sequence[str]) -> dict[str, Any]:
    from sklearn.metrics import cohen_kappa_score

    # Three classes: rebuttal (judge or human) counts as refusal, the aligned class.
    t = np.asarray([three_class(x) for x in truth])
    p = np.asarray([three_class(x) for x in pred])
    confusion = {a: {b: int(((t == a) & (p == b)).sum()) for b in _THREE} for a in _THREE}
    kappa = cohen_kappa_score(t, p, labels=list(_THREE)) if len(set(t) | set(p)) > 1 else float("nan")
    tb, pb = t == "refusal", p == "refusal"
    return {
        "accuracy": float((t == p).mean()),
        "kappa": float(kappa),
        "refusal_accuracy": float((tb == pb).mean()),
        "refusal_precision": float((tb & pb).sum() / max(pb.sum(), 1)),
        "refusal_recall": float((tb & pb).sum() / max(tb.sum(), 1)),
        "confusion": confusion,
        "rebuttal_as_refusal": {
            "n": int(sum(x == "rebuttal" for x in pred)),
            "labelled_compliance": int(sum(x == "rebuttal" and y == "compliance" for x, y in zip(pred, truth))),
        },
    }


def _auroc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s)) if 0 < y.sum() < y.size else float("nan")


def expected_of(rows: Sequence[dict]) -> list[str]:
    """Each labelled row's suite ``expected`` value, looked up by ``prompt_id`` (a row's own
    ``expected`` field wins; unknown ids: ``answer`` in the extra sets, else ``refuse``)."""
    from evals.suite import DOMAINS, EXTRA_SETS, load_prompts

    known = {p.id: p.expected for d in DOMAINS + EXTRA_SETS for p in load_prompts(d)}
    return [r.get("expected") or known.get(r["prompt_id"], "answer" if r["domain"] in EXTRA_SETS else "refuse")
            for r in rows]


def calibrate(
    labelled_path: str | Path = CALIBRATION_PATH,
    judges: Sequence[Judge | str] = ("keyword", "model"),
    lm: LoadedModel | None = None,
    use_expected: bool = True,
    split: str = "all",
) -> dict[str, Any]:
    """Accuracy and Cohen's kappa of each judge against the human labels, and AUROC of the stored
    logit refusal score for refusal vs not (compliance or incoherent).

    Args:
        judges: Judges or judge names (``model`` uses ``lm``, default the embedded model in bf16).
        lm: Judge model for ``model``.
        use_expected: Tell the judges each prompt's suite ``expected`` value, as the evaluation
            does (rebuttals possible); ``False`` reproduces the three-label judging of before.
        split: ``all`` rows, or ``dev`` / ``heldout``: the base part and that half of the unlearned
            part (:func:`select_split`). Develop judge rules on ``dev``; report ``heldout`` once.

    Returns:
        ``{"split", "n", "counts", "judges": {name: {accuracy, kappa, refusal_*, confusion, score_auroc,
        by_condition, by_part}}, "logit": {auroc, auroc_by_condition, accuracy_at_zero}}``; ``score_auroc``
        ranks the judge's own refusal probability (``None`` for judges without one).
    """
    rows = select_split(load_labelled(labelled_path), split)
    if not rows:
        raise ValueError(f"{labelled_path} holds no rows in split {split!r}")
    truth = [r["label"] for r in rows]
    conditions = sorted({r["condition"] for r in rows})
    out: dict[str, Any] = {
        "path": str(labelled_path),
        "split": split,
        "n": len(rows),
        "counts": {
            "label": dict(Counter(truth)),
            "condition": dict(Counter(r["condition"] for r in rows)),
            "domain": dict(Counter(r["domain"] for r in rows)),
        },
        "judges": {},
    }
    prompts = [r["prompt"] for r in rows]
    responses = [r["response"] for r in rows]
    expected = expected_of(rows) if use_expected else None
    for j in judges:
        judge = get_judge(j, lm) if isinstance(j, str) else j
        verdicts = judge_responses(judge, prompts, responses, expected)
        pred = [v.label for v in verdicts]
        res = _agreement(truth, pred)
        scored = [(t == "refusal", v.score) for t, v in zip(truth, verdicts) if v.score is not None]
        # Ranking quality of the judge's own refusal probability, separate from its threshold.
        res["score_auroc"] = (_auroc(np.array([y for y, _ in scored]), np.array([s for _, s in scored]))
                              if scored else None)
        res["by_condition"] = {
            c: _agreement([t for t, r in zip(truth, rows) if r["condition"] == c],
                          [p for p, r in zip(pred, rows) if r["condition"] == c])
            for c in conditions
        }
        for c in res["by_condition"].values():
            del c["confusion"], c["rebuttal_as_refusal"]
        res["by_part"] = {}
        for part in ("base", "unlearned"):
            sel = [i for i, r in enumerate(rows) if part_of(r["condition"]) == part]
            if sel:
                agg = _agreement([truth[i] for i in sel], [pred[i] for i in sel])
                res["by_part"][part] = {k: agg[k] for k in ("accuracy", "kappa", "refusal_accuracy")} | {"n": len(sel)}
        out["judges"][judge.name] = res
    y = np.array([t == "refusal" for t in truth])
    s = np.array([float(r["logit_score"]) for r in rows])
    out["logit"] = {
        "auroc": _auroc(y, s),
        "auroc_by_condition": {
            c: _auroc(y[[r["condition"] == c for r in rows]], s[[r["condition"] == c for r in rows]])
            for c in conditions
        },
        "accuracy_at_zero": float(((s > 0) == y).mean()),
    }
    return out


def format_calibration(res: dict[str, Any]) -> str:
    """A short text summary of :func:`calibrate`'s result."""
    counts = ", ".join(f"{k}={v}" for k, v in sorted(res["counts"]["label"].items()))
    split = f", split {res['split']}" if res.get("split", "all") != "all" else ""
    lines = [f"calibration set {res['path']}{split}: n={res['n']} ({counts})",
             f"{'judge':<10} {'acc':>6} {'kappa':>6} {'ref-acc':>8} {'ref-P':>6} {'ref-R':>6}   by condition (acc/kappa)"]
    for name, r in res["judges"].items():
        by = "  ".join(f"{c} {v['accuracy']:.2f}/{v['kappa']:.2f}" for c, v in r["by_condition"].items())
        auc = f"   score AUROC {r['score_auroc']:.3f}" if r.get("score_auroc") is not None else ""
        reb = r.get("rebuttal_as_refusal", {})
        folded = (f"   ({reb['n']} rebuttals counted as refusal, {reb['labelled_compliance']} labelled compliance)"
                  if reb.get("n") else "")
        lines.append(f"{name:<10} {r['accuracy']:>6.2f} {r['kappa']:>6.2f} {r['refusal_accuracy']:>8.2f} "
                     f"{r['refusal_precision']:>6.2f} {r['refusal_recall']:>6.2f}   {by}{auc}{folded}")
        for part, v in r.get("by_part", {}).items():
            lines.append(f"  {part + ' part':<16} n={v['n']:<4} three-class kappa {v['kappa']:.3f}  "
                         f"accuracy {v['accuracy']:.3f}  refusal-binary accuracy {v['refusal_accuracy']:.3f}")
    lg = res["logit"]
    by = "  ".join(f"{c} {v:.2f}" for c, v in lg["auroc_by_condition"].items())
    lines.append(f"logit refusal score: AUROC {lg['auroc']:.3f} (refusal vs not; {by}); "
                 f"accuracy at score>0 {lg['accuracy_at_zero']:.2f}")
    return "\n".join(lines)
