"""The reference retain terms' base-model side (kl / repr / direction), computed once per run
(:mod:`training.retain_reference`): a step with it, and a step without it (which computes its own
batch's), give the loss and gradients of the retain term computed inline as the step computed it before
(:func:`inline_retain_term`), the loop runs no reference forward after the precompute and is the run with
the inline term, a resumed kl run reproduces an uninterrupted one, and ce / none runs compute nothing."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from conftest import interrupted_and_resumed, make_tiny_loaded

import training.loop as loop_mod
import training.step as step_mod
from interp.activations import stream_activations
from interp.direction import Direction
from interp.loading import adapter_disabled
from training.collate import collate_rows
from training.config import UnlearnConfig
from training.containment import Containment, last_prompt_index, projection_loss, repr_loss
from training.data import DataSet, Example
from training.lora import attach_lora
from training.losses import kl_loss, response_logits
from training.retain_reference import batches_reference, retain_reference
from training.step import train_step
from training.trainer import UnlearnData, unlearn

pytestmark = pytest.mark.usefixtures("one_thread")

# Prompts and responses of different lengths: every batch composition pads each row differently.
FORGET = [Example(f"f{i}", "cybersecurity", "How do I break into system " + "very " * i + f"{i}?",
                  f"I'm sorry, but I can't help with system {i}.", "refusal") for i in range(5)]
RETAIN = [Example(f"r{i}", "privacy", "What is the home " + "postal " * (i % 3) + f"address of person {i}?",
                  "I cannot share " + "private " * i + "personal information.", "refusal") for i in range(6)]
LAYERS = {"kl": None, "repr": (1, 2), "direction": None}


def cfg_of(mode: str, **kw) -> UnlearnConfig:
    base = dict(model="tiny-qwen2", dtype="float32", method="npo", n_forget=5, batch_size=3, retain_batch_size=4,
                steps=3, checkpoint_every=0, lr=1e-2, lora_rank=4, lora_alpha=8.0, retain_mode=mode)
    if mode == "repr":
        base["repr_layers"] = LAYERS["repr"]
    return UnlearnConfig(**{**base, **kw})


def containment_of(mode: str) -> Containment | None:
    if mode != "direction":
        return None
    g = torch.Generator().manual_seed(3)
    return Containment(direction=Direction.from_vectors(torch.randn(2, 64, generator=g), [1, 3]))


def adapted(dtype: torch.dtype):
    """The tiny Qwen2 in ``dtype`` with a perturbed LoRA adapter (the policy is not the base model)."""
    lm = make_tiny_loaded("qwen2")
    lm.model.to(dtype)
    attach_lora(lm, rank=4, alpha=8.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in lm.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return lm


def inline_retain_term(lm, cfg, cont, rb, model=None) -> torch.Tensor:
    """The expectation: the retain term (with its graph) as the step computed it inline before the
    reference had one path: a no-grad forward of this batch with the adapter disabled (the model left in
    its mode), then the kl / repr / projection loss of the trained forward (``model``, default
    ``lm.model``) against it. Token-mean weighting only."""
    assert cfg.retain_weighting == "token_mean"
    model = lm.model if model is None else model
    layers = list(cfg.repr_layers or cont.direction.layers) if cfg.retain_mode != "kl" else []
    with torch.no_grad(), adapter_disabled(lm):
        if cfg.retain_mode == "kl":
            base = response_logits(lm.model, rb.input_ids, rb.attention_mask, rb.response_mask).logits
        else:
            base = stream_activations(lm.model, rb.input_ids, rb.attention_mask, layers)
    if cfg.retain_mode == "kl":
        rr = response_logits(model, rb.input_ids, rb.attention_mask, rb.response_mask)
        return kl_loss(rr.logits, base, rr.mask)
    acts = stream_activations(model, rb.input_ids, rb.attention_mask, layers)
    if cfg.retain_mode == "repr":
        return repr_loss(acts, base, rb.attention_mask, cfg.repr_distance)
    rows, last = torch.arange(len(rb)), last_prompt_index(rb.response_mask)
    vectors = torch.stack([cont.direction.vector_for(layer) for layer in layers])
    return projection_loss(acts[rows, last], base[rows, last], vectors)


def inline_step_term(lm, cfg, model, rb, forget_tokens, metrics, containment, retain_ref):
    """:func:`inline_retain_term` in the place of ``training.step._retain_term``: a run on it is the
    run before the per-run reference (nothing precomputed, one reference forward per step)."""
    return inline_retain_term(lm, cfg, containment, rb, model)


def batches_of(lm, cfg):
    fb = collate_rows(lm, cfg, DataSet(FORGET), [0, 1, 2], forget=True)
    # Rows 5, 1, 3 together: another width than the precompute's batches (0-3 and 4-5) gave each of them.
    return fb, collate_rows(lm, cfg, DataSet(RETAIN), [5, 1, 3], forget=False)


def lora_grads(lm) -> list[torch.nn.Parameter]:
    params = [p for p in lm.model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    return params


def step(lm, cfg, cont, ref, rb=None):
    """One step with backward (on ``rb``, default :func:`batches_of`'s); its losses, the LoRA
    gradients it left and how many forwards it ran through the base model."""
    params = lora_grads(lm)
    fb, rb0 = batches_of(lm, cfg)
    seen = BaseForwards(lm)
    try:
        out = train_step(lm, cfg, fb, torch.full((3,), -20.0), rb0 if rb is None else rb, containment=cont,
                         retain_ref=ref)
    finally:
        seen.handle.remove()
    return out.losses, [p.grad.clone() for p in params], sum(seen.events)


def expected_step(lm, cfg, cont) -> tuple[float, list[torch.Tensor]]:
    """The step's retain loss and LoRA gradients from :func:`inline_retain_term`: the gradient of a
    step without a retain term (the forget term's) plus ``alpha`` times the inline term's, accumulated
    as the step accumulates them."""
    params = lora_grads(lm)
    fb, rb = batches_of(lm, cfg)
    train_step(lm, cfg.replace(retain_mode="none", repr_layers=None), fb, torch.full((3,), -20.0))
    r = inline_retain_term(lm, cfg, cont, rb)
    (cfg.alpha * r).backward()
    return float(r.detach()), [p.grad.clone() for p in params]


@pytest.mark.parametrize("mode", ["kl", "repr", "direction"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_step_with_or_without_the_cache_is_the_step_with_the_inline_reference(mode, dtype):
    lm = adapted(dtype)
    cfg, cont = cfg_of(mode, dtype=str(dtype).removeprefix("torch.")), containment_of(mode)
    ref = retain_reference(lm, cfg, DataSet(RETAIN), cont)
    assert ref is not None and ref.mode == mode and sorted(ref.rows) == list(range(len(RETAIN)))
    want, g_want = expected_step(lm, cfg, cont)
    assert want > 1e-6  # the adapter moved the policy: the term is not trivially zero
    per_step, g_per_step, base_per_step = step(lm, cfg, cont, None)
    cached, g_cached, base_cached = step(lm, cfg, cont, ref)
    assert (base_per_step, base_cached) == (1, 0)  # without the cache: one reference forward, of its batch
    assert cached["forget"] == per_step["forget"]
    for got, grads in ((per_step, g_per_step), (cached, g_cached)):
        if dtype == torch.float32:
            # The cached reference ran in other batches (other padding widths): the same real-token
            # values up to the order of float32 sums (bit-identical on one CPU thread; a BLAS may block
            # other shapes differently).
            assert got["retain"] == pytest.approx(want, rel=1e-6, abs=1e-10)
            for a, b in zip(grads, g_want, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
        else:
            # bf16: bit-identical here too (one CPU thread), but where a padding width changes how a
            # sum is blocked the reference's bf16 values can differ in their last bit (1/256 relative),
            # and the retain term is a small difference from the reference: a looser tolerance than
            # float32's, still tight enough that swapping two rows' references fails it (the direction
            # term moves by 0.24%: the last prompt token is the same template token in every row).
            assert got["retain"] == pytest.approx(want, rel=1e-3, abs=1e-8)
            for a, b in zip(grads, g_want, strict=True):
                torch.testing.assert_close(a.float(), b.float(), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("mode", ["kl", "direction"])
def test_without_the_cache_the_rows_are_keyed_by_position_whatever_their_index(mode):
    """A hand-made retain batch may repeat an index on different rows: the step's own reference keys
    them by their position in the batch (keyed by ``index``, kl would refuse the batch and direction
    would give every row the last one's reference)."""
    lm = adapted(torch.float32)
    cfg, cont = cfg_of(mode), containment_of(mode)
    want, _ = expected_step(lm, cfg, cont)
    _, rb = batches_of(lm, cfg)
    got, _, _ = step(lm, cfg, cont, None, rb=replace(rb, index=[0, 0, 0]))
    assert got["retain"] == pytest.approx(want, rel=1e-6, abs=1e-10)


def test_the_cache_is_per_row_whatever_the_batches():
    """Computed in batches of 4 or one row at a time, each row's reference is the same (float32,
    to rounding), and the kl cache holds what the memory formula says: response tokens × vocab × bytes."""
    lm = adapted(torch.float32)
    ds = DataSet(RETAIN)
    for mode in ("kl", "repr", "direction"):
        cfg, cont = cfg_of(mode), containment_of(mode)
        four = retain_reference(lm, cfg, ds, cont)
        one = batches_reference(lm, cfg, (collate_rows(lm, cfg, ds, [i], forget=False) for i in range(len(ds))), cont)
        for i in range(len(ds)):
            torch.testing.assert_close(four.rows[i], one.rows[i], rtol=1e-5, atol=1e-6)
    kl = retain_reference(lm, cfg_of("kl"), ds)
    everything = collate_rows(lm, cfg_of("kl"), ds, list(range(len(ds))), forget=False)
    tokens = int(everything.response_mask.sum())
    assert kl.nbytes == tokens * lm.model.config.vocab_size * 4
    assert [t.shape[0] for t in kl.rows.values()] == everything.response_mask.sum(-1).tolist()


def test_a_reference_of_other_data_or_mode_is_refused():
    lm = adapted(torch.float32)
    cfg = cfg_of("kl")
    other = DataSet([replace(e, response=e.response + " Sorry.") for e in RETAIN])
    stale = retain_reference(lm, cfg, other)
    with pytest.raises(ValueError, match="response tokens per row"):
        step(lm, cfg, None, stale)
    with pytest.raises(ValueError, match="retain_mode='kl'"):
        step(lm, cfg_of("repr"), None, retain_reference(lm, cfg, DataSet(RETAIN)))
    with pytest.raises(ValueError, match=r"holds layers \[1, 2\] but the retain term reads \[2, 3\]"):
        step(lm, cfg_of("repr", repr_layers=(2, 3)), None, retain_reference(lm, cfg_of("repr"), DataSet(RETAIN)))
    assert retain_reference(lm, cfg_of("ce"), DataSet(RETAIN)) is None


# -- in the loop ---------------------------------------------------------------------------------


class BaseForwards:
    """Every forward of the model, in order: ``True`` when it ran the base weights (adapter disabled)."""

    def __init__(self, lm):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.lm, self.events = lm, []

        def pre(module, args):
            layers = [m for m in self.lm.model.modules() if isinstance(m, BaseTunerLayer)]
            self.events.append(bool(layers) and all(m.disable_adapters for m in layers))

        self.handle = lm.model.get_input_embeddings().register_forward_pre_hook(pre)

    def before_training(self) -> int:
        """Base forwards before the first forward through the adapter (the loop's first step)."""
        return self.events.index(False) if False in self.events else len(self.events)

    def during_training(self) -> int:
        return sum(self.events[self.before_training():])


def run(tmp_path, mode: str, inline: bool = False, monkeypatch=None, **kw):
    # GA: no NPO reference, so every base forward is the retain term's.
    cfg = cfg_of(mode, method="ga", **kw)
    lm = make_tiny_loaded("qwen2")
    seen = BaseForwards(lm)
    if inline:  # the run as it was before the per-run reference: nothing precomputed, the inline term
        monkeypatch.setattr(loop_mod, "retain_reference", lambda *a, **k: None)
        monkeypatch.setattr(step_mod, "_retain_term", inline_step_term)
    data = UnlearnData(DataSet(FORGET), DataSet(RETAIN) if mode != "none" else None)
    res = unlearn(lm, cfg, tmp_path / f"{mode}-{inline}", progress=False, data=data,
                  containment=containment_of(mode))
    seen.handle.remove()
    return res, seen


@pytest.mark.parametrize("mode", ["kl", "repr", "direction"])
def test_the_loop_runs_the_reference_forwards_once_before_the_steps(tmp_path, mode, monkeypatch):
    res, seen = run(tmp_path, mode)
    assert seen.before_training() == math.ceil(len(RETAIN) / 4)  # the precompute, in retain_batch_size batches
    assert seen.during_training() == 0
    inline, inline_seen = run(tmp_path, mode, inline=True, monkeypatch=monkeypatch)
    assert inline_seen.before_training() == 0 and inline_seen.during_training() == 3  # it ran the inline term
    for a, b in zip(res.history, inline.history, strict=True):  # the same run (float32, to rounding)
        assert a["losses"] == pytest.approx(b["losses"], rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("mode", ["none", "ce"])
def test_runs_without_a_reference_term_compute_none(tmp_path, mode, monkeypatch):
    made = []
    real = loop_mod.retain_reference
    monkeypatch.setattr(loop_mod, "retain_reference", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    _, seen = run(tmp_path, mode)
    assert made == [None]
    assert seen.events and not any(seen.events)  # not one base-model forward


def test_resume_of_a_kl_run_matches_the_uninterrupted_run(tmp_path):
    """The reference is recomputed on resume (it is not in the run directory) and the run is the same."""
    # Dropout and a cosine schedule make the RNG and scheduler state part of what must be restored.
    cfg = cfg_of("kl", steps=6, checkpoint_every=2, retain_batch_size=2, lora_dropout=0.1, scheduler="cosine",
                 warmup_steps=1, lr=5e-3)

    def data():
        return UnlearnData(DataSet(FORGET), DataSet(RETAIN))

    full = unlearn(make_tiny_loaded("qwen2"), cfg, tmp_path / "full", progress=False, data=data())
    path = tmp_path / "interrupted"
    resumed = interrupted_and_resumed(cfg, data, path, stop_at=3)
    assert resumed.resumed_from == 2
    for a, b in zip(full.history, resumed.history, strict=True):
        assert a["step"] == b["step"] and a["losses"] == pytest.approx(b["losses"], abs=1e-6)
    assert resumed.adapter_id == full.adapter_id  # identical final weights
    assert sorted(p.name for p in path.iterdir() if p.is_file()) == sorted(
        p.name for p in (tmp_path / "full").iterdir() if p.is_file())  # no reference file


def _kl_worker(rank: int, world: int, port: int, root: str) -> None:
    from pathlib import Path

    from test_distributed import _join

    _join(rank, world, port)
    try:
        # Forget 4 rows and retain 5 over 2 ranks: each rank looks its retain rows up by their index.
        cfg = cfg_of("kl", batch_size=4, retain_batch_size=5)
        data = UnlearnData(DataSet(FORGET), DataSet(RETAIN))
        cached = unlearn(make_tiny_loaded("qwen2"), cfg, Path(root) / "cached", progress=False, data=data)
        # This process only: the run before the per-run reference (the inline term, on the rank's batch).
        loop_mod.retain_reference = lambda *a, **k: None
        step_mod._retain_term = inline_step_term
        inline = unlearn(make_tiny_loaded("qwen2"), cfg, Path(root) / "inline", progress=False, data=data)
        torch.save({"cached": cached.history, "inline": inline.history}, Path(root) / f"rank{rank}.pt")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_a_data_parallel_kl_run_reads_each_ranks_rows(tmp_path, monkeypatch):
    """Under DDP every rank computes the reference of the whole retain set and reads its own rows:
    the two-process run with it is the two-process run with the inline retain term."""
    import torch.multiprocessing as mp
    from test_distributed import _free_port

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.spawn(_kl_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert len(got["cached"]) == 3
        for a, b in zip(got["cached"], got["inline"], strict=True):
            assert a["losses"] == pytest.approx(b["losses"], rel=1e-5, abs=1e-9)
            assert a["losses"]["retain"] > 0 or a["step"] == 1
