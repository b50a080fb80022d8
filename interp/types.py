"""The one vocabulary of tensor dimensions used across emalab.

Dimension names: ``batch pos layer d_model d_vocab concept``. Public tensor functions annotate
with jaxtyping using exactly these names, and einops patterns reuse them.
"""

from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["Float", "Int", "Tensor", "Acts", "LayerActs", "Vector", "TokenIds", "Mask"]

Acts = Float[Tensor, "batch layer d_model"]
LayerActs = Float[Tensor, "batch d_model"]
Vector = Float[Tensor, "d_model"]
TokenIds = Int[Tensor, "batch pos"]
Mask = Int[Tensor, "batch pos"]
