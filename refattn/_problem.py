"""The attention problem: validated, normalised inputs and options in one frozen value.

The front door (``refattn.attention`` and ``refattn.attention_backward``) builds one
``AttentionProblem`` per call with ``build_problem`` and hands it, as it is, to whichever
path runs: the direct, blocked and compensated array-API paths and the CUDA kernels
(their support check included). A new option is one field here, its check in
``build_problem`` and each path's handling of the field (docs/contributing.rst, "Adding
an option").

Everything in a problem is in the compute form: q, k, v in the compute dtype with the
heads on axis -3 and rank >= 3 (a 2-D input gets a head axis of size 1), whatever the
user's layout.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import _validate
from ._agnostic._masks import alibi_bias, evaluate_mask_mod, index_grids
from ._agnostic._scores import ScoreMods
from ._arrays import swap_head_axis
from ._dropout import resolve_keep
from ._namespace import dtype_is, infer_namespace
from ._types import (
    IMPLEMENTATIONS,
    LAYOUTS,
    MASKED_ROW_POLICIES,
    PRECISIONS,
    Array,
    Device,
    Namespace,
)
from ._window import Window, alignment_shift, chunk_mask

__all__ = ["SHAPE_LEGEND", "AttentionProblem", "build_problem"]

SHAPE_LEGEND = "(B batch, H query heads, L queries, S keys)"


@dataclass(frozen=True)
class AttentionProblem:
    """One attention call, checked and in compute form; every path reads it as it is.

    Attributes
    ----------
    xp, device
        The inputs' array namespace and device.
    shapes
        The problem's sizes (B, H, K, Kv, L, S, E, Ev).
    q, k, v
        (..., H, L, E), (..., K, S, E), (..., Kv, S, Ev) in ``compute_dtype``.
    mask
        The user's boolean mask (True = take part) or None; ``mask_mod`` and the window
        are apart (``combined_mask`` and ``visible`` combine them on demand).
    mask_mod
        FlexAttention's ``mask_mod(b, h, q_idx, kv_idx)`` or None.
    bias
        The user's additive bias in the compute dtype, or None; ALiBi is apart
        (``bias_with_alibi``).
    alibi_slopes
        (..., H) slopes in the compute dtype, or None.
    window
        ``causal`` and ``window=`` merged into one ``Window``; None when neither limits.
    alignment, shift
        The alignment name and the key position of query 0 it gives (0 or S - L).
    mods
        softcap and score_mod, with the whole-problem index grids the mods are
        evaluated on (``index_grids``) when there is a callable.
    keep
        The dropout keep-mask (True = keep) as given or drawn, or None without dropout.
    scale, dropout_p, masked_rows
        The scalar options, checked.
    layout, in_dtype, compute_dtype
        The user's layout and dtype (results go back to them) and the compute dtype.
    precision, implementation
        The arithmetic asked for and the path forced (None: the front door chooses).
    sinks
        (H,) per-head sink logits in the compute dtype, or None: each joins its head's
        softmax denominators and adds nothing to the output (docs/variants.rst).
    attention_chunk
        Chunked local attention's chunk length, or None: query i sees only the keys j
        with ``(i + shift) // chunk == j // chunk`` (``visible`` includes it).
    qv
        (..., H, L, Ev) in the compute form, or None: the scores gain ``scale qv v^T``.
    """

    xp: Namespace
    device: Device
    shapes: _validate.AttentionShapes
    q: Array
    k: Array
    v: Array
    mask: Array | None
    mask_mod: Callable[..., Any] | None
    bias: Array | None
    alibi_slopes: Array | None
    window: Window | None
    alignment: str
    shift: int
    mods: ScoreMods
    keep: Array | None
    scale: float
    dropout_p: float
    masked_rows: str
    layout: str
    in_dtype: Any
    compute_dtype: Any
    precision: str
    implementation: str | None
    # The options added after the paths' tests built problems by hand default to None.
    sinks: Array | None = None
    attention_chunk: int | None = None
    qv: Array | None = None

    @functools.cached_property
    def combined_mask(self) -> Array | None:
        """The user's mask AND mask_mod evaluated on the whole grid (the direct path's,
        the kernels'); the blocked path evaluates the mask_mod per block instead."""
        if self.mask_mod is None:
            return self.mask
        assert self.mods.grids is not None
        modded = evaluate_mask_mod(self.mask_mod, self.mods.grids, xp=self.xp)
        _validate.check_broadcastable("mask_mod's result", modded, self.shapes.scores,
                                      SHAPE_LEGEND)
        return modded if self.mask is None else self.xp.logical_and(self.mask, modded)

    @property
    def bias_with_alibi(self) -> Array | None:
        """The user's bias with ALiBi added (both additive, after softcap), built on
        demand so that the blocked path never materialises the (..., H, L, S) ALiBi."""
        if self.alibi_slopes is None:
            return self.bias  # without the cached property's lock, on every call
        return self._bias_and_alibi

    @functools.cached_property
    def _bias_and_alibi(self) -> Array:
        alibi = alibi_bias(self.alibi_slopes, self.shapes.L, self.shapes.S, shift=self.shift,
                           xp=self.xp)
        return alibi if self.bias is None else self.bias + alibi

    @property
    def visible(self) -> Array | None:
        """Every mask at once: ``combined_mask`` AND the window AND the chunks,
        materialised at (L, S) when there is a window or a chunk length (the direct and
        compensated paths' single mask)."""
        if self.window is None and self.attention_chunk is None:
            # Without a mask_mod, the mask itself (skipping the cached property's lock).
            return self.mask if self.mask_mod is None else self.combined_mask
        mask = self.combined_mask
        if self.window is not None:
            band = self.window.mask(self.shapes.L, self.shapes.S, shift=self.shift,
                                    xp=self.xp, device=self.device)
            mask = band if mask is None else self.xp.logical_and(mask, band)
        if self.attention_chunk is not None:
            chunks = chunk_mask(self.shapes.L, self.shapes.S, self.attention_chunk,
                                shift=self.shift, xp=self.xp, device=self.device)
            mask = chunks if mask is None else self.xp.logical_and(mask, chunks)
        return mask

    def to_compute_form(self, x: Array) -> Array:
        """A user-layout (..., H, L, D) array such as grad_out in this problem's form."""
        xp = self.xp
        if self.layout == "BLHD":
            x = swap_head_axis(x, xp)
        # No path writes into grad_out or a saved output: a float64 one is used as it is.
        return to_rank3(_as_dtype(x, self.compute_dtype, xp), xp)

    def to_user_form(self, x: Array, *, swap: bool) -> Array:
        """A result back to the user's rank, layout (``swap``: axes -3/-2) and dtype."""
        xp = self.xp
        if self.shapes.ndim == 2:
            x = x[0, ...]
        if swap and self.layout == "BLHD":
            x = swap_head_axis(x, xp)
        return _as_dtype(x, self.in_dtype, xp)


