"""The forward's work item: online softmax over the key blocks of one block of rows.

For one block of query rows the keys are visited block by block while two running sums
are kept per row, relative to a per-row shift c (the online softmax of Milakov &
Gimelshein, as in FlashAttention):

* ``total``, the sum of ``exp(score - c)`` so far;
* ``acc``, the sum of ``exp(score - c) * v`` so far (dropout applied to the terms).

At the end ``out = acc / total`` and ``lse = c + log(total)``. The textbook algorithm
takes c = the running maximum and rescales both sums by ``exp(c - c')`` whenever a block
raises it to c'. Here c starts at each row's largest score among a few keys and is
raised only when a block holds a score more than ``RESCALE_THRESHOLD`` above it; when the
score bounds (``_bounds``) show that no score can do that, the blocks need neither a max
pass nor a rescaling. The shift and the row sums come out of the matrix products
themselves: [q, -c] [K, 1]^T = S - c and P [V, 1] = [P V, rowsum(P)].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..._results import AttentionResult
from ..._types import Array
from ._block_scores import (
    _apply_visible,
    _drop,
    _exp_scores,
    _fill_value,
    _raw_scores,
    _scores,
)
from ._bounds import _Bound, _shift_free_range
from ._inputs import _Inputs, _Rows, _rows, _with_shift
from ._items import _batch_index
from ._nonfinite import _Screen, poisoned_columns, poisoned_rows
from ._plan import Span, _Plan, key_spans

__all__ = ["RESCALE_THRESHOLD"]

# The forward raises a row's shift only when a block holds a score more than this above
# it. Exponents up to 16 (e^16 = 8.9e6) cannot overflow a sum of S terms in float32 or
# float64, and a shift that is not the exact maximum changes no rounding error bound
# (the exponent s - c is one rounding of a value of size |s| + |c|, as before); in
# exchange most blocks need neither a max nor a rescaling pass.
RESCALE_THRESHOLD = 16.0
# Each row's first shift is its largest score among this many keys: enough that the
# Cauchy-Schwarz bound usually proves every later score within RESCALE_THRESHOLD of it,
# few enough to cost a small fraction of one key block.
_SHIFT_SAMPLE = 32


@dataclass(frozen=True)
class _Item:
    """One (batch index, head group, query block): its rows, its heads' keys and values,
    the key spans it visits and the bounds of its scores."""

    rows: _Rows
    k: Array  # (S, E + 1), or (S, E) without the column of ones
    v: Array  # (S, Ev + 1), or (S, Ev) without the column of ones
    v_used: Array  # v, or v without its column of ones where dropout needs the row sums
    spans: list[Span]
    bound: _Bound
    region: tuple  # the rows' index in the (..., H, L) results
    sums_in_product: bool  # the last column of P @ v_used is the row sums
    drop_all: bool  # dropout_p = 1: no value reaches the output
    exp_limit: float  # exp overflows above


def _item(inp: _Inputs, plan: _Plan, item: tuple[tuple[int, ...], int, int]) -> _Item:
    b, grp, l0 = item
    h0 = grp * plan.group
    kh, vh = h0 // plan.heads_per_k, h0 // plan.heads_per_v
    rows = _rows(inp, plan, b, h0, l0, min(l0 + plan.block_l, plan.L))
    v = inp.v[(*_batch_index(inp.v, b), vh, ...)]
    # Without dropout, V's column of ones (when it has one) makes the last column of
    # acc the row sums.
    sums_in_product = inp.keep is None and v.shape[-1] == plan.Ev + 1
    return _Item(
        rows=rows, k=inp.k[(*_batch_index(inp.k, b), kh, ...)], v=v,
        v_used=v if sums_in_product else v[:, :plan.Ev],
        spans=key_spans(rows.l0, rows.l1, plan.S, plan.block_s, causal=plan.causal,
                        shift=plan.shift, low=plan.low, chunk=plan.chunk,
                        position_shift=plan.position_shift),
        bound=_Bound(inp, rows, kh), region=(*b, slice(h0, h0 + rows.g), slice(l0, rows.l1)),
        sums_in_product=sums_in_product, drop_all=inp.keep is not None and inp.dropout_p >= 1.0,
        exp_limit=math.log(float(inp.xp.finfo(rows.q.dtype).max)) - 1.0,
    )


@dataclass
class _Running:
    """The state of an item's rows between key blocks.

    ``shift`` is None while no shift has been taken: the exponents are the scores
    themselves, and no row counts as having seen a finite score. Once taken, ``shift``
    holds the (R,) shifts, each a score the row has seen, and ``unset`` marks the rows
    that have seen no finite score yet (their shift is 0), or is None when there are
    none. ``safe``: no score of any row can exceed its shift by more than
    RESCALE_THRESHOLD, so that the blocks need no max pass. ``acc`` and ``total`` are
    the running sums, None until a block adds to them.
    """

    q_shift: Array  # [q, -shift] (R, E + 1), or the plain (R, E) rows
    shift: Array | None = None
    unset: Array | None = None
    safe: bool = False
    acc: Array | None = None
    total: Array | None = None

    @property
    def all_seen(self) -> bool:
        """Every row has seen a finite score (and its shift is one)."""
        return self.shift is not None and self.unset is None


def _initial_shift(
    inp: _Inputs, plan: _Plan, rows: _Rows, k: Array, first: Span, bound: _Bound
) -> _Running:
    """Each row's first shift: its largest score among the first ``_SHIFT_SAMPLE`` keys.

    Rows with no finite score among those keys get shift 0 and are marked ``unset``;
    the state is ``safe`` when no score of any row can exceed its shift by more than
    RESCALE_THRESHOLD (by the Cauchy-Schwarz bound), so that no block needs a max pass.
    """
    xp = inp.xp
    stop = min(first.stop, first.start + _SHIFT_SAMPLE)
    top = xp.max(_scores(inp, plan, rows, rows.q, k, first.start, stop, first.masked), axis=1)
    seen = top > -xp.inf  # False for NaN too: such rows stay on the checked way
    shift = xp.where(seen, top, xp.asarray(0.0, dtype=top.dtype, device=top.device))
    q_shift = _with_shift(inp, rows, shift)
    if not bool(xp.all(seen)):
        return _Running(q_shift=q_shift, shift=shift, unset=xp.logical_not(seen))
    return _Running(q_shift=q_shift, shift=shift,
                    safe=bound.within(shift, RESCALE_THRESHOLD))


def _start(inp: _Inputs, plan: _Plan, it: _Item) -> _Running:
    """The state before the first block: no shift at all where the scores are small
    enough; the sampled shifts (``_initial_shift``) where the item visits more than one
    key span, or a masked one; otherwise none yet (the single block takes its exact
    row maxima: one pass, fewer array calls than the sample)."""
    rows, spans = it.rows, it.spans
    if spans and (inp.zero_shift
                  or it.bound.narrow(*_shift_free_range(rows.q.dtype, plan.S, inp.xp))):
        # Every score is small enough that the plain exp(s) cannot overflow, nor can a
        # row's sum of S of them, and large enough that each row's largest term is a
        # normal number (>= e^-354 in float64): no shift at all, no max pass, no
        # rescaling. Rows with no visible key end with a sum of 0.
        return _Running(q_shift=rows.q, safe=True)
    if len(spans) > 1 or (spans and spans[0].masked):
        return _initial_shift(inp, plan, rows, it.k, spans[0], it.bound)
    return _Running(q_shift=rows.q)


def _forward_item(
    inp: _Inputs, plan: _Plan, res: AttentionResult, item: tuple[tuple[int, ...], int, int],
    found: _Screen,
) -> None:
    """Online softmax for one (batch index, head group, query block); writes its results.

    Each row's shift (the running max of the textbook algorithm) starts at its largest
    score among a few keys and is raised lazily: only when a block holds a score more
    than ``RESCALE_THRESHOLD`` above it, or for a row that had no finite score yet. So
    exponents stay <= RESCALE_THRESHOLD (no overflow) and the shift is a score actually
    seen (the largest term is >= 1: no underflow). When the Cauchy-Schwarz bound keeps
    every score of the rows within the threshold of their shifts, the blocks need
    neither a max pass nor a rescaling: the shift comes out of the product with
    [K, 1]^T, and the row sums out of the product with [V, 1]. A single key block takes
    its exact row maxima instead (one pass, fewer array calls than the sample), unless
    the causal mask crosses it. And when the bounds keep every score within a few
    hundred of 0 (the usual case), no shift is needed at all: exp(s) neither overflows
    nor underflows there, and the weights exp(s) / sum are the same ratios.
    """
    it = _item(inp, plan, item)
    run = _start(inp, plan, it)
    for index, span in enumerate(it.spans):
        if run.safe:
            # Every exponent is <= RESCALE_THRESHOLD: no overflow, no rescaling.
            p = _exp_scores(inp, plan, it.rows, run.q_shift, it.k, span.start, span.stop,
                            span.masked, True)
        else:
            p = _checked_weights(inp, plan, it, run, span, more=index + 1 < len(it.spans))
        _accumulate(inp, plan, it, run, p, span)
    # NaN and infinity where the blocks above did not look (_nonfinite): rows with a NaN
    # or +inf score at a hidden key, value columns with a non-finite entry at a skipped
    # key.
    rows_nan = poisoned_rows(inp, plan, it.rows, it.k, found)
    columns_nan = poisoned_columns(inp, plan, it.v, it.spans, found, every=it.drop_all)
    _finish(inp, plan, res, it, run, rows_nan, columns_nan)


def _checked_weights(
    inp: _Inputs, plan: _Plan, it: _Item, run: _Running, span: Span, more: bool
) -> Array:
    """exp(score - shift) of one block, after its row maxima have raised the shifts
    where needed (``_first_shift``, ``_raise_shift``). ``more``: blocks follow."""
    xp, rows = inp.xp, it.rows
    raw, visible = _raw_scores(inp, plan, rows, run.q_shift, it.k, span.start, span.stop,
                               span.masked)
    scores = _apply_visible(inp, rows, raw, visible, -math.inf)
    top = xp.max(scores, axis=1)
    delta = _first_shift(inp, run, top) if run.shift is None else _raise_shift(inp, run, top)
    if delta is not None and more:
        run.q_shift = _with_shift(inp, rows, run.shift)
        run.safe = run.unset is None and it.bound.within(run.shift, RESCALE_THRESHOLD)
    if visible is not None and it.bound.within(run.shift, it.exp_limit):
        # exp of the unmasked scores then 0 where hidden: see _exp_scores.
        if delta is not None:
            raw -= xp.reshape(delta, (rows.R, 1))
        return _apply_visible(inp, rows, xp.exp(raw), visible, 0.0)
    if delta is not None:
        scores -= xp.reshape(delta, (rows.R, 1))
    return xp.exp(scores)


def _first_shift(inp: _Inputs, run: _Running, top: Array) -> Array:
    """Take the first shifts from a block's row maxima ``top``: nothing is summed yet,
    so every row with a finite score takes its maximum. Returns the shifts."""
    xp = inp.xp
    seen = top > -xp.inf  # NaN rows stay unset, and stay NaN
    run.shift = xp.where(seen, top, xp.asarray(0.0, dtype=top.dtype, device=top.device))
    run.unset = None if bool(xp.all(seen)) else xp.logical_not(seen)
    return run.shift


def _raise_shift(inp: _Inputs, run: _Running, top: Array) -> Array | None:
    """Raise the shifts of the rows whose block maximum ``top`` exceeds them by more than
    RESCALE_THRESHOLD, or that see their first finite score, and rescale the sums to
    the new shifts. Returns the raise (0 on the other rows), or None when there is none.
    """
    xp = inp.xp
    grow = top > RESCALE_THRESHOLD
    if run.unset is not None:
        grow = xp.logical_or(grow, xp.logical_and(run.unset, top > -xp.inf))
    if not bool(xp.any(grow)):
        return None
    zero = xp.asarray(0.0, dtype=top.dtype, device=top.device)
    delta = xp.where(grow, top, zero)
    # Rows without a finite score have nothing to rescale (and exp(-delta) could
    # overflow there): factor 1.
    alpha = xp.exp(-(delta if run.unset is None else xp.where(run.unset, zero, delta)))
    if run.acc is not None:
        run.acc = run.acc * xp.reshape(alpha, (alpha.shape[0], 1))
    if run.total is not None:
        run.total = run.total * alpha
    run.shift = run.shift + delta
    if run.unset is not None:
        unset = xp.logical_and(run.unset, xp.logical_not(grow))
        run.unset = unset if bool(xp.any(unset)) else None
    return delta


def _accumulate(
    inp: _Inputs, plan: _Plan, it: _Item, run: _Running, p: Array, span: Span
) -> None:
    """Add a block's weights ``p`` to the row sums (unless the product with [V, 1]
    gives them) and, after dropout, their product with V to ``acc``."""
    xp = inp.xp
    if not it.sums_in_product:
        row_sums = xp.sum(p, axis=1)
        run.total = row_sums if run.total is None else run.total + row_sums
    if not it.drop_all:
        s0, s1 = span.start, span.stop
        part = _drop(inp, it.rows, p, s0, s1, plan.S) @ it.v_used[s0:s1, :]
        run.acc = part if run.acc is None else run.acc + part


def _final_sums(inp: _Inputs, plan: _Plan, it: _Item, run: _Running) -> tuple[Array, Array]:
    """``(acc, total)``, (R, Ev) and (R,), after the last block (0 where nothing was
    added)."""
    xp, R = inp.xp, it.rows.R
    dtype, device = it.rows.q.dtype, it.rows.q.device
    acc = run.acc
    if acc is None:  # no key visited (or dropout_p = 1): nothing was added
        acc = xp.zeros((R, it.v_used.shape[1]), dtype=dtype, device=device)
    if it.sums_in_product:
        return acc[:, :plan.Ev], acc[:, plan.Ev]
    if run.total is None:
        return acc, xp.zeros((R,), dtype=dtype, device=device)
    return acc, run.total


def _fully_masked(inp: _Inputs, run: _Running, total: Array) -> Array | None:
    """(R,) True on the fully masked rows: no finite score ever and a sum of 0 (a NaN
    row never sets its shift either, but its sum is NaN); None when every row has seen
    a finite score."""
    xp = inp.xp
    if run.all_seen:
        return None
    masked = total == xp.asarray(0.0, dtype=total.dtype, device=total.device)
    return masked if run.shift is None else xp.logical_and(run.unset, masked)


def _finish(inp: _Inputs, plan: _Plan, res: AttentionResult, it: _Item, run: _Running,
            rows_nan: Array | None = None, columns_nan: Array | None = None) -> None:
    """Write the rows' ``out = acc / total`` (the masked-row policy's output on fully
    masked rows), ``lse = shift + log(total)`` (-inf there) and weights if asked.

    ``rows_nan`` (R,) and ``columns_nan`` (Ev,) mark the rows (output, LSE, weights)
    and output columns made NaN by a non-finite input the blocks did not see
    (``_nonfinite``)."""
    xp, rows = inp.xp, it.rows
    R, g, bl, Ev = rows.R, rows.g, rows.bl, plan.Ev
    dtype, device = rows.q.dtype, rows.q.device
    acc, total = _final_sums(inp, plan, it, run)
    shift = xp.zeros((R,), dtype=dtype, device=device) if run.shift is None else run.shift
    masked = _fully_masked(inp, run, total)
    if masked is None:
        safe_total, lse = total, xp.log(total) + shift
    else:
        safe_total = xp.where(masked, xp.asarray(1.0, dtype=dtype, device=device), total)
        lse = xp.where(masked, xp.asarray(-xp.inf, dtype=dtype, device=device),
                       xp.log(safe_total) + shift)
    nan = xp.asarray(xp.nan, dtype=dtype, device=device)
    if rows_nan is not None:
        lse = xp.where(rows_nan, nan, lse)
    res_lse: Array = res.lse  # allocated by blocked_attention
    res_lse[it.region] = xp.reshape(lse, (g, bl))
    if it.drop_all:
        out = xp.zeros((R, Ev), dtype=dtype, device=device)
    else:
        out = acc / xp.reshape(safe_total, (R, 1))
        if masked is not None and inp.masked_rows != "zero" and bool(xp.any(masked)):
            out = xp.where(xp.reshape(masked, (R, 1)), _fill_rows(inp, plan, rows, it.v), out)
    if rows_nan is not None:
        out = xp.where(xp.reshape(rows_nan, (R, 1)), nan, out)
    if columns_nan is not None:
        out = xp.where(xp.reshape(columns_nan, (1, Ev)), nan, out)
    res.out[(*it.region, ...)] = xp.reshape(out, (g, bl, Ev))
    if res.weights is not None:
        _write_weights(inp, plan, res, it, shift, safe_total, masked)
        if rows_nan is not None:
            weights: Array = res.weights
            weights[(*it.region, ...)] = xp.where(xp.reshape(rows_nan, (g, bl, 1)), nan,
                                                  weights[(*it.region, ...)])


def _fill_rows(inp: _Inputs, plan: _Plan, rows: _Rows, v: Array) -> Array:
    """Output of the masked-row policy's weights (NaN or 1/S on every key) for all rows.

    The direct path applies dropout to those weights too, so a row whose every weight
    is dropped gets 0 even under "nan"; reproducing that means visiting every key,
    which only happens when some row of the block is fully masked.
    """
    xp = inp.xp
    dtype, device = v.dtype, v.device
    fill = _fill_value(inp.masked_rows, plan.S)
    acc = xp.zeros((rows.R, plan.Ev), dtype=dtype, device=device)
    for s0 in range(0, plan.S, plan.block_s):
        s1 = min(s0 + plan.block_s, plan.S)
        w = _drop(inp, rows, xp.full((rows.R, s1 - s0), fill, dtype=dtype, device=device),
                  s0, s1, plan.S)
        acc = acc + w @ v[s0:s1, :plan.Ev]
    return acc


def _write_weights(
    inp: _Inputs, plan: _Plan, res: AttentionResult, it: _Item, shift: Array, total: Array,
    masked: Array | None,
) -> None:
    """Weights exp(s - shift) / sum with the rows' final shifts and sums: the direct
    path's formula. The scores are recomputed (the weights need L x S memory anyway)."""
    weights: Array = res.weights  # allocated by blocked_attention (return_weights)
    xp, rows, k, region = inp.xp, it.rows, it.k, it.region
    g, bl = rows.g, rows.bl
    folded = k.shape[-1] == plan.E + 1  # K has its column of ones
    q_shift = _with_shift(inp, rows, shift) if folded else rows.q
    for span in it.spans:
        s0, s1 = span.start, span.stop
        scores = _scores(inp, plan, rows, q_shift, k, s0, s1, span.masked)
        if not folded:
            scores -= xp.reshape(shift, (rows.R, 1))
        w = xp.exp(scores) / xp.reshape(total, (rows.R, 1))
        weights[(*region, slice(s0, s1))] = xp.reshape(w, (g, bl, s1 - s0))
    if masked is not None and inp.masked_rows != "zero" and bool(xp.any(masked)):
        row = weights[(*region, ...)]
        fill = xp.asarray(_fill_value(inp.masked_rows, plan.S), dtype=row.dtype,
                          device=row.device)
        weights[(*region, ...)] = xp.where(xp.reshape(masked, (g, bl, 1)), fill, row)
