"""REPORT.md from planted metrics of every experiment (no model): the text of each section is the
one in ``tests/data/report_golden.md`` (rendered when the sections still lived in
``emalab/report.py``), and the sections come in the report's order.

A deliberate change of a section's wording regenerates the golden file:
``python -c "import sys; sys.path.insert(0, 'tests'); import test_report_sections as t; t.regenerate()"``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from emalab.report import render_report
from evals.suite import DOMAINS
from interp.io import atomic_write_json

GOLDEN = Path(__file__).resolve().parent / "data" / "report_golden.md"


def _claim(cid: str, status: str) -> dict:
    return {"id": cid, "claim": f"claim {cid}", "status": status, "evidence": "numbers"}


def _h13(results: Path, monkeypatch) -> None:
    import test_h13_frontier as t13

    curves = {("npo", "cybersecurity"): (t13.FAST, [0.7, 0.4, 0.2, 0.1, 0.1]),
              ("retain", "cybersecurity"): (t13.FAST, [0.7, 0.65, 0.6, 0.6, 0.6]),
              ("npo", "safety"): (t13.FAST, [0.7, 0.3, 0.1, 0.05, 0.05]),
              ("retain", "safety"): ([0.8, 0.6, 0.5, 0.4, 0.35], [0.7, 0.65, 0.6, 0.6, 0.6])}
    t13._run(monkeypatch, results, curves)


def _h6(results: Path, monkeypatch) -> None:
    import test_h6_retain_frontier as t6

    t6._run(monkeypatch, results, {t: t6._predicted(t) for t in t6.TARGETS})


def _free_form():
    import test_em_protocol as tem

    from study.free_form import free_form_scores, free_form_table

    conds = {k: {s: tem._ff_records(0.3, i * 3 + s) for s in (0, 1, 2)}
             for i, k in enumerate(("base", "base+trigger", "after", "after+trigger"))}
    ff = free_form_table(conds, "counts")
    ff.update(judge=None, n_samples=4, max_new_tokens=96, temperature=1.0, scores=free_form_scores(conds))
    return ff


def _stages(results: Path) -> None:
    """One unlearning stage and two evaluations for the utility table."""
    u = {"method": "npo", "retain_mode": "ce", "alpha": 10.0, "target_domains": ["cybersecurity"], "lr": 3e-5,
         "steps": 10}
    atomic_write_json(results / "stages" / "unlearn" / "u1" / "DONE.json", {"adapter_id": "a1", "key": {"unlearn": u}})
    for name, adapter, kl in (("e0", None, None), ("e1", "a1", 0.0123)):
        atomic_write_json(results / "stages" / "eval" / name / "DONE.json",
                          {"key": {"adapter": adapter}, "condition": "base" if adapter is None else "npo-x"})
        atomic_write_json(results / "stages" / "eval" / name / "report.json", {
            "utility": None if kl is None else {"kl_to_base": kl, "kl_ci": [kl / 2, kl * 2]},
            "benign": {"refusal_rate": 0.05}, "over_refusal": {"refusal_rate": 0.25},
            "domains": {d: {"incoherent_rate": 0.01 * i, "harmful_compliance_rate": 0.1 * i}
                        for i, d in enumerate(DOMAINS)}})


def _em_calibration(results: Path) -> None:
    judge = {"alignment_answers": {"auroc": 0.81, "spearman": 0.52}, "coherence_all": {"auroc": 0.77, "spearman": 0.4},
             "abstain": 0.05, "trusted": True}
    atomic_write_json(results / "em_calibration" / "calibration.json", {
        "n": 60, "judges": {"probe:x": judge, "rubric:x": {**judge, "trusted": False}},
        "statement": "The probe judge passed."})


def plant(results: Path, monkeypatch) -> None:
    """Metrics of all thirteen experiments, built by the experiments' own functions where they have them."""
    import test_figures_report as tfr
    import test_h9_h12_metrics as th

    tfr.R.seed(0)
    th.R.seed(0)
    tfr.make_results(results)  # h1, h4, h5, h7, h8
    _write = tfr._write
    _write(results, "h2_ema_spreads", {"claim": _claim("C2", "replicated")})
    _write(results, "h3_safety_spreads_further", {
        "common_domains": [d for d in DOMAINS if d not in ("safety", "cybersecurity")],
        "judge": {"safety": {"drop": 0.31, "ci": [0.2, 0.42]}, "cybersecurity": {"drop": 0.12, "ci": [0.05, 0.2]}},
        "difference": 0.19, "ci": [0.04, 0.33], "saturated": False, "claim": _claim("C3 (fixed budget)", "replicated")})
    _h6(results, monkeypatch)
    h9 = th._h9_metrics(0.3)
    h9["targets"]["cybersecurity"]["free_form"] = _free_form()
    _write(results, "h9_backdoor", h9)
    _write(results, "h10_alignment_scores", th._h10_metrics())
    _write(results, "h11_mia_prior", th._h11_metrics())
    _write(results, "h12_misalignment_directions", th._h12_metrics())
    _h13(results, monkeypatch)
    _stages(results)
    _em_calibration(results)


