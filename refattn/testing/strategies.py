"""Hypothesis strategies for attention test cases.

Requires hypothesis (``pip install 'refattn[testing]'``). The strategies draw *sizes*
and a seed; the arrays themselves come from NumPy's generator. That keeps examples
fast to build at realistic sizes, and shrinking still goes where failures are easiest
to read: fewer heads, shorter sequences, smaller head dims.

Every strategy checks its arguments when it is built, not when it is drawn from.

Examples
--------
>>> from hypothesis import given, settings
>>> import refattn
>>> from refattn.testing import strategies as ras
>>> @settings(max_examples=5, database=None)
... @given(case=ras.attention_cases(convention="refattn"))
... def test_runs(case):
...     out = refattn.attention(case.q, case.k, case.v, **case.kwargs)
...     assert out.shape == case.shape.out
>>> test_runs()
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._arrays import swap_head_axis
from .._types import Array
from .._validate import ProblemSizes

try:
    from hypothesis import strategies as st
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "refattn.testing.strategies needs hypothesis: pip install 'refattn[testing]'"
    ) from exc

__all__ = [
    "AttentionCase",
    "Shape",
    "VarlenCase",
    "attention_cases",
    "bool_masks",
    "cu_seqlens",
    "dropout_masks",
    "float_masks",
    "qkv",
    "shapes",
    "varlen_cases",
    "windows",
]

_DTYPES = ("float64", "float32", "float16", "bfloat16")
_LIBRARIES = ("numpy", "torch", "array_api_strict", "cupy")
_CONVENTIONS = ("refattn", "torch", "flash", "jax")


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

    Examples
    --------
    >>> from refattn.testing.strategies import shapes
    >>> s = shapes(max_len=4, gqa=False).example()
    >>> s.K == s.H and s.L <= 4
    True
    """
    _check_range("batch dims", 0, max_batch_dims, 0)
    _check_range("batch", 1, max_batch, 1)
    _check_range("heads", min_heads, max_heads, 1)
    _check_range("lengths", min_len, max_len, 0)
    _check_range("head dims", min_head_dim, max_head_dim, 1)

    @st.composite
    def build(draw: st.DrawFn) -> Shape:
        nb = draw(st.integers(0, max_batch_dims))
        batch = tuple(draw(st.integers(1, max_batch)) for _ in range(nb))
        H = draw(st.integers(min_heads, max_heads))
        K = draw(st.sampled_from(_divisors(H))) if gqa else H
        Kv = draw(st.sampled_from(_divisors(H))) if gqa else H
        L = draw(st.integers(min_len, max_len))
        S = L if equal_lengths else draw(st.integers(min_len, max_len))
        E = draw(st.integers(min_head_dim, max_head_dim))
        Ev = E if equal_head_dims else draw(st.integers(min_head_dim, max_head_dim))
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
) -> st.SearchStrategy[Any]:
    """Additive float masks (biases) of normal entries times ``magnitude``.

    Examples
    --------
    >>> from refattn.testing.strategies import Shape, float_masks
    >>> b = float_masks(Shape((2,), 1, 1, 1, 3, 3, 2, 2), broadcast=False).example()
    >>> b.shape
    (2, 1, 3, 3)
    """
    _check_common(dtype, library)

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        mshape = _mask_shape(draw, shape, broadcast)
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        return _convert(rng.standard_normal(mshape) * magnitude, dtype=dtype, library=library)

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


