"""``flash_attn_with_kvcache``: flash-attn 2's KV-cache forward pass, translated to
:func:`refattn.attention_with_kvcache`."""

from __future__ import annotations

import numbers
from typing import Any

from ..._namespace import infer_namespace
from ...kvcache import attention_with_kvcache
from ._args import (
    _check_convention,
    _check_kv_pair,
    _compute_inputs,
    _flash_lse,
    _lse_dtype,
    _not_implemented,
    _shape4,
    _softcap,
    flash_window,
)

# --- flash_attn_with_kvcache ---------------------------------------------------------------


def _scatter_rows(cache: Any, rows: Any, index: Any, xp: Any) -> Any:
    """``cache`` with ``cache[index[b]] = rows[b]`` (distinct indices), as a new array."""
    Bc = cache.shape[0]
    hits = (xp.reshape(xp.arange(Bc, dtype=xp.int64, device=cache.device), (Bc, 1))
            == xp.reshape(index, (1, index.shape[0])))  # (Bc, B)
    source = xp.argmax(xp.astype(hits, xp.int8), axis=1)
    written = xp.reshape(xp.any(hits, axis=1), (Bc, 1, 1, 1))
    return xp.where(written, xp.take(rows, source, axis=0), cache)


def _batch_index(cache_batch_idx: Any, B: int, Bc: int, writes: bool, xp: Any) -> Any:
    if not xp.isdtype(cache_batch_idx.dtype, "integral"):
        raise TypeError(
            f"cache_batch_idx must have an integer dtype; got {cache_batch_idx.dtype}"
        )
    if tuple(cache_batch_idx.shape) != (B,):
        raise ValueError(
            f"cache_batch_idx must have shape (B,) = ({B},); got "
            f"{tuple(cache_batch_idx.shape)}"
        )
    index = xp.astype(cache_batch_idx, xp.int64)
    if B and bool(xp.any((index < 0) | (index >= Bc))):
        raise ValueError(
            f"cache_batch_idx entries must be rows of the cache (0 .. {Bc - 1}); got "
            f"{[int(i) for i in index]}"
        )
    if writes and B > 1 and bool(xp.any(xp.sort(index)[1:] == xp.sort(index)[:-1])):
        # flash-attn then writes "from any of the duplicates": no defined result.
        raise ValueError(
            "cache_batch_idx must be distinct when k and v are appended; got "
            f"{[int(i) for i in index]}"
        )
    return index


