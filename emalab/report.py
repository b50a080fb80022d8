"""REPORT.md, generated from saved results only: setup, the tables behind each figure, and the
claims table (replicated / not replicated / inconclusive, with the numbers)."""

from __future__ import annotations

from pathlib import Path

from figures import latest_metrics
from interp.io import atomic_write_text, git_commit, read_json
from interp.registry import EMBEDDED_MODELS

__all__ = ["write_report", "render_report"]



def _experiments() -> list[str]:
    """Experiment modules, in hypothesis order (h1, h2, …, h13): discovered, never listed here."""
    from emalab.pipeline import available_experiments

    return sorted(available_experiments(), key=lambda n: int(n[1:].split("_")[0]))


def _experiment_sections(results: Path) -> list[str]:
    """Sections written by the experiments themselves: ``report_section(metrics) -> lines``."""
    import importlib

    lines = []
    for exp in _experiments():
        m = latest_metrics(results, exp)
        module = importlib.import_module(f"experiments.{exp}")
        if m and hasattr(module, "report_section"):
            lines += module.report_section(m)
    return lines


def _pct(x: float | None) -> str:
    return "–" if x is None or x != x else f"{x:.2f}"


def _ci(ci) -> str:
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""


def _dtypes(pipe: dict, study: dict) -> str:
    m = pipe.get("machine") or {}
    if "train_dtype" not in m:
        return str(study["dtype"])
    return (f"training {m['train_dtype']} ({study['dtype']}), measurement {m['eval_dtype']}; "
            f"{m.get('device', '?')} on {m.get('machine', '?')}")


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
            f"- **dtype:** {_dtypes(p, s)}; **seeds:** {s['seeds']}; **NPO:** {s['steps']} steps, lr {s['lr']}, "
            f"β {s['beta']}, batch {s['batch_size']}, {s['n_forget']} forget prompts; retain-CE α {s['alpha']}, "
            f"{s['n_retain_per_domain']} retain prompts per domain",
            f"- **Evaluation:** {s['eval_limit'] or 'all'} eval prompts per domain, greedy {s['max_new_tokens']} "
            f"tokens, `{s['judge']}` judge; concept vectors from {s['probe_limit'] or 'all'} probe prompts per domain",
            f"- **Experiments run:** {', '.join(p['config']['experiments'])}",
            "- **Wall time (latest invocation):** " + ", ".join(f"{k} {v:.0f}s" for k, v in p["timings_s"].items())
            + (f"; {len(p['invocations'])} invocations of this config took {p['total_s_all_invocations']:.0f}s in all"
               if len(p.get("invocations", [])) > 1 else "")
            + (f"; peak RSS {p['peak_rss_gb']:.1f} GB" if p.get("peak_rss_gb") else ""),
        ]
    suite = Path(__file__).resolve().parents[1] / "evals" / "data" / "suite" / "manifest.json"
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
    for exp in _experiments():
        m = latest_metrics(results, exp)
        # An experiment states one claim (``claim``) or several (``claims``).
        for c in (m or {}).get("claims", [m["claim"]] if m and "claim" in m else []):
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
             "Generation-judge refusal rate after each condition; drop = base − after with a paired 95% CI that "
             "resamples training seeds and prompts (Newcombe's paired score interval where every resample "
             "agrees, e.g. 0/n before and after). What each condition cost is in the next table.",
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
        sweep = t.get("alpha_sweep", [])
        if len(sweep) > 2:
            lines += [f"Retain-CE weight α (α = 0: NPO alone), {target} target: mean refusal after unlearning.", "",
                      "| α | target (judge) | untouched (judge) | target (logit) | untouched (logit) |",
                      "|---|---|---|---|---|"]
            lines += [f"| {p['alpha']:g} | {_pct(p['target_refusal'])} | {_pct(p['untouched_refusal'])} | "
                      f"{p['target_logit']:+.2f} | {p['untouched_logit']:+.2f} |" for p in sweep]
            lines.append("")
    return lines