def to_rank3(x: Array, xp: Namespace) -> Array:
    """A 2-D input has no head axis: give it one of size 1 so every path sees (..., H, L, D)."""
    return xp.reshape(x, (1, *x.shape)) if x.ndim == 2 else x


#: The ScoreMods of a problem without softcap or score_mod (frozen, so one serves all).
_NO_MODS = ScoreMods()


def _as_dtype(x: Array, dtype: Any, xp: Namespace) -> Array:
    # astype(copy=False) returns x itself when the dtype is already the one asked for;
    # testing first skips the namespace's wrapper (a few microseconds a call).
    return x if x.dtype == dtype else xp.astype(x, dtype, copy=False)


def _compute_dtype(compute_dtype: Any, xp: Namespace) -> Any:
    if compute_dtype is None:
        return xp.float64
    for name in ("float64", "float32"):
        if compute_dtype == name or compute_dtype == getattr(xp, name):
            return getattr(xp, name)
    raise ValueError(
        f"compute_dtype must be None (float64), 'float64' or 'float32'; got {compute_dtype!r}"
    )


def _check_callable(name: str, fn: Any) -> None:
    if fn is not None and not callable(fn):
        raise TypeError(f"{name} must be a callable or None; got {type(fn).__name__}")


def _check_choices(layout: Any, masked_rows: Any, precision: Any, implementation: Any,
                   alignment: Any, causal: Any) -> None:
    _validate.check_choice("layout", layout, LAYOUTS)
    _validate.check_choice("masked_rows", masked_rows, MASKED_ROW_POLICIES)
    _validate.check_choice("precision", precision, PRECISIONS)
    _validate.check_choice("implementation", implementation, IMPLEMENTATIONS)
    _validate.check_alignment(alignment)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False; got {causal!r}")