@dataclass
class AttentionCase:
    """One drawn case: the inputs and the keyword arguments of its convention.

    For ``convention="refattn"`` the kwargs are those of :func:`refattn.attention`; for
    ``"torch"`` those of ``scaled_dot_product_attention`` (torch's or refattn's); for
    ``"flash"`` those of ``flash_attn_func`` (flash-attn's or
    ``refattn.compat.flash_attn``'s, a dropout with refattn's ``dropout_mask``), q, k,
    v in (B, L, H, E); for ``"jax"`` those of ``jax.nn.dot_product_attention``
    (``refattn.compat.jax``'s too), q, k, v in (B, T, N, H). ``shape`` always uses the
    shape legend (heads before positions).
    """

    q: Any
    k: Any
    v: Any
    kwargs: dict[str, Any] = field(default_factory=dict)
    shape: Shape | None = None
    convention: str = "refattn"

    def options(self) -> dict[str, Any]:
        """The case's kwargs as :func:`refattn.attention` options, whatever the convention.

        What to pass to ``refattn.attention`` or to
        ``refattn.testing.assert_attention_close`` next to q, k, v: the convention's
        masks, alignment, layout and masked-row policy spelled out (torch: top-left,
        fully masked rows 0; flash: (B, L, H, E), bottom-right, windows normalised as
        flash-attn does; jax: (B, T, N, H), top-left, fully masked rows the mean of V).

        Examples
        --------
        >>> import refattn
        >>> from refattn.testing.strategies import attention_cases
        >>> case = attention_cases(convention="flash").example()
        >>> from refattn.compat.flash_attn import flash_attn_func
        >>> out = flash_attn_func(case.q, case.k, case.v, **case.kwargs)
        >>> bool((refattn.attention(case.q, case.k, case.v, **case.options()) == out).all())
        True
        """
        kw = dict(self.kwargs)
        if self.convention == "refattn":
            return kw
        opts: dict[str, Any] = {}
        if kw.get("dropout_p"):
            opts.update(dropout_p=kw["dropout_p"], dropout_mask=kw.get("dropout_mask"))
        if self.convention == "torch":
            mask = kw.get("attn_mask")
            if mask is not None:
                opts["mask" if "bool" in str(mask.dtype) else "bias"] = mask
            opts.update(causal=bool(kw.get("is_causal")), scale=kw.get("scale"),
                        alignment="top_left", masked_rows="zero")
            return opts
        if self.convention == "flash":
            from ..compat.flash_attn import flash_window

            fw = flash_window(kw.get("window_size", (-1, -1)), bool(kw.get("causal")),
                              seqlen_q=self.q.shape[1], seqlen_k=self.k.shape[1],
                              has_alibi=kw.get("alibi_slopes") is not None)
            opts.update(window=fw.window, alignment="bottom_right", layout="BLHD",
                        scale=kw.get("softmax_scale"), softcap=kw.get("softcap") or None,
                        alibi_slopes=kw.get("alibi_slopes"), masked_rows="zero")
            return opts
        window = kw.get("local_window_size")
        if isinstance(window, int):
            window = (window, window)
        opts.update(mask=kw.get("mask"), bias=kw.get("bias"), causal=bool(kw.get("is_causal")),
                    window=window, scale=kw.get("scale"), alignment="top_left",
                    layout="BLHD", masked_rows="uniform")
        return opts


def _default_shapes(convention: str) -> st.SearchStrategy[Shape]:
    if convention == "flash":
        # flash-attn: one batch dim, K = Kv key/value heads.
        return shapes(max_batch_dims=1).filter(lambda s: len(s.batch) == 1 and s.K == s.Kv)
    if convention == "jax":
        # JAX: (B, T, N, H) with the key's shape for the value.
        return shapes(max_batch_dims=1, equal_head_dims=True).filter(
            lambda s: len(s.batch) == 1 and s.K == s.Kv)
    return shapes()


def _to_blhd(x: Array) -> Array:
    # (B, H, L, D) -> (B, L, H, D) in any library; a torch tensor is then made contiguous,
    # as a tensor built in that layout would be.
    import array_api_compat

    y = swap_head_axis(x, array_api_compat.array_namespace(x))
    return y.contiguous() if hasattr(y, "contiguous") else y


