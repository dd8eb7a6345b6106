"""The inputs as the workers read them, and the rows of one work item.

The user's mask, bias and dropout keep-mask arrive broadcastable to (..., H, L, S) and
are sliced per block without materialising the broadcast. Grouped-query heads are not
repeated: the query heads that share one key head and one value head are stacked into
one block of rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..._types import Array, Device, Namespace
from .._masks import evaluate_mask_mod, index_grids
from .._scores import ScoreMods
from ._items import _axis_slice, _batch_index, _pad_rank, _rows_of, squared_row_norms
from ._plan import _Plan

if TYPE_CHECKING:
    from ..._problem import AttentionProblem


@dataclass(frozen=True)
class _Inputs:
    """Rank-padded arrays read by the workers.

    In the forward ``k`` and ``v`` may have a column of ones appended (where it pays,
    see blocked_attention); the backward appends them per work item. ``k_norm``,
    ``bias_max`` and ``bias_min`` bound the scores.
    """

    q: Array
    scale: float
    k: Array  # (..., K, S, E + 1), or (..., K, S, E) without the column of ones
    v: Array  # (..., Kv, S, Ev + 1), or (..., Kv, S, Ev) without the column of ones
    bias: Array | None
    alibi: Array | None  # (..., H) ALiBi slopes (rank-padded)
    allowed: Array | None
    keep: Array | None
    k_norm: Array  # (..., K): max_j ||k_j||
    bias_max: float | None  # the largest bias entry; None when it is NaN or +inf
    bias_min: float  # the smallest bias entry (ALiBi included), -inf when unbounded
    triangles: _CausalMasks | None  # when causal without a window's lower edge
    dropout_p: float
    masked_rows: str
    Ev: int
    mods: ScoreMods | None  # softcap and score_mod, applied per block (None: neither)
    mask_mod: Callable[..., Any] | None  # evaluated per block, ANDed with ``allowed``
    zero_shift: bool  # every row's scores are known small enough to need no shift
    xp: Namespace


def _ones_appended(x: Array, xp: Namespace) -> Array:
    """A new row-major array: ``x`` with a column of ones appended."""
    out = xp.empty((*x.shape[:-1], x.shape[-1] + 1), dtype=x.dtype, device=x.device)
    out[..., :-1] = x
    out[..., -1] = 1.0
    return out


def _prepare_inputs(problem: AttentionProblem, plan: _Plan) -> _Inputs:
    """The inputs rank-padded, with the bounds of the scores; then the mods are probed
    (``_probe_mods``)."""
    q, k, v, xp = problem.q, problem.k, problem.v, problem.xp
    scale, bias, allowed, keep = problem.scale, problem.bias, problem.mask, problem.keep
    alibi_slopes, mask_mod, mods = problem.alibi_slopes, problem.mask_mod, problem.mods
    dropout_p, masked_rows = problem.dropout_p, problem.masked_rows
    n = plan.ndim
    kp, vp = _pad_rank(k, n, xp), _pad_rank(v, n, xp)
    # K with a column of ones: a query row [q, -c] times its transpose gives q.k - c,
    # so the shift of the online softmax comes out of the product instead of a pass
    # over the scores. V with a column of ones gives the row sums of the weights out of
    # the P @ V product (without dropout, where the sum runs over the same weights), and
    # [dO, -D] times its transpose gives dP - D in the backward. The copies are not
    # made here: the forward makes them where they pay (blocked_attention), the backward
    # per work item, in parallel (``_augmented_keys``).
    bias_max, bias_min = _bias_range(bias, alibi_slopes, plan, xp)
    inputs = _Inputs(
        q=_pad_rank(q, n, xp), scale=scale, k=kp, v=vp, bias=_pad_rank(bias, n, xp),
        alibi=None if alibi_slopes is None else _pad_rank(alibi_slopes, n - 2, xp),
        allowed=_pad_rank(allowed, n, xp),
        keep=_pad_rank(keep, n, xp), k_norm=xp.sqrt(xp.max(squared_row_norms(kp, xp), axis=-1)),
        bias_max=bias_max, bias_min=bias_min if bias_min == bias_min else -math.inf,
        # The cached triangles cover the causal diagonal alone, not a window's lower edge.
        # Nor the chunks, which _raw_scores applies with the masks.
        triangles=_CausalMasks(plan, xp, q.dtype, q.device)
        if plan.causal and plan.low is None and plan.chunk is None else None,
        dropout_p=dropout_p, masked_rows=masked_rows, Ev=plan.Ev,
        mods=mods if mods is not None and mods.active else None, mask_mod=mask_mod,
        zero_shift=False, xp=xp,
    )
    _probe_mods(mods, mask_mod, plan, q, xp)
    return inputs


def _bias_range(bias: Array | None, alibi_slopes: Array | None, plan: _Plan,
                xp: Namespace) -> tuple[float | None, float]:
    """``(bias_max, bias_min)``: the largest and smallest additive term of a score, the
    bias and ALiBi together; bias_max None when a NaN or +inf leaves no bound."""
    bias_max: float | None = 0.0
    bias_min = 0.0
    if bias is not None:
        bias_max = float(xp.max(bias)) if math.prod(bias.shape) else 0.0
        bias_min = float(xp.min(bias)) if math.prod(bias.shape) else 0.0
        if not bias_max < math.inf:  # NaN or +inf: no bound on the scores
            bias_max = None
    if alibi_slopes is not None:
        # -slope * distance is <= 0 for slopes >= 0; a negative slope makes it positive,
        # up to |slope| (L + S).
        sized = math.prod(alibi_slopes.shape) > 0
        rise = max(0.0, -float(xp.min(alibi_slopes))) * (plan.L + plan.S) if sized else 0.0
        fall = max(0.0, float(xp.max(alibi_slopes))) * (plan.L + plan.S) if sized else 0.0
        if bias_max is not None:
            bias_max = bias_max + rise if rise < math.inf else None
        bias_min = bias_min - fall if fall < math.inf else -math.inf
    return bias_max, bias_min


def _probe_mods(mods: ScoreMods | None, mask_mod: Callable[..., Any] | None,
                plan: _Plan, q: Array, xp: Namespace) -> None:
    """Call the score_mod and the mask_mod once on every batch entry and head at one
    (query, key) pair.

    Each block's grids hold one batch index; a mod that checks a table against the
    whole batch (those of ``refattn.mods`` do) can only do that on a grid that spans it,
    as the direct path's does. This call, of (..., H, 1, 1) scores, gives it one.
    """
    if plan.L == 0 or plan.S == 0:
        return
    grids = index_grids(plan.batch, plan.H, 1, 1, xp=xp, device=q.device)
    if mods is not None and mods.score_mod is not None:
        mods.score_mod(xp.zeros((*plan.batch, plan.H, 1, 1), dtype=q.dtype, device=q.device),
                       *grids)
    if mask_mod is not None:
        evaluate_mask_mod(mask_mod, grids, xp=xp)


@dataclass
class _Rows:
    """One (batch index, head group, query block): its rows and the slices it reads."""

    b: tuple[int, ...]
    h0: int
    l0: int
    l1: int
    g: int
    q: Array  # (R, E) scaled queries, R = g * (l1 - l0)
    bias: Array | None
    allowed: Array | None
    keep: Array | None
    positions: Array | None  # (bl, 1) query index + shift, for the causal mask
    lows: Array | None  # (bl, 1) query index + low, for the window's lower edge
    alibi: tuple[Array, Array] | None  # (g, 1, 1) -ALiBi slopes, (bl, 1) query positions
    chunks: Array | None = None  # (bl, 1) chunk index of each row's key position

    @property
    def bl(self) -> int:
        return self.l1 - self.l0

    @property
    def R(self) -> int:
        return self.g * self.bl


def _rows(inp: _Inputs, plan: _Plan, b: tuple[int, ...], h0: int, l0: int, l1: int) -> _Rows:
    xp = inp.xp
    g = plan.group
    q = inp.q[(*_batch_index(inp.q, b), slice(h0, h0 + g), slice(l0, l1), slice(None))]
    # Scaling the (R x E) queries instead of every block of scores (R x S) saves a pass
    # over the scores; it rounds each q entry once more (relative u), which the dot
    # product's own bound already covers.
    q = q * inp.scale
    positions = lows = alibi = None
    if plan.causal or plan.low is not None or inp.alibi is not None:
        index = xp.reshape(xp.arange(l0, l1, device=q.device), (l1 - l0, 1))
        if plan.causal:
            positions = index + plan.shift
        if plan.low is not None:
            lows = index + plan.low
        if inp.alibi is not None:
            slopes = inp.alibi[(*_batch_index(inp.alibi, b),
                                _axis_slice(inp.alibi.shape[-1], plan.H, h0, h0 + g))]
            alibi = (xp.reshape(-slopes, (slopes.shape[-1], 1, 1)),
                     xp.astype(index + plan.position_shift, q.dtype))
    chunks = None
    if plan.chunk is not None:
        index = xp.reshape(xp.arange(l0, l1, device=q.device), (l1 - l0, 1))
        chunks = (index + plan.position_shift) // plan.chunk
    return _Rows(
        b=b, h0=h0, l0=l0, l1=l1, g=g, chunks=chunks, q=xp.reshape(q, (g * (l1 - l0), plan.E)),
        bias=_rows_of(inp.bias, b, plan, h0, l0, l1),
        allowed=_rows_of(inp.allowed, b, plan, h0, l0, l1),
        keep=_rows_of(inp.keep, b, plan, h0, l0, l1), positions=positions, lows=lows,
        alibi=alibi,
    )


def _with_shift(inp: _Inputs, rows: _Rows, shift: Array) -> Array:
    """The (R, E + 1) rows [q, -shift]: times [K, 1]^T they give q.k - shift."""
    xp = inp.xp
    return xp.concat([rows.q, -xp.reshape(shift, (rows.R, 1))], axis=1)


class _CausalMasks:
    """0/1 float masks of the causal triangle, (R, n) per block shape, shared by items.

    Which keys of a block the rows see depends only on the offset l0 + shift - s0 and
    the block's shape, which repeat across heads, batch entries and query blocks.
    """

    def __init__(self, plan: _Plan, xp: Namespace, dtype: Any, device: Device) -> None:
        self._plan, self._xp, self._dtype, self._device = plan, xp, dtype, device
        self._cache: dict[tuple[int, int, int, int], Array] = {}

    def get(self, rows: _Rows, s0: int, s1: int) -> Array:
        xp, n = self._xp, s1 - s0
        key = (rows.l0 + self._plan.shift - s0, rows.g, rows.bl, n)
        mask = self._cache.get(key)
        if mask is None:
            # Row i sees key j when j <= i + shift, i.e. (j - s0) <= (i - l0) + offset.
            cols = xp.reshape(xp.arange(n, device=self._device), (1, n))
            first = xp.reshape(xp.arange(rows.bl, device=self._device), (rows.bl, 1)) + key[0]
            tri = xp.astype(cols <= first, self._dtype)
            mask = xp.reshape(xp.broadcast_to(tri, (rows.g, rows.bl, n)), (rows.R, n))
            self._cache[key] = mask  # a race only computes the same mask twice
        return mask

