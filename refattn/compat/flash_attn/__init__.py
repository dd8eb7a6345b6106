"""flash-attn's conventions: ``flash_attn_func``, ``flash_attn_varlen_func``,
``flash_attn_with_kvcache`` and the packed forms (``flash_attn_qkvpacked_func``,
``flash_attn_kvpacked_func``, ``flash_attn_varlen_qkvpacked_func``,
``flash_attn_varlen_kvpacked_func``).

Reproduces the forward pass of flash-attn 2 (the ``flash_attn`` package, read at
Dao-AILab/flash-attention commit 0251105a: ``flash_attn/flash_attn_interface.py``,
``csrc/flash_attn/flash_api.cpp`` and the kernels' ``mask.h`` / ``softmax.h``):

* layout (B, L, H, E) ("BSHD"); key/value heads K divide H (head h uses key head
  h // (H / K));
* causal masks and windows aligned bottom-right: query i sits at key position
  i + S - L; ``window_size=(left, right)`` lets it see keys
  [i + S - L - left, i + S - L + right], -1 = unlimited, normalised exactly as
  ``flash_api.cpp`` does (see ``flash_window``);
* softcap ``c * tanh(s / c)`` on the scaled scores, then ALiBi
  ``-slope * |i + S - L - j|``, then the masks (-inf); softcap=0 is off;
* a row that sees no key gives output 0 and LSE +inf (flash-attn 2) or -inf
  (flash-attn 3: ``lse_convention="fa3"``);
* the LSE is float32 (float64 for float64 inputs: refattn's oracle keeps its precision).

Each function translates its arguments into :func:`refattn.attention`,
:func:`refattn.attention_varlen` or :func:`refattn.attention_with_kvcache`; nothing
here computes attention.
"""

from __future__ import annotations

# flash_window is internal (shared with refattn._audit and refattn.testing), not in __all__.
from ._args import LSE_CONVENTIONS as LSE_CONVENTIONS
from ._args import flash_window as flash_window
from ._dense import flash_attn_func
from ._kvcache import flash_attn_with_kvcache
from ._packed import (
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from ._varlen import flash_attn_varlen_func

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]
