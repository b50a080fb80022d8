"""emalab's probing layer: directions and their builders, concept vectors and probes, the refusal
direction, interventions and entanglement measures (statistics live in :mod:`evals.stats`).

Builds on :mod:`interp` (never the other way round). The main names are re-exported here.
"""

from interp.direction import Direction, DModelMismatchError, MissingLayerError
from probes.concepts import ConceptVectors, concept_vectors
from probes.directions import DirectionBuilder, logistic, mean_difference, pca
from probes.entanglement import depth_bands, drift, early_similarity, refusal_projection, similarity_matrix
from probes.interventions import ablate_direction, add_activation, orthogonalize_weights, steer
from probes.linear_probe import ProbeAccuracy, probe_accuracy
from probes.refusal_direction import RefusalDirectionConfig, RefusalDirectionResult, select_refusal_direction

__all__ = [
    "Direction",
    "DModelMismatchError",
    "MissingLayerError",
    "DirectionBuilder",
    "mean_difference",
    "pca",
    "logistic",
    "ConceptVectors",
    "ProbeAccuracy",
    "concept_vectors",
    "probe_accuracy",
    "RefusalDirectionConfig",
    "RefusalDirectionResult",
    "select_refusal_direction",
    "ablate_direction",
    "add_activation",
    "steer",
    "orthogonalize_weights",
    "similarity_matrix",
    "refusal_projection",
    "drift",
    "early_similarity",
    "depth_bands",
]
