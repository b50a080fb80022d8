"""H14 — containment methods compared on the selectivity frontier (beyond retain-CE).

Hypothesis: on a model whose domains share one refusal behaviour, a retain term that constrains the
mechanism (token KL to the base model, the residual stream at chosen layers, the projection on the
base refusal direction) keeps more untouched refusal per unit of target forgetting than retain-CE
on the model's own refusals.
Prediction: at matched target refusal (the primary level), some method's untouched refusal exceeds
retain-CE's with a paired seeds × prompts CI above zero.
Falsified if: no method beats retain-CE (every paired CI spans or is below zero): then retain-CE is
the most selective of those tried, at these budgets and weights. A method that never reaches the
level cannot be compared there and says so. Each retain term's weight, retain-CE's too, is chosen
per target on the dev split (:func:`study.budget.retain_weight`, with a seed the claim's runs do not
use); ``alpha_grid=()`` fixes every weight at ``alpha`` (untuned). The concept-gated adapter
(``gate``: NPO whose LoRA update is scaled per prompt by the target's concept score at ``gate_layer``,
no retain term; the untouched prompts only calibrate the gate) is evaluated unmerged through its gate,
every prompt gated by itself (:func:`training.containment.gated_adapter`); the gate's accuracy on the
target's and the untouched domains' eval prompts (base model) is reported beside the frontier, so a
gate that routes badly is seen as the cause of a poor point.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from evals.suite import DOMAINS
from interp.config import JsonConfig
from interp.runs import run_dir, write_run
from study import Study, StudyConfig, claim
from study.budget import check_alpha_choice, retain_weight
from study.frontier import Condition, curves, matched_difference, selectivity
from study.gate import gate_report, gate_summary
from study.report import difference, frontier_table, gate_line, retain_weight_lines, retain_weights_evidence
from study.trajectory import training_metric, trajectory_runs, trajectory_sets

EXPERIMENT = "h14_containment_frontier"
ORDER, PRESETS, FIGURES = 14, ("full",), ("frontier_containment",)


@dataclass
class Config(JsonConfig):
    """H14 settings."""

    study: StudyConfig = field(default_factory=lambda: StudyConfig(seeds=(0, 1, 2)))
    """Shared model, evaluation and training settings."""
    targets: tuple[str, ...] = ("cybersecurity", "safety")
    """Domains to unlearn: the paper's two targets, each compared on its own untouched domains."""
    methods: tuple[str, ...] = ("ce", "kl", "repr", "direction", "gate")
    """Retain terms compared (``UnlearnConfig.retain_mode``), and ``gate``, the concept-gated adapter;
    ``ce`` is the reference."""
    alpha: float = 10.0
    """Weight of every retain term when ``alpha_grid`` is empty (untuned; the same for all)."""
    alpha_grid: tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0)
    """Candidate weights, one chosen per retain term and target on the dev split; ``()``: use ``alpha``.
    Wide: at α 10 on the 0.5B the KL and repr losses were 0.001-0.05 against a forget term of ~9-14."""
    alpha_seed: int = 100
    """Training seed of the weight-choosing runs; must not be one of the claim's seeds."""
    repr_layers: tuple[int, ...] = (4, 8, 12)
    """Layers the representation term keeps (early to middle, where C5 places the shared component)."""
    gate_layer: int = 4
    """Early layer whose stream the concept gate scores (untuned)."""
    gate_contrast: str = "rest"
    """The gate's concept vector: the target's mean stream minus the other domains' (``rest``) or the
    benign prompts' (``benign``), from the probe split (:meth:`Study.concept_file`)."""
    levels: tuple[float, ...] = (0.25, 0.10)
    """Matched target refusal levels; the last is primary."""
    n_boot: int = 1000
    """Bootstrap resamples."""

    def __post_init__(self) -> None:
        known = ("ce", "kl", "repr", "direction", "gate")
        if unknown := [m for m in self.methods if m not in known]:
            raise ValueError(f"unknown containment method(s) {unknown}; choose from {', '.join(known)}")
        if "ce" not in self.methods:
            raise ValueError("methods must include 'ce': every method is compared with retain-CE")
        self.alpha_grid = check_alpha_choice(self.alpha_grid, self.alpha_seed, self.study.seeds)


def _kwargs(study: Study, cfg: Config, method: str, target: str) -> dict:  # all but the retain weight
    if method == "gate":
        return {"retain_domains": None, "retain_mode": "none", "concept_gate": True, "gate_layer": cfg.gate_layer,
                "gate_vector": study.concept_file(target, cfg.gate_contrast)}
    kw = {"retain_domains": None, "retain_mode": method}
    if method == "repr":
        kw.update(repr_layers=tuple(cfg.repr_layers), repr_distance="cosine")
    if method == "direction":
        kw["retain_direction"] = study.refusal_direction_file()
    return kw


