"""The materialised reference path: scores -> mask -> softmax -> dropout -> @ V.

Every intermediate is an ordinary array of the full (..., H, L, S) size, which is what
makes this path easy to read and to trust; the blocked path exists for when that size
does not fit in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._scores import ScoreMods, final_scores
from ._softmax import masked_softmax

__all__ = ["DirectResult", "apply_dropout", "direct_attention", "repeat_heads"]


@dataclass
class DirectResult:
    out: Any
    lse: Any
    weights: Any


def repeat_heads(x: Any, groups: int, *, xp: Any) -> Any:
    """Repeat each head ``groups`` times along axis -3 (torch's repeat_interleave)."""
    if groups == 1:
        return x
    *lead, n, s, d = x.shape
    expanded = xp.broadcast_to(x[..., None, :, :], (*lead, n, groups, s, d))
    return xp.reshape(expanded, (*lead, n * groups, s, d))


def apply_dropout(x: Any, keep: Any, dropout_p: float, *, xp: Any) -> Any:
    """Dropout through a keep-mask: dropped entries 0, kept ones scaled by 1 / (1 - p).

    ``dropout_p == 1`` drops everything (zeros, not the 0 * inf of a 1/(1-p) scale).
    """
    if keep is None:
        return x
    if dropout_p >= 1.0:
        return xp.zeros_like(x)
    zero = xp.asarray(0.0, dtype=x.dtype, device=x.device)
    return xp.where(keep, x, zero) * (1.0 / (1.0 - dropout_p))


def direct_attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    scale: float,
    bias: Any,
    allowed: Any,
    keep: Any,
    dropout_p: float,
    masked_rows: str,
    mods: ScoreMods | None = None,
    xp: Any,
) -> DirectResult:
    """Attention with every intermediate materialised.

    Parameters
    ----------
    q, k, v
        (..., H, L, E), (..., K, S, E), (..., Kv, S, Ev) in the compute dtype, with
        K and Kv dividing H.
    scale
        Multiplies q @ k^T.
    bias
        None or an additive float array broadcastable to (..., H, L, S).
    allowed
        None or a boolean array broadcastable to (..., H, L, S): False masks a score.
    keep
        None or a boolean dropout keep-mask broadcastable to (..., H, L, S).
    dropout_p
        Kept weights are scaled by 1 / (1 - dropout_p); dropout_p == 1 drops all.
    masked_rows
        Policy for fully masked rows (see ``masked_softmax``).
    mods
        softcap and score_mod, applied around the bias (see ``_scores``).
    """
    H = q.shape[-3]
    k = repeat_heads(k, H // k.shape[-3], xp=xp)
    v = repeat_heads(v, H // v.shape[-3], xp=xp)
    scores = final_scores((q @ xp.matrix_transpose(k)) * scale, bias=bias, allowed=allowed,
                          mods=mods, xp=xp)
    weights, lse = masked_softmax(scores, masked_rows=masked_rows, xp=xp)
    out = apply_dropout(weights, keep, dropout_p, xp=xp) @ v
    return DirectResult(out=out, lse=lse, weights=weights)
