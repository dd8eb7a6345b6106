"""The backward entry point: ``blocked_attention_backward`` (FlashAttention-2's
recomputation).

Each work item takes one run of heads and one chunk of keys (``_recompute``): dK and dV
of its keys are complete at the end, its dQ (and d bias where the bias is shared along
keys) is one part of a sum over chunks, added in chunk order.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ..._results import AttentionGrads
from ..._types import Array, Namespace
from .._qv import fold_qv, unfold_qv_grads
from .._softmax import sinks_grad
from ._forward import blocked_attention
from ._inputs import _Inputs, _prepare_inputs
from ._items import _batch_index, _hashable, _OrderedSum, _pad_rank, _run_items, _unit_region
from ._nonfinite import backward_screen
from ._plan import _batch_indices, _make_plan, _Plan
from ._recompute import _backward_item, _Saved

if TYPE_CHECKING:
    from ..._problem import AttentionProblem

__all__ = ["blocked_attention_backward"]

# The backward splits the keys into chunks only when there are fewer (batch, head unit)
# pairs than this: enough work items to keep a few threads busy. A constant, so that
# the split, and with it every bit of the result, does not depend on the thread count.
_MIN_ITEMS = 8


def blocked_attention_backward(
    problem: AttentionProblem, grad_out: Array, *, out: Array | None, lse: Array | None,
    block_l: int | None = None, block_s: int | None = None, num_threads: int = 1,
) -> AttentionGrads:
    """Gradients of ``blocked_attention``, recomputing the weights block by block.

    The contract of ``direct_backward`` (no gradient flows to the ALiBi slopes; the
    chain rule through the mods is the direct backward's, ``score_slopes``).

    Parameters
    ----------
    problem
        The forward's problem.
    grad_out
        (..., H, L, Ev) gradient of the output, in the compute dtype.
    out, lse
        The forward output (..., H, L, Ev) and LSE (..., H, L; leading dims may be 1 or
        absent), or None to compute them with ``blocked_attention`` first.
    block_l, block_s, num_threads
        As for ``blocked_attention``; the result does not depend on ``num_threads``.

    Returns
    -------
    AttentionGrads
        dq, dk, dv with the shapes of q, k, v; dbias with the shape of the bias (None
        without one).
    """
    if problem.qv is not None:
        return unfold_qv_grads(problem, blocked_attention_backward(
            fold_qv(problem), grad_out, out=out, lse=lse, block_l=block_l, block_s=block_s,
            num_threads=num_threads))
    q, k, v, xp = problem.q, problem.k, problem.v, problem.xp
    bias, keep, dropout_p = problem.bias, problem.keep, problem.dropout_p
    plan = _make_plan(problem, block_l=block_l, block_s=block_s, backward=True)
    # Every entry of the gradients is assigned by some work item (each covers its keys
    # and its heads' queries whole), so they start empty, except when nothing runs.
    nothing = plan.empty or (keep is not None and dropout_p >= 1.0)
    grads = _new_grads(q, k, v, bias, plan, zeros=nothing, xp=xp)
    if nothing:
        # Nothing to differentiate, or dropout_p = 1: the output is identically zero.
        result = grads.result(xp)
        if problem.sinks is not None:
            result = result._replace(dsinks=xp.zeros_like(problem.sinks))
        return result
    if out is None or lse is None:
        fwd = blocked_attention(problem, block_l=block_l, block_s=block_s,
                                num_threads=num_threads)
        out = fwd.out if out is None else out
        lse = fwd.lse if lse is None else lse
    inp = _prepare_inputs(problem, plan)
    if problem.masked_rows != "zero" and bool(xp.any(lse == -xp.inf)):
        # A fully masked row weighs every key under "nan" and "uniform", also the keys
        # the causal mask hides: then every block is visited.
        plan = replace(plan, skip=False)
    saved = _saved(grad_out, out, lse, plan, xp)
    if backward_screen(inp, plan, grad_out, out, lse):
        # NaN or infinity somewhere (_nonfinite.backward_screen): the direct backward
        # multiplies it by the zero weights of the masked pairs too, so every block is
        # visited, the rows whose weights are NaN (LSE NaN) are NaN at their masked keys
        # as well (_recompute._block_weights), and rows with a non-finite dO take
        # torch's rowsum(P * dP) (_recompute._torch_rowsums).
        plan = replace(plan, skip=False)
        saved = replace(saved, nonfinite=True)
    unit, chunk, items = _work_items(plan)
    sums = _ordered_sums(inp, plan, grads, items, unit, chunk)
    scale = problem.scale
    _run_items(
        items, lambda i, item: _backward_item(inp, plan, saved, scale, unit, chunk, sums, i, item),
        num_threads, list(sums.values()),
    )
    result = grads.result(xp)
    if problem.sinks is not None:
        # The blocks' dS = P (dP - D) holds with the sinks' LSE and output as they are;
        # the sinks' own gradient needs the rows only.
        D = xp.sum(grad_out * out, axis=-1)
        result = result._replace(dsinks=sinks_grad(problem.sinks, lse, D, xp=xp))
    return result


@dataclass(frozen=True)
class _Grads:
    """The gradients being filled in, rank-padded to (..., H, L, E) and the like, and
    the shapes they are returned in: those of q, k, v (and bias)."""

    dq: Array
    dk: Array
    dv: Array
    dbias: Array | None
    shapes: tuple[tuple[int, ...], ...]

    def result(self, xp: Namespace) -> AttentionGrads:
        dq, dk, dv = (xp.reshape(g, shape) for g, shape in zip(
            (self.dq, self.dk, self.dv), self.shapes[:3], strict=True))
        db = None if self.dbias is None else xp.reshape(self.dbias, self.shapes[3])
        return AttentionGrads(dq=dq, dk=dk, dv=dv, dbias=db)


def _new_grads(q: Array, k: Array, v: Array, bias: Array | None, plan: _Plan, *,
               zeros: bool, xp: Namespace) -> _Grads:
    new = xp.zeros if zeros else xp.empty

    def padded(x: Array) -> Array:
        return new((1,) * (plan.ndim - x.ndim) + tuple(x.shape), dtype=q.dtype,
                   device=q.device)

    inputs = (q, k, v) if bias is None else (q, k, v, bias)
    return _Grads(dq=padded(q), dk=padded(k), dv=padded(v),
                  dbias=None if bias is None else padded(bias),
                  shapes=tuple(tuple(x.shape) for x in inputs))


def _saved(grad_out: Array, out: Array, lse: Array, plan: _Plan, xp: Namespace) -> _Saved:
    n = plan.ndim
    rows_shape = (*plan.batch, plan.H, plan.L)
    lse_rows = xp.broadcast_to(_pad_rank(lse, n - 1, xp), rows_shape)
    return _Saved(
        grad_out=xp.broadcast_to(_pad_rank(grad_out, n, xp), (*rows_shape, plan.Ev)),
        out=xp.broadcast_to(_pad_rank(out, n, xp), (*rows_shape, plan.Ev)),
        lse=lse_rows, any_masked=bool(xp.any(lse_rows == -xp.inf)), nonfinite=False,
    )


def _work_items(plan: _Plan) -> tuple[int, int, list[tuple[tuple[int, ...], int, int]]]:
    """``(unit, chunk, items)``: one item per (batch index, head unit, key chunk).

    A unit is the smallest run of query heads holding whole key-head and value-head
    groups. The keys are cut into chunks (on the key-block grid) only when there are
    fewer than _MIN_ITEMS units: chunks share dQ, summed in chunk order. The cut
    depends on the shapes alone.
    """
    batches = _batch_indices(plan)
    unit = math.lcm(plan.heads_per_k, plan.heads_per_v)
    key_blocks = -(-plan.S // plan.block_s)
    units = len(batches) * (plan.H // unit)
    chunks = min(key_blocks, max(1, -(-_MIN_ITEMS // units)))
    chunk = -(-key_blocks // chunks) * plan.block_s
    items = list(itertools.product(batches, range(plan.H // unit), range(0, plan.S, chunk)))
    return unit, chunk, items


def _ordered_sums(
    inp: _Inputs, plan: _Plan, grads: _Grads, items: list[tuple[tuple[int, ...], int, int]],
    unit: int, chunk: int,
) -> dict[str, _OrderedSum]:
    """The sums the items add their gradients to: items that share a region of a
    gradient (dQ across key chunks, inputs broadcast over batch dims, d bias broadcast
    over heads, rows or keys) add in item order."""
    sums = {
        "dq": _OrderedSum(grads.dq, [(_batch_index(inp.q, b), u) for b, u, _ in items]),
        "dk": _OrderedSum(grads.dk, [(_batch_index(inp.k, b), u, c) for b, u, c in items]),
        "dv": _OrderedSum(grads.dv, [(_batch_index(inp.v, b), u, c) for b, u, c in items]),
    }
    if grads.dbias is not None:
        dbias = grads.dbias
        sums["dbias"] = _OrderedSum(dbias, [
            _hashable(_unit_region(dbias, b, plan, slice(u * unit, (u + 1) * unit), c,
                                   min(c + chunk, plan.S)))
            for b, u, c in items
        ])
    return sums
