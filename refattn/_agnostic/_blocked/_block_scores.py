"""Per-block scores: the scaled product, bias and ALiBi, softcap and score_mod, the masks,
exp and dropout, for one block of rows (a ``_Rows``) and one span of keys.

The causal structure arrives as ``(causal, alignment)``, not as an (L, S) mask, so that
blocks entirely on the visible side of the diagonal need no mask; the mask_mod and the
score_mod are evaluated per block, on the block's index grids.
"""

from __future__ import annotations

import math
from dataclasses import replace

from ..._types import Array, Namespace
from .._masks import evaluate_mask_mod
from .._scores import ScoreMods, pre_mask_scores
from ._inputs import _Inputs, _Rows
from ._items import _keys_of
from ._plan import _Plan


def _raw_scores(
    inp: _Inputs, plan: _Plan, rows: _Rows, q_shift: Array, k: Array, s0: int, s1: int,
    masked: bool,
) -> tuple[Array, Array | None]:
    """One block's scores minus the rows' shifts, scaled and biased, and which of them
    are visible: ``(scores (R, n), visible)``, ``visible`` a boolean array that
    broadcasts against ``(g, bl, n)``, or None when the mask hides nothing here.
    ``q_shift`` comes from ``_with_shift`` (or is the plain (R, E) rows: no shift)."""
    xp = inp.xp
    if inp.mods is not None:
        scores = _modded_scores(inp, plan, rows, q_shift, k, s0, s1)
    else:
        scores = q_shift @ k[s0:s1, :q_shift.shape[1]].mT
    if (rows.bias is None and rows.alibi is None and rows.allowed is None and not masked
            and inp.mask_mod is None and rows.chunks is None):
        return scores, None
    n = s1 - s0
    if inp.mods is None:
        additive = _block_bias(inp, plan, rows, s0, s1)
        if additive is not None:
            scores = xp.reshape(xp.reshape(scores, (rows.g, rows.bl, n)) + additive,
                                (rows.R, n))
    visible = _keys_of(rows.allowed, s0, s1, plan.S)
    if inp.mask_mod is not None:
        modded = _block_mask(inp, plan, rows, s0, s1)
        visible = modded if visible is None else xp.logical_and(visible, modded)
    if masked:
        cols = xp.reshape(xp.arange(s0, s1, device=scores.device), (1, n))
        for edge in (None if rows.positions is None else cols <= rows.positions,
                     None if rows.lows is None else cols >= rows.lows):
            if edge is not None:
                visible = edge if visible is None else xp.logical_and(visible, edge)
    if rows.chunks is not None:
        # Chunks mask whether or not the block crosses a window's edge (``masked``).
        cols = xp.reshape(xp.arange(s0, s1, device=scores.device), (1, n))
        same = (cols // plan.chunk) == rows.chunks
        visible = same if visible is None else xp.logical_and(visible, same)
    return scores, visible


def _block_bias(inp: _Inputs, plan: _Plan, rows: _Rows, s0: int, s1: int) -> Array:
    """The bias plus ALiBi's -slope |i + shift - j| on one block (broadcastable to
    (g, bl, n)), or None when there is neither."""
    xp = inp.xp
    bias = _keys_of(rows.bias, s0, s1, plan.S)
    if rows.alibi is None:
        return bias
    neg_slopes, positions = rows.alibi
    keys = xp.reshape(xp.arange(s0, s1, device=positions.device), (1, s1 - s0))
    alibi = neg_slopes * xp.abs(positions - xp.astype(keys, positions.dtype))
    return alibi if bias is None else bias + alibi


def _block_mods(inp: _Inputs, plan: _Plan, rows: _Rows, s0: int, s1: int) -> ScoreMods:
    """The mods with the index grids of one block of scores, (1, ..., 1, g, bl, n) with
    a 1 for each batch dim (the rank of the direct path's scores).

    The grids are the direct path's grids cut to the block: b the flat batch index
    (1, ..., 1, 1, 1, 1), h (g, 1, 1), q_idx (bl, 1), kv_idx (1, n). A score_mod built
    from elementwise operations on its arguments (FlexAttention's contract) gives on
    each block what it gives on the block's part of the whole array.
    """
    assert inp.mods is not None
    if inp.mods.score_mod is None:
        return inp.mods
    return replace(inp.mods, grids=_block_grids(inp.xp, plan, rows, s0, s1), on_block=True)


def _block_grids(xp: Namespace, plan: _Plan, rows: _Rows, s0: int, s1: int
                 ) -> tuple[Array, Array, Array, Array]:
    """(b, h, q_idx, kv_idx) of one block (see ``_block_mods``)."""
    device = rows.q.device
    flat = 0
    for index, size in zip(rows.b, plan.batch, strict=True):
        flat = flat * size + index
    return (
        xp.full((1,) * len(plan.batch) + (1, 1, 1), flat, dtype=xp.int64, device=device),
        xp.reshape(xp.arange(rows.h0, rows.h0 + rows.g, device=device), (rows.g, 1, 1)),
        xp.reshape(xp.arange(rows.l0, rows.l1, device=device), (rows.bl, 1)),
        xp.reshape(xp.arange(s0, s1, device=device), (1, s1 - s0)),
    )


def _block_mask(inp: _Inputs, plan: _Plan, rows: _Rows, s0: int, s1: int) -> Array:
    """The mask_mod on one block's grids, as a (g, bl, n) boolean array."""
    xp = inp.xp
    assert inp.mask_mod is not None
    allowed = evaluate_mask_mod(inp.mask_mod, _block_grids(xp, plan, rows, s0, s1), xp=xp,
                                on_block=True)
    shape = _block_shape(plan, rows, s1 - s0)
    try:
        allowed = xp.broadcast_to(allowed, shape)
    except (ValueError, RuntimeError) as error:
        raise ValueError(
            f"mask_mod's result must broadcast to its block of scores; on a block of shape "
            f"{shape} it returned shape {tuple(allowed.shape)} (the blocked path calls it "
            "once per block: write it elementwise in b, h, q_idx and kv_idx)"
        ) from error
    return xp.reshape(allowed, (rows.g, rows.bl, s1 - s0))


def _block_shape(plan: _Plan, rows: _Rows, n: int) -> tuple[int, ...]:
    # A block of scores as the mods see it: (1, ..., 1, g, bl, n), one 1 per batch dim.
    return (1,) * len(plan.batch) + (rows.g, rows.bl, n)


def _scaled_block(inp: _Inputs, plan: _Plan, rows: _Rows, k: Array, s0: int, s1: int) -> Array:
    """The scaled scores scale q.k of one block (rows.q is scaled already), shaped
    ``_block_shape``."""
    return inp.xp.reshape(rows.q @ k[s0:s1, :plan.E].mT, _block_shape(plan, rows, s1 - s0))


def _modded_scores(inp: _Inputs, plan: _Plan, rows: _Rows, q_shift: Array, k: Array, s0: int,
                   s1: int) -> Array:
    """(R, n) scores of one block through softcap, bias and score_mod, minus the shift.

    The shift cannot ride in the product here (softcap and score_mod do not commute
    with it): the product is the plain scaled one, and the shift, the last column of
    ``q_shift`` when it has one, is subtracted after the mods.
    """
    xp = inp.xp
    n = s1 - s0
    scaled = _scaled_block(inp, plan, rows, k, s0, s1)
    modded = pre_mask_scores(scaled, bias=_block_bias(inp, plan, rows, s0, s1),
                             mods=_block_mods(inp, plan, rows, s0, s1), xp=xp)
    # pre_mask_scores has checked that score_mod kept the block's shape.
    scores = xp.reshape(modded, (rows.R, n))
    if q_shift.shape[1] > plan.E:
        scores = scores + q_shift[:, plan.E:]
    return scores


def _apply_visible(
    inp: _Inputs, rows: _Rows, x: Array, visible: Array | None, fill: float
) -> Array:
    """``x`` (R, n) with ``fill`` where ``visible`` is False."""
    xp = inp.xp
    if visible is None:
        return x
    n = x.shape[1]
    filled = xp.where(visible, xp.reshape(x, (rows.g, rows.bl, n)),
                      xp.asarray(fill, dtype=x.dtype, device=x.device))
    return xp.reshape(filled, (rows.R, n))


def _scores(
    inp: _Inputs, plan: _Plan, rows: _Rows, q_shift: Array, k: Array, s0: int, s1: int,
    masked: bool,
) -> Array:
    """(R, s1 - s0) final scores of one block minus the rows' shifts: scaled, biased,
    masked with -inf (see ``_raw_scores``)."""
    scores, visible = _raw_scores(inp, plan, rows, q_shift, k, s0, s1, masked)
    return _apply_visible(inp, rows, scores, visible, -math.inf)


def _exp_scores(
    inp: _Inputs, plan: _Plan, rows: _Rows, q_shift: Array, k: Array, s0: int, s1: int,
    masked: bool, no_overflow: bool,
) -> Array:
    """exp of ``_scores``: the unnormalised weights, exactly 0 where masked.

    NumPy's vectorised exp takes a slow path for -inf (4x the time of a finite
    argument), so when no exponent can overflow (``no_overflow``, known from the score
    bound) the hidden scores are exponentiated as they are and their results replaced by
    0, rather than set to -inf first. The bound is finite only for finite inputs and a
    bias without NaN or +inf, so every exp is then finite: the causal triangle alone can
    be applied by multiplying in place with a cached 0/1 mask (exact), other masks by
    selection.
    """
    xp = inp.xp
    if not no_overflow:
        return xp.exp(_scores(inp, plan, rows, q_shift, k, s0, s1, masked))
    if masked and rows.allowed is None and inp.mask_mod is None and inp.triangles is not None:
        scores, _ = _raw_scores(inp, plan, rows, q_shift, k, s0, s1, False)
        p = xp.exp(scores)
        p *= inp.triangles.get(rows, s0, s1)
        return p
    scores, visible = _raw_scores(inp, plan, rows, q_shift, k, s0, s1, masked)
    return _apply_visible(inp, rows, xp.exp(scores), visible, 0.0)


def _drop(inp: _Inputs, rows: _Rows, x: Array, s0: int, s1: int, S: int) -> Array:
    """Dropout on a (R, n) block of weights: zero the dropped, scale the kept."""
    xp = inp.xp
    if rows.keep is None:
        return x
    n = s1 - s0
    zero = xp.asarray(0.0, dtype=x.dtype, device=x.device)
    kept = xp.where(_keys_of(rows.keep, s0, s1, S), xp.reshape(x, (rows.g, rows.bl, n)), zero)
    return xp.reshape(kept, (rows.R, n)) * (1.0 / (1.0 - inp.dropout_p))


def _fill_value(masked_rows: str, S: int) -> float:
    # The weight every key gets on a fully masked row under the "nan" / "uniform" policy.
    return math.nan if masked_rows == "nan" else 1.0 / S


# --- forward ----------------------------------------------------------------------------
