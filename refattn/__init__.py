"""refattn: the attention oracle.

A float64 reference implementation of scaled dot-product attention, written once
against the Python array API, so the same code checks kernels on NumPy, torch, CuPy
and array-api-strict arrays.
"""

from .attention import AttentionResult, attention
from .compat.torch import scaled_dot_product_attention

__version__ = "0.1.0"

__all__ = [
    "AttentionResult",
    "__version__",
    "attention",
    "scaled_dot_product_attention",
]
