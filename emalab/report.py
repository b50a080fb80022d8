"""REPORT.md, generated from saved results only: setup, the tables behind each figure, and the
claims table (replicated / not replicated / inconclusive, with the numbers)."""

from __future__ import annotations

from pathlib import Path

from figures import latest_metrics
from interp.io import atomic_write_text, git_commit, read_json
from interp.registry import EMBEDDED_MODELS

__all__ = ["write_report", "render_report"]

EXPERIMENTS = ("h1_narrow_unlearning", "h2_ema_spreads", "h3_safety_spreads_further", "h4_retain_contains_ema",
               "h5_geometry_predicts_ema", "h6_prediction_guided_retain", "h7_mechanism", "h8_transfer_matrix",
               "h9_backdoor", "h10_alignment_scores", "h11_mia_prior", "h12_misalignment_directions")


def _pct(x: float | None) -> str:
    return "–" if x is None or x != x else f"{x:.2f}"


def _ci(ci) -> str:
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""


def _setup(results: Path) -> list[str]:
    pipe = results / "pipeline.json"
    lines = ["## Setup", ""]
    if pipe.exists():
        p = read_json(pipe)
        s = p["config"]["study"]
        spec = EMBEDDED_MODELS.get(s["model"])
        lines += [
            f"- **Model:** `{s['model']}`" + (f" ({spec.hf_equivalent}, GGUF sha256 `{spec.sha256[:16]}…`, "
                                               f"from PyPI `{spec.package_prefix}1..{spec.n_parts}=={spec.version}`)"
                                               if spec else ""),
            f"- **dtype:** {s['dtype']}; **seeds:** {s['seeds']}; **NPO:** {s['steps']} steps, lr {s['lr']}, "
            f"β {s['beta']}, batch {s['batch_size']}, {s['n_forget']} forget prompts; retain-CE α {s['alpha']}, "
            f"{s['n_retain_per_domain']} retain prompts per domain",
            f"- **Evaluation:** {s['eval_limit'] or 'all'} eval prompts per domain, greedy {s['max_new_tokens']} "
            f"tokens, `{s['judge']}` judge; concept vectors from {s['probe_limit'] or 'all'} probe prompts per domain",
            f"- **Experiments run:** {', '.join(p['config']['experiments'])}",
            "- **Wall time:** " + ", ".join(f"{k} {v:.0f}s" for k, v in p["timings_s"].items()),
        ]
    suite = Path(__file__).resolve().parents[1] / "interp" / "data" / "suite" / "manifest.json"
    if suite.exists():
        m = read_json(suite)
        counts = m.get("counts", {})
        if counts:
            lines.append("- **Prompt suite:** " + ", ".join(
                f"{d} {sum(v.values()) if isinstance(v, dict) else v}" for d, v in counts.items()) + " (see DATA.md)")
    lines += [f"- **Commit:** `{git_commit()}`", ""]
    return lines


def _claims(results: Path) -> list[str]:
    lines = ["## Claims", "", "| id | claim | status | evidence |", "|---|---|---|---|"]
    found = False
    for exp in EXPERIMENTS:
        m = latest_metrics(results, exp)
        if m and "claim" in m:
            c = m["claim"]
            lines.append(f"| {c['id']} | {c['claim']} | **{c['status']}** | {c['evidence']} |")
            found = True
    if not found:
        lines.append("| – | no experiment results yet | – | – |")
    return lines + [""]


def _h4_table(results: Path) -> list[str]:
    m = latest_metrics(results, "h4_retain_contains_ema")
    if not m:
        return []
    lines = ["## Refusal rates by condition (figure: refusal_heatmap, ema_drops)", "",
             "Generation-judge refusal rate after each condition; drop = base − after with a paired bootstrap 95% CI.",
             ""]
    for target, t in m["targets"].items():
        conds = list(t["conditions"])
        lines += [f"### Target: {target}", "", "| domain | base | " + " | ".join(
            f"{c} (drop, CI)" for c in conds) + " |", "|---|---|" + "---|" * len(conds)]
        for d, row in t["conditions"]["npo"].items():
            cells = [f"{_pct(t['conditions'][c][d]['after'])} ({t['conditions'][c][d]['drop']:+.2f}, "
                     f"{_ci(t['conditions'][c][d]['ci'])})" for c in conds]
            lines.append(f"| {d}{' (target)' if d == target else ''} | {_pct(row['before'])} | " + " | ".join(cells) + " |")
        mu = t["mean_untouched"]
        lines += ["", "Mean untouched-domain drop: " + ", ".join(
            f"{c} {mu[c]['drop']:.2f} {_ci(mu[c]['ci'])}" for c in conds)
            + f"; retain-CE recovers {t['recovery']:.0%} of NPO's untouched drop.", ""]
    return lines


