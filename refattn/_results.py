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


class _GradTuple(NamedTuple):
    dq: Array
    dk: Array
    dv: Array
    dbias: Array | None = None


class AttentionGrads(_GradTuple):
    """What ``attention_backward`` returns: one gradient per differentiable input.

    A 4-tuple ``(dq, dk, dv, dbias)``: ``dq, dk, dv, dbias = grads`` unpacks it as it
    always has. The gradients of the optional inputs ``sinks`` and ``qv`` are attributes
    outside the tuple (None when the input was not given), so that adding them did not
    change the tuple's length, and with it every caller that unpacks it.

    Attributes
    ----------
    dq, dk, dv : array
        Gradients with the shapes, layout, dtype, namespace and device of q, k, v.
    dbias : array or None
        Gradient with the shape and dtype of ``bias`` (summed over the axes it was
        broadcast along); None when there was no bias.
    dsinks : array or None
        (H,) gradient of ``sinks``; None without sinks.
    dqv : array or None
        Gradient of ``qv``, with its shape and layout; None without ``qv``.

    Examples
    --------
    >>> g = AttentionGrads(1, 2, 3, dsinks=4)
    >>> dq, dk, dv, dbias = g
    >>> (dq, dbias, g.dsinks, g.dqv, len(g))
    (1, None, 4, None, 4)
    """

    # Class-level defaults: NamedTuple's _make builds instances without __new__.
    dsinks: Array | None = None
    dqv: Array | None = None

    def __new__(cls, dq: Array, dk: Array, dv: Array, dbias: Array | None = None, *,
                dsinks: Array | None = None, dqv: Array | None = None) -> AttentionGrads:
        self = super().__new__(cls, dq, dk, dv, dbias)
        if dsinks is not None:
            self.dsinks = dsinks
        if dqv is not None:
            self.dqv = dqv
        return self

    def _replace(self, **changes: Array | None) -> AttentionGrads:
        fields = {"dq": self.dq, "dk": self.dk, "dv": self.dv, "dbias": self.dbias,
                  "dsinks": self.dsinks, "dqv": self.dqv}
        unknown = set(changes) - set(fields)
        if unknown:
            raise ValueError(f"Got unexpected field names: {sorted(unknown)!r}")
        fields.update(changes)
        return AttentionGrads(**fields)

    def __repr__(self) -> str:
        extra = "".join(f", {name}={getattr(self, name)!r}" for name in ("dsinks", "dqv")
                        if getattr(self, name) is not None)
        return super().__repr__()[:-1] + extra + ")"
