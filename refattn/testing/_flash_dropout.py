"""Decoding flash-attn's dropout decisions into refattn's dropout keep-mask."""

from __future__ import annotations

import numbers
from typing import Any

import array_api_compat

from .._namespace import check_array, library_name, namespace_library
from .._types import Array, Namespace
from ._baseline import EPS, dtype_name

__all__ = ["decode_flash_dropout_mask"]


def decode_flash_dropout_mask(S_dmask: Array, seqlen_q: int | None = None,
                              seqlen_k: int | None = None, *, xp: Namespace = None) -> Array:
    """Turn flash-attn's ``S_dmask`` into refattn's dropout keep-mask (True = kept).

    ``flash_attn_func(..., dropout_p=p, return_attn_probs=True)`` returns, as its last
    value, ``S_dmask`` of shape (B, H, L_rounded, S_rounded): the probabilities of the
    softmax with the dropout decision in the sign bit, negative where the weight was
    dropped. (Its lengths are rounded up to the kernel's block size; flash-attn 2 stores
    it in plain row-major order, earlier versions in the order of their MMA tiles,
    which flash-attn's tests untangle with ``convert_flash_attn_S_to_softmax``.)
    The keep-mask is therefore ``S_dmask >= 0``, cropped to (L, S), which is what
    flash-attn's own tests use. Entries that the kernel masks (causal, window, padding)
    hold zeros and decode as kept; as their weight is 0, keeping them changes nothing.
    A weight that underflowed to zero and was dropped is stored as -0.0 and decodes as
    kept for the same reason.

    Parameters
    ----------
    S_dmask : array
        (..., L_rounded, S_rounded) floating array from flash-attn.
    seqlen_q, seqlen_k : int, optional
        The true lengths L and S to crop to; None keeps that axis whole.
    xp : namespace or str, optional
        Array namespace of ``S_dmask`` or its name (``"numpy"``, ``"torch"``, ...);
        inferred when None, and checked against ``S_dmask`` when given.

    Returns
    -------
    array
        Boolean keep-mask (..., L, S), True = kept, for ``refattn.attention``'s
        ``dropout_mask`` (with ``layout``-independent (B, H, L, S) order).

    Raises
    ------
    TypeError
        A non-floating ``S_dmask`` or non-int lengths.
    ValueError
        Fewer than 2 dimensions, or lengths outside the array.

    Examples
    --------
    >>> import numpy as np
    >>> from refattn.testing import decode_flash_dropout_mask
    >>> S_dmask = np.array([[[0.25, -0.5, 0.0], [-0.125, 0.75, 0.0]]])  # H=1, 2 x 3
    >>> decode_flash_dropout_mask(S_dmask, seqlen_q=2, seqlen_k=2)
    array([[[ True, False],
            [False,  True]]])
    """
    check_array("S_dmask", S_dmask)
    if not array_api_compat.is_array_api_obj(S_dmask):
        raise TypeError(f"S_dmask must be an array; got {type(S_dmask).__name__}")
    if xp is not None and namespace_library(xp) != library_name(S_dmask):
        raise TypeError(f"xp is the {namespace_library(xp)} namespace but S_dmask is a "
                        f"{library_name(S_dmask)} array")
    # Inferred even when given, as the front door does: xp may be a name ("numpy").
    xp = array_api_compat.array_namespace(S_dmask)
    if dtype_name(S_dmask) not in EPS:
        raise TypeError(f"S_dmask must be a floating array (flash-attn's fp16/bf16); got "
                        f"dtype {S_dmask.dtype}")
    if S_dmask.ndim < 2:
        raise ValueError(f"S_dmask must be (..., L_rounded, S_rounded); got shape "
                         f"{tuple(S_dmask.shape)}")
    index: list[Any] = [slice(None), slice(None)]
    for axis, (name, n) in enumerate((("seqlen_q", seqlen_q), ("seqlen_k", seqlen_k))):
        if n is None:
            continue
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(f"{name} must be an int; got {n!r}")
        size = S_dmask.shape[axis - 2]
        if not 0 <= n <= size:
            raise ValueError(f"{name} must lie in [0, {size}] (the rounded length of "
                             f"S_dmask's axis {axis - 2}); got {n}")
        index[axis] = slice(0, int(n))
    keep = S_dmask >= 0
    return keep[(..., *index)]
