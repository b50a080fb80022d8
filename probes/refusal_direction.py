"""Select the refusal direction of a chat model (Arditi et al. 2024, "Refusal in language models is
mediated by a single direction").

Candidates are differences of means, harmful minus harmless, at each post-instruction position ×
layer. Each candidate is scored on held-out prompts:

* ``bypass_score`` — mean logit refusal score on harmful prompts with the candidate *ablated* at
  every layer (lower is better: ablation stops refusal);
* ``induce_score`` — mean refusal score on harmless prompts with the candidate *added* at its
  source layer (must exceed ``induce_threshold``: adding it induces refusal);
* ``kl`` — KL divergence of harmless next-token distributions under ablation (must stay below
  ``kl_threshold``: ablation leaves harmless behaviour alone);
* candidates in the last ``prune_layer_fraction`` of layers are excluded (too close to the
  unembedding to be a "concept").

The candidate with the lowest ``bypass_score`` among those passing the filters is the direction.
Every candidate's scores are kept and saved.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from evals.refusal import last_token_logprobs, refusal_log_odds
from evals.suite import DOMAINS, check_domain, check_split, load_prompts
from interp.activations import collect_activations
from interp.adapter import check_site, n_layers
from interp.chat import format_prompts, post_instruction_length, refusal_token_ids
from interp.config import JsonConfig
from interp.direction import Direction
from interp.io import atomic_save_safetensors, atomic_write_json, read_json
from interp.loading import LoadedModel, state_id
from probes.interventions import ablate_direction, add_activation

__all__ = [
    "RefusalDirectionConfig",
    "PromptSets",
    "CandidateScore",
    "RefusalDirectionResult",
    "NoValidCandidateError",
    "suite_prompt_sets",
    "candidate_directions",
    "select_refusal_direction",
    "load_selection",
    "format_table",
    "cached_refusal_direction",
]


_SELECTION_ONLY = ("kl_threshold", "induce_threshold")
"""Config fields that only filter stored scores; they are not part of the scoring stage's key."""


class NoValidCandidateError(RuntimeError):
    """No candidate passed the filters; the message shows the closest ones and which filter failed."""


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


@dataclass
class CandidateScore:
    """Scores of one candidate direction (position offset × layer)."""

    position: int
    token: str
    layer: int
    norm: float
    bypass_score: float | None = None
    induce_score: float | None = None
    kl: float | None = None
    status: str = "unscored"
    """``selected``, ``ok`` (passed the filters), or the filters it failed joined by ``+``:
    ``late_layer``, ``kl``, ``no_induce``, ``zero_norm``."""


