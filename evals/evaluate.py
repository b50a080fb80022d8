"""Refusal evaluation over the seven-domain suite: logit score (bootstrap CIs), generation + judge (Wilson CIs).

Two measurements per prompt:

* the **logit refusal score** (``evals.refusal.logit_refusal_scores``): refusal log-odds of the
  first response token, one forward per batch, no generation;
* a **judged generation**: greedy ``max_new_tokens`` continuation labelled ``refusal`` /
  ``compliance`` / ``incoherent`` by a :class:`evals.judge.Judge`.

Rates use every prompt of a domain as the denominator: ``refusal_rate + compliance_rate +
incoherent_rate + rebuttal_rate == 1``, so an incoherent answer neither counts as a refusal nor as
compliance (``rebuttal`` only occurs on prompts whose suite ``expected`` is ``rebut``).

Prompts differ in what an aligned answer is (``SuitePrompt.expected``). Emergent misalignment is
the rise in **harmful compliance**: ``compliance`` on ``refuse`` prompts, over the ``refuse``
prompts (``DomainResult.harmful_compliance_rate``, Wilson interval). ``handle_carefully`` and
``rebut`` prompts, where compliance is not harm, are reported separately (``by_expected``). The
logit score is recorded in two variants (with and without "No" among the refusal tokens) and its
agreement with the judge is reported per domain (``logit_agreement``).
Judged rates carry Wilson intervals; mean logit scores seeded percentile bootstraps. The per-prompt records (id, domain, logit
score, label, judge reason) ride along in :attr:`EvalReport.records` for callers to save under
``results/``; they are not part of the report JSON, and no response text is ever kept or printed.

The result types live in :mod:`evals.report_types` and the per-row statistics in
:mod:`evals.domain_summary`; both are re-exported here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from evals.domain_summary import (
    auroc,
    bootstrap_ci,
    domain_seed,
    logit_agreement,
    summarise_domain,
    wilson_ci,
)
from evals.judge import LABELS, Judge, get_judge, judge_responses
from evals.refusal import logit_refusal_score_variants, score_variants
from evals.report_types import (
    BENIGN,
    GENERATION_MODES,
    OVER_REFUSAL,
    DomainResult,
    EvalConfig,
    EvalReport,
    PromptRecord,
)
from evals.suite import EXTRA_SETS, SuitePrompt, check_expected, load_prompts
from evals.utility import carries_adapter, kl_to_base
from interp.activations import shard_indices
from interp.generate import generate
from interp.loading import LoadedModel, state_id

__all__ = [
    "EvalConfig",
    "DomainResult",
    "PromptRecord",
    "EvalReport",
    "bootstrap_ci",
    "wilson_ci",
    "auroc",
    "logit_agreement",
    "evaluate",
    "evaluate_prompts",
    "OVER_REFUSAL",
    "BENIGN",
    "GENERATION_MODES",
]


Prompt = SuitePrompt | str | tuple[str, str] | tuple[str, str, str]


def _as_triples(domain: str, prompts: Sequence[Prompt]) -> list[tuple[str, str, str]]:
    # Plain strings and pairs carry no expected value: benign / over-refusal rows are "answer",
    # everything else "refuse", the assumption every evaluation made before expected existed.
    default = "answer" if domain in EXTRA_SETS else "refuse"
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, SuitePrompt):
            out.append((p.id, p.text, p.expected))
        elif isinstance(p, str):
            out.append((f"{domain}-{i}", p, default))
        elif len(p) == 3:
            pid, text, exp = p
            out.append((str(pid), str(text), check_expected(str(exp), f"{domain} prompt {pid!r}: ")))
        else:
            pid, text = p
            out.append((str(pid), str(text), default))
    return out


def _process_group() -> tuple[int, int]:
    """``(rank, world_size)`` of an initialised ``torch.distributed`` group, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_in_order(n: int, idx: list[int], local: list[Any], world: int) -> list[Any]:
    """Every rank's ``(indices, values)`` reassembled into input order, on every rank."""
    import torch.distributed as dist

    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, (idx, local))
    out: list[Any] = [None] * n
    for ids, values in parts:
        for i, v in zip(ids, values, strict=True):
            out[i] = v
    return out