def _check_mask_and_bias(mask: Any, bias: Any, scores_shape: tuple[int, ...],
                         xp: Namespace) -> None:
    if mask is not None:
        if not dtype_is(xp, mask.dtype, "bool"):
            raise TypeError(
                f"mask must be a boolean array (True = take part); got dtype {mask.dtype}. "
                "Pass additive float masks as bias="
            )
        _validate.check_broadcastable("mask", mask, scores_shape, SHAPE_LEGEND)
    if bias is not None:
        _validate.check_broadcastable("bias", bias, scores_shape, SHAPE_LEGEND)


def _check_alibi(alibi_slopes: Any, shapes: _validate.AttentionShapes) -> None:
    if alibi_slopes is None:
        return
    _validate.check_broadcastable(
        "alibi_slopes", alibi_slopes, (*shapes.batch, shapes.H), "(batch dims, H)")
    if alibi_slopes.ndim == 0:
        raise ValueError("alibi_slopes must have a head axis: shape (H,) or (B, H); got ()")


def _check_precision(precision: str, implementation: str | None, compute_dtype: Any,
                     cdtype: Any, softcap: float | None, score_mod: Any,
                     xp: Namespace) -> None:
    if precision != "compensated":
        return  # both refusals below are about compensated arithmetic
    nonadditive = [name for name, value in (("softcap", softcap), ("score_mod", score_mod))
                   if value is not None]
    if nonadditive and precision == "compensated":
        # Its error-free arithmetic covers products, sums and exp; a tanh or a user's
        # callable evaluated in float64 would bring back the error it removes.
        raise ValueError(
            f"precision='compensated' does not support {' and '.join(nonadditive)} (its "
            "error-free arithmetic has no tanh and cannot see inside a callable: use "
            "precision='standard')"
        )
    direct = implementation in (None, "direct")
    if precision == "compensated" and (cdtype != xp.float64 or not direct):
        # Its error-free transformations are derived for float64 on the materialised path.
        raise ValueError(
            "precision='compensated' computes in float64 on the direct path; got "
            f"compute_dtype={compute_dtype!r}, implementation={implementation!r} (use "
            "compute_dtype=None and implementation=None or 'direct')"
        )


def _check_sinks(sinks: Any, shapes: _validate.AttentionShapes) -> None:
    if sinks is None:
        return
    # Its dtype was checked with the inputs' (infer_namespace).
    if tuple(sinks.shape) != (shapes.H,):
        raise ValueError(f"sinks must have shape (H,) = ({shapes.H},), one logit per query "
                         f"head; got {tuple(sinks.shape)}")


def _check_chunk(attention_chunk: Any) -> None:
    if attention_chunk is None:
        return
    if (not isinstance(attention_chunk, numbers.Integral) or isinstance(attention_chunk, bool)
            or attention_chunk <= 0):
        raise ValueError(f"attention_chunk must be a positive int (the chunk length in key "
                         f"positions) or None; got {attention_chunk!r}")


def _check_qv(qv: Any, q: Any, shapes: _validate.AttentionShapes, layout: str,
              xp: Namespace) -> None:
    # q and qv are in the compute layout (heads on axis -3) here; messages show the user's.
    if qv is None:
        return
    expected = (*q.shape[:-1], shapes.Ev)
    if tuple(qv.shape) != expected:
        shown = swap_head_axis(qv, xp).shape if layout == "BLHD" and qv.ndim >= 3 else qv.shape
        want = (*expected[:-3], expected[-2], expected[-3], expected[-1]) if (
            layout == "BLHD" and len(expected) >= 3) else expected
        legend = "(..., L, H, Ev)" if layout == "BLHD" else "(..., H, L, Ev)"
        raise ValueError(f"qv must have q's shape with v's head dim Ev = {shapes.Ev}: "
                         f"{legend} = {want}; got {tuple(shown)}")


