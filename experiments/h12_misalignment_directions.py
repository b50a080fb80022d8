"""H12 — misalignment directions: is the compliance that unlearning installs one shared direction,
and does it transfer between domains?

The *compliance shift* of an NPO adapter (first seed) is, per layer, the mean last-token resid_post
activation of the unlearned minus the base model on the same probe prompts (seven domains, equal
weight; :func:`probes.shift.compliance_shift`). Geometry: cross-layer cosines; cosines with the
refusal direction, the concept vectors, the adapter's shift on benign prompts and the other shifts.
Transfer: at the site where shifts are measured, resid_post[layer] (default: the stream the refusal
direction is read from, resid_pre[L] = resid_post[L − 1]), a shift is *subtracted* (at every
position) inside each unlearned model m, at the norm of m's own shift, so conditions differ only in
direction: m's own shift (ceiling), another source's (transfer), a seeded random direction, and a
structured control: the direction m's adapter moved *benign* prompts (what fine-tuning moves
everywhere). Steering: a raw shift added to the base model at its largest-norm layer (vs random).
Hypothesis: the shift is shared across domains (Mishra & Arulvanan), so another's restores refusal.
Prediction: in each model, subtracting the other source's shift raises the refusal log-odds (seven
domains, paired per prompt) more than both controls (CI above 0 and p < 0.05).
Falsified if: in every model the transfer does no better than one of the controls (mean difference ≤ 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from evals.evaluate import PromptRecord
from evals.stats import paired_test, recovery, significant
from evals.suite import DOMAINS, check_domain
from interp.config import JsonConfig
from interp.io import config_hash
from interp.runs import run_dir, write_run
from probes.interventions import add_activation
from probes.shift import compliance_shift, cross_layer_cosine, random_like, shift_cosines
from study import Study, StudyConfig, adapter_id_of, claim, condition, evaluate_sets, suite_sets

EXPERIMENT = "h12_misalignment_directions"

__all__ = ["Config", "main", "logit_by_id", "matching_layer", "verdict"]


@dataclass
class Config(JsonConfig):
    """H12 settings."""

    study: StudyConfig = field(default_factory=StudyConfig)
    """Shared model, evaluation and training settings."""
    sources: tuple[str, ...] = ("cybersecurity", "safety")
    """NPO targets whose adapters give the shift directions (first seed); transfer runs between every pair."""
    layer: int | None = None
    """resid_post layer where shifts are subtracted; None: the refusal direction's stream (resid_pre[L] = resid_post[L − 1])."""
    random_seed: int = 0
    """Seed of the random control direction."""
    steer: bool = True
    """Also add each raw shift to the base model at its largest-norm layer (vs random of equal norm)."""

    def __post_init__(self) -> None:
        if len(self.sources) < 2 or len(set(self.sources)) != len(self.sources):
            raise ValueError("sources must name at least two distinct domains for a transfer")
        for s in self.sources:
            check_domain(s, allow_extra=False)


def logit_by_id(records: list[PromptRecord], domains=DOMAINS) -> dict[str, tuple[str, float]]:
    return {r.id: (r.domain, float(r.logit_score)) for r in records if r.domain in domains}


def matching_layer(meta: dict) -> int:
    """The resid_post layer that carries the stream a direction was read from (resid_pre[L] = resid_post[L−1])."""
    layer = int(meta["layer"])
    return max(layer - 1, 0) if meta.get("site", "resid_pre") == "resid_pre" else layer


