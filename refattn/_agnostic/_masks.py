"""Boolean "may attend" masks and positional biases built from positions.

Query i "sits at" key position ``i + shift``: shift = 0 for ``"top_left"`` alignment
(torch's ``is_causal``) and S - L for ``"bottom_right"`` (flash-attn, KV-cache decoding,
where the last query sees every key). A window (left, right) lets query i see keys j
with ``i + shift - left <= j <= i + shift + right`` (None = unlimited on that side);
causal is the window (None, 0). ALiBi adds ``-slope_h * |i + shift - j|``.

The mods of FlexAttention, ``score_mod(score, b, h, q_idx, kv_idx)`` and
``mask_mod(b, h, q_idx, kv_idx)``, are evaluated once on broadcast integer index grids of
the input's library: b (*batch, 1, 1, 1) the flat batch index (a (1, 1, 1) zero grid
without batch dims), h (H, 1, 1), q_idx (L, 1), kv_idx (1, S).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

__all__ = [
    "alibi_bias",
    "alignment_shift",
    "causal_mask",
    "evaluate_mask_mod",
    "index_grids",
    "merge_windows",
    "window_mask",
]

Window = tuple[int | None, int | None]


def alignment_shift(L: int, S: int, alignment: str) -> int:
    """Offset added to a query index to find its diagonal key index."""
    return 0 if alignment == "top_left" else S - L


def causal_mask(L: int, S: int, *, alignment: str, xp: Any, device: Any) -> Any:
    """(L, S) boolean array, True where query i may attend key j."""
    return window_mask(L, S, left=None, right=0, shift=alignment_shift(L, S, alignment),
                       xp=xp, device=device)


def merge_windows(causal: bool, window: Window | None) -> Window | None:
    """The positional window implied by ``causal`` and ``window`` together (their
    intersection); None when nothing restricts by position."""
    if window is None and not causal:
        return None
    left, right = window if window is not None else (None, None)
    if causal:
        right = 0 if right is None else min(right, 0)
    if left is None and right is None:
        return None
    return left, right


def window_mask(L: int, S: int, *, left: int | None, right: int | None, shift: int,
                xp: Any, device: Any) -> Any:
    """(L, S) boolean array of the window ``left <= j - (i + shift) <= right``."""
    offset = (xp.reshape(xp.arange(S, device=device), (1, S))
              - xp.reshape(xp.arange(L, device=device), (L, 1)) - shift)
    ok = xp.ones((L, S), dtype=xp.bool, device=device)
    if right is not None:
        ok = xp.logical_and(ok, offset <= right)
    if left is not None:
        ok = xp.logical_and(ok, offset >= -left)
    return ok


def alibi_bias(slopes: Any, L: int, S: int, *, shift: int, xp: Any) -> Any:
    """``-slope * |i + shift - j|`` of shape (..., H, L, S) from slopes (..., H)."""
    distance = xp.abs(xp.reshape(xp.arange(L, device=slopes.device), (L, 1)) + shift
                      - xp.reshape(xp.arange(S, device=slopes.device), (1, S)))
    return -(slopes[..., None, None] * xp.astype(distance, slopes.dtype))


def index_grids(batch: tuple[int, ...], H: int, L: int, S: int, *, xp: Any, device: Any
                ) -> tuple[Any, Any, Any, Any]:
    """The (b, h, q_idx, kv_idx) grids the mods are evaluated on."""
    if batch:
        b = xp.reshape(xp.arange(math.prod(batch), device=device), (*batch, 1, 1, 1))
    else:
        b = xp.zeros((1, 1, 1), dtype=xp.int64, device=device)
    h = xp.reshape(xp.arange(H, device=device), (H, 1, 1))
    q_idx = xp.reshape(xp.arange(L, device=device), (L, 1))
    kv_idx = xp.reshape(xp.arange(S, device=device), (1, S))
    return b, h, q_idx, kv_idx


def evaluate_mask_mod(mask_mod: Callable[..., Any], grids: tuple[Any, Any, Any, Any], *,
                      xp: Any) -> Any:
    """``mask_mod`` on the grids: a boolean array broadcastable to (..., H, L, S)."""
    result = mask_mod(*grids)
    dtype = getattr(result, "dtype", None)
    if dtype is None or not xp.isdtype(dtype, "bool"):
        raise TypeError(
            "mask_mod must return a boolean array (True = take part) from array operations "
            f"on its index arguments; got {type(result).__name__} with dtype {dtype}"
        )
    return result
