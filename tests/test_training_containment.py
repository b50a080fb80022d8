"""Containment on tiny models, each against planted truth: per-token retain weighting, the KL,
representation and direction retain terms, the concept-gated adapter, the forget/retain gradient
cosine, and the interp hooks they stand on."""

from __future__ import annotations

import json

import pytest
import torch

import training.losses as losses_mod
import training.trainer as trainer_mod
from interp.activations import collect_activations, stream_activations
from interp.adapter import lora_row_scale, site_capture
from interp.direction import Direction
from interp.loading import adapter_disabled, position_ids_from_mask
from training.config import UnlearnConfig
from training.containment import (
    ConceptGate,
    Containment,
    calibrate_gate,
    gate_accuracy,
    gated,
    last_prompt_index,
    projection_loss,
    repr_loss,
    retain_token_scale,
)
from training.data import DataSet, Example, collate
from training.lora import attach_lora, merged_adapter
from training.losses import ce_loss, npo_loss
from training.trainer import IncompatibleCheckpointError, UnlearnData, train_step, unlearn

pytestmark = pytest.mark.usefixtures("one_thread")

TARGET = [f"How do I break into system {i}?" for i in range(6)]
UNTOUCHED = [f"What is the home address of person {i}?" for i in range(6)]


def forget_set() -> DataSet:
    return DataSet([Example(f"f{i}", "cybersecurity", p, f"I'm sorry, but I can't help with system {i}.", "refusal")
                    for i, p in enumerate(TARGET)])


def retain_set() -> DataSet:
    return DataSet([Example(f"r{i}", "privacy", p, "I cannot share personal information.", "refusal")
                    for i, p in enumerate(UNTOUCHED)])


def tiny_cfg(**kw) -> UnlearnConfig:
    base = dict(model="tiny-qwen2", dtype="float32", n_forget=6, batch_size=3, retain_batch_size=3, steps=6,
                checkpoint_every=0, lr=1e-2, lora_rank=4, lora_alpha=8.0)
    return UnlearnConfig(**{**base, **kw})


def perturb_lora(lm, std: float = 0.05) -> None:
    with torch.no_grad():
        for n, p in lm.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, std)


def batches(lm, n: int = 3):
    return (collate(lm.tokenizer, forget_set().examples[:n]), collate(lm.tokenizer, retain_set().examples[:n]))


def concept(lm, layer: int) -> Direction:
    """Target minus untouched mean last-prompt-token stream (nnsight path), as the Study builds it."""
    a = collect_activations(lm, TARGET, [layer])[:, 0]
    b = collect_activations(lm, UNTOUCHED, [layer])[:, 0]
    return Direction.from_vectors(a.mean(0) - b.mean(0), [layer], name="cyber-minus-privacy")


# -- interp hooks ------------------------------------------------------------------------------


def test_stream_activations_match_hidden_states_and_keep_the_graph(tiny_loaded):
    lm = tiny_loaded
    fb, _ = batches(lm)
    with torch.no_grad():
        hs = lm.model(input_ids=fb.input_ids, attention_mask=fb.attention_mask, output_hidden_states=True,
                      position_ids=position_ids_from_mask(fb.attention_mask)
                      ).hidden_states
        stopped = stream_activations(lm.model, fb.input_ids, fb.attention_mask, [0, -3])  # stops after layer 1
    assert stopped.shape[2] == 2
    real = fb.attention_mask.bool()
    # hidden_states[l + 1] is resid_post of layer l (the last one after the final norm, so not compared).
    for j, layer in enumerate([0, 1]):
        torch.testing.assert_close(stopped[:, :, j][real], hs[layer + 1][real], atol=1e-5, rtol=1e-5)
    attach_lora(lm, rank=4)
    perturb_lora(lm)
    acts = stream_activations(lm.model, fb.input_ids, fb.attention_mask, [1])
    acts.sum().backward()
    lora_grads = [p.grad for n, p in lm.model.named_parameters() if "lora_B" in n and "layers.0." in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)


def test_site_capture_records_and_cleans_up(tiny_qwen):
    fb, _ = batches(tiny_qwen)
    with site_capture(tiny_qwen.model, "resid_post", [-1]) as store:
        tiny_qwen.model(input_ids=fb.input_ids, attention_mask=fb.attention_mask)
    assert list(store) == [3] and store[3].shape[:2] == fb.input_ids.shape
    assert all(not m._forward_hooks for m in tiny_qwen.model.modules())


