"""The size and array draws behind ``refattn.testing.strategies``.

Problem sizes (``Shape``, ``shapes``), the arrays of one problem (``qkv``, the masks),
sliding windows and packed offsets. Import them from ``refattn.testing.strategies``,
which re-exports every public name of this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from hypothesis import strategies as st

from .._validate import ProblemSizes

__all__ = [
    "Shape",
    "bool_masks",
    "cu_seqlens",
    "dropout_masks",
    "float_masks",
    "qkv",
    "shapes",
    "windows",
]


_DTYPES = ("float64", "float32", "float16", "bfloat16")
_LIBRARIES = ("numpy", "torch", "array_api_strict", "cupy")


@dataclass(frozen=True)
class Shape(ProblemSizes):
    """Sizes of one attention problem in the shape legend.

    ``batch`` is a tuple of leading dims (possibly empty); K and Kv divide H. ``scores``
    is ``(*batch, H, L, S)``; ``q``, ``k``, ``v`` and ``out`` are the arrays' shapes.
    """

    @property
    def q(self) -> tuple[int, ...]:
        return self.batched(self.H, self.L, self.E)

    @property
    def k(self) -> tuple[int, ...]:
        return self.batched(self.K, self.S, self.E)

    @property
    def v(self) -> tuple[int, ...]:
        return self.batched(self.Kv, self.S, self.Ev)

    @property
    def out(self) -> tuple[int, ...]:
        return self.batched(self.H, self.L, self.Ev)


def _check_range(name: str, lo: int, hi: int, minimum: int) -> None:
    if not (isinstance(lo, int) and isinstance(hi, int)):
        raise TypeError(f"{name} bounds must be ints; got {lo!r}, {hi!r}")
    if lo < minimum or hi < lo:
        raise ValueError(f"{name} must satisfy {minimum} <= min <= max; got min={lo}, max={hi}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# The shape edge classes, each drawn with a deliberate share (docs/testing.rst,
# "Strategies"): drawn independently, L = S, K = 1 < H, 1 < K < H and L = S = E each come
# up in a few percent of draws only, yet each hides its own classic bug (keys truncated
# to L, a causal mask aligned the wrong way, kv heads repeated instead of interleaved,
# a transposition that only type-checks when the sizes agree).
SHAPE_EDGES = ("longer_keys", "longer_queries", "square", "one_kv_head", "grouped_kv_heads",
               "empty")


def _check_flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {value!r}")


def shapes(
    *,
    max_batch_dims: int = 2,
    max_batch: int = 3,
    min_heads: int = 1,
    max_heads: int = 4,
    gqa: bool = True,
    min_len: int = 0,
    max_len: int = 16,
    min_head_dim: int = 1,
    max_head_dim: int = 16,
    equal_lengths: bool = False,
    equal_head_dims: bool = False,
    edge_cases: bool = True,
) -> st.SearchStrategy[Shape]:
    """Sizes (batch, H, K | H, Kv | H, L, S, E, Ev).

    Parameters
    ----------
    max_batch_dims, max_batch : int
        Up to ``max_batch_dims`` leading dims, each of size 1..``max_batch``.
    min_heads, max_heads : int
        Range of H.
    gqa : bool
        Draw K and Kv among the divisors of H (grouped-query); otherwise K = Kv = H.
    min_len, max_len : int
        Range of L and S (0 allowed: empty sequences).
    min_head_dim, max_head_dim : int
        Range of E and Ev.
    equal_lengths, equal_head_dims : bool
        Force L == S, or E == Ev.
    edge_cases : bool
        First draw an edge class, each with its share of the draws: L < S
        (``"longer_keys"``), L > S (``"longer_queries"``), L = S = E (``"square"``),
        K = Kv = 1 < H (``"one_kv_head"``), 1 < K = Kv < H (``"grouped_kv_heads"``) and
        L or S = 0 (``"empty"``), among those the other bounds allow; the rest of the
        draws are plain (every size drawn independently, the class hypothesis shrinks
        to). False draws every size independently.

    Examples
    --------
    >>> from refattn.testing.strategies import shapes
    >>> s = shapes(max_len=4, gqa=False).example()
    >>> s.K == s.H and s.L <= 4
    True
    >>> s = shapes(edge_cases=False, min_len=2, max_len=2).example()
    >>> s.L == s.S == 2
    True
    """
    _check_range("batch dims", 0, max_batch_dims, 0)
    _check_range("batch", 1, max_batch, 1)
    _check_range("heads", min_heads, max_heads, 1)
    _check_range("lengths", min_len, max_len, 0)
    _check_range("head dims", min_head_dim, max_head_dim, 1)
    _check_flag("edge_cases", edge_cases)
    heads = range(min_heads, max_heads + 1)
    # H with a divisor strictly between 1 and H (4, 6, 8, 9, ...): grouped kv heads.
    grouped = [h for h in heads if len(_divisors(h)) > 2]
    squares = range(max(min_len, min_head_dim, 1), min(max_len, max_head_dim) + 1)
    feasible = {
        "longer_keys": max_len > min_len and not equal_lengths,
        "longer_queries": max_len > min_len and not equal_lengths,
        "square": len(squares) > 0,
        "one_kv_head": gqa and max_heads >= 2,
        "grouped_kv_heads": gqa and bool(grouped),
        "empty": min_len == 0,
    }
    classes = ["plain"] + [c for c in SHAPE_EDGES if edge_cases and feasible[c]]

    @st.composite
    def build(draw: st.DrawFn) -> Shape:
        # The class first, as an index: 0 (plain) is where hypothesis shrinks to. Every
        # class then makes the same draws and bends them to its class, so that the
        # shrinker, lowering the index, finds the rest of the example where it was.
        edge = classes[draw(st.integers(0, len(classes) - 1))]
        nb = draw(st.integers(0, max_batch_dims))
        batch = tuple(draw(st.integers(1, max_batch)) for _ in range(nb))
        H = draw(st.integers(min_heads, max_heads))
        K = draw(st.sampled_from(_divisors(H))) if gqa else H
        Kv = draw(st.sampled_from(_divisors(H))) if gqa else H
        L = draw(st.integers(min_len, max_len))
        S = L if equal_lengths else draw(st.integers(min_len, max_len))
        E = draw(st.integers(min_head_dim, max_head_dim))
        Ev = E if equal_head_dims else draw(st.integers(min_head_dim, max_head_dim))
        if edge == "one_kv_head":
            H, K, Kv = max(H, 2), 1, 1
        elif edge == "grouped_kv_heads":
            H = min((h for h in grouped if h >= H), default=grouped[-1])
            inner = _divisors(H)[1:-1]
            K = Kv = inner[K % len(inner)]
        elif edge in ("longer_keys", "longer_queries"):
            lo, hi = sorted((L, S))
            if lo == hi:
                lo, hi = (lo, hi + 1) if hi < max_len else (lo - 1, hi)
            L, S = (lo, hi) if edge == "longer_keys" else (hi, lo)
        elif edge == "square":
            L = S = E = min(max(L, squares[0]), squares[-1])
            Ev = E if equal_head_dims else Ev
        elif edge == "empty":
            # The shorter of the two, or both when they are equal.
            L, S = (0 if L <= S else L), (0 if S <= L else S)
        return Shape(batch, H, K, Kv, L, S, E, Ev)

    return build()


def _convert(a: np.ndarray, *, dtype: str | None, library: str) -> Any:
    # Rounding to the target dtype happens on the host so every library sees the same
    # values; bfloat16 goes through torch (or ml_dtypes for NumPy).
    if library == "torch":
        import torch

        t = torch.from_numpy(np.ascontiguousarray(a))
        return t if dtype is None or a.dtype == bool else t.to(getattr(torch, dtype))
    if dtype == "bfloat16":
        if library != "numpy":
            raise ValueError(f"bfloat16 arrays are available for numpy and torch; got {library}")
        try:
            import ml_dtypes
        except ImportError as exc:
            raise ImportError("bfloat16 NumPy arrays need ml_dtypes: pip install ml_dtypes") \
                from exc
        a = a.astype(ml_dtypes.bfloat16)
    elif dtype is not None and a.dtype != bool:
        a = a.astype(dtype)
    if library == "numpy":
        return a
    if library == "array_api_strict":
        import array_api_strict

        return array_api_strict.asarray(a)
    import cupy

    return cupy.asarray(a)


def _check_common(dtype: str, library: str) -> None:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}; got {dtype!r}")
    if library not in _LIBRARIES:
        raise ValueError(f"library must be one of {', '.join(_LIBRARIES)}; got {library!r}")


def qkv(
    shape: Shape,
    *,
    dtype: str = "float64",
    logit_magnitude: float = 1.0,
    library: str = "numpy",
) -> st.SearchStrategy[tuple[Any, Any, Any]]:
    """Queries, keys and values of ``shape``.

    Entries are standard normal, with q and k scaled so that the logits
    ``q.k / sqrt(E)`` have a typical magnitude of ``logit_magnitude``.

    Examples
    --------
    >>> from refattn.testing.strategies import Shape, qkv
    >>> q, k, v = qkv(Shape((), 2, 1, 1, 3, 4, 5, 6), dtype="float32").example()
    >>> q.shape, k.shape, v.shape, str(v.dtype)
    ((2, 3, 5), (1, 4, 5), (1, 4, 6), 'float32')
    """
    _check_common(dtype, library)
    if not (isinstance(logit_magnitude, (int, float)) and logit_magnitude > 0
            and np.isfinite(logit_magnitude)):
        raise ValueError(f"logit_magnitude must be a positive finite number; got "
                         f"{logit_magnitude!r}")

    def build(seed: int) -> tuple[Any, Any, Any]:
        rng = np.random.default_rng(seed)
        # Entries of std a give q.k / sqrt(E) of std a**2: a = sqrt(magnitude).
        amp = np.sqrt(logit_magnitude)
        arrays = (rng.standard_normal(shape.q) * amp, rng.standard_normal(shape.k) * amp,
                  rng.standard_normal(shape.v))
        return tuple(_convert(a, dtype=dtype, library=library) for a in arrays)

    return st.integers(0, 2**32 - 1).map(build)


def _mask_shape(draw: st.DrawFn, shape: Shape, broadcast: bool) -> tuple[int, ...]:
    full = shape.scores
    if not broadcast:
        return full
    options = [full, (shape.L, shape.S), (*shape.batch, 1, shape.L, shape.S),
               (*shape.batch, shape.H, 1, shape.S)]
    return draw(st.sampled_from(options))


def bool_masks(
    shape: Shape,
    *,
    min_true_per_row: int = 0,
    fully_masked_rows: bool = False,
    broadcast: bool = True,
    library: str = "numpy",
) -> st.SearchStrategy[Any]:
    """Boolean masks (True = take part) broadcastable to the score shape.

    Parameters
    ----------
    min_true_per_row : int
        Every query row keeps at least this many keys (capped at S).
    fully_masked_rows : bool
        Additionally blank out at least one whole row (needs ``min_true_per_row == 0``).
    broadcast : bool
        Draw broadcast shapes such as (L, S) or (..., H, 1, S) as well as the full one.

    Examples
    --------
    >>> from refattn.testing.strategies import Shape, bool_masks
    >>> m = bool_masks(Shape((), 1, 1, 1, 4, 5, 2, 2), min_true_per_row=2).example()
    >>> bool((m.sum(axis=-1) >= 2).all())
    True
    """
    _check_common("float64", library)
    if not isinstance(min_true_per_row, int) or min_true_per_row < 0:
        raise ValueError(f"min_true_per_row must be a non-negative int; got {min_true_per_row!r}")
    if fully_masked_rows and min_true_per_row:
        raise ValueError("fully_masked_rows=True contradicts min_true_per_row > 0")

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        mshape = _mask_shape(draw, shape, broadcast)
        density = draw(st.sampled_from([0.1, 0.5, 0.9]))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        m = rng.random(mshape) < density
        S = mshape[-1]
        need = min(min_true_per_row, S)
        if need:
            # Force `need` distinct keys on per row, chosen at random.
            order = np.argsort(rng.random(mshape), axis=-1)[..., :need]
            np.put_along_axis(m, order, True, axis=-1)
        if fully_masked_rows and mshape[-2] > 0:
            m[..., int(rng.integers(0, mshape[-2])), :] = False
        return _convert(m, dtype=None, library=library)

    return build()


def float_masks(
    shape: Shape,
    *,
    magnitude: float = 3.0,
    dtype: str = "float64",
    broadcast: bool = True,
    library: str = "numpy",
    infinities: bool = False,
    fully_masked_rows: bool = False,
) -> st.SearchStrategy[Any]:
    """Additive float masks (biases) of normal entries times ``magnitude``.

    Parameters
    ----------
    magnitude : float
        Standard deviation of the finite entries.
    dtype, library
        Dtype and array library of the mask.
    broadcast : bool
        Draw broadcast shapes such as (L, S) or (..., H, 1, S) as well as the full one.
    infinities : bool
        Set a drawn share (10, 50 or 90 %) of the entries to -inf, as torch's additive
        masks mask a key: a kernel must give those keys weight 0 exactly.
    fully_masked_rows : bool
        Additionally set at least one whole row to -inf (a query that sees no key).

    Examples
    --------
    >>> import numpy as np
    >>> from refattn.testing.strategies import Shape, float_masks
    >>> b = float_masks(Shape((2,), 1, 1, 1, 3, 3, 2, 2), broadcast=False).example()
    >>> b.shape
    (2, 1, 3, 3)
    >>> b = float_masks(Shape((), 1, 1, 1, 3, 4, 2, 2), fully_masked_rows=True).example()
    >>> bool(np.isneginf(b).all(axis=-1).any())
    True
    """
    _check_common(dtype, library)
    _check_flag("infinities", infinities)
    _check_flag("fully_masked_rows", fully_masked_rows)
    if not (isinstance(magnitude, (int, float)) and magnitude >= 0 and np.isfinite(magnitude)):
        raise ValueError(f"magnitude must be a non-negative finite number; got {magnitude!r}")

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        mshape = _mask_shape(draw, shape, broadcast)
        # Drawn even when unused, so that every mask makes the same draws.
        density = draw(st.sampled_from([0.1, 0.5, 0.9]))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        b = rng.standard_normal(mshape) * magnitude
        if infinities:
            b[rng.random(mshape) < density] = -np.inf
        if fully_masked_rows and mshape[-2] > 0:
            b[..., int(rng.integers(0, mshape[-2])), :] = -np.inf
        return _convert(b, dtype=dtype, library=library)

    return build()


def dropout_masks(shape: Shape, dropout_p: float, *, library: str = "numpy"
                  ) -> st.SearchStrategy[Any]:
    """Boolean keep-masks (True = keep) of the full score shape, keeping 1 - p on average.

    Examples
    --------
    >>> from refattn.testing.strategies import Shape, dropout_masks
    >>> dropout_masks(Shape((), 2, 2, 2, 3, 4, 1, 1), 0.5).example().shape
    (2, 3, 4)
    """
    _check_common("float64", library)
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1]; got {dropout_p!r}")
    return st.integers(0, 2**32 - 1).map(
        lambda seed: _convert(np.random.default_rng(seed).random(shape.scores) >= dropout_p,
                              dtype=None, library=library))


def windows(*, max_size: int = 16, unlimited: bool = True) -> st.SearchStrategy[Any]:
    """Sliding-window options ``(left, right)`` for ``refattn.attention(window=...)``.

    Each side is a size in 0..``max_size`` or, when ``unlimited``, None (no limit on that
    side); never both None (that is no window at all: leave the option out).

    Examples
    --------
    >>> from refattn.testing.strategies import windows
    >>> left, right = windows(max_size=3).example()
    >>> all(w is None or 0 <= w <= 3 for w in (left, right)) and (left, right) != (None, None)
    True
    """
    _check_range("window sizes", 0, max_size, 0)
    side = st.integers(0, max_size)
    if unlimited:
        side = st.one_of(side, st.none())
    return st.tuples(side, side).filter(lambda w: w != (None, None))


def cu_seqlens(*, min_batch: int = 1, max_batch: int = 4, min_len: int = 0,
               max_len: int = 16, library: str = "numpy") -> st.SearchStrategy[Any]:
    """Offsets ``cu_seqlens`` (B + 1,) int32 of a packed batch: 0, then running totals.

    Sequence b spans ``cu[b] .. cu[b + 1] - 1``; lengths are drawn in
    ``min_len``..``max_len`` (0 allowed: an empty sequence).

    Examples
    --------
    >>> from refattn.testing.strategies import cu_seqlens
    >>> cu = cu_seqlens(max_batch=3, max_len=5).example()
    >>> int(cu[0]), str(cu.dtype), bool((cu[1:] >= cu[:-1]).all())
    (0, 'int32', True)
    """
    _check_range("batch", min_batch, max_batch, 1)
    _check_range("lengths", min_len, max_len, 0)
    _check_common("float64", library)
    return st.lists(st.integers(min_len, max_len), min_size=min_batch,
                    max_size=max_batch).map(lambda lengths: _convert(
                        np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32),
                        dtype=None, library=library))
