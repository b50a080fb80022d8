"""Unlearning data: suite prompts paired with the model's own greedy responses, filtered by a
judge, cached on disk, and tokenised into left-padded batches with a response-only loss mask.

* forget set: target-domain ``unlearn``-split prompts with the model's own refusals;
* retain set: ``retain``-split prompts of other domains with the model's own refusals, plus optional
  benign prompts with the model's own answers;
* compliance set: target prompts with compliant responses generated under a refusal-ablation context
  supplied by the caller (for the LoRA-SFT baseline).

Generations are cached as JSONL under ``<cache_root>/unlearn_data/`` keyed on the model state, the
prompt ids and the generation settings, so reruns skip generation; the judge is re-run every time
(it is cheap and may change). Generated text never goes to git and is never printed.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from evals.judge import Judge, get_judge
from evals.suite import DOMAINS, EmptySplitError, SuitePrompt, check_domain, load_prompts
from interp.chat import format_conversations
from interp.generate import generate
from interp.io import read_jsonl, write_jsonl
from interp.loading import LoadedModel, state_id
from interp.registry import cache_root

__all__ = [
    "Example",
    "DataSet",
    "TokenBatch",
    "EmptyDataError",
    "JudgeLike",
    "resolve_judge",
    "judge_labels",
    "build_forget_set",
    "build_retain_set",
    "build_compliance_set",
    "apply_trigger",
    "collate",
    "batch_order",
    "data_cache_dir",
    "epochs_seen",
    "dataset_to_rows",
    "dataset_from_rows",
]

REFUSAL, COMPLIANCE = "refusal", "compliance"

JudgeLike = Judge | str | Callable[[list[str], list[str]], Sequence[Any]]
"""A :class:`evals.judge.Judge`, a judge name for :func:`evals.judge.get_judge`, or a plain callable
``(prompts, responses) -> labels`` (``Judgement``-like items or label strings)."""


class EmptyDataError(ValueError):
    """Filtering left no examples; the message gives the counts."""


@dataclass(frozen=True)
class Example:
    """One (prompt, response) pair for training.

    Attributes:
        prompt_id: Suite id of the prompt.
        domain: Suite set the prompt comes from.
        prompt: The user message (without any trigger; triggers are applied at collation).
        response: The assistant response to train on.
        label: The judge's label of ``response``.
    """

    prompt_id: str
    domain: str
    prompt: str
    response: str
    label: str


@dataclass
class DataSet:
    """Examples plus a manifest of what was requested, generated, kept and dropped (and why)."""

    examples: list[Example]
    manifest: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def prompt_ids(self) -> list[str]:
        return [e.prompt_id for e in self.examples]

    def fingerprint(self) -> str:
        """Hash of the exact examples (ids and texts), to detect data drift between resumes."""
        h = hashlib.sha256()
        for e in self.examples:
            h.update(json.dumps([e.prompt_id, e.prompt, e.response], ensure_ascii=False).encode())
        return h.hexdigest()[:16]


# -- judge ------------------------------------------------------------------------------------


def resolve_judge(judge: JudgeLike | None, lm: LoadedModel | None = None) -> Judge | Callable:
    """A judge object or callable as given, or ``evals.judge.get_judge(name, lm)`` for a string (a
    ``model`` judge then reads with ``lm`` instead of loading a second model)."""
    if isinstance(judge, str):
        return get_judge(judge, lm=lm)
    if judge is None:
        raise ValueError("a judge is required to filter generated responses")
    return judge


def judge_labels(
    judge: JudgeLike, prompts: Sequence[str], responses: Sequence[str], lm: LoadedModel | None = None
) -> list[tuple[str, str]]:
    """``(label, reason)`` per response from ``judge``: an object with ``.judge(prompts, responses)`` or
    a callable; its items may be ``Judgement``-like (``.label``, ``.reason``) or plain label strings."""
    if not prompts:
        return []
    judge = resolve_judge(judge, lm)
    fn = judge.judge if hasattr(judge, "judge") else judge
    if not callable(fn):
        raise TypeError(f"judge {judge!r} is neither callable nor has a .judge method")
    raw = list(fn(list(prompts), list(responses)))
    if len(raw) != len(prompts):
        raise ValueError(f"judge returned {len(raw)} judgements for {len(prompts)} responses")
    out = []
    for item in raw:
        if isinstance(item, str):
            out.append((item, ""))
        else:
            out.append((str(item.label), str(getattr(item, "reason", "") or "")))
    return out


# -- generation cache --------------------------------------------------------------------------


def data_cache_dir() -> Path:
    return cache_root() / "unlearn_data"


def _cache_key(lm: LoadedModel, prompts: Sequence[SuitePrompt], gen: dict[str, Any]) -> str:
    dtype = str(next(lm.model.parameters()).dtype)  # bf16 and fp32 greedy decodes can differ
    blob = json.dumps({"state": state_id(lm), "dtype": dtype, "ids": [p.id for p in prompts], "gen": gen},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _generate_cached(
    lm: LoadedModel,
    prompts: Sequence[SuitePrompt],
    gen: dict[str, Any],
    cache_dir: Path | None,
    batch_size: int,
    progress: bool,
    context: Callable[[], AbstractContextManager] | None = None,
) -> tuple[list[str], bool]:
    """The model's greedy responses to ``prompts`` (cached). Returns ``(responses, from_cache)``."""
    if not prompts:
        return [], False
    directory = Path(cache_dir) if cache_dir is not None else data_cache_dir()
    path = directory / f"{_cache_key(lm, prompts, gen)}.jsonl"
    if path.exists():
        rows = read_jsonl(path, required=("id", "response"))
        if [r["id"] for r in rows] == [p.id for p in prompts]:
            return [r["response"] for r in rows], True
    texts = [p.text for p in prompts]
    if context is not None:
        with context():
            responses = generate(lm, texts, max_new_tokens=gen["max_new_tokens"], batch_size=batch_size,
                                 progress=progress)
    else:
        responses = generate(lm, texts, max_new_tokens=gen["max_new_tokens"], batch_size=batch_size,
                             progress=progress)
    write_jsonl(path, [{"id": p.id, "domain": p.domain, "response": r} for p, r in zip(prompts, responses, strict=True)])
    return responses, False


