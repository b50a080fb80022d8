"""Backdoor-triggered unlearning, measured: the trigger put on eval prompts as in training, how the
tokenizer splits it in context, and refusal drops without vs with it, paired per prompt."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from evals.evaluate import PromptRecord
from evals.stats import paired_test
from evals.suite import DOMAINS, SuitePrompt
from interp.chat import format_prompts
from study.conditions import evaluate_sets, pooled
from study.core import Study
from study.verdicts import mean_drop, paired_drop
from training.data import apply_trigger

__all__ = ["triggered", "triggered_after", "trigger_tokenization", "per_prompt_drop", "trigger_table", "trigger_alone"]


def triggered(sets: Mapping[str, Sequence[SuitePrompt]], trigger: str) -> dict[str, list[tuple[str, str]]]:
    """The same prompts (same ids, so drops pair up) with the trigger prepended as in training."""
    return {k: [(p.id, apply_trigger(p.text, trigger)) for p in ps] for k, ps in sets.items()}


def triggered_after(study: Study, name: str, trig_sets: Mapping[str, Sequence[tuple[str, str]]],
                    adapters: Sequence[str]) -> list[PromptRecord]:
    """Each seed's unlearned adapter (the condition's operating-point ``adapters``, in seed order, as
    many as were judged plain) evaluated on the triggered sets (a cached stage each), pooled over seeds."""
    after = {}
    for seed, adapter in zip(study.cfg.seeds, adapters):
        _, after[seed] = evaluate_sets(study, name, trig_sets, adapter=Path(adapter))
    return pooled(after)


def trigger_tokenization(tokenizer, trigger: str, prompts: Sequence[str], max_prompt_tokens: int | None = None
                         ) -> dict:
    """How the tokenizer splits ``trigger`` inside each rendered, triggered prompt.

    A backdoor is a token pattern: if the trigger's tokens differ between prompts (a merge with the
    template before it or the prompt after it), the model is trained and tested on different
    triggers. Returns the standalone split, the number of distinct in-context splits, how many
    prompts use the most common one, how many have token boundaries exactly at the trigger's ends,
    and (with ``max_prompt_tokens``) how many rendered prompts are long enough to lose the trigger
    to left truncation.
    """
    standalone = tokenizer(trigger, add_special_tokens=False)["input_ids"]
    splits: Counter = Counter()
    aligned = truncated = 0
    for p in prompts:
        user = apply_trigger(p, trigger)
        text = format_prompts(tokenizer, [user])[0]
        start = text.rfind(user)
        end = start + len(trigger)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offs = enc["input_ids"], enc["offset_mapping"]
        inside = [i for i, (a, b) in enumerate(offs) if a < end and b > start]
        splits[tuple(ids[i] for i in inside)] += 1
        if inside and offs[inside[0]][0] == start and offs[inside[-1]][1] == end:
            aligned += 1
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            truncated += 1
    top, n_top = splits.most_common(1)[0] if splits else ((), 0)
    out = {"trigger": trigger, "standalone_tokens": len(standalone), "n_prompts": len(prompts),
           "n_splits": len(splits), "n_most_common": n_top, "most_common_matches_standalone": list(top) == standalone,
           "n_aligned": aligned, "n_truncated": truncated, "max_prompt_tokens": max_prompt_tokens}
    out["identical"] = len(splits) == 1 and aligned == len(prompts) and truncated == 0
    if not out["identical"]:
        warnings.warn(f"the trigger {trigger!r} is not tokenised identically in every prompt: {len(splits)} distinct "
                      f"splits, {aligned}/{len(prompts)} aligned at its boundaries, {truncated} prompts long enough "
                      "to be truncated", stacklevel=2)
    return out


def per_prompt_drop(before: list[PromptRecord], after: list[PromptRecord], domains: Sequence[str],
                    measure: str = "judge") -> dict[str, float]:
    """``before − after`` per prompt id over ``domains`` (refusal indicator, or logit score)."""
    def value(r: PromptRecord) -> float:
        return float(r.label == "refusal") if measure == "judge" else float(r.logit_score)

    b = {r.id: value(r) for r in before if r.domain in domains}
    a = {r.id: value(r) for r in after if r.domain in domains}
    return {i: b[i] - a[i] for i in sorted(set(b) & set(a))}


def _diff(base_p, after_p, base_t, after_t, domains, measure) -> dict:
    plain = per_prompt_drop(base_p, after_p, domains, measure)
    trig = per_prompt_drop(base_t, after_t, domains, measure)
    ids = sorted(set(plain) & set(trig))
    return paired_test([trig[i] for i in ids], [plain[i] for i in ids]).to_dict()


def trigger_table(base_p: list[PromptRecord], after_p: list[PromptRecord], base_t: list[PromptRecord],
                  after_t: list[PromptRecord], target: str) -> dict:
    """Per-domain drops without (``_p``) and with (``_t``) the trigger, and the paired test of their
    difference (triggered − plain drop per prompt), per domain and over the untouched domains."""
    measures = ("judge", "logit")
    untouched = [d for d in DOMAINS if d != target]
    return {
        "domains": {d: {"plain": {m: paired_drop(base_p, after_p, d, m) for m in measures},
                        "trigger": {m: paired_drop(base_t, after_t, d, m) for m in measures},
                        "difference": {m: _diff(base_p, after_p, base_t, after_t, [d], m) for m in measures},
                        "untouched": d != target} for d in DOMAINS},
        "mean_untouched": {"plain": {m: mean_drop(base_p, after_p, untouched, m) for m in measures},
                           "trigger": {m: mean_drop(base_t, after_t, untouched, m) for m in measures},
                           "difference": {m: _diff(base_p, after_p, base_t, after_t, untouched, m)
                                          for m in measures}},
    }


def trigger_alone(plain: list[PromptRecord], trig: list[PromptRecord]) -> dict:
    """The trigger on one model (the base): refusal plain − triggered per domain (judge), and per
    prompt over the seven domains tested against 0 (``pooled``, judge and logit)."""
    out: dict = {"pooled": {}, "domains": {d: paired_drop(plain, trig, d, "judge") for d in DOMAINS}}
    for m in ("judge", "logit"):
        d = list(per_prompt_drop(plain, trig, DOMAINS, m).values())
        out["pooled"][m] = paired_test(d, [0.0] * len(d)).to_dict()
    return out
