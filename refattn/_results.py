"""What attention returns: one result type for every path, one gradient type.

Every path (direct, blocked, compensated, the CUDA kernels) returns an
``AttentionResult`` and every backward an ``AttentionGrads``; the front door turns them
into the user's form (layout, rank, dtype) and returns the same types.
"""

from __future__ import annotations

from typing import NamedTuple

from ._types import Array

__all__ = ["AttentionGrads", "AttentionResult"]


class AttentionResult(NamedTuple):
    """What ``attention`` returns when a ``return_*`` flag is set.

    Fields that were not asked for are None.

    Attributes
    ----------
    out : array
        (..., H, L, Ev) output (in the input layout).
    lse : array or None
        (..., H, L) natural-log log-sum-exp of the final scores; -inf on fully masked rows.
    weights : array or None
        (..., H, L, S) softmax probabilities, before dropout.
    dropout_mask : array or None
        The boolean keep-mask that was applied (True = kept), as given or as drawn.
    """

    out: Array
    lse: Array | None = None
    weights: Array | None = None
    dropout_mask: Array | None = None


class AttentionGrads(NamedTuple):
    """What ``attention_backward`` returns: one gradient per differentiable input.

    Attributes
    ----------
    dq, dk, dv : array
        Gradients with the shapes, layout, dtype, namespace and device of q, k, v.
    dbias : array or None
        Gradient with the shape and dtype of ``bias`` (summed over the axes it was
        broadcast along); None when there was no bias.
    """

    dq: Array
    dk: Array
    dv: Array
    dbias: Array | None = None