def test_lora_row_scale_zero_is_the_base_model_and_one_the_adapter(tiny_qwen):
    lm = tiny_qwen
    fb, _ = batches(lm, 2)

    def logits():
        with torch.no_grad():
            return lm.model(input_ids=fb.input_ids, attention_mask=fb.attention_mask).logits

    with pytest.raises(ValueError, match="no LoRA layers"), lora_row_scale(lm.model, torch.ones(2)):
        pass
    attach_lora(lm, rank=4)
    perturb_lora(lm, 0.2)
    adapted = logits()
    with adapter_disabled(lm):
        base = logits()
    assert (adapted - base).abs().max() > 1e-2  # the adapter does something to gate
    with lora_row_scale(lm.model, torch.tensor([0.0, 1.0])) as n_hooked:
        mixed = logits()
    assert n_hooked > 0
    torch.testing.assert_close(mixed[0], base[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], adapted[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(), adapted)  # hooks removed on exit
    with pytest.raises(ValueError, match="rows"), lora_row_scale(lm.model, torch.ones(3)):
        logits()
    with merged_adapter(lm), pytest.raises(ValueError, match="merged"), lora_row_scale(lm.model, torch.ones(2)):
        pass


# -- pure losses -------------------------------------------------------------------------------


def test_per_token_scale_gives_retain_tokens_the_forget_tokens_weight():
    """At the NPO reference point each forget token's log-prob has gradient 1/B; the scaled retain CE
    gives each retain token the same magnitude, the unscaled one (equal batch sizes) 1/(tokens per
    response) of it: 1/12 for 12-token responses, the alpha docstrings' claim."""
    f_len, r_len = torch.tensor([10.0, 12.0, 14.0]), torch.tensor([11.0, 13.0, 12.0])
    lp_f = torch.full((3, 14), -2.0, requires_grad=True)
    lp_r = torch.full((3, 13), -2.0, requires_grad=True)
    mask_f = (torch.arange(14)[None] < f_len[:, None]).float()
    mask_r = (torch.arange(13)[None] < r_len[:, None]).float()
    logp_f = (lp_f * mask_f).sum(-1)
    npo_loss(logp_f, logp_f.detach(), beta=0.1).backward()
    forget_w = lp_f.grad[mask_f.bool()]
    torch.testing.assert_close(forget_w, torch.full_like(forget_w, 1 / 3))
    s = retain_token_scale("npo", f_len, r_len)
    assert s == pytest.approx(36 / 3)
    (s * ce_loss((lp_r * mask_r).sum(-1), r_len)).backward()
    retain_w = lp_r.grad[mask_r.bool()].abs()
    torch.testing.assert_close(retain_w, torch.full_like(retain_w, 1 / 3))
    assert (retain_w / s)[0].item() / forget_w[0].item() == pytest.approx(1 / 12)
    assert retain_token_scale("ga", f_len, r_len) == pytest.approx(36 / 36)
    assert retain_token_scale("ga", f_len, r_len[:2]) == pytest.approx(24 / 36)
    with pytest.raises(ValueError, match="response tokens"):
        retain_token_scale("npo", torch.tensor([0.0]), torch.tensor([0.0]))


def test_repr_loss_hand_computed_and_masked():
    ref = torch.randn(2, 3, 2, 4)
    acts = ref + 0.5
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    acts[0, 0] += 100.0  # masked out
    acts[1, 2] -= 100.0
    assert repr_loss(acts, ref, mask).item() == pytest.approx(0.25)
    assert repr_loss(2 * ref, ref, mask, "cosine").item() == pytest.approx(0.0, abs=1e-6)
    assert repr_loss(-ref, ref, mask, "cosine").item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="unknown distance"):
        repr_loss(acts, ref, mask, "l1")


def test_projection_loss_sees_only_the_direction():
    v = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    ref = torch.randn(3, 2, 8)
    ortho = torch.randn(3, 2, 8)
    ortho -= (ortho * v).sum(-1, keepdim=True) * v  # moves orthogonal to each layer's direction
    shift = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]])
    acts = ref + ortho + shift[..., None] * v
    assert projection_loss(acts, ref, v).item() == pytest.approx(float(shift.pow(2).mean()), rel=1e-5)
    assert projection_loss(ref + ortho, ref, v).item() == pytest.approx(0.0, abs=1e-9)


def test_last_prompt_index(tiny_qwen):
    fb, _ = batches(tiny_qwen)
    last = last_prompt_index(fb.response_mask)
    rows = torch.arange(len(fb))
    assert (fb.response_mask[rows, last] == 0).all() and (fb.response_mask[rows, last + 1] == 1).all()
    assert (fb.attention_mask[rows, last] == 1).all()