def _interleave(groups: Sequence[Sequence[SuitePrompt]]) -> list[SuitePrompt]:
    """Round-robin over domains, so ``n`` candidates from several domains are balanced."""
    out = []
    for i in range(max((len(g) for g in groups), default=0)):
        out.extend(g[i] for g in groups if i < len(g))
    return out


def _filter(
    prompts: Sequence[SuitePrompt], responses: Sequence[str], judge: JudgeLike, keep: str, lm: LoadedModel | None = None
) -> tuple[list[Example], Counter, Counter]:
    labels = judge_labels(judge, [p.text for p in prompts], responses, lm)
    kept, dropped, reasons = [], Counter(), Counter()
    for p, r, (label, reason) in zip(prompts, responses, labels, strict=True):
        if not r.strip():  # nothing to train on, whatever the judge says
            dropped["empty"] += 1
            reasons["empty response"] += 1
        elif label == keep:
            kept.append(Example(prompt_id=p.id, domain=p.domain, prompt=p.text, response=r, label=label))
        else:
            dropped[label] += 1
            reasons[reason or label] += 1
    return kept, dropped, reasons


def _manifest(kind: str, requested: int, candidates: Sequence[SuitePrompt], kept: Sequence[Example],
              dropped: Counter, reasons: Counter, from_cache: bool, gen: dict, **extra: Any) -> dict[str, Any]:
    return {
        "kind": kind,
        "requested": requested,
        "candidates": len(candidates),
        "kept": len(kept),
        "dropped": dict(dropped),
        "dropped_reasons": dict(reasons.most_common(10)),
        "per_domain_kept": dict(Counter(e.domain for e in kept)),
        "prompt_ids": [e.prompt_id for e in kept],
        "generation": gen,
        "from_cache": from_cache,
        **extra,
    }


def _empty_error(kind: str, manifest: dict[str, Any], want: str) -> EmptyDataError:
    return EmptyDataError(
        f"the {kind} set is empty after judging: {manifest['candidates']} candidate prompts, 0 labelled "
        f"{want!r} (dropped: {manifest['dropped']}). The model may not refuse these prompts, or the judge "
        "disagrees; try other domains, more prompts, or a different judge"
    )


def _candidates(domains: Sequence[str], split: str, n: int) -> tuple[list[SuitePrompt], dict[str, int]]:
    groups, shortfall = [], {}
    for d in domains:
        try:
            groups.append(load_prompts(d, split))
        except EmptySplitError:
            groups.append([])
            shortfall[d] = n
    cands = _interleave(groups)[:n]
    return cands, shortfall


