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
from ._scores import constant

__all__ = ["MASKED_ROW_POLICIES", "masked_softmax"]


def masked_softmax(scores: Any, *, masked_rows: str, xp: Any, need_lse: bool = True,
                   owned: bool = False) -> tuple[Any, Any]:
    """Softmax over the last axis and the natural-log LSE per row.

    Parameters
    ----------
    scores
        (..., L, S) real floating array; -inf marks a masked score.
    masked_rows
        Policy for rows whose scores are all -inf, one of ``MASKED_ROW_POLICIES``.
    xp
        Array namespace.
    need_lse
        False: the LSE is not formed (None is returned in its place).
    owned
        The caller gives ``scores`` up: the shift is subtracted in place (the same
        differences, one score-sized allocation fewer).

    Returns
    -------
    weights, lse
        (..., L, S) and (..., L); the LSE of a fully masked row is -inf whatever the
        policy.
    """
    if scores.shape[-1] == 0:
        # No keys at all: every row is "fully masked"; there is nothing to weigh.
        lse = xp.full(scores.shape[:-1], -xp.inf, dtype=scores.dtype, device=scores.device)
        return scores, lse
    row_max = xp.max(scores, axis=-1, keepdims=True)
    row_masked = row_max == -xp.inf
    # Subtracting 0 instead of -inf on masked rows keeps exp() at exp(-inf) = 0.
    shift = xp.where(row_masked, constant(0.0, scores, xp=xp), row_max)
    if owned:
        scores -= shift
        exps = xp.exp(scores)
    else:
        exps = xp.exp(scores - shift)
    total = xp.sum(exps, axis=-1, keepdims=True)
    # A row's largest term is exp(0) = 1, so only a fully masked row sums to less.
    safe_total = xp.where(row_masked, constant(1.0, scores, xp=xp), total)
    exps /= safe_total  # exps is this function's own array: divided in place
    weights = exps
    lse = None
    if need_lse:
        lse = xp.where(row_masked, constant(-xp.inf, scores, xp=xp),
                       xp.log(safe_total) + shift)[..., 0]
    if masked_rows == "nan":
        weights = xp.where(row_masked, constant(xp.nan, scores, xp=xp), weights)
    elif masked_rows == "uniform":
        weights = xp.where(row_masked, constant(1.0 / scores.shape[-1], scores, xp=xp),
                           weights)
    return weights, lse