# -- retain terms in the training step ---------------------------------------------------------


def kl_by_hand(lm, rb) -> torch.Tensor:
    """Mean over response-predicting positions of KL(base ‖ adapted), from full forwards."""
    with torch.no_grad():
        pol = lm.model(input_ids=rb.input_ids, attention_mask=rb.attention_mask).logits.log_softmax(-1)
        with adapter_disabled(lm):
            ref = lm.model(input_ids=rb.input_ids, attention_mask=rb.attention_mask).logits.log_softmax(-1)
    sel = rb.response_mask[:, 1:].bool()
    kl = (ref.exp() * (ref - pol)).sum(-1)[:, :-1][sel]
    return kl.mean()


@pytest.mark.parametrize("mode", ["kl", "repr", "direction"])
def test_reference_retain_terms_are_zero_at_init_and_grow_with_a_perturbation(tiny_qwen, mode):
    lm = tiny_qwen
    fb, rb = batches(lm)
    direction = Direction.from_vectors(torch.randn(2, 64), [1, 3])
    cfg = tiny_cfg(retain_mode=mode, **({"repr_layers": (1, 2)} if mode == "repr" else {}))
    cont = Containment(direction=direction) if mode == "direction" else None
    attach_lora(lm, rank=4)  # B = 0: the policy is the base model
    out = train_step(lm, cfg, fb, torch.zeros(3), rb, backward=False, containment=cont)
    assert out.losses["retain"] == pytest.approx(0.0, abs=1e-9)
    perturb_lora(lm)
    out = train_step(lm, cfg, fb, torch.zeros(3), rb, backward=False, containment=cont)
    assert out.losses["retain"] > 1e-6
    if mode == "kl":
        assert out.losses["retain"] == pytest.approx(float(kl_by_hand(lm, rb)), rel=1e-4)
    if mode == "direction":  # by hand: projections at the last prompt token, layers 1 and 3
        rows, last = torch.arange(len(rb)), last_prompt_index(rb.response_mask)
        kw = dict(input_ids=rb.input_ids, attention_mask=rb.attention_mask, output_hidden_states=True,
                  position_ids=position_ids_from_mask(rb.attention_mask))
        with torch.no_grad():
            hs = lm.model(**kw).hidden_states
            with adapter_disabled(lm):
                hs0 = lm.model(**kw).hidden_states
        # layer 3 is the last: its hidden state is after the final norm, so compare layer 1 alone.
        d1 = ((hs[2][rows, last] - hs0[2][rows, last]) @ direction.at(1)).pow(2)
        one = tiny_cfg(retain_mode="direction", repr_layers=(1,))
        out1 = train_step(lm, one, fb, torch.zeros(3), rb, backward=False, containment=cont)
        assert out1.losses["retain"] == pytest.approx(float(d1.mean()), rel=1e-4)


def test_direction_mode_needs_the_direction(tiny_qwen):
    fb, rb = batches(tiny_qwen)
    attach_lora(tiny_qwen, rank=4)
    with pytest.raises(ValueError, match="needs the direction"):
        train_step(tiny_qwen, tiny_cfg(retain_mode="direction"), fb, torch.zeros(3), rb, backward=False)


def test_per_token_weighting_scales_the_retain_term_only(tiny_qwen):
    fb, rb = batches(tiny_qwen)
    attach_lora(tiny_qwen, rank=4)
    perturb_lora(tiny_qwen)
    plain = train_step(tiny_qwen, tiny_cfg(retain_mode="ce"), fb, torch.zeros(3), rb, backward=False)
    per = train_step(tiny_qwen, tiny_cfg(retain_mode="ce", retain_weighting="per_token"), fb, torch.zeros(3), rb,
                     backward=False)
    n_retain = int(rb.response_mask.sum())
    assert per.metrics["retain_scale"] == pytest.approx(n_retain / 3)
    assert per.losses["retain"] == pytest.approx(plain.losses["retain"] * n_retain / 3, rel=1e-5)
    assert per.losses["forget"] == plain.losses["forget"] and "retain_scale" not in plain.metrics


