"""The dropout keep-mask: taken as given or drawn on the host, never silently.

The oracle draws no random numbers unless asked: dropout needs an explicit boolean
keep-mask, or a seed / ``numpy.random.Generator`` that it draws one with, with NumPy on
the host at the full (..., H, L, S) score shape, so that every backend and kernel sees the
same mask.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from . import _validate
from ._types import Array, Device, Namespace

__all__ = ["as_generator", "draw_keep_mask", "resolve_keep"]


def draw_keep_mask(rng: Any, dropout_p: float, shape: tuple[int, ...]) -> np.ndarray:
    """A NumPy keep-mask of ``shape``: True (kept) with probability 1 - dropout_p.

    Examples
    --------
    >>> draw_keep_mask(0, 0.5, (2, 3)).shape
    (2, 3)
    >>> bool(np.array_equal(draw_keep_mask(7, 0.5, (4,)),
    ...                     draw_keep_mask(np.random.default_rng(7), 0.5, (4,))))
    True
    """
    return as_generator("rng", rng).random(shape) >= dropout_p


def as_generator(name: str, seed: Any) -> np.random.Generator:
    """``seed`` as a NumPy Generator: itself, or ``default_rng`` of a non-negative int.

    Examples
    --------
    >>> as_generator("rng", -1)
    Traceback (most recent call last):
    ...
    ValueError: rng must be a non-negative int seed or a numpy.random.Generator; got -1
    """
    if isinstance(seed, np.random.Generator):
        return seed
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise TypeError(
            f"{name} must be an int seed or a numpy.random.Generator; got {seed!r}")
    if seed < 0:
        # NumPy's own message ("expected non-negative integer") names no argument.
        raise ValueError(
            f"{name} must be a non-negative int seed or a numpy.random.Generator; got "
            f"{int(seed)}")
    return np.random.default_rng(int(seed))


def resolve_keep(dropout_p: float, dropout_mask: Any, rng: Any, *,
                 shapes: _validate.AttentionShapes, legend: str, xp: Namespace,
                 device: Device) -> Array | None:
    """The keep-mask of a call: None without dropout, else the given or drawn mask.

    ``dropout_p`` is already checked. Refuses a mask or seed without dropout, dropout
    without either, both at once, a non-boolean mask, and ``dropout_p=1`` with a mask
    that keeps something.
    """
    if dropout_p == 0.0:
        if dropout_mask is not None or rng is not None:
            raise ValueError(
                "dropout_mask or rng given but dropout_p is 0; set dropout_p to the "
                "probability the mask was drawn with"
            )
        return None
    if dropout_mask is None and rng is None:
        raise ValueError(
            f"dropout_p={dropout_p} needs an explicit dropout_mask (bool, True = keep) or "
            "an rng (int seed or numpy.random.Generator): the oracle never draws random "
            "numbers silently"
        )
    if dropout_mask is not None and rng is not None:
        raise ValueError("give dropout_mask or rng, not both")
    if dropout_mask is not None:
        if not xp.isdtype(dropout_mask.dtype, "bool"):
            raise TypeError(
                f"dropout_mask must be a boolean array (True = keep); got dtype "
                f"{dropout_mask.dtype}"
            )
        _validate.check_broadcastable("dropout_mask", dropout_mask, shapes.scores, legend)
        keep = dropout_mask
    else:
        keep = xp.asarray(draw_keep_mask(rng, dropout_p, shapes.user_scores), device=device)
    if dropout_p == 1.0 and bool(xp.any(keep)):
        raise ValueError(
            "dropout_p=1 drops every weight, but dropout_mask keeps some; "
            "use a mask of all False or a smaller dropout_p"
        )
    return keep