def _utility_table(results: Path) -> list[str]:
    """What each evaluated condition cost beside refusal, read from the cached evaluation stages."""
    from evals.suite import DOMAINS

    # An evaluation's condition name says method and target only; the unlearning stage that made its
    # adapter says whether a retain term (and which weight) was on, so rows are named from it.
    runs: dict[str, str] = {}
    for done in (results / "stages" / "unlearn").glob("*/DONE.json"):
        d = read_json(done)
        u = d.get("key", {}).get("unlearn", {})
        if d.get("adapter_id") and u:
            retain = f"+retain-{u['retain_mode']} α={u['alpha']:g}" if u.get("retain_mode", "none") != "none" else ""
            runs[d["adapter_id"]] = (f"{u['method']}{retain}-{'+'.join(u['target_domains'])}"
                                     + (f" (lr {u['lr']:g}, {u['steps']} steps)" if d.get("key", {}).get("ablation")
                                        is None and u.get("method") != "sft" else ""))
    rows: dict[str, list[dict]] = {}
    for done in sorted((results / "stages" / "eval").glob("*/DONE.json")):
        report = done.with_name("report.json")
        if report.exists():
            info = read_json(done)
            name = runs.get(info.get("key", {}).get("adapter"), info.get("condition", "?"))
            rows.setdefault(name, []).append(read_json(report))
    if not rows:
        return []

    def mean(vals):
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None

    lines = ["## What each condition cost (utility axis)", "",
             "Per evaluated condition (mean over its runs): KL(base ‖ model) of the next-token distribution on "
             "benign prompts over the first response tokens (adapters only; 0 for the base model, – for "
             "interventions), refusal on benign prompts and on the over-refusal set, and the seven domains' mean "
             "incoherent rate and harmful compliance (on prompts whose aligned answer is a refusal).", "",
             "| condition | runs | KL to base (nats) | benign refusal | over-refusal | incoherent | harmful compliance |",
             "|---|---|---|---|---|---|---|"]
    for cond, reps in rows.items():
        kls = [r["utility"]["kl_to_base"] for r in reps if r.get("utility")]
        kl = (f"{mean(kls):.4f}" if kls else "0 (base)" if cond == "base" else "–")
        if len(kls) == 1:
            lo, hi = next(r["utility"]["kl_ci"] for r in reps if r.get("utility"))
            kl += f" [{lo:.4f}, {hi:.4f}]"
        benign = mean([(r.get("benign") or {}).get("refusal_rate") for r in reps])
        over = mean([(r.get("over_refusal") or {}).get("refusal_rate") for r in reps])
        incoh = mean([mean([r["domains"][d].get("incoherent_rate") for d in DOMAINS if d in r["domains"]])
                      for r in reps])
        harm = mean([mean([r["domains"][d].get("harmful_compliance_rate") for d in DOMAINS if d in r["domains"]])
                     for r in reps])
        lines.append(f"| {cond} | {len(reps)} | {kl} | {_pct(benign)} | {_pct(over)} | {_pct(incoh)} | {_pct(harm)} |")
    return lines + [""]


