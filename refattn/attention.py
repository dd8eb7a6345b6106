"""The general front door: ``attention(q, k, v, ...)``.

This module checks and normalises the options once, then hands plain arrays in the
compute dtype to one implementation path. It holds no arithmetic of its own.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from . import _threads, _validate
from ._agnostic._accurate import compensated_attention, compensated_backward
from ._agnostic._backward import direct_backward, sum_to_shape
from ._agnostic._blocked import blocked_attention, blocked_attention_backward
from ._agnostic._direct import DirectResult, direct_attention
from ._agnostic._masks import (
    alibi_bias,
    alignment_shift,
    evaluate_mask_mod,
    index_grids,
    merge_windows,
    window_mask,
)
from ._agnostic._scores import ScoreMods
from ._agnostic._softmax import MASKED_ROW_POLICIES
from ._namespace import infer_namespace, library_name

__all__ = ["AttentionGrads", "AttentionResult", "attention", "attention_backward"]

LAYOUTS = ("BHLD", "BLHD")
IMPLEMENTATIONS = (None, "direct", "blocked", "cuda")
# Array libraries whose arrays the fused CUDA kernels take (a module constant so the
# tests can route NumPy arrays to the kernels run on the CPU shim).
_KERNEL_LIBRARIES = frozenset({"cupy"})
# implementation=None materialises the scores (the direct path) up to this many score
# elements (..., H, L, S), 2**20 = 8 MiB in float64 with about five such arrays alive
# at once, and runs the blocked path above it: there the direct path's memory grows
# with L x S while the blocked path's stays per block, and the blocked path's worker
# threads and cache-sized blocks make it the faster one too; measured on 2 cores, the
# two cross near 2**20 scores (docs/performance.rst).
DIRECT_MAX_SCORES = 2**20
PRECISIONS = ("standard", "compensated")

_SHAPE_LEGEND = "(B batch, H query heads, L queries, S keys)"


class AttentionResult(NamedTuple):
    """What ``attention`` returns when a ``return_*`` flag is set.

    Fields that were not asked for are None.

    Attributes
    ----------
    out : array
        (..., H, L, Ev) output (in the input layout).
    lse : array or None
        (..., H, L) natural-log log-sum-exp of the final scores; -inf on fully masked rows.
    weights : array or None
        (..., H, L, S) softmax probabilities, before dropout.
    dropout_mask : array or None
        The boolean keep-mask that was applied (True = kept), as given or as drawn.
    """

    out: Any
    lse: Any
    weights: Any
    dropout_mask: Any


@dataclass(frozen=True)
class _Prepared:
    """Validated, normalised inputs in the compute dtype, heads on axis -3, rank >= 3."""

    xp: Any
    device: Any
    shapes: _validate.AttentionShapes
    q: Any
    k: Any
    v: Any
    user_bias: Any  # the user's bias alone, and the ALiBi slopes: the blocked path adds
    alibi: Any  # ALiBi per block; the others read ``bias``, both folded at (..., H, L, S)
    user_mask: Any  # the user's mask; mask_mod is ANDed in by ``mask`` (on demand), and
    mask_mod: Any  # applied per block by the blocked path; the window is kept apart
    window: tuple[int | None, int | None] | None  # causal and window merged
    alignment: str
    shift: int
    mods: ScoreMods
    keep: Any
    keep_user: Any
    scale: float
    dropout_p: float
    masked_rows: str
    layout: str
    in_dtype: Any
    compute_dtype: Any

    @functools.cached_property
    def mask(self) -> Any:
        """The user's mask AND mask_mod evaluated on the whole grid (the direct path's,
        the kernels'); the blocked path takes ``user_mask`` and evaluates the mask_mod
        per block instead."""
        if self.mask_mod is None:
            return self.user_mask
        assert self.mods.grids is not None
        modded = evaluate_mask_mod(self.mask_mod, self.mods.grids, xp=self.xp)
        _validate.check_broadcastable("mask_mod's result", modded, self.shapes.scores,
                                      _SHAPE_LEGEND)
        return modded if self.user_mask is None else self.xp.logical_and(self.user_mask, modded)

    @functools.cached_property
    def bias(self) -> Any:
        """The user's bias with ALiBi added (both additive, after softcap), built on
        demand so that the blocked path never materialises the (..., H, L, S) ALiBi."""
        if self.alibi is None:
            return self.user_bias
        alibi = alibi_bias(self.alibi, self.shapes.L, self.shapes.S, shift=self.shift,
                           xp=self.xp)
        return alibi if self.user_bias is None else self.user_bias + alibi

    @property
    def allowed(self) -> Any:
        """The mask AND the positional window, materialised at (L, S) when there is one.

        Built on demand: the blocked path takes ``blocked_structure`` instead, so that
        the window's edges skip blocks.
        """
        if self.window is None:
            return self.mask
        left, right = self.window
        pos = window_mask(self.shapes.L, self.shapes.S, left=left, right=right,
                          shift=self.shift, xp=self.xp, device=self.device)
        return pos if self.mask is None else self.xp.logical_and(self.mask, pos)

    @property
    def blocked_structure(self) -> dict[str, Any]:
        """The blocked path's arguments: the window's right edge as a (moved) causal
        diagonal and its left edge as a lower one, both skipping the blocks they hide,
        and the user's bias and ALiBi slopes apart: nothing positional is materialised
        at (L, S)."""
        left, right = self.window or (None, None)
        return {
            "allowed": self.user_mask, "mask_mod": self.mask_mod, "causal": right is not None,
            "window_left": left,
            "alignment": self.alignment, "diagonal_offset": 0 if right is None else right,
            "bias": self.user_bias, "alibi_slopes": self.alibi,
        }


def _compute_dtype(compute_dtype: Any, xp: Any) -> Any:
    if compute_dtype is None:
        return xp.float64
    for name in ("float64", "float32"):
        if compute_dtype == name or compute_dtype == getattr(xp, name):
            return getattr(xp, name)
    raise ValueError(
        f"compute_dtype must be None (float64), 'float64' or 'float32'; got {compute_dtype!r}"
    )


def _to_rank3(x: Any, xp: Any) -> Any:
    # A 2-D input has no head axis: give it one of size 1 so every path sees (..., H, L, D).
    return xp.reshape(x, (1, *x.shape)) if x.ndim == 2 else x


def _swap_head_axis(x: Any, xp: Any) -> Any:
    # BLHD <-> BHLD: exchange axes -3 and -2 (no-op meaning for 2-D inputs, which have no heads).
    if x.ndim < 3:
        return x
    axes = list(range(x.ndim))
    axes[-3], axes[-2] = axes[-2], axes[-3]
    return xp.permute_dims(x, tuple(axes))


def _draw_keep_mask(rng: Any, dropout_p: float, shape: tuple[int, ...]) -> np.ndarray:
    # Drawn on the host with NumPy so that every backend and kernel sees the same mask.
    if isinstance(rng, np.random.Generator):
        generator = rng
    elif isinstance(rng, numbers.Integral) and not isinstance(rng, bool):
        generator = np.random.default_rng(int(rng))
    else:
        raise TypeError(f"rng must be an int seed or a numpy.random.Generator; got {rng!r}")
    return generator.random(shape) >= dropout_p


def _check_window(window: Any) -> tuple[int | None, int | None] | None:
    # (left, right) with None or -1 meaning "unlimited on that side" (flash-attn's -1).
    if window is None:
        return None
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"window must be a pair (left, right) or None; got {window!r}")
    sides = []
    for side, value in zip(("left", "right"), window, strict=True):
        if value is None or (isinstance(value, numbers.Integral) and not isinstance(value, bool)
                             and value == -1):
            sides.append(None)
        elif isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0:
            sides.append(int(value))
        else:
            raise ValueError(
                f"window's {side} edge must be a non-negative int, or None / -1 for "
                f"unlimited; got {value!r}"
            )
    return sides[0], sides[1]


def _check_softcap(softcap: Any) -> float | None:
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


def _check_callable(name: str, fn: Any) -> None:
    if fn is not None and not callable(fn):
        raise TypeError(f"{name} must be a callable or None; got {type(fn).__name__}")


def _prepare(
    q: Any, k: Any, v: Any, *, mask: Any, bias: Any, causal: Any, alignment: Any, scale: Any,
    dropout_p: Any, dropout_mask: Any, rng: Any, masked_rows: Any, layout: Any,
    compute_dtype: Any, precision: Any, implementation: Any, xp: Any, window: Any = None,
    softcap: Any = None, alibi_slopes: Any = None, score_mod: Any = None,
    mask_mod: Any = None,
) -> _Prepared:
    xp, device = infer_namespace(
        {"q": q, "k": k, "v": v, "bias": bias, "alibi_slopes": alibi_slopes},
        {"mask": mask, "dropout_mask": dropout_mask}, xp=xp,
    )
    window_sides = _check_window(window)
    softcap_value = _check_softcap(softcap)
    _check_callable("score_mod", score_mod)
    _check_callable("mask_mod", mask_mod)
    _validate.check_choice("layout", layout, LAYOUTS)
    _validate.check_choice("masked_rows", masked_rows, MASKED_ROW_POLICIES)
    _validate.check_choice("precision", precision, PRECISIONS)
    _validate.check_choice("implementation", implementation, IMPLEMENTATIONS)
    _validate.check_alignment(alignment)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False; got {causal!r}")
    if layout == "BLHD":
        q, k, v = (_swap_head_axis(x, xp) for x in (q, k, v))
    shapes = _validate.check_qkv(q, k, v, layout=layout)
    scores_shape = shapes.scores
    if mask is not None:
        if not xp.isdtype(mask.dtype, "bool"):
            raise TypeError(
                f"mask must be a boolean array (True = take part); got dtype {mask.dtype}. "
                "Pass additive float masks as bias="
            )
        _validate.check_broadcastable("mask", mask, scores_shape, _SHAPE_LEGEND)
    if bias is not None:
        _validate.check_broadcastable("bias", bias, scores_shape, _SHAPE_LEGEND)
    scale_value = _validate.check_scale(scale, shapes.E)
    p = _validate.check_dropout_p(dropout_p)
    keep = keep_user = None
    if p == 0.0:
        if dropout_mask is not None or rng is not None:
            raise ValueError(
                "dropout_mask or rng given but dropout_p is 0; set dropout_p to the "
                "probability the mask was drawn with"
            )
    else:
        if dropout_mask is None and rng is None:
            raise ValueError(
                f"dropout_p={p} needs an explicit dropout_mask (bool, True = keep) or an "
                "rng (int seed or numpy.random.Generator): the oracle never draws random "
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
            _validate.check_broadcastable("dropout_mask", dropout_mask, scores_shape, _SHAPE_LEGEND)
            keep_user = dropout_mask
        else:
            keep_user = xp.asarray(_draw_keep_mask(rng, p, shapes.user_scores), device=device)
        if p == 1.0 and bool(xp.any(keep_user)):
            raise ValueError(
                "dropout_p=1 drops every weight, but dropout_mask keeps some; "
                "use a mask of all False or a smaller dropout_p"
            )
        keep = keep_user
    if alibi_slopes is not None:
        _validate.check_broadcastable(
            "alibi_slopes", alibi_slopes, (*shapes.batch, shapes.H), "(batch dims, H)")
        if alibi_slopes.ndim == 0:
            raise ValueError("alibi_slopes must have a head axis: shape (H,) or (B, H); got ()")
    cdtype = _compute_dtype(compute_dtype, xp)
    nonadditive = [name for name, value in (("softcap", softcap_value), ("score_mod", score_mod))
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
    # copy=False: no path writes into its inputs, and copying float64 inputs to float64
    # cost the blocked path a fifth of its time at B=4, H=16, L=S=256 (fresh pages).
    qc, kc, vc = (_to_rank3(xp.astype(x, cdtype, copy=False), xp) for x in (q, k, v))
    user_bias = None if bias is None else xp.astype(bias, cdtype, copy=False)
    shift = alignment_shift(shapes.L, shapes.S, alignment)
    # ALiBi is additive and comes right after the bias (``_Prepared.bias`` folds it in).
    slopes = None if alibi_slopes is None else xp.astype(alibi_slopes, cdtype)
    grids = None
    if score_mod is not None or mask_mod is not None:
        grids = index_grids(shapes.batch, shapes.H, shapes.L, shapes.S, xp=xp, device=device)
    return _Prepared(
        xp=xp, device=device, shapes=shapes, q=qc, k=kc, v=vc,
        user_bias=user_bias, alibi=slopes, user_mask=mask, mask_mod=mask_mod,
        window=merge_windows(causal, window_sides), alignment=alignment, shift=shift,
        mods=ScoreMods(softcap=softcap_value, score_mod=score_mod, grids=grids),
        keep=keep, keep_user=keep_user, scale=scale_value, dropout_p=p,
        masked_rows=masked_rows, layout=layout, in_dtype=q.dtype, compute_dtype=cdtype,
    )


def _use_blocked(prep: _Prepared, implementation: str | None) -> bool:
    # The explicit choice wins; None goes by the size of the score array.
    if implementation is not None:
        return implementation == "blocked"
    return math.prod(prep.shapes.scores) > DIRECT_MAX_SCORES


def _use_cuda(prep: _Prepared, implementation: str | None, options: dict[str, Any]) -> bool:
    # Kernels for CuPy inputs whose options they implement; "cuda" insists, None falls
    # back to the array-API path (the results are the same up to rounding).
    library = library_name(prep.q)
    if implementation not in (None, "cuda"):
        return False
    if library not in _KERNEL_LIBRARIES:
        if implementation == "cuda":
            raise ValueError(
                f"implementation='cuda' runs on CuPy arrays; got {library} arrays (use "
                "implementation=None, 'direct' or 'blocked')"
            )
        return False
    from . import _cuda

    reason = _cuda.unsupported_option(head_dim=prep.shapes.E, value_head_dim=prep.shapes.Ev,
                                      **options)
    if reason is not None and implementation == "cuda":
        raise ValueError(f"implementation='cuda' does not support {reason}")
    return reason is None


def _cuda_options(prep: _Prepared) -> dict[str, Any]:
    # What the kernels take: the mask (with mask_mod ANDed in) and the window apart, so
    # that the window skips tiles and the mask is read through its broadcast strides.
    return {
        "scale": prep.scale, "window": prep.window, "alignment": prep.alignment,
        "mask": prep.mask, "bias": prep.bias, "dropout_mask": prep.keep,
        "dropout_p": prep.dropout_p, "masked_rows": prep.masked_rows,
        "softcap": prep.mods.softcap, "compute_dtype": prep.compute_dtype, "xp": prep.xp,
    }


def _cuda_forward(prep: _Prepared, implementation: str | None, need_lse: bool) -> Any:
    from . import _cuda

    try:
        out, lse = _cuda.flash_attention(
            prep.q, prep.k, prep.v, batch_shape=prep.shapes.batch, need_lse=need_lse,
            **_cuda_options(prep),
        )
    except _cuda.UnsupportedLaunch as exc:
        # Known only at launch (shared memory of this device): same rule as above.
        if implementation == "cuda":
            raise ValueError(f"implementation='cuda' does not support {exc}") from None
        return None
    return DirectResult(out=out, lse=lse, weights=None)


def _array_api_forward(prep: _Prepared, implementation: str | None, precision: str,
                       return_weights: bool) -> Any:
    # The xp path: compensated arithmetic, the blocked online softmax or the direct one.
    if precision == "compensated":
        return compensated_attention(
            prep.q, prep.k, prep.v, scale=prep.scale, bias=prep.bias, allowed=prep.allowed,
            keep=prep.keep, dropout_p=prep.dropout_p, masked_rows=prep.masked_rows,
            need_weights=return_weights, xp=prep.xp,
        )
    if _use_blocked(prep, implementation):
        with _threads.worker_threads(prep.xp) as num_threads:
            return blocked_attention(
                prep.q, prep.k, prep.v, scale=prep.scale,
                keep=prep.keep, dropout_p=prep.dropout_p, masked_rows=prep.masked_rows,
                **prep.blocked_structure, return_weights=return_weights,
                num_threads=num_threads, mods=prep.mods, xp=prep.xp,
            )
    return direct_attention(
        prep.q, prep.k, prep.v, scale=prep.scale, bias=prep.bias, allowed=prep.allowed,
        keep=prep.keep, dropout_p=prep.dropout_p, masked_rows=prep.masked_rows,
        mods=prep.mods, xp=prep.xp,
    )


def _finish(x: Any, prep: _Prepared, *, swap: bool) -> Any:
    # Back to the user's rank, layout and dtype.
    xp = prep.xp
    if prep.shapes.ndim == 2:
        x = x[0, ...]
    if swap and prep.layout == "BLHD":
        x = _swap_head_axis(x, xp)
    return xp.astype(x, prep.in_dtype, copy=False)


def attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    mask: Any = None,
    bias: Any = None,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    alignment: str = "top_left",
    scale: float | None = None,
    softcap: float | None = None,
    alibi_slopes: Any = None,
    score_mod: Any = None,
    mask_mod: Any = None,
    dropout_p: float = 0.0,
    dropout_mask: Any = None,
    rng: Any = None,
    masked_rows: str = "zero",
    layout: str = "BHLD",
    compute_dtype: Any = None,
    precision: str = "standard",
    implementation: str | None = None,
    return_weights: bool = False,
    return_lse: bool = False,
    return_dropout_mask: bool = False,
    xp: Any = None,
) -> Any:
    """Scaled dot-product attention, computed in float64 by default.

    ``softmax(scale * q @ k^T + bias, masked) @ v`` with the masks, causal structure,
    grouped-query heads and dropout of the options below. Inputs of any real floating
    dtype are computed in ``compute_dtype`` (float64 unless asked otherwise) and the
    results are cast back to the input dtype, in the input's namespace and device.

    Parameters
    ----------
    q, k, v : array
        Queries (..., H, L, E), keys (..., K, S, E) and values (..., Kv, S, Ev) of one
        array library, with one real floating dtype. K and Kv must divide H; query head
        h reads key head ``h // (H // K)`` and value head ``h // (H // Kv)``
        (grouped-query attention; K = Kv = H is ordinary multi-head attention). Leading
        dims broadcast against each other. 2-D inputs (L, E) have no head axis.
    mask : bool array, optional
        True where a query may attend a key; broadcastable to (..., H, L, S).
    bias : float array, optional
        Added to the scaled scores; broadcastable to (..., H, L, S). -inf entries mask.
    causal : bool
        Restrict query i to keys j <= i + shift (see ``alignment``); combined with
        ``mask`` by logical AND. The same as ``window=(None, 0)``.
    window : (left, right), optional
        Sliding window: query i sees keys j with i + shift - left <= j <= i + shift +
        right; None or -1 leaves that side unlimited. With ``causal`` the two intersect.
    alignment : {"top_left", "bottom_right"}
        shift = 0 (torch's ``is_causal``) or S - L (flash-attn, decoding), for causal,
        windows and ALiBi alike.
    scale : float, optional
        Multiplies q @ k^T; defaults to 1/sqrt(E). Zero gives the mean of the attended
        values; negative values are allowed.
    softcap : float, optional
        ``c * tanh(s / c)`` on the scaled scores, before the bias (flash-attn, Gemma).
    alibi_slopes : float array, optional
        (H,) or (..., H) slopes: adds ``-slope * |i + shift - j|`` after the bias.
    score_mod : callable, optional
        ``score_mod(score, b, h, q_idx, kv_idx)`` (FlexAttention's), evaluated once on the
        whole score array after ALiBi with broadcast integer index grids: b (..., 1, 1, 1)
        the flat batch index, h (H, 1, 1), q_idx (L, 1), kv_idx (1, S). Use operators and
        the namespace's functions so it runs on every library.
    mask_mod : callable, optional
        ``mask_mod(b, h, q_idx, kv_idx)`` returning a boolean array (True = take part),
        ANDed with the other masks.
    dropout_p : float
        Probability of dropping a weight; kept weights are scaled by 1/(1 - dropout_p).
        ``dropout_p=1`` gives zeros. Needs ``dropout_mask`` or ``rng``.
    dropout_mask : bool array, optional
        Keep-mask (True = kept), broadcastable to (..., H, L, S).
    rng : int or numpy.random.Generator, optional
        Seed or generator used to draw the keep-mask on the host with NumPy, at the
        full score shape; ask for it back with ``return_dropout_mask``.
    masked_rows : {"zero", "nan", "uniform"}
        Result for a query row whose every score is -inf: output 0 (torch's SDPA), NaN
        (plain softmax), or the mean of all values (JAX's finite fill).
    layout : {"BHLD", "BLHD"}
        Axis order of q, k, v and the output: heads before positions (torch) or after
        (flash-attn). Weights and LSE are always (..., H, L[, S]).
    compute_dtype : {None, "float64", "float32"}
        Dtype of the computation; None means float64 whatever the input dtype.
    precision : {"standard", "compensated"}
        Arithmetic of the computation: plain float64, or double-float logits, exp and
        sums rounded once at the end (within about half an ulp of the exact result
        whatever the logit size; several times slower; float64 direct path only; see
        docs/accuracy.rst).
    implementation : {None, "direct", "blocked", "cuda"}
        Which path computes. "cuda" runs the fused CUDA kernel on CuPy arrays (the
        options it lacks are named in an error; None uses it for CuPy inputs whose
        options it has, see docs/gpu.rst). Both array-API paths take every variant;
        on "blocked" softcap, ALiBi, score_mod and mask_mod are applied block by block
        (the mods are called once per block with that block's index grids) and a
        window's edges skip the key blocks they hide: nothing is materialised at
        (..., H, L, S) there but the user's own mask and bias. "direct" materialises the
        (..., H, L, S) scores;
        "blocked" runs an online softmax over cache-sized blocks with extra memory
        O(block) per worker thread, skips key blocks the causal mask hides, and computes
        ``weights`` (when asked) block by block from each row's final max and sum. None
        takes "direct" up to ``DIRECT_MAX_SCORES`` (2**20) score elements and
        "blocked" above. Both give the same results up to rounding. The blocked path
        runs ``refattn.get_num_threads()`` worker threads on NumPy-backed arrays (see
        ``refattn.set_num_threads``).
    return_weights, return_lse, return_dropout_mask : bool
        Return an ``AttentionResult`` with these fields filled in.
    xp : namespace, optional
        The array namespace of the inputs; inferred when None. A namespace that does not
        match the inputs is an error.

    Returns
    -------
    array or AttentionResult
        The output (..., H, L, Ev) alone, or an ``AttentionResult`` when a ``return_*``
        flag is set. ``dropout_mask`` is None when there was no dropout.

    Raises
    ------
    TypeError
        Mixed libraries, non-arrays, integer/complex data, mismatched dtypes, a non-bool
        mask.
    ValueError
        Incompatible shapes, heads that do not divide, bad option values, dropout without
        a keep-mask or seed.

    Examples
    --------
    >>> import numpy as np
    >>> import refattn
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((2, 4, 5, 8))   # B=2, H=4, L=5, E=8
    >>> k = rng.standard_normal((2, 2, 7, 8))   # K=2 key heads (grouped-query)
    >>> v = rng.standard_normal((2, 2, 7, 3))   # S=7, Ev=3
    >>> out = refattn.attention(q, k, v, causal=True, alignment="bottom_right")
    >>> out.shape
    (2, 4, 5, 3)
    >>> res = refattn.attention(q, k, v, return_weights=True, return_lse=True)
    >>> bool(np.allclose(res.weights.sum(axis=-1), 1.0))
    True
    >>> res.lse.shape
    (2, 4, 5)

    Variants compose in a fixed order (scale, softcap, bias, ALiBi, score_mod, masks):

    >>> out = refattn.attention(q, k, v, window=(2, 0), softcap=30.0,
    ...                         alibi_slopes=np.full(4, 0.5), alignment="bottom_right")
    >>> out.shape
    (2, 4, 5, 3)
    """
    prep = _prepare(
        q, k, v, mask=mask, bias=bias, causal=causal, alignment=alignment, scale=scale,
        dropout_p=dropout_p, dropout_mask=dropout_mask, rng=rng, masked_rows=masked_rows,
        layout=layout, compute_dtype=compute_dtype, precision=precision,
        implementation=implementation, xp=xp, window=window, softcap=softcap,
        alibi_slopes=alibi_slopes, score_mod=score_mod, mask_mod=mask_mod,
    )
    options = {
        "mask": mask, "bias": bias, "causal": causal, "window": window, "alignment": alignment,
        "scale": scale, "softcap": softcap, "alibi_slopes": alibi_slopes,
        "score_mod": score_mod, "mask_mod": mask_mod, "dropout_p": dropout_p,
        "dropout_mask": dropout_mask, "rng": rng, "masked_rows": masked_rows,
        "compute_dtype": compute_dtype, "precision": precision,
        "return_weights": return_weights, "return_lse": return_lse,
        "return_dropout_mask": return_dropout_mask,
    }
    res = _cuda_forward(prep, implementation, return_lse) \
        if _use_cuda(prep, implementation, options) else None
    if res is None:
        res = _array_api_forward(prep, implementation, precision, return_weights)
    out = _finish(res.out, prep, swap=True)
    if not (return_weights or return_lse or return_dropout_mask):
        return out
    return AttentionResult(
        out=out,
        lse=_finish(res.lse, prep, swap=False) if return_lse else None,
        weights=_finish(res.weights, prep, swap=False) if return_weights else None,
        dropout_mask=prep.keep_user if return_dropout_mask else None,
    )


# --- backward -------------------------------------------------------------------------

# The backward pass exists for the array-API paths and the fused kernels (for the
# options unsupported_option accepts); other paths may be accepted by the forward before
# they are accepted here.
_BACKWARD_IMPLEMENTATIONS = (None, "direct", "blocked", "cuda")
_BACKWARD_PRECISIONS = ("standard", "compensated")


class AttentionGrads(NamedTuple):
    """What ``attention_backward`` returns: one gradient per differentiable input.

    Attributes
    ----------
    dq, dk, dv : array
        Gradients with the shapes, layout, dtype, namespace and device of q, k, v.
    dbias : array or None
        Gradient with the shape and dtype of ``bias`` (summed over the axes it was
        broadcast along); None when there was no bias.
    """

    dq: Any
    dk: Any
    dv: Any
    dbias: Any


def _user_out_shape(prep: _Prepared) -> tuple[int, ...]:
    # The output's shape as the user sees it: the layout swap applies to rank >= 3 only.
    shape = prep.shapes.out
    if prep.layout == "BLHD" and len(shape) >= 3:
        shape = (*shape[:-3], shape[-2], shape[-3], shape[-1])
    return shape


def _check_saved_lse(lse: Any, expected: tuple[int, ...]) -> None:
    # attention(return_lse=True) gives the LSE at the batch shape of the scores, which
    # lacks batch dims that only v carries; so leading dims may be 1 or absent, while the
    # trailing (H, L) must match exactly (a per-head LSE cannot broadcast over heads).
    shape = tuple(lse.shape)
    exact = min(2, len(expected))
    ok = (
        exact <= len(shape) <= len(expected)
        and shape[len(shape) - exact:] == expected[len(expected) - exact:]
        and all(s in (1, t) for s, t in zip(shape[::-1], expected[::-1], strict=False))
    )
    if not ok:
        raise ValueError(
            f"lse of shape {shape} does not match the attention problem: expected "
            f"{expected} (..., H, L), leading dims may be 1 or left out"
        )


def _to_compute_layout(x: Any, prep: _Prepared) -> Any:
    # A user-layout (..., H, L, D) array such as grad_out to the compute form of prep.q.
    xp = prep.xp
    if prep.layout == "BLHD":
        x = _swap_head_axis(x, xp)
    return _to_rank3(xp.astype(x, prep.compute_dtype), xp)


def _finish_grad(g: Any, x_user: Any, prep: _Prepared) -> Any:
    # A 2-D input got a head axis of size 1 in _prepare; _finish drops it only when every
    # input was 2-D, so drop it here when this one alone was.
    if x_user.ndim == 2 and prep.shapes.ndim > 2:
        g = g[0, ...]
    return _finish(g, prep, swap=True)


def _cuda_backward(grad_out: Any, output: Any, lse: Any, prep: _Prepared,
                   implementation: str | None) -> Any:
    # The fused backward kernels, from the saved output and LSE when given (else from
    # the fused forward's); None when the launch turns out unsupported (shared memory).
    from . import _cuda

    xp, batch, options = prep.xp, prep.shapes.batch, _cuda_options(prep)
    try:
        out = None if output is None else _to_compute_layout(output, prep)
        if out is None or lse is None:
            fwd_out, fwd_lse = _cuda.flash_attention(prep.q, prep.k, prep.v, batch_shape=batch,
                                                     need_lse=True, **options)
            out = fwd_out if out is None else out
            lse = fwd_lse if lse is None else lse
        dq, dk, dv, dbias = _cuda.flash_attention_backward(
            _to_compute_layout(grad_out, prep), prep.q, prep.k, prep.v, out, lse,
            batch_shape=batch, need_dbias=options["bias"] is not None, **options,
        )
    except _cuda.UnsupportedLaunch as exc:
        if implementation == "cuda":
            raise ValueError(f"implementation='cuda' does not support {exc}") from None
        return None
    # Per batch entry from the kernels: sum over the batch dims an input was broadcast on.
    return AttentionGrads(dq=sum_to_shape(dq, prep.q.shape, xp=xp),
                          dk=sum_to_shape(dk, prep.k.shape, xp=xp),
                          dv=sum_to_shape(dv, prep.v.shape, xp=xp), dbias=dbias)


def attention_backward(
    grad_out: Any,
    q: Any,
    k: Any,
    v: Any,
    *,
    mask: Any = None,
    bias: Any = None,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    alignment: str = "top_left",
    scale: float | None = None,
    softcap: float | None = None,
    alibi_slopes: Any = None,
    score_mod: Any = None,
    mask_mod: Any = None,
    dropout_p: float = 0.0,
    dropout_mask: Any = None,
    rng: Any = None,
    masked_rows: str = "zero",
    layout: str = "BHLD",
    compute_dtype: Any = None,
    precision: str = "standard",
    implementation: str | None = None,
    output: Any = None,
    lse: Any = None,
    xp: Any = None,
) -> AttentionGrads:
    """Analytic gradients of ``attention`` with respect to q, k, v and bias.

    Computes, in float64 by default and without autograd, with S the final scores,
    P = softmax(S), P_drop the weights after dropout and O the output::

        dV = P_drop^T dO          dP = (dO V^T) * keep / (1 - dropout_p)
        dS = P * (dP - rowsum(dO * O))
        dQ = scale dS K           dK = scale dS^T Q          d bias = dS

    Grouped-query heads are summed back to their key/value head (key head k serves query
    heads k*G .. k*G+G-1), and gradients of broadcast inputs (batch dims, a bias of
    shape (L, S) or (H, 1, S), ...) are summed over the axes they were broadcast along.

    Parameters
    ----------
    grad_out : array
        Gradient of a loss with respect to the output: the output's shape (..., H, L, Ev)
        in ``layout``, any real floating dtype, the namespace and device of q.
    q, k, v : array
        The forward inputs, exactly as given to ``attention``.
    mask, bias, causal, alignment, scale, dropout_p, dropout_mask, rng : optional
        Exactly as given to ``attention`` for the forward pass; ``rng`` redraws the
        same keep-mask from the same seed.
    masked_rows : {"zero", "nan", "uniform"}
        The forward's policy for fully masked rows: "zero" gives them zero gradients,
        "nan" propagates the plain softmax's NaN, "uniform" (weights 1/S, a constant)
        gives dS = 0 but passes dO/S on to dV.
    layout, compute_dtype, precision : optional
        As for ``attention``. precision="compensated" recomputes the forward and every
        product of the backward in double-float and rounds each gradient once; it takes
        no ``output`` or ``lse`` (their rounding is what it avoids).
    implementation : {None, "direct", "blocked", "cuda"}
        As for ``attention``: "direct" materialises the scores; "blocked" recomputes
        the weights block by block from the LSE (FlashAttention-2's backward) with
        O(block) extra memory per worker thread; "cuda" runs the fused backward kernels
        on CuPy arrays (the same algorithm, deterministic: no atomics; see
        docs/gpu.rst); None takes "cuda" for CuPy inputs whose options the kernels
        have, else chooses by the size of the score array, as the forward does.
    output : array, optional
        The forward output to use in rowsum(dO * O) instead of recomputing it, as a
        fused backward kernel uses its saved output. Shape of ``grad_out``.
    lse : array, optional
        The forward log-sum-exp (..., H, L) to rebuild P = exp(S - lse) from instead of
        recomputing the softmax, as fused kernels do; -inf marks a fully masked row.
        Leading (batch) dims may be 1 or left out, as ``attention(return_lse=True)``
        returns them.
    xp : namespace, optional
        The array namespace of the inputs; inferred when None.

    Returns
    -------
    AttentionGrads
        ``(dq, dk, dv, dbias)``: dq, dk, dv in the shape, layout, dtype, namespace and
        device of q, k, v; dbias in the shape and dtype of ``bias``, or None.

    Raises
    ------
    TypeError
        As ``attention``; also a ``grad_out``, ``output`` or ``lse`` from another library
        or device, or not of a real floating dtype.
    ValueError
        As ``attention``; also ``grad_out``, ``output`` or ``lse`` of the wrong shape, or an
        implementation or precision the backward does not have.

    Examples
    --------
    >>> import numpy as np
    >>> import refattn
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((2, 4, 5, 8))   # B=2, H=4, L=5, E=8
    >>> k = rng.standard_normal((2, 2, 7, 8))   # K=2 key heads (grouped-query)
    >>> v = rng.standard_normal((2, 2, 7, 3))   # S=7, Ev=3
    >>> bias = rng.standard_normal((4, 1, 7))   # broadcast over batch and queries
    >>> dout = rng.standard_normal((2, 4, 5, 3))
    >>> g = refattn.attention_backward(dout, q, k, v, bias=bias, causal=True)
    >>> g.dq.shape, g.dk.shape, g.dv.shape, g.dbias.shape
    ((2, 4, 5, 8), (2, 2, 7, 8), (2, 2, 7, 3), (4, 1, 7))

    A central difference of the forward along a random direction agrees:

    >>> def loss(kk):
    ...     return np.sum(dout * refattn.attention(q, kk, v, bias=bias, causal=True))
    >>> u, h = rng.standard_normal(k.shape), 1e-5
    >>> fd = (loss(k + h * u) - loss(k - h * u)) / (2 * h)
    >>> bool(abs(fd - np.sum(g.dk * u)) < 1e-6)
    True
    """
    _validate.check_choice("implementation", implementation, _BACKWARD_IMPLEMENTATIONS)
    _validate.check_choice("precision", precision, _BACKWARD_PRECISIONS)
    prep = _prepare(
        q, k, v, mask=mask, bias=bias, causal=causal, alignment=alignment, scale=scale,
        dropout_p=dropout_p, dropout_mask=dropout_mask, rng=rng, masked_rows=masked_rows,
        layout=layout, compute_dtype=compute_dtype, precision=precision,
        implementation=implementation, xp=xp, window=window, softcap=softcap,
        alibi_slopes=alibi_slopes, score_mod=score_mod, mask_mod=mask_mod,
    )
    # q first, so that a mismatch is reported as "q is a ... array but grad_out is ...".
    infer_namespace({"q": q, "grad_out": grad_out, "output": output, "lse": lse}, xp=xp)
    out_shape = _user_out_shape(prep)
    for name, x in (("grad_out", grad_out), ("output", output)):
        if x is not None and tuple(x.shape) != out_shape:
            raise ValueError(
                f"{name} must have the output's shape {out_shape} (..., H, L, Ev in layout "
                f"{prep.layout!r}); got {tuple(x.shape)}"
            )
    xp = prep.xp
    lse_c = None
    if lse is not None:
        _check_saved_lse(lse, prep.shapes.user_scores[:-1])
        lse_c = xp.astype(lse, prep.compute_dtype)
        if prep.shapes.ndim == 2:
            lse_c = xp.reshape(lse_c, (1, *lse_c.shape))
    options = {
        "mask": mask, "bias": bias, "causal": causal, "window": window, "alignment": alignment,
        "scale": scale, "softcap": softcap, "alibi_slopes": alibi_slopes,
        "score_mod": score_mod, "mask_mod": mask_mod, "dropout_p": dropout_p,
        "dropout_mask": dropout_mask, "rng": rng, "masked_rows": masked_rows,
        "compute_dtype": compute_dtype, "precision": precision,
    }
    grads = _cuda_backward(grad_out, output, lse_c, prep, implementation) \
        if _use_cuda(prep, implementation, options) else None
    if grads is None and precision == "compensated":
        if output is not None or lse is not None:
            raise ValueError(
                "precision='compensated' recomputes the forward in double-float; do not "
                "pass output= or lse= (their float64 rounding is what it avoids)"
            )
        grads = compensated_backward(
            _to_compute_layout(grad_out, prep), prep.q, prep.k, prep.v, scale=prep.scale,
            bias=prep.bias, allowed=prep.allowed, keep=prep.keep, dropout_p=prep.dropout_p,
            masked_rows=prep.masked_rows, xp=xp,
        )
    elif grads is None and _use_blocked(prep, implementation):
        with _threads.worker_threads(xp) as num_threads:
            grads = blocked_attention_backward(
                _to_compute_layout(grad_out, prep), prep.q, prep.k, prep.v, scale=prep.scale,
                keep=prep.keep, dropout_p=prep.dropout_p,
                masked_rows=prep.masked_rows,
                out=None if output is None else _to_compute_layout(output, prep), lse=lse_c,
                **prep.blocked_structure, num_threads=num_threads, mods=prep.mods, xp=xp,
            )
    elif grads is None:
        grads = direct_backward(
            _to_compute_layout(grad_out, prep), prep.q, prep.k, prep.v, scale=prep.scale,
            bias=prep.bias, allowed=prep.allowed, keep=prep.keep, dropout_p=prep.dropout_p,
            masked_rows=prep.masked_rows,
            out=None if output is None else _to_compute_layout(output, prep), lse=lse_c,
            mods=prep.mods, xp=xp,
        )
    return AttentionGrads(
        dq=_finish_grad(grads.dq, q, prep),
        dk=_finish_grad(grads.dk, k, prep),
        dv=_finish_grad(grads.dv, v, prep),
        # The computed bias may hold ALiBi too (broadcast wider): reduce to the user's.
        dbias=None if bias is None else xp.astype(
            sum_to_shape(grads.dbias, tuple(bias.shape), xp=xp), bias.dtype),
    )
