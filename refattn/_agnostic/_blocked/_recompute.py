"""The backward's work item: the weights and gradients recomputed block by block.

The weights are rebuilt per block from the saved LSE, ``P = exp(S - lse)``, and
``D = rowsum(dO * O)`` replaces the softmax's row sums; as in the forward, the shifts come
out of the products: [q, -lse] [K, 1]^T = S - lse and [dO, -D] [V, 1]^T = dP - D. Each
item takes one run of heads (a unit) and one chunk of keys and visits every (query
block, key block) pair of it once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..._types import Array, Namespace
from .._scores import score_slopes
from ._block_scores import (
    _block_bias,
    _block_mods,
    _block_shape,
    _drop,
    _exp_scores,
    _fill_value,
    _scaled_block,
)
from ._bounds import _rows_range
from ._inputs import _Inputs, _Rows, _rows
from ._items import _batch_index, _OrderedSum, _unit_region
from ._plan import Span, _Plan, key_spans, query_blocks


@dataclass(frozen=True)
class _Saved:
    """What the backward reads per row besides the inputs: broadcast views (no copies)
    of shape (..., H, L[, Ev]) over the full batch."""

    grad_out: Array  # (..., H, L, Ev)
    out: Array  # (..., H, L, Ev)
    lse: Array  # (..., H, L)
    any_masked: bool  # some row is fully masked (lse = -inf)
    nonfinite: bool  # NaN or infinity somewhere (_nonfinite.backward_screen): every block
    # is visited, rows with a NaN LSE are NaN at every key, rows with a non-finite dO
    # take torch's D (``_torch_rowsums``)


@dataclass
class _RowGrads:
    """The per-row quantities of one block of rows in the backward."""

    rows: _Rows
    grad_out: Array  # (R, Ev)
    q_shift: Array  # (R, E + 1): [q, -lse], lse -> 0 on fully masked rows
    out_shift: Array  # (R, Ev + 1): [dO, -D]
    D: Array  # (R, 1)
    masked: Array | None  # (R, 1) bool: fully masked rows, or None when there are none
    nan: Array | None  # (R, 1) bool: rows whose LSE is NaN, or None when there are none
    no_overflow: bool  # no exponent S - lse can overflow (see _exp_scores)


def _with_column(xp: Namespace, x: Array, column: Array) -> Array:
    """A new (R, w + 1) array: ``x`` (R, w) and ``column`` (R, 1) side by side."""
    out = xp.empty((x.shape[0], x.shape[1] + 1), dtype=x.dtype, device=x.device)
    out[:, :-1] = x
    out[:, -1:] = column
    return out


def _row_grads(
    inp: _Inputs, plan: _Plan, saved: _Saved, rows: _Rows, kh: int
) -> _RowGrads:
    """The rows' [q, -lse], [dO, -D] and checks, in a dozen array calls: this runs per
    (work item, query block), in parallel, on rows already sliced."""
    xp = inp.xp
    R = rows.R

    def per_row(x: Array, width: int) -> Array:
        # A (g, bl) block is contiguous after this reshape (a copy when it has to be).
        part = x[(*rows.b, slice(rows.h0, rows.h0 + rows.g), slice(rows.l0, rows.l1), ...)]
        return xp.reshape(part, (R, width))

    lse = per_row(saved.lse, 1)
    masked = None
    if saved.any_masked:
        masked = lse == -xp.inf
        if bool(xp.any(masked)):
            lse = xp.where(masked, xp.asarray(0.0, dtype=lse.dtype, device=lse.device), lse)
        else:
            masked = None
    nan = None
    if saved.nonfinite:
        nan = xp.isnan(lse)
        nan = nan if bool(xp.any(nan)) else None
    grad_out = per_row(saved.grad_out, plan.Ev)
    D = xp.reshape(xp.vecdot(grad_out, per_row(saved.out, plan.Ev)), (R, 1))
    # No exponent S - lse overflows when the rows' largest score bound minus their
    # smallest lse stays below log(max float) - 1 (one conservative check for the block).
    no_overflow = False
    span = _rows_range(inp, rows, kh) if R else None
    if span is not None:
        limit = math.log(float(xp.finfo(lse.dtype).max)) - 1.0
        no_overflow = span.upper - float(xp.min(lse)) <= limit
    # As in the forward, the shifts come out of the products: [q, -lse] [K, 1]^T is
    # S - lse and [dO, -D] [V, 1]^T is dP - D.
    return _RowGrads(
        rows=rows, grad_out=grad_out, q_shift=_with_column(xp, rows.q, -lse),
        out_shift=_with_column(xp, grad_out, -D), D=D, masked=masked, nan=nan,
        no_overflow=no_overflow,
    )


def _augmented_keys(xp: Namespace, x: Array, c0: int, c1: int) -> Array:
    """``x`` (S, w) with a column of ones, for keys [c0, c1) only, indexed by absolute key
    position: rows before c0 are allocated but never written nor read (a work item
    reads only its chunk's keys), so the copy is the chunk's alone."""
    out = xp.empty((c1, x.shape[-1] + 1), dtype=x.dtype, device=x.device)
    out[c0:c1, :-1] = x[c0:c1, :]
    out[c0:c1, -1] = 1.0
    return out


def _block_weights(inp: _Inputs, plan: _Plan, rg: _RowGrads, k: Array, s0: int, s1: int,
                   masked: bool) -> Array:
    """P (before dropout) on one block, the direct backward's weights."""
    xp = inp.xp
    p = _exp_scores(inp, plan, rg.rows, rg.q_shift, k, s0, s1, masked, rg.no_overflow)
    if rg.nan is not None:
        # A NaN LSE: the direct path's weights are NaN on the whole row, masked keys
        # included (docs/semantics.rst, "Non-finite values"), which reaches their dV.
        p = xp.where(rg.nan, xp.asarray(xp.nan, dtype=p.dtype, device=p.device), p)
    if rg.masked is not None and inp.masked_rows != "zero":
        fill = xp.asarray(_fill_value(inp.masked_rows, plan.S), dtype=p.dtype, device=p.device)
        p = xp.where(rg.masked, fill, p)
    return p


def _weights_and_dscores(
    inp: _Inputs, plan: _Plan, rg: _RowGrads, k: Array, v: Array, s0: int, s1: int,
    masked: bool,
) -> tuple[Array, Array, Array]:
    """P (before dropout), dS with respect to the scaled scores (for dQ, dK) and with
    respect to the biased ones (for d bias) of one block, as the direct backward
    computes them; the two are one array without softcap and score_mod."""
    xp = inp.xp
    rows = rg.rows
    p = _block_weights(inp, plan, rg, k, s0, s1, masked)
    # dS = P (dP - D), formed in place in the product's fresh result: one block less
    # to allocate.
    if rows.keep is None:
        ds = rg.out_shift @ v[s0:s1, :].mT
    else:
        # Dropout acts on dP before D is subtracted: no folding.
        ds = _drop(inp, rows, rg.grad_out @ v[s0:s1, :plan.Ev].mT, s0, s1, plan.S)
        ds -= rg.D
    ds *= p
    if rg.masked is not None and inp.masked_rows != "nan":
        # "zero" and "uniform" rows are constants of q, k and bias: no gradient flows;
        # "nan" rows keep the plain softmax's NaN gradient.
        ds = xp.where(rg.masked, xp.asarray(0.0, dtype=ds.dtype, device=ds.device), ds)
    if inp.mods is None:
        return p, ds, ds
    # The chain rule through score_mod (d bias stops there) and softcap (dQ, dK go on),
    # as the direct backward applies it; the scaled scores are recomputed for the slopes.
    n = s1 - s0
    mod_slope, cap_slope = score_slopes(
        _scaled_block(inp, plan, rows, k, s0, s1),
        bias=_block_bias(inp, plan, rows, s0, s1),
        mods=_block_mods(inp, plan, rows, s0, s1), xp=xp)
    ds3 = xp.reshape(ds, _block_shape(plan, rows, n))
    zero = xp.asarray(0.0, dtype=ds.dtype, device=ds.device)
    # Masked entries have dS = 0 exactly; a slope undefined there must not make it NaN.
    d_biased = xp.where(ds3 == 0, zero, ds3 * mod_slope)
    d_raw = d_biased * cap_slope
    return p, xp.reshape(d_raw, (rows.R, n)), xp.reshape(d_biased, (rows.R, n))




@dataclass
class _GradItem:
    """One (batch index, head unit, key chunk) and the gradients it accumulates: dK and
    dV of its keys (complete at the end), dQ of its heads' rows and d bias (its parts
    of sums over chunks)."""

    b: tuple[int, ...]
    heads: slice
    c0: int
    c1: int
    kh0: int  # the unit's first key head
    vh0: int  # the unit's first value head
    dk: list[Array]  # (c1 - c0, E) per key head of the unit
    dv: list[Array]  # (c1 - c0, Ev) per value head of the unit
    dq: Array  # (unit, L, E)
    dbias: Array | None  # the item's part of d bias, at ``dbias_index`` in the whole
    dbias_index: tuple = ()


def _grad_item(
    inp: _Inputs, plan: _Plan, sums: dict[str, _OrderedSum], b: tuple[int, ...],
    heads: slice, c0: int, c1: int,
) -> _GradItem:
    xp = inp.xp
    dtype, device = inp.q.dtype, inp.q.device
    n, unit = c1 - c0, heads.stop - heads.start
    db, db_index = None, ()
    if "dbias" in sums:
        target = sums["dbias"].target
        db_index = _unit_region(target, b, plan, heads, c0, c1)
        db = xp.zeros(tuple(target[db_index].shape), dtype=dtype, device=device)
    return _GradItem(
        b=b, heads=heads, c0=c0, c1=c1, kh0=heads.start // plan.heads_per_k,
        vh0=heads.start // plan.heads_per_v,
        dk=[xp.zeros((n, plan.E), dtype=dtype, device=device)
            for _ in range(unit // plan.heads_per_k)],
        dv=[xp.zeros((n, plan.Ev), dtype=dtype, device=device)
            for _ in range(unit // plan.heads_per_v)],
        dq=xp.zeros((unit, plan.L, plan.E), dtype=dtype, device=device),
        dbias=db, dbias_index=db_index,
    )


def _backward_item(
    inp: _Inputs, plan: _Plan, saved: _Saved, scale: float, unit: int, chunk: int,
    sums: dict[str, _OrderedSum], i: int, item: tuple[tuple[int, ...], int, int],
) -> None:
    """All gradients from one (batch index, head unit, key chunk).

    Visits every (query block, key block) pair of the unit's heads with a key in the
    chunk, once: dV and dK of the chunk's keys are complete at the end; dQ (and d bias,
    where the bias is shared along keys) are this chunk's part of a sum over chunks.
    """
    b, u, c0 = item
    it = _grad_item(inp, plan, sums, b, slice(u * unit, (u + 1) * unit), c0,
                    min(c0 + chunk, plan.S))
    blocks = query_blocks(c0, it.c1, plan.L, plan.block_l, causal=plan.causal,
                          shift=plan.shift, skip=plan.skip, low=plan.low, chunk=plan.chunk,
                          position_shift=plan.position_shift)
    augmented: dict[tuple[str, int], Array] = {}
    for h0 in range(it.heads.start, it.heads.stop, plan.group):
        k, v = _head_keys(inp, plan, augmented, it, h0)
        for blk in blocks:
            _query_block(inp, plan, saved, scale, it, h0, blk, k, v)
    _add_item(inp, sums, i, it)


def _head_keys(
    inp: _Inputs, plan: _Plan, augmented: dict[tuple[str, int], Array], it: _GradItem,
    h0: int,
) -> tuple[Array, Array]:
    """K and V of the heads of query head ``h0`` with their columns of ones, made here
    for this item's keys (in parallel), once per head of the unit."""
    xp = inp.xp
    kh, vh = h0 // plan.heads_per_k, h0 // plan.heads_per_v
    if ("k", kh) not in augmented:
        augmented["k", kh] = _augmented_keys(xp, inp.k[(*_batch_index(inp.k, it.b), kh, ...)],
                                             it.c0, it.c1)
    if ("v", vh) not in augmented:
        augmented["v", vh] = _augmented_keys(xp, inp.v[(*_batch_index(inp.v, it.b), vh, ...)],
                                             it.c0, it.c1)
    return augmented["k", kh], augmented["v", vh]


def _query_block(
    inp: _Inputs, plan: _Plan, saved: _Saved, scale: float, it: _GradItem, h0: int,
    blk: Span, k: Array, v: Array,
) -> None:
    """The gradients from one query block of the heads of ``h0`` and the item's keys."""
    xp = inp.xp
    rows = _rows(inp, plan, it.b, h0, blk.start, blk.stop)
    rg = _row_grads(inp, plan, saved, rows, h0 // plan.heads_per_k)
    if saved.nonfinite:
        _torch_rowsums(inp, plan, rg, it.b, h0, blk)
    dq_rows = xp.zeros((rows.R, plan.E), dtype=inp.q.dtype, device=inp.q.device)
    for span in key_spans(blk.start, blk.stop, plan.S, plan.block_s, causal=plan.causal,
                          shift=plan.shift, skip=plan.skip, low=plan.low, chunk=plan.chunk,
                          position_shift=plan.position_shift):
        s0, s1 = max(span.start, it.c0), min(span.stop, it.c1)
        if s0 < s1:
            dq_rows = dq_rows + _key_block(inp, plan, rg, it, h0, k, v, s0, s1, span.masked)
    h = h0 - it.heads.start
    it.dq[h:h + rows.g, blk.start:blk.stop, :] = xp.reshape(
        dq_rows * scale, (rows.g, rows.bl, plan.E))


def _torch_rowsums(inp: _Inputs, plan: _Plan, rg: _RowGrads, b: tuple[int, ...], h0: int,
                   blk: Span) -> None:
    """D = rowsum(P * dP) over every key, torch's softmax backward, on the rows whose
    dO holds a NaN or an infinity (``direct_backward``): there a zero weight times an
    infinite dP makes the sum NaN where dO . O need not be. One extra pass over the
    keys, for the query blocks with such a row only."""
    xp = inp.xp
    bad = xp.logical_not(xp.all(xp.isfinite(rg.grad_out), axis=1, keepdims=True))
    if not bool(xp.any(bad)):
        return
    kh, vh = h0 // plan.heads_per_k, h0 // plan.heads_per_v
    k = _augmented_keys(xp, inp.k[(*_batch_index(inp.k, b), kh, ...)], 0, plan.S)
    v = inp.v[(*_batch_index(inp.v, b), vh, ...)]
    total = xp.zeros_like(rg.D)
    for span in key_spans(blk.start, blk.stop, plan.S, plan.block_s, causal=plan.causal,
                          shift=plan.shift, skip=False, low=plan.low):
        s0, s1 = span.start, span.stop
        p = _block_weights(inp, plan, rg, k, s0, s1, span.masked)
        dp = _drop(inp, rg.rows, rg.grad_out @ v[s0:s1, :plan.Ev].mT, s0, s1, plan.S)
        total = total + xp.sum(p * dp, axis=1, keepdims=True)
    rg.D = xp.where(bad, total, rg.D)
    rg.out_shift = _with_column(xp, rg.grad_out, -rg.D)


def _key_block(
    inp: _Inputs, plan: _Plan, rg: _RowGrads, it: _GradItem, h0: int, k: Array,
    v: Array, s0: int, s1: int, masked: bool,
) -> Array:
    """Add one (query block, key block) pair's terms to the item's dV, dK and d bias;
    returns its term of the rows' dQ (before the scale)."""
    rows = rg.rows
    kh, vh = h0 // plan.heads_per_k - it.kh0, h0 // plan.heads_per_v - it.vh0
    p, ds, ds_biased = _weights_and_dscores(inp, plan, rg, k, v, s0, s1, masked)
    keys = slice(s0 - it.c0, s1 - it.c0)
    p = _drop(inp, rows, p, s0, s1, plan.S)
    it.dv[vh][keys, :] = it.dv[vh][keys, :] + p.mT @ rg.grad_out
    # rows.q is scaled: this is scale dS^T Q.
    it.dk[kh][keys, :] = it.dk[kh][keys, :] + ds.mT @ rows.q
    dq = ds @ k[s0:s1, :plan.E]
    if it.dbias is not None:
        _add_dbias(inp.xp, it.dbias, ds_biased, plan, h0 - it.heads.start, rows.g, rows.l0,
                   rows.bl, s0 - it.c0, s1 - it.c0)
    return dq


def _add_item(inp: _Inputs, sums: dict[str, _OrderedSum], i: int, it: _GradItem) -> None:
    """Add item ``i``'s gradients to the whole ones, in item order where items share."""
    xp, b, rest = inp.xp, it.b, (slice(it.c0, it.c1), slice(None))
    sums["dq"].add(i, (*_batch_index(inp.q, b), it.heads, slice(None), slice(None)), it.dq)
    sums["dk"].add(i, (*_batch_index(inp.k, b), slice(it.kh0, it.kh0 + len(it.dk)), *rest),
                   xp.stack(it.dk))
    sums["dv"].add(i, (*_batch_index(inp.v, b), slice(it.vh0, it.vh0 + len(it.dv)), *rest),
                   xp.stack(it.dv))
    if it.dbias is not None:
        sums["dbias"].add(i, it.dbias_index, it.dbias)


def _add_dbias(xp: Namespace, db: Array, ds: Array, plan: _Plan, h: int, g: int, l0: int,
               bl: int, k0: int, k1: int) -> None:
    """Add a (g * bl, k1 - k0) block of dS to the item's d bias, summing it over the axes
    along which the bias was broadcast (its size-1 axes)."""
    part = xp.reshape(ds, (g, bl, k1 - k0))
    index = []
    for axis, (size, start, stop) in enumerate(((g, h, h + g), (bl, l0, l0 + bl),
                                                 (k1 - k0, k0, k1))):
        if db.shape[axis] == 1:
            if size > 1:
                part = xp.sum(part, axis=axis, keepdims=True)
            index.append(slice(0, 1))
        else:
            index.append(slice(start, stop))
    db[tuple(index)] = db[tuple(index)] + part
