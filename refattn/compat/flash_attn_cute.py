"""flash-attn 4's Python interface (``flash_attn.cute``): ``flash_attn_func`` and
``flash_attn_varlen_func`` where they differ from flash-attn 3.

Reproduces the forward pass of Dao-AILab/flash-attention's ``flash_attn/cute/interface.py``
(read at commit 0251105a). The attention is flash-attn 3's (see
:mod:`refattn.compat.flash_attn_interface`); the differences are in the interface:

* ``window_size=(left, right)`` with None for an unlimited edge (the default
  ``(None, None)``); as there, a pair whose sum is negative (``(-1, -1)``) means no
  window, and ``causal`` closes the right edge at 0. Another negative edge is refused:
  flash-attn 4 would read it as a window that excludes the diagonal, flash-attn 3 as
  unlimited;
* both functions always return the pair ``(out, lse)``, ``lse`` None unless
  ``return_lse=True`` (flash-attn 4 also computes it when an input requires grad);
* ``learnable_sink`` (H,) (an extra logit per head in the softmax denominator) and
  ``qv`` need options :func:`refattn.attention` does not take yet: anything but None
  raises TypeError. The CuTe-DSL extensions (``score_mod``, ``mask_mod``,
  ``block_sparse_tensors``, ``aux_tensors``, ``gather_kv_indices``, ``page_table``)
  are refused with NotImplementedError: express mods with :mod:`refattn.compat.flex`.

``num_splits``, ``pack_gqa``, ``deterministic`` and the scheduler arguments change
nothing here.
"""

from __future__ import annotations

import numbers
from typing import Any

from . import flash_attn_interface as _fa3
from .flash_attn._args import _window_edge

__all__ = ["flash_attn_func", "flash_attn_varlen_func"]


def _window(window_size: Any) -> tuple[int, int]:
    """flash-attn 4's (left, right) with None = unlimited, as flash-attn 3's -1 form."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size must be a pair (left, right), None = unlimited; got "
                        f"{window_size!r}")
    sides: list[int | None] = []
    for i, edge in enumerate(window_size):
        if edge is None:
            sides.append(None)
            continue
        # A plain int may be any negative (the pair's sum decides below); anything else
        # (0-d arrays, bools, floats) goes through the flash-attn 2 edge check.
        plain = isinstance(edge, numbers.Integral) and not isinstance(edge, bool)
        sides.append(int(edge) if plain else _window_edge(i, edge))
    left, right = sides
    if left is not None and right is not None and left + right < 0:
        return -1, -1  # flash-attn 4: no window
    for i, edge in enumerate((left, right)):
        if edge is not None and edge < 0:
            raise ValueError(
                f"window_size[{i}] must be >= 0 or None (unlimited); got {edge} (flash-attn "
                "4 would exclude the diagonal, flash-attn 3 read it as unlimited)"
            )
    return (-1 if left is None else left), (-1 if right is None else right)


def _refuse_cute(**extensions: Any) -> None:
    for name, value in extensions.items():
        if value is not None:
            raise NotImplementedError(
                f"{name} is a CuTe-DSL extension of flash-attn 4 that refattn does not "
                "reproduce; express score and mask mods with refattn.compat.flex or "
                "refattn.attention(score_mod=, mask_mod=)"
            )


def _sinks(learnable_sink: Any) -> None:
    # refattn's varlen front-end takes no sinks; flash_attn_func hands them to
    # refattn.attention(sinks=).
    if learnable_sink is not None:
        raise TypeError("refattn's varlen front-end does not take learnable_sink: "
                        "flash_attn_func reproduces it; pass None")


def flash_attn_func(
    q: Any,
    k: Any,
    v: Any,
    qv: Any = None,
    gather_kv_indices: Any = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int | None, int | None] = (None, None),
    learnable_sink: Any = None,
    softcap: float = 0.0,
    num_splits: int = 1,
    pack_gqa: bool | None = None,
    deterministic: bool = False,
    score_mod: Any = None,
    score_mod_bwd: Any = None,
    mask_mod: Any = None,
    aux_tensors: Any = None,
    aux_scalars: Any = None,
    block_sparse_tensors: Any = None,
    block_sparse_tensors_bwd: Any = None,
    return_lse: bool = False,
    *,
    xp: Any = None,
) -> tuple[Any, Any]:
    """``flash_attn.cute.flash_attn_func`` (flash-attn 4), computed in float64.

    Parameters
    ----------
    q, k, v : array
        (B, L, H, E), (B, S, K, E), (B, S, K, Ev); K divides H.
    qv, learnable_sink : None
        Not yet in refattn.attention: anything but None raises TypeError.
    gather_kv_indices, score_mod, score_mod_bwd, mask_mod, aux_tensors, aux_scalars, \
