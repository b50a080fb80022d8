"""The one vocabulary of tensor dimensions used across emalab.

Dimension names: ``batch pos layer d_model d_vocab concept``. Public tensor functions annotate
with jaxtyping using exactly these names, and einops patterns reuse them. A leading underscore
(``_batch``) names a dimension that is not tied across arguments: positives and negatives of a
contrast may differ in number. Tensor aliases are defined here and imported, never restated.
"""

from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["Float", "Int", "Tensor", "Acts", "UnpairedActs", "LayerActs", "LayerVectors", "Vector", "TokenIds",
           "Mask"]

Acts = Float[Tensor, "batch layer d_model"]
"""Last-token activations of a batch of prompts at several layers."""
UnpairedActs = Float[Tensor, "_batch layer d_model"]
"""Activations whose batch size is not tied to another argument's (the two sides of a contrast)."""
LayerActs = Float[Tensor, "batch d_model"]
"""Activations of a batch at one layer."""
LayerVectors = Float[Tensor, "layer d_model"]
"""One vector per layer (a mean, a raw direction)."""
Vector = Float[Tensor, " d_model"]
TokenIds = Int[Tensor, "batch pos"]
Mask = Int[Tensor, "batch pos"]
