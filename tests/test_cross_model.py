"""The cross-model table (`emalab compare`, `emalab figures --compare`), on synthetic results trees."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from emalab.cli import main
from emalab.cross_model import NOT_RUN, compare_lines, headline, load_run
from emalab.pipeline import PRESETS, write_pipeline_json
from emalab.report import render_report
from evals.suite import DOMAINS
from interp.io import atomic_write_json

SMALL, LARGE = "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"
C1_EVIDENCE = ("cybersecurity: refusal 0.62→0.00 (drop CI 0.42..0.79), incoherent 0.00, at step 16 (chosen on the "
               "dev split); safety: refusal 0.58→0.12 (drop CI 0.25..0.67), incoherent 0.00, at step 12")
C4_EVIDENCE = ("at target refusal 0.1 (lr 3e-05, 16 steps, 3 seeds): cybersecurity npo_retain_a10: recovers 11% of "
               "NPO's untouched drop (difference +0.03, CI +0.02..+0.05); safety npo_retain_a10: recovers 6% of "
               "NPO's untouched drop (difference +0.01, CI +0.01..+0.02); at these budgets; envelope (best point at "
               "or below the level, secondary): cybersecurity npo_retain_a10 11%, safety npo_retain_a10 6%")


def _claim(cid, status, evidence):
    return {"id": cid, "claim": f"claim {cid}", "status": status, "evidence": evidence}


def _write(results, exp, metrics):
    atomic_write_json(results / exp / "run0" / "metrics.json", {"commit": "abc1234", **metrics})
    (results / exp / "latest").symlink_to("run0")


def _drop(x):
    return {"before": x, "after": 0.0, "drop": x, "ci": [x - 0.1, x + 0.1], "n": 24}


def make_results(results, model, n_layers=24, frontier=True, seconds=4671.0, **study):
    """A results tree as `emalab run` leaves it: pipeline.json and each experiment's latest metrics.json."""
    cfg = PRESETS["quick"]
    cfg = replace(cfg, study=replace(cfg.study, model=model, results=str(results), **study))
    results.mkdir(parents=True)
    _write(results, "h1_narrow_unlearning", {
        "claim": _claim("C1", "replicated" if n_layers == 24 else "inconclusive", C1_EVIDENCE),
        "targets": {"cybersecurity": {"operating_steps": [16]}, "safety": {"operating_steps": [n_layers // 2]}}})
    _write(results, "h2_ema_spreads", {"claim": _claim("C2", "replicated", "mean untouched drop 0.51 (CI 0.44..0.60)")})
    if frontier:
        _write(results, "h13_selectivity_frontier", {
            "conditions": {}, "n_seeds": 3, "c3": {"forget_sizes": {"safety": [16], "cybersecurity": [16]}},
            "claims": [_claim("C3", "inconclusive", "difference +0.04 (CI -0.02..+0.10)"),
                       _claim("C4", "not replicated", C4_EVIDENCE)]})
    proj = {d: [0.5] * n_layers for d in (*DOMAINS, "benign")}
    _write(results, "h7_mechanism", {
        "refusal_direction": {"layer": n_layers * 3 // 4, "position": -1},
        "ablation_drop": {d: _drop(0.6) for d in DOMAINS}, "ablation_logit": {d: _drop(3.0) for d in DOMAINS},
        "layers": list(range(n_layers)),
        "targets": {"cybersecurity": {"drift": {d: [1.0] * n_layers for d in DOMAINS}, "projection_before": proj,
                                      "projection_after": proj, "npo_drop": {d: 0.1 for d in DOMAINS},
                                      "ablation_vs_npo": {"judge": {"spearman": 0.5, "p_perm_spearman": 0.2}}}}})
    machine = {"machine": "AMD EPYC|torch|2 threads", "device": "cpu", "train_dtype": "bfloat16",
               "eval_dtype": "float32"}
    write_pipeline_json(results / "pipeline.json", cfg, {"h1_narrow_unlearning": seconds / 2, "total": seconds},
                        "2025-01-01T00:00:00Z", 0, machine)
    return results


def _rows(lines):
    """{first cell: the other cells} of every markdown table row."""
    rows = {}
    for line in lines:
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture
def two_models(tmp_path):
    return (make_results(tmp_path / "results", SMALL),
            make_results(tmp_path / "results_1.5b", LARGE, n_layers=28, frontier=False, seconds=9000.0))


def test_one_row_per_claim_one_column_per_model(two_models):
    lines = compare_lines(list(two_models))
    rows = _rows(lines)
    assert rows["claim"] == [SMALL, LARGE] and rows["setup"] == [SMALL, LARGE]
    claim_rows = [k for k in rows if re.match(r"C\d", k)]
    assert claim_rows == ["C1: claim C1", "C2: claim C2", "C3: claim C3", "C4: claim C4"]
    small, large = rows["C1: claim C1"]
    assert small.startswith("**replicated** — cybersecurity: refusal 0.62→0.00")
    assert large.startswith("**inconclusive**")
    # the 1.5B run has no frontier: its C3 and C4 were not run, the 0.5B ones were
    assert rows["C3: claim C3"] == ["**inconclusive** — difference +0.04 (CI -0.02..+0.10)", NOT_RUN]
    assert rows["C4: claim C4"][1] == NOT_RUN and rows["C4: claim C4"][0].startswith("**not replicated**")


def test_setup_rows_per_model(two_models):
    rows = _rows(compare_lines(list(two_models)))
    assert rows["layers"] == ["0–23 (24)", "0–27 (28)"]
    assert rows["refusal direction layer"] == ["18", "21"]
    assert rows["operating step (chosen on the dev split)"] == ["cybersecurity 16, safety 12",
                                                                 "cybersecurity 16, safety 14"]
    assert rows["forget-set sizes"] == ["safety 16, cybersecurity 16", "–"]
    assert rows["wall time"] == ["78 min (4,671 s)", "150 min (9,000 s)"]
    assert rows["commit"] == ["`abc1234`", "`abc1234`"]
    assert all(r.endswith(" GB") for r in rows["peak RSS"])
    assert rows["machine"][0] == "AMD EPYC\\|torch\\|2 threads, cpu; training bfloat16, measurement float32"


def test_matching_settings_raise_no_warning(two_models):
    text = "\n".join(compare_lines(list(two_models)))
    assert "Warning" not in text and "different machines" not in text


def test_different_settings_are_listed_under_the_table(tmp_path):
    a = make_results(tmp_path / "a", SMALL)
    b = make_results(tmp_path / "b", LARGE, seeds=(0,), eval_limit=8)
    warning = [line for line in compare_lines([a, b]) if line.startswith("**Warning")]
    assert len(warning) == 1
    assert f"seeds ({SMALL} [0, 1, 2]; {LARGE} [0])" in warning[0]
    assert f"eval_limit ({SMALL} 24; {LARGE} 8)" in warning[0]
    assert "model (" not in warning[0] and "results (" not in warning[0]  # expected to differ


def test_same_model_twice_is_labelled_by_directory(tmp_path):
    a, b = make_results(tmp_path / "a", SMALL), make_results(tmp_path / "b", SMALL)
    assert _rows(compare_lines([a, b]))["claim"] == [f"{SMALL} ({a})", f"{SMALL} ({b})"]
    with pytest.raises(ValueError, match="named twice"):
        compare_lines([a, a])


def test_a_directory_the_study_has_not_written_is_an_error(tmp_path, capsys):
    good = make_results(tmp_path / "good", SMALL)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"has no pipeline.json.*`emalab run --results .*empty` first"):
        load_run(empty)
    atomic_write_json(empty / "pipeline.json", {"config": {"study": {"model": LARGE}}})
    with pytest.raises(ValueError, match=r"no experiment's metrics.json.*emalab run --results"):
        load_run(empty)
    assert main(["compare", str(good), str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a results directory; run `emalab run --results" in err
    assert main(["compare", str(good)]) == 1 and "two or more" in capsys.readouterr().err


def test_compare_command_prints_the_table(two_models, capsys):
    assert main(["compare", *map(str, two_models)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("## Across models") and f"| claim | {SMALL} | {LARGE} |" in out


def test_figures_compare_writes_the_section_into_report(two_models, monkeypatch, capsys):
    small, large = two_models
    monkeypatch.setattr("figures.make_all", lambda results: [])
    assert "## Across models" not in render_report(small)
    assert main(["figures", str(small), "--compare", str(large)]) == 0
    report = (small / "REPORT.md").read_text()
    assert report.count("## Across models") == 1 and f"| claim | {SMALL} | {LARGE} |" in report
    assert report.index("## Claims") < report.index("## Across models") < report.index("## Setup")
    # a bad directory fails before anything is rewritten
    before = (small / "REPORT.md").read_text()
    assert main(["figures", str(small), "--compare", str(small.parent / "nope")]) == 1
    assert "emalab run --results" in capsys.readouterr().err and (small / "REPORT.md").read_text() == before
    assert main(["figures", str(small), "--compare", str(large), "--no-report"]) == 1
    assert "drop --no-report" in capsys.readouterr().err


def test_headline_keeps_whole_numbered_clauses():
    cut = headline(C4_EVIDENCE)
    assert cut.startswith("at target refusal 0.1 (lr 3e-05, 16 steps, 3 seeds): cybersecurity") and cut.endswith("; …")
    assert all(clause in C4_EVIDENCE for clause in cut.removesuffix("; …").split("; "))
    assert set(re.findall(r"[+-]?\d+(?:\.\d+)?", cut)) <= set(re.findall(r"[+-]?\d+(?:\.\d+)?", C4_EVIDENCE))
    assert headline(C1_EVIDENCE) == C1_EVIDENCE  # short enough: whole
    assert headline("a; b 1; c") == "b 1; …"  # clauses without numbers are left out, and say so
    assert headline("no numbers at all") == "no numbers at all"
