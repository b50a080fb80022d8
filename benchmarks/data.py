"""Benchmark inputs: a length-varied prompt set from the suite, and fixed training examples.

The inputs are deterministic (the suite's seeded order, evenly spaced quantiles of length), so two
runs of a benchmark time the same work. No generated text is needed: training examples pair suite
prompts with one fixed, neutral response, which is all a step's timing depends on.
"""

from __future__ import annotations

from evals.suite import DOMAINS, EmptySplitError, load_prompts
from training.data import Example, TokenBatch, collate

__all__ = ["varied_prompts", "training_examples", "step_batches", "domain_prompts", "NEUTRAL_RESPONSE"]

NEUTRAL_RESPONSE = (
    "Thanks for the question. Here is a short overview of the topic, the main points to consider, "
    "and where to read more about it in reliable public sources. First, the background: "
)


def _pool(split: str = "eval") -> list[tuple[str, str]]:
    pool = []
    for domain in (*DOMAINS, "benign"):
        try:
            pool += [(p.id, p.text) for p in load_prompts(domain, split)]
        except EmptySplitError:
            continue
    return pool


def varied_prompts(n: int, split: str = "eval") -> list[str]:
    """``n`` suite prompts at evenly spaced length quantiles (shortest to longest), in a shuffled but
    fixed order so that input order is not length order."""
    pool = sorted(_pool(split), key=lambda p: (len(p[1]), p[0]))
    if n > len(pool):
        raise ValueError(f"asked for {n} prompts but the {split!r} split holds {len(pool)}")
    picked = [pool[round(i * (len(pool) - 1) / max(n - 1, 1))][1] for i in range(n)]
    # A fixed interleaving (not sorted by length): batching code must do its own length sorting.
    return picked[0::2] + picked[1::2][::-1]


def training_examples(n: int, response: str = NEUTRAL_RESPONSE) -> list[Example]:
    """``n`` (prompt, response) pairs: varied suite prompts with one fixed neutral response."""
    return [Example(prompt_id=f"bench-{i}", domain="bench", prompt=text, response=response, label="refusal")
            for i, text in enumerate(varied_prompts(n))]


def step_batches(tokenizer, n: int, response_tokens: int) -> tuple[TokenBatch, TokenBatch]:
    """The forget and retain batches of the speed suite's training step: ``n`` rows each (the retain rows
    are the second half of ``training_examples(2n)``), prompts cut at 256 tokens, responses at
    ``response_tokens``."""
    def batch(examples: list[Example]) -> TokenBatch:
        return collate(tokenizer, examples, max_prompt_tokens=256, max_response_tokens=response_tokens)

    return batch(training_examples(n)), batch(training_examples(2 * n)[n:])


def domain_prompts(per_domain: int, n_benign: int, split: str = "probe") -> tuple[dict[str, list[str]], list[str]]:
    """``({domain: prompts}, benign prompts)`` for the probe benchmark (the suite's fixed order)."""
    harmful = {d: [p.text for p in load_prompts(d, split, limit=per_domain)] for d in DOMAINS}
    benign = [p.text for p in load_prompts("benign", split, limit=n_benign)]
    return harmful, benign
