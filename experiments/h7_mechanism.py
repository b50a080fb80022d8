"""H7 — mechanism: how unlearning changes the representation.

Questions: (a) how far does each domain's concept vector drift, per layer, when the target is
unlearned; (b) does each domain's mean activation lose its projection on the base model's refusal
direction; (c) does ablating the refusal direction alone reproduce unlearning's per-domain EMA
pattern?
Hypothesis: unlearning removes refusal mainly along the base refusal direction, so its EMA pattern
follows the pattern that ablating that direction produces.
Prediction: drift and projection loss concentrate in the layers after the refusal direction's
source layer; over the six *untouched* domains, the drop under ablation correlates positively with
the drop under NPO (the target is left out: its drop is what NPO trained for, not EMA; with six
points the permutation p enumerates all 720 orderings).
Falsified (c) if: ρ ≤ 0 between the two untouched-domain drop profiles.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from evals.grouped_stats import grouped_correlation
from evals.suite import DOMAINS
from interp.config import JsonConfig
from interp.runs import run_dir, write_run
from probes.entanglement import drift
from study import Study, StudyConfig, condition, paired_drop
from study.report import ci, table

EXPERIMENT = "h7_mechanism"
ORDER, PRESETS, FIGURES = 7, ("quick", "full"), ("refusal_projection",)
SETUP_FACTS = {"layers": "layers", "refusal direction layer": "refusal_direction.layer"}  # cross-model table


@dataclass
class Config(JsonConfig):
    """H7 settings."""

    study: StudyConfig = field(default_factory=StudyConfig)
    """Shared model, evaluation and training settings."""
    targets: tuple[str, ...] = ("cybersecurity", "safety")
    """Unlearning targets to analyse (first seed's adapter)."""


def _projection(means: dict, direction) -> dict[str, list[float]]:
    out = {}
    for name, m in means.items():
        out[name] = [float(m[layer].double() @ direction.vector_for(layer).double()) for layer in range(m.shape[0])]
    return out


def untouched_correlation(ablation: dict[str, float], npo: dict[str, float], target: str) -> dict:
    """Spearman ρ of the per-domain drops under ablation and under NPO over the domains other than
    ``target`` (exact permutation p)."""
    domains = [d for d in DOMAINS if d != target and d in ablation and d in npo]
    c = grouped_correlation([ablation[d] for d in domains], [npo[d] for d in domains]).to_dict()
    return {"spearman": c["r"], "p_perm_spearman": c["p_perm"], "domains": domains, **c}


def main(cfg: Config) -> dict:
    study = Study(cfg.study)
    _, base = study.evaluate("base")
    direction = study.refusal_direction()
    ablation, ablation_id = study.ablation()
    _, ablated = study.evaluate("ablated", intervention=ablation(), intervention_id=ablation_id)
    ablation_drop = {d: paired_drop(base, ablated, d, "judge") for d in DOMAINS}
    ablation_logit = {d: paired_drop(base, ablated, d, "logit") for d in DOMAINS}
    base_concepts = study.concepts()
    base_proj = _projection(study.domain_means(), direction)
    targets = {}
    for target in cfg.targets:
        cond = condition(study, target, "npo", (), base_records=base)
        adapter = Path(cond["adapters"][0])
        after_concepts = study.concepts(adapter)
        after_proj = _projection(study.domain_means(adapter), direction)
        npo_drop = {d: paired_drop(cond["base"], cond["after"], d, "judge")["drop"] for d in DOMAINS}
        npo_logit = {d: paired_drop(cond["base"], cond["after"], d, "logit")["drop"] for d in DOMAINS}
        targets[target] = {
            "drift": drift(base_concepts, after_concepts),
            "projection_before": base_proj, "projection_after": after_proj,
            "npo_drop": npo_drop,
            "ablation_vs_npo": {
                "judge": untouched_correlation({d: v["drop"] for d, v in ablation_drop.items()}, npo_drop, target),
                "logit": untouched_correlation({d: v["drop"] for d, v in ablation_logit.items()}, npo_logit, target)},
        }
    metrics = {"refusal_direction": {"layer": direction.meta.get("layer"), "position": direction.meta.get("position")},
               "ablation_drop": ablation_drop, "ablation_logit": ablation_logit, "targets": targets,
               "layers": list(range(len(base_proj[DOMAINS[0]])))}
    write_run(run_dir(cfg.study.results, EXPERIMENT, cfg), cfg, metrics)
    return metrics


def report_section(m: dict) -> list[str]:
    """REPORT.md: each domain's drop under refusal-direction ablation, and per target how it ranks
    against NPO's drops and how far the concept vectors moved."""
    rd = m["refusal_direction"]
    lines = ["## Mechanism (figure: refusal_projection)", "",
             f"Refusal direction from layer {rd['layer']}, position {rd['position']}.", "",
             *table("domain", "drop under refusal-direction ablation (judge, CI)", "logit drop")]
    for d, v in m["ablation_drop"].items():
        lines.append(f"| {d} | {v['drop']:.2f} {ci(v['ci'])} | {m['ablation_logit'][d]['drop']:.2f} |")
    lines.append("")
    for target, t in m["targets"].items():
        c = t["ablation_vs_npo"]["judge"]
        drift_min = {d: min(v) for d, v in t["drift"].items()}
        lines.append(f"- **{target}:** per-domain drop under ablation vs under NPO: ρ={c['spearman']:.2f} "
                     f"(p={c['p_perm_spearman']:.3f}); smallest concept-vector cosine before/after: "
                     + ", ".join(f"{d} {v:.2f}" for d, v in drift_min.items()))
    return lines + [""]
