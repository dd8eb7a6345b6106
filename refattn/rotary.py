"""Rotary position embeddings (RoPE), computed in float64.

``apply_rotary_emb`` reproduces ``flash_attn.layers.rotary.apply_rotary_emb`` (the
semantics of Dao-AILab/flash-attention's ``flash_attn/layers/rotary.py``): the first
``rotary_dim = 2 * cos.shape[-1]`` features of every head are rotated by the angle of
the token's position, the rest pass through unchanged. Two pairings of the features:

* half-split (GPT-NeoX, ``interleaved=False``): feature d pairs with d + rotary_dim / 2;
* interleaved (GPT-J, ``interleaved=True``): feature 2m pairs with 2m + 1.

Pair m of a token at position p becomes ``(x0 cos - x1 sin, x0 sin + x1 cos)`` with
``cos = cos[p, m]``, ``sin = sin[p, m]``: the complex product ``(x0 + i x1)
(cos + i sin)``. The flash-attn KV-cache front-ends rotate q and the new keys with
the same function.
"""

from __future__ import annotations

import numbers
from typing import Any

from ._namespace import infer_namespace

__all__ = ["apply_rotary_emb"]


def rotate(x: Any, cos: Any, sin: Any, positions: Any, *, interleaved: bool, xp: Any) -> Any:
    """``x`` (..., T, H, D) rotated at integer ``positions`` (..., T), in x's dtype.

    The one rotation behind :func:`apply_rotary_emb` and the KV-cache front-ends of
    ``refattn.compat``; the caller has checked the shapes, the dtypes are left to it.
    """
    half = cos.shape[-1]
    c = xp.take(cos, xp.reshape(positions, (-1,)), axis=0)  # (N, half)
    s = xp.take(sin, xp.reshape(positions, (-1,)), axis=0)
    shape = (*positions.shape, 1, half)
    c, s = xp.reshape(c, shape), xp.reshape(s, shape)  # broadcast over the heads
    rot = x[..., :2 * half]
    if interleaved:
        x0, x1 = rot[..., 0::2], rot[..., 1::2]
    else:
        x0, x1 = rot[..., :half], rot[..., half:]
    y0 = x0 * c - x1 * s
    y1 = x0 * s + x1 * c
    if interleaved:
        rotated = xp.reshape(xp.stack([y0, y1], axis=-1), rot.shape)
    else:
        rotated = xp.concat([y0, y1], axis=-1)
    return xp.concat([rotated, x[..., 2 * half:]], axis=-1)


def _offsets(seqlen_offsets: Any, B: int, xp: Any, device: Any) -> Any:
    """seqlen_offsets as a (B, 1) int64 array."""
    if isinstance(seqlen_offsets, bool):
        raise TypeError(f"seqlen_offsets must be an int or a (B,) integer array; got "
                        f"{seqlen_offsets!r}")
    if isinstance(seqlen_offsets, numbers.Integral):
        return xp.full((B, 1), int(seqlen_offsets), dtype=xp.int64, device=device)
    if not hasattr(seqlen_offsets, "dtype") or not xp.isdtype(seqlen_offsets.dtype,
                                                               "integral"):
        raise TypeError(f"seqlen_offsets must be an int or a (B,) integer array; got "
                        f"{type(seqlen_offsets).__name__}")
    if tuple(seqlen_offsets.shape) != (B,):
        raise ValueError(f"seqlen_offsets must have shape (B,) = ({B},); got "
                         f"{tuple(seqlen_offsets.shape)}")
    return xp.reshape(xp.astype(seqlen_offsets, xp.int64), (B, 1))