def attention_cases(
    *,
    convention: str = "refattn",
    dtype: str = "float64",
    library: str = "numpy",
    shape: st.SearchStrategy[Shape] | None = None,
    masks: bool = True,
    causal: bool = True,
    dropout: bool = True,
    window: bool = True,
    logit_magnitudes: tuple[float, ...] = (1.0, 10.0),
) -> st.SearchStrategy[AttentionCase]:
    """A whole consistent case: inputs plus options, for one convention.

    Parameters
    ----------
    convention : {"refattn", "torch", "flash", "jax"}
        Which keyword arguments to draw: ``refattn.attention``'s (mask, bias, causal and
        window with both alignments, scale, dropout); torch SDPA's (attn_mask bool or
        float, is_causal, scale, enable_gqa, dropout_p with an explicit
        ``dropout_mask``); flash-attn's (causal, window_size with -1 for unlimited,
        softmax_scale, softcap, alibi_slopes, dropout_p with ``dropout_mask``);
        JAX's (bias, mask, is_causal, scale, local_window_size).
    dtype, library
        Dtype and array library of the inputs.
    shape
        A strategy of :class:`Shape`; by default ``shapes()``, restricted to what the
        convention accepts (one batch dim and K = Kv for flash and jax, E = Ev for jax).
    masks, causal, dropout, window : bool
        Whether to draw these options at all (masks: bool and float masks; flash draws
        softcap and ALiBi under ``masks``, having no mask argument).
    logit_magnitudes : tuple of float
        Typical logit sizes to draw from.

    Examples
    --------
    >>> from refattn.testing.strategies import attention_cases
    >>> case = attention_cases(convention="torch", dropout=False).example()
    >>> sorted(case.kwargs)[:2]
    ['attn_mask', 'enable_gqa']
    >>> case = attention_cases(convention="flash").example()
    >>> case.q.shape == (case.shape.batch[0], case.shape.L, case.shape.H, case.shape.E)
    True
    """
    _check_common(dtype, library)
    if convention not in _CONVENTIONS:
        raise ValueError(f"convention must be one of {', '.join(_CONVENTIONS)}; got "
                         f"{convention!r}")
    if not logit_magnitudes:
        raise ValueError("logit_magnitudes must not be empty")
    shape_strategy = shape if shape is not None else _default_shapes(convention)

    @st.composite
    def build(draw: st.DrawFn) -> AttentionCase:
        s = draw(shape_strategy)
        magnitude = draw(st.sampled_from(list(logit_magnitudes)))
        q, k, v = draw(qkv(s, dtype=dtype, logit_magnitude=magnitude, library=library))
        kwargs: dict[str, Any] = {}
        kinds = ["none", "bool", "float"] if convention != "flash" else ["none"]
        mask_kind = draw(st.sampled_from(kinds)) if masks else "none"
        mask = None
        if mask_kind == "bool":
            mask = draw(bool_masks(s, library=library))
        elif mask_kind == "float":
            mask = draw(float_masks(s, dtype=dtype if convention == "torch" else "float64",
                                    library=library))
        is_causal = causal and draw(st.booleans())
        win = draw(windows(max_size=max(s.S, 1))) if window and draw(st.booleans()) \
            else None
        scale = draw(st.sampled_from([None, None, 0.0, -0.5, 2.0]))
        p = draw(st.sampled_from([0.0, 0.3])) if dropout and convention != "jax" else 0.0
        if convention == "refattn":
            if mask_kind == "bool":
                kwargs["mask"] = mask
            elif mask_kind == "float":
                kwargs["bias"] = mask
            if is_causal or win is not None:
                if is_causal:
                    kwargs["causal"] = True
                if win is not None:
                    kwargs["window"] = win
                kwargs["alignment"] = draw(st.sampled_from(["top_left", "bottom_right"]))
        elif convention == "torch":
            # torch refuses attn_mask together with is_causal; keep one of them.
            kwargs["attn_mask"] = mask
            kwargs["is_causal"] = is_causal and mask is None
            kwargs["enable_gqa"] = s.K != s.H or s.Kv != s.H
        elif convention == "flash":
            q, k, v = (_to_blhd(x) for x in (q, k, v))
            if is_causal:
                kwargs["causal"] = True
            if win is not None:
                kwargs["window_size"] = tuple(-1 if w is None else w for w in win)
            if masks and draw(st.booleans()):
                kwargs["softcap"] = draw(st.sampled_from([5.0, 30.0]))
            if masks and draw(st.booleans()):
                rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
                slopes = 2.0 ** -rng.uniform(0, 4, size=(s.H,))
                kwargs["alibi_slopes"] = _convert(slopes, dtype="float32", library=library)
        else:  # jax
            q, k, v = (_to_blhd(x) for x in (q, k, v))
            if mask_kind == "bool":
                kwargs["mask"] = mask
            elif mask_kind == "float":
                kwargs["bias"] = mask
            kwargs["is_causal"] = is_causal
            if win is not None:
                kwargs["local_window_size"] = tuple(s.S if w is None else w for w in win)
        kwargs["softmax_scale" if convention == "flash" else "scale"] = scale
        if p:
            kwargs["dropout_p"] = p
            kwargs["dropout_mask"] = draw(dropout_masks(s, p, library=library))
        return AttentionCase(q, k, v, kwargs, s, convention)

    return build()


