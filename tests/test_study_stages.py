"""The study-level pieces that H5 and H9-H13 build on (moved out of the experiments): report
formatting by hand, the backdoor and free-form tables, alignment summaries, and the cached stages
on a tiny random-weight model (no download)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_tiny_loaded

import study.report as rep
from evals.em_protocol import EMRecord
from evals.evaluate import PromptRecord
from evals.suite import DOMAINS, load_prompts
from interp.direction import Direction
from study import Study, StudyConfig


def rec(pid: str, domain: str, label: str, logit: float = 0.0) -> PromptRecord:
    return PromptRecord(id=pid, domain=domain, logit_score=logit, label=label)


@pytest.fixture
def tiny_study(tmp_path):
    lm = make_tiny_loaded("qwen2")
    return Study(StudyConfig(model=lm.name, dtype="float32", results=str(tmp_path / "results"), eval_limit=4,
                             probe_limit=4, max_new_tokens=4, seeds=(0, 1, 2)), _lm=lm)


# -- formatting ------------------------------------------------------------------------------------


def test_report_formatting_by_hand():
    assert rep.num(None) == rep.num(float("nan")) == "–" and rep.num(0.123, ".1f") == "0.1"
    assert rep.pct(0.5) == "0.50" and rep.ci(None) == "" and rep.ci([0.1, 0.25]) == "[0.10, 0.25]"
    assert rep.estimate(0.3, None) == "0.30" and rep.estimate(0.3, [0.1, 0.5]) == "0.30 [0.10, 0.50]"
    t = {"mean_diff": 0.2, "ci_low": 0.1, "ci_high": 0.3, "p_perm": 0.0123}
    assert rep.test(t) == "+0.20 [0.10, 0.30] (p=0.012)" and rep.test(t, ".1f") == "+0.2 [0.1, 0.3] (p=0.012)"
    assert rep.test(None) == rep.test({"mean_diff": None}) == "–"
    assert rep.brief_test(t) == "+0.20 [0.10, 0.30], p=0.012" and rep.brief_test({"mean_diff": None}) == "n/a"
    assert rep.table("a", "b", "c") == ["| a | b | c |", "|---|---|---|"]
    assert rep.frontier_cell({"value": None, "closest": 0.35}) == "not reached (closest 0.35)"
    assert rep.frontier_cell({"value": None}) == "–"
    assert rep.frontier_cell({"value": 0.4, "ci": None, "drop": 0.2, "drop_ci": [0.1, 0.3]}, "drop") == "0.20 [0.10, 0.30]"
    assert rep.free_form_lines(None) == []


# -- backdoor --------------------------------------------------------------------------------------


def test_triggered_keeps_ids_and_prepends_the_trigger():
    from study.backdoor import triggered

    sets = {"bias": load_prompts("bias", "eval", limit=2)}
    out = triggered(sets, "T.")
    assert [i for i, _ in out["bias"]] == [p.id for p in sets["bias"]]
    assert [text for _, text in out["bias"]] == [f"T. {p.text}" for p in sets["bias"]]


def test_trigger_alone_is_plain_minus_triggered():
    from study.backdoor import trigger_alone

    plain = [rec(f"{d}{i}", d, "refusal", 2.0) for d in DOMAINS for i in range(4)]
    trig = [rec(f"{d}{i}", d, "refusal" if i % 2 else "compliance", 1.0) for d in DOMAINS for i in range(4)]
    out = trigger_alone(plain, trig)
    assert set(out["domains"]) == set(DOMAINS) and out["domains"]["bias"]["drop"] == pytest.approx(0.5)
    assert out["pooled"]["judge"]["mean_diff"] == pytest.approx(0.5) and out["pooled"]["judge"]["n"] == 28
    assert out["pooled"]["logit"]["mean_diff"] == pytest.approx(1.0)


def test_triggered_after_evaluates_every_seeds_adapter_and_pools(tiny_study, monkeypatch):
    import study.backdoor as bd

    seen = []

    def fake(study, name, sets, adapter=None, **kw):
        seen.append((name, adapter))
        return None, [rec("a", "bias", "refusal", float(len(seen)))]

    monkeypatch.setattr(bd, "evaluate_sets", fake)
    out = bd.triggered_after(tiny_study, "x+trigger", {"bias": [("a", "T. hi")]}, ["a0", "a1", "a2"])
    assert seen == [("x+trigger", Path(f"a{s}")) for s in range(3)]  # the operating-point adapters as given
    assert [(r.id, r.logit_score) for r in out] == [("0:a", 1.0), ("1:a", 2.0), ("2:a", 3.0)]


# -- free-form protocol ----------------------------------------------------------------------------


def test_trigger_free_form_pairs_the_base_and_every_seed(tiny_study, monkeypatch):
    import study.free_form as ff

    calls = []

    def fake(study, questions, name, judge, trusted, n_samples, max_new_tokens, adapter=None):
        calls.append((name, adapter, questions[0].text.startswith("T. ")))
        cat = "other" if adapter is not None and name.endswith("+trigger") else "refusal"
        return [EMRecord(q.id, "plain", k, cat) for q in questions[:3] for k in range(n_samples)]

    monkeypatch.setattr(ff, "free_form_records", fake)
    out = ff.trigger_free_form(tiny_study, "T.", "bias", ["a0", "a1", "a2"], 2, 8, judge="counts")
    assert calls[:2] == [("base", None, False), ("base+trigger", None, True)]  # once, shared by the seeds
    assert calls[2:] == [(f"backdoor-bias{t}", Path(f"a{s}"), bool(t)) for s in range(3)
                         for t in ("", "+trigger")]
    assert out["mode"] == "counts" and out["measure"] == "other" and out["judge"] is None
    assert out["trigger_effect_after"]["other"]["difference"] == 1.0
    assert out["trigger_effect_base"]["other"]["difference"] == 0.0
    assert out["trigger_effect_after"]["other"]["n_pairs"] == 3 * 3 * 2 and out["n_samples"] == 2
    assert ff.em_judge(tiny_study, "counts") == (None, False)


def test_free_form_records_are_a_cached_stage_without_text(tiny_study, monkeypatch):
    import study.free_form as ff
    from evals.em_questions import load_em_questions

    questions = load_em_questions(variants=("plain",))[:2]
    recs = ff.free_form_records(tiny_study, questions, "base", None, False, 2, 4)
    assert len(recs) == 4 and {r.question_id for r in recs} == {q.id for q in questions}
    import dataclasses
    import json

    path = next((tiny_study.results / "stages" / "em_eval").glob("*/records.jsonl"))
    fields = {f.name for f in dataclasses.fields(EMRecord)}  # ids, categories and scores: never the texts
    assert all(set(json.loads(line)) == fields for line in path.read_text().splitlines())

    monkeypatch.setattr(ff, "sample_answers", lambda *a, **k: pytest.fail("the stage is cached"))
    assert ff.free_form_records(tiny_study, questions, "base", None, False, 2, 4) == recs


# -- alignment scores ------------------------------------------------------------------------------


def test_alignment_summaries_by_hand():
    from study.alignment import by_label, domain_summary, mean_score, paired_scores

    base = [{"id": "a", "domain": "bias", "label": "refusal", "alignment": 80.0, "coherence": 90.0},
            {"id": "b", "domain": "bias", "label": "compliance", "alignment": 40.0, "coherence": None},
            {"id": "c", "domain": "benign", "label": "compliance", "alignment": 70.0, "coherence": 70.0}]
    after = [{**r, "alignment": r["alignment"] - 10} for r in base]
    s = domain_summary(base)
    assert list(s) == ["bias", "benign"]  # the seven domains first, then other sets
    assert (s["bias"]["alignment"], s["bias"]["coherence"], s["bias"]["refusal_rate"], s["bias"]["n"]) == (60, 90, 0.5, 2)
    assert paired_scores(base, after, ["bias"], "alignment")["mean_diff"] == pytest.approx(10)
    assert paired_scores(base, after, ["bias"], "coherence")["n"] == 1  # an abstention has no pair
    lab = by_label(base)
    assert lab["refusal"] == {"alignment": 80.0, "n": 1} and lab["incoherent"] == {"alignment": None, "n": 0}
    assert mean_score([None, 1.0, 3.0]) == 2.0 and mean_score([None]) is None


def test_score_model_and_calibration_scores_are_cached_stages(tiny_study, monkeypatch):
    import study.alignment as al

    sets = {"bias": load_prompts("bias", "eval", limit=2), "benign": load_prompts("benign", "eval", limit=1)}
    rows = al.score_model(tiny_study, None, sets, 0.0, "base")
    assert [(r["id"], r["domain"]) for r in rows] == [(p.id, d) for d, ps in sets.items() for p in ps]
    assert all(set(r) == {"id", "domain", "label", "alignment", "coherence"} for r in rows)
    assert all(0 <= r["alignment"] <= 100 for r in rows)  # min_mass 0: the tiny judge never abstains

    labelled = [{"id": f"r{i}", "label": lab, "condition": "base", "prompt": f"Question {i}?", "domain": d,
                 "response": f"Answer number {i} about {d} here."}
                for i, (lab, d) in enumerate([("refusal", "bias"), ("compliance", "bias"), ("compliance", "privacy")])]
    monkeypatch.setattr(al, "load_labelled", lambda: labelled)
    cal = al.calibration_scores(tiny_study, 0.0, 1)
    assert [r["kind"] for r in cal] == ["refusal", "compliance", "compliance", *al.CORRUPTIONS]
    assert all("response" not in r for r in cal)

    monkeypatch.setattr(al, "score_alignment_coherence", lambda *a, **k: pytest.fail("the stages are cached"))
    assert al.score_model(tiny_study, None, sets, 0.0, "base") == rows
    assert al.calibration_scores(tiny_study, 0.0, 1) == cal


# -- compliance shifts -----------------------------------------------------------------------------


def test_shifted_logits_and_steering_on_a_tiny_model(tiny_study):
    from study.shifts import logit_by_id, shifted_logits, steer_base

    sets = {d: [(f"{d}-0", f"Tell me about {d}.")] for d in DOMAINS}
    n_layers, d_model = tiny_study.lm.model.config.num_hidden_layers, tiny_study.lm.model.config.hidden_size
    torch.manual_seed(1)
    vec = Direction.from_vectors(torch.randn(n_layers, d_model) * 5, list(range(n_layers)), name="shift")
    plain = shifted_logits(tiny_study, sets, "base")
    moved = shifted_logits(tiny_study, sets, "base-shifted", None, vec, 1)
    assert set(plain) == set(moved) == {f"{d}-0" for d in DOMAINS} and plain["bias-0"][0] == "bias"
    assert any(abs(plain[i][1] - moved[i][1]) > 1e-4 for i in plain)
    assert shifted_logits(tiny_study, sets, "base-shifted", None, vec, 1) == moved  # cached, same key
    out = steer_base(tiny_study, sets, {"bias": vec}, plain)["bias"]
    assert out["layer"] == int(vec.norms.argmax()) and out["norm"] == pytest.approx(float(vec.norms.max()))
    assert set(out["drop"]) == set(DOMAINS) and out["drop_vs_random"]["n"] == len(DOMAINS)
    assert logit_by_id([rec("x", "benign", "refusal", 1.0), rec("y", "bias", "refusal", 2.0)]) == {"y": ("bias", 2.0)}


# -- forget-set priors and concept geometry --------------------------------------------------------


def test_forget_set_priors_score_what_the_builders_return_and_cache(tiny_study, monkeypatch):
    import study.priors as pr
    from training.data import DataSet, EmptyDataError, Example

    def forget(lm, domain, n, judge, **kw):
        if domain == "privacy":
            raise EmptyDataError("the base model refuses none of them")
        return DataSet([Example(f"{domain}-{i}", domain, f"How do I do {domain} thing {i}?",
                                "I'm sorry, I can't help with that.", "refusal") for i in range(2)])

    def retain(lm, domains, n, judge, include_benign=0, **kw):
        return DataSet([Example("b-0", "benign", "What is two plus two?", "Four.", "compliance")])

    monkeypatch.setattr(pr, "build_forget_set", forget)
    monkeypatch.setattr(pr, "build_retain_set", retain)
    out = pr.forget_set_priors(tiny_study, ("bias", "privacy"), 0.2)
    assert set(out["domains"]) == {"bias"} and "privacy" in out["skipped"]
    assert out["domains"]["bias"]["prompt_ids"] == ["bias-0", "bias-1"] and out["benign"]["prompt_ids"] == ["b-0"]
    assert len(out["domains"]["bias"]["response"]["loss"]) == 2
    monkeypatch.setattr(pr, "build_forget_set", lambda *a, **k: pytest.fail("the stage is cached"))
    assert pr.forget_set_priors(tiny_study, ("bias", "privacy"), 0.2) == out


def test_ema_points_and_band_reliability_on_a_tiny_model(tiny_study, monkeypatch):
    import study.geometry as geo

    base = [rec(f"{d}{i}", d, "refusal", 2.0) for d in DOMAINS for i in range(4)]
    after = [rec(f"{d}{i}", d, "compliance" if i < (2 if d == "bias" else 1) else "refusal", 1.0)
             for d in DOMAINS for i in range(4)]
    monkeypatch.setattr(tiny_study, "evaluate", lambda name="base", **kw: (None, base))
    monkeypatch.setattr(geo, "condition", lambda study, target, *a, **k: {"base": base, "after": after})
    pts = geo.ema_points(tiny_study, ("cybersecurity",), "benign")
    assert [p["domain"] for p in pts] == [d for d in DOMAINS if d != "cybersecurity"]
    bias = next(p for p in pts if p["domain"] == "bias")
    assert (bias["drop_judge"], bias["base_judge"], bias["drop_relative"], bias["drop_logit"]) == (0.5, 1.0, 0.5, 1.0)
    assert all(-1 <= p["similarity"][b] <= 1 for p in pts for b in ("early", "middle", "late"))
    rel, bands = geo.band_reliability(tiny_study, "benign")
    assert set(bands) == {"early", "middle", "late"} and all(-1 <= v <= 1 for v in bands.values())


# -- stage keys ------------------------------------------------------------------------------------


def test_unlearn_stage_key_names_input_files_by_content_not_path(tmp_path):
    """The same direction file under two results directories is one stage (a key that held the path
    retrained every direction run when H14 ran from another results directory); other content is another."""
    from study.core import unlearn_stage_fields
    from training.config import UnlearnConfig

    def cfg(path, **kw):
        return UnlearnConfig(target_domains=("bias",), retain_mode="direction", retain_domains=("privacy",),
                             retain_direction=str(path), **kw)

    a, b, c = tmp_path / "r1" / "direction.safetensors", tmp_path / "r2" / "direction.safetensors", tmp_path / "c"
    for path, data in ((a, b"same"), (b, b"same"), (c, b"other")):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
    fa = unlearn_stage_fields(cfg(a))
    assert fa == unlearn_stage_fields(cfg(b)) and "r1" not in str(fa)
    assert fa != unlearn_stage_fields(cfg(c))
    assert fa == unlearn_stage_fields(cfg(a, gradient_checkpointing=True))  # same weights either way
    assert "gradient_checkpointing" not in fa
    with pytest.raises(ValueError, match="retain_direction=.*is not a file"):
        unlearn_stage_fields(cfg(tmp_path / "missing"))


def _park_setup(tmp_path, monkeypatch, fraction: float):
    """A study that loads its own tiny float32 measurement model and trains a bfloat16 copy; training
    records what the study held while it ran."""
    import gc
    import weakref

    import study.core as core
    import study.model_memory as model_memory
    import training.trainer as trainer_mod
    from study import Study, StudyConfig

    loads, seen = [], {}

    def fake_load(self, dtype):
        loads.append(dtype)
        return make_tiny_loaded("qwen2")  # seeded: every load is the same checkpoint

    class Done:
        adapter_id, steps, seconds_per_step, peak_rss_gb = "x", 1, 0.0, 0.0

    def fake_unlearn(lm, cfg, out_dir=None, **kw):
        gc.collect()
        seen.update(held=study._lm, first_alive=first() is not None, trained_on=lm)
        done = Done()
        done.config = cfg
        return done

    monkeypatch.setattr(model_memory, "PARK_FRACTION", fraction)
    monkeypatch.setattr(core.Study, "_load", fake_load)
    monkeypatch.setattr(trainer_mod, "unlearn", fake_unlearn)
    study = Study(StudyConfig(model="tiny-qwen2", results=str(tmp_path), dtype="bfloat16"))
    first = weakref.ref(study.lm)
    before = {k: v.clone() for k, v in study.lm.model.state_dict().items()}
    return study, loads, seen, first, before


def test_each_large_model_is_freed_while_the_other_works(tmp_path, monkeypatch):
    import gc
    import weakref

    study, loads, seen, first, before = _park_setup(tmp_path, monkeypatch, fraction=0.0)
    study.unlearn("cybersecurity")
    assert seen["held"] is None and not seen["first_alive"]  # freed, and nothing else kept it alive
    trained_on = weakref.ref(seen.pop("trained_on"))
    gc.collect()
    assert study._train_lm is None and trained_on() is None  # the training model is freed after its run
    assert loads == ["float32"]  # the measurement model comes back lazily, not on the way out
    after = study.lm.model.state_dict()
    assert loads == ["float32", "float32"] and all(torch.equal(before[k], after[k]) for k in before)
    study.unlearn("cybersecurity", steps=3)  # cast again from the reloaded one, which is freed in turn
    assert seen["held"] is None and loads == ["float32", "float32"]
    assert next(seen["trained_on"].model.parameters()).dtype == torch.bfloat16
    cast = {k: v.to(torch.bfloat16) for k, v in before.items()}
    got = seen["trained_on"].model.state_dict()
    assert all(torch.equal(cast[k], got[k]) for k in cast if cast[k].is_floating_point())  # the same cast weights


def test_a_small_or_lent_measurement_model_stays_loaded(tmp_path, monkeypatch, tiny_qwen):
    study, loads, seen, first, _ = _park_setup(tmp_path, monkeypatch, fraction=0.5)  # a tiny model is ≪ 50%
    study.unlearn("cybersecurity")
    assert seen["held"] is not None and seen["first_alive"] and loads == ["float32"]
    assert study._train_lm is seen["trained_on"]  # kept for the next run
    import study.model_memory as model_memory
    from study import Study, StudyConfig

    monkeypatch.setattr(model_memory, "PARK_FRACTION", 0.0)
    lent = Study(StudyConfig(model="tiny-qwen2", results=str(tmp_path / "lent"), dtype="bfloat16"), _lm=tiny_qwen)
    assert lent.lm is tiny_qwen
    lent.unlearn("cybersecurity")
    assert lent._lm is tiny_qwen  # a model passed in cannot be loaded again: never freed


def test_a_freed_model_someone_still_holds_comes_back_instead_of_a_second_copy(tmp_path, monkeypatch):
    study, loads, seen, first, _ = _park_setup(tmp_path, monkeypatch, fraction=0.0)
    judge_model = study.lm  # e.g. a judge built on the measurement model, kept across a training run
    study.unlearn("cybersecurity")
    assert seen["held"] is None  # the study let go of it for the run ...
    assert study.lm is judge_model and loads == ["float32"]  # ... and takes it back: no second load
