"""NaN and infinity in the inputs: the direct path's rule on the blocks that are skipped.

docs/semantics.rst ("Non-finite values") states the rule: the formula is evaluated over
every (query, key) pair, masked or not, as torch's math backend does, so

* a score that is NaN or +inf *before* the masks makes its whole row NaN (masks are
  added as -inf, and NaN - inf and inf - inf are NaN);
* the product with V runs over every key with the masked ones at weight 0, so a NaN or
  infinite ``v[j, c]`` makes column c of every output row non-finite (0 * inf is NaN).

The online softmax never sees the key blocks a mask hides entirely, and inside a
visited block it selects the visible scores rather than adding -inf, so neither effect
happens by itself. This module restores both, for the price of one finiteness pass over
Q, K and V per call (O((L + S) E), against the O(L S E) of the products): when every
entry is finite (and the bias has no NaN or +inf, and no score can overflow) nothing
more is done. Otherwise each work item evaluates exactly the pre-mask scores that could
be NaN or +inf (the keys with a non-finite entry, or every key for rows with a
non-finite query, bias or a possible overflow) and scans the values it skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..._arrays import all_finite
from ..._types import Array, Namespace
from ._block_scores import _raw_scores
from ._inputs import _Inputs, _Rows
from ._items import squared_row_norms
from ._plan import Span, _Plan


@dataclass(frozen=True)
class _Screen:
    """What the one pass over the inputs found (``screen``); all False: nothing to do."""

    q: bool  # some query entry is NaN or infinite
    k: bool  # some key entry is
    v: bool  # some value entry is
    bias: bool  # the bias (ALiBi included) has a NaN or +inf entry
    overflow: bool  # finite inputs whose scores may still overflow to +inf

    @property
    def scores(self) -> bool:
        """Some pre-mask score may be NaN or +inf."""
        return self.q or self.k or self.bias or self.overflow


def _largest_norm(x: Array, xp: Namespace) -> float:
    """max ||x_i|| over the rows of x (inf when the squares overflow, NaN with a NaN)."""
    if not math.prod(x.shape):
        return 0.0
    return math.sqrt(float(xp.max(squared_row_norms(x, xp))))


def screen(inp: _Inputs, plan: _Plan) -> _Screen:
    """One pass over Q, K and V, and the score bound's overflow test.

    A finite largest row norm proves every entry finite (a sum of squares with a NaN
    or an inf in it is not finite), so the common case costs one dot product per row
    (K's norms are those the online softmax bounds its scores with); only a norm that
    is not finite takes an ``isfinite`` pass to tell a non-finite entry from squares
    that overflow.

    Overflow: |scale q . k| <= |scale| max ||q_i|| max ||k_j|| (Cauchy-Schwarz; the
    rounded sum of E products exceeds the exact one by a relative E u at most); with
    the largest bias entry added, a bound below half the largest float proves that no
    score overflows, nor ``scale q`` (the blocked path scales the query rows first).
    Otherwise (and with norms that overflow) the scores are evaluated where it matters
    (``poisoned_rows``). softcap bounds every score by the cap; a score_mod's own values
    are its own (the online softmax's bounds ignore them too).
    """
    xp = inp.xp
    q, v = inp.q, inp.v[..., :plan.Ev]
    qn = _largest_norm(q, xp)
    kn = float(xp.max(inp.k_norm)) if math.prod(inp.k_norm.shape) else 0.0
    q_bad = not qn < math.inf and not all_finite(xp, q)
    k_bad = not kn < math.inf and not all_finite(xp, inp.k[..., :plan.E])
    v_bad = not _largest_norm(v, xp) < math.inf and not all_finite(xp, v)
    top = float(xp.finfo(q.dtype).max)
    eps = float(xp.finfo(q.dtype).eps)
    bound = abs(inp.scale) * qn * kn * (1.0 + 2.0 * plan.E * eps)
    if inp.mods is not None and inp.mods.softcap is not None:
        bound = min(bound, inp.mods.softcap)
    bias = 0.0 if inp.bias_max is None else max(inp.bias_max, 0.0)
    overflow = not (bound + bias < top / 2 and abs(inp.scale) * qn < top / 2)
    return _Screen(q=q_bad, k=k_bad, v=v_bad, bias=inp.bias_max is None,
                   overflow=overflow and not (q_bad or k_bad))


def _runs(flags: list[bool], limit: int) -> list[tuple[int, int]]:
    """The runs [start, stop) of True in ``flags``, cut to at most ``limit`` long."""
    runs: list[tuple[int, int]] = []
    start = None
    for i, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = i
        if start is not None and (not flag or i - start == limit):
            runs.append((start, i))
            start = i if flag else None
    return runs


def poisoned_rows(inp: _Inputs, plan: _Plan, rows: _Rows, k: Array, found: _Screen
                  ) -> Array | None:
    """(R,) True on the rows with a NaN or +inf pre-mask score at some key, or None.

    The scores are evaluated as the visited blocks evaluate them (``_raw_scores``, no
    mask), on every key for rows whose query or bias entries are not all finite (or
    may overflow), on the keys with a non-finite entry otherwise.
    """
    if not found.scores:
        return None
    xp = inp.xp
    every = found.overflow or (found.q and not bool(xp.all(xp.isfinite(rows.q))))
    if found.bias and not every:
        every = rows.bias is not None and not bool(xp.all(
            xp.logical_or(xp.isfinite(rows.bias), rows.bias == -math.inf)))
    if every:
        ranges = [(s0, min(s0 + plan.block_s, plan.S)) for s0 in range(0, plan.S, plan.block_s)]
    elif found.k:
        bad = xp.logical_not(xp.all(xp.isfinite(k[:, :plan.E]), axis=1))
        ranges = _runs([bool(b) for b in bad], plan.block_s) if bool(xp.any(bad)) else []
    else:
        ranges = []
    poisoned = None
    for s0, s1 in ranges:
        scores, _ = _raw_scores(inp, plan, rows, rows.q, k, s0, s1, False)
        hit = xp.any(xp.logical_or(xp.isnan(scores), scores == math.inf), axis=1)
        poisoned = hit if poisoned is None else xp.logical_or(poisoned, hit)
    if poisoned is None or not bool(xp.any(poisoned)):
        return None
    return poisoned


def poisoned_columns(inp: _Inputs, plan: _Plan, v: Array, spans: list[Span], found: _Screen,
                     *, every: bool) -> Array | None:
    """(Ev,) True on the value columns with a non-finite entry at a key the item's
    products did not visit (every key when ``every``: dropout_p = 1), or None.

    The direct path multiplies those values by weight 0: 0 * NaN and 0 * inf are NaN.
    """
    if not found.v:
        return None
    xp = inp.xp
    visited = [] if every else [(span.start, span.stop) for span in spans]
    skipped, at = [], 0
    for s0, s1 in sorted(visited):
        if s0 > at:
            skipped.append((at, s0))
        at = max(at, s1)
    if at < plan.S:
        skipped.append((at, plan.S))
    columns = None
    for s0, s1 in skipped:
        bad = xp.logical_not(xp.all(xp.isfinite(v[s0:s1, :plan.Ev]), axis=0))
        columns = bad if columns is None else xp.logical_or(columns, bad)
    if columns is None or not bool(xp.any(columns)):
        return None
    return columns


def backward_screen(inp: _Inputs, plan: _Plan, grad_out: Array, out: Array, lse: Array
                    ) -> bool:
    """True when the backward must follow the direct path's non-finite rule.

    The direct backward (docs/semantics.rst, "Non-finite values") meets every
    (query, key) pair: a masked pair has weight 0 (NaN on a row whose LSE is NaN), and
    0 times the NaN or infinity of a key, a value, a query, dO or the output's
    rowsum(dO * O) is NaN in dQ, dK, dV and d bias. Only then does the blocked
    backward visit the blocks a mask hides; finite problems pay ``screen``'s pass over
    Q, K and V and one over dO, the output and the LSE (against the backward's
    O(L S E) products).
    """
    xp = inp.xp
    found = screen(inp, plan)
    # Scores that overflow to +inf need nothing more: they made their rows' LSE NaN
    # (the forward's ``poisoned_rows``), which the last test sees.
    if found.q or found.k or found.v or found.bias:
        return True
    if not all_finite(xp, grad_out, out):
        return True
    return bool(xp.any(xp.isnan(lse)))