def main(cfg: Config) -> dict:
    study = Study(cfg.study)
    sets = trajectory_sets(study)
    primary, out, wins = cfg.levels[-1], {}, []
    for target in cfg.targets:
        untouched = [d for d in DOMAINS if d != target]
        conds = {"npo": Condition("npo", target, trajectory_runs(study, target, "npo", (), f"npo-{target}", sets))}
        weights = {}
        for m in cfg.methods:
            kw = _kwargs(study, cfg, m, target)
            if m != "gate":
                weights[m] = retain_weight(study, target, cfg.alpha_grid, cfg.alpha_seed, cfg.alpha, **kw)
                kw["alpha"] = weights[m]["used"]
            conds[m] = Condition(f"npo+{m}", target, trajectory_runs(study, target, "npo", name=f"npo_{m}-{target}",
                                                                     sets=sets, **kw))
        table = {n: {**selectivity(c, untouched, cfg.levels, cfg.n_boot), "curves": curves(c, DOMAINS),
                     "grad_cos": training_metric(c.runs, "grad_cos_forget_retain")} for n, c in conds.items()}
        # Every level, so a method that stops short of the primary one is still compared where it got to;
        # only the primary level decides the claim.
        vs_ce_at = {f"{lv:g}": {m: matched_difference(conds[m], conds["ce"], untouched, lv, cfg.n_boot)
                                for m in cfg.methods if m != "ce"} for lv in cfg.levels}
        vs_ce = vs_ce_at[f"{primary:g}"]
        vs_npo = {m: matched_difference(conds[m], conds["npo"], untouched, primary, cfg.n_boot) for m in cfg.methods}
        wins += [(target, m) for m, r in vs_ce.items() if r["ci"] is not None and r["ci"][0] > 0]
        out[target] = {"conditions": table, "vs_ce": vs_ce, "vs_ce_at": vs_ce_at, "vs_npo": vs_npo, "weights": weights}
        if "gate" in conds:
            out[target]["gate"] = gate_summary([gate_report(study, t.run, target) for t in conds["gate"].runs])
    compared = [r for t in out.values() for r in t["vs_ce"].values() if r["ci"] is not None]
    status = "replicated" if wins else ("not replicated" if compared else "inconclusive")
    ev = "; ".join(
        f"{t} {m} vs ce at target refusal {primary:g}: " + (
            f"{r['difference']:+.2f} (CI {r['ci'][0]:+.2f}..{r['ci'][1]:+.2f})" if r["ci"] else r.get("note", "n/a"))
        for t, v in out.items() for m, r in v["vs_ce"].items())
    ev += "".join(f"; secondary, at {lv}: " + ", ".join(f"{t} {m} {difference(r)}" for t, v in out.items()
                                                         for m, r in v["vs_ce_at"][lv].items())
                  for lv in (f"{x:g}" for x in cfg.levels[:-1]))
    choice = {"grid": list(cfg.alpha_grid), "seed": cfg.alpha_seed} if cfg.alpha_grid else None
    ev += "; " + retain_weights_evidence({t: v["weights"] for t, v in out.items()}, choice, cfg.alpha)
    ev += f", {len(cfg.study.seeds)} seeds" + ("" if wins else ", at these budgets")
    metrics = {"targets": out, "levels": list(cfg.levels), "primary_level": primary, "n_seeds": len(cfg.study.seeds),
               "alpha_choice": choice,
               "gate_setting": {"layer": cfg.gate_layer, "contrast": cfg.gate_contrast},
               "conditions": {f"{n}|{t}": c for t, v in out.items() for n, c in v["conditions"].items()},
               "claim": claim("M1", "A mechanism-level retain term is more selective than retain-CE", status, ev)}
    write_run(run_dir(cfg.study.results, EXPERIMENT, cfg), cfg, metrics)
    return metrics


def report_section(m: dict) -> list[str]:
    """REPORT.md's containment section: every method on the frontier, and each against retain-CE."""
    lines = ["## Containment methods at matched target forgetting (H14; figure: frontier_containment)", "",
             *frontier_table(m["conditions"], m["n_seeds"])]
    for t, v in m["targets"].items():
        primary = f"{m['primary_level']:g}"
        for lv, vs in v.get("vs_ce_at", {primary: v["vs_ce"]}).items():
            lines += [f"Against retain-CE ({t}, target refusal {lv}{'' if lv == primary else ', secondary'}, "
                      "untouched refusal difference): " + "; ".join(f"{k} {difference(r)}" for k, r in vs.items()), ""]
        lines += retain_weight_lines(t, v.get("weights"), m.get("alpha_choice"))
        if "gate" in v:
            lines += [gate_line(t, v["gate"], m.get("gate_setting", {})), ""]
    return lines
