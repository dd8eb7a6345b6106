"""Planning: block sizes, the key spans and query blocks each work item visits, the plan.

Everything here depends on the shapes only, never on the machine or the thread count,
so that the work items, and with them every bit of the result, are the same everywhere.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ..._window import chunk_span
from .._direct import group_size

if TYPE_CHECKING:
    from ..._problem import AttentionProblem

__all__ = [
    "SCORE_BLOCK_ELEMENTS",
    "Span",
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


@dataclass(frozen=True)
class Span:
    """A range [start, stop) of keys (``key_spans``) or of query rows (``query_blocks``).

    ``masked`` is True when the causal diagonal (or a window's lower edge) crosses the
    block, so some query of it may not attend some key of it and the positional mask
    must be applied.
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
    low: int | None = None, chunk: int | None = None, position_shift: int = 0,
) -> list[Span]:
    """Key spans visited by query rows [start, stop), in order.

    Keys are cut at multiples of ``block_s``. With ``causal``, row i may attend keys
    j <= i + shift: unless ``skip`` is False, keys past the last row's diagonal are not
    visited, and the keys every row sees (up to the first row's diagonal) are cut apart
    from the rest, so that only the triangle under the diagonal is ``masked`` (needs the
    positional mask). A lower edge ``low`` (a window's left edge: row i may attend keys
    j >= i + low) drops, unless ``skip`` is False, the spans below the first row's edge
    and marks ``masked`` the spans the edge crosses. With ``chunk`` (chunked local
    attention, rows at key positions ``i + position_shift``), unless ``skip`` is False,
    the spans outside the chunks of rows [start, stop) are dropped; the chunk mask
    itself is applied on every visited block (``_block_scores._raw_scores``).
    """
    spans = _upper_spans(start, stop, S, block_s, causal=causal, shift=shift, skip=skip)
    if chunk is not None and skip and stop > start:
        lo = chunk_span(start + position_shift, chunk)[0]
        hi = chunk_span(stop - 1 + position_shift, chunk)[1]
        spans = [span for span in spans if span.stop > lo and span.start < hi]
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
) -> list[Span]:
    # key_spans for the causal diagonal (the window's right edge) alone.
    if not causal:
        return [Span(s0, min(s0 + block_s, S), False) for s0 in range(0, S, block_s)]
    end = max(0, min(S, stop + shift)) if skip else S
    seen_by_all = max(0, min(end, start + shift + 1))
    # A sliver of fully visible keys before the triangle costs more as its own product
    # than as masked columns of the triangle's.
    cut = seen_by_all - seen_by_all % block_s
    if end > seen_by_all and seen_by_all - cut < block_s // 4:
        seen_by_all = cut
    spans = [Span(s0, min(s0 + block_s, seen_by_all), False)
             for s0 in range(0, seen_by_all, block_s)]
    spans += [Span(s0, min(s0 + block_s, end), True)
              for s0 in range(seen_by_all, end, block_s)]
    return spans


def query_blocks(
    start: int, stop: int, L: int, block_l: int, *, causal: bool, shift: int, skip: bool = True,
    low: int | None = None, chunk: int | None = None, position_shift: int = 0,
) -> list[Span]:
    """Query blocks (on the grid of ``block_l``) that see keys [start, stop), in order.

    The transpose of ``key_spans``: with ``causal`` (and ``skip``), blocks whose last row
    sees no key of the span are not visited; with a lower edge ``low``, blocks whose
    first row sees none either; with ``chunk``, blocks whose chunks miss the span.
    """
    first = 0
    if causal and skip:
        # The first row that sees key ``start``, rounded down to the grid.
        first = max(0, start - shift)
        first = L if first >= L else first // block_l * block_l
    blocks = []
    for l0 in range(first, L, block_l):
        l1 = min(l0 + block_l, L)
        if chunk is not None and skip and (
                chunk_span(l1 - 1 + position_shift, chunk)[1] <= start
                or chunk_span(l0 + position_shift, chunk)[0] >= stop):
            continue  # every row's chunk misses the span
        masked = causal and stop - 1 > l0 + shift
        if low is not None:
            if skip and l0 + low > stop - 1:
                break  # this block's first row, and every later row, is past the span
            masked = masked or l1 - 1 + low > start
        blocks.append(Span(l0, l1, masked))
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
    chunk: int | None = None  # chunked local attention's chunk length, or None

    @property
    def ndim(self) -> int:
        return len(self.batch) + 3

    @property
    def empty(self) -> bool:
        """No score to compute: a zero-size batch dim, no heads, no queries or no keys.

        The paths then return their results without a work item (and without the
        reductions over the inputs that bound the scores, which have no identity)."""
        return self.L == 0 or self.S == 0 or self.H == 0 or 0 in self.batch


def _make_plan(problem: AttentionProblem, *, block_l: int | None, block_s: int | None,
               backward: bool = False) -> _Plan:
    """The blocks of ``problem``: the window's right edge as a (moved) causal diagonal and
    its left edge as a lower one, both skipping the blocks they hide."""
    q, k, v = problem.q, problem.k, problem.v
    H, L, E = q.shape[-3:]
    S, Ev = k.shape[-2], v.shape[-1]
    heads_per_k, heads_per_v = group_size(H, k.shape[-3]), group_size(H, v.shape[-3])
    group = math.gcd(heads_per_k, heads_per_v)
    auto_l, auto_s = choose_blocks(L, S, group, backward=backward)
    left, right = (None, None) if problem.window is None else (problem.window.left,
                                                               problem.window.right)
    shift = problem.shift
    return _Plan(
        batch=problem.shapes.batch, H=H, L=L, S=S,
        E=E, Ev=Ev, group=group, heads_per_k=heads_per_k, heads_per_v=heads_per_v,
        block_l=auto_l if block_l is None else block_l,
        block_s=auto_s if block_s is None else block_s, causal=right is not None,
        shift=0 if right is None else shift + right, skip=True,
        low=None if left is None else shift - left, position_shift=shift,
        chunk=problem.attention_chunk,
    )


def _batch_indices(plan: _Plan) -> list[tuple[int, ...]]:
    return list(itertools.product(*map(range, plan.batch)))


def _query_starts(plan: _Plan) -> list[int]:
    starts = list(range(0, plan.L, plan.block_l))
    # With a causal mask later query blocks see more keys; running them first evens out
    # the threads' loads at the end.
    return starts[::-1] if plan.causal else starts