@dataclass
class RefusalDirectionResult:
    """The selected direction (if any candidate passed) and every candidate's scores."""

    direction: Direction | None
    candidates: list[CandidateScore]
    candidate_vectors: Float[Tensor, "pos layer d_model"]
    """Raw differences of means, rows in the order of ``positions``, columns of ``layers``."""
    positions: list[int]
    layers: list[int]
    baseline: dict
    """Mean refusal scores without intervention on the validation sets, and prompt counts."""
    timings: dict
    config: RefusalDirectionConfig
    provenance: dict = field(default_factory=dict)
    """Model name, state id and layer count the candidates were computed on."""

    @property
    def selected(self) -> CandidateScore | None:
        return next((c for c in self.candidates if c.status == "selected"), None)

    def reselect(self, cfg: RefusalDirectionConfig) -> RefusalDirectionResult:
        """Apply ``cfg``'s thresholds to the stored scores and pick the direction again (cheap: no
        forward passes). Only ``kl_threshold`` and ``induce_threshold`` may differ from the scoring
        config; candidates never scored stay excluded."""
        for c in self.candidates:
            if c.bypass_score is None:
                continue
            reasons = [r for r in c.status.split("+") if r == "late_layer"]
            if c.kl > cfg.kl_threshold:
                reasons.append("kl")
            if c.induce_score < cfg.induce_threshold:
                reasons.append("no_induce")
            c.status = "+".join(reasons) or "ok"
        self.config = replace(self.config, kl_threshold=cfg.kl_threshold, induce_threshold=cfg.induce_threshold)
        ok = [c for c in self.candidates if c.status == "ok"]
        self.direction = None
        if ok:
            best = min(ok, key=lambda c: c.bypass_score)
            best.status = "selected"
            vec = self.candidate_vectors[self.positions.index(best.position), self.layers.index(best.layer)]
            self.direction = Direction.from_vectors(vec, [best.layer], name="refusal", meta={
                "builder": "mean_difference", **self.provenance, "site": self.config.site,
                "position": best.position, "token": best.token, "layer": best.layer,
                "bypass_score": best.bypass_score, "induce_score": best.induce_score, "kl": best.kl,
                "baseline": self.baseline, "config_hash": self.config.hash(),
            })
        return self

    @classmethod
    def load(cls, out: str | Path) -> RefusalDirectionResult:
        """Read a run directory written by :meth:`save`."""
        from safetensors.torch import load_file

        out = Path(out)
        rec = read_json(out / "candidates.json")
        vecs = load_file(out / "candidate_vectors.safetensors")["vectors"]
        direction = Direction.load(out / "direction.safetensors") if (out / "direction.safetensors").exists() else None
        return cls(direction, [CandidateScore(**c) for c in rec["candidates"]], vecs, rec["positions"], rec["layers"],
                   rec["baseline"], rec["timings"], RefusalDirectionConfig.from_dict(rec["config"]),
                   rec.get("provenance", {}))

    def require(self) -> Direction:
        if self.direction is None:
            raise NoValidCandidateError(
                "no candidate passed the filters; closest:\n" + self.table(5)
                + "\nrelax kl_threshold / induce_threshold, or give more prompts")
        return self.direction

    def table(self, top: int = 12) -> str:
        """The best candidates by bypass score (filtered ones included, with the failed filter)."""
        return format_table([asdict(c) for c in self.candidates], self.baseline, top)

    def save(self, out: str | Path) -> Path:
        """Write ``direction.safetensors`` (if selected), ``candidates.json`` and ``candidate_vectors.safetensors``."""
        out = Path(out)
        if self.direction is not None:
            self.direction.save(out / "direction.safetensors")
        else:
            (out / "direction.safetensors").unlink(missing_ok=True)
        atomic_save_safetensors(out / "candidate_vectors.safetensors", {"vectors": self.candidate_vectors},
                                metadata={"positions": str(self.positions), "layers": str(self.layers)})
        atomic_write_json(out / "candidates.json", {
            "config": self.config.to_dict(), "provenance": self.provenance, "baseline": self.baseline,
            "timings": self.timings,
            "positions": self.positions, "layers": self.layers,
            "selected": asdict(self.selected) if self.selected else None,
            "candidates": [asdict(c) for c in self.candidates],
        })
        return out


def format_table(candidates: Sequence[dict], baseline: dict, top: int = 12) -> str:
    """Selection table of candidate records (``asdict(CandidateScore)``), best bypass score first.

    The ``base`` row holds the scores without intervention: a good direction's bypass score is far
    below the harmful baseline and its induce score far above the harmless one.
    """
    scored = sorted((c for c in candidates if c["bypass_score"] is not None), key=lambda c: c["bypass_score"])
    lines = [f"{'pos':>4} {'token':>14} {'layer':>5} {'bypass':>8} {'induce':>8} {'kl':>7}  status",
             f"{'':>4} {'(no intervention)':>20} {baseline['harmful_val']:8.3f} {baseline['harmless_val']:8.3f}"]
    for c in scored[:top]:
        lines.append(f"{c['position']:>4} {c['token']!r:>14} {c['layer']:>5} {c['bypass_score']:8.3f} "
                     f"{c['induce_score']:8.3f} {c['kl']:7.4f}  {c['status']}")
    skipped = len(candidates) - len(scored)
    if skipped:
        lines.append(f"({skipped} candidates not scored: excluded late layers or zero vectors)")
    return "\n".join(lines)


