"""Hypothesis strategies for attention test cases.

Requires hypothesis (``pip install 'refattn[testing]'``). The strategies draw *sizes*
and a seed; the arrays themselves come from NumPy's generator. That keeps examples
fast to build at realistic sizes, and shrinking still goes where failures are easiest
to read: fewer heads, shorter sequences, smaller head dims.

Every strategy checks its arguments when it is built, not when it is drawn from.

The size and array draws (``Shape``, ``shapes``, ``qkv``, the masks, ``windows``,
``cu_seqlens``) are defined in ``_strategy_shapes`` and re-exported here; the whole
cases (``attention_cases``, ``varlen_cases``) are defined in this module.

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

try:
    from hypothesis import strategies as st
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "refattn.testing.strategies needs hypothesis: pip install 'refattn[testing]'"
    ) from exc

from ._strategy_shapes import (
    SHAPE_EDGES,
    Shape,
    _check_common,
    _check_flag,
    _check_range,
    _convert,
    bool_masks,
    cu_seqlens,
    dropout_masks,
    float_masks,
    qkv,
    shapes,
    windows,
)

__all__ = [
    "CASE_EDGES",
    "SHAPE_EDGES",
    "AttentionCase",
    "Shape",
    "VarlenCase",
    "attention_cases",
    "bool_masks",
    "cu_seqlens",
    "dropout_masks",
    "float_masks",
    "huge_logit_magnitudes",
    "qkv",
    "shapes",
    "varlen_cases",
    "windows",
]

_CONVENTIONS = ("refattn", "torch", "flash", "jax")


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


# The option edge classes of attention_cases, each drawn with a deliberate share
# (docs/testing.rst, "Strategies", measured there): drawn independently, a float mask
# never held -inf, logits never left exp's range, causal was rare in the torch
# convention (dropped whenever a mask was drawn) and fully masked rows accidental.
CASE_EDGES = ("neg_inf_mask", "masked_rows", "causal", "huge_logits")


def huge_logit_magnitudes(dtype: str) -> tuple[float, float]:
    """The logit sizes of the ``"huge_logits"`` class of :func:`attention_cases`.

    ``t`` and ``3 t``, where ``t = log(finfo.max)`` is where ``exp`` overflows in the
    precision a kernel computes its softmax in: float64 for float64 inputs (709.8),
    float32 otherwise (88.7; half-precision kernels compute their softmax in float32,
    and one that exponentiates in float16 overflows sooner still, at 11.1). Logits
    that typically reach ``t`` make a kernel that does not subtract the row maximum
    overflow (or underflow to 0 / 0) on almost every such case.

    Examples
    --------
    >>> from refattn.testing.strategies import huge_logit_magnitudes
    >>> [round(m, 1) for m in huge_logit_magnitudes("float64")]
    [709.8, 2129.3]
    >>> [round(m, 1) for m in huge_logit_magnitudes("bfloat16")]
    [88.7, 266.2]
    """
    _check_common(dtype, "numpy")
    t = float(np.log(np.finfo(np.float64 if dtype == "float64" else np.float32).max))
    return t, 3 * t


def _case_edges(convention: str, masks: bool, causal: bool) -> list[str]:
    # The classes a convention can express. JAX's bias is left finite: jax.nn's softmax
    # of a row of -inf biases is NaN, where refattn's JAX convention (masked_rows=
    # "uniform") answers the mean of V, so such a draw would test neither. Causal has
    # twice the weight of the others: in the torch convention the mask classes and most
    # plain draws cannot be causal (torch refuses attn_mask with is_causal). Huge logits
    # too: a zero scale (a fifth of the draws) takes them back to 0, and only they find
    # a kernel that does not subtract the row maximum.
    available = {
        "neg_inf_mask": masks and convention in ("refattn", "torch"),
        "masked_rows": masks and convention in ("refattn", "torch", "jax"),
        "causal": causal,
        "huge_logits": True,
    }
    edges = [e for e in CASE_EDGES if available[e]]
    return edges + (["causal"] if causal else []) + ["huge_logits"]


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
    edge_cases: bool = True,
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
        Its own edge classes (L != S both ways, one or grouped kv heads, L = S = E,
        empty sequences) come with it.
    masks, causal, dropout, window : bool
        Whether to draw these options at all (masks: bool and float masks; flash draws
        softcap and ALiBi under ``masks``, having no mask argument).
    logit_magnitudes : tuple of float
        Typical logit sizes to draw from (outside the ``"huge_logits"`` class).
    edge_cases : bool
        First draw an edge class, each with its share of the draws (docs/testing.rst):
        a float mask holding -inf entries, sometimes whole -inf rows
        (``"neg_inf_mask"``, refattn and torch conventions); a bool or float mask with
        fully masked rows (``"masked_rows"``; bool only for jax); causal
        (``"causal"``, twice the share; with a drawn mask or window where the
        convention allows both); logits of the size of ``exp``'s range
        (``"huge_logits"``, twice the share, see :func:`huge_logit_magnitudes`). The
        rest are plain draws, every option drawn independently, the class hypothesis
        shrinks to. ``masks=False`` and ``causal=False`` leave out their classes. False
        draws plain cases only.

    Examples
    --------
    >>> from refattn.testing.strategies import attention_cases
    >>> case = attention_cases(convention="torch", dropout=False).example()
    >>> sorted(case.kwargs)[:2]
    ['attn_mask', 'enable_gqa']
    >>> case = attention_cases(convention="flash").example()
    >>> case.q.shape == (case.shape.batch[0], case.shape.L, case.shape.H, case.shape.E)
    True
    >>> case = attention_cases(masks=False, causal=False, window=False, dropout=False,
    ...                        edge_cases=False).example()
    >>> list(case.kwargs)
    ['scale']
    """
    _check_common(dtype, library)
    if convention not in _CONVENTIONS:
        raise ValueError(f"convention must be one of {', '.join(_CONVENTIONS)}; got "
                         f"{convention!r}")
    if not logit_magnitudes:
        raise ValueError("logit_magnitudes must not be empty")
    _check_flag("edge_cases", edge_cases)
    shape_strategy = shape if shape is not None else _default_shapes(convention)
    classes = ["plain"] + (_case_edges(convention, masks, causal) if edge_cases else [])
    mask_dtype = dtype if convention == "torch" else "float64"

    @st.composite
    def build(draw: st.DrawFn) -> AttentionCase:
        # The class first, as an index: 0 (plain) is where hypothesis shrinks to. Every
        # class makes the same draws as a plain case and then bends them to its class,
        # so that the shrinker, lowering the index, finds the rest where it was.
        edge = classes[draw(st.integers(0, len(classes) - 1))]
        s = draw(shape_strategy)
        magnitudes = huge_logit_magnitudes(dtype) if edge == "huge_logits" \
            else logit_magnitudes
        magnitude = draw(st.sampled_from(list(magnitudes)))
        q, k, v = draw(qkv(s, dtype=dtype, logit_magnitude=magnitude, library=library))
        kwargs: dict[str, Any] = {}
        kinds = ["none", "bool", "float"] if convention != "flash" else ["none"]
        mask_kind = draw(st.sampled_from(kinds)) if masks else "none"
        also = draw(st.booleans())  # whole -inf rows, or -inf entries: see below
        if edge == "neg_inf_mask":
            mask_kind = "float"
        elif edge == "masked_rows":
            mask_kind = "bool" if convention == "jax" or mask_kind == "none" else mask_kind
        elif edge == "causal" and convention == "torch":
            mask_kind = "none"  # torch refuses attn_mask together with is_causal
        mask = None
        if mask_kind == "bool":
            mask = draw(bool_masks(s, fully_masked_rows=edge == "masked_rows",
                                   library=library))
        elif mask_kind == "float":
            # -inf entries with some whole -inf rows, or whole -inf rows with some -inf
            # entries elsewhere.
            mask = draw(float_masks(
                s, dtype=mask_dtype, library=library,
                infinities=edge == "neg_inf_mask" or (edge == "masked_rows" and also),
                fully_masked_rows=edge == "masked_rows" or (edge == "neg_inf_mask" and also)))
        # Drawn in every class, so that the causal class is not a shorter (simpler to
        # the shrinker) draw than the plain one.
        drawn_causal = causal and draw(st.booleans())
        is_causal = edge == "causal" or drawn_causal
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
