"""Benchmark 4 — probes on collected activations: per-layer difference-of-means concept vectors,
cross-validated logistic probes, and the concepts × concepts cosine matrix at every layer.

* ``emalab``: :func:`probes.concepts.concept_vectors`, :func:`probes.concepts.probe_accuracy`
  (``method="batched"``: all layers in one batched Newton solve) and
  :func:`probes.entanglement.similarity_matrix`;
* ``naive_sklearn``: the per-layer loop a researcher writes: numpy means, ``cross_val_score`` of a
  ``StandardScaler + LogisticRegression`` pipeline per domain × layer, cosines in a Python loop.

Both use the same activations and the same stratified, seeded folds. Reported: wall time, ratio,
and the accuracy difference (target: within 1 point). The activations (real model, not timed) are
collected once with :func:`interp.activations.collect_activations` (module is named ``probing`` so
that it never shadows the ``probes`` package).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from benchmarks.data import domain_prompts
from benchmarks.harness import BenchConfig, BenchResult, Variant, make_result, ratio, time_alternating
from interp.activations import collect_activations, collect_cached
from interp.loading import LoadedModel
from probes.concepts import concept_vectors, probe_accuracy
from probes.entanglement import similarity_matrix

__all__ = ["ACCURACY_TOLERANCE_POINTS", "emalab_probes", "naive_probes", "collect", "measure", "run"]

ACCURACY_TOLERANCE_POINTS = 1.0


def emalab_probes(harmful: Mapping[str, Tensor], benign: Tensor, n_folds: int, seed: int = 0) -> dict:
    cv = concept_vectors(harmful, benign, contrast="benign")
    acc = probe_accuracy(harmful, benign, contrast="benign", method="batched", n_folds=n_folds, seed=seed)
    sim = similarity_matrix(cv)
    return {"vectors": cv.vectors.double().numpy(), "accuracy": acc.as_array(), "cosines": sim.matrix.numpy()}


def naive_probes(harmful: Mapping[str, Tensor], benign: Tensor, n_folds: int, seed: int = 0) -> dict:
    """The per-layer scikit-learn / Python-loop baseline (same objective, same folds)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    names = list(harmful)
    neg = benign.double().numpy()
    n_layers, d = neg.shape[1], neg.shape[2]
    vectors = np.zeros((len(names), n_layers, d))
    accuracy = np.zeros((len(names), n_layers))
    for c, name in enumerate(names):
        pos = harmful[name].double().numpy()
        x = np.concatenate([pos, neg])
        y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
        k = min(n_folds, int(np.bincount(y.astype(int)).min()))
        folds = StratifiedKFold(k, shuffle=True, random_state=seed)
        for layer in range(n_layers):
            diff = pos[:, layer].mean(0) - neg[:, layer].mean(0)
            vectors[c, layer] = diff / np.linalg.norm(diff)
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, random_state=seed))
            accuracy[c, layer] = cross_val_score(clf, x[:, layer], y, cv=folds).mean()
    cosines = np.zeros((n_layers, len(names), len(names)))
    for layer in range(n_layers):
        for a in range(len(names)):
            for b in range(len(names)):
                va, vb = vectors[a, layer], vectors[b, layer]
                cosines[layer, a, b] = va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb))
    return {"vectors": vectors, "accuracy": accuracy, "cosines": cosines}