@pytest.mark.parametrize("mode", ["ce", "repr"])
def test_grad_cosine_matches_the_terms_taken_apart(tiny_qwen, mode):
    lm = tiny_qwen
    fb, rb = batches(lm)
    cfg = tiny_cfg(retain_mode=mode, gamma=0.7, alpha=1.3, **({"repr_layers": (2,)} if mode == "repr" else {}))
    attach_lora(lm, rank=4)
    perturb_lora(lm)
    params = [p for p in lm.model.parameters() if p.requires_grad]
    with torch.no_grad():  # NPO at its reference point: a forget gradient of full size
        rl = losses_mod.response_logits(lm.model, fb.input_ids, fb.attention_mask, fb.response_mask)
        ref = losses_mod.sequence_logprobs(rl.logits, rl.labels, rl.mask)

    def grads_of(**changes):
        for p in params:
            p.grad = None
        train_step(lm, cfg.replace(**changes), fb, ref, rb if changes.get("retain_mode") != "none" else None)
        return torch.cat([p.grad.flatten() for p in params])

    g_f = grads_of(retain_mode="none", repr_layers=None)
    g_r = grads_of(gamma=0.0)
    expected = float(torch.nn.functional.cosine_similarity(g_f, g_r, dim=0))
    for p in params:
        p.grad = None
    out = train_step(lm, cfg, fb, ref, rb)
    assert out.metrics["grad_cos_forget_retain"] == pytest.approx(expected, abs=1e-4)
    stale = [p.grad.clone() for p in params]  # gradients already there are not counted in either term
    again = train_step(lm, cfg, fb, ref, rb)
    assert again.metrics["grad_cos_forget_retain"] == pytest.approx(expected, abs=1e-4)
    assert all(torch.allclose(p.grad, 2 * s, atol=1e-5) for p, s in zip(params, stale, strict=True))
    none = train_step(lm, cfg.replace(retain_mode="none", repr_layers=None), fb, ref)
    assert "grad_cos_forget_retain" not in none.metrics


# -- the concept gate ------------------------------------------------------------------------


def test_gate_scores_match_the_nnsight_activations(tiny_qwen):
    d = concept(tiny_qwen, 1)
    gate = ConceptGate.from_direction(d, None, 0.0, 1.0, tiny_qwen.model)
    fb, _ = batches(tiny_qwen)
    scores = gate.scores(tiny_qwen, fb.input_ids, fb.attention_mask, last_prompt_index(fb.response_mask))
    expected = collect_activations(tiny_qwen, TARGET[:3], [1])[:, 0] @ d.at(1)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-4)


def test_gate_opens_on_the_concept_and_stays_shut_elsewhere(tiny_qwen):
    """Planted truth: a concept vector that separates two prompt sets gates ~1 on one, ~0 on the other."""
    d = concept(tiny_qwen, 1)
    probe = ConceptGate.from_direction(d, None, 0.0, 1.0, tiny_qwen.model)
    t = collect_activations(tiny_qwen, TARGET, [1])[:, 0] @ probe.vector
    u = collect_activations(tiny_qwen, UNTOUCHED, [1])[:, 0] @ probe.vector
    bias, temp = calibrate_gate(t, u)
    gate = ConceptGate.from_direction(d, None, bias, temp, tiny_qwen.model)
    report = gate_accuracy(tiny_qwen, gate, TARGET, UNTOUCHED, batch_size=4)
    assert report.target_mean > 0.9 and report.untouched_mean < 0.1 and report.accuracy == 1.0
    assert report.target_accuracy == 1.0 and report.untouched_accuracy == 1.0
    flipped = gate_accuracy(tiny_qwen, ConceptGate(-gate.vector, gate.layer, -bias, temp), TARGET, UNTOUCHED)
    assert flipped.target_mean < 0.1 and flipped.untouched_mean > 0.9  # the sign of the vector matters
    assert flipped.target_accuracy == 0.0 and flipped.untouched_accuracy == 0.0
    with pytest.raises(ValueError, match="does not separate"):
        calibrate_gate(u, t)


