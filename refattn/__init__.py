"""refattn: the attention oracle.

A float64 reference implementation of scaled dot-product attention, written once
against the Python array API, so the same code checks kernels on NumPy, torch, CuPy
and array-api-strict arrays.
"""

from . import mods
from ._front_door import AttentionGrads, AttentionResult, attention, attention_backward
from ._threads import get_num_threads, set_num_threads
from .classic import attention_pooling, attention_scores, bmm_attention
from .compat.torch import (
    MultiheadAttention,
    multi_head_attention_forward,
    scaled_dot_product_attention,
    scaled_dot_product_attention_backward,
)
from .kvcache import KVCacheResult, attention_with_kvcache
from .rotary import apply_rotary_emb
from .varlen import attention_varlen, attention_varlen_backward

__version__ = "0.1.0"

__all__ = [
    "AttentionGrads",
    "AttentionResult",
    "KVCacheResult",
    "MultiheadAttention",
    "__version__",
    "apply_rotary_emb",
    "attention",
    "attention_backward",
    "attention_pooling",
    "attention_scores",
    "attention_varlen",
    "attention_varlen_backward",
    "attention_with_kvcache",
    "bmm_attention",
    "get_num_threads",
    "mods",
    "multi_head_attention_forward",
    "scaled_dot_product_attention",
    "scaled_dot_product_attention_backward",
    "set_num_threads",
]
