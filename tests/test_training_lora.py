"""LoRA adapters across families: targets, zero-init parity, the disabled-adapter reference, merging
for evaluation with a bit-exact restore, save/load round trip, and refusal of a foreign adapter."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_loaded

from interp.adapter import base_model, n_layers
from interp.loading import adapter_disabled
from training.lora import (
    AdapterMismatchError,
    adapter_id,
    attach_lora,
    detach_lora,
    has_adapter,
    load_adapter,
    merged_adapter,
    resolve_lora_targets,
    save_adapter,
)

pytestmark = pytest.mark.usefixtures("one_thread")


IDS = torch.tensor([[5, 17, 99, 42, 7, 3, 250, 11]])


def logits(lm):
    with torch.no_grad():
        return lm.model(input_ids=IDS).logits


def perturb(lm, scale=0.05):
    """Make the adapter non-trivial (B starts at zero)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in lm.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def base_weights(lm):
    return {n: p.detach().clone() for n, p in base_model(lm.model).named_parameters() if "lora_" not in n}


def test_targets_all_linear_single_layer_and_suffix(tiny_loaded):
    model = tiny_loaded.model
    every = resolve_lora_targets(model)
    assert len(every) == 7 * n_layers(model)  # q k v o gate up down per layer
    assert not any(name.endswith("lm_head") for name in every)
    one = resolve_lora_targets(model, single_layer=-1)
    assert len(one) == 7 and all(f".{n_layers(model) - 1}." in name for name in one)
    outs = resolve_lora_targets(model, ("o_proj", "down_proj"))
    assert len(outs) == 2 * n_layers(model)
    with pytest.raises(ValueError, match="linear modules here end in"):
        resolve_lora_targets(model, ("qkv",))


def test_attach_is_identity_and_disabled_is_reference(tiny_loaded):
    before = logits(tiny_loaded)
    attach_lora(tiny_loaded, rank=2)
    trainable = [n for n, p in tiny_loaded.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    torch.testing.assert_close(logits(tiny_loaded), before)  # B = 0
    perturb(tiny_loaded)
    assert not torch.allclose(logits(tiny_loaded), before)
    with adapter_disabled(tiny_loaded):
        torch.testing.assert_close(logits(tiny_loaded), before)
    with pytest.raises(RuntimeError, match="already carries"):
        attach_lora(tiny_loaded)
    detach_lora(tiny_loaded)
    assert not has_adapter(tiny_loaded)
    torch.testing.assert_close(logits(tiny_loaded), before)


def test_single_layer_rank1_trains_only_that_layer(tiny_qwen):
    attach_lora(tiny_qwen, rank=1, single_layer=2)
    trainable = [n for n, p in tiny_qwen.model.named_parameters() if p.requires_grad]
    assert len(trainable) == 14 and all(".layers.2." in n for n in trainable)


def _adapted(dtype: torch.dtype = torch.float32):
    """A tiny model with a perturbed adapter, its adapted logits and its base weights."""
    lm = make_tiny_loaded("llama")
    lm.model.to(dtype)
    attach_lora(lm, rank=4)
    perturb(lm)
    return lm, logits(lm), base_weights(lm)


def _assert_base_restored(lm, weights) -> None:
    for n, w in base_weights(lm).items():
        assert torch.equal(w, weights[n]), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_adapter_matches_and_restores_bit_exactly(dtype):
    lm, adapted, weights = _adapted(dtype)
    with merged_adapter(lm):
        merged = logits(lm)
    tol = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(merged.float(), adapted.float(), atol=tol, rtol=tol)
    _assert_base_restored(lm, weights)  # bit-exact restore, also in bf16
    torch.testing.assert_close(logits(lm), adapted)
    with pytest.raises(ZeroDivisionError):  # restored when the body raises, too
        with merged_adapter(lm):
            1 / 0
    _assert_base_restored(lm, weights)


def test_merged_adapter_stays_unmerged_when_the_exact_backup_does_not_fit():
    lm, adapted, weights = _adapted()
    with merged_adapter(lm, backup_budget=0):
        assert lm.extra["adapter_merged"] is False
        torch.testing.assert_close(logits(lm), adapted, atol=0, rtol=0)  # the adapter still applies
        _assert_base_restored(lm, weights)  # nothing merged
    assert "adapter_merged" not in lm.extra
    with merged_adapter(lm, backup_budget=10**12):
        assert lm.extra["adapter_merged"] is True
        assert any(not torch.equal(w, weights[n]) for n, w in base_weights(lm).items())  # merged
    _assert_base_restored(lm, weights)


def test_save_load_round_trip_and_foreign_model_refused(tmp_path):
    lm = make_tiny_loaded("qwen2")
    attach_lora(lm, rank=4)
    perturb(lm)
    adapted = logits(lm)
    aid = adapter_id(lm)
    path = save_adapter(lm, tmp_path / "adapter", {"note": "x"})
    assert (path / "adapter_config.json").exists() and (path / "adapter_model.safetensors").exists()

    fresh = make_tiny_loaded("qwen2")
    load_adapter(fresh, path)
    assert fresh.extra["adapter_id"] == aid
    torch.testing.assert_close(logits(fresh), adapted)

    other = make_tiny_loaded("qwen2")
    other.weights_id = "some-other-base"
    with pytest.raises(AdapterMismatchError, match="trained on 'tiny-qwen2'"):
        load_adapter(other, path)
    with pytest.raises(FileNotFoundError, match="no emalab adapter"):
        load_adapter(make_tiny_loaded("qwen2"), tmp_path)


def test_unembedding_input_stays_contiguous_after_an_adapter_comes_and_goes(tiny_qwen):
    """A frozen head fed HF's non-contiguous ``hidden[:, -k:]`` hits a pathological CPU matmul; the
    loader's guard must survive attaching and unloading an adapter, and must not change the logits."""
    from interp.loading import contiguous_unembedding_input

    lm = tiny_qwen
    ids = torch.randint(0, lm.model.config.vocab_size, (3, 7))
    with torch.no_grad():
        want = lm.model(input_ids=ids, logits_to_keep=1).logits
    contiguous_unembedding_input(lm.model)
    contiguous_unembedding_input(lm.model)  # idempotent: one hook
    seen = []
    lm.model.get_output_embeddings().register_forward_pre_hook(lambda _m, a: seen.append(a[0].is_contiguous()))
    attach_lora(lm)
    detach_lora(lm)
    for p in lm.model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        got = lm.model(input_ids=ids, logits_to_keep=1).logits
    assert seen == [True]
    assert torch.equal(got, want)
    assert len(lm.model.get_output_embeddings()._forward_pre_hooks) == 2