def sections(text: str) -> dict[str, str]:
    """``{heading: body}`` of every ``## `` section (the commit line of the setup dropped)."""
    out: dict[str, list[str]] = {}
    head = ""
    for line in text.splitlines():
        if line.startswith("## "):
            head = line
        if not line.startswith("- **Commit:**"):
            out.setdefault(head, []).append(line)
    return {k: "\n".join(v) for k, v in out.items()}


def regenerate() -> None:
    import random
    import tempfile

    import numpy as np
    import torch

    random.seed(0)  # as the autouse fixture of conftest.py
    np.random.seed(0)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        plant(Path(tmp), mp)
        GOLDEN.parent.mkdir(exist_ok=True)
        lines = [line for line in render_report(tmp).splitlines() if not line.startswith("- **Commit:**")]
        GOLDEN.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_every_section_reads_as_in_the_golden_report(tmp_path, monkeypatch):
    plant(tmp_path, monkeypatch)
    got, want = sections(render_report(tmp_path)), sections(GOLDEN.read_text(encoding="utf-8"))
    assert list(got) and sorted(got) == sorted(want)
    for heading, body in want.items():
        assert got[heading] == body, heading


def test_sections_come_in_hypothesis_order(tmp_path, monkeypatch):
    """Claims, setup, each experiment's section in hypothesis order, then the sections that are no one
    experiment's, then the figures."""
    from emalab.pipeline import experiment_modules
    from figures import latest_metrics

    plant(tmp_path, monkeypatch)
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "frontier.png").write_bytes(b"")
    owners = [(m.ORDER, line) for name, m in experiment_modules().items()
              if hasattr(m, "report_section") and latest_metrics(tmp_path, name)
              for line in m.report_section(latest_metrics(tmp_path, name)) if line.startswith("## ")]
    # h1 and h2 report through the claims table only; an experiment without results has no section.
    assert [o for o, _ in owners] == list(range(3, 14))
    heads = [h for h in sections(render_report(tmp_path)) if h]
    assert heads == ["## Claims", "## Setup", *(h for _, h in owners),
                     "## Free-form judge calibration (emergent-misalignment protocol)",
                     "## What each condition cost (utility axis)", "## Figures"]


def test_experiments_declare_order_presets_and_figures():
    """What the report, the presets and the figure index read from each experiment module."""
    import importlib

    from emalab.pipeline import PRESET_NAMES, experiment_modules
    from figures import FIGURES

    modules = experiment_modules()
    for name, m in modules.items():
        assert m.ORDER == int(name[1:].split("_")[0]) and m.EXPERIMENT == name
        assert set(m.PRESETS) <= set(PRESET_NAMES) and set(getattr(m, "PRESET_OVERRIDES", {})) <= set(m.PRESETS)
        for fig in m.FIGURES:
            assert fig in FIGURES and importlib.import_module(f"figures.{fig}").EXPERIMENT == name, (name, fig)
    for fig in FIGURES:
        owner = importlib.import_module(f"figures.{fig}").EXPERIMENT
        assert fig in modules[owner].FIGURES, (fig, owner)
    assert "style" not in FIGURES and len(FIGURES) >= 13