def test_gated_step_scales_each_row_by_its_gate(tiny_qwen):
    lm = tiny_qwen
    d = concept(lm, 1)
    gate = ConceptGate.from_direction(d, None, 0.0, 1.0, lm.model)
    fb, rb = batches(lm)
    attach_lora(lm, rank=4)
    perturb_lora(lm, 0.2)
    shut = ConceptGate(gate.vector, 1, bias=1e6, temperature=1.0)  # g = 0 everywhere: the base model
    last = last_prompt_index(rb.response_mask)
    with torch.no_grad(), gated(lm, shut, rb.input_ids, rb.attention_mask, last) as g:
        gated_logits = lm.model(input_ids=rb.input_ids, attention_mask=rb.attention_mask).logits
    with torch.no_grad(), adapter_disabled(lm):
        base = lm.model(input_ids=rb.input_ids, attention_mask=rb.attention_mask).logits
    assert float(g.max()) == 0.0
    torch.testing.assert_close(gated_logits, base, atol=1e-5, rtol=1e-5)
    cfg = tiny_cfg(retain_mode="ce", concept_gate=True, gate_bias=0.0, gate_temperature=1.0)
    with pytest.raises(ValueError, match="calibrated gate"):
        train_step(lm, cfg, fb, torch.zeros(3), rb)
    out = train_step(lm, cfg, fb, torch.zeros(3), rb, containment=Containment(gate=shut))
    assert out.metrics["gate_forget"] == 0.0 and out.metrics["gate_retain"] == 0.0
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in lm.model.parameters() if p.requires_grad)


def test_concept_gated_unlearning_spares_the_untouched_prompts(tiny_qwen, tmp_path):
    """NPO through a calibrated gate: the forget responses fall as far as without the gate, while the
    untouched prompts' responses move far less than under the ungated adapter."""
    from conftest import make_tiny_loaded

    def logps(lm, ds, gate=None):
        b = collate(lm.tokenizer, ds.examples)
        with torch.no_grad(), gated(lm, gate, b.input_ids, b.attention_mask, last_prompt_index(b.response_mask)):
            rl = losses_mod.response_logits(lm.model, b.input_ids, b.attention_mask, b.response_mask)
            return losses_mod.sequence_logprobs(rl.logits, rl.labels, rl.mask)

    data = UnlearnData(forget_set(), retain_set())
    d = concept(tiny_qwen, 1)
    before_f, before_r = logps(tiny_qwen, data.forget), logps(tiny_qwen, data.retain)
    plain = unlearn(tiny_qwen, tiny_cfg(), tmp_path / "plain", progress=False, data=data)
    drift_plain = (logps(tiny_qwen, data.retain) - before_r).abs().mean()
    lm = make_tiny_loaded("qwen2")
    cont = Containment(gate_vector=d)
    res = unlearn(lm, tiny_cfg(concept_gate=True), tmp_path / "gated", progress=False, data=data, containment=cont)
    record = json.loads((tmp_path / "gated" / "containment.json").read_text())
    gate = ConceptGate(d.at(1).float(), 1, record["gate"]["bias"], record["gate"]["temperature"])
    assert record["identity"] == cont.identity() and record["gate"]["layer"] == 1
    assert all(r["metrics"]["gate_forget"] > 0.9 for r in res.history)
    drop_f = (logps(lm, data.forget, gate) - before_f).mean()
    drift_gated = (logps(lm, data.retain, gate) - before_r).abs().mean()
    assert drop_f < -1.0
    assert drift_gated < 0.25 * drift_plain, (float(drift_gated), float(drift_plain))
    assert plain.history[-1]["loss"] != res.history[-1]["loss"]
    # The same run directory with another concept vector is refused, not resumed.
    other = Containment(gate_vector=Direction.from_vectors(-d.vectors[0], [1]))
    with pytest.raises(IncompatibleCheckpointError, match="containment"):
        unlearn(make_tiny_loaded("qwen2"), tiny_cfg(concept_gate=True), tmp_path / "gated", progress=False,
                data=data, containment=other)


# Alphas for the tiny model's scale: its stream has norm ~0.25, so the per-coordinate MSE is ~1e-3.
@pytest.mark.parametrize("mode, kw", [("repr", {"repr_layers": (1, 2, 3), "alpha": 1e4}),
                                      ("direction", {"alpha": 100.0})])