def build_problem(
    q: Any, k: Any, v: Any, *, mask: Any = None, bias: Any = None, causal: Any = False,
    window: Any = None, alignment: Any = "top_left", scale: Any = None, softcap: Any = None,
    alibi_slopes: Any = None, score_mod: Any = None, mask_mod: Any = None,
    dropout_p: Any = 0.0, dropout_mask: Any = None, rng: Any = None,
    masked_rows: Any = "zero", layout: Any = "BHLD", compute_dtype: Any = None,
    precision: Any = "standard", implementation: Any = None, xp: Any = None,
    sinks: Any = None, attention_chunk: Any = None, qv: Any = None,
) -> AttentionProblem:
    """Check ``attention``'s arguments and build the problem every path takes.

    The arguments are ``refattn.attention``'s (see its docstring); the errors are its
    errors. Used by the front door and by ``refattn.testing.exact_attention``, which
    accepts the same inputs and options.

    Examples
    --------
    >>> import numpy as np
    >>> p = build_problem(np.ones((2, 3, 4)), np.ones((2, 5, 4)), np.ones((2, 5, 6)),
    ...                   causal=True, alignment="bottom_right")
    >>> p.shapes.scores, p.window, p.shift, p.scale
    ((2, 3, 5), Window(left=None, right=0), 2, 0.5)
    """
    xp, device = infer_namespace(
        {"q": q, "k": k, "v": v, "bias": bias, "alibi_slopes": alibi_slopes,
         "sinks": sinks, "qv": qv},
        {"mask": mask, "dropout_mask": dropout_mask}, xp=xp, required=("q", "k", "v"),
    )
    window_value = None if window is None else Window.parse(window)
    softcap_value = _validate.check_softcap(softcap)
    _check_callable("score_mod", score_mod)
    _check_callable("mask_mod", mask_mod)
    _check_choices(layout, masked_rows, precision, implementation, alignment, causal)
    if layout == "BLHD":
        q, k, v = (swap_head_axis(x, xp) for x in (q, k, v))
        if qv is not None and qv.ndim >= 3:
            qv = swap_head_axis(qv, xp)
    shapes = _validate.check_qkv(q, k, v, layout=layout)
    _check_sinks(sinks, shapes)
    _check_chunk(attention_chunk)
    _check_qv(qv, q, shapes, layout, xp)
    _check_mask_and_bias(mask, bias, shapes.scores, xp)
    scale_value = _validate.check_scale(scale, shapes.E)
    p = _validate.check_dropout_p(dropout_p)
    keep = resolve_keep(p, dropout_mask, rng, shapes=shapes, legend=SHAPE_LEGEND, xp=xp,
                        device=device)
    _check_alibi(alibi_slopes, shapes)
    cdtype = _compute_dtype(compute_dtype, xp)
    _check_precision(precision, implementation, compute_dtype, cdtype, softcap_value,
                     score_mod, xp)
    # copy=False: no path writes into its inputs, and copying float64 inputs to float64
    # cost the blocked path a fifth of its time at B=4, H=16, L=S=256 (fresh pages).
    qc, kc, vc = (to_rank3(_as_dtype(x, cdtype, xp), xp) for x in (q, k, v))
    grids = None
    if score_mod is not None or mask_mod is not None:
        grids = index_grids(shapes.batch, shapes.H, shapes.L, shapes.S, xp=xp, device=device)
    mods = _NO_MODS if softcap_value is None and grids is None else ScoreMods(
        softcap=softcap_value, score_mod=score_mod, grids=grids)
    return AttentionProblem(
        xp=xp, device=device, shapes=shapes, q=qc, k=kc, v=vc, mask=mask, mask_mod=mask_mod,
        bias=None if bias is None else _as_dtype(bias, cdtype, xp),
        alibi_slopes=None if alibi_slopes is None else xp.astype(alibi_slopes, cdtype),
        window=Window.merge(causal=causal, window=window_value), alignment=alignment,
        shift=alignment_shift(shapes.L, shapes.S, alignment),
        mods=mods,
        keep=keep, scale=scale_value, dropout_p=p, masked_rows=masked_rows, layout=layout,
        in_dtype=q.dtype, compute_dtype=cdtype, precision=precision,
        implementation=implementation,
        sinks=None if sinks is None else xp.astype(sinks, cdtype),
        attention_chunk=None if attention_chunk is None else int(attention_chunk),
        qv=None if qv is None else to_rank3(xp.astype(qv, cdtype, copy=False), xp),
    )
