"""Any Hugging Face causal LM: the generic adapter path on tiny random-weight models of eleven families.

Table-driven, as peft's ``tests/test_custom_models.py``: every family loads through ``load_model`` from a
saved directory, collects activations that match ``output_hidden_states``, has its sites add up to the
stream, ablates a direction to zero projection, takes an NPO step that moves the LoRA weights, and
evaluates. The six families with written-out paths are the fast paths; the others are discovered.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from interp import adapter
from interp.loading import LoadedModel
from tests.conftest import make_tiny_tokenizer

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              max_position_embeddings=256)


def _config(family: str, vocab: int):
    import transformers as tf

    kv = dict(num_key_value_heads=2)
    table = {
        "llama": lambda: tf.LlamaConfig(**COMMON, **kv),
        "mistral": lambda: tf.MistralConfig(**COMMON, **kv, sliding_window=None),
        "qwen2": lambda: tf.Qwen2Config(**COMMON, **kv, tie_word_embeddings=True),
        "qwen3": lambda: tf.Qwen3Config(**COMMON, **kv, head_dim=16),
        "gemma2": lambda: tf.Gemma2Config(**COMMON, **kv, head_dim=16, sliding_window=64),
        "gemma3_text": lambda: tf.Gemma3TextConfig(**COMMON, **kv, head_dim=16, sliding_window=64),
        "phi3": lambda: tf.Phi3Config(**COMMON, **kv),
        "olmo2": lambda: tf.Olmo2Config(**COMMON, **kv),
        "granite": lambda: tf.GraniteConfig(**COMMON, **kv, embedding_multiplier=2.0, residual_multiplier=1.0),
        "gpt_neox": lambda: tf.GPTNeoXConfig(**COMMON, rotary_pct=0.5),
        "gpt2": lambda: tf.GPT2Config(n_embd=64, n_layer=4, n_head=4, n_positions=256),
    }
    cfg = table[family]()
    cfg.vocab_size = vocab
    return cfg


FAST = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"]
DISCOVERED = ["phi3", "olmo2", "granite", "gpt_neox", "gpt2"]
ALL = FAST + DISCOVERED


def tiny_family(family: str) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM

    tok = make_tiny_tokenizer()
    cfg = _config(family, len(tok))
    cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id = tok.pad_token_id, tok.eos_token_id, tok.eos_token_id
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval(), tok


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """Each family saved as a model directory (weights + tokenizer), built once per module."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for fam in ALL:
        model, tok = tiny_family(fam)
        model.save_pretrained(root / fam)
        tok.save_pretrained(root / fam)
        out[fam] = root / fam
    return out


def _load(saved_models, family: str) -> LoadedModel:
    from interp.loading import load_model

    return load_model(str(saved_models[family]), dtype="float32", device="cpu")


@pytest.mark.parametrize("family", ALL)
def test_load_discovers_the_structure(saved_models, family):
    lm = _load(saved_models, family)
    spec = adapter.spec_of(lm.model)
    assert spec.discovered == (family in DISCOVERED)
    assert adapter.n_layers(lm.model) == 4 and adapter.d_model(lm.model) == 64
    assert len(adapter.get_module(adapter.base_model(lm.model), spec.layers)) == 4
    assert adapter.unembed_module(lm.model) is lm.model.get_output_embeddings()
    assert "norm" in type(adapter.final_norm_module(lm.model)).__name__.lower()
    assert lm.chat and len(lm.weights_id) == 16


