"""The blocked path: online softmax over key blocks, bounded memory, forward and backward.

Forward. For one block of query rows the keys are visited block by block while two
running sums are kept per row, relative to a per-row shift c (the online softmax of
Milakov & Gimelshein, as in FlashAttention):

* ``l``, the sum of ``exp(score - c)`` so far;
* ``acc``, the sum of ``exp(score - c) * v`` so far (dropout applied to the terms).

At the end ``out = acc / l`` and ``lse = c + log(l)``. The textbook algorithm takes c =
the running maximum and rescales both sums by ``exp(c - c')`` whenever a block raises it
to c'. Here c starts at each row's largest score among a few keys and is raised only
when a block holds a score more than ``RESCALE_THRESHOLD`` above it; when the
Cauchy-Schwarz bound |s_ij| <= |scale| ||q_i|| max_j ||k_j|| (+ max bias) shows that no
score can do that, the blocks need neither a max pass nor a rescaling. The shift and the
row sums come out of the matrix products themselves: [q, -c] [K, 1]^T = S - c and
P [V, 1] = [P V, rowsum(P)].

Backward (FlashAttention-2's recomputation). The weights are rebuilt per block from the
saved LSE, ``P = exp(S - lse)``, and ``D = rowsum(dO * O)`` replaces the softmax's row
sums. Each work item takes one run of heads and one chunk of keys and visits every
(query block, key block) pair of it once: dK and dV of its keys are complete at the end,
its dQ (and d bias where the bias is shared along keys) is one part of a sum over chunks,
added in chunk order.

Only (rows x keys) blocks of scores exist at any time, so the extra memory is
O(block_L x block_S) per worker instead of O(L x S); this is also the algorithm the CUDA
kernel runs, so it is tested here on the CPU.

The causal structure arrives as ``(causal, alignment)``, not as an (L, S) mask, so that
blocks no query of a block may attend are never computed, and blocks entirely on the
visible side of the diagonal need no mask. The user's mask, bias and dropout keep-mask
arrive broadcastable to (..., H, L, S) and are sliced per block without materialising the
broadcast. Grouped-query heads are not repeated: the query heads that share one key head
and one value head are stacked into one block of rows.

Work items and the order of every sum depend on the shapes only, and each item is
computed by one thread start to end, so the results are the same bits whatever the
thread count. Everything here is array-API code; what is library-specific about CPU
speed (the worker count, the one-thread BLAS) is decided by the caller, which passes
``num_threads``.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .._results import AttentionGrads as BackwardResult
from .._results import AttentionResult as DirectResult
from .._validate import broadcast_shapes
from ._masks import alignment_shift, evaluate_mask_mod, index_grids
from ._scores import ScoreMods, pre_mask_scores, score_slopes

__all__ = [
    "RESCALE_THRESHOLD",
    "SCORE_BLOCK_ELEMENTS",
    "KeySpan",
    "blocked_attention",
    "blocked_attention_backward",
    "choose_blocks",
    "key_spans",
    "query_blocks",
]

# Block sizes. A block of 128 Ki scores is 1 MiB in float64; the product that makes it
# reads a key block of at most 512 rows (512 x 65 x 8 B = 260 KiB for E = 64) and the
# query rows (256 x 65 x 8 B), and exp() writes a second 1 MiB block that the next
# product reads: about 2.5 MiB per worker, in a 2 MiB L2 for the most part and in L3 for
# the rest. Each block is large enough that the dozen array calls of Python around it
# cost a few percent; blocks of 64 Ki or 256 Ki scores measured -5% to +20% slower on
# the benchmark shapes (docs/performance.rst). The sizes depend on the shapes only,
# never on the machine or the thread count, so results are reproducible everywhere.
SCORE_BLOCK_ELEMENTS = 128 * 1024
_MAX_BLOCK_S = 512

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
# The backward splits the keys into chunks only when there are fewer (batch, head unit)
# pairs than this: enough work items to keep a few threads busy. A constant, so that
# the split, and with it every bit of the result, does not depend on the thread count.
_MIN_ITEMS = 8


# --- the block plan ---------------------------------------------------------------------


@dataclass(frozen=True)
class KeySpan:
    """A range of keys (or, for ``query_blocks``, of query rows) [start, stop).

    ``masked`` is True when the causal diagonal crosses the block, so some query of it
    may not attend some key of it and the positional mask must be applied.
    """

    start: int
    stop: int
    masked: bool


def choose_blocks(
    L: int, S: int, rows_per_query: int, *, backward: bool = False
) -> tuple[int, int]:
    """Block sizes ``(block_l, block_s)`` for an (L, S) problem.

    ``rows_per_query`` is the number of query heads stacked into one block (the
    grouped-query group), so a block holds ``rows_per_query * block_l`` rows of scores.
    The key block is at most ``_MAX_BLOCK_S`` keys; the query block then fills
    ``SCORE_BLOCK_ELEMENTS`` scores. The backward keeps three blocks of that size alive
    at once (P, dP - D and dS) and the product results next to them, so its blocks are
    half as large, with at most half as many keys (measured 5-12% faster than the
    forward's on the benchmark shapes).
    """
    max_s, elements = _MAX_BLOCK_S, SCORE_BLOCK_ELEMENTS
    if backward:
        max_s, elements = _MAX_BLOCK_S // 2, SCORE_BLOCK_ELEMENTS // 2
    block_s = max(1, min(S, max_s))
    rows = max(1, elements // block_s)
    block_l = max(1, min(L, -(-rows // max(1, rows_per_query))))
    return block_l, block_s


def key_spans(
    start: int, stop: int, S: int, block_s: int, *, causal: bool, shift: int, skip: bool = True,
    low: int | None = None,
) -> list[KeySpan]:
    """Key spans visited by query rows [start, stop), in order.

    Keys are cut at multiples of ``block_s``. With ``causal``, row i may attend keys
    j <= i + shift: unless ``skip`` is False, keys past the last row's diagonal are not
    visited, and the keys every row sees (up to the first row's diagonal) are cut apart
    from the rest, so that only the triangle under the diagonal is ``masked`` (needs the
    positional mask). A lower edge ``low`` (a window's left edge: row i may attend keys
    j >= i + low) drops, unless ``skip`` is False, the spans below the first row's edge
    and marks ``masked`` the spans the edge crosses.
    """
    spans = _upper_spans(start, stop, S, block_s, causal=causal, shift=shift, skip=skip)
    if low is None:
        return spans
    kept = []
    for span in spans:
        if skip and span.stop <= start + low:
            continue  # below every row's lower edge
        kept.append(replace(span, masked=span.masked or span.start < stop - 1 + low))
    return kept


def _upper_spans(
    start: int, stop: int, S: int, block_s: int, *, causal: bool, shift: int, skip: bool
) -> list[KeySpan]:
    # key_spans for the causal diagonal (the window's right edge) alone.
    if not causal:
        return [KeySpan(s0, min(s0 + block_s, S), False) for s0 in range(0, S, block_s)]
    end = max(0, min(S, stop + shift)) if skip else S
    seen_by_all = max(0, min(end, start + shift + 1))
    # A sliver of fully visible keys before the triangle costs more as its own product
    # than as masked columns of the triangle's.
    cut = seen_by_all - seen_by_all % block_s
    if end > seen_by_all and seen_by_all - cut < block_s // 4:
        seen_by_all = cut
    spans = [KeySpan(s0, min(s0 + block_s, seen_by_all), False)
             for s0 in range(0, seen_by_all, block_s)]
    spans += [KeySpan(s0, min(s0 + block_s, end), True)
              for s0 in range(seen_by_all, end, block_s)]
    return spans


def query_blocks(
    start: int, stop: int, L: int, block_l: int, *, causal: bool, shift: int, skip: bool = True,
    low: int | None = None,
) -> list[KeySpan]:
    """Query blocks (on the grid of ``block_l``) that see keys [start, stop), in order.

    The transpose of ``key_spans``: with ``causal`` (and ``skip``), blocks whose last row
    sees no key of the span are not visited; with a lower edge ``low``, blocks whose
    first row sees none either.
    """
    first = 0
    if causal and skip:
        # The first row that sees key ``start``, rounded down to the grid.
        first = max(0, start - shift)
        first = L if first >= L else first // block_l * block_l
    blocks = []
    for l0 in range(first, L, block_l):
        l1 = min(l0 + block_l, L)
        masked = causal and stop - 1 > l0 + shift
        if low is not None:
            if skip and l0 + low > stop - 1:
                break  # this block's first row, and every later row, is past the span
            masked = masked or l1 - 1 + low > start
        blocks.append(KeySpan(l0, l1, masked))
    return blocks


@dataclass(frozen=True)
class _Plan:
    """Shapes, block sizes and causal structure of one problem (the shape legend)."""

    batch: tuple[int, ...]
    H: int
    L: int
    S: int
    E: int
    Ev: int
    group: int  # query heads per work item: those sharing one key head and one value head
    heads_per_k: int
    heads_per_v: int
    block_l: int
    block_s: int
    causal: bool
    shift: int
    skip: bool  # skip the blocks the causal mask hides entirely
    low: int | None  # query i sees keys j >= i + low (a window's left edge), or None
    position_shift: int  # the alignment's shift, for ALiBi distances |i + shift - j|

    @property
    def ndim(self) -> int:
        return len(self.batch) + 3


def _make_plan(
    q: Any, k: Any, v: Any, *, causal: bool, alignment: str, diagonal_offset: int = 0,
    window_left: int | None = None, block_l: int | None,
    block_s: int | None, backward: bool = False,
) -> _Plan:
    H, L, E = q.shape[-3:]
    S, Ev = k.shape[-2], v.shape[-1]
    heads_per_k, heads_per_v = H // k.shape[-3], H // v.shape[-3]
    group = math.gcd(heads_per_k, heads_per_v)
    auto_l, auto_s = choose_blocks(L, S, group, backward=backward)
    return _Plan(
        batch=broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3]), H=H, L=L, S=S,
        E=E, Ev=Ev, group=group, heads_per_k=heads_per_k, heads_per_v=heads_per_v,
        block_l=auto_l if block_l is None else block_l,
        block_s=auto_s if block_s is None else block_s, causal=causal,
        shift=alignment_shift(L, S, alignment) + diagonal_offset if causal else 0, skip=True,
        low=None if window_left is None else alignment_shift(L, S, alignment) - window_left,
        position_shift=alignment_shift(L, S, alignment),
    )


def _batch_indices(plan: _Plan) -> list[tuple[int, ...]]:
    return list(itertools.product(*map(range, plan.batch)))


def _query_starts(plan: _Plan) -> list[int]:
    starts = list(range(0, plan.L, plan.block_l))
    # With a causal mask later query blocks see more keys; running them first evens out
    # the threads' loads at the end.
    return starts[::-1] if plan.causal else starts


# --- slicing without broadcasting -------------------------------------------------------


def _pad_rank(x: Any, ndim: int, xp: Any) -> Any:
    # Leading axes of size 1 (a view) so that every array indexes with the same tuple.
    if x is None or x.ndim == ndim:
        return x
    return xp.reshape(x, (1,) * (ndim - x.ndim) + tuple(x.shape))


def _batch_index(x: Any, b: tuple[int, ...]) -> tuple[int, ...]:
    # Broadcasting by indexing: an axis of size 1 is read at 0 for every batch index.
    return tuple(0 if x.shape[d] == 1 else i for d, i in enumerate(b))


def _axis_slice(size: int, full: int, start: int, stop: int) -> slice:
    # A broadcast (size 1) axis stays size 1: the block then broadcasts against it.
    return slice(start, stop) if size == full and full != 1 else slice(0, size)


def _region(x: Any, b: tuple[int, ...], plan: _Plan, h0: int, l0: int, l1: int) -> tuple:
    """Index of the (heads, rows, ...) part of a (..., H, L, ...) array for one item."""
    idx = _batch_index(x, b)
    return (
        *idx,
        _axis_slice(x.shape[len(b)], plan.H, h0, h0 + plan.group),
        _axis_slice(x.shape[len(b) + 1], plan.L, l0, l1),
    )


def _rows_of(x: Any, b: tuple[int, ...], plan: _Plan, h0: int, l0: int, l1: int) -> Any:
    """The (heads, rows, S) part of a broadcastable (..., H, L, S) array for one item."""
    return None if x is None else x[(*_region(x, b, plan, h0, l0, l1), slice(None))]


def _hashable(index: tuple) -> tuple:
    # slice objects are not hashable before Python 3.12.
    return tuple((s.start, s.stop) if isinstance(s, slice) else s for s in index)


def _keys_of(x: Any, s0: int, s1: int, S: int) -> Any:
    return None if x is None else x[..., _axis_slice(x.shape[-1], S, s0, s1)]


# --- running work items -----------------------------------------------------------------


class _OrderedSum:
    """Adds work items' contributions into regions of ``target`` in item order.

    Items whose region no other item shares just write it. Where several items share a
    region (an input broadcast over batch dims, a bias broadcast over heads or rows),
    each waits until the item before it in the list has added its part, so the sum's
    order is the list's whatever the thread count. No deadlock: the pool starts items in
    list order, so the item waited for has always started.
    """

    def __init__(self, target: Any, keys: Sequence[Any]) -> None:
        self.target = target
        last: dict[Any, int] = {}
        self.previous: list[int | None] = []
        for i, key in enumerate(keys):
            self.previous.append(last.get(key))
            last[key] = i
        self.done = [threading.Event() for _ in keys]

    def add(self, i: int, index: tuple, value: Any) -> None:
        before = self.previous[i]
        if before is None:
            self.target[index] = value
        else:
            self.done[before].wait()
            self.target[index] = self.target[index] + value
        self.done[i].set()

    def release(self, i: int) -> None:
        # Also on failure, so that no later item waits forever (the error is re-raised).
        self.done[i].set()


def _run_items(
    items: Sequence[Any], work: Callable[[int, Any], None], num_threads: int,
    sums: Sequence[_OrderedSum] = (),
) -> None:
    """Run ``work(i, items[i])`` for every item on ``num_threads`` threads.

    Each thread takes the next item in list order (so an item never starts before the
    items before it, which ``_OrderedSum`` relies on). Plain threads pulling indices
    cost a tenth of a ThreadPoolExecutor's futures per item, which shows with many small
    items. The first error stops the taking of new items and is raised at the end.
    """
    def run(i: int) -> None:
        try:
            work(i, items[i])
        finally:
            for s in sums:
                s.release(i)

    if num_threads <= 1 or len(items) <= 1:
        for i in range(len(items)):
            run(i)
        return
    indices = iter(range(len(items)))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        while True:
            with lock:
                i = None if errors else next(indices, None)
            if i is None:
                return
            try:
                run(i)
            except BaseException as error:  # noqa: BLE001 - re-raised in the caller
                with lock:
                    errors.append(error)

    threads = [threading.Thread(target=worker, daemon=True)
               for _ in range(min(num_threads, len(items)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


# --- shared block arithmetic ------------------------------------------------------------


@dataclass(frozen=True)
class _Inputs:
    """Rank-padded arrays read by the workers.

    In the forward ``k`` and ``v`` may have a column of ones appended (where it pays,
    see blocked_attention); the backward appends them per work item. ``k_norm``,
    ``bias_max`` and ``bias_min`` bound the scores.
    """

    q: Any
    scale: float
    k: Any  # (..., K, S, E + 1), or (..., K, S, E) without the column of ones
    v: Any  # (..., Kv, S, Ev + 1), or (..., Kv, S, Ev) without the column of ones
    bias: Any
    alibi: Any  # (..., H) ALiBi slopes (rank-padded), or None
    allowed: Any
    keep: Any
    k_norm: Any  # (..., K): max_j ||k_j||
    bias_max: float | None  # the largest bias entry; None when it is NaN or +inf
    bias_min: float  # the smallest bias entry (ALiBi included), -inf when unbounded
    triangles: Any  # _CausalMasks when causal, else None
    dropout_p: float
    masked_rows: str
    Ev: int
    mods: ScoreMods | None  # softcap and score_mod, applied per block (None: neither)
    mask_mod: Callable[..., Any] | None  # evaluated per block, ANDed with ``allowed``
    zero_shift: bool  # every row's scores are known small enough to need no shift
    xp: Any


def _ones_appended(x: Any, xp: Any) -> Any:
    """A new row-major array: ``x`` with a column of ones appended."""
    out = xp.empty((*x.shape[:-1], x.shape[-1] + 1), dtype=x.dtype, device=x.device)
    out[..., :-1] = x
    out[..., -1] = 1.0
    return out


def _prepare_inputs(
    q: Any, k: Any, v: Any, *, scale: float, bias: Any, allowed: Any, keep: Any,
    dropout_p: float, masked_rows: str, plan: _Plan, mods: ScoreMods | None,
    alibi_slopes: Any = None, mask_mod: Any = None, xp: Any,
) -> _Inputs:
    n = plan.ndim
    kp, vp = _pad_rank(k, n, xp), _pad_rank(v, n, xp)
    # K with a column of ones: a query row [q, -c] times its transpose gives q.k - c,
    # so the shift of the online softmax comes out of the product instead of a pass
    # over the scores. V with a column of ones gives the row sums of the weights out of
    # the P @ V product (without dropout, where the sum runs over the same weights), and
    # [dO, -D] times its transpose gives dP - D in the backward. The copies are not
    # made here: the forward makes them where they pay (blocked_attention), the backward
    # per work item, in parallel (``_augmented_keys``).
    bias_max: float | None = 0.0
    bias_min = 0.0
    if bias is not None:
        bias_max = float(xp.max(bias)) if math.prod(bias.shape) else 0.0
        bias_min = float(xp.min(bias)) if math.prod(bias.shape) else 0.0
        if not bias_max < math.inf:  # NaN or +inf: no bound on the scores
            bias_max = None
    alibi = None
    if alibi_slopes is not None:
        alibi = _pad_rank(alibi_slopes, n - 2, xp)
        # -slope * distance is <= 0 for slopes >= 0; a negative slope makes it positive,
        # up to |slope| (L + S).
        sized = math.prod(alibi_slopes.shape) > 0
        rise = max(0.0, -float(xp.min(alibi_slopes))) * (plan.L + plan.S) if sized else 0.0
        fall = max(0.0, float(xp.max(alibi_slopes))) * (plan.L + plan.S) if sized else 0.0
        if bias_max is not None:
            bias_max = bias_max + rise if rise < math.inf else None
        bias_min = bias_min - fall if fall < math.inf else -math.inf
    return _Inputs(
        q=_pad_rank(q, n, xp), scale=scale, k=kp, v=vp,
        bias=_pad_rank(bias, n, xp), alibi=alibi, allowed=_pad_rank(allowed, n, xp),
        keep=_pad_rank(keep, n, xp), k_norm=xp.sqrt(xp.max(xp.vecdot(kp, kp), axis=-1)),
        bias_max=bias_max, bias_min=bias_min if bias_min == bias_min else -math.inf,
        # The cached triangles cover the causal diagonal alone, not a window's lower edge.
        triangles=_CausalMasks(plan, xp, q.dtype, q.device)
        if plan.causal and plan.low is None else None,
        dropout_p=dropout_p, masked_rows=masked_rows, Ev=plan.Ev,
        mods=mods if mods is not None and mods.active else None, mask_mod=mask_mod,
        zero_shift=False, xp=xp,
    )


@dataclass
class _Rows:
    """One (batch index, head group, query block): its rows and the slices it reads."""

    b: tuple[int, ...]
    h0: int
    l0: int
    l1: int
    g: int
    q: Any  # (R, E) scaled queries, R = g * (l1 - l0)
    bias: Any
    allowed: Any
    keep: Any
    positions: Any  # (bl, 1) query index + shift, for the causal mask (None if not causal)
    lows: Any  # (bl, 1) query index + low, for the window's lower edge (or None)
    alibi: Any  # (g, 1, 1) -ALiBi slopes and (bl, 1) query positions, or None

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
    index = None
    if plan.causal or plan.low is not None or inp.alibi is not None:
        index = xp.reshape(xp.arange(l0, l1, device=q.device), (l1 - l0, 1))
    positions = index + plan.shift if plan.causal else None
    lows = index + plan.low if plan.low is not None else None
    alibi = None
    if inp.alibi is not None:
        slopes = inp.alibi[(*_batch_index(inp.alibi, b),
                            _axis_slice(inp.alibi.shape[-1], plan.H, h0, h0 + g))]
        alibi = (xp.reshape(-slopes, (slopes.shape[-1], 1, 1)),
                 xp.astype(index + plan.position_shift, q.dtype))
    return _Rows(
        b=b, h0=h0, l0=l0, l1=l1, g=g, q=xp.reshape(q, (g * (l1 - l0), plan.E)),
        bias=_rows_of(inp.bias, b, plan, h0, l0, l1),
        allowed=_rows_of(inp.allowed, b, plan, h0, l0, l1),
        keep=_rows_of(inp.keep, b, plan, h0, l0, l1), positions=positions, lows=lows,
        alibi=alibi,
    )


def _with_shift(inp: _Inputs, rows: _Rows, shift: Any) -> Any:
    """The (R, E + 1) rows [q, -shift]: times [K, 1]^T they give q.k - shift."""
    xp = inp.xp
    return xp.concat([rows.q, -xp.reshape(shift, (rows.R, 1))], axis=1)


def _raw_scores(
    inp: _Inputs, plan: _Plan, rows: _Rows, q_shift: Any, k: Any, s0: int, s1: int,
    masked: bool,
) -> tuple[Any, Any]:
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
            and inp.mask_mod is None):
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
    return scores, visible


def _block_bias(inp: _Inputs, plan: _Plan, rows: _Rows, s0: int, s1: int) -> Any:
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


def _block_grids(xp: Any, plan: _Plan, rows: _Rows, s0: int, s1: int
                 ) -> tuple[Any, Any, Any, Any]:
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


def _block_mask(inp: _Inputs, plan: _Plan, rows: _Rows, s0: int, s1: int) -> Any:
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


def _probe_mods(mods: ScoreMods | None, mask_mod: Any, plan: _Plan, q: Any, xp: Any) -> None:
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


def _block_shape(plan: _Plan, rows: _Rows, n: int) -> tuple[int, ...]:
    # A block of scores as the mods see it: (1, ..., 1, g, bl, n), one 1 per batch dim.
    return (1,) * len(plan.batch) + (rows.g, rows.bl, n)


def _scaled_block(inp: _Inputs, plan: _Plan, rows: _Rows, k: Any, s0: int, s1: int) -> Any:
    """The scaled scores scale q.k of one block (rows.q is scaled already), shaped
    ``_block_shape``."""
    return inp.xp.reshape(rows.q @ k[s0:s1, :plan.E].mT, _block_shape(plan, rows, s1 - s0))


def _modded_scores(inp: _Inputs, plan: _Plan, rows: _Rows, q_shift: Any, k: Any, s0: int,
                   s1: int) -> Any:
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
    if tuple(modded.shape) != _block_shape(plan, rows, n):
        # A mod that broadcasts its result wider than the scores (or returns something
        # of another shape) cannot be evaluated block by block.
        raise ValueError(
            f"score_mod must return an array of its score argument's shape; on a block of "
            f"scores of shape {_block_shape(plan, rows, n)} it returned shape "
            f"{tuple(modded.shape)} (the blocked path calls it once per block: write it "
            "elementwise in score, b, h, q_idx and kv_idx, as FlexAttention requires)"
        )
    scores = xp.reshape(modded, (rows.R, n))
    if q_shift.shape[1] > plan.E:
        scores = scores + q_shift[:, plan.E:]
    return scores


def _apply_visible(inp: _Inputs, rows: _Rows, x: Any, visible: Any, fill: float) -> Any:
    """``x`` (R, n) with ``fill`` where ``visible`` is False."""
    xp = inp.xp
    if visible is None:
        return x
    n = x.shape[1]
    filled = xp.where(visible, xp.reshape(x, (rows.g, rows.bl, n)),
                      xp.asarray(fill, dtype=x.dtype, device=x.device))
    return xp.reshape(filled, (rows.R, n))


def _scores(
    inp: _Inputs, plan: _Plan, rows: _Rows, q_shift: Any, k: Any, s0: int, s1: int,
    masked: bool,
) -> Any:
    """(R, s1 - s0) final scores of one block minus the rows' shifts: scaled, biased,
    masked with -inf (see ``_raw_scores``)."""
    scores, visible = _raw_scores(inp, plan, rows, q_shift, k, s0, s1, masked)
    return _apply_visible(inp, rows, scores, visible, -math.inf)


class _CausalMasks:
    """0/1 float masks of the causal triangle, (R, n) per block shape, shared by items.

    Which keys of a block the rows see depends only on the offset l0 + shift - s0 and
    the block's shape, which repeat across heads, batch entries and query blocks.
    """

    def __init__(self, plan: _Plan, xp: Any, dtype: Any, device: Any) -> None:
        self._plan, self._xp, self._dtype, self._device = plan, xp, dtype, device
        self._cache: dict[tuple[int, int, int, int], Any] = {}

    def get(self, rows: _Rows, s0: int, s1: int) -> Any:
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


def _exp_scores(
    inp: _Inputs, plan: _Plan, rows: _Rows, q_shift: Any, k: Any, s0: int, s1: int,
    masked: bool, no_overflow: bool,
) -> Any:
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


def _drop(inp: _Inputs, rows: _Rows, x: Any, s0: int, s1: int, S: int) -> Any:
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


def _bounded(inp: _Inputs) -> bool:
    """Whether the scores have a bound at all: not through a score_mod (which may do
    anything to a score), nor with a NaN or +inf bias entry."""
    return inp.bias_max is not None and (inp.mods is None or inp.mods.score_mod is None)


def _capped(inp: _Inputs, cs: float) -> float | None:
    """A Cauchy-Schwarz bound ``cs`` on |scale q.k| through softcap (|c tanh(s / c)| < c),
    or None when it is not finite (non-finite inputs take the checked way)."""
    if not math.isfinite(cs):
        return None
    if inp.mods is not None and inp.mods.softcap is not None:
        return min(cs, inp.mods.softcap)
    return cs


def _largest_score(inp: _Inputs, rows: _Rows, kh: int) -> float | None:
    """One bound on every |score - bias| of the rows: the largest row norm times the
    largest key norm, capped (``_capped``); None where ``_bounded`` is False."""
    if not _bounded(inp):
        return None
    if not rows.R:
        return _capped(inp, 0.0)
    xp = inp.xp
    k_norm = float(inp.k_norm[(*_batch_index(inp.k_norm, rows.b), kh)])
    return _capped(inp, math.sqrt(float(xp.max(xp.vecdot(rows.q, rows.q)))) * k_norm)


def _score_bounds(inp: _Inputs, plan: _Plan, rows: _Rows, kh: int) -> tuple[Any, Any] | None:
    """(R,) upper and lower bounds of the rows' scores, or None if there are none.

    |scale q_i . k_j| <= |scale| ||q_i|| max_j ||k_j|| (Cauchy-Schwarz; and <= softcap
    after the cap), plus the largest (smallest) bias entry, ALiBi's rise with a negative
    slope (fall with a positive one) included; masks only remove scores. A score_mod
    leaves no bound. NaN or infinite inputs make the bounds NaN or infinite, which never
    pass the tests they serve, so those rows always take the checked way.
    """
    xp = inp.xp
    if not _bounded(inp):
        return None  # every block checked
    k_norm = inp.k_norm[(*_batch_index(inp.k_norm, rows.b), kh)]
    bound = xp.sqrt(xp.sum(rows.q * rows.q, axis=1)) * k_norm
    if inp.mods is not None and inp.mods.softcap is not None:
        # |c tanh(s / c)| < c whatever s (NaN stays NaN and fails the test as before).
        bound = xp.where(bound > inp.mods.softcap,
                         xp.asarray(inp.mods.softcap, dtype=bound.dtype, device=bound.device),
                         bound)
    return bound + inp.bias_max, inp.bias_min - bound


class _Bound:
    """The rows' score bounds (``_score_bounds``), computed on first use."""

    def __init__(self, inp: _Inputs, plan: _Plan, rows: _Rows, kh: int) -> None:
        self._args = (inp, plan, rows, kh)
        self._bounds: Any = None
        self._known = False

    def _get(self) -> Any:
        if not self._known:
            self._bounds, self._known = _score_bounds(*self._args), True
        return self._bounds

    def within(self, shift: Any, limit: float) -> bool:
        """True when no score of the rows can exceed its shift by more than ``limit``."""
        bounds = self._get()
        inp = self._args[0]
        return bounds is not None and bool(inp.xp.all(bounds[0] - shift <= limit))

    def narrow(self, upper: float, lower: float) -> bool:
        """True when every score of the rows lies in [lower, upper].

        Decided on the largest row norm alone (every row passes if that one does), in
        three array calls: this runs once per work item on every forward.
        """
        inp, _, rows, kh = self._args
        cs = _largest_score(inp, rows, kh)
        return cs is not None and cs + inp.bias_max <= upper and inp.bias_min - cs >= lower


def _shift_free_range(dtype: Any, S: int, xp: Any) -> tuple[float, float]:
    """[lower, upper] scores may span for the forward to take no shift at all: exp of
    the upper end times S stays below the largest float, exp of the lower end is a
    normal number far from underflow (e^-354 in float64, e^-43 in float32), so that
    terms below it that underflow are negligible next to each row's largest."""
    top = math.log(float(xp.finfo(dtype).max)) - 1.0
    return top - math.log(max(S, 1)), -top / 2


def _zero_shift_everywhere(inp: _Inputs, plan: _Plan) -> bool:
    """True when every score of the problem lies well inside ``_shift_free_range``.

    One bound for all rows, max_i |scale| ||q_i|| max_j ||k_j|| (capped by softcap) plus
    the bias range, with a margin of 1 that covers the rounding of the per-item bounds
    (``_Bound.narrow``), so that every item then takes no shift either.
    """
    xp = inp.xp
    if not _bounded(inp) or plan.L == 0 or plan.S == 0:
        return False
    q_norm = math.sqrt(float(xp.max(xp.vecdot(inp.q, inp.q)))) * abs(inp.scale)
    cs = _capped(inp, q_norm * float(xp.max(inp.k_norm)))
    if cs is None:
        return False
    upper, lower = _shift_free_range(inp.q.dtype, plan.S, xp)
    return cs + inp.bias_max <= upper - 1.0 and inp.bias_min - cs >= lower + 1.0


def _initial_shift(
    inp: _Inputs, plan: _Plan, rows: _Rows, k: Any, first: KeySpan, bound: _Bound
) -> tuple[Any, Any, bool]:
    """Each row's first shift: its largest score among the first ``_SHIFT_SAMPLE`` keys.

    Returns ``(shift, unset, safe)``: rows with no finite score among those keys get
    shift 0 and are marked in ``unset`` (False when there are none); ``safe`` is True
    when no score of any row can exceed its shift by more than RESCALE_THRESHOLD (by
    the Cauchy-Schwarz bound), so that no block needs a max pass at all.
    """
    xp = inp.xp
    stop = min(first.stop, first.start + _SHIFT_SAMPLE)
    top = xp.max(_scores(inp, plan, rows, rows.q, k, first.start, stop, first.masked), axis=1)
    seen = top > -xp.inf  # False for NaN too: such rows stay on the checked way
    shift = xp.where(seen, top, xp.asarray(0.0, dtype=top.dtype, device=top.device))
    if not bool(xp.all(seen)):
        return shift, xp.logical_not(seen), False
    return shift, False, bound.within(shift, RESCALE_THRESHOLD)


def _forward_item(
    inp: _Inputs, plan: _Plan, res: DirectResult, item: tuple[tuple[int, ...], int, int]
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
    xp = inp.xp
    b, grp, l0 = item
    h0 = grp * plan.group
    kh, vh = h0 // plan.heads_per_k, h0 // plan.heads_per_v
    rows = _rows(inp, plan, b, h0, l0, min(l0 + plan.block_l, plan.L))
    R, g, bl, Ev = rows.R, rows.g, rows.bl, plan.Ev
    k = inp.k[(*_batch_index(inp.k, b), kh, ...)]
    v = inp.v[(*_batch_index(inp.v, b), vh, ...)]
    dtype, device = rows.q.dtype, rows.q.device
    zero = xp.asarray(0.0, dtype=dtype, device=device)
    drop_all = inp.keep is not None and inp.dropout_p >= 1.0
    # Without dropout, V's column of ones (when it has one) makes the last column of
    # acc the row sums.
    sums_in_product = inp.keep is None and v.shape[-1] == Ev + 1
    v_used = v if sums_in_product else v[:, :Ev]
    region = (*b, slice(h0, h0 + g), slice(rows.l0, rows.l1))

    spans = key_spans(rows.l0, rows.l1, plan.S, plan.block_s, causal=plan.causal,
                      shift=plan.shift, low=plan.low)
    # unset: the rows without a finite score yet: True (all, no shift yet), False
    # (none) or a boolean array.
    bound = _Bound(inp, plan, rows, kh)
    shift, unset, safe = None, True, False
    exp_limit = math.log(float(xp.finfo(dtype).max)) - 1.0  # exp overflows above
    if spans and (inp.zero_shift or bound.narrow(*_shift_free_range(dtype, plan.S, xp))):
        # Every score is small enough that the plain exp(s) cannot overflow, nor can a
        # row's sum of S of them, and large enough that each row's largest term is a
        # normal number (>= e^-354 in float64): no shift at all, no max pass, no
        # rescaling. Rows with no visible key end with a sum of 0 (``unset`` stays True).
        shift, safe = xp.zeros((R,), dtype=dtype, device=device), True
        q_shift = rows.q
    else:
        if len(spans) > 1 or (spans and spans[0].masked):
            shift, unset, safe = _initial_shift(inp, plan, rows, k, spans[0], bound)
        q_shift = rows.q if shift is None else _with_shift(inp, rows, shift)
    acc = total = None
    for index, span in enumerate(spans):
        s0, s1 = span.start, span.stop
        if safe:
            # Every exponent is <= RESCALE_THRESHOLD: no overflow, no rescaling.
            p = _exp_scores(inp, plan, rows, q_shift, k, s0, s1, span.masked, True)
        else:
            raw, visible = _raw_scores(inp, plan, rows, q_shift, k, s0, s1, span.masked)
            scores = _apply_visible(inp, rows, raw, visible, -math.inf)
            top = xp.max(scores, axis=1)
            if unset is True:
                # Nothing summed yet: every row with a finite score takes its maximum.
                seen = top > -xp.inf  # NaN rows stay unset, and stay NaN
                delta = shift = xp.where(seen, top, zero)
                unset = False if bool(xp.all(seen)) else xp.logical_not(seen)
            else:
                grow = top > RESCALE_THRESHOLD
                if unset is not False:
                    grow = xp.logical_or(grow, xp.logical_and(unset, top > -xp.inf))
                delta = None
                if bool(xp.any(grow)):
                    delta = xp.where(grow, top, zero)
                    # Rows without a finite score have nothing to rescale (and
                    # exp(-delta) could overflow there): factor 1.
                    alpha = xp.exp(-(delta if unset is False
                                     else xp.where(unset, zero, delta)))
                    if acc is not None:
                        acc = acc * xp.reshape(alpha, (R, 1))
                    if total is not None:
                        total = total * alpha
                    shift = shift + delta
                    if unset is not False:
                        unset = xp.logical_and(unset, xp.logical_not(grow))
                        unset = unset if bool(xp.any(unset)) else False
            if delta is not None and index + 1 < len(spans):
                q_shift = _with_shift(inp, rows, shift)
                safe = unset is False and bound.within(shift, RESCALE_THRESHOLD)
            if visible is not None and bound.within(shift, exp_limit):
                # exp of the unmasked scores then 0 where hidden: see _exp_scores.
                if delta is not None:
                    raw -= xp.reshape(delta, (R, 1))
                p = _apply_visible(inp, rows, xp.exp(raw), visible, 0.0)
            else:
                if delta is not None:
                    scores -= xp.reshape(delta, (R, 1))
                p = xp.exp(scores)
        if not sums_in_product:
            row_sums = xp.sum(p, axis=1)
            total = row_sums if total is None else total + row_sums
        if not drop_all:
            part = _drop(inp, rows, p, s0, s1, plan.S) @ v_used[s0:s1, :]
            acc = part if acc is None else acc + part
    if acc is None:  # no key visited (or dropout_p = 1): nothing was added
        acc = xp.zeros((R, v_used.shape[1]), dtype=dtype, device=device)
    if shift is None:
        shift = xp.zeros((R,), dtype=dtype, device=device)
    if sums_in_product:
        total = acc[:, Ev]
        acc = acc[:, :Ev]
    elif total is None:
        total = xp.zeros((R,), dtype=dtype, device=device)

    if unset is False:
        masked, safe_total, lse = None, total, xp.log(total) + shift
    else:
        # Fully masked: no finite score ever and a sum of 0 (a NaN row never sets its
        # shift either, but its sum is NaN).
        masked = total == zero
        if unset is not True:
            masked = xp.logical_and(unset, masked)
        safe_total = xp.where(masked, xp.asarray(1.0, dtype=dtype, device=device), total)
        lse = xp.where(masked, xp.asarray(-xp.inf, dtype=dtype, device=device),
                       xp.log(safe_total) + shift)
    res.lse[region] = xp.reshape(lse, (g, bl))
    if drop_all:
        out = xp.zeros((R, Ev), dtype=dtype, device=device)
    else:
        out = acc / xp.reshape(safe_total, (R, 1))
        if masked is not None and inp.masked_rows != "zero" and bool(xp.any(masked)):
            out = xp.where(xp.reshape(masked, (R, 1)), _fill_rows(inp, plan, rows, v), out)
    res.out[(*region, ...)] = xp.reshape(out, (g, bl, Ev))
    if res.weights is not None:
        _write_weights(inp, plan, res, rows, region, spans, k, shift, safe_total, masked)


def _fill_rows(inp: _Inputs, plan: _Plan, rows: _Rows, v: Any) -> Any:
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
    inp: _Inputs, plan: _Plan, res: DirectResult, rows: _Rows, region: tuple,
    spans: list[KeySpan], k: Any, shift: Any, total: Any, masked: Any,
) -> None:
    """Weights exp(s - shift) / sum with the rows' final shifts and sums: the direct
    path's formula. The scores are recomputed (the weights need L x S memory anyway)."""
    xp = inp.xp
    g, bl = rows.g, rows.bl
    folded = k.shape[-1] == plan.E + 1  # K has its column of ones
    q_shift = _with_shift(inp, rows, shift) if folded else rows.q
    for span in spans:
        s0, s1 = span.start, span.stop
        scores = _scores(inp, plan, rows, q_shift, k, s0, s1, span.masked)
        if not folded:
            scores -= xp.reshape(shift, (rows.R, 1))
        w = xp.exp(scores) / xp.reshape(total, (rows.R, 1))
        res.weights[(*region, slice(s0, s1))] = xp.reshape(w, (g, bl, s1 - s0))
    if masked is not None and inp.masked_rows != "zero" and bool(xp.any(masked)):
        row = res.weights[(*region, ...)]
        fill = xp.asarray(_fill_value(inp.masked_rows, plan.S), dtype=row.dtype,
                          device=row.device)
        res.weights[(*region, ...)] = xp.where(xp.reshape(masked, (g, bl, 1)), fill, row)


def blocked_attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    scale: float,
    bias: Any,
    allowed: Any,
    keep: Any,
    dropout_p: float,
    masked_rows: str,
    causal: bool = False,
    alignment: str = "top_left",
    diagonal_offset: int = 0,
    window_left: int | None = None,
    alibi_slopes: Any = None,
    mask_mod: Any = None,
    return_weights: bool = False,
    block_l: int | None = None,
    block_s: int | None = None,
    num_threads: int = 1,
    mods: ScoreMods | None = None,
    xp: Any,
) -> DirectResult:
    """Attention by online softmax over key blocks, with bounded extra memory.

    The contract of ``direct_attention``, with the causal structure passed as
    ``(causal, alignment)`` instead of inside ``allowed``.

    Parameters
    ----------
    q, k, v
        (..., H, L, E), (..., K, S, E), (..., Kv, S, Ev) in the compute dtype, with
        K and Kv dividing H.
    scale
        Multiplies q @ k^T.
    bias
        None or an additive float array broadcastable to (..., H, L, S).
    allowed
        None or the user's boolean mask broadcastable to (..., H, L, S): False masks a
        score. The causal mask is not in it.
    keep
        None or a boolean dropout keep-mask broadcastable to (..., H, L, S).
    dropout_p
        Kept weights are scaled by 1 / (1 - dropout_p); dropout_p == 1 drops all.
    masked_rows
        Policy for fully masked rows (see ``masked_softmax``).
    causal, alignment, diagonal_offset
        Query i may attend keys j <= i + shift + diagonal_offset, shift = 0
        ("top_left") or S - L ("bottom_right"); key blocks no row of a query block may
        attend are skipped. A window's right edge is the causal diagonal moved by
        ``diagonal_offset``.
    window_left
        None, or a window's left edge: query i may attend keys j >= i + shift - window_left
        (shift the alignment's); key blocks below every row's edge are skipped.
    alibi_slopes
        None, or (..., H) slopes (broadcastable to the batch dims and H): each block
        adds -slope |i + shift - j| after the bias, computed per block.
    mask_mod
        None, or FlexAttention's ``mask_mod(b, h, q_idx, kv_idx)``, evaluated per block
        on the block's grids and ANDed with ``allowed``.
    return_weights
        Also return the (..., H, L, S) probabilities. They need L x S memory anyway;
        they are filled in block by block from each row's final max and sum.
    block_l, block_s
        Query rows (per head) and keys per block; ``choose_blocks`` when None.
    num_threads
        Work items (batch index, head group, query block) run on this many threads.
        The result does not depend on it.
    mods
        softcap and score_mod (see ``_scores``), applied to each block of scores; the
        score_mod sees the block's index grids (``_block_mods``).

    Returns
    -------
    DirectResult
        ``out`` (..., H, L, Ev), ``lse`` (..., H, L), ``weights`` or None.
    """
    plan = _make_plan(q, k, v, causal=causal, alignment=alignment,
                      diagonal_offset=diagonal_offset, window_left=window_left, block_l=block_l,
                      block_s=block_s)
    batch, H, L, S, Ev = plan.batch, plan.H, plan.L, plan.S, plan.Ev
    dtype, device = q.dtype, q.device
    weights = None
    if return_weights:
        weights = xp.zeros((*batch, H, L, S), dtype=dtype, device=device)
    if L == 0 or S == 0:
        # No keys: every row is fully masked, and its (empty) weights meet no value, so
        # the output is 0 whatever the policy, as in the direct path.
        return DirectResult(
            out=xp.zeros((*batch, H, L, Ev), dtype=dtype, device=device),
            lse=xp.full((*batch, H, L), -xp.inf, dtype=dtype, device=device),
            weights=weights,
        )
    inp = _prepare_inputs(q, k, v, scale=scale, bias=bias, allowed=allowed, keep=keep,
                          dropout_p=dropout_p, masked_rows=masked_rows, plan=plan,
                          mods=mods, alibi_slopes=alibi_slopes, mask_mod=mask_mod, xp=xp)
    _probe_mods(mods, mask_mod, plan, q, xp)
    # A shift is folded into the products (K gets its column of ones) where a query
    # block sees more than one key span, or a masked one, unless every row of every
    # item can do without a shift (_forward_item): then no item needs the copy. V gets
    # its column of ones (row sums out of P @ [V, 1]) where several query blocks share
    # each head's keys and so amortise the copy; with a single query block per head the
    # row sums of the blocks cost less than the serial copy.
    zero_shift = _zero_shift_everywhere(inp, plan)
    fold_shift = (causal or plan.low is not None or S > plan.block_s) and not zero_shift
    sums_in_product = keep is None and L > plan.block_l
    inp = replace(inp, zero_shift=zero_shift,
                  k=_ones_appended(inp.k, xp) if fold_shift else inp.k,
                  v=_ones_appended(inp.v, xp) if sums_in_product else inp.v)
    res = DirectResult(
        out=xp.empty((*batch, H, L, Ev), dtype=dtype, device=device),
        lse=xp.empty((*batch, H, L), dtype=dtype, device=device), weights=weights,
    )
    items = list(itertools.product(_batch_indices(plan), range(H // plan.group),
                                   _query_starts(plan)))
    _run_items(items, lambda i, item: _forward_item(inp, plan, res, item), num_threads)
    return res


# --- backward ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Saved:
    """What the backward reads per row besides the inputs: broadcast views (no copies)
    of shape (..., H, L[, Ev]) over the full batch."""

    grad_out: Any  # (..., H, L, Ev)
    out: Any  # (..., H, L, Ev)
    lse: Any  # (..., H, L)
    any_masked: bool  # some row is fully masked (lse = -inf)


@dataclass
class _RowGrads:
    """The per-row quantities of one block of rows in the backward."""

    rows: _Rows
    grad_out: Any  # (R, Ev)
    q_shift: Any  # (R, E + 1): [q, -lse], lse -> 0 on fully masked rows
    out_shift: Any  # (R, Ev + 1): [dO, -D]
    D: Any  # (R, 1)
    masked: Any  # (R, 1) bool: fully masked rows, or None when there are none
    no_overflow: bool  # no exponent S - lse can overflow (see _exp_scores)


def _with_column(xp: Any, x: Any, column: Any) -> Any:
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

    def per_row(x: Any, width: int) -> Any:
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
    grad_out = per_row(saved.grad_out, plan.Ev)
    D = xp.reshape(xp.vecdot(grad_out, per_row(saved.out, plan.Ev)), (R, 1))
    # No exponent S - lse overflows when the rows' largest score bound minus their
    # smallest lse stays below log(max float) - 1 (one conservative check for the block).
    no_overflow = False
    cs = _largest_score(inp, rows, kh) if R else None
    if cs is not None:
        limit = math.log(float(xp.finfo(lse.dtype).max)) - 1.0
        no_overflow = cs + inp.bias_max - float(xp.min(lse)) <= limit
    # As in the forward, the shifts come out of the products: [q, -lse] [K, 1]^T is
    # S - lse and [dO, -D] [V, 1]^T is dP - D.
    return _RowGrads(
        rows=rows, grad_out=grad_out, q_shift=_with_column(xp, rows.q, -lse),
        out_shift=_with_column(xp, grad_out, -D), D=D, masked=masked,
        no_overflow=no_overflow,
    )


def _augmented_keys(xp: Any, x: Any, c0: int, c1: int) -> Any:
    """``x`` (S, w) with a column of ones, for keys [c0, c1) only, indexed by absolute key
    position: rows before c0 are allocated but never written nor read (a work item
    reads only its chunk's keys), so the copy is the chunk's alone."""
    out = xp.empty((c1, x.shape[-1] + 1), dtype=x.dtype, device=x.device)
    out[c0:c1, :-1] = x[c0:c1, :]
    out[c0:c1, -1] = 1.0
    return out


def _weights_and_dscores(
    inp: _Inputs, plan: _Plan, rg: _RowGrads, k: Any, v: Any, s0: int, s1: int,
    masked: bool,
) -> tuple[Any, Any, Any]:
    """P (before dropout), dS with respect to the scaled scores (for dQ, dK) and with
    respect to the biased ones (for d bias) of one block, as the direct backward
    computes them; the two are one array without softcap and score_mod."""
    xp = inp.xp
    rows = rg.rows
    p = _exp_scores(inp, plan, rows, rg.q_shift, k, s0, s1, masked, rg.no_overflow)
    if rg.masked is not None and inp.masked_rows != "zero":
        fill = xp.asarray(_fill_value(inp.masked_rows, plan.S), dtype=p.dtype, device=p.device)
        p = xp.where(rg.masked, fill, p)
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


def _backward_item(
    inp: _Inputs, plan: _Plan, saved: _Saved, scale: float, unit: int, chunk: int,
    sums: dict[str, _OrderedSum], i: int, item: tuple[tuple[int, ...], int, int],
) -> None:
    """All gradients from one (batch index, head unit, key chunk).

    Visits every (query block, key block) pair of the unit's heads with a key in the
    chunk, once: dV and dK of the chunk's keys are complete at the end; dQ (and d bias,
    where the bias is shared along keys) are this chunk's part of a sum over chunks.
    """
    xp = inp.xp
    b, u, c0 = item
    c1 = min(c0 + chunk, plan.S)
    E, Ev, n = plan.E, plan.Ev, c1 - c0
    dtype, device = inp.q.dtype, inp.q.device
    heads = slice(u * unit, (u + 1) * unit)
    kh0, vh0 = heads.start // plan.heads_per_k, heads.start // plan.heads_per_v
    dk = [xp.zeros((n, E), dtype=dtype, device=device) for _ in range(unit // plan.heads_per_k)]
    dv = [xp.zeros((n, Ev), dtype=dtype, device=device)
          for _ in range(unit // plan.heads_per_v)]
    dq = xp.zeros((unit, plan.L, E), dtype=dtype, device=device)
    db = db_index = None
    if "dbias" in sums:
        target = sums["dbias"].target
        db_index = _unit_region(target, b, plan, heads, c0, c1)
        db = xp.zeros(tuple(target[db_index].shape), dtype=dtype, device=device)
    blocks = query_blocks(c0, c1, plan.L, plan.block_l, causal=plan.causal, shift=plan.shift,
                          skip=plan.skip, low=plan.low)
    augmented: dict[tuple[str, int], Any] = {}
    for h0 in range(heads.start, heads.stop, plan.group):
        kh, vh = h0 // plan.heads_per_k, h0 // plan.heads_per_v
        # K and V with their columns of ones, made here for this item's keys (in
        # parallel), once per head of the unit.
        if ("k", kh) not in augmented:
            augmented["k", kh] = _augmented_keys(xp, inp.k[(*_batch_index(inp.k, b), kh, ...)],
                                                 c0, c1)
        if ("v", vh) not in augmented:
            augmented["v", vh] = _augmented_keys(xp, inp.v[(*_batch_index(inp.v, b), vh, ...)],
                                                 c0, c1)
        k, v = augmented["k", kh], augmented["v", vh]
        for blk in blocks:
            rows = _rows(inp, plan, b, h0, blk.start, blk.stop)
            rg = _row_grads(inp, plan, saved, rows, kh)
            g, bl = rows.g, rows.bl
            dq_rows = xp.zeros((rows.R, E), dtype=dtype, device=device)
            for span in key_spans(blk.start, blk.stop, plan.S, plan.block_s,
                                  causal=plan.causal, shift=plan.shift, skip=plan.skip,
                                  low=plan.low):
                s0, s1 = max(span.start, c0), min(span.stop, c1)
                if s0 >= s1:
                    continue
                p, ds, ds_biased = _weights_and_dscores(inp, plan, rg, k, v, s0, s1,
                                                        span.masked)
                keys = slice(s0 - c0, s1 - c0)
                p = _drop(inp, rows, p, s0, s1, plan.S)
                dv[vh - vh0][keys, :] = dv[vh - vh0][keys, :] + p.mT @ rg.grad_out
                # rows.q is scaled: this is scale dS^T Q.
                dk[kh - kh0][keys, :] = dk[kh - kh0][keys, :] + ds.mT @ rows.q
                dq_rows = dq_rows + ds @ k[s0:s1, :E]
                if db is not None:
                    _add_dbias(xp, db, ds_biased, plan, h0 - heads.start, g, blk.start, bl, s0 - c0,
                               s1 - c0)
            dq[h0 - heads.start:h0 - heads.start + g, blk.start:blk.stop, :] = xp.reshape(
                dq_rows * scale, (g, bl, E))
    sums["dq"].add(i, (*_batch_index(inp.q, b), heads, slice(None), slice(None)), dq)
    sums["dk"].add(i, (*_batch_index(inp.k, b), slice(kh0, kh0 + len(dk)), slice(c0, c1),
                       slice(None)), xp.stack(dk))
    sums["dv"].add(i, (*_batch_index(inp.v, b), slice(vh0, vh0 + len(dv)), slice(c0, c1),
                       slice(None)), xp.stack(dv))
    if db is not None:
        sums["dbias"].add(i, db_index, db)


def _unit_region(x: Any, b: tuple[int, ...], plan: _Plan, heads: slice, c0: int,
                 c1: int) -> tuple:
    """Index of the part of a broadcastable (..., H, L, S) array one backward item
    covers: the unit's heads, every query, the chunk's keys (size-1 axes stay size 1)."""
    nb = len(b)
    return (
        *_batch_index(x, b),
        _axis_slice(x.shape[nb], plan.H, heads.start, heads.stop),
        slice(None),
        _axis_slice(x.shape[nb + 2], plan.S, c0, c1),
    )


def _add_dbias(xp: Any, db: Any, ds: Any, plan: _Plan, h: int, g: int, l0: int, bl: int,
               k0: int, k1: int) -> None:
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


def blocked_attention_backward(
    grad_out: Any,
    q: Any,
    k: Any,
    v: Any,
    *,
    scale: float,
    bias: Any,
    allowed: Any,
    keep: Any,
    dropout_p: float,
    masked_rows: str,
    out: Any,
    lse: Any,
    causal: bool = False,
    alignment: str = "top_left",
    diagonal_offset: int = 0,
    window_left: int | None = None,
    alibi_slopes: Any = None,
    mask_mod: Any = None,
    block_l: int | None = None,
    block_s: int | None = None,
    num_threads: int = 1,
    mods: ScoreMods | None = None,
    xp: Any,
) -> BackwardResult:
    """Gradients of ``blocked_attention``, recomputing the weights block by block.

    The contract of ``direct_backward``, with the causal structure passed as
    ``(causal, alignment)`` instead of inside ``allowed``.

    Parameters
    ----------
    grad_out
        (..., H, L, Ev) gradient of the output, in the compute dtype.
    q, k, v, scale, bias, allowed, keep, dropout_p, masked_rows, causal, alignment,
    diagonal_offset, window_left, alibi_slopes, mask_mod
        As for ``blocked_attention``; no gradient flows to the slopes.
    out, lse
        The forward output (..., H, L, Ev) and LSE (..., H, L; leading dims may be 1 or
        absent), or None to compute them with ``blocked_attention`` first.
    block_l, block_s, num_threads, mods
        As for ``blocked_attention``; the result does not depend on ``num_threads``.
        The chain rule through the mods is the direct backward's (``score_slopes``).

    Returns
    -------
    BackwardResult
        dq, dk, dv with the shapes of q, k, v; dbias with the shape of bias (None when
        bias is None).
    """
    plan = _make_plan(q, k, v, causal=causal, alignment=alignment,
                      diagonal_offset=diagonal_offset, window_left=window_left, block_l=block_l,
                      block_s=block_s, backward=True)
    dtype, device = q.dtype, q.device
    n = plan.ndim
    # Every entry of the gradients is assigned by some work item (each covers its keys
    # and its heads' queries whole), so they start empty, except when nothing runs.
    nothing = plan.L == 0 or plan.S == 0 or (keep is not None and dropout_p >= 1.0)
    new = xp.zeros if nothing else xp.empty
    grads = [new((1,) * (n - x.ndim) + tuple(x.shape), dtype=dtype, device=device)
             for x in (q, k, v)]
    dbias = None
    if bias is not None:
        dbias = new((1,) * (n - bias.ndim) + tuple(bias.shape), dtype=dtype, device=device)

    def result() -> BackwardResult:
        dq, dk, dv = (xp.reshape(g, tuple(x.shape)) for g, x in zip(grads, (q, k, v),
                                                                     strict=True))
        db = None if dbias is None else xp.reshape(dbias, tuple(bias.shape))
        return BackwardResult(dq=dq, dk=dk, dv=dv, dbias=db)

    if nothing:
        # Nothing to differentiate, or dropout_p = 1: the output is identically zero.
        return result()
    if out is None or lse is None:
        fwd = blocked_attention(
            q, k, v, scale=scale, bias=bias, allowed=allowed, keep=keep, dropout_p=dropout_p,
            masked_rows=masked_rows, causal=causal, alignment=alignment,
            diagonal_offset=diagonal_offset, window_left=window_left,
            alibi_slopes=alibi_slopes, mask_mod=mask_mod, block_l=block_l,
            block_s=block_s, num_threads=num_threads, mods=mods, xp=xp,
        )
        out = fwd.out if out is None else out
        lse = fwd.lse if lse is None else lse
    if masked_rows != "zero" and bool(xp.any(lse == -xp.inf)):
        # A fully masked row weighs every key under "nan" and "uniform", also the keys
        # the causal mask hides: then every block is visited.
        plan = replace(plan, skip=False)
    inp = _prepare_inputs(q, k, v, scale=scale, bias=bias, allowed=allowed, keep=keep,
                          dropout_p=dropout_p, masked_rows=masked_rows, plan=plan,
                          mods=mods, alibi_slopes=alibi_slopes, mask_mod=mask_mod, xp=xp)
    _probe_mods(mods, mask_mod, plan, q, xp)
    rows_shape = (*plan.batch, plan.H, plan.L)
    lse_rows = xp.broadcast_to(_pad_rank(lse, n - 1, xp), rows_shape)
    saved = _Saved(
        grad_out=xp.broadcast_to(_pad_rank(grad_out, n, xp), (*rows_shape, plan.Ev)),
        out=xp.broadcast_to(_pad_rank(out, n, xp), (*rows_shape, plan.Ev)),
        lse=lse_rows, any_masked=bool(xp.any(lse_rows == -xp.inf)),
    )
    batches = _batch_indices(plan)

    # One item per (batch index, head unit, key chunk). A unit is the smallest run of
    # query heads holding whole key-head and value-head groups. The keys are cut into
    # chunks (on the key-block grid) only when there are fewer than _MIN_ITEMS units:
    # chunks share dQ, summed in chunk order. The cut depends on the shapes alone.
    unit = math.lcm(plan.heads_per_k, plan.heads_per_v)
    key_blocks = -(-plan.S // plan.block_s)
    units = len(batches) * (plan.H // unit)
    chunks = min(key_blocks, max(1, -(-_MIN_ITEMS // units)))
    chunk = -(-key_blocks // chunks) * plan.block_s
    items = list(itertools.product(batches, range(plan.H // unit), range(0, plan.S, chunk)))
    sums = {
        "dq": _OrderedSum(grads[0], [(_batch_index(inp.q, b), u) for b, u, _ in items]),
        "dk": _OrderedSum(grads[1], [(_batch_index(inp.k, b), u, c) for b, u, c in items]),
        "dv": _OrderedSum(grads[2], [(_batch_index(inp.v, b), u, c) for b, u, c in items]),
    }
    if dbias is not None:
        sums["dbias"] = _OrderedSum(dbias, [
            _hashable(_unit_region(dbias, b, plan, slice(u * unit, (u + 1) * unit), c,
                                   min(c + chunk, plan.S)))
            for b, u, c in items
        ])
    _run_items(
        items, lambda i, item: _backward_item(inp, plan, saved, scale, unit, chunk, sums, i, item),
        num_threads, list(sums.values()),
    )
    return result()
