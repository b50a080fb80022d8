"""REPORT.md, generated from saved results only: the claims table (replicated / not replicated /
inconclusive, with the numbers), the setup, each experiment's own section (its ``report_section``),
the free-form judges' calibration, the utility table and the figures. Experiments are discovered,
never named here."""

from __future__ import annotations

from pathlib import Path

from figures import latest_metrics
from interp.io import atomic_write_text, git_commit, read_json
from interp.registry import EMBEDDED_MODELS
from study.report import num, pct

__all__ = ["write_report", "render_report", "claims_in"]


def _experiments() -> list[str]:
    """Experiment modules in hypothesis order (their ``ORDER``): discovered, never listed here."""
    from emalab.pipeline import experiment_modules

    return list(experiment_modules())


def _experiment_sections(results: Path) -> list[str]:
    """Sections written by the experiments themselves: ``report_section(metrics) -> lines``."""
    from emalab.pipeline import experiment_modules

    lines = []
    for exp, module in experiment_modules().items():
        m = latest_metrics(results, exp)
        if m and hasattr(module, "report_section"):
            lines += module.report_section(m)
    return lines


def _dtypes(pipe: dict, study: dict) -> str:
    m = pipe.get("machine") or {}
    if "train_dtype" not in m:
        return str(study["dtype"])
    return (f"training {m['train_dtype']} ({study['dtype']}), measurement {m['eval_dtype']}; "
            f"{m.get('device', '?')} on {m.get('machine', '?')}")


def _setup(results: Path) -> list[str]:
    from emalab.heartbeat import interrupted_note, peak_rss_note

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
            f"- **dtype:** {_dtypes(p, s)}; **seeds:** {s['seeds']}"
            + (f" (judged: first {s['judged_seeds']})" if s.get("judged_seeds") else "") + "; **NPO:** "
            + (f"{s['trajectory_steps']} steps per run, a snapshot scored every {s['trajectory_every']}; judged at "
               + (f"the first snapshot whose dev-split target refusal is ≤ {s['operating_level']}"
                  if s.get("operating_level") is not None else f"step {s['steps']}")
               if s.get("trajectory_steps") else f"{s['steps']} steps")
            + f", lr {s['lr']}, "
            f"β {s['beta']}, batch {s['batch_size']}, " + (f"forget sets of {s['n_forget']} base refusals per target "
            "(candidates drawn until kept)" if s.get("forget_size") == "kept" else f"{s['n_forget']} forget prompts")
            + f"; retain-CE α {s['alpha']}, "
            f"{s['n_retain_per_domain']} retain prompts per domain",
            f"- **Evaluation:** {s['eval_limit'] or 'all'} eval prompts per domain, greedy {s['max_new_tokens']} "
            f"tokens, `{s['judge']}` judge; concept vectors from {s['probe_limit'] or 'all'} probe prompts per domain",
            f"- **Experiments run:** {', '.join(p['config']['experiments'])}",
            "- **Wall time (latest invocation):** " + ", ".join(f"{k} {v:.0f}s" for k, v in p["timings_s"].items())
            + (f"; {len(p['invocations'])} invocations of this config took {p['total_s_all_invocations']:.0f}s in all"
               + (f" ({note})" if (note := interrupted_note(p["invocations"])) else "")
               if len(p.get("invocations", [])) > 1 else "")
            + (f"; peak RSS {peak}" if (peak := peak_rss_note(p)) else ""),
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


def claims_in(metrics: dict | None) -> list[dict]:
    """The claims an experiment's metrics state: one (``claim``) or several (``claims``)."""
    m = metrics or {}
    return m.get("claims", [m["claim"]] if "claim" in m else [])


def _claims(results: Path) -> list[str]:
    lines = ["## Claims", "", "| id | claim | status | evidence |", "|---|---|---|---|"]
    found = False
    for exp in _experiments():
        for c in claims_in(latest_metrics(results, exp)):
            lines.append(f"| {c['id']} | {c['claim']} | **{c['status']}** | {c['evidence']} |")
            found = True
    if not found:
        lines.append("| – | no experiment results yet | – | – |")
    return lines + [""]


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
        lines.append(f"| {cond} | {len(reps)} | {kl} | {pct(benign)} | {pct(over)} | {pct(incoh)} | {pct(harm)} |")
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
        lines.append(f"| {name} | {num(a['auroc'])} | {num(a['spearman'])} | {num(c['auroc'])} | "
                     f"{num(c['spearman'])} | {m['abstain']:.2f} | {'yes' if m['trusted'] else 'no'} |")
    return lines + ["", cal["statement"], ""]


def render_report(results: str | Path, compare: list[str | Path] | None = None) -> str:
    """REPORT.md's text; with ``compare`` (other results directories, e.g. the same study on another
    model) it gains the cross-model table, "## Across models" (:mod:`emalab.cross_model`)."""
    results = Path(results)
    figs = sorted((results / "figures").glob("*.png")) if (results / "figures").exists() else []
    lines = ["# emalab replication report", "",
             "Generated by `emalab run` from the files under this results directory; every number below is "
             "read from an experiment's `metrics.json`. Rates are refusal rates from greedy generations "
             "labelled by the refusal judge; logit drops are in refusal log-odds.", ""]
    lines += _claims(results)
    if compare:
        from emalab.cross_model import compare_lines

        lines += compare_lines([results, *compare])
    lines += _setup(results) + _experiment_sections(results)
    lines += _em_calibration(results) + _utility_table(results)
    if figs:
        lines += ["## Figures", ""] + [f"![{f.stem}](figures/{f.name})" for f in figs] + [""]
    return "\n".join(lines)


def write_report(results: str | Path, compare: list[str | Path] | None = None) -> Path:
    results = Path(results)
    return atomic_write_text(results / "REPORT.md", render_report(results, compare))
