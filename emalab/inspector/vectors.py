"""The directions the inspector projects onto: seven concept vectors and a refusal direction.

They are looked up in a results directory first (saved ``concepts.safetensors`` /
``direction.safetensors`` files, or the study's cached probe-split activations), and otherwise
computed once from the suite's probe split and cached under the emalab cache directory, keyed on
the base weights, dtype, prompt limit and suite manifest. The source of each is recorded as a
sentence, which the page shows.

Everything is computed on the *base* weights (adapter disabled), so base and adapted views are
projections onto the same axes and their difference means something.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from interp.direction import Direction
from interp.io import config_hash, read_json, sha256_file
from interp.loading import LoadedModel, adapter_disabled
from probes.concepts import ConceptVectors, concept_vectors

__all__ = ["InspectorVectors", "resolve_vectors", "find_concepts", "find_refusal", "compute_vectors"]

FALLBACK_LAYER_FRACTION = 0.45
"""Depth of the fallback refusal direction. Refusal directions selected by ablation sit in the
middle of the stack (Arditi et al. 2024); this is a guess, used only when no selected one is saved."""


@dataclass
class InspectorVectors:
    """Concept vectors plus a refusal direction, with where each came from."""

    concepts: ConceptVectors
    refusal: Direction
    concepts_source: str
    """One sentence for the page: the file, stage or computation the concept vectors came from."""
    refusal_source: str
    """One sentence for the page: where the refusal direction came from."""

    def to_dict(self) -> dict:
        return {"concepts": self.concepts.concepts, "layers": self.concepts.layers,
                "concepts_source": self.concepts_source, "refusal_source": self.refusal_source,
                "refusal_layer": self.refusal.meta.get("layer", self.refusal.layers[0] if self.refusal.is_global else None)}


def _newest_first(paths) -> list[Path]:
    return sorted(paths, key=lambda p: p.stat().st_mtime, reverse=True)


def _stage_key(path: Path) -> dict | None:
    """``key.json`` of a *finished* stage directory holding ``path``, else ``None``."""
    stage = path.parent
    if not (stage / "DONE.json").exists() or not (stage / "key.json").exists():
        return None
    return read_json(stage / "key.json")


def find_concepts(results: Path, lm: LoadedModel) -> tuple[ConceptVectors, str] | None:
    """Concept vectors saved under ``results`` for ``lm``'s base weights, newest first.

    Looks for ``concepts.safetensors`` files, then for the study's finished ``activations`` stages
    (probe-split last-token activations of every domain and the benign set, no adapter).
    """
    from evals.suite import DOMAINS

    if not results.exists():
        return None
    for path in _newest_first(results.rglob("concepts.safetensors")):
        try:
            cv = ConceptVectors.load(path).check_model(lm.model)
        except (ValueError, OSError):
            continue
        owner = cv.meta.get("state", cv.meta.get("weights"))
        if owner is not None and owner != lm.weights_id:
            continue
        return cv, f"loaded from {path}"
    for path in _newest_first(results.glob("stages/activations/*/acts.safetensors")):
        key = _stage_key(path)
        if not key or key.get("weights") != lm.weights_id or key.get("adapter") is not None:
            continue
        from safetensors.torch import load_file

        acts = load_file(str(path))
        if not set(DOMAINS) | {"benign"} <= set(acts):
            continue
        cv = concept_vectors({d: acts[d] for d in DOMAINS}, acts["benign"], contrast="benign")
        try:
            return cv.check_model(lm.model), (f"domain − benign means of the study's probe-split activations "
                                              f"({key.get('limit')} prompts per domain) in {path.parent}")
        except ValueError:
            continue
    return None


def find_refusal(results: Path, lm: LoadedModel) -> tuple[Direction, str] | None:
    """A selected refusal direction saved under ``results`` for ``lm``'s base weights, newest first.

    A file inside a finished stage must have been computed on the same weights (``state`` or
    ``weights`` in its key); a loose file must say so in its metadata.
    """
    if not results.exists():
        return None
    for path in _newest_first(results.rglob("direction.safetensors")):
        key = _stage_key(path)
        if key is not None:
            owner = key.get("state", key.get("weights"))
        elif (path.parent / "key.json").exists():
            continue  # an unfinished stage
        else:
            owner = None
        try:
            d = Direction.load(path).check_model(lm.model)
        except (ValueError, KeyError, OSError):
            continue
        owner = owner or d.meta.get("state")
        if owner is None and d.meta.get("model") not in (None, lm.name):
            continue
        if owner is not None and owner != lm.weights_id:
            continue
        where = f"layer {d.meta['layer']}" if "layer" in d.meta else f"{len(d.layers)} layer(s)"
        return d, f"selected refusal direction ({where}) loaded from {path}"
    return None


def compute_vectors(
    lm: LoadedModel, cache_dir: Path, probe_limit: int = 12, batch_size: int = 8, raw: bool = False
) -> tuple[ConceptVectors, Direction, Path]:
    """Concept vectors (domain − benign) and a fallback refusal direction (all domains pooled −
    benign, at ``FALLBACK_LAYER_FRACTION`` depth), from the probe split; cached under ``cache_dir``.

    Returns:
        ``(concept vectors, refusal direction, cache directory of this key)``.
    """
    from evals.suite import DOMAINS, load_prompts, suite_dir
    from interp.activations import collect_activations
    from interp.adapter import n_layers
    from interp.io import atomic_write_json

    dtype = str(next(lm.model.parameters()).dtype)
    manifest = suite_dir() / "manifest.json"
    key = {"weights": lm.weights_id, "dtype": dtype, "split": "probe", "limit": probe_limit,
           "site": "resid_post", "position": "last", "contrast": "benign",
           "suite": sha256_file(manifest) if manifest.exists() else None,
           "refusal_layer_fraction": FALLBACK_LAYER_FRACTION, **({"raw": True} if raw else {})}
    where = Path(cache_dir) / config_hash(key, 16)
    c_path, r_path = where / "concepts.safetensors", where / "refusal_fallback.safetensors"
    if c_path.exists() and r_path.exists():
        return ConceptVectors.load(c_path), Direction.load(r_path), where
    sets = {name: [p.text for p in load_prompts(name, "probe", limit=probe_limit)] for name in (*DOMAINS, "benign")}
    texts = [t for prompts in sets.values() for t in prompts]
    with adapter_disabled(lm):  # one call: length-sorted batches across sets, one progress bar
        stacked = collect_activations(lm, texts, batch_size=batch_size, raw=raw, progress=True)
    acts, start = {}, 0
    for name, prompts in sets.items():
        acts[name], start = stacked[start:start + len(prompts)], start + len(prompts)
    meta = {"weights": lm.weights_id, "dtype": dtype, "limit": probe_limit, "split": "probe"}
    cv = concept_vectors({d: acts[d] for d in DOMAINS}, acts["benign"], contrast="benign", meta=meta)
    layer = round(FALLBACK_LAYER_FRACTION * (n_layers(lm.model) - 1))
    pooled = torch.cat([acts[d][:, layer] for d in DOMAINS]).double().mean(0)
    refusal = Direction.from_vectors((pooled - acts["benign"][:, layer].double().mean(0)).float(), [layer],
                                     name="refusal", meta={**meta, "builder": "pooled_mean_difference",
                                                           "layer": layer, "site": "resid_post", "selected": False})
    cv.save(c_path)
    refusal.save(r_path)
    atomic_write_json(where / "key.json", key)
    return cv, refusal, where


def resolve_vectors(
    lm: LoadedModel, results: Path | None, cache_dir: Path, probe_limit: int = 12, raw: bool = False
) -> InspectorVectors:
    """Concept vectors and refusal direction for ``lm``'s base weights: from ``results`` if saved
    there, else computed once (see :func:`compute_vectors`). With ``raw`` (prompts without a chat
    template) saved vectors, which were read from chat-formatted prompts, are not used."""
    search = results is not None and not raw
    found_c = find_concepts(Path(results), lm) if search else None
    found_r = find_refusal(Path(results), lm) if search else None
    if found_c is not None and found_r is not None:
        return InspectorVectors(found_c[0], found_r[0], found_c[1], found_r[1])
    cv, fallback, where = compute_vectors(lm, cache_dir, probe_limit, raw=raw)
    if found_c is None:
        c_src = (f"computed at startup: domain − benign means of last-token activations, {probe_limit} probe-split "
                 f"prompts per domain (cached in {where})")
    else:
        cv, c_src = found_c
    if found_r is None:
        r_src = (f"fallback, not selected: pooled harmful − benign mean at layer {fallback.meta['layer']} "
                 f"({probe_limit} probe prompts per domain; run `emalab direction` for the selected one)")
        refusal = fallback
    else:
        refusal, r_src = found_r
    return InspectorVectors(cv, refusal, c_src, r_src)