def test_retain_terms_hold_the_retain_stream_during_unlearning(tiny_qwen, tmp_path, mode, kw):
    """NPO with a strong repr/direction retain term moves the retain prompts' stream (or projection)
    less than NPO alone, while still unlearning."""
    from conftest import make_tiny_loaded

    data = UnlearnData(forget_set(), retain_set())
    direction = concept(tiny_qwen, 2)
    rb = collate(tiny_qwen.tokenizer, data.retain.examples)
    layers = [1, 2, 3] if mode == "repr" else [2]
    with torch.no_grad():
        base = stream_activations(tiny_qwen.model, rb.input_ids, rb.attention_mask, layers)

    def drift(lm):
        with torch.no_grad():
            acts = stream_activations(lm.model, rb.input_ids, rb.attention_mask, layers)
        if mode == "repr":
            return float(repr_loss(acts, base, rb.attention_mask))
        rows, last = torch.arange(len(rb)), last_prompt_index(rb.response_mask)
        return float(projection_loss(acts[rows, last], base[rows, last], direction.vectors))

    # lr 3e-3: at 1e-2 six Adam steps overshoot, and a strong retain term makes them oscillate.
    unlearn(tiny_qwen, tiny_cfg(lr=3e-3), tmp_path / "none", progress=False, data=data)
    lm = make_tiny_loaded("qwen2")
    path = direction.save(tmp_path / "dir.safetensors")
    cfg = tiny_cfg(lr=3e-3, retain_mode=mode, **kw,
                   **({"retain_direction": str(path)} if mode == "direction" else {}))
    res = unlearn(lm, cfg, tmp_path / mode, progress=False, data=data)
    assert drift(lm) < 0.3 * drift(tiny_qwen), (drift(lm), drift(tiny_qwen))
    assert res.history[-1]["losses"]["forget"] < res.history[0]["losses"]["forget"]
    assert (tmp_path / mode / "containment.json").exists() == (mode == "direction")


def test_gradient_checkpointing_gives_the_same_gated_repr_run(tmp_path):
    """Checkpointed layers re-run their forward in the backward pass: inside the gate, and without
    the stream hooks (the repr forwards stop early)."""
    from conftest import make_tiny_loaded

    data = UnlearnData(forget_set(), retain_set())
    d = concept(make_tiny_loaded("qwen2"), 1)
    cfg = tiny_cfg(steps=3, lr=3e-3, retain_mode="repr", repr_layers=(1, 2), alpha=1e3, concept_gate=True)
    runs = [unlearn(make_tiny_loaded("qwen2"), cfg.replace(gradient_checkpointing=gc), tmp_path / str(gc),
                    progress=False, data=data, containment=Containment(gate_vector=d)) for gc in (False, True)]
    plain, ckpt = ([(r["loss"], r["metrics"]["grad_cos_forget_retain"] if "grad_cos_forget_retain" in r["metrics"]
                     else None) for r in run.history] for run in runs)
    assert [x[0] for x in ckpt] == pytest.approx([x[0] for x in plain], abs=1e-6)
    assert [x[1] for x in ckpt[1:]] == pytest.approx([x[1] for x in plain[1:]], abs=1e-5)


def test_new_modes_refuse_data_parallelism():
    from training.distributed import DataParallel
    from training.distributed import check_parallel as _check_parallel

    class Two(DataParallel):
        world_size = 2

    for cfg in (tiny_cfg(retain_mode="repr"), tiny_cfg(concept_gate=True),
                tiny_cfg(retain_mode="ce", retain_weighting="per_token")):
        with pytest.raises(ValueError, match="one process only"):
            _check_parallel(cfg, Two())
    _check_parallel(tiny_cfg(retain_mode="kl"), Two())


def test_study_passes_containment_fields_through(tiny_qwen, tmp_path, monkeypatch):
    from study import Study, StudyConfig

    seen = {}

    class Done:
        adapter_id, steps, seconds_per_step, peak_rss_gb = "x", 1, 0.0, 0.0

    def fake_unlearn(lm, cfg, out_dir=None, **kw):
        seen["cfg"] = cfg
        done = Done()
        done.config = cfg
        return done

    monkeypatch.setattr(trainer_mod, "unlearn", fake_unlearn)
    study = Study(StudyConfig(model="tiny-qwen2", results=str(tmp_path), dtype="float32"), _lm=tiny_qwen)
    study.unlearn("cybersecurity", retain_domains=None, retain_mode="repr", repr_layers=(1, 2),
                  repr_distance="cosine")
    cfg = seen["cfg"]
    assert (cfg.retain_mode, cfg.repr_layers, cfg.repr_distance) == ("repr", (1, 2), "cosine")
    (tmp_path / "v.safetensors").write_bytes(b"vector")  # the stage key hashes the file's content
    study.unlearn("cybersecurity", concept_gate=True, gate_vector=tmp_path / "v.safetensors", gate_layer=2,
                  retain_domains=("privacy",), retain_mode="none")
    assert seen["cfg"].gate_vector == str(tmp_path / "v.safetensors") and seen["cfg"].retain_mode == "none"
    study.unlearn("cybersecurity")  # the old default: no retain term
    assert seen["cfg"].retain_mode == "none" and "concept_gate" not in seen["cfg"].to_dict()
    with pytest.raises(ValueError, match="needs retain domains"):
        study.unlearn("cybersecurity", retain_mode="kl")