def main(cfg: Config) -> dict:
    study, out_dir = Study(cfg.study), run_dir(cfg.study.results, EXPERIMENT, cfg)
    sets, (_, base_records) = suite_sets(study), study.evaluate("base")
    refusal, concepts, base_means = study.refusal_direction(), study.concepts(), study.domain_means()
    layer = cfg.layer if cfg.layer is not None else matching_layer(refusal.meta)

    def logits(name, adapter=None, vec=None, at=layer, coeff=-1.0):
        ctx = (lambda: add_activation(study.lm, vec, at, coeff=coeff, site="resid_post")) if vec is not None else None
        ident = f"add{coeff:g}x{config_hash(vec.raw(at).double().tolist(), 16)}@resid_post{at}" if vec is not None else None
        return logit_by_id(evaluate_sets(study, name, sets, adapter, ctx, ident, generate=False)[1])

    adapters, shifts, benign, geometry = {}, {}, {}, {}
    for s in cfg.sources:
        cond = condition(study, s, "npo", (), base_records=base_records)
        adapters[s] = Path(cond["runs"][0]) / "adapter"
        after = study.domain_means(adapters[s])
        shifts[s] = compliance_shift({d: base_means[d] for d in DOMAINS}, {d: after[d] for d in DOMAINS},
                                     name=f"shift-{s}", meta={"source": s, "adapter_id": adapter_id_of(adapters[s]),
                                                              "site": "resid_post", "position": "last"})
        shifts[s].save(out_dir / f"shift-{s}.safetensors")
        benign[s] = compliance_shift(base_means["benign"], after["benign"], name=f"benign-shift-{s}")
        cos = shift_cosines(shifts[s], refusal, concepts)
        geometry[s] = {"norms": shifts[s].norms.double().tolist(),
                       "cross_layer_cosine": cross_layer_cosine(shifts[s]).tolist(),
                       "cosine_refusal": cos.pop("refusal"), "cosine_concepts": cos, "run": cond["runs"][0],
                       "cosine_benign_shift": shift_cosines(shifts[s], concepts={"benign": benign[s]})["benign"]}
    between = {f"{a}|{b}": shift_cosines(shifts[a], concepts={b: shifts[b]})[b]
               for i, a in enumerate(cfg.sources) for b in cfg.sources[i + 1:]}
    base_logit, transfer = logits("base"), {}
    for m in cfg.sources:
        unl, norms = logits(f"npo-{m}", adapters[m]), shifts[m].norms  # every vector subtracted in m has m's norms
        ctl = {"random": logits(f"npo-{m}-random", adapters[m], random_like(shifts[m], cfg.random_seed)),
               "benign": logits(f"npo-{m}-benign-shift", adapters[m], replace(benign[m], norms=norms.clone()))}
        rows = transfer[m] = {k: recovery(base_logit, unl, v) for k, v in ctl.items()}
        for s in cfg.sources:
            sub = logits(f"npo-{m}-shift-{s}", adapters[m], replace(shifts[s], norms=norms.clone()))
            rows[s] = recovery(base_logit, unl, sub, controls=ctl if s != m else None)
    steering = _steer(cfg, shifts, logits, base_logit) if cfg.steer else {}
    metrics = {"sources": list(cfg.sources), "layers": shifts[cfg.sources[0]].layers, "refusal_direction": refusal.meta.get("layer"),
               "layer": layer, "site": "resid_post", "geometry": geometry, "between_sources": between,
               "transfer": transfer, "steering": steering, "claim": verdict(transfer, cfg.sources, layer)}
    write_run(out_dir, cfg, metrics)
    return metrics


def _steer(cfg, shifts, logits, base_logit) -> dict:
    out = {}
    for s in cfg.sources:
        at = int(shifts[s].layers[int(shifts[s].norms.double().argmax())])
        add = logits(f"base+shift-{s}@{at}", None, shifts[s], at, 1.0)
        ctl = logits(f"base+random-{s}@{at}", None, random_like(shifts[s], cfg.random_seed), at, 1.0)

        def drop(x):
            return {d: float(np.mean([base_logit[i][1] - x[i][1] for i in x if x[i][0] == d])) for d in DOMAINS}

        out[s] = {"layer": at, "norm": float(shifts[s].norms[shifts[s].layers.index(at)]), "drop": drop(add),
                  "drop_random": drop(ctl), "drop_vs_random": paired_test([ctl[i][1] for i in sorted(add)],
                                                                          [add[i][1] for i in sorted(add)]).to_dict()}
    return out


def verdict(transfer: dict, sources, layer: int | None = None) -> dict:
    """D1 from each cross row's paired comparisons with the controls (:func:`evals.stats.recovery`)."""
    cross = {(m, s): transfer[m][s]["pooled_vs"] for m in sources for s in sources if s != m}
    ev = f"shifts subtracted at resid_post[{layer}]; " + "; ".join(
        f"{s}-shift in the {m} model: +{transfer[m][s]['pooled_returned']['mean_diff']:.2f} refusal log-odds (own "
        f"+{transfer[m][m]['pooled_returned']['mean_diff']:.2f}); " + ", ".join(
            f"vs {k} {v[k]['mean_diff']:+.2f} [{v[k]['ci_low']:.2f}, {v[k]['ci_high']:.2f}]" for k in v)
        for (m, s), v in cross.items())
    if all(significant(t) for v in cross.values() for t in v.values()):
        status = "replicated"
    elif all(any(t["mean_diff"] is not None and t["mean_diff"] <= 0 for t in v.values()) for v in cross.values()):
        status = "not replicated"
    else:
        status = "inconclusive"
    return claim("D1", "The compliance shift of one domain's unlearning transfers: subtracting it restores refusal "
                 "in another domain's unlearned model (vs random and benign-shift directions)", status, ev)
