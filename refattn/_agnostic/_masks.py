"""Positional biases and the mods' index grids.

Query i "sits at" key position ``i + shift`` (``refattn._window``, which also holds the
window masks); ALiBi adds ``-slope_h * |i + shift - j|``.

The mods of FlexAttention, ``score_mod(score, b, h, q_idx, kv_idx)`` and
``mask_mod(b, h, q_idx, kv_idx)``, are evaluated once on broadcast integer index grids of
the input's library: b (*batch, 1, 1, 1) the flat batch index (a (1, 1, 1) zero grid
without batch dims), h (H, 1, 1), q_idx (L, 1), kv_idx (1, S).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ._scores import mod_for_grids

__all__ = ["alibi_bias", "evaluate_mask_mod", "index_grids"]


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
                      xp: Any, on_block: bool = False) -> Any:
    """``mask_mod`` on the grids: a boolean array broadcastable to (..., H, L, S).

    ``on_block``: the grids are one block's (see ``_scores.mod_for_grids``).
    """
    result = mod_for_grids(mask_mod, on_block=on_block)(*grids)
    dtype = getattr(result, "dtype", None)
    if dtype is None or not xp.isdtype(dtype, "bool"):
        raise TypeError(
            "mask_mod must return a boolean array (True = take part) from array operations "
            f"on its index arguments; got {type(result).__name__} with dtype {dtype}"
        )
    return result
