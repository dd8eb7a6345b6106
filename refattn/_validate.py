"""Shape, dtype and option checks with exact, actionable messages.

Every check names the argument, what it saw and what it expected, so that a user
feeding a test harness finds the mistake from the message alone. Nothing here looks
at array values except where a rule is about values (dropout_p, scale).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._types import ALIGNMENTS

__all__ = [
    "AttentionShapes",
    "ProblemSizes",
    "broadcast_shapes",
    "check_alignment",
    "check_broadcastable",
    "check_choice",
    "check_dropout_p",
    "check_one_dtype",
    "check_qkv",
    "check_scale",
    "check_softcap",
]


def broadcast_shapes(*shapes: Sequence[int]) -> tuple[int, ...]:
    """Broadcast shapes by NumPy's rules; raise ValueError naming the clash."""
    ndim = max((len(s) for s in shapes), default=0)
    result = []
    for axis in range(-ndim, 0):
        sizes = {s[axis] for s in shapes if len(s) >= -axis and s[axis] != 1}
        if len(sizes) > 1:
            raise ValueError(f"shapes {', '.join(map(str, map(tuple, shapes)))} do not broadcast")
        result.append(sizes.pop() if sizes else 1)
    return tuple(result)


@dataclass(frozen=True)
class ProblemSizes:
    """Sizes of one attention problem, in the shape legend of the docs.

    ``batch`` is a tuple of leading dims (possibly empty); K and Kv divide H. The base of
    :class:`AttentionShapes` (the checked sizes of a call) and of
    ``refattn.testing.strategies.Shape`` (drawn sizes).

    Examples
    --------
    >>> sizes = ProblemSizes(batch=(2,), H=4, K=2, Kv=2, L=3, S=5, E=8, Ev=6)
    >>> sizes.scores, sizes.batched(sizes.K, sizes.S, sizes.E)
    ((2, 4, 3, 5), (2, 2, 5, 8))
    """

    batch: tuple[int, ...]
    H: int
    K: int
    Kv: int
    L: int
    S: int
    E: int
    Ev: int

    def batched(self, *dims: int) -> tuple[int, ...]:
        """The shape ``(*batch, *dims)``."""
        return (*self.batch, *dims)

    @property
    def scores(self) -> tuple[int, ...]:
        """Shape of the full score matrix (*batch, H, L, S)."""
        return self.batched(self.H, self.L, self.S)


@dataclass(frozen=True)
class AttentionShapes(ProblemSizes):
    """The sizes of one attention call, as :func:`check_qkv` finds them.

    ``batch`` is the broadcast of the leading dims of q, k and v; ``ndim`` the rank of
    the output (the largest input rank, at least 2; rank 2 means there is no head axis).
    """

    ndim: int

    @property
    def out(self) -> tuple[int, ...]:
        """Shape of the output as returned to the user."""
        full = self.batched(self.H, self.L, self.Ev)
        return full[-self.ndim:] if self.ndim >= 3 else (self.L, self.Ev)

    @property
    def user_scores(self) -> tuple[int, ...]:
        """Shape of the weights as returned to the user (rank follows the output)."""
        return self.scores[-self.ndim:] if self.ndim >= 3 else (self.L, self.S)


def _heads(x: Any) -> int:
    return x.shape[-3] if x.ndim >= 3 else 1


def _shown(x: Any, layout: str) -> tuple[int, ...]:
    # Shapes in messages are the user's, in the user's layout (the check runs on BHLD).
    shape = tuple(x.shape)
    if layout == "BLHD" and len(shape) >= 3:
        shape = (*shape[:-3], shape[-2], shape[-3], shape[-1])
    return shape


def check_one_dtype(named: Mapping[str, Any]) -> Any:
    """The one dtype of the named arrays (None entries skipped); TypeError naming each
    array's dtype when they differ.

    Front-ends that widen 16-bit inputs call it before widening, so that a mismatch is
    seen as the user gave it.

    Examples
    --------
    >>> import numpy as np
    >>> check_one_dtype({"q": np.ones(2, np.float16), "k": np.ones(2), "v": None})
    Traceback (most recent call last):
    ...
    TypeError: q and k must share one dtype; got q float16, k float64
    """
    given = {name: x for name, x in named.items() if x is not None}
    dtypes = [x.dtype for x in given.values()]
    if len(dtypes) == 3 and dtypes[0] == dtypes[1] == dtypes[2]:
        return dtypes[0]  # the common case (q, k, v of one dtype), without the generic test
    if any(d != dtypes[0] for d in dtypes[1:]):
        names = list(given)
        listed = f"{', '.join(names[:-1])} and {names[-1]}"
        raise TypeError(
            f"{listed} must share one dtype; got "
            f"{', '.join(f'{name} {x.dtype}' for name, x in given.items())}"
        )
    return dtypes[0] if dtypes else None