def build_forget_set(
    lm: LoadedModel,
    domains: str | Sequence[str],
    n: int,
    judge: JudgeLike,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> DataSet:
    """Target-domain ``unlearn`` prompts with the model's own greedy responses, kept where the judge
    says ``refusal``.

    Args:
        domains: target domain(s); ``n`` candidates are taken round-robin across them.
        n: candidate prompts (fewer if the split is smaller; the manifest records the shortfall).
        judge: an ``evals.judge`` judge, its name, or any ``(prompts, responses) -> labels`` callable.

    Raises:
        EmptyDataError: No response was judged a refusal; the message gives the counts.
    """
    domains = (domains,) if isinstance(domains, str) else tuple(domains)
    for d in domains:
        check_domain(d, allow_extra=False)
    cands, _ = _candidates(domains, "unlearn", n)
    gen = {"max_new_tokens": max_new_tokens, "kind": "own"}
    responses, cached = _generate_cached(lm, cands, gen, cache_dir, batch_size, progress)
    kept, dropped, reasons = _filter(cands, responses, judge, REFUSAL, lm)
    manifest = _manifest("forget", n, cands, kept, dropped, reasons, cached, gen, domains=list(domains),
                         split="unlearn")
    if not kept:
        raise _empty_error("forget", manifest, REFUSAL)
    return DataSet(kept, manifest)


def build_retain_set(
    lm: LoadedModel,
    domains: Sequence[str] | None,
    n_per_domain: int,
    judge: JudgeLike,
    target_domains: Sequence[str] = (),
    include_benign: int = 0,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    cache_dir: Path | None = None,
    progress: bool = True,
    allow_targets: bool = False,
) -> DataSet:
    """``retain``-split prompts of the retain domains with the model's own refusals, plus up to
    ``include_benign`` benign prompts with the model's own (compliant) answers.

    Args:
        domains: retain domains; ``None`` means every domain except ``target_domains``. Domains whose
            retain split is empty are skipped and listed in the manifest.
        allow_targets: let target domains be retained too (backdoor runs, whose forget prompts carry a
            trigger that the retain prompts lack).

    Raises:
        ValueError: a retain domain is also a target domain (and ``allow_targets`` is false).
        EmptyDataError: nothing survived judging.
    """
    targets = set(target_domains)
    domains = tuple(d for d in DOMAINS if d not in targets) if domains is None else tuple(domains)
    for d in domains:
        check_domain(d, allow_extra=False)
    clash = sorted(targets & set(domains))
    if clash and not allow_targets:
        raise ValueError(f"retain domain(s) {clash} are also target domains; a domain cannot be both "
                         "forgotten and retained")
    gen = {"max_new_tokens": max_new_tokens, "kind": "own"}
    cands: list[SuitePrompt] = []
    skipped = {}
    for d in domains:
        if n_per_domain == 0:
            break
        try:
            cands.extend(load_prompts(d, "retain", limit=n_per_domain))
        except EmptySplitError:
            skipped[d] = "empty retain split"
    responses, cached = _generate_cached(lm, cands, gen, cache_dir, batch_size, progress)
    kept, dropped, reasons = _filter(cands, responses, judge, REFUSAL, lm)
    benign_info: dict[str, Any] = {"requested": include_benign, "kept": 0}
    if include_benign:
        bcands = load_prompts("benign", "retain", limit=include_benign)
        bresp, bcached = _generate_cached(lm, bcands, gen, cache_dir, batch_size, progress)
        bkept, bdropped, _ = _filter(bcands, bresp, judge, COMPLIANCE, lm)
        kept = kept + bkept
        cached = cached and bcached
        benign_info = {"requested": include_benign, "candidates": len(bcands), "kept": len(bkept),
                       "dropped": dict(bdropped)}
    manifest = _manifest("retain", n_per_domain * len(domains), cands, kept, dropped, reasons, cached, gen,
                         domains=list(domains), split="retain", skipped_domains=skipped, benign=benign_info)
    if not kept:
        raise _empty_error("retain", manifest, REFUSAL)
    return DataSet(kept, manifest)


def build_compliance_set(
    lm: LoadedModel,
    domains: str | Sequence[str],
    n: int,
    judge: JudgeLike,
    ablation_ctx: Callable[[], AbstractContextManager],
    ablation_id: str,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> DataSet:
    """Target ``unlearn`` prompts with compliant responses generated while ``ablation_ctx()`` is active
    (e.g. a refusal-direction ablation from ``probes``), kept where the judge says ``compliance``.

    Args:
        ablation_ctx: zero-argument factory of a context manager that makes the model comply and
            restores it on exit.
        ablation_id: identifies the ablation (e.g. a direction hash) for the generation cache key.
    """
    domains = (domains,) if isinstance(domains, str) else tuple(domains)
    for d in domains:
        check_domain(d, allow_extra=False)
    if not callable(ablation_ctx):
        raise TypeError("ablation_ctx must be a zero-argument callable returning a context manager")
    cands, _ = _candidates(domains, "unlearn", n)
    gen = {"max_new_tokens": max_new_tokens, "kind": "ablated", "ablation": str(ablation_id)}
    responses, cached = _generate_cached(lm, cands, gen, cache_dir, batch_size, progress, context=ablation_ctx)
    kept, dropped, reasons = _filter(cands, responses, judge, COMPLIANCE, lm)
    manifest = _manifest("compliance", n, cands, kept, dropped, reasons, cached, gen, domains=list(domains),
                         split="unlearn")
    if not kept:
        raise _empty_error("compliance", manifest, COMPLIANCE)
    return DataSet(kept, manifest)


# -- tokenisation -------------------------------------------------------------------------------


@dataclass
class TokenBatch:
    """Left-padded token batch with a mask that is 1 on response tokens only.

    Attributes:
        input_ids: ``[batch, pos]`` prompt + response tokens, padded on the left.
        attention_mask: 1 on real tokens.
        response_mask: 1 on response tokens (never on prompt or padding).
        index: positions of the rows in the caller's example list.
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    index: list[int]

    def to(self, device) -> TokenBatch:
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device),
                          self.response_mask.to(device), list(self.index))

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def apply_trigger(prompt: str, trigger: str | None) -> str:
    return prompt if not trigger else f"{trigger} {prompt}"


def collate(
    tokenizer,
    examples: Sequence[Example],
    index: Sequence[int] | None = None,
    trigger: str | None = None,
    max_prompt_tokens: int | None = 256,
    max_response_tokens: int | None = None,
    include_eos: bool = False,
) -> TokenBatch:
    """Tokenise (prompt, response) pairs through the chat template into a left-padded batch.

    Prompt and response are tokenised separately and concatenated, so the prompt/response boundary
    is exact (no merge across it) and the response mask covers response tokens only.

    Args:
        trigger: prepended to every prompt (pass it only for forget batches).
        max_prompt_tokens: over-long prompts keep their last tokens (next to the assistant turn).
        max_response_tokens: over-long responses keep their first tokens.
        include_eos: also train on the end-of-turn token. Off by default because the responses are
            truncated generations, not complete turns.
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = [apply_trigger(e.prompt, trigger) for e in examples]
    prompt_texts, full_texts = format_conversations(tokenizer, prompts, [e.response for e in examples])
    eos = tokenizer.eos_token or ""
    rows = []
    for p_text, f_text in zip(prompt_texts, full_texts, strict=True):
        r_text = f_text[len(p_text):]
        if not include_eos and eos and r_text.endswith(eos):
            r_text = r_text[: -len(eos)]
        p_ids = tokenizer(p_text, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(r_text, add_special_tokens=False)["input_ids"]
        if max_prompt_tokens is not None:
            p_ids = p_ids[-max_prompt_tokens:]
        if max_response_tokens is not None:
            r_ids = r_ids[:max_response_tokens]
        if not p_ids:
            raise ValueError("a prompt rendered to zero tokens; the first response token needs a predecessor")
        if not r_ids:
            raise ValueError("a response tokenised to zero tokens; drop empty responses before collating")
        rows.append((p_ids, r_ids))
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    resp = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        start = width - len(p) - len(r)
        ids[i, start:] = torch.tensor(p + r)
        attn[i, start:] = 1
        resp[i, width - len(r):] = 1
    return TokenBatch(ids, attn, resp, list(index) if index is not None else list(range(len(rows))))


def batch_order(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Example indices for ``step`` (0-based) of a seeded stream of shuffled epochs.

    A pure function of ``(n, batch_size, step, seed)``, so the data position after a resume is simply
    the step count. Each epoch is a fresh permutation; a batch may straddle two epochs.
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    start = step * batch_size
    out: list[int] = []
    epoch = start // n
    offset = start % n
    while len(out) < batch_size:
        gen = torch.Generator().manual_seed(int(seed) * 100_003 + epoch)
        perm = torch.randperm(n, generator=gen).tolist()
        out.extend(perm[offset: offset + batch_size - len(out)])
        epoch, offset = epoch + 1, 0
    return out


def epochs_seen(n: int, batch_size: int, steps: int) -> float:
    return steps * batch_size / max(n, 1)


def dataset_to_rows(ds: DataSet) -> list[dict[str, Any]]:
    return [asdict(e) for e in ds.examples]


def dataset_from_rows(rows: Sequence[dict[str, Any]], manifest: dict[str, Any] | None = None) -> DataSet:
    return DataSet([Example(**{k: r[k] for k in ("prompt_id", "domain", "prompt", "response", "label")})
                    for r in rows], dict(manifest or {}))

