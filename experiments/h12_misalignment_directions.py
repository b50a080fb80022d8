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
from functools import partial
from pathlib import Path

from evals.stats import recovery, significant
from evals.suite import DOMAINS, check_domain
from interp.config import JsonConfig
from interp.runs import run_dir, write_run
from probes.shift import compliance_shift, cross_layer_cosine, random_like, shift_cosines
from study import Study, StudyConfig, adapter_id_of, claim, condition, suite_sets
from study.report import table, test
from study.shifts import matching_layer, shifted_logits, steer_base

EXPERIMENT = "h12_misalignment_directions"
ORDER, PRESETS, FIGURES = 12, (), ("misalignment_directions",)

__all__ = ["Config", "main", "verdict", "report_section"]


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


def main(cfg: Config) -> dict:
    study, out_dir = Study(cfg.study), run_dir(cfg.study.results, EXPERIMENT, cfg)
    sets, (_, base_records) = suite_sets(study), study.evaluate("base")
    refusal, concepts, base_means = study.refusal_direction(), study.concepts(), study.domain_means()
    layer = cfg.layer if cfg.layer is not None else matching_layer(refusal.meta)
    logits = partial(shifted_logits, study, sets, at=layer)  # (name, adapter, vector): subtracted at resid_post[layer]
    adapters, shifts, benign, geometry = {}, {}, {}, {}
    for s in cfg.sources:
        cond = condition(study, s, "npo", (), base_records=base_records)
        adapters[s] = Path(cond["adapters"][0])
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
    steering = steer_base(study, sets, shifts, base_logit, cfg.random_seed) if cfg.steer else {}
    metrics = {"sources": list(cfg.sources), "layers": shifts[cfg.sources[0]].layers, "refusal_direction": refusal.meta.get("layer"),
               "layer": layer, "site": "resid_post", "geometry": geometry, "between_sources": between,
               "transfer": transfer, "steering": steering, "claim": verdict(transfer, cfg.sources, layer)}
    write_run(out_dir, cfg, metrics)
    return metrics


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


def report_section(m: dict) -> list[str]:
    """REPORT.md: each shift's geometry, the transfer table against both controls, and steering."""
    lines = ["## Compliance-shift directions and transfer (H12; figure: misalignment_directions)", "",
             *table("source", "peak-norm layer", "max \\|cos\\| with refusal dir. (layer)", "mean cross-layer cosine")]
    for s, g in m["geometry"].items():
        norms, cos, cl = g["norms"], g["cosine_refusal"], g["cross_layer_cosine"]
        k = max(range(len(cos)), key=lambda i: abs(cos[i]))
        off = [cl[i][j] for i in range(len(cl)) for j in range(len(cl)) if i != j]
        lines.append(f"| {s} | {m['layers'][max(range(len(norms)), key=norms.__getitem__)]} | {cos[k]:+.2f} "
                     f"({m['layers'][k]}) | {sum(off) / max(len(off), 1):.2f} |")
    lines.append("")
    lines += [f"Cosine between the {key.replace('|', ' and ')} shifts per layer: min {min(vals):.2f}, max {max(vals):.2f}."
              for key, vals in m["between_sources"].items()]
    kinds = [*m["sources"], "random", "benign"]
    lines += ["", f"Refusal log-odds returned by subtracting each direction at resid_post[{m.get('layer')}], at the "
              "norm of the model's own shift (subtracted − unlearned, all seven domains; benign = the direction "
              "the adapter moved benign prompts):", "",
              *table("unlearned model", *(f"subtract {k}" for k in kinds), "cross vs random", "cross vs benign")]
    for model, rows in m["transfer"].items():
        cross = [" ; ".join(f"{s}: {test(rows[s]['pooled_vs'][c])}" for s in m["sources"] if s != model)
                 for c in ("random", "benign")]
        lines.append(f"| {model} | " + " | ".join(test(rows[k]["pooled_returned"]) for k in kinds)
                     + f" | {cross[0]} | {cross[1]} |")
    if m.get("steering"):
        lines.append("")
        for s, st in m["steering"].items():
            lines.append(f"- Adding the {s} shift to the base model at layer {st['layer']} (norm {st['norm']:.1f}) "
                         f"lowers the refusal logit by {sum(st['drop'].values()) / len(st['drop']):.2f} on average "
                         f"(random of equal norm: {sum(st['drop_random'].values()) / len(st['drop_random']):.2f}).")
    return lines + [""]
