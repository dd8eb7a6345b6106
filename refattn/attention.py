"""The general front door: ``attention(q, k, v, ...)``.

This module checks and normalises the options once, then hands plain arrays in the
compute dtype to one implementation path. It holds no arithmetic of its own.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from . import _validate
from ._agnostic._direct import direct_attention
from ._agnostic._masks import causal_mask
from ._agnostic._softmax import MASKED_ROW_POLICIES
from ._namespace import infer_namespace

__all__ = ["AttentionResult", "attention"]

LAYOUTS = ("BHLD", "BLHD")
IMPLEMENTATIONS = (None, "direct")
PRECISIONS = ("standard",)

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
    bias: Any
    allowed: Any
    keep: Any
    keep_user: Any
    scale: float
    dropout_p: float
    masked_rows: str
    layout: str
    in_dtype: Any
    compute_dtype: Any


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


def _prepare(
    q: Any, k: Any, v: Any, *, mask: Any, bias: Any, causal: Any, alignment: Any, scale: Any,
    dropout_p: Any, dropout_mask: Any, rng: Any, masked_rows: Any, layout: Any,
    compute_dtype: Any, precision: Any, implementation: Any, xp: Any,
) -> _Prepared:
    xp, device = infer_namespace(
        {"q": q, "k": k, "v": v, "bias": bias}, {"mask": mask, "dropout_mask": dropout_mask}, xp=xp
    )
    _validate.check_choice("layout", layout, LAYOUTS)
    _validate.check_choice("masked_rows", masked_rows, MASKED_ROW_POLICIES)
    _validate.check_choice("precision", precision, PRECISIONS)
    _validate.check_choice("implementation", implementation, IMPLEMENTATIONS)
    _validate.check_alignment(alignment)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False; got {causal!r}")
    if layout == "BLHD":
        q, k, v = (_swap_head_axis(x, xp) for x in (q, k, v))
    shapes = _validate.check_qkv(q, k, v)
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
    cdtype = _compute_dtype(compute_dtype, xp)
    qc, kc, vc = (_to_rank3(xp.astype(x, cdtype), xp) for x in (q, k, v))
    bias_c = None if bias is None else xp.astype(bias, cdtype)
    allowed = mask
    if causal:
        tri = causal_mask(shapes.L, shapes.S, alignment=alignment, xp=xp, device=device)
        allowed = tri if allowed is None else xp.logical_and(allowed, tri)
    return _Prepared(
        xp=xp, device=device, shapes=shapes, q=qc, k=kc, v=vc, bias=bias_c, allowed=allowed,
        keep=keep, keep_user=keep_user, scale=scale_value, dropout_p=p,
        masked_rows=masked_rows, layout=layout, in_dtype=q.dtype, compute_dtype=cdtype,
    )


def _finish(x: Any, prep: _Prepared, *, swap: bool) -> Any:
    # Back to the user's rank, layout and dtype.
    xp = prep.xp
    if prep.shapes.ndim == 2:
        x = x[0, ...]
    if swap and prep.layout == "BLHD":
        x = _swap_head_axis(x, xp)
    return xp.astype(x, prep.in_dtype)


def attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    mask: Any = None,
    bias: Any = None,
    causal: bool = False,
    alignment: str = "top_left",
    scale: float | None = None,
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
        ``mask`` by logical AND.
    alignment : {"top_left", "bottom_right"}
        shift = 0 (torch's ``is_causal``) or S - L (flash-attn, decoding).
    scale : float, optional
        Multiplies q @ k^T; defaults to 1/sqrt(E). Zero gives the mean of the attended
        values; negative values are allowed.
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
    precision : {"standard"}
        Arithmetic of the computation.
    implementation : {None, "direct"}
        Which path computes: "direct" materialises the scores; None chooses.
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
    """
    prep = _prepare(
        q, k, v, mask=mask, bias=bias, causal=causal, alignment=alignment, scale=scale,
        dropout_p=dropout_p, dropout_mask=dropout_mask, rng=rng, masked_rows=masked_rows,
        layout=layout, compute_dtype=compute_dtype, precision=precision,
        implementation=implementation, xp=xp,
    )
    res = direct_attention(
        prep.q, prep.k, prep.v, scale=prep.scale, bias=prep.bias, allowed=prep.allowed,
        keep=prep.keep, dropout_p=prep.dropout_p, masked_rows=prep.masked_rows, xp=prep.xp,
    )
    out = _finish(res.out, prep, swap=True)
    if not (return_weights or return_lse or return_dropout_mask):
        return out
    return AttentionResult(
        out=out,
        lse=_finish(res.lse, prep, swap=False) if return_lse else None,
        weights=_finish(res.weights, prep, swap=False) if return_weights else None,
        dropout_mask=prep.keep_user if return_dropout_mask else None,
    )
