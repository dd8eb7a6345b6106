"""``flash_attn_with_kvcache``: flash-attn 2's KV-cache forward pass, translated to
:func:`refattn.attention_with_kvcache`."""

from __future__ import annotations

import numbers
from typing import Any

from ..._namespace import infer_namespace
from ...kvcache import attention_with_kvcache
from ...rotary import rotate
from ._args import (
    _check_convention,
    _check_kv_pair,
    _compute_inputs,
    _flash_lse,
    _lse_dtype,
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



def _int_vector(name: str, x: Any, B: int, xp: Any) -> Any:
    """An optional (B,) integer argument as int64, checked."""
    if not xp.isdtype(x.dtype, "integral"):
        raise TypeError(f"{name} must have an integer dtype; got {x.dtype}")
    if tuple(x.shape) != (B,):
        raise ValueError(f"{name} must have shape (B,) = ({B},); got {tuple(x.shape)}")
    return xp.astype(x, xp.int64)


def _flat_take(rows: Any, index: Any, xp: Any) -> Any:
    """``rows[b, index[b, j]]`` for (B, S, ...) rows and (B, S') indices."""
    B, S = rows.shape[0], rows.shape[1]
    flat = xp.reshape(rows, (B * S, *rows.shape[2:]))
    base = xp.reshape(xp.arange(B, dtype=xp.int64, device=rows.device) * S, (B, 1))
    picked = xp.take(flat, xp.reshape(index + base, (-1,)), axis=0)
    return xp.reshape(picked, (*index.shape, *rows.shape[2:]))


def _shift_left(rows: Any, pad: Any, xp: Any) -> Any:
    """Each row b moved left by pad[b] (entries shifted in from past the end are
    repeats of the last one: never read, as they lie past the valid length)."""
    S = rows.shape[1]
    j = xp.reshape(xp.arange(S, dtype=xp.int64, device=rows.device), (1, S))
    return _flat_take(rows, xp.clip(j + xp.reshape(pad, (-1, 1)), 0, S - 1), xp)


def _shift_back(shifted: Any, original: Any, pad: Any, xp: Any) -> Any:
    """The inverse of _shift_left: positions before pad[b] keep ``original``."""
    S = shifted.shape[1]
    j = xp.reshape(xp.arange(S, dtype=xp.int64, device=shifted.device), (1, S))
    pad = xp.reshape(pad, (-1, 1))
    moved = _flat_take(shifted, xp.clip(j - pad, 0, S - 1), xp)
    keep = xp.reshape(j >= pad, (pad.shape[0], S, 1, 1))
    return xp.where(keep, moved, original)


def _rotary(q: Any, k: Any, cos: Any, sin: Any, *, base: Any, local: bool,
            interleaved: Any, dtype: Any, xp: Any) -> tuple[Any, Any]:
    """q and the new keys k rotated as flash-attn's KV-cache kernels rotate them.

    New key t of sequence b sits at position base[b] + t; query i at base[b] + i when
    the call is causal or local, otherwise every query at base[b] (flash-attn's
    documented rule: without a mask the queries are taken as one position).
    """
    if not isinstance(interleaved, bool):
        raise TypeError(f"rotary_interleaved must be True or False; got {interleaved!r}")
    if cos.ndim != 2 or tuple(cos.shape) != tuple(sin.shape):
        raise ValueError(f"rotary_cos and rotary_sin must both be (seqlen_ro, rotary_dim / 2)"
                         f"; got shapes {tuple(cos.shape)} and {tuple(sin.shape)}")
    if 2 * cos.shape[1] > q.shape[-1]:
        raise ValueError(f"rotary_dim = 2 * rotary_cos.shape[1] = {2 * cos.shape[1]} exceeds "
                         f"the head dimension {q.shape[-1]}")
    B, L, Ln = q.shape[0], q.shape[1], k.shape[1]
    dev = q.device
    base = xp.reshape(base, (B, 1))
    k_pos = base + xp.reshape(xp.arange(Ln, dtype=xp.int64, device=dev), (1, Ln))
    q_pos = base + (xp.reshape(xp.arange(L, dtype=xp.int64, device=dev), (1, L)) if local
                    else xp.zeros((1, L), dtype=xp.int64, device=dev))
    last = int(xp.max(xp.concat([xp.reshape(k_pos, (-1,)), xp.reshape(q_pos, (-1,))])))
    if last >= cos.shape[0]:
        raise ValueError(f"rotary positions reach {last}, beyond rotary_cos's "
                         f"{cos.shape[0]} rows (seqlen_ro)")
    f64 = xp.float64
    c, s = xp.astype(cos, f64), xp.astype(sin, f64)
    # Rotated in float64, then rounded to the inputs' dtype: the rotated keys are what
    # the cache stores, and flash-attn's kernel holds the rotated q in that dtype too.
    out = []
    for x, pos in ((q, q_pos), (k, k_pos)):
        r = rotate(xp.astype(x, f64), c, s, pos, interleaved=interleaved, xp=xp)
        out.append(xp.astype(xp.astype(r, dtype), x.dtype))
    return out[0], out[1]


def write_in_place(cache: Any, new: Any, name: str) -> None:
    """``cache[...] = new``, as flash-attn appends into its caches; a clear error where the
    array cannot be written (JAX arrays, read-only NumPy arrays, leaf tensors that
    require grad)."""
    try:
        cache[...] = new
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(
            f"{name} cannot be written in place ({type(exc).__name__}: {exc}); "
            "flash_attn_with_kvcache appends k and v into the caches as flash-attn does: "
            "pass writable arrays (NumPy, torch), or call refattn.attention_with_kvcache, "
            "which returns new caches and writes nothing"
        ) from exc


def kvcache_forward(
    q: Any, k_cache: Any, v_cache: Any, k: Any, v: Any, *, rotary_cos: Any, rotary_sin: Any,
    cache_seqlens: Any, cache_batch_idx: Any, cache_leftpad: Any, block_table: Any,
    softmax_scale: Any, causal: Any, window_size: Any, softcap: Any, rotary_interleaved: Any,
    alibi_slopes: Any, rotary_seqlens: Any, version: int, lse_convention: str,
    return_lse: bool, table_name: str, xp: Any,
) -> tuple[Any, Any]:
    """The KV-cache forward pass shared by flash-attn 2's and flash-attn 3's front-ends:
    ``(out, softmax_lse or None)``, the new keys written into ``k_cache`` and ``v_cache``.
    """
    xp, _ = infer_namespace(
        {"q": q, "k_cache": k_cache, "v_cache": v_cache, "k": k, "v": v,
         "alibi_slopes": alibi_slopes, "rotary_cos": rotary_cos, "rotary_sin": rotary_sin},
        {"cache_seqlens": cache_seqlens if hasattr(cache_seqlens, "dtype") else None,
         "cache_batch_idx": cache_batch_idx, "cache_leftpad": cache_leftpad,
         table_name: block_table, "rotary_seqlens": rotary_seqlens}, xp=xp,
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
            f"{table_name} must be 2-D (B, max_blocks); got shape {tuple(block_table.shape)}"
        )
    capacity = block_table.shape[1] * kc_shape[1] if paged else kc_shape[1]
    writes = k is not None or v is not None
    if k is not None and cache_seqlens is None:
        raise ValueError(
            "k and v are appended at cache_seqlens: give cache_seqlens with them "
            "(flash-attn: 'If key is supplied, seqlens_k must also be passed in')"
        )
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin go together; got only "
                         f"{'rotary_cos' if rotary_sin is None else 'rotary_sin'}")
    if rotary_cos is not None and k is None:
        raise ValueError("rotary_cos/rotary_sin rotate the new keys: give k and v with them "
                         "(flash-attn: 'If rotary cos/sin are provided, new key / value to "
                         "be appended to KV cache must also be provided')")
    if rotary_seqlens is not None and rotary_cos is None:
        raise ValueError("rotary_seqlens needs rotary_cos and rotary_sin")
    if cache_seqlens is None:
        cache_seqlens = capacity
    if isinstance(cache_seqlens, numbers.Integral) and not isinstance(cache_seqlens, bool):
        lens = xp.full((B,), int(cache_seqlens), dtype=xp.int64, device=q.device)
    elif hasattr(cache_seqlens, "dtype"):
        lens = (xp.broadcast_to(xp.astype(cache_seqlens, xp.int64), (B,))
                if xp.isdtype(cache_seqlens.dtype, "integral") else cache_seqlens)
    else:
        lens = cache_seqlens  # refused below, by refattn.attention_with_kvcache
    cap = _softcap(softcap)
    fw = flash_window(window_size, causal, seqlen_q=L, seqlen_k=capacity,
                      has_alibi=alibi_slopes is not None, version=version)
    index = None
    if cache_batch_idx is not None:
        if paged and version == 2:
            raise ValueError(
                "cache_batch_idx cannot be combined with block_table (flash-attn 2: 'Paged "
                "KVcache does not support cache_batch_idx'); the block table already "
                "names each sequence's pages"
            )
        Bc = block_table.shape[0] if paged else kc_shape[0]
        index = _batch_index(cache_batch_idx, B, Bc, writes and not paged, xp)
    pad = None
    if cache_leftpad is not None:
        if paged:
            raise ValueError(f"cache_leftpad cannot be combined with {table_name} "
                             "(flash-attn: paged KV and leftpad_k not supported together)")
        pad = _int_vector("cache_leftpad", cache_leftpad, B, xp)
        if hasattr(lens, "dtype") and bool(xp.any((pad < 0) | (pad > lens))):
            raise ValueError(f"cache_leftpad must lie in 0 .. cache_seqlens; got "
                             f"{[int(p) for p in pad]} against {[int(n) for n in lens]}")
    dtype, (qc, kcc, vcc, kn, vn) = _compute_inputs(
        xp, {"q": q, "k_cache": k_cache, "v_cache": v_cache, "k": k, "v": v})
    if rotary_cos is not None:
        base = (lens if rotary_seqlens is None
                else _int_vector("rotary_seqlens", rotary_seqlens, B, xp))
        qc, kn = _rotary(qc, kn, rotary_cos, rotary_sin, base=base,
                         local=fw.window is not None, interleaved=rotary_interleaved,
                         dtype=dtype, xp=xp)
    table, rows_k, rows_v = block_table, kcc, vcc
    if index is not None:
        if paged:  # flash-attn 3: sequence b reads page-table row cache_batch_idx[b]
            table = xp.take(block_table, index, axis=0)
        else:
            rows_k, rows_v = (xp.take(c, index, axis=0) for c in (kcc, vcc))
    seen_lens = lens
    if pad is not None:
        Ln = 0 if k is None else k.shape[1]
        if writes and bool(xp.any(lens + Ln > capacity)):
            raise ValueError(f"cache_seqlens + Lnew must fit the cache ({capacity}); got "
                             f"{[int(n) + Ln for n in lens]}")
        # Sequence b's keys start at cache_leftpad[b]: moved to the front of its row,
        # the row is an ordinary cache of cache_seqlens[b] - cache_leftpad[b] entries.
        unshifted_k, unshifted_v = rows_k, rows_v
        rows_k, rows_v = _shift_left(rows_k, pad, xp), _shift_left(rows_v, pad, xp)
        seen_lens = lens - pad
    res = attention_with_kvcache(
        qc, rows_k, rows_v, k=kn, v=vn, cache_seqlens=seen_lens, block_table=table,
        window=fw.window, scale=softmax_scale, softcap=cap, alibi_slopes=alibi_slopes,
        masked_rows="zero", return_lse=return_lse, xp=xp,
    )
    out = xp.astype(res.out, dtype)
    lse = None
    if return_lse:
        slopes = q_pos = None
        if fw.causal_alibi:
            n = xp.astype(seen_lens, xp.int64) + (0 if k is None else k.shape[1])
            q_pos = (xp.reshape(xp.arange(L, dtype=xp.int64, device=out.device), (1, 1, L))
                     + xp.reshape(n - L, (B, 1, 1)))
            slopes = xp.astype(alibi_slopes, res.lse.dtype)
            slopes = xp.reshape(slopes, (*slopes.shape, 1))
        lse = _flash_lse(res.lse, convention=lse_convention, slopes=slopes, q_pos=q_pos,
                         dtype=_lse_dtype(xp, dtype), xp=xp)
    if writes:
        new_k, new_v = res.k_cache, res.v_cache
        if pad is not None:
            new_k = _shift_back(new_k, unshifted_k, pad, xp)
            new_v = _shift_back(new_v, unshifted_v, pad, xp)
        if index is not None and not paged:
            new_k = _scatter_rows(kcc, new_k, index, xp)
            new_v = _scatter_rows(vcc, new_v, index, xp)
        write_in_place(k_cache, xp.astype(new_k, dtype), "k_cache")
        write_in_place(v_cache, xp.astype(new_v, dtype), "v_cache")
    return out, lse


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
    then attends q over the sequence's cached keys, ``n_b = cache_seqlens[b] + Lnew``
    of them, query i sitting at key position ``i + n_b - L`` (bottom-right).

    Like flash-attn, it writes k and v into ``k_cache`` and ``v_cache`` **in place**
    (NumPy arrays, torch tensors, array-api-strict arrays) and returns ``out``, or
    ``(out, softmax_lse)``. Arrays that cannot be written (JAX arrays, read-only NumPy
    arrays) raise TypeError when k and v are given: call
    :func:`refattn.attention_with_kvcache`, which returns new caches and writes
    nothing. (refattn before this version returned the updated caches instead.)

    Parameters
    ----------
    q : array
        (B, L, H, E).
    k_cache, v_cache : array
        (B_cache, S_cache, K, E) and (B_cache, S_cache, K, Ev), or with ``block_table``
        paged (num_blocks, page_size, K, E) and (num_blocks, page_size, K, Ev).
    k, v : array, optional
        The step's keys (B, Lnew, K, E) and values (B, Lnew, K, Ev); both or neither.
    rotary_cos, rotary_sin : array, optional
        (seqlen_ro, rotary_dim / 2), with k and v: the new keys and q are rotated
        (:func:`refattn.apply_rotary_emb`'s rotation, in float64, rounded to the inputs'
        dtype) before the keys are appended. New key t of sequence b sits at position
        ``cache_seqlens[b] + t``; query i at ``cache_seqlens[b] + i`` when causal or
        windowed, else every query at ``cache_seqlens[b]``. Features past rotary_dim
        pass unrotated.
    cache_seqlens : int or integer array, optional
        Entries already cached per sequence, (B,) or shared, counted from the start of
        the cache row (``cache_leftpad`` included). None (only without k and v) means
        every cache entry is valid: S_cache, or max_blocks * page_size.
    cache_batch_idx : integer array, optional
        (B,): sequence b uses cache row ``cache_batch_idx[b]`` (contiguous caches only);
        distinct when k and v are given.
    cache_leftpad : integer array, optional
        (B,): sequence b's keys start at cache position ``cache_leftpad[b]`` (the entries
        before are never read); contiguous caches only, as in flash-attn.
    block_table : integer array, optional
        (B, max_blocks): page table of a paged cache.
    softmax_scale, causal, window_size, softcap, alibi_slopes :
        As for :func:`flash_attn_func`, with n_b in place of S; window edges are clamped
        with the cache capacity, as flash-attn 2 does.
    rotary_interleaved : bool
        True (the default): features 2m and 2m + 1 rotate together (GPT-J); False:
        feature d with d + rotary_dim / 2 (GPT-NeoX). Ignored without rotary tables.
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
        flash-attn's ``out`` (B, L, H, Ev), or ``(out, softmax_lse)``.

    Raises
    ------
    TypeError
        Caches that cannot be written in place when k and v are given; the rest as
        :func:`refattn.attention_with_kvcache`.
    ValueError
        As :func:`refattn.attention_with_kvcache`; also k without ``cache_seqlens``,
        rotary tables without k, positions beyond the rotary tables,
        ``cache_batch_idx`` or ``cache_leftpad`` with a paged cache, out of range or
        (when writing) repeated batch indices.

    Examples
    --------
    >>> import numpy as np
    >>> from refattn.compat.flash_attn import flash_attn_func, flash_attn_with_kvcache
    >>> rng = np.random.default_rng(0)
    >>> k_cache, v_cache = (rng.standard_normal((2, 6, 2, 8)) for _ in range(2))
    >>> q, k, v = (rng.standard_normal((2, 1, 2, 8)) for _ in range(3))    # one step
    >>> out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=3,
    ...                               causal=True)
    >>> bool(np.array_equal(k_cache[:, 3], k[:, 0]))       # appended at position 3
    True
    >>> full = flash_attn_func(q, k_cache[:, :4], v_cache[:, :4], causal=True)
    >>> bool(np.allclose(out, full))
    True
    """
    if not isinstance(num_splits, numbers.Integral) or isinstance(num_splits, bool):
        raise TypeError(f"num_splits must be an int; got {num_splits!r}")
    out, lse = kvcache_forward(
        q, k_cache, v_cache, k, v, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
        cache_seqlens=cache_seqlens, cache_batch_idx=cache_batch_idx,
        cache_leftpad=cache_leftpad, block_table=block_table, softmax_scale=softmax_scale,
        causal=causal, window_size=window_size, softcap=softcap,
        rotary_interleaved=rotary_interleaved, alibi_slopes=alibi_slopes,
        rotary_seqlens=None, version=3 if lse_convention == "fa3" else 2,
        lse_convention=lse_convention, return_lse=return_softmax_lse,
        table_name="block_table", xp=xp)
    return (out, lse) if return_softmax_lse else out