def flash_attn_with_kvcache(
    q: Any,
    k_cache: Any,
    v_cache: Any,
    k: Any = None,
    v: Any = None,
    rotary_cos: Any = None,
    rotary_sin: Any = None,
    cache_seqlens: Any = None,
    cache_batch_idx: Any = None,
    cache_leftpad: Any = None,
    block_table: Any = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: Any = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
    *,
    lse_convention: str = "fa2",
    xp: Any = None,
) -> Any:
    """``flash_attn.flash_attn_with_kvcache``, computed in float64.

    Appends the step's ``k``, ``v`` to each sequence's cache at ``cache_seqlens[b]``,
    then attends q over the first ``n_b = cache_seqlens[b] + Lnew`` cached keys, query
    i sitting at key position ``i + n_b - L`` (bottom-right).

    flash-attn writes k and v into ``k_cache`` and ``v_cache`` in place; refattn never
    writes into its inputs and returns the updated caches instead (below).

    Parameters
    ----------
    q : array
        (B, L, H, E).
    k_cache, v_cache : array
        (B_cache, S_cache, K, E) and (B_cache, S_cache, K, Ev), or with ``block_table``
        paged (num_blocks, page_size, K, E) and (num_blocks, page_size, K, Ev).
    k, v : array, optional
        The step's keys (B, Lnew, K, E) and values (B, Lnew, K, Ev); both or neither.
    rotary_cos, rotary_sin : None
        Rotary embeddings are not implemented: apply them to q and k before the call. A
        value other than None raises NotImplementedError.
    cache_seqlens : int or integer array, optional
        Entries already cached per sequence, (B,) or shared. None (only without k and
        v) means every cache entry is valid: S_cache, or max_blocks * page_size.
    cache_batch_idx : integer array, optional
        (B,): sequence b uses cache row ``cache_batch_idx[b]`` (contiguous caches only);
        distinct when k and v are given.
    cache_leftpad : None
        Left-padded caches are not implemented; a value other than None raises
        NotImplementedError.
    block_table : integer array, optional
        (B, max_blocks): page table of a paged cache.
    softmax_scale, causal, window_size, softcap, alibi_slopes :
        As for :func:`flash_attn_func`, with n_b in place of S; window edges are clamped
        with the cache capacity, as flash-attn does.
    rotary_interleaved : bool
        Accepted and ignored (it only affects rotary embeddings).
    num_splits : int
        Accepted and ignored: how the kernel splits the keys changes rounding only.
    return_softmax_lse : bool
        Also return the LSE (B, H, L): float32, float64 for float64 inputs.
    lse_convention : {"fa2", "fa3"}
        Keyword only, as for :func:`flash_attn_func`.
    xp : namespace or str, optional
        Array namespace of the inputs or its name, e.g. ``xp="numpy"``; inferred
        when None.

    Returns
    -------
    array or tuple
        flash-attn's ``out`` (B, L, H, Ev) or ``(out, softmax_lse)``; when k and v are
        given, the updated caches are appended: ``(out, k_cache, v_cache)`` or
        ``(out, softmax_lse, k_cache, v_cache)`` (new arrays, in the caches' layout).

    Raises
    ------
    NotImplementedError
        ``rotary_cos``, ``rotary_sin`` or ``cache_leftpad`` given.
    TypeError, ValueError
        As :func:`refattn.attention_with_kvcache`; also k without ``cache_seqlens``,
        ``cache_batch_idx`` with a paged cache, out of range or (when writing)
        repeated.

    Examples
    --------
    >>> import numpy as np
    >>> from refattn.compat.flash_attn import flash_attn_func, flash_attn_with_kvcache
    >>> rng = np.random.default_rng(0)
    >>> k_cache, v_cache = (rng.standard_normal((2, 6, 2, 8)) for _ in range(2))
    >>> q, k, v = (rng.standard_normal((2, 1, 2, 8)) for _ in range(3))    # one step
    >>> out, k_cache2, v_cache2 = flash_attn_with_kvcache(
    ...     q, k_cache, v_cache, k, v, cache_seqlens=3, causal=True)
    >>> bool(np.array_equal(k_cache2[:, 3], k[:, 0]))       # appended at position 3
    True
    >>> full = flash_attn_func(q, k_cache2[:, :4], v_cache2[:, :4], causal=True)
    >>> bool(np.allclose(out, full))
    True
    """
    fn = "flash_attn_with_kvcache"
    _not_implemented("rotary_cos", rotary_cos, fn, "rotate q and k before the call")
    _not_implemented("rotary_sin", rotary_sin, fn, "rotate q and k before the call")
    _not_implemented("cache_leftpad", cache_leftpad, fn,
                     "shift each sequence's entries to the start of its cache row")
    xp, _ = infer_namespace(
        {"q": q, "k_cache": k_cache, "v_cache": v_cache, "k": k, "v": v,
         "alibi_slopes": alibi_slopes},
        {"cache_seqlens": cache_seqlens if hasattr(cache_seqlens, "dtype") else None,
         "cache_batch_idx": cache_batch_idx, "block_table": block_table}, xp=xp,
        required=("q", "k_cache", "v_cache"))
    _check_convention(lse_convention)
    B, L, H, E = _shape4("q", q, "(B, L, H, E)")
    paged = block_table is not None
    legend = "(num_blocks, page_size, K, {})" if paged else "(B_cache, S_cache, K, {})"
    kc_shape = _shape4("k_cache", k_cache, legend.format("E"))
    vc_shape = _shape4("v_cache", v_cache, legend.format("Ev"))
    _check_kv_pair(kc_shape, vc_shape, "k_cache", "v_cache")
    if paged and (block_table.ndim != 2):
        raise ValueError(
            f"block_table must be 2-D (B, max_blocks); got shape {tuple(block_table.shape)}"
        )
    capacity = block_table.shape[1] * kc_shape[1] if paged else kc_shape[1]
    writes = k is not None or v is not None
    if k is not None and cache_seqlens is None:
        raise ValueError(
            "k and v are appended at cache_seqlens: give cache_seqlens with them "
            "(flash-attn: 'If key is supplied, seqlens_k must also be passed in')"
        )
    if cache_seqlens is None:
        cache_seqlens = capacity
    if not isinstance(num_splits, numbers.Integral) or isinstance(num_splits, bool):
        raise TypeError(f"num_splits must be an int; got {num_splits!r}")
    cap = _softcap(softcap)
    fw = flash_window(window_size, causal, seqlen_q=L, seqlen_k=capacity,
                      has_alibi=alibi_slopes is not None,
                      version=3 if lse_convention == "fa3" else 2)
    full_k, full_v = k_cache, v_cache
    index = None
    if cache_batch_idx is not None:
        if paged:
            raise ValueError(
                "cache_batch_idx cannot be combined with block_table (flash-attn: 'Paged "
                "KVcache does not support cache_batch_idx'); the block table already "
                "names each sequence's pages"
            )
        index = _batch_index(cache_batch_idx, B, kc_shape[0], writes, xp)
        k_cache, v_cache = (xp.take(c, index, axis=0) for c in (k_cache, v_cache))
    dtype, (qc, kcc, vcc, kn, vn) = _compute_inputs(
        xp, {"q": q, "k_cache": k_cache, "v_cache": v_cache, "k": k, "v": v})
    res = attention_with_kvcache(
        qc, kcc, vcc, k=kn, v=vn, cache_seqlens=cache_seqlens, block_table=block_table,
        window=fw.window, scale=softmax_scale, softcap=cap, alibi_slopes=alibi_slopes,
        masked_rows="zero", return_lse=return_softmax_lse, xp=xp,
    )
    out = xp.astype(res.out, dtype)
    result: tuple[Any, ...] = (out,)
    if return_softmax_lse:
        slopes = q_pos = None
        if fw.causal_alibi:
            lens = (xp.full((B,), int(cache_seqlens), dtype=xp.int64, device=out.device)
                    if isinstance(cache_seqlens, numbers.Integral)
                    else xp.astype(cache_seqlens, xp.int64))
            n = lens + (0 if k is None else k.shape[1])
            q_pos = (xp.reshape(xp.arange(L, dtype=xp.int64, device=out.device), (1, 1, L))
                     + xp.reshape(n - L, (B, 1, 1)))
            slopes = xp.astype(alibi_slopes, res.lse.dtype)
            slopes = xp.reshape(slopes, (*slopes.shape, 1))
        result += (_flash_lse(res.lse, convention=lse_convention, slopes=slopes,
                              q_pos=q_pos, dtype=_lse_dtype(xp, dtype), xp=xp),)
    if not writes:
        return result[0] if len(result) == 1 else result
    new_k, new_v = (xp.astype(c, dtype) for c in (res.k_cache, res.v_cache))
    if index is not None:
        new_k = _scatter_rows(full_k, new_k, index, xp)
        new_v = _scatter_rows(full_v, new_v, index, xp)
    return (*result, new_k, new_v)
