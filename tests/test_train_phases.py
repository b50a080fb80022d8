"""Issue #17 item 5: the phase breakdown of one unlearning step (``benchmarks.train_phases``) times the
trainer's own step through its phase clock: the clocked step equals the unclocked one (and the check says
so only when it does), its phases add up to the step, and ``--only`` runs just that result. Timings
themselves are never compared with a number."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
from conftest import make_tiny_loaded

from benchmarks import speed, train_phases
from benchmarks.harness import BenchConfig, read_results, write_result
from benchmarks.report import render_markdown

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(reps=3, warmup=1, train_batch=2, train_response_tokens=4, machine="test-machine")
TOTALS = ("sum_of_phases", "phased_step", "step")
EXPECTED = {"npo": ("forget_forward", "forget_backward", "clip", "adamw", "zero_grad"),
            "npo_retain_ce": train_phases.PHASES}


@pytest.fixture(scope="module")
def lm():
    return make_tiny_loaded("qwen2")


@pytest.fixture(scope="module")
def result(lm, tmp_path_factory):
    cfg = BenchConfig(**TINY, only=("train_phases",), out_dir=str(tmp_path_factory.mktemp("results")))
    results = speed.run(lm, cfg)
    assert [r.bench for r in results] == ["train_phases"]  # --only: the peak is measured, not written
    return json.loads(json.dumps(results[0].to_dict())), results[0]


def test_phases_exist_in_order_and_are_positive(result):
    d, _ = result
    for mode, phases in EXPECTED.items():
        got = [k.split(".", 1)[1] for k in d["variants"] if k.startswith(f"{mode}.")]
        assert got == [*phases, *TOTALS]
        for p in phases:
            v = d["variants"][f"{mode}.{p}"]
            assert len(v["times_s"]) == TINY["reps"] and min(v["times_s"]) > 0
            assert ("mfu" in v) == (p.endswith(("_forward", "_backward")))
            if "mfu" in v:
                assert v["mfu"] > 0 and v["flops"] > 0
        assert sum(d["variants"][f"{mode}.{p}"]["fraction"] for p in phases) == pytest.approx(1.0)


def test_phases_add_up_to_the_step(result):
    _, r = result
    for mode in EXPECTED:
        sums = r.variants[f"{mode}.sum_of_phases"].times_s
        walls = r.variants[f"{mode}.phased_step"].times_s
        # the same calls: the clock covers all of each call but a few Python statements around it
        for s, w in zip(sums, walls, strict=True):
            assert 0.8 * w <= s <= w
        # the library's step timed on its own, alternating: equal within the noise of a shared CPU
        ratio = r.checks[f"{mode}_sum_of_phases_over_step"]
        assert ratio == pytest.approx(statistics.median(sums) / r.variants[f"{mode}.step"].median_s)
        assert 0.5 < ratio < 2.0


def test_the_phases_are_the_library_clocks_phases():
    from training.loop import UPDATE_PHASES
    from training.step import STEP_PHASES

    assert sorted(train_phases.PHASES) == sorted({*STEP_PHASES, *UPDATE_PHASES})
    assert train_phases.PHASES[-3:] == UPDATE_PHASES


def test_the_clocked_step_equals_the_unclocked_one(result):
    _, r = result
    for mode in EXPECTED:
        assert r.checks[f"{mode}_max_abs_diff_loss"] == 0
        assert r.checks[f"{mode}_max_abs_diff_losses"] == 0
        assert r.checks[f"{mode}_max_abs_diff_grad"] == 0
        assert r.checks[f"{mode}_grad_max_abs"] > 0
    assert r.checks["npo_retain_ce_abs_diff_grad_cos"] == 0


def _setup(lm):
    from benchmarks.data import step_batches
    from benchmarks.unlearn import reference_logp
    from training.config import UnlearnConfig
    from training.lora import attach_lora

    fb, rb = step_batches(lm.tokenizer, 2, 4)
    attach_lora(lm, rank=4, alpha=8.0, targets=("all-linear",))
    params = [p for p in lm.model.parameters() if p.requires_grad]
    with torch.no_grad():  # B = 0 would leave A's gradient at zero, so the check would only see B's
        for n, p in lm.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    lm.model.train()
    cfg = UnlearnConfig(method="npo", model=lm.name, lora_rank=4, retain_mode="ce")
    return cfg, fb, rb, reference_logp(lm, fb), params


def _scale_forget_gradient(lm, params):
    def clock(phase):
        if phase == "forget_backward":
            for p in params:
                p.grad.mul_(2.0)
    return clock


def _drop_retain_gradient(lm, params):
    mid = {}

    def clock(phase):
        if phase == "forget_backward":
            mid["grads"] = [p.grad.clone() for p in params]
        if phase == "retain_backward":
            for p, g in zip(params, mid["grads"], strict=True):
                p.grad.copy_(g)
    return clock


def _move_weights_for_the_retain_term(lm, params):
    b = [p for n, p in lm.model.named_parameters() if "lora_B" in n]

    def clock(phase):
        with torch.no_grad():
            for p in b:
                if phase == "forget_backward":
                    p.add_(0.05)
                if phase == "retain_backward":
                    p.sub_(0.05)
    return clock


# Clocks with side effects: each changes the clocked step, so the check must see it.
FAULTS = {
    "scale_forget_gradient": _scale_forget_gradient,  # gradients only: the losses stay
    "drop_retain_gradient": _drop_retain_gradient,  # the retain term's gradient lost: the cosine goes too
    "move_weights": _move_weights_for_the_retain_term,  # the retain term on other weights: its loss and gradient
}


@pytest.mark.parametrize("fault", [*FAULTS, None])
def test_the_equality_check_catches_a_clock_that_changes_the_step(fault):
    from training.lora import detach_lora

    lm = make_tiny_loaded("qwen2")
    cfg, fb, rb, ref, params = _setup(lm)
    try:
        clock = FAULTS[fault](lm, params) if fault is not None else None
        diff = train_phases.step_difference(lm, cfg, fb, ref, rb, params, clock=clock)
    finally:
        detach_lora(lm)
    assert all(p.grad is None for p in params)
    assert diff["grad_max_abs"] > 0
    if fault is None:
        assert diff["max_abs_diff_loss"] == 0 and diff["max_abs_diff_grad"] == 0 and diff["abs_diff_grad_cos"] == 0
        return
    assert diff["max_abs_diff_grad"] > 1e-3 * diff["grad_max_abs"]
    if fault == "move_weights":
        assert diff["max_abs_diff_loss"] > 1e-4 and diff["max_abs_diff_losses"] > 1e-4
    else:
        assert diff["max_abs_diff_loss"] == 0 and diff["max_abs_diff_losses"] == 0
    if fault == "drop_retain_gradient":
        assert math.isnan(diff["abs_diff_grad_cos"])  # the clocked step has no retain gradient: no cosine


def test_phase_flops_split_train_flops(lm):
    from benchmarks.data import step_batches
    from interp.flops import forward_flops, lora_params, model_shape, train_flops

    shape = model_shape(lm.model)
    fb, _ = step_batches(lm.tokenizer, 2, 4)
    fwd, bwd = train_phases.phase_flops(shape, fb, rank=8)
    rows = [(int(n), 0) for n in fb.attention_mask.sum(-1).tolist()]
    keep = train_phases._keep(fb) * len(rows)
    tokens = int(fb.attention_mask.sum())
    assert fwd == pytest.approx(forward_flops(shape, rows, keep) + 2 * lora_params(shape, 8) * tokens)
    assert fwd + bwd == pytest.approx(train_flops(shape, rows, keep, lora_rank=8))
    assert 0.8 < bwd / fwd < 2.0  # LoRA: frozen matmuls backpropagate the input gradient only


def test_only_selects_results_and_their_suites():
    from benchmarks.cli import add_arguments
    from interp.config import config_from_args

    assert BenchConfig(only="train_phases").suite == ("speed",)
    cfg = BenchConfig(suite=("refusal",), only=["train_step,activations"])
    assert cfg.only == ("train_step", "activations") and cfg.suite == ("activations", "speed")
    assert BenchConfig.from_dict(cfg.to_dict()) == cfg
    for bad in ("speed", "nope", ""):
        with pytest.raises(ValueError):
            BenchConfig(only=bad)
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--only", "matmul_peak,train_phases", "--dtype", "float32"])
    got = config_from_args(BenchConfig, args)
    assert got.only == ("matmul_peak", "train_phases") and got.suite == ("speed",)


def test_the_breakdown_renders_in_markdown(result, tmp_path):
    _, r = result
    write_result(r, tmp_path, "tiny")
    md = render_markdown(read_results(tmp_path))
    assert "### train_phases" in md and "| forget_forward |" in md and "| retain_backward |" in md
    assert "**sum_of_phases**" in md and "**step**" in md and "npo_retain_ce_max_abs_diff_grad" in md


@pytest.mark.parametrize("only", ["train_phases", "train_step"])
def test_the_bench_leaves_the_model_as_it_came(only, tmp_path):
    # attach_lora freezes the base weights and detaching does not thaw them: the bench restores them.
    lm = make_tiny_loaded("qwen2")
    before = (lm.model.training, {n: p.requires_grad for n, p in lm.model.named_parameters()})
    speed.run(lm, BenchConfig(**TINY, only=(only,), out_dir=str(tmp_path)))
    assert (lm.model.training, {n: p.requires_grad for n, p in lm.model.named_parameters()}) == before
