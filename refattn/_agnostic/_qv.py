"""The qv term as a longer head dim: ``q k^T + qv v^T = [q, qv] [k, v]^T``.

The blocked and compensated paths take ``qv`` through this identity: the problem with
queries ``[q, qv]`` and keys ``[k, v]`` (the feature axis concatenated, the scale kept)
has the same scores, so the paths' online softmax, block skipping, score bounds and
error-free products need nothing new; only the gradients are split back. The direct
path adds the second product itself (``_direct.raw_scores``), which keeps one
implementation that does not rest on the identity for the tests to compare against.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from .._arrays import sum_to_shape
from .._results import AttentionGrads
from ._backward import sum_groups
from ._direct import group_size, repeat_heads

if TYPE_CHECKING:
    from .._problem import AttentionProblem

__all__ = ["fold_qv", "unfold_qv_grads"]


def fold_qv(problem: AttentionProblem) -> AttentionProblem:
    """``problem`` with ``qv`` folded into q and k (``problem`` itself without qv).

    k and v join on the feature axis, so they need the same heads: with K != Kv both are
    repeated to the H query heads first (``unfold_qv_grads`` sums them back).
    """
    if problem.qv is None:
        return problem
    xp, q, k, v = problem.xp, problem.q, problem.k, problem.v
    if k.shape[-3] != v.shape[-3]:
        H = q.shape[-3]
        k = repeat_heads(k, group_size(H, k.shape[-3]), xp=xp)
        v = repeat_heads(v, group_size(H, v.shape[-3]), xp=xp)
    # Leading dims broadcast against each other; the concatenation needs them equal.
    lead = problem.shapes.batch
    k = xp.broadcast_to(k, (*lead, *k.shape[-3:])) if lead else k
    v = xp.broadcast_to(v, (*lead, *v.shape[-3:])) if lead else v
    shapes = dataclasses.replace(problem.shapes, E=problem.shapes.E + problem.shapes.Ev)
    return dataclasses.replace(
        problem, q=xp.concat([q, problem.qv], axis=-1), k=xp.concat([k, v], axis=-1),
        qv=None, shapes=shapes)


def unfold_qv_grads(problem: AttentionProblem, grads: AttentionGrads) -> AttentionGrads:
    """The gradients of ``fold_qv(problem)`` as ``problem``'s: d[q, qv] split into dq
    and dqv, d[k, v] into dk and a second term of dv."""
    if problem.qv is None:
        return grads
    xp, q, k, v = problem.xp, problem.q, problem.k, problem.v
    E = q.shape[-1]
    dk, dv_extra = grads.dk[..., :E], grads.dk[..., E:]
    dk = sum_to_shape(sum_groups(dk, k.shape[-3], xp=xp), k.shape, xp=xp)
    dv_extra = sum_to_shape(sum_groups(dv_extra, v.shape[-3], xp=xp), v.shape, xp=xp)
    return AttentionGrads(
        dq=grads.dq[..., :E], dk=dk, dv=grads.dv + dv_extra, dbias=grads.dbias,
        dsinks=grads.dsinks, dqv=grads.dq[..., E:])