def measure(
    harmful: Mapping[str, Tensor], benign: Tensor, n_folds: int, reps: int, warmup: int = 1,
) -> tuple[dict[str, Variant], dict[str, dict], dict[str, float]]:
    """Time both variants on the given activations; returns ``(variants, ratios, checks)``."""
    out: dict[str, dict] = {}

    def ours():
        out["emalab"] = emalab_probes(harmful, benign, n_folds)

    def naive():
        out["naive_sklearn"] = naive_probes(harmful, benign, n_folds)

    times = time_alternating({"emalab": ours, "naive_sklearn": naive}, reps, warmup)
    n_layers = benign.shape[1]
    work = {"concept_layers": len(harmful) * n_layers, "fits": len(harmful) * n_layers * n_folds}
    variants = {
        "emalab": Variant(times["emalab"], work, "concept_vectors + probe_accuracy(method='batched') + similarity_matrix"),
        "naive_sklearn": Variant(times["naive_sklearn"], work,
                                 "numpy means + cross_val_score(StandardScaler+LogisticRegression) per domain × "
                                 "layer + Python-loop cosines"),
    }
    ratios = {"emalab/naive_sklearn": ratio(variants, "emalab", "naive_sklearn")}
    a, b = out["emalab"], out["naive_sklearn"]
    diff_points = 100 * np.abs(a["accuracy"] - b["accuracy"])
    checks = {
        "accuracy_mean_abs_diff_points": float(diff_points.mean()),
        "accuracy_max_abs_diff_points": float(diff_points.max()),
        "accuracy_mean_emalab": float(a["accuracy"].mean()),
        "accuracy_mean_naive": float(b["accuracy"].mean()),
        "accuracy_within_tolerance": bool(diff_points.mean() <= ACCURACY_TOLERANCE_POINTS),
        "concept_vector_min_cosine": float((a["vectors"] * b["vectors"]).sum(-1).min()),
        "cosine_matrix_max_abs_diff": float(np.abs(a["cosines"] - b["cosines"]).max()),
    }
    return variants, ratios, checks


def collect(lm: LoadedModel, per_domain: int, batch_size: int, cache_dir: str | Path | None = None
            ) -> tuple[dict[str, Tensor], Tensor]:
    """Real last-token activations at every layer for the probe prompts (not timed), cached on disk
    under ``cache_dir`` (keyed on the model state) so a rerun skips the forwards."""
    harmful_prompts, benign_prompts = domain_prompts(per_domain, 2 * per_domain)

    def acts(name: str, prompts: list[str]) -> Tensor:
        if cache_dir is None:
            return collect_activations(lm, prompts, batch_size=batch_size)
        ids = [f"bench-{name}-{i}-{hashlib.sha1(p.encode()).hexdigest()[:8]}" for i, p in enumerate(prompts)]
        return collect_cached(lm, prompts, ids, cache_dir, batch_size=batch_size, progress=False).acts

    harmful = {d: acts(d, ps) for d, ps in harmful_prompts.items()}
    return harmful, acts("benign", benign_prompts)


def run(lm: LoadedModel, cfg: BenchConfig) -> BenchResult:
    torch.manual_seed(0)
    from interp.registry import cache_root

    cache = cache_root() / "bench_activations" if cfg.cache_activations else None
    harmful, benign = collect(lm, cfg.probe_per_domain, cfg.batch_size, cache)
    # The naive baseline takes ~50 s a call on 2 shared cores: 3 rounds and no warm-up keep the
    # benchmark near 3 minutes (neither path has a first-call cost worth excluding at this scale).
    reps, warmup = min(cfg.reps, 3), 0
    variants, ratios, checks = measure(harmful, benign, cfg.probe_folds, reps, warmup)
    config = {"model": lm.name, "dtype": str(next(lm.model.parameters()).dtype), "activations": "resid_post, last "
              "token, every layer", "n_per_domain": {d: len(a) for d, a in harmful.items()}, "n_benign": len(benign),
              "layers": int(benign.shape[1]), "d_model": int(benign.shape[2]), "folds": cfg.probe_folds, "C": 1.0,
              "reps": reps, "warmup": warmup}
    notes = ["ratio = median naive time / median emalab time (>1: emalab faster)",
             f"accuracy target: mean |Δ| over domain × layer cells ≤ {ACCURACY_TOLERANCE_POINTS} point; the max cell "
             "is reported too (one test prompt of a fold flips a cell by 100/n_test/n_folds points)"]
    return make_result("probes", variants, ratios, config, "cpu", checks, notes)
