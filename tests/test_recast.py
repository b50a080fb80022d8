"""interp.recast.cast_copy: the training copy cast from the resident measurement weights is the model a
fresh load in that dtype gives, bit for bit, in every supported family."""

import pytest
import torch
from conftest import FAMILIES, make_tiny_model

from interp.loading import load_model
from interp.recast import cast_copy


def _saved(tmp_path, family):
    model, tok = make_tiny_model(family)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("family", FAMILIES)
def test_cast_copy_is_the_fresh_load_in_that_dtype(tmp_path, family):
    path = _saved(tmp_path, family)
    fp32 = load_model(str(path), dtype="float32")
    fresh = load_model(str(path), dtype="bfloat16")
    cast = cast_copy(fp32, "bfloat16")
    want, got = dict(fresh.model.named_parameters()), dict(cast.model.named_parameters())
    assert sorted(want) == sorted(got)
    for name in want:
        assert got[name].dtype == want[name].dtype == torch.bfloat16, name
        assert torch.equal(got[name], want[name]), name
    want_b, got_b = dict(fresh.model.named_buffers()), dict(cast.model.named_buffers())
    assert sorted(want_b) == sorted(got_b)
    for name in want_b:
        assert got_b[name].dtype == want_b[name].dtype and torch.equal(got_b[name], want_b[name]), name
    ids = torch.tensor([[3, 5, 7, 11, 13]])
    with torch.no_grad():
        assert torch.equal(cast.model(input_ids=ids).logits, fresh.model(input_ids=ids).logits)
    assert cast.model.config.dtype == torch.bfloat16 and cast.extra["dtype"] == "bfloat16"
    assert fp32.extra["dtype"] == "float32" and next(fp32.model.parameters()).dtype == torch.float32
    assert cast.weights_id == fp32.weights_id and cast.tokenizer is fp32.tokenizer
    # tied unembedding stays tied (one tensor), and nothing is shared with the source
    tied = fresh.model.get_output_embeddings().weight is fresh.model.get_input_embeddings().weight
    assert (cast.model.get_output_embeddings().weight is cast.model.get_input_embeddings().weight) == tied
    src = {p.data_ptr() for p in fp32.model.parameters()}
    assert not src & {p.data_ptr() for p in cast.model.parameters()}


def test_cast_copy_refuses_to_widen_or_to_copy_an_adapter(tmp_path):
    from training.lora import attach_lora

    path = _saved(tmp_path, "qwen2")
    bf16 = load_model(str(path), dtype="bfloat16")
    with pytest.raises(ValueError, match="load the model in that dtype"):
        cast_copy(bf16, "float32")
    fp32 = load_model(str(path), dtype="float32")
    attach_lora(fp32)
    with pytest.raises(ValueError, match="clean base model"):
        cast_copy(fp32, "bfloat16")
    hooked = load_model(str(path), dtype="float32")
    handle = hooked.model.model.layers[0].register_forward_hook(lambda *a: None)
    with pytest.raises(ValueError, match="clean base model"):
        cast_copy(hooked, "bfloat16")
    handle.remove()
    assert cast_copy(hooked, "bfloat16").model is not hooked.model


def test_study_casts_its_training_model_from_the_measurement_model(tmp_path, monkeypatch):
    import interp.recast
    from study import Study, StudyConfig

    path = _saved(tmp_path / "m", "qwen2")
    calls = []
    real = interp.recast.cast_copy
    monkeypatch.setattr(interp.recast, "cast_copy", lambda lm, dtype: calls.append(dtype) or real(lm, dtype))
    study = Study(StudyConfig(model=str(path), results=str(tmp_path / "r"), dtype="bfloat16"))
    train = study.train_lm
    assert calls == ["bfloat16"] and study._lm is not None  # cast from the (lazily loaded) float32 model
    assert next(train.model.parameters()).dtype == torch.bfloat16
    assert next(study.lm.model.parameters()).dtype == torch.float32
    fresh = load_model(str(path), dtype="bfloat16")
    assert all(torch.equal(a, b) for a, b in zip(train.model.parameters(), fresh.model.parameters(), strict=True))