def check_qkv(q: Any, k: Any, v: Any, *, layout: str = "BHLD") -> AttentionShapes:
    """Check q (..., H, L, E), k (..., K, S, E), v (..., Kv, S, Ev) against each other.

    The arrays arrive with heads on axis -3; ``layout`` only says how to show shapes.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim < 2:
            raise ValueError(
                f"{name} must be at least 2-D (..., L or S, head dim); got shape "
                f"{_shown(x, layout)}"
            )
    check_one_dtype({"q": q, "k": k, "v": v})
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"k's head dim E must equal q's: q has shape {_shown(q, layout)} (E={q.shape[-1]}), "
            f"k has shape {_shown(k, layout)} (E={k.shape[-1]})"
        )
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(
            f"v must have as many positions S as k: k has shape {_shown(k, layout)} "
            f"(S={k.shape[-2]}), v has shape {_shown(v, layout)} (S={v.shape[-2]})"
        )
    H, K, Kv = _heads(q), _heads(k), _heads(v)
    for name, n in (("k", K), ("v", Kv)):
        # No heads at all (H = K = Kv = 0) is an empty problem, as in torch; otherwise
        # each key / value head serves H // n query heads.
        if (n == 0 and H != 0) or (n != 0 and H % n):
            raise ValueError(
                f"{name}'s head count must divide q's (grouped-query attention): q has "
                f"H={H} heads, {name} has {n} (shapes q {_shown(q, layout)}, "
                f"{name} {_shown(k if name == 'k' else v, layout)})"
            )
    lead = tuple(q.shape[:-3])
    try:
        # The common case (one batch shape for all three) needs no broadcasting rules.
        batch = lead if lead == tuple(k.shape[:-3]) == tuple(v.shape[:-3]) else (
            broadcast_shapes(lead, tuple(k.shape[:-3]), tuple(v.shape[:-3])))
    except ValueError:
        raise ValueError(
            "the leading (batch) dims of q, k and v must broadcast; got shapes "
            f"q {_shown(q, layout)}, k {_shown(k, layout)}, v {_shown(v, layout)}"
        ) from None
    return AttentionShapes(
        batch=batch, H=H, K=K, Kv=Kv, L=q.shape[-2], S=k.shape[-2], E=q.shape[-1],
        Ev=v.shape[-1], ndim=max(q.ndim, k.ndim, v.ndim),
    )


def check_broadcastable(name: str, x: Any, target: tuple[int, ...], legend: str) -> None:
    """Raise ValueError unless ``x`` broadcasts to ``target`` without growing it."""
    shape = tuple(x.shape)
    ok = len(shape) <= len(target) and all(
        s in (1, t) for s, t in zip(shape[::-1], target[::-1], strict=False)
    )
    if not ok:
        raise ValueError(
            f"{name} of shape {shape} does not broadcast to the score shape {target} {legend}"
        )


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise ValueError unless ``value`` is one of ``choices``."""
    if (value is None or type(value) is str) and value in choices:
        return  # the common case, without the general test's generator
    if not any(value is c or (isinstance(value, str) and value == c) for c in choices):
        shown = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {shown}; got {value!r}")


def check_alignment(alignment: Any) -> None:
    """Validate the causal/window alignment name."""
    check_choice("alignment", alignment, ALIGNMENTS)


def _real_number(name: str, value: Any) -> float:
    if type(value) is float or type(value) is int:
        return float(value)  # the common case: no isinstance test against the ABC
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__} {value!r}")
    return float(value)


def check_scale(scale: Any, E: int) -> float:
    """Return the softmax scale: ``1/sqrt(E)`` for None, else a finite real number."""
    if scale is None:
        # E == 0 would divide by zero; the scores are then all 0 whatever the scale.
        return 1.0 / math.sqrt(E) if E > 0 else 1.0
    value = _real_number("scale", scale)
    if not math.isfinite(value):
        raise ValueError(
            f"scale must be finite (zero and negative values are allowed); got {value}"
        )
    return value


def check_dropout_p(dropout_p: Any) -> float:
    """Return ``dropout_p`` as a float in [0, 1]."""
    value = _real_number("dropout_p", dropout_p)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1]; got {value}")
    return value


def check_softcap(softcap: Any) -> float | None:
    """Return ``softcap`` as a positive finite float, or None (no softcap) for None.

    Examples
    --------
    >>> check_softcap(30), check_softcap(None)
    (30.0, None)
    >>> check_softcap(0.0)
    Traceback (most recent call last):
    ...
    ValueError: softcap must be positive and finite (None turns it off); got 0.0
    """
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a positive real number or None; got {softcap!r}")
    value = float(softcap)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"softcap must be positive and finite (None turns it off); got {value}"
        )
    return value
