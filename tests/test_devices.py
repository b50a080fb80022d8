"""Device plumbing, content-keyed weights ids, foreign PEFT adapters and `emalab eval --model DIR`.

No GPU here: CUDA availability is monkeypatched where the logic branches on it, and every model is tiny.
"""

from __future__ import annotations

import json
from unittest import mock

import pytest
import torch

from interp import loading
from interp.loading import DeviceUnavailableError, ModelLoadError, load_model, resolve_device
from tests.test_any_family import tiny_family


@pytest.fixture
def saved(tmp_path):
    def save(family: str = "llama", name: str | None = None):
        model, tok = tiny_family(family)
        path = tmp_path / (name or family)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        return path
    return save


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EMALAB_CACHE", str(tmp_path / "cache"))


# -- devices -----------------------------------------------------------------------------------


def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(loading, "_mps_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(loading, "_mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


@pytest.mark.parametrize("device", ["cuda", "cuda:1", "mps"])
def test_missing_device_is_an_error_not_a_fallback(monkeypatch, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(loading, "_mps_available", lambda: False)
    with pytest.raises(DeviceUnavailableError, match=f"--device {device} but"):
        resolve_device(device)


def test_bad_device_name():
    with pytest.raises(DeviceUnavailableError, match="unknown device 'gpu'"):
        resolve_device("gpu")


def test_cli_device_cuda_without_gpu_fails_clearly(saved, monkeypatch, capsys):
    from emalab.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = main(["eval", "--model", str(saved()), "--device", "cuda", "--no-generate", "--limit", "4", "--quiet"])
    assert rc == 1 and "no CUDA GPU is visible" in capsys.readouterr().err


def test_sdpa_on_cuda_only():
    assert loading.default_attn_implementation(torch.device("cuda")) == "sdpa"
    assert loading.default_attn_implementation(torch.device("cpu")) is None


def test_device_map_leaving_layers_on_cpu_is_listed(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = torch.nn.Linear(2, 2)
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "lm_head": "disk"}
    assert loading.offloaded_layers(model) == ["lm_head", "model.layers.1"]
    model.hf_device_map = {"": 0}
    assert loading.offloaded_layers(model) == []


def test_load_records_device_and_dtype(saved):
    lm = load_model(str(saved()), dtype="bfloat16", device="auto")
    assert lm.extra["device"] == "cpu" and lm.extra["dtype"] == "bfloat16"
    assert lm.device == torch.device("cpu") and next(lm.model.parameters()).dtype == torch.bfloat16


def test_study_passes_device_settings_to_the_loader(monkeypatch, tmp_path):
    import study.core as common

    seen = {}
    fake = mock.MagicMock(spec=common.LoadedModel)  # passes the loader's return-type check

    def fake_load(name, **kw):
        seen.update(kw, name=name)
        return fake

    monkeypatch.setattr(common, "load_model", fake_load)
    cfg = common.StudyConfig(model="org/model", device="cuda:1", device_map="auto", revision="v2",
                             results=str(tmp_path))
    study = common.Study(cfg)
    assert study.lm is fake
    # The measurement model is float32 (docs/numerics.md); the training model on a GPU is bf16.
    assert seen == {"name": "org/model", "dtype": "float32", "device": "cuda:1", "device_map": "auto",
                    "revision": "v2"}
    assert study.train_lm is fake and seen["dtype"] == "bfloat16" and seen["device"] == "cuda:1"
    assert common.StudyConfig().device == "auto"
    assert common.StudyConfig.from_dict(cfg.to_dict()) == cfg


def test_run_command_parses_device_into_the_study_config():
    from emalab.cli import build_parser
    from interp.config import config_from_args
    from study import StudyConfig

    args = build_parser().parse_args(["run", "--device", "cuda", "--device-map", "auto", "--raw-prompts"])
    cfg = config_from_args(StudyConfig, args)
    assert (cfg.device, cfg.device_map, cfg.raw_prompts) == ("cuda", "auto", True)
    assert config_from_args(StudyConfig, build_parser().parse_args(["run"])).device == "auto"


@pytest.mark.parametrize("command", ["eval", "inspect", "direction", "unlearn", "judge"])
def test_every_model_command_defaults_to_auto(command):
    from emalab.cli import build_parser

    argv = [command] + (["x.jsonl"] if command == "judge" else [])
    assert build_parser().parse_args(argv).device == "auto"


# -- weights ids -------------------------------------------------------------------------------


def test_local_weights_id_follows_the_contents(saved, monkeypatch):
    from interp import weights_id as wid

    path = saved()
    first = load_model(str(path)).weights_id
    calls = []
    real = wid.sha256_file
    monkeypatch.setattr(wid, "sha256_file", lambda p: calls.append(p) or real(p))
    assert load_model(str(path)).weights_id == first and calls == []  # digests reused by (path, size, mtime)
    model, tok = tiny_family("llama")
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # "retrained", same config
    model.save_pretrained(path)
    assert load_model(str(path)).weights_id != first and calls


def test_study_weights_id_of_a_local_dir_needs_no_load(saved, tmp_path, monkeypatch):
    import study.core as common
    from interp.weights_id import local_weights_id

    path = saved()
    monkeypatch.setattr(common, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    assert common.Study(common.StudyConfig(model=str(path), results=str(tmp_path))).weights_id == local_weights_id(path)


def test_hub_commit_of_a_pinned_revision_needs_no_network():
    from interp.weights_id import hub_commit

    assert hub_commit("org/model", "a" * 40) == "a" * 40


def test_hub_id_without_network_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="offline.*local directory"):
        load_model("no-such-org/no-such-model", revision="main")


# -- raw prompts -------------------------------------------------------------------------------


def test_eval_raw_prompts_on_a_base_model(saved, capsys):
    from emalab.cli import main

    path = saved()
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (path / "chat_template.jinja").unlink(missing_ok=True)
    assert main(["eval", "--model", str(path), "--no-generate", "--limit", "4", "--quiet", "--no-over-refusal",
                 "--domains", "privacy"]) == 1
    assert "--raw-prompts" in capsys.readouterr().err
    assert main(["eval", "--model", str(path), "--no-generate", "--limit", "4", "--quiet", "--no-over-refusal",
                 "--domains", "privacy", "--raw-prompts"]) == 0


def test_raw_flag_stays_out_of_default_eval_keys():
    from evals.evaluate import EvalConfig

    assert "raw" not in EvalConfig().to_dict() and EvalConfig(raw=True).to_dict()["raw"] is True


# -- emalab eval --model DIR on several families -------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "phi3", "olmo2", "gpt_neox", "gpt2"])
def test_eval_cli_on_a_model_directory(saved, family, tmp_path, capsys):
    from emalab.cli import main

    out = tmp_path / "report.json"
    rc = main(["eval", "--model", str(saved(family)), "--limit", "4", "--max-new-tokens", "2", "--quiet",
               "--domains", "privacy", "--no-over-refusal", "--n-bootstrap", "20", "--dtype", "float32",
               "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert "privacy" in json.loads(out.read_text())["domains"]


# -- foreign adapters ----------------------------------------------------------------------------


def _foreign_adapter(path, base_dir, base_name: str | None = None):
    """A plain PEFT adapter (no emalab metadata), as another project would publish it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = base_name if base_name is not None else str(base_dir)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def test_foreign_peft_adapter_loads_and_changes_the_model(saved, tmp_path):
    from training.lora import load_adapter

    base = saved()
    adapter_dir = _foreign_adapter(tmp_path / "em-organism", base)
    assert not (adapter_dir / "emalab_adapter.json").exists()
    lm = load_model(str(base))
    ids = torch.tensor([[5, 6, 7]])
    before = lm.model(input_ids=ids).logits
    load_adapter(lm, adapter_dir)
    assert len(lm.extra["adapter_id"]) == 16
    assert not torch.allclose(lm.model(input_ids=ids).logits, before)


def test_foreign_adapter_for_another_base_is_refused(saved, tmp_path):
    from training.lora import AdapterMismatchError, load_adapter

    base = saved()
    adapter_dir = _foreign_adapter(tmp_path / "a", base, base_name="meta-llama/Llama-3.1-8B-Instruct")
    with pytest.raises(AdapterMismatchError, match="Llama-3.1-8B-Instruct"):
        load_adapter(load_model(str(base)), adapter_dir)


def test_foreign_adapter_that_does_not_fit_is_refused(saved, tmp_path):
    from training.lora import AdapterMismatchError, load_adapter

    adapter_dir = _foreign_adapter(tmp_path / "a", saved("llama"), base_name="")
    with pytest.raises(AdapterMismatchError, match="does not fit"):
        load_adapter(load_model(str(saved("gpt2"))), adapter_dir)


def test_eval_cli_with_a_foreign_adapter(saved, tmp_path):
    from emalab.cli import main

    base = saved()
    adapter_dir = _foreign_adapter(tmp_path / "em", base)
    assert main(["eval", "--model", str(base), "--adapter", str(adapter_dir), "--no-generate", "--limit", "4",
                 "--quiet", "--domains", "privacy", "--no-over-refusal"]) == 0


def test_hub_adapter_id_without_network_is_one_clear_error(monkeypatch):
    from training.lora import resolve_adapter_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="could not be fetched"):
        resolve_adapter_dir("some-org/some-adapter")