def evaluate_prompts(
    lm: LoadedModel,
    prompts_by_domain: Mapping[str, Sequence[Prompt]],
    cfg: EvalConfig | None = None,
    progress: bool = True,
    judge: Judge | None = None,
    distributed: bool | None = None,
) -> EvalReport:
    """Evaluate custom prompt sets (e.g. with a trigger prepended): one row per key.

    Args:
        prompts_by_domain: ``{row name: prompts}``; prompts are :class:`SuitePrompt`, plain strings
            (ids become ``<row>-<i>``), ``(id, text)`` pairs or ``(id, text, expected)`` triples.
            Strings and pairs count as ``expected == "refuse"`` (``"answer"`` in the ``benign`` and
            ``over_refusal`` rows). The key ``over_refusal`` becomes the report's over-refusal row, and
            ``benign`` (with ``cfg.benign``) the benign row, on which the KL to the base model is
            measured when ``lm`` carries an adapter.
        cfg: Generation, judge and bootstrap settings (its ``domains``/``split``/``limit`` are
            ignored here).
        judge: A ready judge; default ``get_judge(cfg.judge, lm)``.
        distributed: Shard the prompts over the processes of the ``torch.distributed`` group
            (default: when one is initialised, e.g. under ``torchrun``). Each rank scores, generates
            and judges its contiguous block (:func:`interp.activations.shard_indices`); the results
            are gathered in input order and every rank returns the same whole-set report (rates and
            intervals computed once, on all prompts). Every rank must call it with the same prompts.

    Returns:
        The report; ``report.records`` holds the per-prompt records.
    """
    cfg = cfg or EvalConfig()
    pairs = {d: _as_triples(d, ps) for d, ps in prompts_by_domain.items()}
    empty = [d for d, ps in pairs.items() if not ps]
    if empty:
        raise ValueError(f"no prompts for {empty}; every row needs at least one prompt")
    flat = [(d, pid, text) for d, ps in pairs.items() for pid, text, _ in ps]
    all_expected = [e for ps in pairs.values() for _, _, e in ps]
    all_texts = [t for _, _, t in flat]
    rank, world = _process_group() if distributed is not False else (0, 1)
    mine = shard_indices(len(all_texts), rank, world) if world > 1 else list(range(len(all_texts)))
    texts = [all_texts[i] for i in mine]
    expected = [all_expected[i] for i in mine]
    timings: dict[str, float] = {"n_prompts": float(len(all_texts))}
    if world > 1:
        timings.update(world_size=float(world), n_prompts_this_rank=float(len(texts)))

    # With generation, the logit score is read from the generation's own prefill (the same forward
    # over the same batches, hence the same numbers): the prompts are not run twice.
    shared_prefill = cfg.generate and cfg.generation == "judge_aware"
    local_scores: list[tuple[float, float]] = []

    def _scores(variants: dict) -> list[tuple[float, float]]:
        return list(zip(variants["standard"].double().tolist(), variants["without_no"].double().tolist(), strict=True))

    t0 = time.perf_counter()
    if texts and not shared_prefill:
        local_scores = _scores(logit_refusal_score_variants(
            lm, texts, batch_size=cfg.batch_size, system=cfg.system, raw=cfg.raw,
            max_prompt_tokens=cfg.max_prompt_tokens, progress=progress, prefix_cache=cfg.prefix_cache))
        timings["logit_s"] = time.perf_counter() - t0
        timings["logit_prompts_per_s"] = len(texts) / max(timings["logit_s"], 1e-9)

    labels: list[str] | None = None
    reasons: list[str] | None = None
    judge_name = None
    local_verdicts: list[tuple[str, str]] = []
    if cfg.generate:
        judge = judge if judge is not None else get_judge(cfg.judge, lm)
        judge_name = judge.name
        if texts:
            t0 = time.perf_counter()
            stop = getattr(judge, "decided", None) if cfg.generation == "judge_aware" else None
            gen_stats: dict[str, Any] = {}
            first: dict[str, Any] | None = {} if shared_prefill else None
            responses = generate(lm, texts, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                                 system=cfg.system, raw=cfg.raw, max_prompt_tokens=cfg.max_prompt_tokens,
                                 progress=progress, stop=stop, prefix_cache=cfg.prefix_cache, stats=gen_stats,
                                 engine="emalab" if cfg.generation == "judge_aware" else "hf", first_logprobs=first)
            timings["generate_s"] = time.perf_counter() - t0
            if first is not None:
                local_scores = _scores(score_variants(lm, first["logprobs"]))
                timings["logit_s"] = 0.0  # read from the generation's prefill
            timings["generated_tokens"] = float(gen_stats.get("generated_tokens", 0))
            t0 = time.perf_counter()
            verdicts = judge_responses(judge, texts, responses, expected)
            timings["judge_s"] = time.perf_counter() - t0
            del responses  # never kept: generated text stays out of reports and logs
            local_verdicts = [(v.label, v.reason) for v in verdicts]
    if world > 1:
        merged = _gather_in_order(len(all_texts), mine,
                                  list(zip(local_scores, local_verdicts or [None] * len(mine), strict=True)), world)
        score_pairs = [m[0] for m in merged]
        all_verdicts = [m[1] for m in merged] if cfg.generate else []
    else:
        score_pairs = local_scores
        all_verdicts = local_verdicts
    scores = np.asarray([a for a, _ in score_pairs], dtype=np.float64)
    scores_nn = np.asarray([b for _, b in score_pairs], dtype=np.float64)
    if not (np.isfinite(scores).all() and np.isfinite(scores_nn).all()):
        raise FloatingPointError("non-finite logit refusal scores; the weights or adapter are broken")
    if cfg.generate:
        labels = [v[0] for v in all_verdicts]
        reasons = [v[1] for v in all_verdicts]
        bad = set(labels) - set(LABELS)
        if bad:
            raise ValueError(f"judge {judge_name!r} returned unknown labels {sorted(bad)}")

    records = [PromptRecord(pid, d, float(s), labels[i] if labels else None, reasons[i] if reasons else None,
                            all_expected[i], float(scores_nn[i]))
               for i, ((d, pid, _), s) in enumerate(zip(flat, scores))]
    results: dict[str, DomainResult] = {}
    for d in pairs:
        idx = [i for i, (dd, _, _) in enumerate(flat) if dd == d]
        results[d] = summarise_domain(d, scores[idx], scores_nn[idx], [labels[i] for i in idx] if labels else None,
                                [all_expected[i] for i in idx], cfg)
    over = results.pop(OVER_REFUSAL, None)
    benign = results.pop(BENIGN, None) if cfg.benign else None
    utility = None
    if cfg.kl_tokens and BENIGN in pairs and carries_adapter(lm):
        t0 = time.perf_counter()
        b_idx = [i for i in mine if flat[i][0] == BENIGN]
        kl_local = kl_to_base(lm, [all_texts[i] for i in b_idx], n_tokens=cfg.kl_tokens, batch_size=cfg.batch_size,
                              system=cfg.system, raw=cfg.raw, max_prompt_tokens=cfg.max_prompt_tokens).tolist() \
            if b_idx else []
        if world > 1:
            gathered = _gather_in_order(len(all_texts), b_idx, kl_local, world)
            kl = np.asarray([v for v in gathered if v is not None], dtype=np.float64)
        else:
            kl = np.asarray(kl_local, dtype=np.float64)
        lo, hi = bootstrap_ci(kl, cfg.n_bootstrap, domain_seed(cfg.seed, "kl_to_base"))
        utility = {"kl_to_base": float(kl.mean()), "kl_ci": [lo, hi], "kl_tokens": cfg.kl_tokens, "n": int(kl.size)}
        timings["kl_s"] = time.perf_counter() - t0
    timings["total_s"] = sum(timings[k] for k in ("logit_s", "generate_s", "judge_s", "kl_s") if k in timings)
    return EvalReport(config=cfg, model=lm.name, state_id=state_id(lm), domains=results, over_refusal=over,
                      timings=timings, judge=judge_name, benign=benign, utility=utility, records=records)


def evaluate(lm: LoadedModel, cfg: EvalConfig | None = None, progress: bool = True,
             judge: Judge | None = None, distributed: bool | None = None) -> EvalReport:
    """Evaluate ``lm`` on ``cfg.split`` of ``cfg.domains`` (plus over-refusal) of the suite.

    Over-refusal is the refusal rate on the ``over_refusal`` set's ``cfg.split`` split. Prompts are
    sharded over an initialised process group (see :func:`evaluate_prompts`).
    """
    cfg = cfg or EvalConfig()
    sets = {d: load_prompts(d, cfg.split, limit=cfg.limit) for d in cfg.domains}
    if cfg.benign:
        sets[BENIGN] = load_prompts(BENIGN, cfg.split, limit=cfg.limit)
    if cfg.over_refusal:
        sets[OVER_REFUSAL] = load_prompts(OVER_REFUSAL, cfg.split, limit=cfg.limit)
    return evaluate_prompts(lm, sets, cfg, progress=progress, judge=judge, distributed=distributed)
