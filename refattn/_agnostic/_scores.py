"""The score transformations between the scaled product and the masks.

In docs/variants.rst's order, ``scale -> softcap -> bias (ALiBi folded in) -> score_mod ->
masks``. The direct path and its backward apply ``pre_mask_scores`` to the whole
(..., H, L, S) array; ``score_slopes`` gives the chain rule factors the backward needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["ScoreMods", "check_score_mod_result", "constant", "final_scores",
           "mod_for_grids", "pre_mask_scores", "score_slopes"]

#: 0-d constants by (namespace, value, dtype, device): the paths need a typed 0, 1, -inf
#: or NaN for ``where`` on every call, and ``xp.asarray`` costs microseconds each time.
#: Nothing writes into them (they are only ever read by ``where``).
_CONSTANTS: dict[tuple[Any, ...], Any] = {}


def constant(value: float, like: Any, *, xp: Any) -> Any:
    """A 0-d array holding ``value`` in the dtype and on the device of ``like``."""
    # NaN != NaN: keyed by a name, so that every NaN finds the same entry.
    key = (xp, value if value == value else "nan", like.dtype, like.device)
    try:
        return _CONSTANTS[key]
    except KeyError:
        made = xp.asarray(value, dtype=like.dtype, device=like.device)
        if len(_CONSTANTS) < 256:  # bounded whatever dtypes and devices a process sees
            _CONSTANTS[key] = made
        return made
    except TypeError:  # an unhashable dtype or device: made every time
        return xp.asarray(value, dtype=like.dtype, device=like.device)


def mod_for_grids(mod: Callable[..., Any], *, on_block: bool) -> Callable[..., Any]:
    """The callable to evaluate a score_mod or mask_mod with on these grids.

    A block's ``b`` grid holds one flat batch index and its ``h`` grid a run of heads,
    so a mod cannot check a table against the whole batch or every head there (the
    blocked path does that once, on whole grids, before the blocks). A mod may carry an
    ``on_block`` attribute: the variant the blocked path calls on a block's grids
    instead (the mods of ``refattn.mods`` that hold tables check only that the indices
    they see are in range there). Other mods are called as they are.
    """
    return getattr(mod, "on_block", mod) if on_block else mod


@dataclass(frozen=True)
class ScoreMods:
    """The non-additive score transformations: softcap and a score_mod with its grids."""

    softcap: float | None = None
    score_mod: Callable[..., Any] | None = None
    grids: tuple[Any, Any, Any, Any] | None = None
    #: True when ``grids`` are one block's (the blocked path): see ``mod_for_grids``.
    on_block: bool = False

    def call_score_mod(self, score: Any) -> Any:
        """``score_mod(score, *grids)`` with the variant these grids call for."""
        assert self.score_mod is not None and self.grids is not None
        return mod_for_grids(self.score_mod, on_block=self.on_block)(score, *self.grids)

    @property
    def active(self) -> bool:
        return self.softcap is not None or self.score_mod is not None


def check_score_mod_result(result: Any, score: Any, *, on_block: bool) -> Any:
    """``result`` if it has the shape of the ``score`` argument the mod was called with.

    A mod that broadcasts its result wider than the scores, or returns another shape,
    would otherwise surface as a matmul or broadcasting error far from its cause.
    """
    expected = tuple(score.shape)
    got = tuple(getattr(result, "shape", ()))
    if got != expected:
        where = ("on a block of scores" if on_block else "on the scores")
        hint = (" (the blocked path calls it once per block: write it elementwise in score, "
                "b, h, q_idx and kv_idx, as FlexAttention requires)" if on_block else
                " (write it elementwise in score, b, h, q_idx and kv_idx, as FlexAttention "
                "requires)")
        raise ValueError(
            f"score_mod must return an array of its score argument's shape; {where} of "
            f"shape {expected} it returned "
            f"{'shape ' + str(got) if hasattr(result, 'shape') else type(result).__name__}"
            f"{hint}"
        )
    return result


def pre_mask_scores(scaled: Any, *, bias: Any, mods: ScoreMods | None, xp: Any) -> Any:
    """softcap -> + bias -> score_mod on the scaled scores."""
    s = scaled
    if mods is not None and mods.softcap is not None:
        s = xp.tanh(s / mods.softcap) * mods.softcap
    if bias is not None:
        s = s + bias
    if mods is not None and mods.score_mod is not None:
        s = check_score_mod_result(mods.call_score_mod(s), s, on_block=mods.on_block)
        if getattr(s, "dtype", None) != scaled.dtype:
            raise TypeError(
                "score_mod must return an array of the scores' dtype "
                f"({scaled.dtype}); got {type(s).__name__} {getattr(s, 'dtype', '')}"
            )
    return s


def _fits_in(x: Any, target: Any) -> bool:
    # x broadcasts to target's shape without growing it: target can take x in place.
    return x.ndim <= target.ndim and all(
        a in (1, t) for a, t in zip(tuple(x.shape)[::-1], tuple(target.shape)[::-1],
                                    strict=False))


def final_scores(scaled: Any, *, bias: Any, allowed: Any, mods: ScoreMods | None,
                 xp: Any, owned: bool = False) -> Any:
    """``pre_mask_scores`` with the mask added as 0 / -inf.

    Added, not selected with ``where``, so that a NaN or +inf score at a masked position
    still poisons its row, exactly as torch's additive masks do. ``owned``: the caller
    gives ``scaled`` up (it was made for this call and is not read again), so the mask is
    added in place, saving a score-sized allocation; with a score_mod the scores may be
    the mod's own array, so they are never written into then.
    """
    scores = pre_mask_scores(scaled, bias=bias, mods=mods, xp=xp)
    if allowed is None:
        return scores
    additive = xp.where(allowed, constant(0.0, scores, xp=xp),
                        constant(-xp.inf, scores, xp=xp))
    if owned and (mods is None or mods.score_mod is None) and _fits_in(additive, scores):
        scores += additive  # the same sums as below, into an array of this call's own
        return scores
    return scores + additive


def score_slopes(scaled: Any, *, bias: Any, mods: ScoreMods, xp: Any) -> tuple[Any, Any]:
    """``(d final / d biased, d biased / d scaled)``: the score_mod and softcap slopes.

    A score_mod's slope comes from its ``derivative(score, b, h, q_idx, kv_idx)``
    attribute when it has one; otherwise the mod must be affine in the score, which is
    checked (a second difference that is not zero within rounding is an error).
    """
    one = xp.asarray(1.0, dtype=scaled.dtype, device=scaled.device)
    cap_slope: Any = one
    s = scaled
    if mods.softcap is not None:
        t = xp.tanh(s / mods.softcap)
        cap_slope = 1 - t * t
        s = t * mods.softcap
    if bias is not None:
        s = s + bias
    mod_slope: Any = one
    if mods.score_mod is not None:
        assert mods.grids is not None
        mod = mod_for_grids(mods.score_mod, on_block=mods.on_block)
        derivative = getattr(mod, "derivative", None)
        if derivative is not None:
            mod_slope = derivative(s, *mods.grids)
        else:
            mod_slope = _affine_slope(mod, s, mods.grids, xp=xp)
    return mod_slope, cap_slope


def _affine_slope(mod: Callable[..., Any], s: Any, grids: tuple[Any, ...], *, xp: Any) -> Any:
    # An affine mod a*s + c has slope f(s + 1) - f(s) everywhere; a third point tells a
    # non-affine mod, which is refused rather than differentiated wrongly.
    f0, f1, f2 = (mod(s + d, *grids) for d in (0.0, 1.0, 2.0))
    slope = f1 - f0
    curvature = xp.abs((f2 - f1) - slope)
    size = xp.abs(f0) + xp.abs(f1) + xp.abs(f2) + 1
    eps = xp.finfo(s.dtype).eps
    finite = xp.logical_and(xp.isfinite(f0), xp.isfinite(f2))
    if bool(xp.any(xp.logical_and(finite, curvature > 16 * eps * size))):
        raise ValueError(
            "the gradient through score_mod needs a mod affine in the score (a * score + "
            "c) or a `derivative(score, b, h, q_idx, kv_idx)` attribute giving d mod / "
            "d score; this score_mod has neither (the mods of refattn.mods carry theirs)"
        )
    return slope
