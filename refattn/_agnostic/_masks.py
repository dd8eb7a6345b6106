"""Boolean "may attend" masks built from positions.

Alignment decides where the causal diagonal sits when L != S:

* ``"top_left"`` (torch's ``is_causal``): query i sees keys j <= i;
* ``"bottom_right"`` (flash-attn, KV-cache decoding): query i sees keys
  j <= i + S - L, so the last query sees every key.
"""

from __future__ import annotations

from typing import Any

__all__ = ["alignment_shift", "causal_mask"]


def alignment_shift(L: int, S: int, alignment: str) -> int:
    """Offset added to a query index to find its diagonal key index."""
    return 0 if alignment == "top_left" else S - L


def causal_mask(L: int, S: int, *, alignment: str, xp: Any, device: Any) -> Any:
    """(L, S) boolean array, True where query i may attend key j."""
    rows = xp.arange(L, device=device)[:, None]
    cols = xp.arange(S, device=device)[None, :]
    return cols <= rows + alignment_shift(L, S, alignment)