def load_selection(out: str | Path) -> tuple[Direction, dict]:
    """The saved direction and the candidates record of a selection run directory."""
    out = Path(out)
    return Direction.load(out / "direction.safetensors"), read_json(out / "candidates.json")


def _last_logprobs(lm: LoadedModel, prompts: Sequence[str], cfg: RefusalDirectionConfig) -> Float[Tensor, "batch d_vocab"]:
    """Next-token log-probs at the last prompt position (:func:`evals.refusal.last_token_logprobs`),
    checked finite: a candidate that breaks the model must fail loudly, not score."""
    out = last_token_logprobs(lm, prompts, cfg.batch_size, cfg.system, max_prompt_tokens=cfg.max_prompt_tokens)
    if not torch.isfinite(out).all():
        raise FloatingPointError("non-finite logits while scoring refusal-direction candidates")
    return out


def _kl(base: Tensor, new: Tensor) -> float:
    """Mean over prompts of KL(base ‖ new) of next-token distributions, in float64."""
    b, n = base.double(), new.double()
    return float((b.exp() * (b - n)).sum(-1).mean())


def _score(lm: LoadedModel, prompts: Sequence[str], cfg: RefusalDirectionConfig) -> Tensor:
    return refusal_log_odds(_last_logprobs(lm, prompts, cfg), refusal_token_ids(lm.tokenizer))


def _filter(prompts: list[str], scores: Tensor, keep_positive: bool, cap: int) -> list[str]:
    mask = scores > 0 if keep_positive else scores < 0
    return [p for p, m in zip(prompts, mask.tolist(), strict=True) if m][:cap]


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


