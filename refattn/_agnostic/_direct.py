"""The materialised reference path: scores -> mask -> softmax -> dropout -> @ V.

Every intermediate is an ordinary array of the full (..., H, L, S) size, which is what
makes this path easy to read and to trust; the blocked path exists for when that size
does not fit in memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._arrays import records_autograd
from .._results import AttentionResult
from .._types import Array, Namespace
from ._scores import constant, final_scores
from ._softmax import masked_softmax

if TYPE_CHECKING:
    from .._problem import AttentionProblem

__all__ = ["apply_dropout", "direct_attention", "group_size", "raw_scores", "repeat_heads",
           "scaled_product"]


def group_size(H: int, heads: int) -> int:
    """The query heads each of ``heads`` key (or value) heads serves: ``H // heads``.

    1 when there are no heads at all (H = heads = 0, an empty problem that validation
    accepts, as torch does), so that no path divides by zero.
    """
    return H // heads if heads else 1


def scaled_product(q: Array, k: Array, scale: float, *, xp: Namespace) -> Array:
    """The scaled scores ``(scale q) k^T``: the scale multiplies q before the product.

    Every path forms its scores in this order (the blocked path and the kernels scale
    each block's query rows, the compensated path splits ``scale q`` exactly), so a
    score overflows only where ``scale q . k`` does: with q and k of size 1e155 and
    ``scale = 1e-308`` the scores are of size 1e2, where ``(q k^T) scale`` would first
    overflow to inf and then give NaN weights. The extra rounding of each ``scale q``
    entry (relative u) is part of the dot product's bound (docs/accuracy.rst).
    """
    return (q * scale) @ xp.matrix_transpose(k)


def repeat_heads(x: Array, groups: int, *, xp: Namespace) -> Array:
    """Repeat each head ``groups`` times along axis -3 (torch's repeat_interleave)."""
    if groups == 1:
        return x
    *lead, n, s, d = x.shape
    expanded = xp.broadcast_to(x[..., None, :, :], (*lead, n, groups, s, d))
    return xp.reshape(expanded, (*lead, n * groups, s, d))


def apply_dropout(x: Array, keep: Array | None, dropout_p: float, *, xp: Namespace) -> Array:
    """Dropout through a keep-mask: dropped entries 0, kept ones scaled by 1 / (1 - p).

    ``dropout_p == 1`` drops everything (zeros, not the 0 * inf of a 1/(1-p) scale).
    """
    if keep is None:
        return x
    if dropout_p >= 1.0:
        return xp.zeros_like(x)
    return xp.where(keep, x, constant(0.0, x, xp=xp)) * (1.0 / (1.0 - dropout_p))


def raw_scores(problem: AttentionProblem, k: Array, v: Array) -> Array:
    """``scale q k^T``, plus ``scale qv v^T`` with ``qv`` (k and v repeated to H heads)."""
    scaled = scaled_product(problem.q, k, problem.scale, xp=problem.xp)
    if problem.qv is not None:
        scaled = scaled + scaled_product(problem.qv, v, problem.scale, xp=problem.xp)
    return scaled


def direct_attention(problem: AttentionProblem, *, need_lse: bool = True) -> AttentionResult:
    """Attention with every intermediate materialised.

    Reads q, k, v (K and Kv dividing H), the scale, the bias with ALiBi, every mask
    at once (``problem.visible``), softcap and score_mod (``problem.mods``), the
    keep-mask and the masked-row policy from the problem.

    The plain case costs what a five-line implementation costs: one product, the mask
    added, the row max subtracted, one ``exp``, one division and the product with V.
    The score array is made here and written in place from the mask on (the same
    arithmetic, without an allocation per step); each option adds only its own work.

    Returns
    -------
    AttentionResult
        ``out`` (..., H, L, Ev), ``lse`` (..., H, L) (None when ``need_lse`` is False)
        and ``weights`` (..., H, L, S), all in the compute form.
    """
    p, xp = problem, problem.xp
    H = p.q.shape[-3]
    k = repeat_heads(p.k, group_size(H, p.k.shape[-3]), xp=xp)
    v = repeat_heads(p.v, group_size(H, p.v.shape[-3]), xp=xp)
    # raw_scores' array is new (a product, or a sum of two): final_scores may work in it,
    # unless torch's autograd records the computation (it may have saved the array).
    in_place = not records_autograd(p.q, p.k, p.v, p.bias, p.alibi_slopes, p.qv, p.sinks)
    scores = final_scores(raw_scores(p, k, v), bias=p.bias_with_alibi,
                          allowed=p.visible, mods=p.mods, xp=xp, owned=in_place)
    # Owned unless a score_mod may have handed back an array of its own.
    weights, lse = masked_softmax(scores, masked_rows=p.masked_rows, xp=xp, sinks=p.sinks,
                                  need_lse=need_lse,
                                  owned=in_place and p.mods.score_mod is None)
    out = apply_dropout(weights, p.keep, p.dropout_p, xp=xp) @ v
    return AttentionResult(out=out, lse=lse, weights=weights)
