"""How REPORT.md writes numbers. Each experiment renders its own section
(``report_section(metrics) -> lines``); these are the pieces several sections share: a rate, an
interval, a paired test, a table header, and the blocks of study-level results (a point of the
selectivity frontier, the free-form protocol's table)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["frontier_table", "num", "pct", "ci", "estimate", "test", "brief_test", "table", "frontier_cell", "difference",
           "retain_set_lines", "free_form_lines", "retain_weight_line", "retain_weight_lines",
           "retain_weights_evidence", "gate_line"]


def num(x: float | None, fmt: str = ".2f") -> str:
    """``x`` in ``fmt``, or ``–`` when it is missing (None or NaN)."""
    return "–" if x is None or x != x else format(x, fmt)


def pct(x: float | None) -> str:
    """A rate (or any number on the report's two-decimal scale), ``–`` when missing."""
    return num(x)


def ci(interval: Sequence | None) -> str:
    """``[lo, hi]`` with two decimals, or nothing when there is no interval."""
    return f"[{interval[0]:.2f}, {interval[1]:.2f}]" if interval else ""


def estimate(value: float, interval: Sequence | None) -> str:
    """``value [lo, hi]``, or the value alone when there is no interval."""
    return f"{value:.2f}" + (f" {ci(interval)}" if interval else "")


def test(t: dict | None, fmt: str = ".2f") -> str:
    """A paired test (:func:`evals.stats.paired_test` as a dict) as ``+mean [lo, hi] (p=…)``."""
    if not t or t.get("mean_diff") is None:
        return "–"
    return f"{t['mean_diff']:+{fmt}} [{num(t['ci_low'], fmt)}, {num(t['ci_high'], fmt)}] (p={num(t['p_perm'], '.3f')})"


def brief_test(t: dict) -> str:
    """A paired test as a claim's evidence writes it: ``+mean [lo, hi], p=…``, or ``n/a``."""
    if t.get("mean_diff") is None:
        return "n/a"
    return f"{t['mean_diff']:+.2f} [{t['ci_low']:.2f}, {t['ci_high']:.2f}], p={t['p_perm']:.3f}"


def table(*header: str) -> list[str]:
    """The header and separator lines of a markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]


def frontier_cell(r: dict, key: str = "value") -> str:
    """One statistic of :func:`study.frontier.selectivity` at a level: ``value [lo, hi]``, or
    ``not reached`` (with the closest the target came) when no seed's target got there."""
    if r.get(key) is None:
        return f"not reached (closest {r['closest']:.2f})" if "closest" in r else "–"
    return estimate(r[key], r.get("ci" if key == "value" else f"{key}_ci"))


def difference(r: dict) -> str:
    """A matched difference (:func:`study.frontier.matched_difference` or ``matched_contrast``) as
    ``+d [lo, hi]``, or its note ("not reached by …") when it has no interval."""
    if r.get("ci") is None:
        return r.get("note", "n/a")
    return f"{r['difference']:+.2f} [{r['ci'][0]:+.2f}, {r['ci'][1]:+.2f}]"


def retain_set_lines(target: str, v: dict, budget: int, primary: str) -> list[str]:
    """One target's retain-set block (:func:`study.retain_sets.compare_retain_sets` with its
    ``strategies``, ``held_out`` and ``early_similarity``): what each strategy retained, the held-out
    domains' refusal, and predicted − random at every level."""
    sims = ", ".join(f"{d} {x:+.2f}" for d, x in sorted(v["early_similarity"].items(), key=lambda kv: -kv[1]))
    retained = "; ".join(f"{n}: {', '.join(s['retain_domains']) or '–'}"
                         + (f" ({s['per_domain']} each)" if s["per_domain"] else " (plain NPO)")
                         for n, s in v["strategies"].items())
    n_random = sum(n.startswith("random") for n in v["strategies"])
    lines = [f"Retained ({target}; budget {budget} retain prompts; early-layer similarity to {target}: {sims}): "
             f"{retained}. Held out (retained by no k-strategy): {', '.join(v['held_out']) or 'none'}.", ""]
    if v["held_out_refusal"]:
        lines += [f"Refusal of the held-out domains ({', '.join(v['held_out'])}) at each matched level ('all' "
                  "retains them too: its row is propped up by their own retain prompts).", "",
                  *table("condition", "target", "level", "held-out refusal", "drop")]
        lines += [f"| {n} | {target} | {lv} | {frontier_cell(r)} | {frontier_cell(r, 'drop')} |"
                  for n, by_level in v["held_out_refusal"].items() for lv, r in by_level.items()] + [""]
    for lv, vs in v["vs_random_at"].items():
        lines += [f"Predicted − random ({target}, target refusal {lv}{'' if lv == primary else ', secondary'}; "
                  f"untouched refusal difference, random = mean of {n_random} draws): all untouched "
                  f"{difference(vs['untouched'])}; held out {difference(vs['held_out'])}"
                  + ("; per draw: " + ", ".join(f"{n} {difference(r)}" for n, r in v["per_draw"].items())
                     if lv == primary else "") + ".", ""]
    return lines


def free_form_lines(ff: dict | None) -> list[str]:
    """The free-form protocol's block (:func:`study.free_form.free_form_table` plus its settings):
    rates per condition with two-level intervals (questions, then samples: answers to one question are
    not independent, so a Wilson interval over all answers would be too narrow), and the paired trigger effects."""
    if not ff:
        return []
    what = ("misaligned rate (judge " + str(ff["judge"]) + ", calibrated)" if ff["mode"] == "scores" else
            "rate of answers neither refusal nor irrelevant ('other'; no judge passed calibration, so counts only)")
    lines = [f"Free-form protocol ({ff['n_samples']} samples per question at temperature {ff['temperature']}, "
             f"cap {ff['max_new_tokens']} tokens; figure: em_rates): {what}.", "",
             *table("condition", "refusal", "irrelevant", ff["measure"] + " (two-level CI)", "n")]
    for name, c in ff["conditions"].items():
        r = c["rates"][ff["measure"]]
        lines.append(f"| {name} | {c['counts']['refusal']} | {c['counts']['irrelevant']} | "
                     f"{num(r['rate'])} {ci(r['ci'])} | {r['n']} |")
    for who in ("after", "base"):
        e = ff[f"trigger_effect_{who}"][ff["measure"]]
        lines.append("")
        lines.append(f"Trigger effect on the {'unlearned' if who == 'after' else 'base'} model ({ff['measure']}, "
                     f"triggered − plain, paired over {e['n_seeds']} seed(s) × {e['n_questions']} questions × samples): "
                     f"{num(e['difference'])} {ci(e['ci'])} (p={num(e['p_perm'], '.3f')}, {e['n_pairs']} pairs).")
    return lines + [""]


def frontier_table(conditions: dict, n_seeds: int) -> list[str]:
    """The selectivity table of :func:`study.frontier.selectivity` results keyed ``"name|target"``:
    one row per condition and matched level."""
    lines = ["Refusal probability from the logit score (mean over the eval prompts) at the first point where the "
             "target's refusal reaches each level, interpolated between scored snapshots; intervals resample "
             f"seeds and prompts and refind the crossing ({n_seeds} seeds). Drop = base − value. Over-refusal "
             "and benign refusal at the same point; KL(base ‖ model) on benign prompts.", "",
             *table("condition", "target", "level", "reached", "untouched refusal", "drop", "over-refusal", "benign",
                    "KL", "slope", "grad cos")]
    for key, c in conditions.items():
        name, target = key.split("|")
        for lv, r in c["levels"].items():
            u, sl = r["untouched"], c["slope"]
            lines.append(f"| {name} | {target} | {lv} | {u['reached']}/{u['n_seeds']} | {frontier_cell(u)} | "
                         f"{frontier_cell(u, 'drop')} | {frontier_cell(r['over_refusal'])} | {frontier_cell(r['benign'])} | "
                         f"{num(u.get('kl'), '.4f')} | {estimate(sl['slope'], sl['ci'])} | "
                         f"{num((c.get('grad_cos') or {}).get('mean'), '+.2f')} |")
    return lines + ["", "Slope: untouched drop per unit of target drop along training (all snapshots, through the "
                    "origin). Grad cos: cosine between the forget and the retain term's gradients, mean over the "
                    "training steps of every seed (– without a retain term).", ""]


def retain_weight_line(method: str, w: dict) -> str:
    """One retain term's weight (:func:`study.budget.retain_weight`) and what the dev split saw at
    each α it tried: ``kl α 100 (α 1: target 0.05 at step 4, untouched 0.40, …)``."""
    rows = ", ".join(f"α {r['alpha']:g}: target {r['dev_refusal']:.2f} at step {r['step']}"
                     + (f", untouched {r['untouched_dev_refusal']:.2f}" if r["reached"] else " (not reached)")
                     for r in w.get("alphas", []))
    head = f"{method} α {w['used']:g}" + ("" if w.get("chosen") is not None else " (no weight reached the level; smallest)")
    return f"{head} ({rows})" if rows else head


def retain_weight_lines(target: str, weights: dict, choice: dict | None) -> list[str]:
    """A target's retain weights, when they were chosen on the dev split (``choice``: ``{"grid", "seed"}``)."""
    if not weights or not choice:
        return []
    return [f"Retain weights for {target}, chosen on the dev split (probe prompts; seed {choice['seed']}, α grid "
            f"{', '.join(f'{a:g}' for a in choice['grid'])}): "
            + "; ".join(retain_weight_line(m, w) for m, w in weights.items()), ""]


def retain_weights_evidence(weights: dict[str, dict], choice: dict | None, alpha: float) -> str:
    """The weights behind a claim, for its evidence: ``{target: {method: weight}}`` as one phrase."""
    if not choice:
        return f"α {alpha:g} for every term (untuned)"
    used = ", ".join(f"{t} {m} {w['used']:g}" + ("" if w["chosen"] is not None else " (none reached)")
                     for t, ws in weights.items() for m, w in ws.items())
    return f"α per term and target chosen on the dev split (seed {choice['seed']}): {used}"


def gate_line(target: str, g: dict, setting: dict) -> str:
    """A concept gate's split of the eval prompts (:func:`study.gate.gate_summary`) in one sentence."""
    return (f"Concept gate ({target}; layer {setting.get('layer', '?')}, target − {setting.get('contrast', '?')} vector; "
            f"eval prompts, base model, mean of {len(g['per_seed'])} seeds' gates): accuracy {g['accuracy']:.2f}; open "
            f"on {g['target_accuracy']:.0%} of target prompts (mean gate {g['target_mean']:.2f}), shut on "
            f"{g['untouched_accuracy']:.0%} of untouched prompts (mean gate {g['untouched_mean']:.2f}).")
