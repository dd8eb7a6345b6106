"""The forward entry point: ``blocked_attention``.

It prepares the inputs once (the columns of ones where they pay, the zero-shift
decision) and runs one work item per (batch index, head group, query block); the online
softmax of each item is ``_online``'s.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import TYPE_CHECKING

from ..._results import AttentionResult
from ..._types import Namespace
from .._qv import fold_qv
from .._softmax import join_sinks
from ._bounds import _zero_shift_everywhere
from ._inputs import _Inputs, _ones_appended, _prepare_inputs
from ._items import _run_items
from ._nonfinite import screen
from ._online import _forward_item
from ._plan import _batch_indices, _make_plan, _Plan, _query_starts

if TYPE_CHECKING:
    from ..._problem import AttentionProblem

__all__ = ["blocked_attention"]


def blocked_attention(problem: AttentionProblem, *, return_weights: bool = False,
                      block_l: int | None = None, block_s: int | None = None,
                      num_threads: int = 1) -> AttentionResult:
    """Attention by online softmax over key blocks, with bounded extra memory.

    The contract of ``direct_attention``. The problem's window arrives as edges, not as
    an (L, S) mask (its right edge a moved causal diagonal, its left edge a lower one),
    so that the key blocks no row of a query block may attend are skipped; the user's
    mask, bias, ALiBi slopes, mask_mod and keep-mask are sliced or evaluated per block.

    Parameters
    ----------
    problem
        The attention problem (``refattn._problem``).
    return_weights
        Also return the (..., H, L, S) probabilities. They need L x S memory anyway;
        they are filled in block by block from each row's final max and sum.
    block_l, block_s
        Query rows (per head) and keys per block; ``choose_blocks`` when None.
    num_threads
        Work items (batch index, head group, query block) run on this many threads.
        The result does not depend on it.

    Returns
    -------
    AttentionResult
        ``out`` (..., H, L, Ev), ``lse`` (..., H, L), ``weights`` or None.
    """
    xp = problem.xp
    if problem.qv is not None:
        return blocked_attention(fold_qv(problem), return_weights=return_weights,
                                 block_l=block_l, block_s=block_s, num_threads=num_threads)
    if problem.sinks is not None:
        # The online softmax runs without the sinks, which then scale each row
        # (``join_sinks``): one more term of the denominator, with no value.
        res = blocked_attention(replace(problem, sinks=None), return_weights=return_weights,
                                block_l=block_l, block_s=block_s, num_threads=num_threads)
        out, lse, weights = join_sinks(res.out, res.lse, res.weights, problem.sinks, xp=xp)
        return AttentionResult(out=out, lse=lse, weights=weights)
    plan = _make_plan(problem, block_l=block_l, block_s=block_s)
    batch, H, L, S, Ev = plan.batch, plan.H, plan.L, plan.S, plan.Ev
    dtype, device = problem.q.dtype, problem.q.device
    weights = None
    if return_weights:
        weights = xp.zeros((*batch, H, L, S), dtype=dtype, device=device)
    if plan.empty:
        # No keys: every row is fully masked, and its (empty) weights meet no value, so
        # the output is 0 whatever the policy, as in the direct path. Without rows
        # (a zero-size batch dim, H or L) the results are empty.
        return AttentionResult(
            out=xp.zeros((*batch, H, L, Ev), dtype=dtype, device=device),
            lse=xp.full((*batch, H, L), -xp.inf, dtype=dtype, device=device),
            weights=weights,
        )
    prepared = _prepare_inputs(problem, plan)
    found = screen(prepared, plan)
    inp = _with_columns(prepared, plan, xp)
    res = AttentionResult(
        out=xp.empty((*batch, H, L, Ev), dtype=dtype, device=device),
        lse=xp.empty((*batch, H, L), dtype=dtype, device=device), weights=weights,
    )
    items = list(itertools.product(_batch_indices(plan), range(H // plan.group),
                                   _query_starts(plan)))
    _run_items(items, lambda i, item: _forward_item(inp, plan, res, item, found), num_threads)
    return res


def _with_columns(inp: _Inputs, plan: _Plan, xp: Namespace) -> _Inputs:
    """The forward's inputs: the zero-shift decision, and K and V with their columns of
    ones where they pay.

    A shift is folded into the products (K gets its column of ones) where a query
    block sees more than one key span, or a masked one, unless every row of every
    item can do without a shift (_forward_item): then no item needs the copy. V gets
    its column of ones (row sums out of P @ [V, 1]) where several query blocks share
    each head's keys and so amortise the copy; with a single query block per head the
    row sums of the blocks cost less than the serial copy.
    """
    zero_shift = _zero_shift_everywhere(inp, plan)
    fold_shift = (plan.causal or plan.low is not None or plan.S > plan.block_s
                  ) and not zero_shift
    sums_in_product = inp.keep is None and plan.L > plan.block_l
    return replace(inp, zero_shift=zero_shift,
                   k=_ones_appended(inp.k, xp) if fold_shift else inp.k,
                   v=_ones_appended(inp.v, xp) if sums_in_product else inp.v)