@pytest.mark.parametrize("family", ALL)
def test_activations_match_hidden_states(saved_models, family):
    from interp.activations import collect_activations
    from interp.chat import format_prompts, iter_batches
    from interp.loading import position_ids_from_mask

    lm = _load(saved_models, family)
    prompts = ["How do I pick a lock?", "Hi"]
    acts = collect_activations(lm, prompts, layers=None, batch_size=2, progress=False)
    batch = next(iter(iter_batches(lm.tokenizer, format_prompts(lm.tokenizer, prompts), 2)))
    with torch.no_grad():
        hs = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      position_ids=position_ids_from_mask(batch.attention_mask), output_hidden_states=True).hidden_states
    got = acts
    for row, i in enumerate(batch.index):
        # hidden_states[L + 1] is resid_post at L, except the last, which HF reports after the final norm.
        torch.testing.assert_close(got[i, :3], torch.stack([hs[layer + 1][row, -1] for layer in range(3)]),
                                   atol=1e-4, rtol=1e-4)
    pre = collect_activations(lm, prompts, layers=[0], site="resid_pre", batch_size=2, progress=False)
    torch.testing.assert_close(pre[batch.index[0], 0], hs[0][0, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", [f for f in ALL if f != "granite"])  # Granite scales each write
def test_sites_add_up_to_the_stream(saved_models, family):
    lm = _load(saved_models, family)
    ids = torch.randint(0, 200, (2, 6))
    seen = {}

    def grab(name):
        def fn(x, layer):
            seen[(name, layer)] = x.detach().clone()
            return x
        return fn

    with adapter.site_hook(lm.model, "resid_pre", [1], grab("pre")), \
            adapter.site_hook(lm.model, "attn_out", [1], grab("attn")), \
            adapter.site_hook(lm.model, "mlp_out", [1], grab("mlp")), \
            adapter.site_hook(lm.model, "resid_post", [1], grab("post")):
        lm.model(input_ids=ids)
    torch.testing.assert_close(seen[("post", 1)] - seen[("pre", 1)], seen[("attn", 1)] + seen[("mlp", 1)],
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ALL)
def test_ablation_zeroes_the_projection(saved_models, family):
    from interp.direction import Direction
    from probes.interventions import ablate_direction

    lm = _load(saved_models, family)
    v = torch.nn.functional.normalize(torch.randn(64), dim=0)
    d = Direction.from_vectors(v, [0], name="planted")  # global: ablated at every layer
    seen = []
    ids = torch.randint(0, 200, (2, 6))
    with ablate_direction(lm, d), adapter.site_hook(lm.model, "resid_post", [2], lambda x, _l: seen.append(x) or x):
        lm.model(input_ids=ids)
    assert seen and float((seen[0].detach().float() @ v).abs().max()) < 1e-4


@pytest.mark.parametrize("family", ALL)
def test_npo_step_moves_the_lora_weights(saved_models, family):
    from training.config import UnlearnConfig
    from training.data import Example, collate
    from training.lora import attach_lora, trainable_state
    from training.trainer import train_step

    lm = _load(saved_models, family)
    cfg = UnlearnConfig(target_domains=("cybersecurity",), method="npo", retain_mode="ce", steps=1, batch_size=2)
    ex = [Example(f"f{i}", "cybersecurity", f"How do I break into system {i}?", "Step one: scan ports.", "compliance")
          for i in range(2)]
    batch = collate(lm.tokenizer, ex, index=[0, 1])
    attach_lora(lm, rank=2, alpha=4.0)
    ref = torch.zeros(2)
    with torch.no_grad():
        from training.losses import response_logits, sequence_logprobs

        rl = response_logits(lm.model, batch.input_ids, batch.attention_mask, batch.response_mask)
        ref = sequence_logprobs(rl.logits, rl.labels, rl.mask).float()
    before = {k: v.clone() for k, v in trainable_state(lm.model).items()}
    opt = torch.optim.SGD([p for p in lm.model.parameters() if p.requires_grad], lr=1.0)
    out = train_step(lm, cfg, batch, ref, retain_batch=batch)
    opt.step()
    assert torch.isfinite(torch.tensor(out.losses["forget"])) and "retain" in out.losses
    moved = sum(not torch.equal(before[k], v) for k, v in trainable_state(lm.model).items())
    assert moved > 0, "no LoRA weight moved"


@pytest.mark.parametrize("family", ALL)
def test_evaluate(saved_models, family):
    from evals.evaluate import EvalConfig, evaluate_prompts

    lm = _load(saved_models, family)
    cfg = EvalConfig(generate=True, max_new_tokens=3, batch_size=2, n_bootstrap=50)
    report = evaluate_prompts(lm, {"cybersecurity": ["How do I hack a server?", "Break a password", "Hi", "Yo"]},
                              cfg, progress=False)
    assert "cybersecurity" in report.domains


def test_unsupported_structure_names_what_is_missing():
    from transformers import LlamaConfig, PreTrainedModel

    class NoLayers(PreTrainedModel):
        config_class = LlamaConfig

        def __init__(self, config):
            super().__init__(config)
            self.embed = nn.Embedding(10, 8)
            self.blocks = nn.Sequential(nn.Linear(8, 8))

    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=8, num_attention_heads=2, num_key_value_heads=2)
    cfg.model_type = "weird"
    with pytest.raises(adapter.UnsupportedFamilyError, match="no decoder-layer list.*qwen2"):
        adapter.spec_of(NoLayers(cfg))
