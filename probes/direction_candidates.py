"""What the refusal direction's candidates are computed from: the selection config, the four prompt
sets drawn from the suite, and the candidates themselves, differences of means (harmful minus
harmless) at every post-instruction position × layer (Arditi et al. 2024).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from evals.suite import DOMAINS, check_domain, check_split, load_prompts
from interp.activations import collect_activations
from interp.adapter import check_site
from interp.chat import post_instruction_length
from interp.config import JsonConfig
from interp.loading import LoadedModel

__all__ = ["RefusalDirectionConfig", "PromptSets", "suite_prompt_sets", "candidate_directions"]


@dataclass
class RefusalDirectionConfig(JsonConfig):
    """How the refusal direction is computed and selected (defaults follow Arditi et al.)."""

    harmful_domains: list[str] = field(default_factory=lambda: list(DOMAINS))
    """Suite domains pooled (round-robin, in the suite's fixed order) as the harmful prompts."""
    harmless_set: str = "benign"
    """Suite set used as the harmless prompts."""
    splits: list[str] = field(default_factory=lambda: ["probe"])
    """Suite splits the prompts are drawn from (validation prompts come first, training after)."""
    n_train: int = 128
    """Harmful prompts for the difference of means (before filtering)."""
    n_train_harmless: int = 128
    """Harmless prompts for the difference of means (before filtering; capped by the set's size)."""
    n_val: int = 16
    """Held-out harmful prompts that score each candidate."""
    n_val_harmless: int = 16
    """Held-out harmless prompts that score each candidate."""
    site: str = "resid_pre"
    """Stream site of the candidates; activation addition is applied at the same site and layer."""
    positions: list[int] | None = None
    """Post-instruction positions to try, as offsets from the end (-1 = last prompt token); None = all."""
    layer_step: int = 1
    """Try every ``layer_step``-th layer (2 halves the CPU time)."""
    candidate_layers: list[int] | None = None
    """Explicit candidate layers (overrides ``layer_step``)."""
    prune_layer_fraction: float = 0.2
    """Exclude candidates from the last fraction of the layers."""
    kl_threshold: float = 0.25
    """Maximum mean KL (nats) of harmless next-token distributions under ablation. Arditi et al. use
    0.1 on ≥1.8B models; on qwen2.5-coder-0.5b-instruct every candidate that bypasses refusal has
    KL 0.13–0.22 (measured), so 0.1 selects nothing there."""
    induce_threshold: float = 0.0
    """Minimum mean refusal score on harmless prompts under activation addition."""
    filter_train: bool = True
    """Keep only training prompts the model already treats as expected (harmful: score > 0, harmless: < 0)."""
    filter_val: bool = True
    """Likewise for the validation prompts (drawn from a pool twice the requested size)."""
    evaluate_pruned: bool = False
    """Also score candidates in the excluded last layers (for plots; costs CPU time)."""
    batch_size: int = 16
    """Prompts per forward pass."""
    max_prompt_tokens: int = 512
    """Longer prompts keep their last tokens."""
    system: str | None = None
    """System prompt (None keeps the chat template's default)."""

    def __post_init__(self) -> None:
        for d in self.harmful_domains:
            check_domain(d, allow_extra=False)
        check_domain(self.harmless_set)
        for s in self.splits:
            check_split(s)
        check_site(self.site)
        for name in ("n_train", "n_train_harmless", "n_val", "n_val_harmless", "layer_step", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.positions is not None and (not self.positions or any(p >= 0 for p in self.positions)):
            raise ValueError(f"positions are negative offsets from the end (-1 = last token), got {self.positions}")
        if not 0.0 <= self.prune_layer_fraction < 1.0:
            raise ValueError(f"prune_layer_fraction must be in [0, 1), got {self.prune_layer_fraction}")
        if self.kl_threshold <= 0:
            raise ValueError(f"kl_threshold must be > 0, got {self.kl_threshold}")


@dataclass
class PromptSets:
    """The four prompt lists of a selection run."""

    harmful_train: list[str]
    harmless_train: list[str]
    harmful_val: list[str]
    harmless_val: list[str]


def _round_robin(lists: Sequence[Sequence[str]]) -> list[str]:
    out = []
    for i in range(max((len(x) for x in lists), default=0)):
        out += [x[i] for x in lists if i < len(x)]
    return out


def suite_prompt_sets(cfg: RefusalDirectionConfig) -> PromptSets:
    """Draw the prompt sets from the suite: validation pools first, then training, disjoint."""
    def texts(domain: str) -> list[str]:
        return [p.text for s in cfg.splits for p in load_prompts(domain, s)]

    harmful = _round_robin([texts(d) for d in cfg.harmful_domains])
    harmless = texts(cfg.harmless_set)
    k, kh = cfg.n_val * (2 if cfg.filter_val else 1), cfg.n_val_harmless * (2 if cfg.filter_val else 1)
    if len(harmful) <= k or len(harmless) <= kh:
        raise ValueError(f"too few prompts ({len(harmful)} harmful, {len(harmless)} harmless) for validation pools "
                         f"of {k} and {kh} plus training prompts; lower n_val / n_val_harmless or add splits")
    return PromptSets(harmful[k:k + cfg.n_train], harmless[kh:kh + cfg.n_train_harmless], harmful[:k], harmless[:kh])


@torch.inference_mode()
def candidate_directions(
    lm: LoadedModel, harmful: Sequence[str], harmless: Sequence[str], layers: Sequence[int],
    cfg: RefusalDirectionConfig, progress: bool = False,
) -> tuple[Float[Tensor, "pos layer d_model"], list[int]]:
    """Differences of means (float64 accumulation) at every post-instruction position × ``layers``.

    Returns:
        ``(vectors, offsets)``: raw vectors and the position offsets (-1 = last) of their rows.
    """
    n_pos = post_instruction_length(lm.tokenizer)
    offsets = list(range(-n_pos, 0))
    kw = dict(layers=layers, site=cfg.site, position="post_instruction", batch_size=cfg.batch_size,
              system=cfg.system, max_prompt_tokens=cfg.max_prompt_tokens, progress=progress)
    mu_h = collect_activations(lm, harmful, **kw).double().mean(0)
    mu_b = collect_activations(lm, harmless, **kw).double().mean(0)
    vecs = mu_h - mu_b
    if cfg.positions is not None:
        bad = [p for p in cfg.positions if p < -n_pos]
        if bad:
            raise ValueError(f"positions {bad} are outside the {n_pos} post-instruction positions (-{n_pos}..-1)")
        rows = [offsets.index(p) for p in cfg.positions]
        vecs, offsets = vecs[rows], list(cfg.positions)
    return vecs.float(), offsets
