"""Stable softmax and log-sum-exp with a policy for fully masked rows.

A row whose every score is -inf has no softmax: exp(-inf - -inf) is NaN. What to
return there is a convention, and libraries differ:

* ``"zero"``: weights 0, so the output row is 0 (torch >= 2.5, ``_safe_softmax``);
* ``"nan"``: the plain softmax's NaN (torch's MultiheadAttention with need_weights);
* ``"uniform"``: weight 1/S on every key (what JAX's finite fill produces).

Only -inf masks a score. A large finite negative score is an ordinary score.
"""

from __future__ import annotations

from typing import Any

from .._types import MASKED_ROW_POLICIES

__all__ = ["MASKED_ROW_POLICIES", "masked_softmax"]


def masked_softmax(scores: Any, *, masked_rows: str, xp: Any) -> tuple[Any, Any]:
    """Softmax over the last axis and the natural-log LSE per row.

    Parameters
    ----------
    scores
        (..., L, S) real floating array; -inf marks a masked score.
    masked_rows
        Policy for rows whose scores are all -inf, one of ``MASKED_ROW_POLICIES``.
    xp
        Array namespace.

    Returns
    -------
    weights, lse
        (..., L, S) and (..., L); the LSE of a fully masked row is -inf whatever the
        policy.
    """
    dtype = scores.dtype
    device = scores.device
    neg_inf = xp.asarray(-xp.inf, dtype=dtype, device=device)
    if scores.shape[-1] == 0:
        # No keys at all: every row is "fully masked"; there is nothing to weigh.
        lse = xp.full(scores.shape[:-1], -xp.inf, dtype=dtype, device=device)
        return scores, lse
    zero = xp.asarray(0.0, dtype=dtype, device=device)
    one = xp.asarray(1.0, dtype=dtype, device=device)
    row_max = xp.max(scores, axis=-1, keepdims=True)
    row_masked = row_max == neg_inf
    # Subtracting 0 instead of -inf on masked rows keeps exp() at exp(-inf) = 0.
    shift = xp.where(row_masked, zero, row_max)
    exps = xp.exp(scores - shift)
    total = xp.sum(exps, axis=-1, keepdims=True)
    safe_total = xp.where(row_masked, one, total)
    weights = exps / safe_total
    lse = xp.where(row_masked, neg_inf, xp.log(safe_total) + shift)[..., 0]
    if masked_rows == "nan":
        weights = xp.where(row_masked, xp.asarray(xp.nan, dtype=dtype, device=device), weights)
    elif masked_rows == "uniform":
        uniform = xp.asarray(1.0 / scores.shape[-1], dtype=dtype, device=device)
        weights = xp.where(row_masked, uniform, weights)
    return weights, lse
