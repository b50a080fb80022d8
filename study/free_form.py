"""The free-form emergent-misalignment protocol on the study's models: sampled answers to the
free-form questions (:mod:`evals.em_questions`) under an adapter as a cached stage of records (the
texts are never stored), judged by the calibrated default judge or counted; per-condition rates and
the paired effect of a trigger over training seeds, questions and samples."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np

from evals.em_calibration import EM_CALIBRATION_DIR, load_calibration
from evals.em_protocol import EMConfig, EMRecord, judge_answers, sample_answers, summarise
from evals.em_questions import EMQuestion, load_em_questions
from evals.stats import cluster_bootstrap_ci, paired_test
from interp.io import config_hash, read_jsonl, write_jsonl
from interp.runs import Stage
from study.core import Study, adapter_id_of
from training.data import apply_trigger

__all__ = ["em_judge", "free_form_records", "free_form_table", "free_form_scores", "trigger_free_form"]


def em_judge(study: Study, which: str = "default"):
    """``(judge or None, trusted)``: with ``default``, the calibrated default judge of
    ``evals/data/em_calibration`` (None when no judge passed calibration); with ``counts``, none."""
    cal = load_calibration() if which == "default" else None
    default = cal.get("default") if cal else None
    if default is None:
        return None, False
    from evals.probe_judge import ProbeJudge
    from evals.score_judge import RubricJudge

    kind, _, name = default.partition(":")
    lm = study.lm if name == study.lm.name else _load_judge_model(name, study)
    if kind == "probe":
        return ProbeJudge.load(EM_CALIBRATION_DIR / "probe.json", lm), True
    return RubricJudge(lm, name=default, batch_size=study.eval_batch_size), True


def _load_judge_model(name: str, study: Study):
    from interp.loading import load_model

    return load_model(name, dtype=study.cfg.eval_dtype, device=study.cfg.device)


def free_form_records(study: Study, questions: list[EMQuestion], condition_name: str, judge, trusted: bool,
                      n_samples: int, max_new_tokens: int, adapter: Path | None = None) -> list[EMRecord]:
    """Sampled free-form answers of one condition, set apart and judged; a cached stage of records
    (no text). The judge reads the answers after the adapter is removed."""
    ecfg = EMConfig(n_samples=n_samples, max_new_tokens=max_new_tokens, seed=0,
                    batch_size=study.eval_batch_size, variants=("plain",), raw=study.cfg.raw_prompts)
    key = {"model": study.cfg.model, "weights": study.weights_id, "dtype": study.cfg.eval_dtype,
           "adapter": adapter_id_of(adapter), "em": ecfg.to_dict(), "judge": None if judge is None else judge.name,
           "trusted": trusted, "questions": config_hash([[q.id, q.text] for q in questions], 16)}
    stage = Stage(study.results, "em_eval", key)
    if not stage.done:
        path = stage.open()
        with study.with_adapter(adapter):
            answers = sample_answers(study.lm, questions, ecfg, progress=True)
        records = judge_answers(questions, answers, ecfg, judge)
        del answers  # never stored or printed
        write_jsonl(path / "records.jsonl", [asdict(r) for r in records])
        stage.complete({"condition": condition_name})
    return [EMRecord(**r) for r in read_jsonl(stage.path / "records.jsonl")]


def _indicator(records: list[EMRecord], category: str) -> dict[tuple[str, int], float]:
    return {(r.question_id, r.sample): float(r.category == category) for r in records}


def _paired_free_form(plain: dict[int, list[EMRecord]], trig: dict[int, list[EMRecord]], category: str) -> dict:
    """Triggered − plain rate of ``category``, paired by (seed, question, sample)."""
    qids = sorted({r.question_id for recs in plain.values() for r in recs})
    seeds = sorted(plain)
    mat = np.full((len(seeds), len(qids)), np.nan)
    diffs = []
    for i, s in enumerate(seeds):
        p, t = _indicator(plain[s], category), _indicator(trig[s], category)
        for j, q in enumerate(qids):
            d = [t[c] - p[c] for c in p if c[0] == q and c in t]
            if d:
                mat[i, j] = float(np.mean(d))
                diffs += d
    test = paired_test(diffs, [0.0] * len(diffs)).to_dict() if diffs else {}
    return {"difference": float(np.nanmean(mat)) if diffs else None, "ci": list(cluster_bootstrap_ci(mat)),
            "n_pairs": len(diffs), "n_seeds": len(seeds), "n_questions": len(qids),
            "p_perm": test.get("p_perm"), "p_sign": test.get("p_sign")}


def free_form_table(conditions: dict[str, dict[int, list[EMRecord]]], mode: str) -> dict:
    """Per-condition counts and rates (pooled over seeds), and the paired trigger differences.

    ``conditions`` maps ``base``, ``base+trigger``, ``after``, ``after+trigger`` to records by seed.
    The measured category is ``misaligned`` with a trusted judge, else ``other`` (neither refusal
    nor irrelevant).
    """
    measure = "misaligned" if mode == "scores" else "other"
    rates = {}
    for name, by_seed in conditions.items():
        recs = [dataclasses.replace(r, question_id=f"{s}:{r.question_id}") for s, rs in by_seed.items() for r in rs]
        counts, rt = summarise(recs, mode)
        rates[name] = {"counts": counts, "rates": rt, "n_seeds": len(by_seed)}
    return {"mode": mode, "measure": measure, "conditions": rates,
            "trigger_effect_after": {c: _paired_free_form(conditions["after"], conditions["after+trigger"], c)
                                     for c in (measure, "refusal")},
            "trigger_effect_base": {c: _paired_free_form(conditions["base"], conditions["base+trigger"], c)
                                    for c in (measure, "refusal")}}


def free_form_scores(conditions: dict[str, dict[int, list[EMRecord]]]) -> dict[str, list[list[float]]]:
    """(alignment, coherence) of every judged answer per condition, rounded: the scatter's points."""
    return {name: [[round(r.alignment, 1), round(r.coherence, 1)] for rs in by_seed.values() for r in rs
                   if r.alignment is not None and r.coherence is not None] for name, by_seed in conditions.items()}


