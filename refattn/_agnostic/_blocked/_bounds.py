"""Score bounds: how far from 0 the scores of some rows can be, and what that allows.

|scale q_i . k_j| <= |scale| ||q_i|| max_j ||k_j|| (Cauchy-Schwarz), capped by softcap,
plus the bias range (ALiBi included) bounds every score without computing it. The
forward uses the bounds to skip max passes and rescalings, or any shift at all (the
zero-shift decision); the backward to exponentiate hidden scores without overflow.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from ..._types import Array, Namespace
from ._inputs import _Inputs, _Rows
from ._items import _batch_index, squared_row_norms
from ._plan import _Plan


class _Range(NamedTuple):
    """Every score of some rows lies in [lower, upper]."""

    lower: float
    upper: float


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


def _with_bias(inp: _Inputs, cs: float | None) -> _Range | None:
    """The scores' range from a bound ``cs`` on |score - bias| (``_capped``) and the
    bias range; None when either is unbounded."""
    if cs is None or inp.bias_max is None:
        return None
    return _Range(lower=inp.bias_min - cs, upper=cs + inp.bias_max)


def _rows_range(inp: _Inputs, rows: _Rows, kh: int) -> _Range | None:
    """One range for every score of the rows, from the largest row norm times the
    largest key norm (``_capped``); None where ``_bounded`` is False."""
    if not _bounded(inp):
        return None
    if not rows.R:
        return _with_bias(inp, _capped(inp, 0.0))
    xp = inp.xp
    k_norm = float(inp.k_norm[(*_batch_index(inp.k_norm, rows.b), kh)])
    cs = math.sqrt(float(xp.max(squared_row_norms(rows.q, xp)))) * k_norm
    return _with_bias(inp, _capped(inp, cs))


def _score_bounds(inp: _Inputs, rows: _Rows, kh: int) -> tuple[Array, Array] | None:
    """(R,) upper and lower bounds of the rows' scores, or None if there are none.

    |scale q_i . k_j| <= |scale| ||q_i|| max_j ||k_j|| (Cauchy-Schwarz; and <= softcap
    after the cap), plus the largest (smallest) bias entry, ALiBi's rise with a negative
    slope (fall with a positive one) included; masks only remove scores. A score_mod
    leaves no bound. NaN or infinite inputs make the bounds NaN or infinite, which never
    pass the tests they serve, so those rows always take the checked way.
    """
    xp = inp.xp
    if not _bounded(inp) or inp.bias_max is None:
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

    def __init__(self, inp: _Inputs, rows: _Rows, kh: int) -> None:
        self._args = (inp, rows, kh)
        self._bounds: tuple[Array, Array] | None = None
        self._known = False

    def _get(self) -> tuple[Array, Array] | None:
        if not self._known:
            self._bounds, self._known = _score_bounds(*self._args), True
        return self._bounds

    def within(self, shift: Array, limit: float) -> bool:
        """True when no score of the rows can exceed its shift by more than ``limit``."""
        bounds = self._get()
        inp = self._args[0]
        return bounds is not None and bool(inp.xp.all(bounds[0] - shift <= limit))

    def narrow(self, upper: float, lower: float) -> bool:
        """True when every score of the rows lies in [lower, upper].

        Decided on the largest row norm alone (every row passes if that one does), in
        three array calls: this runs once per work item on every forward.
        """
        span = _rows_range(*self._args)
        return span is not None and span.upper <= upper and span.lower >= lower


def _shift_free_range(dtype: Any, S: int, xp: Namespace) -> tuple[float, float]:
    """``(upper, lower)``: the range scores may span for the forward to take no shift at
    all: exp of the upper end times S stays below the largest float, exp of the lower
    end is a normal number far from underflow (e^-354 in float64, e^-43 in float32), so
    that terms below it that underflow are negligible next to each row's largest."""
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
    q_norm = math.sqrt(float(xp.max(squared_row_norms(inp.q, xp)))) * abs(inp.scale)
    span = _with_bias(inp, _capped(inp, q_norm * float(xp.max(inp.k_norm))))
    if span is None:
        return False
    upper, lower = _shift_free_range(inp.q.dtype, plan.S, xp)
    return span.upper <= upper - 1.0 and span.lower >= lower + 1.0
