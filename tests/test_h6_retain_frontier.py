"""H6's verdict on planted trajectories (no model): a retain set chosen where the refusal is at risk
keeps more untouched refusal than random ones at matched forgetting (replicated), the reverse truth is
not replicated, a strategy short of the primary level is inconclusive and says "not reached", and the
held-out domains (retained by no strategy) are compared on their own."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from conftest import planted_trajectory

import experiments.h6_prediction_guided_retain as h6
from evals.suite import DOMAINS
from study import StudyConfig
from study.frontier import Condition
from study.retain_sets import NO_HELD_OUT, compare_retain_sets, held_out_domains, retain_strategies

FAST = [0.8, 0.4, 0.1, 0.0, 0.0]
SHORT = [0.8, 0.5, 0.2, 0.15, 0.15]  # reaches 0.25, never 0.10
TARGETS = ("cybersecurity", "safety")


def _draws(target: str) -> list[list[str]]:
    s = retain_strategies(target, {d: 0.0 for d in DOMAINS}, 2, 6, 2)
    return [v["retain_domains"] for n, v in s.items() if n.startswith("random")]


def _predicted(target: str) -> list[str]:
    """The two untouched domains the random draws use least (so predicted differs from every draw)."""
    untouched = [d for d in DOMAINS if d != target]
    uses = {d: sum(d in draw for draw in _draws(target)) for d in untouched}
    return sorted(untouched, key=lambda d: uses[d])[:2]


def _curve(target_curve, final: float) -> list[float]:
    """A domain's refusal falling from 0.7 to ``final`` in step with the target's forgetting."""
    return [0.7 - (0.7 - final) * (0.8 - t) / 0.8 for t in target_curve]


def _run(monkeypatch, tmp_path, at_risk, short=()):
    """Plant: a retained domain keeps its refusal; an unretained one falls to 0.1 if it is at risk
    (``at_risk[target]``), else to 0.6. Strategies named in ``short`` never forget the target to 0.10."""
    seen = {}

    def fake_runs(study, target, method="npo", retain_domains=(), name=None, sets=None, **kw):
        seen[(name, target)] = (retain_domains, kw)
        strategy = name.removeprefix("retain_").rsplit("-", 1)[0]
        t = SHORT if strategy in short else FAST
        finals = {d: 0.7 if d in retain_domains else 0.1 if d in at_risk[target] else 0.6
                  for d in DOMAINS if d != target}
        return [planted_trajectory(target, t, None, seed=s, domain_curves={
            **{d: _curve(t, f) for d, f in finals.items()}, "benign": [0.02] * 5, "over_refusal": [0.3] * 5})
            for s in study.cfg.seeds]

    sims = {t: {d: 1.0 if d in _predicted(t) else 0.1 * i for i, d in enumerate(DOMAINS)} for t in TARGETS}
    monkeypatch.setattr(h6, "trajectory_runs", fake_runs)
    monkeypatch.setattr(h6, "trajectory_sets", lambda study: {})
    monkeypatch.setattr(h6.Study, "concepts", lambda self: SimpleNamespace(direction=lambda t: t, layers=[0, 1, 2]))
    monkeypatch.setattr(h6, "early_similarity", lambda concepts, target, band, n: sims[target])
    m = h6.main(h6.Config(study=StudyConfig(results=str(tmp_path), seeds=(0, 1, 2)), n_boot=200))
    return m, seen


def test_retaining_the_at_risk_domains_beats_random_ones(monkeypatch, tmp_path):
    m, seen = _run(monkeypatch, tmp_path, {t: _predicted(t) for t in TARGETS})
    c = m["claim"]
    assert c["id"] == "L1" and c["status"] == "replicated", c["evidence"]
    for t in TARGETS:
        v = m["targets"][t]
        assert v["strategies"]["predicted"]["retain_domains"] == _predicted(t)
        assert [v["strategies"][f"random{j}"]["retain_domains"] for j in (1, 2)] == _draws(t)
        r = v["vs_random"]["untouched"]
        assert r["ci"][0] > 0 and r["difference"] == pytest.approx(r["first"] - r["second"])
        assert set(v["per_draw"]) == {"random1", "random2"} and all(d["ci"][0] > 0 for d in v["per_draw"].values())
        # Every strategy on the frontier; the references at the same budget or none.
        assert {k for k in m["conditions"] if k.endswith(t)} == {f"{n}|{t}" for n in v["strategies"]}
        assert v["strategies"]["all"]["per_domain"] == 2 and v["strategies"]["all"]["budget"] == 12
    # The retain runs: the same budget for predicted and random; none is H13/H14's NPO (the same stages).
    domains, kw = seen[("retain_predicted-cybersecurity", "cybersecurity")]
    assert domains == tuple(_predicted("cybersecurity")) and kw == {"n_retain_per_domain": 6}
    assert seen[("npo-safety", "safety")] == ((), {})
    # Held out: cybersecurity keeps one domain no strategy retains, whose refusal no choice props up;
    # safety's draws and prediction cover every untouched domain, and the comparison says so.
    cyber, safety = m["targets"]["cybersecurity"], m["targets"]["safety"]
    assert cyber["held_out"] == ["privacy"]
    assert cyber["vs_random"]["held_out"]["difference"] == pytest.approx(0.0, abs=1e-9)
    assert cyber["held_out_refusal"]["predicted"]["0.1"]["value"] == pytest.approx(0.6 + 0.1 / 8, abs=0.01)
    assert safety["held_out"] == [] and safety["vs_random"]["held_out"]["note"] == NO_HELD_OUT
    assert (tmp_path / h6.EXPERIMENT / "latest" / "metrics.json").exists()
    text = "\n".join(h6.report_section(m))
    assert "Held out (retained by no k-strategy): privacy." in text and "| predicted | cybersecurity | 0.1 |" in text
    assert "Predicted − random (safety, target refusal 0.25, secondary;" in text and "per draw: random1 +" in text
    from figures import frontier, frontier_retain

    # The figure is saved under its own name, not the last condition's (frontier.make is H13's and H14's too).
    names = {p.name for p in frontier_retain.make(tmp_path, tmp_path / "figures")}
    assert names == {f"frontier_retain{x}.{ext}" for x in ("", "_domains_cybersecurity", "_domains_safety")
                     for ext in ("png", "pdf")}
    assert "frontier.png" in {p.name for p in frontier.make(tmp_path, tmp_path / "f2", h6.EXPERIMENT)}


def test_retaining_the_safe_domains_is_not_replicated(monkeypatch, tmp_path):
    risk = {t: [d for d in DOMAINS if d != t and d not in _predicted(t)] for t in TARGETS}
    m, _ = _run(monkeypatch, tmp_path, risk)
    assert m["claim"]["status"] == "not replicated", m["claim"]["evidence"]
    assert all(v["vs_random"]["untouched"]["ci"][1] < 0 for v in m["targets"].values())


def test_a_strategy_short_of_the_primary_level_is_inconclusive_and_not_reached(monkeypatch, tmp_path):
    m, _ = _run(monkeypatch, tmp_path, {t: _predicted(t) for t in TARGETS}, short=("predicted",))
    c = m["claim"]
    assert c["status"] == "inconclusive" and "inconclusive because cybersecurity: not reached by predicted" in c["evidence"]
    r = m["targets"]["cybersecurity"]["vs_random"]["untouched"]
    assert r["difference"] is None and r["closest"]["predicted"] == pytest.approx(0.15, abs=0.01)
    # Compared where it got to, as secondary evidence only.
    assert m["targets"]["cybersecurity"]["vs_random_at"]["0.25"]["untouched"]["ci"][0] > 0
    assert "secondary, at 0.25: cybersecurity +" in c["evidence"]
    assert "not reached (closest 0.15)" in "\n".join(h6.report_section(m))


def test_targets_that_disagree_are_inconclusive(monkeypatch, tmp_path):
    risk = {"cybersecurity": _predicted("cybersecurity"),
            "safety": [d for d in DOMAINS if d != "safety" and d not in _predicted("safety")]}
    m, _ = _run(monkeypatch, tmp_path, risk)
    assert m["claim"]["status"] == "inconclusive" and "the targets disagree in sign" in m["claim"]["evidence"]


def test_config_round_trips_and_runs_from_the_pipeline():
    from emalab.pipeline import PRESETS, PipelineConfig

    cfg = h6.Config(k=3, n_random=4, levels=(0.3, 0.05))
    assert h6.Config.from_dict(cfg.to_dict()) == cfg and h6.PRESETS == ("full",)
    assert "h6_prediction_guided_retain" in PRESETS["full"].experiments
    built = PipelineConfig(experiments=(h6.EXPERIMENT,)).experiment_configs()[h6.EXPERIMENT]
    assert isinstance(built, h6.Config) and built.study.seeds == (0, 1, 2)
    with pytest.raises(ValueError, match="k must be"):
        h6.Config(k=6)
    with pytest.raises(ValueError, match="n_random"):
        h6.Config(n_random=0)
    with pytest.raises(ValueError, match="levels"):
        h6.Config(levels=())


def test_retain_strategies_share_one_budget_and_name_the_held_out_domains():
    sims = {d: float(i) for i, d in enumerate(DOMAINS)}  # privacy most similar, then medical_legal
    s = retain_strategies("safety", sims, 3, 4, 3)
    assert s["predicted"]["retain_domains"] == ["privacy", "medical_legal", "sensitive_content"]
    assert [n for n in s] == ["predicted", "random1", "random2", "random3", "all", "none"]
    assert all(s[n]["budget"] == 12 for n in ("predicted", "random1", "random2", "random3", "all"))
    assert s["all"]["per_domain"] == 2 and s["none"] == {"retain_domains": [], "per_domain": None, "budget": 0}
    assert all("safety" not in v["retain_domains"] and len(v["retain_domains"]) == 3
               for n, v in s.items() if n.startswith("random"))
    assert retain_strategies("safety", sims, 3, 4, 3) == s  # the draws are seeded by target and k
    used = {d for n, v in s.items() if n not in ("all", "none") for d in v["retain_domains"]}
    assert held_out_domains(s, "safety") == [d for d in DOMAINS if d != "safety" and d not in used]
    with pytest.raises(ValueError, match="random"):
        compare_retain_sets({"predicted": Condition("predicted", "safety", [planted_trajectory("safety", FAST, FAST)])},
                            ["bias"], [], (0.1,))
