"""Issue #15: ``benchmarks.containment_step`` times one optimiser step of every containment method against
NPO + retain-CE and counts the difference in no-grad forwards. Its extra-forward check is computed from
the measured times (never a constant), the methods are built as H14 builds them, and ``lm`` comes back
unchanged. Timings themselves are never compared with a number."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_loaded

from benchmarks import containment_step as cs
from benchmarks import speed
from benchmarks.harness import BenchConfig, read_results, write_result
from benchmarks.report import render_markdown

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(reps=3, warmup=1, train_batch=2, train_response_tokens=4, machine="test-machine")


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(getattr(m, "_forward_hooks_with_kwargs", {})) for m in model.modules())


def _snapshot(lm) -> dict:
    batch = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        logits = lm.model(input_ids=batch).logits.clone()
    return {"model": lm.model, "state": {k: v.clone() for k, v in lm.model.state_dict().items()},
            "flags": {n: p.requires_grad for n, p in lm.model.named_parameters()}, "training": lm.model.training,
            "hooks": _hooks(lm.model), "extra": dict(lm.extra), "logits": logits, "batch": batch}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    lm = make_tiny_loaded("qwen2")
    before = _snapshot(lm)
    cfg = BenchConfig(**TINY, only=("containment_step",), out_dir=str(tmp_path_factory.mktemp("results")))
    results = speed.run(lm, cfg)
    assert [r.bench for r in results] == ["containment_step"]
    return lm, before, results[0]


def test_every_method_is_timed_with_its_ratio_to_ce(run):
    _, _, r = run
    d = json.loads(json.dumps(r.to_dict()))  # the result file round-trips
    assert list(d["variants"]) == [cs.FORWARD, *cs.METHODS]
    for k, v in d["variants"].items():
        assert len(v["times_s"]) == TINY["reps"] and min(v["times_s"]) > 0
    assert set(d["ratios"]) == {f"ce/{m}" for m in cs.METHODS if m != "ce"}
    for m in cs.METHODS[1:]:
        assert d["ratios"][f"ce/{m}"]["ratio"] == pytest.approx(r.variants[m].median_s / r.variants["ce"].median_s)
    assert d["checks"]["peak_rss_gb"] > 0


def test_the_extra_forward_check_comes_from_the_measured_times(run):
    _, _, r = run
    t = {k: v.median_s for k, v in r.variants.items()}
    for m in cs.METHODS[1:]:
        want = (t[m] - t["ce"]) / t[cs.FORWARD]
        assert r.checks[f"{m}_extra_forwards_vs_ce"] == pytest.approx(want)
        assert r.variants[m].extra["extra_forwards_vs_ce"] == pytest.approx(want)
        assert r.checks[f"{m}_within_one_forward"] is (want <= 1.0) is r.variants[m].extra["pass"]
    assert "extra_forwards_vs_ce" not in r.variants["ce"].extra
    assert r.checks["all_within_one_forward"] is all(r.checks[f"{m}_within_one_forward"] for m in cs.METHODS[1:])


def test_the_reference_is_computed_once_as_the_trainer_does(run):
    """The timed kl / repr / direction steps read a reference computed once (the trainer's per-run
    precompute), whose one-off time and bytes are reported; kl's bytes are response tokens × vocab × bytes."""
    from benchmarks.data import step_batches

    lm, _, r = run
    _, rb = step_batches(lm.tokenizer, TINY["train_batch"], TINY["train_response_tokens"])
    for m in ("kl", "repr", "direction"):
        assert r.variants[m].extra["reference_once_s"] > 0 and r.variants[m].extra["reference_bytes"] > 0
    for m in ("ce", "gate"):
        assert "reference_once_s" not in r.variants[m].extra
    width = next(lm.model.parameters()).element_size()
    assert r.variants["kl"].extra["reference_bytes"] == int(rb.response_mask.sum()) * lm.model.config.vocab_size * width
    assert any("computed once per run" in n for n in r.notes)


def test_extra_forwards_is_computed_from_what_it_is_given():
    times = {"forward": [1.0, 2.0, 1.0], "ce": [10.0, 10.0, 10.0], "kl": [10.5, 11.0, 11.0],
             "repr": [12.0, 13.0, 12.0], "gate": [8.0, 8.0, 8.0]}
    got = cs.extra_forwards(times)
    assert set(got) == {"kl", "repr", "gate"}
    assert got["kl"] == {"extra_forwards_vs_ce": pytest.approx(1.0), "paired": pytest.approx(0.5), "pass": True}
    assert got["repr"]["extra_forwards_vs_ce"] == pytest.approx(2.0) and got["repr"]["pass"] is False
    assert got["repr"]["paired"] == pytest.approx(2.0)
    assert got["gate"]["extra_forwards_vs_ce"] == pytest.approx(-2.0) and got["gate"]["pass"] is True
    # a slower forward makes the same difference fewer forwards
    slower = cs.extra_forwards({**times, "forward": [3.0, 3.0, 3.0]})
    assert slower["repr"]["extra_forwards_vs_ce"] == pytest.approx(2 / 3) and slower["repr"]["pass"] is True
    assert cs.extra_forwards(times, bar=2.5)["repr"]["pass"] is True
    with pytest.raises(ValueError):
        cs.extra_forwards({**times, "forward": [0.0, 0.0, 0.0]})


