"""Figures and REPORT.md are regenerated from saved results only (no model is loaded)."""

from __future__ import annotations

import random

from emalab.report import render_report, write_report
from evals.suite import DOMAINS
from figures import make_all
from interp.io import atomic_write_json

R = random.Random(0)


def _drop():
    before = R.uniform(0.5, 1)
    after = R.uniform(0, before)
    return {"before": before, "after": after, "drop": before - after, "ci": [before - after - 0.1, before - after + 0.1],
            "n": 24}


def _claim(cid, status):
    return {"id": cid, "claim": f"claim {cid}", "status": status, "evidence": "numbers"}


def _write(results, exp, metrics):
    atomic_write_json(results / exp / "run0" / "metrics.json", metrics)
    (results / exp / "latest").symlink_to("run0")


H4_CONDITIONS = {"cybersecurity": ("npo", "npo_retain", "sft", "npo_retain_a1", "npo_retain_a30"),
                 "safety": ("npo", "npo_retain")}


def h4_metrics(results):
    return {"claim": _claim("C4", "not replicated"), "targets": {
        t: {"conditions": {c: {d: _drop() for d in DOMAINS} for c in conds},
            "mean_untouched": {c: {"drop": 0.3, "ci": [0.2, 0.4]} for c in conds}, "recovery": 0.5,
            "target_refusal_with_retain": 0.1, "runs": {c: [str(results / "nope")] for c in conds},
            "passing_conditions": [],
            "alpha_sweep": [{"alpha": a, "target_refusal": 0.1, "untouched_refusal": 0.2, "target_logit": -1.0,
                             "untouched_logit": -0.5} for a in ((0.0, 1.0, 10.0) if t == "cybersecurity" else (0.0, 10.0))]}
        for t, conds in H4_CONDITIONS.items()}}


def h5_metrics():
    from experiments.h5_geometry_predicts_ema import analyse

    targets = ("cybersecurity", "safety")
    points = []
    for t in targets:
        for d in DOMAINS:
            if d != t:
                base = R.random()
                points.append({"target": t, "domain": d, "similarity": {b: R.uniform(-1, 1) for b in
                                                                         ("early", "middle", "late")},
                               "drop_judge": base * R.random(), "base_judge": base, "after_judge": 0.1,
                               "drop_relative": R.random() if base > 0.2 else None, "drop_logit": R.random(),
                               "base_logit": R.uniform(-2, 2)})
    sim = [[[1.0 if i == j else 0.3 for j in range(7)] for i in range(7)] for _ in range(24)]
    rel = {"early": 0.8, "middle": 0.9, "late": 0.6}
    return {"claim": _claim("C5", "inconclusive"), "bands": analyse(points, 24, rel, n_perm=200), "points": points,
            "primary": "logit", "reliability": {"per_layer": [0.8] * 24, "bands": rel, "min": 0.7},
            "similarity": {"names": list(DOMAINS), "layers": list(range(24)), "matrix": sim}}


def make_results(results):
    targets = ("cybersecurity", "safety")
    _write(results, "h1_narrow_unlearning", {"claim": _claim("C1", "replicated")})
    _write(results, "h4_retain_contains_ema", h4_metrics(results))
    _write(results, "h5_geometry_predicts_ema", h5_metrics())
    proj = {d: [R.random() for _ in range(24)] for d in (*DOMAINS, "benign")}
    _write(results, "h7_mechanism", {
        "refusal_direction": {"layer": 12, "position": -1},
        "ablation_drop": {d: _drop() for d in DOMAINS}, "ablation_logit": {d: _drop() for d in DOMAINS},
        "layers": list(range(24)),
        "targets": {t: {"drift": {d: [1.0] * 24 for d in DOMAINS}, "projection_before": proj,
                        "projection_after": proj, "npo_drop": {d: 0.1 for d in DOMAINS},
                        "ablation_vs_npo": {"judge": {"spearman": 0.5, "p_perm_spearman": 0.2}}} for t in targets}})
    _write(results, "h8_transfer_matrix", {
        "rows": list(DOMAINS), "cols": list(DOMAINS),
        "drop_judge": {r: {c: R.random() for c in DOMAINS} for r in DOMAINS},
        "similarity": {"early": {r: {c: R.uniform(-1, 1) for c in DOMAINS} for r in DOMAINS}},
        "correlation": {"early": {"judge": {"spearman": 0.2, "p_perm_spearman": 0.3, "n": 42}}}})


