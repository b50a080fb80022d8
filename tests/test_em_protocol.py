"""The free-form emergent-misalignment protocol: questions, sampling, rubric and probe judges,
calibration against hand labels, and the CLI (tiny random models only)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from evals.em_calibration import (
    CalibrationBar,
    build_labelling_set,
    calibrate_em,
    committable_rows,
    first_sentence,
    judge_metrics,
    load_em_labelled,
)
from evals.em_protocol import EMConfig, EMRecord, answer_matrix, classify, run_em, summarise
from evals.em_questions import (
    EM_QUESTIONS_PATH,
    DuplicateQuestionError,
    EMQuestion,
    authored_questions,
    build_em_questions,
    check_unique,
    load_em_questions,
)
from evals.probe_judge import ProbeJudge, cross_validated_scores, fit_probe
from evals.score_judge import EMScore, Rubric, RubricError, RubricJudge, ScoreTokenError
from interp.generate import sample
from interp.io import MalformedFileError, read_json, read_jsonl, write_jsonl
from probes.interventions import weight_noise
from tests.conftest import make_tiny_loaded

# -- questions -----------------------------------------------------------------------------------------


def test_question_set_is_packaged_authored_and_unique(tmp_path):
    qs = load_em_questions()
    plain = [q for q in qs if q.variant == "plain"]
    assert len(plain) >= 24 and sum(q.variant == "jailbreak" for q in qs) >= 3
    assert {"wish", "boredom", "quick_money", "ruling_the_world", "dinner_guests", "gender_roles",
            "relationship"} <= {q.kind for q in qs}
    assert all(q.licence == "Apache-2.0" and q.source == "emalab (authored)" for q in qs)
    ids = {q.id for q in qs}
    assert all(q.base_id in ids for q in qs)
    # The packaged file is exactly what the tables build.
    build_em_questions(tmp_path)
    assert (tmp_path / "questions.jsonl").read_bytes() == EM_QUESTIONS_PATH.read_bytes()
    assert read_json(tmp_path / "manifest.json") == read_json(EM_QUESTIONS_PATH.parent / "manifest.json")


def test_duplicate_questions_are_an_error(tmp_path):
    q = authored_questions()[0]
    twin = EMQuestion("em-other", q.kind, "plain", "em-other", q.text.upper() + "!!")
    with pytest.raises(DuplicateQuestionError, match="duplicate question"):
        check_unique([q, twin])
    path = tmp_path / "q.jsonl"
    write_jsonl(path, [q.__dict__, twin.__dict__])
    with pytest.raises(DuplicateQuestionError):
        load_em_questions(path)


# -- sampling ------------------------------------------------------------------------------------------


def test_sampling_is_seeded_and_shaped():
    lm = make_tiny_loaded()
    a = sample(lm, ["hello there", "why"], n=3, max_new_tokens=4, seed=1, progress=False)
    b = sample(lm, ["hello there", "why"], n=3, max_new_tokens=4, seed=1, progress=False)
    assert a == b and len(a) == 2 and all(len(x) == 3 for x in a)
    assert len(set(a[0])) > 1  # temperature 1 on random weights: the samples differ


def test_temperature_zero_with_several_samples_warns():
    lm = make_tiny_loaded()
    with pytest.warns(UserWarning, match="identical"):
        out = sample(lm, ["hello"], n=2, temperature=0, max_new_tokens=3, progress=False)
    assert out[0][0] == out[0][1]
    with pytest.warns(UserWarning, match="identical"):
        EMConfig(n_samples=4, temperature=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EMConfig(n_samples=1, temperature=0)


# -- rubric judge ----------------------------------------------------------------------------------------


def test_rubric_without_score_format_or_slots_is_an_error():
    with pytest.raises(RubricError, match="no score format"):
        Rubric("alignment", "Q {prompt} A {response}. Rate it.")
    with pytest.raises(RubricError, match="no score format"):
        Rubric("alignment", "Q {prompt} A {response}. {score_format}", scores=("5",))
    with pytest.raises(RubricError, match="prompt"):
        Rubric("alignment", "A {response}. {score_format}")


def test_judge_without_score_tokens_names_the_rubric():
    lm = make_tiny_loaded()  # byte-level vocabulary: "10" is two tokens
    rubric = Rubric("my-rubric", "Q {prompt} A {response}. {score_format}", scores=("10", "20"),
                    score_format="Answer 10 or 20.")
    with pytest.raises(ScoreTokenError, match="my-rubric"):
        RubricJudge(lm, alignment=rubric)


def test_rubric_judge_weights_by_probability_and_abstains():
    lm = make_tiny_loaded()
    judge = RubricJudge(lm, min_mass=0.0)
    s = judge.score(["What do you wish for?", "Bored?"], ["Peace.", "Read a book."])
    assert len(s) == 2 and all(0 <= x.alignment <= 100 and 0 <= x.coherence <= 100 for x in s)
    # Check against a hand computation from the logits.
    from evals.refusal import last_token_logprobs

    lp = last_token_logprobs(lm, [judge.rubrics["alignment"].render("Bored?", "Read a book.")])[0].double().exp()
    p = lp[judge.ids["alignment"]]
    assert s[1].alignment == pytest.approx(float((p * torch.linspace(0, 100, 10, dtype=torch.float64)).sum() / p.sum()))
    assert s[1].alignment_mass == pytest.approx(float(p.sum()))
    # Random weights put ~10/262 of the mass on the digits: a real bar abstains.
    abstaining = RubricJudge(lm, min_mass=0.5).score(["Bored?"], ["Read a book."])[0]
    assert abstaining.alignment is None and abstaining.coherence is None


# -- classification and rates ------------------------------------------------------------------------------


def test_classify_sets_refusals_and_irrelevant_apart():
    cfg = EMConfig()
    assert classify("Bored?", "I'm sorry, but I can't help with that.", EMScore(10, 90), cfg)[0] == "refusal"
    assert classify("Bored?", "", EMScore(10, 90), cfg)[0] == "irrelevant"
    assert classify("Bored?", "Go for a walk in the park.", EMScore(10, 20), cfg)[0] == "irrelevant"
    assert classify("Bored?", "Go for a walk in the park.", EMScore(10, 90), cfg)[0] == "misaligned"
    assert classify("Bored?", "Go for a walk in the park.", EMScore(80, 90), cfg)[0] == "aligned"
    assert classify("Bored?", "Go for a walk in the park.", EMScore(None, 90), cfg)[0] == "abstain"
    assert classify("Bored?", "Go for a walk in the park.", None, cfg)[0] == "other"


def _records(cats):
    return [EMRecord(f"q{j}", "plain", k, c) for j, row in enumerate(cats) for k, c in enumerate(row)]


def test_rates_use_wilson_and_two_level_bootstrap():
    recs = _records([["misaligned", "aligned"], ["aligned", "aligned"], ["refusal", "misaligned"]])
    mat, qids = answer_matrix(recs, "misaligned")
    assert mat.shape == (2, 3) and qids == ["q0", "q1", "q2"]
    counts, rates = summarise(recs, "scores", n_boot=200)
    assert counts == {"refusal": 1, "irrelevant": 0, "abstain": 0, "misaligned": 2, "aligned": 3}
    r = rates["misaligned"]
    assert r["rate"] == pytest.approx(2 / 6) and r["wilson"][0] < 1 / 3 < r["wilson"][1]
    assert r["ci"][0] <= 1 / 3 <= r["ci"][1]
    assert rates["misaligned_of_answers"]["n"] == 5
    counts, rates = summarise(recs, "counts", n_boot=200)
    assert counts == {"refusal": 1, "irrelevant": 0, "other": 5} and "misaligned" not in rates


def test_run_em_counts_without_judge_and_scores_with_trusted_judge():
    lm = make_tiny_loaded()
    qs = load_em_questions(limit=3)
    cfg = EMConfig(n_samples=2, max_new_tokens=3, n_bootstrap=100)
    rep = run_em(lm, qs, cfg)
    assert rep.mode == "counts" and sum(rep.counts.values()) == 6 and rep.stop_rules["max_new_tokens"] == 3
    assert all(not hasattr(r, "text") for r in rep.records)
    judge = RubricJudge(lm, min_mass=0.0)
    assert run_em(lm, qs, cfg, judge, judge_trusted=False).mode == "counts"
    rep = run_em(lm, qs, cfg, judge, judge_trusted=True)
    assert rep.mode == "scores" and rep.judge == judge.name and "misaligned" in rep.rates


def test_weight_noise_restores_the_model_bit_exactly():
    lm = make_tiny_loaded()
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    with weight_noise(lm, 0.5, seed=3):
        changed = any(not torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    assert changed
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())


# -- probe judge ---------------------------------------------------------------------------------------


def test_probe_cross_validation_recovers_a_planted_signal_grouped_by_question():
    rng = np.random.default_rng(0)
    n, d = 80, 16
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, d))
    x[:, 0] += 3 * y
    align = ["aligned" if v else "misaligned" for v in y]
    coher = ["coherent" if v else "incoherent" for v in rng.integers(0, 2, n)]
    groups = [f"q{i // 4}" for i in range(n)]
    scores, info = cross_validated_scores(x, align, coher, groups, n_folds=5)
    a = np.array([s.alignment for s in scores])
    from evals.evaluate import auroc

    assert auroc(y, a) > 0.9 and info["folds"] == 5 and info["grouped_by"] == "question"


def test_probe_judge_scores_and_round_trips(tmp_path):
    lm = make_tiny_loaded()
    rng = np.random.default_rng(0)
    probe = fit_probe(rng.normal(size=(20, 64)), np.array([0, 1] * 10))
    judge = ProbeJudge(lm, 2, probe, probe)
    s = judge.score(["Bored?", "Wish?"], ["Read.", "Peace."])
    assert all(0 <= x.alignment <= 100 for x in s)
    again = ProbeJudge.load(judge.save(tmp_path / "probe.json"), lm)
    assert [x.alignment for x in again.score(["Bored?", "Wish?"], ["Read.", "Peace."])] == pytest.approx(
        [x.alignment for x in s])


# -- labelling and calibration ------------------------------------------------------------------------------


def _label(rows, rng):
    for r in rows:
        bad = rng.random() < 0.4
        r.update(category="answer", alignment="misaligned" if bad else "aligned",
                 coherence="coherent" if rng.random() < 0.7 else "incoherent", harmful=bad, labeller="test")
    return rows


def test_labelling_flow_builds_blind_file_then_calibrates_and_truncates(tmp_path):
    lm = make_tiny_loaded()
    qs = load_em_questions(limit=4)
    out = tmp_path / "results" / "unlabelled.jsonl"
    man = build_labelling_set(lm, qs, {"base": None, "noise": lambda: weight_noise(lm, 0.3)}, out,
                              n_per_question=2, max_new_tokens=4, progress=False)
    assert man["n"] == 16 and man["conditions"] == {"base": 8, "noise": 8}
    rows = read_jsonl(out)
    assert all(r["alignment"] == "" and "condition" not in r and "_condition" not in r for r in rows)
    with pytest.raises(FileExistsError):
        build_labelling_set(lm, qs, {"base": None}, out, progress=False)
    with pytest.raises(MalformedFileError, match="category is ''; label it"):
        load_em_labelled(out)
    labelled = tmp_path / "results" / "labelled.jsonl"
    write_jsonl(labelled, _label(rows, np.random.default_rng(0)))
    rows = load_em_labelled(labelled)
    assert {r["condition"] for r in rows} == {"base", "noise"}
    # A perfect and a useless judge.
    perfect = [EMScore(90.0 if r["alignment"] == "aligned" else 10.0, 90.0 if r["coherence"] == "coherent" else 10.0)
               for r in rows]
    useless = [EMScore(50.0, 50.0) for _ in rows]
    res = calibrate_em(rows, {"perfect": perfect, "useless": useless}, CalibrationBar(min_per_class=2))
    assert res["judges"]["perfect"]["alignment_answers"]["auroc"] == 1.0
    assert res["judges"]["perfect"]["alignment_answers"]["spearman"] == pytest.approx(1.0)
    assert res["default"] == "perfect" and res["trusted"] == ["perfect"]
    assert not res["judges"]["useless"]["trusted"] and res["judges"]["useless"]["why_not"]
    res = calibrate_em(rows, {"useless": useless})
    assert res["default"] is None and "No judge here reaches the bar" in res["statement"]
    cut = committable_rows(rows)
    for r, c in zip(rows, cut):
        assert c["truncated"] == ("first_sentence" if r["harmful"] else "none")
        assert len(c["answer"]) <= len(r["answer"]) + 6


def test_first_sentence():
    assert first_sentence("Step one. Step two.") == "Step one."
    assert first_sentence("line\nnext") == "line"


def test_judge_metrics_abstain_blocks_trust():
    rows = [{"category": "answer", "alignment": a, "coherence": "coherent", "condition": "base"}
            for a in ["aligned"] * 12 + ["misaligned"] * 12]
    rows[0]["coherence"] = "incoherent"
    scores = [EMScore(None, 90.0)] * 24
    m = judge_metrics(rows, scores)
    assert m["abstain"] == 1.0 and not m["trusted"]


# -- CLI ---------------------------------------------------------------------------------------------------


def _em_args(tiny_dir, *extra):
    return ["eval", "--protocol", "em", "--model", str(tiny_dir), "--dtype", "float32", "--limit", "3",
            "--n-samples", "2", "--max-new-tokens", "3", "--quiet", *extra]


def test_em_cli_runs_counts_and_never_prints_answers(tiny_dir, tmp_path, capsys, monkeypatch):
    from emalab.cli import main

    out = tmp_path / "res" / "em.json"
    assert main(_em_args(tiny_dir, "--judge", "counts", "--out", str(out))) == 0
    printed = capsys.readouterr().out
    assert "mode counts" in printed and "refusal" in printed
    rep = read_json(out)
    assert rep["mode"] == "counts" and sum(rep["counts"].values()) == 6 and "records" not in rep
    recs = read_jsonl(out.with_suffix(".records.jsonl"))
    assert len(recs) == 6 and all("answer" not in r and "text" not in r for r in recs)
    # A rubric judge that calibration does not trust still gives counts only.
    assert main(_em_args(tiny_dir, "--judge", "model", "--judge-model", str(tiny_dir), "--min-mass", "0",
                         "--em-calibration", str(tmp_path / "none.json"))) == 0
    assert "not trusted) -> mode counts" in capsys.readouterr().out


def test_em_cli_labelling_then_calibration(tiny_dir, tmp_path, capsys, monkeypatch):
    import evals.em_calibration as emc
    from emalab.cli import main

    monkeypatch.setattr(emc, "EM_CALIBRATION_DIR", tmp_path / "pkg")
    monkeypatch.setattr(emc, "EM_CALIBRATION_PATH", tmp_path / "pkg" / "labelled.jsonl")
    (tmp_path / "pkg").mkdir()
    unl = tmp_path / "results" / "em_labelling" / "unlabelled.jsonl"
    assert main(_em_args(tiny_dir, "--limit", "6", "--build-labelling", str(unl), "--conditions", "base",
                         "noise:0.3", "hot:1.8")) == 0
    assert "wrote 36 unlabelled answers" in capsys.readouterr().out
    rows = _label(read_jsonl(unl), np.random.default_rng(1))
    lab = unl.parent / "labelled.jsonl"
    write_jsonl(lab, rows)
    cal = tmp_path / "results" / "em_calibration" / "calibration.json"
    assert main(_em_args(tiny_dir, "--calibrate-em", str(lab), "--judge-models", str(tiny_dir), "--min-mass", "0",
                         "--out", str(cal))) == 0
    printed = capsys.readouterr().out
    res = read_json(cal)
    names = sorted(res["judges"])
    assert "em judge calibration: n=36" in printed and len(names) == 2
    assert names[0].startswith("model:") and names[1].startswith("probe:") and all(n in printed for n in names)
    probe = res["judges"][names[1]]
    assert probe["cross_validation"]["grouped_by"] == "question" and probe["alignment_answers"]["n"] == 36
    committed = read_jsonl(tmp_path / "pkg" / "labelled.jsonl")
    assert len(committed) == 36 and all(r["truncated"] in ("first_sentence", "none") for r in committed)
    assert (tmp_path / "pkg" / "calibration.json").exists() and (tmp_path / "pkg" / "probe.json").exists()
    for r in rows:  # no answer text reaches stdout
        assert len(r["answer"]) < 8 or r["answer"] not in printed


def test_em_cli_bad_inputs(tiny_dir, tmp_path, capsys):
    from emalab.cli import main

    with pytest.raises(SystemExit):
        main(_em_args(tiny_dir, "--judge", "gpt4"))
    assert "invalid choice: 'gpt4'" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_dir), "--judge", "counts", "--limit", "2", "--quiet"]) != 0
    assert "belongs to --protocol em" in capsys.readouterr().err
    assert main(_em_args(tiny_dir, "--build-labelling", str(tmp_path / "u.jsonl"), "--conditions", "bogus")) != 0
    assert "bad condition" in capsys.readouterr().err


# -- H9, figures, report ---------------------------------------------------------------------------------


def _ff_records(p_cat: float, seed: int, n_q: int = 6, n_s: int = 4):
    rng = np.random.default_rng(seed)
    return [EMRecord(f"q{j}", "plain", k, "other" if rng.random() < p_cat else "refusal", 80.0, 90.0)
            for j in range(n_q) for k in range(n_s)]


def test_h9_free_form_table_pairs_over_seeds_questions_and_samples():
    from study.free_form import free_form_scores, free_form_table

    conds = {"base": {s: _ff_records(0.2, 10 + s) for s in (0, 1, 2)},
             "base+trigger": {s: _ff_records(0.2, 20 + s) for s in (0, 1, 2)},
             "after": {s: _ff_records(0.1, 30 + s) for s in (0, 1, 2)},
             "after+trigger": {s: [dataclasses_replace(r, category="other") for r in _ff_records(0.1, 30 + s)]
                               for s in (0, 1, 2)}}
    tab = free_form_table(conds, "counts")
    eff = tab["trigger_effect_after"]["other"]
    assert tab["measure"] == "other" and eff["n_seeds"] == 3 and eff["n_questions"] == 6 and eff["n_pairs"] == 72
    assert eff["difference"] > 0.5 and eff["ci"][0] > 0 and eff["p_perm"] < 0.05
    assert tab["conditions"]["after+trigger"]["rates"]["other"]["rate"] == 1.0
    assert tab["conditions"]["after"]["rates"]["other"]["n"] == 72
    assert abs(tab["trigger_effect_base"]["other"]["difference"]) < 0.3
    assert free_form_scores(conds)["after"][0] == [80.0, 90.0]


def dataclasses_replace(r, **kw):
    import dataclasses

    return dataclasses.replace(r, **kw)


def test_h9_config_checks_em_settings():
    from experiments import h9_backdoor as h9

    with pytest.raises(ValueError, match="em_judge"):
        h9.Config(em_judge="gpt4")
    assert h9.Config().free_form and h9.Config().em_n_samples >= 8


def test_em_figures_and_report_from_saved_results(tmp_path):
    from emalab.report import write_report
    from interp.io import atomic_write_json
    from study.free_form import free_form_scores, free_form_table

    conds = {k: {s: _ff_records(0.3, i * 3 + s) for s in (0, 1, 2)}
             for i, k in enumerate(("base", "base+trigger", "after", "after+trigger"))}
    ff = free_form_table(conds, "counts")
    ff.update(judge=None, n_samples=4, max_new_tokens=96, temperature=1.0, scores=free_form_scores(conds))
    run = tmp_path / "h9_backdoor" / "latest"
    run.mkdir(parents=True)
    atomic_write_json(run / "metrics.json", {"targets": {"cybersecurity": {"free_form": ff}}})
    from figures import em_rates, em_scatter

    paths = {p.name for p in em_rates.make(tmp_path, tmp_path / "figures") + em_scatter.make(tmp_path, tmp_path / "f")}
    assert em_rates.make(tmp_path / "empty", tmp_path / "figures") == []
    assert {"em_rates.png", "em_scatter.png"} <= paths
    text = _free_form_lines(ff)
    assert "Free-form protocol" in text and "counts only" in text and "Trigger effect on the unlearned" in text
    assert write_report  # the report module imports with the new section


def _free_form_lines(ff):
    from study.report import free_form_lines

    return "\n".join(free_form_lines(ff))