def apply_rotary_emb(
    x: Any,
    cos: Any,
    sin: Any,
    interleaved: bool = False,
    seqlen_offsets: Any = 0,
    cu_seqlens: Any = None,
    max_seqlen: int | None = None,
    *,
    xp: Any = None,
) -> Any:
    """Rotary position embedding of ``x``, as ``flash_attn.layers.rotary.apply_rotary_emb``.

    Computed in float64 and rounded once to x's dtype; ``x`` is not modified (flash-attn's
    ``inplace=True`` has no counterpart: assign the result).

    Parameters
    ----------
    x : array
        (B, T, H, D), or packed (total, H, D) with ``cu_seqlens``.
    cos, sin : array
        (T_ro, rotary_dim / 2): row p holds the cosines (sines) of position p's angles.
        ``rotary_dim`` may be below D: features ``rotary_dim ..`` pass through.
    interleaved : bool
        False (the default): GPT-NeoX pairing, feature d with d + rotary_dim / 2. True:
        GPT-J pairing, features 2m and 2m + 1.
    seqlen_offsets : int or integer array
        Position of each sequence's first token: an int, or (B,) per sequence. Token t of
        sequence b sits at position ``t + seqlen_offsets[b]``.
    cu_seqlens : integer array, optional
        (B + 1,) offsets of packed sequences in ``x``; positions restart at each
        sequence's start.
    max_seqlen : int, optional
        Accepted for flash-attn's signature; the positions need no bound beyond T_ro.
    xp : namespace or str, optional
        Array namespace of the inputs or its name; inferred when None.

    Returns
    -------
    array
        x's shape and dtype.

    Raises
    ------
    TypeError
        Mixed libraries, non-floating ``x``/``cos``/``sin``, non-integer offsets.
    ValueError
        ``cos`` and ``sin`` of different shapes or not 2-D, ``rotary_dim`` above D, a
        position beyond ``T_ro - 1``, malformed ``cu_seqlens``.

    Examples
    --------
    >>> import numpy as np
    >>> from refattn import apply_rotary_emb
    >>> theta = np.array([[0.0], [np.pi / 2]])          # positions 0 and 1, one pair
    >>> x = np.array([1.0, 0.0, 5.0]).reshape(1, 1, 1, 3)   # rotary_dim 2 < D = 3
    >>> apply_rotary_emb(x, np.cos(theta), np.sin(theta), seqlen_offsets=1).round(12)
    array([[[[0., 1., 5.]]]])

    Interleaved pairs rotate as complex numbers:

    >>> x = np.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4)
    >>> ang = np.array([[0.3, 0.7]])
    >>> y = apply_rotary_emb(x, np.cos(ang), np.sin(ang), interleaved=True)
    >>> z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * ang)
    >>> bool(np.allclose(y[..., 0::2], z.real) and np.allclose(y[..., 1::2], z.imag))
    True
    """
    xp, device = infer_namespace({"x": x, "cos": cos, "sin": sin},
                                 {"cu_seqlens": cu_seqlens,
                                  "seqlen_offsets": seqlen_offsets
                                  if hasattr(seqlen_offsets, "dtype") else None},
                                 xp=xp, required=("x", "cos", "sin"))
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved must be True or False; got {interleaved!r}")
    if cos.ndim != 2 or tuple(cos.shape) != tuple(sin.shape):
        raise ValueError(f"cos and sin must both be (T_ro, rotary_dim / 2); got shapes "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    packed = cu_seqlens is not None
    want = 3 if packed else 4
    if x.ndim != want:
        legend = "(total, H, D) with cu_seqlens" if packed else "(B, T, H, D)"
        raise ValueError(f"x must be {want}-D {legend}; got shape {tuple(x.shape)}")
    if 2 * cos.shape[1] > x.shape[-1]:
        raise ValueError(f"rotary_dim = 2 * cos.shape[-1] = {2 * cos.shape[1]} exceeds the "
                         f"head dimension {x.shape[-1]}")
    if packed:
        if not xp.isdtype(cu_seqlens.dtype, "integral") or cu_seqlens.ndim != 1:
            raise TypeError(f"cu_seqlens must be a 1-D integer array; got dtype "
                            f"{cu_seqlens.dtype}, shape {tuple(cu_seqlens.shape)}")
        cu = xp.astype(cu_seqlens, xp.int64)
        total = x.shape[0]
        if (cu.shape[0] < 2 or int(cu[0]) != 0 or int(cu[-1]) != total
                or bool(xp.any(cu[1:] < cu[:-1]))):
            raise ValueError(f"cu_seqlens must run non-decreasing from 0 to {total}; got "
                             f"{[int(c) for c in cu]}")
        tokens = xp.arange(total, dtype=xp.int64, device=device)
        seg = xp.astype(xp.searchsorted(cu[1:], tokens, side="right"), xp.int64)
        offsets = _offsets(seqlen_offsets, cu.shape[0] - 1, xp, device)[:, 0]
        positions = tokens - xp.take(cu, seg, axis=0) + xp.take(offsets, seg, axis=0)
    else:
        B, T = x.shape[0], x.shape[1]
        positions = (xp.reshape(xp.arange(T, dtype=xp.int64, device=device), (1, T))
                     + _offsets(seqlen_offsets, B, xp, device))
    if positions.shape[0] and (int(xp.max(positions)) >= cos.shape[0]
                               or int(xp.min(positions)) < 0):
        raise ValueError(f"positions run from {int(xp.min(positions))} to "
                         f"{int(xp.max(positions))}, beyond cos/sin's {cos.shape[0]} rows")
    f64 = xp.float64
    out = rotate(xp.astype(x, f64), xp.astype(cos, f64), xp.astype(sin, f64), positions,
                 interleaved=interleaved, xp=xp)
    return xp.astype(out, x.dtype)