block_sparse_tensors, block_sparse_tensors_bwd : None
        CuTe-DSL extensions: anything but None raises NotImplementedError.
    softmax_scale, causal, softcap :
        As for :func:`refattn.compat.flash_attn_interface.flash_attn_func`.
    window_size : (int or None, int or None)
        (left, right), None = unlimited; a pair with a negative sum is no window.
    num_splits, pack_gqa, deterministic :
        Performance settings: no effect on the result.
    return_lse : bool
        Compute the LSE (B, H, L); otherwise the second result is None.
    xp : namespace or str, optional
        Keyword only: array namespace of the inputs or its name; inferred when None.

    Returns
    -------
    tuple
        ``(out, lse)``: out (B, L, H, Ev) in q's dtype; lse float32 (float64 for float64
        inputs), -inf on rows that see no key, or None.

    Raises
    ------
    TypeError
        ``qv``, ``learnable_sink`` (not yet in the core), wrong argument types.
    NotImplementedError
        A CuTe-DSL extension.
    ValueError
        A negative window edge (unless the pair's sum is negative), and as
        :func:`refattn.compat.flash_attn_interface.flash_attn_func`.

    Examples
    --------
    >>> import numpy as np
    >>> from refattn.compat import flash_attn_cute as fa4
    >>> from refattn.compat import flash_attn_interface as fa3
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 5, 2, 8)) for _ in range(3))
    >>> out, lse = fa4.flash_attn_func(q, k, v, window_size=(2, None))
    >>> lse is None
    True
    >>> bool(np.array_equal(out, fa3.flash_attn_func(q, k, v, window_size=(2, -1))))
    True
    """
    _refuse_cute(gather_kv_indices=gather_kv_indices, score_mod=score_mod,
                 score_mod_bwd=score_mod_bwd, mask_mod=mask_mod, aux_tensors=aux_tensors,
                 aux_scalars=aux_scalars, block_sparse_tensors=block_sparse_tensors,
                 block_sparse_tensors_bwd=block_sparse_tensors_bwd)
    res = _fa3.flash_attn_func(q, k, v, softmax_scale, causal, qv,
                               window_size=_window(window_size), softcap=softcap,
                               num_splits=num_splits, pack_gqa=pack_gqa,
                               deterministic=deterministic, return_attn_probs=return_lse,
                               xp=xp, _sinks=learnable_sink)
    return (res[0], res[1]) if return_lse else (res, None)


def flash_attn_varlen_func(
    q: Any,
    k: Any,
    v: Any,
    qv: Any = None,
    cu_seqlens_q: Any = None,
    cu_seqlens_k: Any = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    min_seqlen_k: int | None = None,
    seqused_q: Any = None,
    seqused_k: Any = None,
    gather_kv_indices: Any = None,
    page_table: Any = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int | None, int | None] = (None, None),
    learnable_sink: Any = None,
    softcap: float = 0.0,
    num_splits: int = 1,
    pack_gqa: bool | None = None,
    deterministic: bool = False,
    score_mod: Any = None,
    score_mod_bwd: Any = None,
    mask_mod: Any = None,
    block_sparse_tensors: Any = None,
    aux_tensors: Any = None,
    aux_scalars: Any = None,
    return_lse: bool = False,
    scheduler_metadata: Any = None,
    seqlen_k_per_split: int | None = None,
    disable_scheduler_metadata: bool = False,
    *,
    xp: Any = None,
) -> tuple[Any, Any]:
    """``flash_attn.cute.flash_attn_varlen_func`` (flash-attn 4), computed in float64.

    Parameters
    ----------
    q, k, v : array
        Packed (total_q, H, E), (total_k, K, E), (total_k, K, Ev).
    cu_seqlens_q, cu_seqlens_k : integer array
        (B + 1,) offsets (required here).
    max_seqlen_q, max_seqlen_k : int, optional
        At least the longest query (key) sequence; computed from the offsets when None.
    min_seqlen_k, seqlen_k_per_split, scheduler_metadata, disable_scheduler_metadata, \
num_splits, pack_gqa, deterministic :
        Scheduling hints: no effect on the result.
    seqused_q, seqused_k : integer array, optional
        As for :func:`refattn.compat.flash_attn_interface.flash_attn_varlen_func`.
    qv, learnable_sink, gather_kv_indices, page_table, score_mod, score_mod_bwd, mask_mod, \
block_sparse_tensors, aux_tensors, aux_scalars, softmax_scale, causal, window_size, \
softcap, return_lse, xp :
        As for :func:`flash_attn_func` (``page_table`` refused like the CuTe extensions).

    Returns
    -------
    tuple
        ``(out, lse)``: out (total_q, H, Ev); lse (H, total_q) or None.

    Raises
    ------
    TypeError, NotImplementedError, ValueError
        As :func:`flash_attn_func`; also missing offsets.

    Examples
    --------
    >>> import numpy as np
    >>> from refattn.compat import flash_attn_cute as fa4
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((7, 2, 8)) for _ in range(3))
    >>> cu = np.asarray([0, 3, 7], dtype=np.int32)
    >>> out, lse = fa4.flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu,
    ...                                       causal=True, return_lse=True)
    >>> out.shape, lse.shape
    ((7, 2, 8), (2, 7))
    """
    _refuse_cute(gather_kv_indices=gather_kv_indices, page_table=page_table,
                 score_mod=score_mod, score_mod_bwd=score_mod_bwd, mask_mod=mask_mod,
                 block_sparse_tensors=block_sparse_tensors, aux_tensors=aux_tensors,
                 aux_scalars=aux_scalars)
    _sinks(learnable_sink)
    if cu_seqlens_q is None or cu_seqlens_k is None:
        raise TypeError("refattn's flash_attn_varlen_func needs cu_seqlens_q and "
                        "cu_seqlens_k; for batched (B, L, H, E) inputs use flash_attn_func")

    def longest(cu: Any) -> int:
        bounds = [int(c) for c in cu]
        return max([b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)] or [0])

    res = _fa3.flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k,
        longest(cu_seqlens_q) if max_seqlen_q is None else max_seqlen_q,
        longest(cu_seqlens_k) if max_seqlen_k is None else max_seqlen_k,
        seqused_q, seqused_k, softmax_scale, causal, qv, window_size=_window(window_size),
        softcap=softcap, num_splits=num_splits, pack_gqa=pack_gqa,
        deterministic=deterministic, return_attn_probs=return_lse, xp=xp)
    return (res[0], res[1]) if return_lse else (res, None)
