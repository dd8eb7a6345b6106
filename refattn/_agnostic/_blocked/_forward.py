"""The forward entry point: ``blocked_attention``.

It prepares the inputs once (the columns of ones where they pay, the zero-shift
decision) and runs one work item per (batch index, head group, query block); the online
softmax of each item is ``_online``'s.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

from ..._types import Namespace
from .._direct import DirectResult
from .._scores import ScoreMods
from ._bounds import _zero_shift_everywhere
from ._inputs import _Inputs, _ones_appended, _prepare_inputs
from ._items import _run_items
from ._online import _forward_item
from ._plan import _batch_indices, _make_plan, _Plan, _query_starts

__all__ = ["blocked_attention"]


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
    inp = _with_columns(_prepare_inputs(
        q, k, v, scale=scale, bias=bias, allowed=allowed, keep=keep, dropout_p=dropout_p,
        masked_rows=masked_rows, plan=plan, mods=mods, alibi_slopes=alibi_slopes,
        mask_mod=mask_mod, xp=xp), plan, xp)
    res = DirectResult(
        out=xp.empty((*batch, H, L, Ev), dtype=dtype, device=device),
        lse=xp.empty((*batch, H, L), dtype=dtype, device=device), weights=weights,
    )
    items = list(itertools.product(_batch_indices(plan), range(H // plan.group),
                                   _query_starts(plan)))
    _run_items(items, lambda i, item: _forward_item(inp, plan, res, item), num_threads)
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