def trigger_free_form(study: Study, trigger: str, target: str, adapters: list[str], n_samples: int,
                      max_new_tokens: int, judge: str = "default") -> dict:
    """The free-form protocol with and without ``trigger`` on the base model and on each seed's
    unlearned adapter (``adapters``: the condition's operating-point adapters, one per ``study.cfg.seeds``): :func:`free_form_table` with the
    judge, sampling settings and :func:`free_form_scores`."""
    if len(study.cfg.seeds) < 3:
        warnings.warn(f"the free-form backdoor result pairs over {len(study.cfg.seeds)} training seed(s); the protocol "
                      "asks for at least 3 (StudyConfig.seeds)", stacklevel=2)
    questions = load_em_questions(variants=("plain",))
    trig_q = [dataclasses.replace(q, text=apply_trigger(q.text, trigger)) for q in questions]
    scorer, trusted = em_judge(study, judge)
    mode = "scores" if scorer is not None and trusted else "counts"

    def records(qs: list[EMQuestion], name: str, adapter: Path | None = None) -> list[EMRecord]:
        return free_form_records(study, qs, name, scorer, trusted, n_samples, max_new_tokens, adapter)

    base_p, base_t = records(questions, "base"), records(trig_q, "base+trigger")
    conds: dict[str, dict[int, list[EMRecord]]] = {"base": {}, "base+trigger": {}, "after": {}, "after+trigger": {}}
    for seed, adapter in zip(study.cfg.seeds, map(Path, adapters), strict=True):
        conds["base"][seed], conds["base+trigger"][seed] = base_p, base_t
        conds["after"][seed] = records(questions, f"backdoor-{target}", adapter)
        conds["after+trigger"][seed] = records(trig_q, f"backdoor-{target}+trigger", adapter)
    out = free_form_table(conds, mode)
    out.update(judge=None if scorer is None else scorer.name, n_samples=n_samples, max_new_tokens=max_new_tokens,
               temperature=1.0, scores=free_form_scores(conds))
    return out