@dataclass
class VarlenCase:
    """A packed batch for :func:`refattn.attention_varlen` (flash-attn's varlen form).

    q (total_q, H, E), k (total_k, K, E), v (total_k, Kv, Ev) with the offsets
    ``cu_seqlens_q`` and ``cu_seqlens_k``; ``kwargs`` are attention_varlen's options.
    """

    q: Any
    k: Any
    v: Any
    cu_seqlens_q: Any
    cu_seqlens_k: Any
    kwargs: dict[str, Any] = field(default_factory=dict)
    lengths_q: tuple[int, ...] = ()
    lengths_k: tuple[int, ...] = ()


def varlen_cases(
    *,
    dtype: str = "float64",
    library: str = "numpy",
    max_batch: int = 4,
    max_len: int = 12,
    max_heads: int = 4,
    max_head_dim: int = 16,
    logit_magnitudes: tuple[float, ...] = (1.0, 10.0),
) -> st.SearchStrategy[VarlenCase]:
    """Packed variable-length batches with causal / window / scale / softcap options.

    Examples
    --------
    >>> import refattn
    >>> from refattn.testing.strategies import varlen_cases
    >>> case = varlen_cases(max_batch=2).example()
    >>> out = refattn.attention_varlen(case.q, case.k, case.v, case.cu_seqlens_q,
    ...                                case.cu_seqlens_k, **case.kwargs)
    >>> out.shape[0] == sum(case.lengths_q)
    True
    """
    _check_common(dtype, library)
    _check_range("batch", 1, max_batch, 1)
    _check_range("lengths", 0, max_len, 0)
    if not logit_magnitudes:
        raise ValueError("logit_magnitudes must not be empty")

    @st.composite
    def build(draw: st.DrawFn) -> VarlenCase:
        B = draw(st.integers(1, max_batch))
        lq = tuple(draw(st.lists(st.integers(0, max_len), min_size=B, max_size=B)))
        lk = tuple(draw(st.lists(st.integers(0, max_len), min_size=B, max_size=B)))
        s = draw(shapes(max_batch_dims=0, max_heads=max_heads, max_head_dim=max_head_dim,
                        min_len=0, max_len=0))
        amp = np.sqrt(draw(st.sampled_from(list(logit_magnitudes))))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        tq, tk = sum(lq), sum(lk)
        arrays = (rng.standard_normal((tq, s.H, s.E)) * amp,
                  rng.standard_normal((tk, s.K, s.E)) * amp,
                  rng.standard_normal((tk, s.Kv, s.Ev)))
        q, k, v = (_convert(a, dtype=dtype, library=library) for a in arrays)
        cu_q, cu_k = (_convert(np.concatenate([[0], np.cumsum(n)]).astype(np.int32),
                               dtype=None, library=library) for n in (lq, lk))
        kwargs: dict[str, Any] = {}
        if draw(st.booleans()):
            kwargs["causal"] = True
        if draw(st.booleans()):
            kwargs["window"] = draw(windows(max_size=max(max_len, 1)))
        if kwargs:
            kwargs["alignment"] = draw(st.sampled_from(["top_left", "bottom_right"]))
        kwargs["scale"] = draw(st.sampled_from([None, 0.5]))
        if draw(st.booleans()):
            kwargs["softcap"] = draw(st.sampled_from([5.0, 30.0]))
        return VarlenCase(q, k, v, cu_q, cu_k, kwargs, lq, lk)

    return build()
