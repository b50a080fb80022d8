"""Concept geometry beside EMA: one point per (unlearning target, untouched domain), holding the
domain's concept-vector similarity to the target in each layer band and the refusal drop that
unlearning the target caused there (judged, relative to the base rate, and in log-odds); and how
reliable the concept vectors of each band are."""

from __future__ import annotations

from safetensors.torch import load_file

from evals.suite import DOMAINS
from probes.concepts import Reliability, concept_reliability
from probes.entanglement import BANDS, band_layers, early_similarity
from study.conditions import condition
from study.core import Study
from study.verdicts import paired_drop

__all__ = ["ema_points", "band_reliability"]


def ema_points(study: Study, targets: tuple[str, ...], contrast: str) -> list[dict]:
    """One point per (target, untouched domain): band similarities of the base model's concept
    vectors (``contrast``: one of :data:`probes.concepts.CONTRASTS`), the paired drops after NPO on the
    target (seeds pooled by :func:`study.condition`) and the domain's base refusal."""
    _, base = study.evaluate("base")
    concepts = study.concepts(contrast=contrast)
    out = []
    for target in targets:
        cond = condition(study, target, "npo", (), base_records=base)
        sims = {band: early_similarity(concepts, concepts.direction(target), band, len(concepts.layers))
                for band in BANDS}
        for d in (d for d in DOMAINS if d != target):
            j, lg = (paired_drop(cond["base"], cond["after"], d, m) for m in ("judge", "logit"))
            out.append({"target": target, "domain": d, "similarity": {band: sims[band][d] for band in BANDS},
                        "drop_judge": j["drop"], "base_judge": j["before"], "after_judge": j["after"],
                        "drop_relative": j["drop"] / j["before"] if j["before"] > 0 else None,
                        "drop_logit": lg["drop"], "base_logit": lg["before"]})
    return out


def band_reliability(study: Study, contrast: str) -> tuple[Reliability, dict[str, float]]:
    """Split-half reliability of the base model's concept vectors (:func:`probes.concepts.concept_reliability`
    on the study's cached activations) per layer, and its mean over each layer band."""
    acts = load_file(study.activations())
    layers = study.concepts(contrast=contrast).layers
    rel = concept_reliability({d: acts[d] for d in DOMAINS}, acts["benign"], contrast, layers)
    return rel, {band: rel.mean(band_layers(band, len(layers))) for band in BANDS}