def test_figures_from_saved_results(tmp_path):
    make_results(tmp_path)
    paths = make_all(tmp_path)
    names = {p.stem for p in paths}
    assert {"refusal_heatmap", "ema_drops", "ema_vs_similarity", "similarity_layers", "refusal_projection",
            "transfer_matrix"} <= names
    assert all(p.stat().st_size > 1000 for p in paths)
    assert {p.suffix for p in paths} == {".png", ".pdf"}


def test_ema_drops_legend_names_every_drawn_condition(tmp_path):
    from figures.ema_drops import draw, label
    from figures.style import plt

    fig = draw(h4_metrics(tmp_path))
    (legend,) = fig.legends
    texts = [t.get_text() for t in legend.get_texts()]
    drawn = {c for conds in H4_CONDITIONS.values() for c in conds}
    assert sorted(texts) == sorted(label(c) for c in drawn) and len(set(texts)) == len(drawn) == 5
    assert "NPO + retain-CE, α=30" in texts
    bars = [p for ax in fig.axes for p in ax.patches]
    assert len(bars) == sum(len(c) for c in H4_CONDITIONS.values()) * len(DOMAINS)
    plt.close(fig)


def test_figures_skip_missing_experiments(tmp_path):
    assert make_all(tmp_path) == []


def test_report_has_claims_and_tables(tmp_path):
    make_results(tmp_path)
    make_all(tmp_path)
    text = render_report(tmp_path)
    for cid, status in (("C1", "replicated"), ("C4", "not replicated"), ("C5", "inconclusive")):
        assert f"| {cid} |" in text and f"**{status}**" in text
    assert "## Geometry vs EMA" in text and "![refusal_heatmap](figures/refusal_heatmap.png)" in text
    assert "Retain-CE weight α (α = 0: NPO alone), cybersecurity target" in text  # a sweep of 3 points
    assert "safety target: mean refusal" not in text  # two points are just the table above
    assert write_report(tmp_path).read_text() == text


def test_pipeline_json_keeps_the_invocations_of_one_config(tmp_path):
    from emalab.pipeline import PipelineConfig, write_pipeline_json
    from interp.io import read_json

    path = tmp_path / "pipeline.json"
    cfg = PipelineConfig(experiments=("h1_narrow_unlearning",))
    write_pipeline_json(path, cfg, {"h1_narrow_unlearning": 500.0, "total": 510.0}, "t0")
    write_pipeline_json(path, cfg, {"h1_narrow_unlearning": 0.1, "total": 3.0}, "t1")  # resumed from cache
    d = read_json(path)
    assert [h["started"] for h in d["invocations"]] == ["t0", "t1"]
    assert d["timings_s"]["total"] == 3.0 and d["total_s_all_invocations"] == 513.0 and d["peak_rss_gb"] > 0
    write_pipeline_json(path, PipelineConfig(), {"total": 7.0}, "t2")  # another config starts afresh
    assert [h["started"] for h in read_json(path)["invocations"]] == ["t2"]
    write_pipeline_json(path, cfg, {"total": 1.0}, "t3")  # ... and the first one's history is not lost
    assert [h["started"] for h in read_json(path)["invocations"]] == ["t0", "t1", "t3"]


def test_h4_dose_response_orders_alphas_and_averages_records():
    from evals.evaluate import PromptRecord
    from experiments.h4_retain_contains_ema import _dose_response

    def recs(t, u):
        return [PromptRecord(id="a", domain="cybersecurity", logit_score=t, label="refusal" if t > 0 else "compliance"),
                PromptRecord(id="b", domain="bias", logit_score=u, label="refusal" if u > 0 else "compliance"),
                PromptRecord(id="c", domain="bias", logit_score=-1.0, label="compliance")]

    conds = {"npo": {"after": recs(-2.0, -2.0)}, "npo_retain": {"after": recs(-1.0, 1.0)},
             "npo_retain_a30": {"after": recs(1.0, 3.0)}, "sft": {"after": recs(0.0, 0.0)}}
    pts = _dose_response(conds, "cybersecurity", ["bias"], 10.0)
    assert [p["alpha"] for p in pts] == [0.0, 10.0, 30.0]
    assert [p["untouched_refusal"] for p in pts] == [0.0, 0.5, 0.5]
    assert [p["target_refusal"] for p in pts] == [0.0, 0.0, 1.0]
    assert pts[2]["untouched_logit"] == 1.0


def test_figures_command_rewrites_the_report(tmp_path, capsys):
    from emalab.cli import main

    make_results(tmp_path)
    assert main(["figures", str(tmp_path)]) == 0
    assert (tmp_path / "REPORT.md").exists() and "report:" in capsys.readouterr().out
    (tmp_path / "REPORT.md").unlink()
    assert main(["figures", str(tmp_path), "--no-report"]) == 0
    assert not (tmp_path / "REPORT.md").exists()
