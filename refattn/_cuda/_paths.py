"""The kernels as a path of the front door: an ``AttentionProblem`` in, results out.

The front door hands the problem as it is; this module picks what the kernels read from
it (the mask with mask_mod folded in, the bias with ALiBi folded in, the window apart so
that it skips tiles) and sums the per-batch-entry gradients back to the inputs' shapes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._arrays import all_finite, sum_to_shape
from .._results import AttentionGrads, AttentionResult
from .._types import Array
from ._backward import flash_attention_backward
from ._forward import flash_attention
from ._launch import UnsupportedLaunch
from ._support import NON_FINITE

if TYPE_CHECKING:
    from .._problem import AttentionProblem

__all__ = ["backward", "forward"]


def _score_options(problem: AttentionProblem) -> dict[str, Any]:
    # The kernels' one list of score options (_operands.kernel_options), from the problem.
    return {
        "scale": problem.scale, "window": problem.window, "alignment": problem.alignment,
        "mask": problem.combined_mask, "bias": problem.bias_with_alibi,
        "dropout_mask": problem.keep, "dropout_p": problem.dropout_p,
        "masked_rows": problem.masked_rows, "softcap": problem.mods.softcap,
    }


def forward(problem: AttentionProblem, *, need_lse: bool) -> AttentionResult:
    """The fused forward on the problem: ``out`` and ``lse`` (None unless asked)."""
    out, lse = flash_attention(problem.q, problem.k, problem.v,
                               batch_shape=problem.shapes.batch,
                               compute_dtype=problem.compute_dtype, need_lse=need_lse,
                               xp=problem.xp, **_score_options(problem))
    return AttentionResult(out=out, lse=lse)


def backward(problem: AttentionProblem, grad_out: Array, *, out: Array | None,
             lse: Array | None) -> AttentionGrads:
    """The fused backward, from the saved output and LSE when given (else the fused
    forward's); d bias at the full score shape (the caller reduces it to the bias's)."""
    p, xp = problem, problem.xp
    # A NaN or infinity in dO (or a given output, or a NaN LSE) reaches dQ, dK and dV
    # through the masked pairs too (0 * NaN): the array-API paths follow that rule, the
    # kernels skip the hidden blocks (``_support.finite_inputs``; q, k, v and the bias
    # were checked by ``unsupported`` already). An LSE of -inf marks a masked row.
    nan_lse = lse is not None and bool(xp.any(xp.isnan(lse)))
    if nan_lse or not all_finite(xp, grad_out, out):
        raise UnsupportedLaunch(NON_FINITE)
    if out is None or lse is None:
        fwd = forward(p, need_lse=True)
        out = fwd.out if out is None else out
        lse = fwd.lse if lse is None else lse
    options = _score_options(p)
    dq, dk, dv, dbias = flash_attention_backward(
        grad_out, p.q, p.k, p.v, out, lse, batch_shape=p.shapes.batch,
        compute_dtype=p.compute_dtype, need_dbias=options["bias"] is not None, xp=xp,
        **options,
    )
    # Per batch entry from the kernels: sum over the batch dims an input was broadcast on.
    return AttentionGrads(dq=sum_to_shape(dq, p.q.shape, xp=xp),
                          dk=sum_to_shape(dk, p.k.shape, xp=xp),
                          dv=sum_to_shape(dv, p.v.shape, xp=xp), dbias=dbias)
