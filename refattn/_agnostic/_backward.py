"""The analytic backward pass: dQ, dK, dV and d bias, with no autograd.

With S the final scores (scaled, biased, masked), P = softmax(S) per row, P_drop the
weights after dropout (kept entries scaled by 1/(1-p)) and O = P_drop V:

    dV = P_drop^T dO
    dP = (dO V^T) * keep / (1-p)            gradient with respect to P (before dropout)
    D  = rowsum(dO * O)                     = rowsum(P * dP), since O = P_drop V
    dS = P * (dP - D)                       softmax backward
    dQ = scale dS K,  dK = scale dS^T Q,  d bias = dS

Grouped-query heads and broadcast leading dims are summed back to each input's own shape,
which is what the chain rule gives for a repeated or broadcast input. P is recomputed from
the LSE when one is given, ``P = exp(S - lse)``, as fused backward kernels do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._arrays import all_finite, records_autograd, sum_to_shape
from .._results import AttentionGrads
from .._types import Array, Namespace
from ._direct import apply_dropout, group_size, raw_scores, repeat_heads
from ._scores import constant, final_scores, score_slopes
from ._softmax import masked_softmax, sinks_grad

if TYPE_CHECKING:
    from .._problem import AttentionProblem

__all__ = ["direct_backward", "sum_groups", "weights_from_lse"]


def sum_groups(x: Array, heads: int, *, xp: Namespace) -> Array:
    """(..., H, S, D) -> (..., heads, S, D), summing each group of H // heads heads.

    The adjoint of ``repeat_heads``: key head k served query heads k*G .. k*G+G-1.
    """
    groups = group_size(x.shape[-3], heads)
    if groups == 1:
        return x
    *lead, _, s, d = x.shape
    return xp.sum(xp.reshape(x, (*lead, heads, groups, s, d)), axis=-3)


def _apply_row_policy(weights: Array, row_masked: Array, masked_rows: str, *,
                      xp: Namespace) -> Array:
    # The same conventions as masked_softmax, for weights rebuilt from a given LSE.
    if masked_rows == "nan":
        return xp.where(row_masked, constant(xp.nan, weights, xp=xp), weights)
    if masked_rows == "uniform":
        return xp.where(row_masked, constant(1.0 / weights.shape[-1], weights, xp=xp),
                        weights)
    return weights


def weights_from_lse(scores: Array, lse: Array, *, masked_rows: str, xp: Namespace,
                     owned: bool = False) -> Array:
    """Softmax weights ``exp(scores - lse)``; fully masked rows (lse = -inf) by policy.

    Parameters
    ----------
    scores
        (..., L, S) final scores; -inf marks a masked score.
    lse
        (..., L) log-sum-exp per row, broadcastable against ``scores[..., 0]``.
    masked_rows
        "zero", "nan" or "uniform" (see ``masked_softmax``).
    owned
        The caller gives ``scores`` up: the LSE is subtracted in place (the same
        differences, one score-sized allocation fewer).
    """
    if scores.shape[-1] == 0:
        return scores
    row_masked = (lse == -xp.inf)[..., None]
    # exp(-inf - -inf) would be NaN; shifting masked rows by 0 gives exp(-inf) = 0 instead.
    shift = xp.where(row_masked, constant(0.0, scores, xp=xp), lse[..., None])
    if owned:
        scores -= shift
        weights = xp.exp(scores)
    else:
        weights = xp.exp(scores - shift)
    return _apply_row_policy(weights, row_masked, masked_rows, xp=xp)


def direct_backward(problem: AttentionProblem, grad_out: Array, *, out: Array | None,
                    lse: Array | None) -> AttentionGrads:
    """Gradients of ``direct_attention`` with respect to q, k, v and bias.

    Parameters
    ----------
    problem
        The forward's problem (see ``direct_attention``).
    grad_out
        (..., H, L, Ev) gradient of the output, in the compute dtype.
    out
        None, or the forward output (..., H, L, Ev) to use in D = rowsum(dO * O)
        instead of recomputing it.
    lse
        None, or the forward LSE (..., H, L) to rebuild the weights from instead of
        recomputing the softmax.

    Returns
    -------
    AttentionGrads
        dq, dk, dv with the shapes of q, k, v; dbias with the shape of the bias with
        ALiBi folded in (None without a bias). softcap and score_mod enter through the
        chain rule: dS is multiplied by their slopes (d bias takes the score_mod's, dQ
        and dK both).

    The score-sized arrays made here (the scores, dP) are written in place where the
    formula allows, the same arithmetic without an allocation per step; the masked-row
    policy's pass runs only when a row is fully masked, the dO non-finite pass only when
    dO holds a NaN or an infinity.
    """
    q, k, v, xp = problem.q, problem.k, problem.v, problem.xp
    scale, bias, mods = problem.scale, problem.bias_with_alibi, problem.mods
    keep, dropout_p, masked_rows = problem.keep, problem.dropout_p, problem.masked_rows
    H = q.shape[-3]
    kr = repeat_heads(k, group_size(H, k.shape[-3]), xp=xp)
    vr = repeat_heads(v, group_size(H, v.shape[-3]), xp=xp)
    # The forward's scores (``raw_scores``: scale q k^T, plus scale qv v^T with qv), and
    # q scaled once for dK as (dS^T) (scale Q), so that dK overflows no earlier than the
    # scores do.
    scaled = raw_scores(problem, kr, vr)
    q_scaled = q * scale
    # Without softcap or score_mod the scaled scores are not read again (score_slopes
    # needs them otherwise), so the score pipeline may write into them.
    # Nor when torch's autograd records this backward (a double backward): it may have
    # saved them.
    in_place = not records_autograd(q, k, v, grad_out, bias, problem.qv, problem.sinks)
    plain = not mods.active and in_place
    # Built exactly as the forward builds them, so the weights recomputed here are the
    # forward's weights, NaN propagation included.
    scores = final_scores(scaled, bias=bias, allowed=problem.visible, mods=mods, xp=xp,
                          owned=plain)
    if lse is None:
        weights, lse = masked_softmax(scores, masked_rows=masked_rows, xp=xp,
                                      sinks=problem.sinks, owned=plain)
    else:
        weights = weights_from_lse(scores, lse, masked_rows=masked_rows, xp=xp, owned=plain)
    row_masked = (lse == -xp.inf)[..., None]

    all_dropped = keep is not None and dropout_p >= 1.0
    dropped = apply_dropout(weights, keep, dropout_p, xp=xp)
    if out is None:
        out = dropped @ vr

    dv = xp.matrix_transpose(dropped) @ grad_out
    # dP is made here (a product, or apply_dropout's new array): this call's own.
    d_weights = apply_dropout(grad_out @ xp.matrix_transpose(vr), keep, dropout_p, xp=xp)
    # rowsum(P * dP) = sum_j P_j keep_j/(1-p) (dO . v_j) = dO . O: dropout needs no
    # separate term, and a fused kernel needs only its saved output.
    D = xp.sum(grad_out * out, axis=-1, keepdims=True)
    if not all_finite(xp, grad_out):
        # torch's softmax backward sums P * dP over every key, masked ones included:
        # on a row where dO holds a NaN or an infinity, 0 * inf makes that sum NaN where
        # dO . O need not be (docs/semantics.rst, "Non-finite values"). Only then is the
        # (..., L, S) product formed; the rows with a finite dO keep dO . O.
        torch_d = xp.sum(weights * d_weights, axis=-1, keepdims=True)
        D = xp.where(xp.all(xp.isfinite(grad_out), axis=-1, keepdims=True), D, torch_d)
    # dS = P * (dP - D), formed in dP's array (the same two roundings per entry).
    if in_place:
        d_weights -= D
        d_weights *= weights
        d_scores = d_weights
    else:
        d_scores = (d_weights - D) * weights
    if all_dropped:
        # dropout_p = 1 makes the output identically zero, whatever the inputs (even
        # NaN rows under the "nan" policy), so nothing flows back.
        d_scores = xp.zeros_like(d_scores)
    elif masked_rows != "nan" and bool(xp.any(row_masked)):
        # "zero" and "uniform" rows are constants of q, k and bias; "nan" rows keep the
        # plain softmax's NaN gradient.
        d_scores = xp.where(row_masked, constant(0.0, d_scores, xp=xp), d_scores)

    d_biased = d_raw = d_scores
    if mods is not None and mods.active:
        mod_slope, cap_slope = score_slopes(scaled, bias=bias, mods=mods, xp=xp)
        # Masked entries have d_scores = 0 exactly; a slope that is not finite there (a
        # mod undefined off the mask) must not turn that 0 into NaN.
        d_biased = xp.where(d_scores == 0, constant(0.0, d_scores, xp=xp),
                            d_scores * mod_slope)
        d_raw = d_biased * cap_slope
    dsinks = None
    if problem.sinks is not None:
        # D as dS used it; all dropped: the output ignores the sinks as well.
        D_rows = xp.zeros_like(D) if all_dropped else D
        dsinks = sinks_grad(problem.sinks, lse, D_rows[..., 0], xp=xp)
    dq = d_raw @ kr
    if in_place:
        dq *= scale  # (dS K) scale: the product is this call's own
    else:
        dq = dq * scale
    dk = sum_groups(xp.matrix_transpose(d_raw) @ q_scaled, k.shape[-3], xp=xp)
    dqv = None
    if problem.qv is not None:
        # scale qv v^T is one more product of the scores: dqv = scale dS V, and V
        # gains scale dS^T qv (ordered as dK's).
        dqv = (d_raw @ vr) * scale
        dv = dv + xp.matrix_transpose(d_raw) @ (problem.qv * scale)
    dv = sum_groups(dv, v.shape[-3], xp=xp)
    return AttentionGrads(
        dq=sum_to_shape(dq, q.shape, xp=xp),
        dk=sum_to_shape(dk, k.shape, xp=xp),
        dv=sum_to_shape(dv, v.shape, xp=xp),
        dbias=None if bias is None else sum_to_shape(d_biased, bias.shape, xp=xp),
        dsinks=dsinks,
        dqv=None if problem.qv is None else sum_to_shape(dqv, problem.qv.shape, xp=xp),
    )
