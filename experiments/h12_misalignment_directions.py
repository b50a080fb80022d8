"""H12 — misalignment directions: is the compliance that unlearning installs one shared direction,
and does it transfer between domains?

For the NPO-cybersecurity and NPO-safety adapters, the per-layer *compliance shift* is the mean
last-token activation of the unlearned model minus the base model's on the same probe prompts
(seven domains, equal weight; :func:`probes.shift.compliance_shift`). Geometry: its cross-layer
cosine matrix, its cosine with the base refusal direction and the concept vectors, and the cosine
between the two sources' shifts. Transfer: the shift learned from one domain is ablated (projected
out at every layer) inside the model unlearned on the *other* domain, and each domain's logit
refusal score is measured on the eval split; a seeded random direction with the same norms is the
control, and the model's own shift is the ceiling. Steering: the raw shift is added to the base
model at its largest-norm layer (vs a random vector of equal norm) to see whether it removes refusal.
Hypothesis: the compliance shift is shared across domains (Mishra & Arulvanan's misalignment
direction), so cross-ablation restores refusal.
Prediction: in each unlearned model, ablating the other source's shift raises the refusal logit
score over the seven domains more than the random control (paired per-prompt test, CI above 0).
Falsified if: the cross-ablation does no better than random (mean difference ≤ 0) in both models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evals.evaluate import PromptRecord
from evals.stats import paired_test, significant
from evals.suite import DOMAINS, check_domain
from interp.adapter import n_layers
from interp.config import JsonConfig
from interp.runs import run_dir, write_run
from probes.interventions import ablate_direction, add_activation
from probes.shift import compliance_shift, cross_layer_cosine, random_like, shift_cosines
from study import Study, StudyConfig, adapter_id_of, claim, condition, evaluate_sets, suite_sets

EXPERIMENT = "h12_misalignment_directions"
MIN_GAP = 0.25
"""Smallest base − unlearned logit gap (log-odds) for which a recovered *fraction* is reported."""

__all__ = ["Config", "main", "logit_by_id", "transfer_row"]


@dataclass
class Config(JsonConfig):
    """H12 settings."""

    study: StudyConfig = field(default_factory=StudyConfig)
    """Shared model, evaluation and training settings."""
    sources: tuple[str, ...] = ("cybersecurity", "safety")
    """NPO targets whose adapters give the shift directions (first seed); transfer runs between every pair."""
    random_seed: int = 0
    """Seed of the random control direction."""
    steer: bool = True
    """Also add each raw shift to the base model at its largest-norm layer (vs random of equal norm)."""
    generate: bool = False
    """Also judge generations under the transfer ablations (slow); default: logit score only."""

    def __post_init__(self) -> None:
        if len(self.sources) < 2 or len(set(self.sources)) != len(self.sources):
            raise ValueError("sources must name at least two distinct domains for a transfer")
        for s in self.sources:
            check_domain(s, allow_extra=False)


def logit_by_id(records: list[PromptRecord], domains=DOMAINS) -> dict[str, tuple[str, float]]:
    return {r.id: (r.domain, float(r.logit_score)) for r in records if r.domain in domains}


def transfer_row(base: dict, unlearned: dict, ablated: dict, control: dict | None = None) -> dict:
    """Per domain and pooled: refusal-logit returned by an ablation (ablated − unlearned, paired),
    the fraction of the unlearning gap it closes (where the gap exceeds :data:`MIN_GAP`), and the
    paired comparison with a control ablation."""
    out: dict = {"domains": {}}
    for d in DOMAINS:
        ids = sorted(i for i, (dd, _) in unlearned.items() if dd == d and i in ablated and i in base)
        if not ids:
            continue
        b = np.array([base[i][1] for i in ids])
        u = np.array([unlearned[i][1] for i in ids])
        a = np.array([ablated[i][1] for i in ids])
        gap = float((b - u).mean())
        row = {"base": float(b.mean()), "unlearned": float(u.mean()), "ablated": float(a.mean()),
               "returned": paired_test(a, u).to_dict(), "gap": gap,
               "fraction": float((a - u).mean() / gap) if gap > MIN_GAP else None}
        if control is not None:
            c = np.array([control[i][1] for i in ids])
            row["vs_control"] = paired_test(a, c).to_dict()
        out["domains"][d] = row
    ids = sorted(i for i in unlearned if i in ablated and i in base)
    out["pooled_returned"] = paired_test([ablated[i][1] for i in ids], [unlearned[i][1] for i in ids]).to_dict()
    if control is not None:
        out["pooled_vs_control"] = paired_test([ablated[i][1] for i in ids], [control[i][1] for i in ids]).to_dict()
    gap = float(np.mean([base[i][1] - unlearned[i][1] for i in ids]))
    out["pooled_fraction"] = (float(np.mean([ablated[i][1] - unlearned[i][1] for i in ids])) / gap
                              if gap > MIN_GAP else None)
    return out


def main(cfg: Config) -> dict:
    study = Study(cfg.study)
    out_dir = run_dir(cfg.study.results, EXPERIMENT, cfg)
    sets = suite_sets(study)
    _, base_records = study.evaluate("base")
    refusal = study.refusal_direction()
    concepts = study.concepts()
    base_means = study.domain_means()
    width = n_layers(study.lm.model)

    def logits(name, adapter=None, ctx=None, ident=None):
        _, recs = evaluate_sets(study, name, sets, adapter=adapter, intervention=ctx, intervention_id=ident,
                                generate=False)
        return logit_by_id(recs)

    adapters, shifts, randoms, geometry = {}, {}, {}, {}
    for s in cfg.sources:
        cond = condition(study, s, "npo", (), base_records=base_records)
        adapters[s] = Path(cond["runs"][0]) / "adapter"
        after_means = study.domain_means(adapters[s])
        shifts[s] = compliance_shift({d: base_means[d] for d in DOMAINS}, {d: after_means[d] for d in DOMAINS},
                                     name=f"shift-{s}", meta={"source": s, "adapter_id": adapter_id_of(adapters[s]),
                                                              "n_layers": width, "site": "resid_post",
                                                              "position": "last", "split": "probe"})
        shifts[s].save(out_dir / f"shift-{s}.safetensors")
        randoms[s] = random_like(shifts[s], cfg.random_seed, name=f"random{cfg.random_seed}-like-{s}")
        benign_shift = compliance_shift(base_means["benign"], after_means["benign"], name=f"benign-shift-{s}")
        cos = shift_cosines(shifts[s], refusal, concepts)
        geometry[s] = {
            "norms": shifts[s].norms.double().tolist(),
            "cross_layer_cosine": cross_layer_cosine(shifts[s]).tolist(),
            "cosine_refusal": cos.pop("refusal"),
            "cosine_concepts": cos,
            "cosine_benign_shift": [float(shifts[s].vector_for(layer).double() @ benign_shift.vector_for(layer).double())
                                    for layer in shifts[s].layers],
            "run": cond["runs"][0],
        }
    layers = shifts[cfg.sources[0]].layers
    pairs = [(a, b) for i, a in enumerate(cfg.sources) for b in cfg.sources[i + 1:]]
    between = {f"{a}|{b}": [float(shifts[a].vector_for(layer).double() @ shifts[b].vector_for(layer).double())
                            for layer in layers] for a, b in pairs}

    base_logit = logits("base")
    transfer: dict = {}
    for m in cfg.sources:
        unl = logits(f"npo-{m}", adapters[m])
        mid = adapter_id_of(adapters[m])
        rand = logits(f"npo-{m}+ablate-random", adapters[m], lambda r=randoms[m]: ablate_direction(study.lm, r),
                      f"ablate-{randoms[m].name}-{mid}")
        rows = {"random": transfer_row(base_logit, unl, rand)}
        for s in cfg.sources:
            abl = logits(f"npo-{m}+ablate-shift-{s}", adapters[m], lambda d=shifts[s]: ablate_direction(study.lm, d),
                         f"ablate-shift-{s}-{adapter_id_of(adapters[s])}")
            rows[s] = transfer_row(base_logit, unl, abl, control=rand)
        transfer[m] = rows
    base_ablation = {}
    for s in cfg.sources:
        abl = logits(f"base+ablate-shift-{s}", None, lambda d=shifts[s]: ablate_direction(study.lm, d),
                     f"ablate-shift-{s}-{adapter_id_of(adapters[s])}")
        base_ablation[s] = {d: float(np.mean([base_logit[i][1] - abl[i][1] for i in abl if abl[i][0] == d]))
                            for d in DOMAINS}
    steering = {}
    if cfg.steer:
        for s in cfg.sources:
            layer = int(shifts[s].layers[int(shifts[s].norms.double().argmax())])
            add = logits(f"base+add-shift-{s}@{layer}", None,
                         lambda d=shifts[s], L=layer: add_activation(study.lm, d, L, site="resid_post"),
                         f"add-shift-{s}-{adapter_id_of(adapters[s])}@resid_post{layer}")
            ctl = logits(f"base+add-random-{s}@{layer}", None,
                         lambda d=randoms[s], L=layer: add_activation(study.lm, d, L, site="resid_post"),
                         f"add-{randoms[s].name}-{adapter_id_of(adapters[s])}@resid_post{layer}")
            steering[s] = {"layer": layer, "norm": float(shifts[s].norms[shifts[s].layers.index(layer)]),
                           "drop": {d: float(np.mean([base_logit[i][1] - add[i][1] for i in add if add[i][0] == d]))
                                    for d in DOMAINS},
                           "drop_random": {d: float(np.mean([base_logit[i][1] - ctl[i][1] for i in ctl
                                                             if ctl[i][0] == d])) for d in DOMAINS},
                           "drop_vs_random": paired_test([ctl[i][1] for i in sorted(add)],
                                                         [add[i][1] for i in sorted(add)]).to_dict()}
    judged = _judged(study, cfg, sets, adapters, shifts) if cfg.generate else None
    metrics = {"sources": list(cfg.sources), "layers": layers, "refusal_direction": refusal.meta.get("layer"),
               "geometry": geometry, "between_sources": between, "transfer": transfer,
               "base_ablation_drop": base_ablation, "steering": steering, "judged": judged,
               "claim": _verdict(transfer, cfg.sources)}
    write_run(out_dir, cfg, metrics)
    return metrics


def _judged(study, cfg, sets, adapters, shifts) -> dict:
    out = {}
    for m in cfg.sources:
        for s in cfg.sources:
            if s == m:
                continue
            report, _ = evaluate_sets(study, f"npo-{m}+ablate-shift-{s}", sets, adapters[m],
                                      lambda d=shifts[s]: ablate_direction(study.lm, d),
                                      f"ablate-shift-{s}-{adapter_id_of(adapters[s])}", generate=True)
            out[f"{m}|{s}"] = {d: r.refusal_rate for d, r in report.domains.items()}
    return out


def _verdict(transfer: dict, sources) -> dict:
    cross = {(m, s): transfer[m][s]["pooled_vs_control"] for m in sources for s in sources if s != m}
    ev = "; ".join(
        f"{s}-shift ablated in the {m} model: +{transfer[m][s]['pooled_returned']['mean_diff']:.2f} refusal log-odds "
        f"(own shift +{transfer[m][m]['pooled_returned']['mean_diff']:.2f}, random "
        f"+{transfer[m]['random']['pooled_returned']['mean_diff']:.2f}); vs random {d['mean_diff']:+.2f} "
        f"[{d['ci_low']:.2f}, {d['ci_high']:.2f}]" for (m, s), d in cross.items())
    if all(significant(d) for d in cross.values()):
        status = "replicated"
    elif all(d["mean_diff"] is not None and d["mean_diff"] <= 0 for d in cross.values()):
        status = "not replicated"
    else:
        status = "inconclusive"
    return claim("D1", "The compliance shift of one domain's unlearning transfers: ablating it restores refusal "
                 "in another domain's unlearned model (vs random)", status, ev)