def test_lm_is_left_as_it_came(run):
    lm, before, _ = run
    from training.lora import has_adapter

    assert not has_adapter(lm) and lm.model is before["model"]
    assert _hooks(lm.model) == before["hooks"]
    assert lm.model.training == before["training"] and lm.extra == before["extra"]
    assert {n: p.requires_grad for n, p in lm.model.named_parameters()} == before["flags"]
    state = lm.model.state_dict()
    assert state.keys() == before["state"].keys()
    assert all(torch.equal(state[k], v) for k, v in before["state"].items())
    with torch.no_grad():
        # The weights are checked bit for bit above; the logits only to float tolerance, since with
        # several threads the same matmul may sum in another order from one call to the next.
        torch.testing.assert_close(lm.model(input_ids=before["batch"]).logits, before["logits"], atol=1e-5, rtol=1e-5)


def test_the_methods_are_built_as_h14_builds_them():
    from experiments.h14_containment_frontier import Config

    h14 = Config.__dataclass_fields__
    assert cs.REPR_LAYERS == h14["repr_layers"].default and cs.GATE_LAYER == h14["gate_layer"].default
    assert set(cs.METHODS) == set(h14["methods"].default)
    lm = make_tiny_loaded("qwen2")  # 4 layers
    cfgs = cs.method_configs(lm, 1e-6)
    assert {m: c.retain_mode for m, c in cfgs.items()} == {"ce": "ce", "kl": "kl", "repr": "repr",
                                                           "direction": "direction", "gate": "none"}
    assert cfgs["repr"].repr_layers == (3,) and cfgs["repr"].repr_distance == "cosine"
    assert cfgs["gate"].concept_gate and cfgs["gate"].gate_layer == 3
    assert cs.clipped_layers((4, 8, 12), 24) == (4, 8, 12) and cs.clipped_layers((4, 8, 12), 10) == (4, 8, 9)


def test_the_containments_are_what_the_trainer_would_use():
    from benchmarks.data import step_batches
    from training.containment import last_prompt_index
    from training.lora import attach_lora, detach_lora

    lm = make_tiny_loaded("qwen2")
    fb, rb = step_batches(lm.tokenizer, 2, 4)
    cfgs = cs.method_configs(lm, 1e-6)
    attach_lora(lm, rank=4, alpha=8.0, targets=("all-linear",))
    try:
        held = cs.method_containments(lm, cfgs, fb, rb)
        assert held["ce"] is None and held["kl"] is None and held["repr"] is None
        d = held["direction"].direction
        assert d.layers == [0, 1, 2, 3] and torch.allclose(d.vectors.norm(dim=-1), torch.ones(4))
        gate = held["gate"].gate
        assert gate.layer == 3 and gate.vector.norm() == pytest.approx(1.0, abs=1e-5)

        def g(b):
            return gate.values(gate.scores(lm, b.input_ids, b.attention_mask, last_prompt_index(b.response_mask)))

        assert float(g(fb).mean()) > 0.5 > float(g(rb).mean())  # calibrated: open on forget, shut on retain
    finally:
        detach_lora(lm)


def test_only_selects_containment_step():
    import argparse

    from benchmarks.cli import add_arguments
    from interp.config import config_from_args

    assert BenchConfig(only="containment_step").suite == ("speed",)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--only", "train_phases,containment_step", "--dtype", "float32", "--reps", "3"])
    got = config_from_args(BenchConfig, args)
    assert got.only == ("train_phases", "containment_step") and got.suite == ("speed",)


def test_the_result_renders_a_row_per_method(run, tmp_path):
    _, _, r = run
    write_result(r, tmp_path, "tiny")
    md = render_markdown(read_results(tmp_path))
    assert "### containment_step" in md and "extra forwards vs `ce`" in md
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| `")}
    for m in cs.METHODS:
        assert f"`{m}`" in rows
    for m in cs.METHODS[1:]:
        cells = [c.strip() for c in rows[f"`{m}`"].split("|")]
        assert cells[4] == f"{r.checks[f'{m}_extra_forwards_vs_ce']:+.2f}"
        assert cells[5] == ("yes" if r.checks[f"{m}_within_one_forward"] else "**no**")
