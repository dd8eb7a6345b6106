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

__all__ = ["MASKED_ROW_POLICIES", "join_sinks", "masked_softmax", "sink_column", "sinks_grad"]


def sink_column(sinks: Any) -> Any:
    """(H,) sink logits as an (H, 1, 1) array, which broadcasts against (..., H, L, 1)."""
    return sinks[:, None, None]


def masked_softmax(scores: Any, *, masked_rows: str, xp: Any, sinks: Any = None,
                   need_lse: bool = True, owned: bool = False) -> tuple[Any, Any]:
    """Softmax over the last axis and the natural-log LSE per row.

    Parameters
    ----------
    scores
        (..., L, S) real floating array; -inf marks a masked score.
    masked_rows
        Policy for rows whose scores are all -inf, one of ``MASKED_ROW_POLICIES``.
    xp
        Array namespace.
    sinks
        None, or (H,) sink logits (scores on axis -3 being the heads): each joins its
        head's rows as one more score with no value, so the weights of a row sum to
        less than 1 and its LSE includes it. A row is then fully masked only where its
        sink is -inf too.
    need_lse
        False: the LSE is not formed (None is returned in its place).
    owned
        The caller gives ``scores`` up and nothing records the operations (torch's
        autograd would have saved them): the shift is subtracted and the division done
        in place (the same arithmetic, two score-sized allocations fewer).

    Returns
    -------
    weights, lse
        (..., L, S) and (..., L); the LSE of a fully masked row is -inf whatever the
        policy.
    """
    sink = None if sinks is None else sink_column(sinks)
    if scores.shape[-1] == 0:
        # No keys at all: every row is "fully masked"; there is nothing to weigh.
        lse = xp.full(scores.shape[:-1], -xp.inf, dtype=scores.dtype, device=scores.device)
        if sink is not None:  # the sink alone: weight 1 on a zero value
            lse = xp.broadcast_to(sink[..., 0], lse.shape) * 1.0
        return scores, lse
    row_max = xp.max(scores, axis=-1, keepdims=True)
    if sink is not None:
        row_max = xp.maximum(row_max, sink)
    row_masked = row_max == -xp.inf
    # Subtracting 0 instead of -inf on masked rows keeps exp() at exp(-inf) = 0.
    shift = xp.where(row_masked, constant(0.0, scores, xp=xp), row_max)
    if owned:
        scores -= shift
        exps = xp.exp(scores)
    else:
        exps = xp.exp(scores - shift)
    total = xp.sum(exps, axis=-1, keepdims=True)
    if sink is not None:
        total = total + xp.exp(sink - shift)
    # A row's largest term is exp(0) = 1 (a key's or the sink's), so only a fully masked
    # row sums to less.
    safe_total = xp.where(row_masked, constant(1.0, scores, xp=xp), total)
    if owned:
        exps /= safe_total  # exps is this function's own array: divided in place
        weights = exps
    else:
        weights = exps / safe_total
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


def join_sinks(out: Any, lse: Any, weights: Any, sinks: Any, *, xp: Any
               ) -> tuple[Any, Any, Any]:
    """A result computed without sinks, with them: ``lse' = logaddexp(lse, sink)``, the
    output and weights times ``P = exp(lse - lse') = 1 / (1 + exp(sink - lse))``.

    For the paths that normalise without the sink (the blocked path's online softmax):
    the sink adds one term with no value to each denominator, which scales the row. A
    row with no visible key (lse = -inf) gives output and weights 0 and lse = sink; one
    whose sink is -inf as well keeps its masked-row policy. The factor's rounding is
    that of ``exp(sink - lse)``: relative u (1 + |sink - lse|) of the sink's share.
    """
    sink = sink_column(sinks)[..., 0]  # (H, 1) against lse (..., H, L)
    joined = xp.logaddexp(lse, sink)
    only_sink = (lse == -xp.inf) & (joined > -xp.inf)
    one = xp.asarray(1.0, dtype=lse.dtype, device=lse.device)
    zero = xp.asarray(0.0, dtype=lse.dtype, device=lse.device)
    # 1 / (1 + exp(sink - lse)) rather than exp(lse - joined): no cancellation of two
    # values of the size of lse.
    # lse = -inf enters as 0 (those rows take 0 or 1 below): no -inf - -inf.
    finite_lse = xp.where(lse == -xp.inf, zero, lse)
    factor = xp.where(joined == -xp.inf, one,
                      xp.where(only_sink, zero, one / (one + xp.exp(sink - finite_lse))))
    out = xp.where(only_sink[..., None], zero, out * factor[..., None])
    if weights is not None:
        weights = xp.where(only_sink[..., None], zero, weights * factor[..., None])
    return out, joined, weights


def sinks_grad(sinks: Any, lse: Any, D: Any, *, xp: Any) -> Any:
    """d sinks (H,) from the LSE (with the sinks) and ``D = rowsum(dO * O)`` (..., H, L).

    The sink is one more score with a zero value, so the softmax backward gives it
    ``dS_sink = P_sink (0 - D)``; each head's sink is shared by every row and batch
    entry: ``d sink_h = -sum P_sink D`` over them. ``P_sink = exp(sink - lse)``, 0 where
    both are -inf.
    """
    sink = sink_column(sinks)[..., 0]
    zero = xp.asarray(0.0, dtype=lse.dtype, device=lse.device)
    # lse is -inf only where the sink is too: exp(-inf - 0) = 0 there, without NaN.
    p_sink = xp.exp(sink - xp.where(lse == -xp.inf, zero, lse))
    d = -(p_sink * D)
    d = xp.sum(d, axis=-1)
    return xp.sum(xp.reshape(d, (-1, sinks.shape[0])), axis=0) if d.ndim > 1 else d