def _h5_table(results: Path) -> list[str]:
    m = latest_metrics(results, "h5_geometry_predicts_ema")
    if not m:
        return []
    lines = ["## Geometry vs EMA (figure: ema_vs_similarity, similarity_layers)", "",
             "| band | layers | ρ (judge drop) | p | 95% CI | ρ (logit drop) | p |", "|---|---|---|---|---|---|---|"]
    for band, b in m["bands"].items():
        j, lg = b["judge"], b["logit"]
        lines.append(f"| {band} | {b['layers'][0]}–{b['layers'][-1]} | {j['spearman']:.2f} | {j['p_perm_spearman']:.3f}"
                     f" | [{j['ci_low']:.2f}, {j['ci_high']:.2f}] | {lg['spearman']:.2f} | {lg['p_perm_spearman']:.3f} |")
    lines += ["", "| target | domain | early sim | middle sim | late sim | drop (judge) | drop (logit) |",
              "|---|---|---|---|---|---|---|"]
    for p in m["points"]:
        s = p["similarity"]
        lines.append(f"| {p['target']} | {p['domain']} | {s['early']:.2f} | {s['middle']:.2f} | {s['late']:.2f} | "
                     f"{p['drop_judge']:.2f} | {p['drop_logit']:.2f} |")
    return lines + [""]


def _h7_table(results: Path) -> list[str]:
    m = latest_metrics(results, "h7_mechanism")
    if not m:
        return []
    rd = m["refusal_direction"]
    lines = ["## Mechanism (figure: refusal_projection)", "",
             f"Refusal direction from layer {rd['layer']}, position {rd['position']}.", "",
             "| domain | drop under refusal-direction ablation (judge, CI) | logit drop |", "|---|---|---|"]
    for d, v in m["ablation_drop"].items():
        lines.append(f"| {d} | {v['drop']:.2f} {_ci(v['ci'])} | {m['ablation_logit'][d]['drop']:.2f} |")
    lines.append("")
    for target, t in m["targets"].items():
        c = t["ablation_vs_npo"]["judge"]
        drift_min = {d: min(v) for d, v in t["drift"].items()}
        lines.append(f"- **{target}:** per-domain drop under ablation vs under NPO: ρ={c['spearman']:.2f} "
                     f"(p={c['p_perm_spearman']:.3f}); smallest concept-vector cosine before/after: "
                     + ", ".join(f"{d} {v:.2f}" for d, v in drift_min.items()))
    return lines + [""]


def _other(results: Path) -> list[str]:
    lines = []
    for exp in ("h3_safety_spreads_further", "h6_prediction_guided_retain", "h8_transfer_matrix"):
        m = latest_metrics(results, exp)
        if not m:
            continue
        if exp == "h3_safety_spreads_further":
            lines += ["## Safety vs cybersecurity spread (H3)", "",
                      f"Common untouched domains: {', '.join(m['common_domains'])}. Mean drop: " + ", ".join(
                          f"{t} {v['drop']:.2f} {_ci(v['ci'])}" for t, v in m["judge"].items())
                      + f"; difference {m['difference']:.2f} {_ci(m['ci'])}"
                      + ("; both runs saturated." if m["saturated"] else "."), ""]
        elif exp == "h6_prediction_guided_retain":
            lines += ["## Prediction-guided retain sets (H6)", "", "| target | strategy | mean untouched drop | "
                      "target drop |", "|---|---|---|---|"]
            for t, v in m["targets"].items():
                for s, r in v["strategies"].items():
                    lines.append(f"| {t} | {s} | {r['mean_untouched_drop']:.2f} | {r['target_drop']:.2f} |")
            lines.append("")
        else:
            c = m["correlation"]["early"]["judge"]
            lines += ["## Transfer matrix (H8)", "", f"Early-band similarity vs off-diagonal drop: ρ={c['spearman']:.2f}"
                      f" (p={c['p_perm_spearman']:.3f}, n={c['n']}).", ""]
    return lines


def render_report(results: str | Path) -> str:
    results = Path(results)
    figs = sorted((results / "figures").glob("*.png")) if (results / "figures").exists() else []
    lines = ["# emalab replication report", "",
             "Generated by `emalab run` from the files under this results directory; every number below is "
             "read from an experiment's `metrics.json`. Rates are refusal rates from greedy generations "
             "labelled by the refusal judge; logit drops are in refusal log-odds.", ""]
    lines += _claims(results) + _setup(results) + _h4_table(results) + _h5_table(results) + _h7_table(results)
    lines += _other(results)
    if figs:
        lines += ["## Figures", ""] + [f"![{f.stem}](figures/{f.name})" for f in figs] + [""]
    return "\n".join(lines)


def write_report(results: str | Path) -> Path:
    results = Path(results)
    return atomic_write_text(results / "REPORT.md", render_report(results))
