"""The attention step of torch's multi-head attention, with and without the weights.

``need_weights=True`` is torch's explicit path: a plain softmax (a query that sees no key
gets NaN) whose weights, after dropout, are returned. ``need_weights=False`` is torch's
SDPA call (such a query gets 0). Both are one ``refattn.attention`` call in float64 on
(N, L, H, D) arrays (layout BLHD).
"""

from __future__ import annotations

import math
from typing import Any

import array_api_compat

from ..._front_door import attention
from ..._types import Array, Namespace

__all__ = ["attend", "returned_weights"]


def attend(
    q: Array, k: Array, v: Array, bias: Array | None, *, causal: bool, p: float,
    dropout_mask: Array | None, rng: Any, need_weights: bool, xp: Namespace,
) -> tuple[Array, Array | None]:
    """The attention output (N, L, H, D) and, with ``need_weights``, the weights
    (N, H, L, S) after dropout; else None."""
    if need_weights:
        return _attend_with_weights(q, k, v, bias, p, dropout_mask, rng, xp=xp)
    # torch's math SDPA scales q and k by sqrt(1/sqrt(D)) each before the product.
    root = math.sqrt(1.0 / math.sqrt(q.shape[-1]))
    out = attention(
        q * root, k * root, v, bias=bias, causal=causal, alignment="top_left", scale=1.0,
        dropout_p=p, dropout_mask=dropout_mask, rng=rng, masked_rows="zero",
        layout="BLHD", xp=xp,
    )
    return out, None


def _attend_with_weights(
    q: Array, k: Array, v: Array, bias: Array | None, p: float, dropout_mask: Array | None,
    rng: Any, *, xp: Namespace,
) -> tuple[Array, Array]:
    # torch's need_weights path: softmax(baddbmm(mask, q * sqrt(1/D), k^T)), a plain
    # softmax (NaN rows), then dropout on the weights it returns.
    N, L, H, D = q.shape
    res = attention(
        q * math.sqrt(1.0 / float(D)), k, v, bias=bias, scale=1.0, dropout_p=p,
        dropout_mask=dropout_mask, rng=rng, masked_rows="nan", layout="BLHD",
        return_weights=True, return_dropout_mask=True, xp=xp,
    )
    out, weights = res.out, res.weights
    if p > 0.0:
        # torch's dropout multiplies by the scaled keep-mask, so a NaN weight stays NaN
        # even where dropped; refattn's dropout selects, so restore torch's NaN here.
        keep = xp.reshape(res.dropout_mask, weights.shape)
        factor = 0.0 if p == 1.0 else 1.0 / (1.0 - p)
        weights = weights * xp.astype(keep, xp.float64) * factor
        nan_rows = xp.any(xp.isnan(weights), axis=-1)  # (N, H, L)
        nan = xp.asarray(xp.nan, dtype=xp.float64, device=array_api_compat.device(q))
        out = xp.where(xp.permute_dims(nan_rows, (0, 2, 1))[..., None], nan, out)
    return out, weights


def returned_weights(
    weights: Array | None, *, average: bool, batched: bool, dtype: Any, xp: Namespace
) -> Array | None:
    """The weights as torch returns them: averaged over heads on request, without the
    batch axis for an unbatched query, in the query's dtype."""
    if weights is None:
        return None
    if average:
        weights = xp.mean(weights, axis=1)
    if not batched:
        weights = weights[0, ...]
    return xp.astype(weights, dtype)