def _h5_table(results: Path) -> list[str]:
    m = latest_metrics(results, "h5_geometry_predicts_ema")
    if not m:
        return []
    primary = m.get("primary", "logit")
    lines = ["## Geometry vs EMA (figure: ema_vs_similarity, similarity_layers)", "",
             f"Permutations within target; partial ρ controls each untouched domain's base refusal; primary "
             f"measure: {primary} drop.", "",
             "| band | layers | reliability | ρ (judge drop) | p | ρ (logit drop) | p | partial ρ (primary) | 95% CI | p |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for band, b in m["bands"].items():
        j, lg, pr = b["judge"], b["logit"], b.get(primary, {})
        ci = pr.get("partial_ci") or [None, None]
        lines.append(f"| {band} | {b['layers'][0]}–{b['layers'][-1]} | {_num(b.get('reliability'))} | "
                     f"{_num(j['spearman'])} | {_num(j['p_perm_spearman'], '.3f')} | {_num(lg['spearman'])} | "
                     f"{_num(lg['p_perm_spearman'], '.3f')} | {_num(pr.get('partial'))} | "
                     f"[{_num(ci[0])}, {_num(ci[1])}] | {_num(pr.get('p_perm_partial'), '.3f')} |")
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


def _num(x, fmt: str = ".2f") -> str:
    return "–" if x is None or x != x else format(x, fmt)


def _test(t: dict | None, fmt: str = ".2f") -> str:
    """A paired test as ``mean [lo, hi] (p=…)``."""
    if not t or t.get("mean_diff") is None:
        return "–"
    return f"{t['mean_diff']:+{fmt}} [{_num(t['ci_low'], fmt)}, {_num(t['ci_high'], fmt)}] (p={_num(t['p_perm'], '.3f')})"


def _free_form(ff: dict | None) -> list[str]:
    """H9's free-form protocol block: rates per condition and the paired trigger effects."""
    if not ff:
        return []
    what = ("misaligned rate (judge " + str(ff["judge"]) + ", calibrated)" if ff["mode"] == "scores" else
            "rate of answers neither refusal nor irrelevant ('other'; no judge passed calibration, so counts only)")
    lines = [f"Free-form protocol ({ff['n_samples']} samples per question at temperature {ff['temperature']}, "
             f"cap {ff['max_new_tokens']} tokens; figure: em_rates): {what}.", "",
             "| condition | refusal | irrelevant | " + ff["measure"] + " (Wilson CI) | n |", "|---|---|---|---|---|"]
    for name, c in ff["conditions"].items():
        r = c["rates"][ff["measure"]]
        lines.append(f"| {name} | {c['counts']['refusal']} | {c['counts']['irrelevant']} | "
                     f"{_num(r['rate'])} {_ci(r['wilson'])} | {r['n']} |")
    for who in ("after", "base"):
        e = ff[f"trigger_effect_{who}"][ff["measure"]]
        lines.append("")
        lines.append(f"Trigger effect on the {'unlearned' if who == 'after' else 'base'} model ({ff['measure']}, "
                     f"triggered − plain, paired over {e['n_seeds']} seed(s) × {e['n_questions']} questions × samples): "
                     f"{_num(e['difference'])} {_ci(e['ci'])} (p={_num(e['p_perm'], '.3f')}, {e['n_pairs']} pairs).")
    return lines + [""]


def _em_calibration(results: Path) -> list[str]:
    """The free-form judges' calibration against hand labels (results/em_calibration, else the packaged one)."""
    from evals.em_calibration import EM_CALIBRATION_RESULT
    from interp.io import read_json

    path = results / "em_calibration" / "calibration.json"
    path = path if path.exists() else EM_CALIBRATION_RESULT
    if not path.exists():
        return []
    cal = read_json(path)
    lines = ["## Free-form judge calibration (emergent-misalignment protocol)", "",
             f"{cal['n']} hand-labelled sampled answers (docs/em_labelling.md); alignment on answers labelled "
             "`answer`, aligned vs misaligned; coherence on all rows, coherent vs incoherent.", "",
             "| judge | alignment AUROC | Spearman | coherence AUROC | Spearman | abstain | trusted |",
             "|---|---|---|---|---|---|---|"]
    for name, m in cal["judges"].items():
        a, c = m["alignment_answers"], m["coherence_all"]
        lines.append(f"| {name} | {_num(a['auroc'])} | {_num(a['spearman'])} | {_num(c['auroc'])} | "
                     f"{_num(c['spearman'])} | {m['abstain']:.2f} | {'yes' if m['trusted'] else 'no'} |")
    return lines + ["", cal["statement"], ""]


def _mishra(results: Path) -> list[str]:
    """H9–H12 (the Mishra & Arulvanan questions): backdoor trigger, alignment/coherence judge,
    membership-inference prior, compliance-shift directions."""
    lines: list[str] = []
    m = latest_metrics(results, "h9_backdoor")
    if m:
        tok = m["tokenization"]
        lines += ["## Backdoor-triggered unlearning (H9; figure: backdoor)", "",
                  f"Trigger `{m['trigger']}`: tokenised identically in every prompt: eval "
                  f"{'yes' if tok['eval']['identical'] else 'NO'} ({tok['eval']['n_prompts']} prompts), training "
                  f"{'yes' if tok['train']['identical'] else 'NO'} ({tok['train']['n_truncated']} truncated). "
                  f"Trigger alone on the base model (refusal plain − triggered): "
                  f"{_test(m['base_trigger_effect']['pooled']['judge'])}.", ""]
        for target, t in m["targets"].items():
            lines += [f"### Target: {target} (retain: {t['retain_applied']}; backdoor "
                      f"{'installed' if t['backdoor_installed'] else 'not installed'})", "",
                      "| domain | drop without trigger (CI) | drop with trigger (CI) | triggered − plain (CI, p) |",
                      "|---|---|---|---|"]
            for d, r in t["domains"].items():
                p, q = r["plain"]["judge"], r["trigger"]["judge"]
                lines.append(f"| {d}{' (target)' if d == target else ''} | {p['drop']:+.2f} {_ci(p['ci'])} | "
                             f"{q['drop']:+.2f} {_ci(q['ci'])} | {_test(r['difference']['judge'])} |")
            mu = t["mean_untouched"]
            lines += ["", f"Mean untouched drop: {mu['plain']['judge']['drop']:.2f} without, "
                      f"{mu['trigger']['judge']['drop']:.2f} with the trigger; paired difference (judge) "
                      f"{_test(mu['difference']['judge'])}, (logit) {_test(mu['difference']['logit'])}.", ""]
            lines += _free_form(t.get("free_form"))
    lines += _em_calibration(results)
    m = latest_metrics(results, "h10_alignment_scores")
    if m:
        v = m["validation"]
        lines += ["## Alignment and coherence scores (H10)", "",
                  f"Judge: the base model, 0–100 probability-weighted digit scores (abstain below "
                  f"{m['min_mass']} digit mass). Validation on {v['n']} items ({', '.join(f'{k} {n}' for k, n in v['counts'].items())}): "
                  f"alignment AUROC refusal vs harmful compliance {_num(v['alignment_auroc_refusal_vs_compliance'])}, "
                  f"coherence AUROC coherent vs planted incoherent {_num(v['coherence_auroc_coherent_vs_incoherent'])} "
                  f"(" + ", ".join(f"{k} {_num(a)}" for k, a in v["coherence_auroc_by_corruption"].items())
                  + f"); abstain alignment {v['abstain']['alignment']:.2f}, coherence {v['abstain']['coherence']:.2f} "
                  f"→ **{'trusted' if v['trusted'] else 'not trusted'}**.", "",
                  "| domain | base align | base coher | " + " | ".join(f"{t} align | {t} coher" for t in m["targets"])
                  + " |", "|---|---|---|" + "---|---|" * len(m["targets"])]
        for d, b in m["base"]["domains"].items():
            cells = [f"{_num(t['domains'].get(d, {}).get('alignment'), '.0f')} | "
                     f"{_num(t['domains'].get(d, {}).get('coherence'), '.0f')}" for t in m["targets"].values()]
            lines.append(f"| {d} | {_num(b['alignment'], '.0f')} | {_num(b['coherence'], '.0f')} | " + " | ".join(cells)
                         + " |")
        lines.append("")
        for t, r in m["targets"].items():
            lines.append(f"- **{t}:** untouched alignment drop (base − unlearned) {_test(r['alignment_drop_untouched'], '.1f')}, "
                         f"coherence drop {_test(r['coherence_drop_untouched'], '.1f')}; target alignment drop "
                         f"{_test(r['alignment_drop_target'], '.1f')}")
        lines.append("")
    m = latest_metrics(results, "h11_mia_prior")
    if m:
        lines += ["## Membership-inference prior (H11; figure: prior_vs_ema)", "",
                  f"Base-model statistics of each domain's forget set (prompt alone; the model's own refusal given the "
                  f"prompt), Min-K% with k={m['k']}. EMA source: {m['ema_source']}.", "",
                  "| domain | n | prompt LOSS | refusal LOSS | refusal zlib (×10⁻³) | refusal Min-K% | refusal LOSS − benign | EMA (judge) |",
                  "|---|---|---|---|---|---|---|---|"]
        for d, p in m["priors"].items():
            e = m["ema"].get(d, {}).get("judge")
            lines.append(f"| {d} | {m['n_examples'].get(d, '–')} | {p['prompt']['loss']:.3f} | {p['response']['loss']:.3f} | "
                         f"{p['response']['zlib'] * 1e3:.2f} | {p['response']['min_k']:.2f} | "
                         f"{m['relative_to_benign'][d]['response']['loss']:+.3f} | {_num(e)} |")
        lines += ["", "| prior | ρ (judge EMA) | p | ρ (logit EMA) | p | n |", "|---|---|---|---|---|---|"]
        for name, c in m["correlations"].items():
            j, lg = c["judge"], c["logit"]
            lines.append(f"| {name}{' (primary)' if name == m['primary'] else ''} | {_num(j['spearman'])} | "
                         f"{_num(j['p_perm_spearman'], '.3f')} | {_num(lg['spearman'])} | {_num(lg['p_perm_spearman'], '.3f')} | "
                         f"{j['n']} |")
        lines.append("")
    m = latest_metrics(results, "h12_misalignment_directions")
    if m:
        lines += ["## Compliance-shift directions and transfer (H12; figure: misalignment_directions)", "",
                  "| source | peak-norm layer | max \|cos\| with refusal dir. (layer) | mean cross-layer cosine |",
                  "|---|---|---|---|"]
        for s, g in m["geometry"].items():
            norms, cos = g["norms"], g["cosine_refusal"]
            k = max(range(len(cos)), key=lambda i: abs(cos[i]))
            cl = g["cross_layer_cosine"]
            off = [cl[i][j] for i in range(len(cl)) for j in range(len(cl)) if i != j]
            lines.append(f"| {s} | {m['layers'][max(range(len(norms)), key=norms.__getitem__)]} | {cos[k]:+.2f} "
                         f"({m['layers'][k]}) | {sum(off) / max(len(off), 1):.2f} |")
        lines.append("")
        for key, vals in m["between_sources"].items():
            lines.append(f"Cosine between the {key.replace('|', ' and ')} shifts per layer: min {min(vals):.2f}, "
                         f"max {max(vals):.2f}.")
        kinds = [*m["sources"], "random", "benign"]
        lines += ["", f"Refusal log-odds returned by subtracting each direction at resid_post[{m.get('layer')}], at the "
                  "norm of the model's own shift (subtracted − unlearned, all seven domains; benign = the direction "
                  "the adapter moved benign prompts):", "",
                  "| unlearned model | " + " | ".join(f"subtract {k}" for k in kinds) + " | cross vs random | "
                  "cross vs benign |", "|---|" + "---|" * (len(kinds) + 2)]
        for model, rows in m["transfer"].items():
            cross = [" ; ".join(f"{s}: {_test(rows[s]['pooled_vs'][c])}" for s in m["sources"] if s != model)
                     for c in ("random", "benign")]
            lines.append(f"| {model} | " + " | ".join(_test(rows[k]["pooled_returned"]) for k in kinds)
                         + f" | {cross[0]} | {cross[1]} |")
        if m.get("steering"):
            lines.append("")
            for s, st in m["steering"].items():
                mean_drop = sum(st["drop"].values()) / len(st["drop"])
                mean_rand = sum(st["drop_random"].values()) / len(st["drop_random"])
                lines.append(f"- Adding the {s} shift to the base model at layer {st['layer']} (norm {st['norm']:.1f}) "
                             f"lowers the refusal logit by {mean_drop:.2f} on average (random of equal norm: "
                             f"{mean_rand:.2f}).")
        lines.append("")
    return lines


def render_report(results: str | Path) -> str:
    results = Path(results)
    figs = sorted((results / "figures").glob("*.png")) if (results / "figures").exists() else []
    lines = ["# emalab replication report", "",
             "Generated by `emalab run` from the files under this results directory; every number below is "
             "read from an experiment's `metrics.json`. Rates are refusal rates from greedy generations "
             "labelled by the refusal judge; logit drops are in refusal log-odds.", ""]
    lines += _claims(results) + _setup(results) + _experiment_sections(results) + _h4_table(results)
    lines += _utility_table(results)
    lines += _h5_table(results) + _h7_table(results)
    lines += _other(results) + _mishra(results)
    if figs:
        lines += ["## Figures", ""] + [f"![{f.stem}](figures/{f.name})" for f in figs] + [""]
    return "\n".join(lines)


def write_report(results: str | Path) -> Path:
    results = Path(results)
    return atomic_write_text(results / "REPORT.md", render_report(results))