def test_presets_keep_their_membership():
    from emalab.pipeline import PRESETS

    quick = ("h1_narrow_unlearning", "h2_ema_spreads", "h13_selectivity_frontier", "h5_geometry_predicts_ema",
             "h7_mechanism")
    assert PRESETS["quick"].experiments == quick and PRESETS["quick"].overrides == {}
    assert PRESETS["full"].experiments == (*quick, "h3_safety_spreads_further", "h4_retain_contains_ema",
                                           "h6_prediction_guided_retain", "h8_transfer_matrix",
                                           "h14_containment_frontier")
    assert PRESETS["full"].overrides == {
        "h4_retain_contains_ema": {"sft_targets": ["cybersecurity", "safety"]},
        "h13_selectivity_frontier": {"alphas": [1.0, 10.0, 30.0], "lrs": [1e-4]},
        "h5_geometry_predicts_ema": {"targets": list(DOMAINS)}}


def test_run_with_chosen_experiments_keeps_their_preset_overrides_only(monkeypatch, capsys):
    import emalab.pipeline as pipeline
    from emalab.cli import main

    seen = []
    monkeypatch.setattr(pipeline, "run_pipeline", lambda cfg: seen.append(cfg) or "done")
    assert main(["run", "--preset", "full", "--experiments", "h5_geometry_predicts_ema", "h1_narrow_unlearning"]) == 0
    assert seen[0].experiments == ("h5_geometry_predicts_ema", "h1_narrow_unlearning")
    assert seen[0].overrides == {"h5_geometry_predicts_ema": {"targets": list(DOMAINS)}}


PLANTED = '''"""H99 — a planted hypothesis. Hypothesis: none. Prediction: none. Falsified if: never."""

from dataclasses import dataclass, field

from interp.config import JsonConfig
from study import StudyConfig, claim

EXPERIMENT = "h99_planted"
ORDER, RUN_ORDER, PRESETS, FIGURES = 99, 0, ("full",), ()
PRESET_OVERRIDES = {"full": {"k": 2}}


@dataclass
class Config(JsonConfig):
    """H99 settings."""

    study: StudyConfig = field(default_factory=StudyConfig)
    """Shared settings."""
    k: int = 1
    """A number."""


def main(cfg):
    return {"claim": claim("Z9", "planted", "inconclusive", "none")}


def report_section(m):
    return ["## Planted (H99)", "", f"k = {m['k']}", ""]
'''


def test_a_new_experiment_file_is_discovered(tmp_path, monkeypatch):
    """Adding a hypothesis is adding one file: the presets and the report find it."""
    import sys

    import experiments
    from emalab import pipeline

    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "h99_planted.py").write_text(PLANTED, encoding="utf-8")
    monkeypatch.setattr(experiments, "__path__", [*experiments.__path__, str(pkg)])
    monkeypatch.delitem(sys.modules, "experiments.h99_planted", raising=False)
    try:
        assert pipeline.preset_experiments("full")[-6:] == ("h99_planted", "h3_safety_spreads_further",
                                                            "h4_retain_contains_ema", "h6_prediction_guided_retain",
                                                            "h8_transfer_matrix", "h14_containment_frontier")
        assert "h99_planted" not in pipeline.preset_experiments("quick")
        assert pipeline.preset_overrides("full")["h99_planted"] == {"k": 2}
        cfg = pipeline.PipelineConfig(experiments=pipeline.preset_experiments("full"),
                                      overrides=pipeline.preset_overrides("full"))
        assert cfg.experiment_configs()["h99_planted"].k == 2
        results = tmp_path / "results"
        atomic_write_json(results / "h99_planted" / "run0" / "metrics.json",
                          {"k": 2, "claim": _claim("Z9", "inconclusive")})
        (results / "h99_planted" / "latest").symlink_to("run0")
        text = render_report(results)
        assert "| Z9 | claim Z9 | **inconclusive** | numbers |" in text and "## Planted (H99)\n\nk = 2" in text
    finally:
        sys.modules.pop("experiments.h99_planted", None)