def select_refusal_direction(
    lm: LoadedModel,
    cfg: RefusalDirectionConfig | None = None,
    prompts: PromptSets | None = None,
    progress: bool = True,
) -> RefusalDirectionResult:
    """Compute the candidates, score them all, and select the refusal direction.

    Args:
        prompts: the four prompt sets; default :func:`suite_prompt_sets` of ``cfg``.

    Returns:
        The result; ``direction`` is ``None`` when no candidate passes (see :meth:`RefusalDirectionResult.require`).
    """
    cfg = cfg or RefusalDirectionConfig()
    prompts = prompts or suite_prompt_sets(cfg)
    model = lm.model
    n = n_layers(model)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    h_train, b_train = list(prompts.harmful_train), list(prompts.harmless_train)
    h_val, b_val = list(prompts.harmful_val), list(prompts.harmless_val)
    if cfg.filter_train:
        h_train = _filter(h_train, _score(lm, h_train, cfg), True, cfg.n_train)
        b_train = _filter(b_train, _score(lm, b_train, cfg), False, cfg.n_train_harmless)
    if cfg.filter_val:
        h_val = _filter(h_val, _score(lm, h_val, cfg), True, cfg.n_val)
        b_val = _filter(b_val, _score(lm, b_val, cfg), False, cfg.n_val_harmless)
    else:
        h_val, b_val = h_val[:cfg.n_val], b_val[:cfg.n_val_harmless]
    for name, got in (("harmful training", h_train), ("harmless training", b_train),
                      ("harmful validation", h_val), ("harmless validation", b_val)):
        if len(got) < 2:
            raise ValueError(f"only {len(got)} {name} prompts left after filtering; the model may not refuse these "
                             "prompts at all — pass --no-filter-train / --no-filter-val or use more prompts")
    timings["filter_s"] = time.perf_counter() - t0

    cut = int(n * (1.0 - cfg.prune_layer_fraction))
    layers = sorted(set(cfg.candidate_layers if cfg.candidate_layers is not None else range(0, n, cfg.layer_step)))
    t1 = time.perf_counter()
    vecs, offsets = candidate_directions(lm, h_train, b_train, layers, cfg, progress)
    timings["candidates_s"] = time.perf_counter() - t1

    template_ids = lm.tokenizer(format_prompts(lm.tokenizer, ["x"], system=cfg.system)[0],
                                add_special_tokens=False)["input_ids"]
    refusal_ids = refusal_token_ids(lm.tokenizer)
    val_prompts = h_val + b_val
    nh = len(h_val)
    base_lp = _last_logprobs(lm, val_prompts, cfg)
    base_scores = refusal_log_odds(base_lp, refusal_ids)
    baseline = {"harmful_val": float(base_scores[:nh].mean()), "harmless_val": float(base_scores[nh:].mean()),
                "n_harmful_train": len(h_train), "n_harmless_train": len(b_train),
                "n_harmful_val": nh, "n_harmless_val": len(b_val)}

    candidates: list[CandidateScore] = []
    t2 = time.perf_counter()
    jobs = [(i, j) for i in range(len(offsets)) for j in range(len(layers))]
    for i, j in tqdm(jobs, desc="refusal candidates", unit="cand", disable=not progress):
        layer, vec = layers[j], vecs[i, j]
        norm = float(vec.double().norm())
        c = CandidateScore(offsets[i], lm.tokenizer.decode([template_ids[offsets[i]]]), layer, norm)
        candidates.append(c)
        reasons = []
        if layer >= cut:
            reasons.append("late_layer")
        if not math.isfinite(norm) or norm < 1e-6:
            c.status = "+".join(reasons + ["zero_norm"])
            continue
        if reasons and not cfg.evaluate_pruned:
            c.status = "+".join(reasons)
            continue
        d = Direction.from_vectors(vec, [layer], name="candidate")
        with ablate_direction(lm, d):
            lp = _last_logprobs(lm, val_prompts, cfg)
        with add_activation(lm, d, layer, 1.0, site=cfg.site):
            induce = refusal_log_odds(_last_logprobs(lm, b_val, cfg), refusal_ids)
        c.bypass_score = float(refusal_log_odds(lp[:nh], refusal_ids).mean())
        c.kl = _kl(base_lp[nh:], lp[nh:])
        c.induce_score = float(induce.mean())
    timings["scoring_s"] = time.perf_counter() - t2
    timings["n_scored"] = sum(c.bypass_score is not None for c in candidates)
    timings["total_s"] = time.perf_counter() - t0
    provenance = {"model": lm.name, "state": state_id(lm), "n_layers": n}
    result = RefusalDirectionResult(None, candidates, vecs, offsets, layers, baseline, timings, cfg, provenance)
    return result.reselect(cfg)


def cached_refusal_direction(
    lm: LoadedModel,
    cfg: RefusalDirectionConfig | None = None,
    results: str | Path = "results",
    force: bool = False,
    progress: bool = True,
) -> tuple[Direction | None, Path]:
    """Score the candidates once per (model state, dtype, scoring config) and reuse the scores.

    The stage lives in ``results/stages/refusal_direction/<hash>/`` (see :class:`interp.runs.Stage`).
    Its key leaves out ``kl_threshold`` and ``induce_threshold``: changing them re-applies the
    filters to the stored scores (:meth:`RefusalDirectionResult.reselect`) without a forward pass.

    Returns:
        ``(direction or None if no candidate passed, stage directory)``.
    """
    from interp.runs import Stage

    cfg = cfg or RefusalDirectionConfig()
    dtype = str(next(lm.model.parameters()).dtype)
    scoring = {k: v for k, v in cfg.to_dict().items() if k not in _SELECTION_ONLY}
    stage = Stage(Path(results), "refusal_direction",
                  {"config": scoring, "model": lm.name, "state": state_id(lm), "dtype": dtype})
    if stage.done and not force:
        result = RefusalDirectionResult.load(stage.path).reselect(cfg)
        result.save(stage.path)
        return result.direction, stage.path
    path = stage.open()
    result = select_refusal_direction(lm, cfg, progress=progress)
    result.save(path)
    stage.complete({"timings": result.timings})
    return result.direction, path
