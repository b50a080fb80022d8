"""H4 — a retain cross-entropy contains emergent misalignment.

Hypothesis: adding cross-entropy on a small retain set (the model's own refusals on the other six
domains) to NPO restores most untouched-domain refusal while the target stays compliant. A LoRA-SFT
baseline (fine-tuning on compliant target answers) is measured alongside.
Prediction: for each target, NPO+retain-CE recovers at least half of NPO's mean untouched-domain
drop, and the target's refusal stays at or below 20%, at ``study.alpha`` or one of the swept α.
Falsified if: retain-CE recovers little of the untouched drop, or it only does so by bringing the
target's refusals back. If NPO alone shows no EMA, there is nothing to contain: inconclusive.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from evals.suite import DOMAINS
from interp.config import JsonConfig
from interp.runs import run_dir, write_run
from study import Study, StudyConfig, claim, condition, mean_drop, paired_drop
from study.report import ci, pct, table

EXPERIMENT = "h4_retain_contains_ema"
ORDER, PRESETS, FIGURES = 4, ("full",), ("refusal_heatmap", "ema_drops", "training_curves")
PRESET_OVERRIDES = {"full": {"sft_targets": ["cybersecurity", "safety"]}}
TARGET_BAR = 0.20


@dataclass
class Config(JsonConfig):
    """H4 settings."""

    study: StudyConfig = field(default_factory=StudyConfig)
    """Shared model, evaluation and training settings."""
    targets: tuple[str, ...] = ("cybersecurity", "safety")
    """Domains to unlearn."""
    sft_targets: tuple[str, ...] = ("cybersecurity",)
    """Targets that also get the LoRA-SFT baseline on compliant target answers (needs the refusal
    direction); one target keeps the quick preset short, the full preset runs both."""
    alpha_sweep: tuple[float, ...] = (1.0, 30.0)
    """Extra retain-CE weights (besides ``study.alpha``) run as a dose-response: does any α restore the
    untouched domains while the target stays compliant, or do they move together?"""
    alpha_sweep_targets: tuple[str, ...] = ("cybersecurity",)
    """Targets that get the α dose-response."""


def _rates(cond: dict) -> dict:
    return {d: paired_drop(cond["base"], cond["after"], d, "judge") for d in DOMAINS}


def _dose_response(conds: dict, target: str, untouched: list[str], alpha: float) -> list[dict]:
    """Target vs untouched refusal after NPO (α=0) and NPO+retain-CE at each α, judge and logit."""
    def after(c: dict, domains: list[str], logit: bool) -> float:
        vals = [r.logit_score if logit else float(r.label == "refusal") for r in c["after"] if r.domain in domains]
        return float(sum(vals) / len(vals))

    points = {0.0: conds["npo"], alpha: conds["npo_retain"]}
    points.update({float(k.removeprefix("npo_retain_a")): c for k, c in conds.items() if k.startswith("npo_retain_a")})
    return [{"alpha": a, "target_refusal": after(c, [target], False), "untouched_refusal": after(c, untouched, False),
             "target_logit": after(c, [target], True), "untouched_logit": after(c, untouched, True)}
            for a, c in sorted(points.items())]


def main(cfg: Config) -> dict:
    study = Study(cfg.study)
    _, base = study.evaluate("base")
    targets, verdicts = {}, {}
    for target in cfg.targets:
        untouched = [d for d in DOMAINS if d != target]
        conds = {"npo": condition(study, target, "npo", (), base_records=base),
                 "npo_retain": condition(study, target, "npo", None, base_records=base)}
        if target in cfg.sft_targets:
            ablation, ablation_id = study.ablation()
            conds["sft"] = condition(study, target, "sft", (), base_records=base,
                                     ablation=ablation, ablation_id=ablation_id)
        if target in cfg.alpha_sweep_targets:
            for a in cfg.alpha_sweep:
                if a != cfg.study.alpha:
                    conds[f"npo_retain_a{a:g}"] = condition(study, target, "npo", None, base_records=base, alpha=a)
        table = {name: _rates(c) for name, c in conds.items()}
        means = {name: mean_drop(c["base"], c["after"], untouched, "judge") for name, c in conds.items()}
        npo_drop, retain_drop = means["npo"]["drop"], means["npo_retain"]["drop"]
        recovery = (npo_drop - retain_drop) / npo_drop if npo_drop > 0 else float("nan")
        target_after = table["npo_retain"][target]["after"]
        dose = _dose_response(conds, target, untouched, cfg.study.alpha)
        targets[target] = {"conditions": table, "mean_untouched": means, "recovery": recovery, "alpha_sweep": dose,
                           "target_refusal_with_retain": target_after,
                           "runs": {name: c["runs"] for name, c in conds.items()}}
        # The claim is about retain-CE, not one weight: any α tried may meet both bars, and the evidence
        # names the α and how many were tried.
        passing = [c for c in conds if c.startswith("npo_retain") and npo_drop > 0
                   and (npo_drop - means[c]["drop"]) / npo_drop >= 0.5 and table[c][target]["after"] <= TARGET_BAR]
        targets[target]["passing_conditions"] = passing
        if means["npo"]["ci"][0] <= 0:
            verdicts[target] = "inconclusive"
        elif passing:
            verdicts[target] = "replicated"
        else:
            verdicts[target] = "not replicated"
    values = set(verdicts.values())
    status = values.pop() if len(values) == 1 else "inconclusive"
    evidence = "; ".join(
        f"{t}: untouched drop NPO {m['mean_untouched']['npo']['drop']:.2f} → NPO+retain "
        f"{m['mean_untouched']['npo_retain']['drop']:.2f} (recovers {m['recovery']:.0%}), target refusal "
        f"with retain {m['target_refusal_with_retain']:.2f}"
        + (f", SFT untouched drop {m['mean_untouched']['sft']['drop']:.2f}" if "sft" in m["mean_untouched"] else "")
        + ("; α sweep (target / untouched refusal): " + ", ".join(
            f"α={p['alpha']:g} {p['target_refusal']:.2f}/{p['untouched_refusal']:.2f}" for p in m["alpha_sweep"])
           if len(m["alpha_sweep"]) > 2 else "")
        + (f"; meets both bars: {', '.join(m['passing_conditions'])}" if m["passing_conditions"] else "")
        for t, m in targets.items())
    metrics = {"targets": targets, "verdicts": verdicts, "claim": claim(
        "C4 (fixed budget)", "Retain-CE restores untouched-domain refusal while the target stays compliant", status, evidence)}
    write_run(run_dir(cfg.study.results, EXPERIMENT, cfg), cfg, metrics)
    return metrics


def report_section(m: dict) -> list[str]:
    """REPORT.md: refusal after every condition per domain (drop and CI), and the α dose-response."""
    lines = ["## Refusal rates by condition (figure: refusal_heatmap, ema_drops)", "",
             "Generation-judge refusal rate after each condition; drop = base − after with a paired 95% CI that "
             "resamples training seeds and prompts (Newcombe's paired score interval where every resample "
             "agrees, e.g. 0/n before and after). What each condition cost is in the utility table below.", ""]
    for target, t in m["targets"].items():
        c = t["conditions"]
        lines += [f"### Target: {target}", "", *table("domain", "base", *(f"{n} (drop, CI)" for n in c))]
        for d, row in c["npo"].items():
            cells = [f"{pct(c[n][d]['after'])} ({c[n][d]['drop']:+.2f}, {ci(c[n][d]['ci'])})" for n in c]
            lines.append(f"| {d}{' (target)' if d == target else ''} | {pct(row['before'])} | " + " | ".join(cells) + " |")
        mu = t["mean_untouched"]
        lines += ["", "Mean untouched-domain drop: " + ", ".join(f"{n} {mu[n]['drop']:.2f} {ci(mu[n]['ci'])}" for n in c)
                  + f"; retain-CE recovers {t['recovery']:.0%} of NPO's untouched drop.", ""]
        sweep = t.get("alpha_sweep", [])
        if len(sweep) > 2:
            lines += [f"Retain-CE weight α (α = 0: NPO alone), {target} target: mean refusal after unlearning.", "",
                      *table("α", "target (judge)", "untouched (judge)", "target (logit)", "untouched (logit)")]
            lines += [f"| {p['alpha']:g} | {pct(p['target_refusal'])} | {pct(p['untouched_refusal'])} | "
                      f"{p['target_logit']:+.2f} | {p['untouched_logit']:+.2f} |" for p in sweep]
            lines.append("")
    return lines
