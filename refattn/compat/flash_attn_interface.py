"""flash-attn 3's Python interface (``flash_attn_interface``): ``flash_attn_func``,
``flash_attn_varlen_func``, ``flash_attn_qkvpacked_func``, ``flash_attn_with_kvcache``.

Reproduces the forward pass of flash-attn 3 (Dao-AILab/flash-attention, read at commit
0251105a: ``hopper/flash_attn_interface.py``, ``hopper/flash_api.cpp``, ``hopper/mask.h``
and ``hopper/seqlen.h``), with flash-attn 3's signatures, argument order and results:

* layout (B, L, H, E), K key/value heads dividing H; causal masks and windows aligned
  bottom-right, ``window_size`` taken literally (flash-attn 3 clamps only where the
  result cannot change; see ``refattn.compat.flash_attn.flash_window``);
* a row that sees no key gives output 0 and LSE -inf; the LSE is float32 (float64 for
  float64 inputs);
* ``return_attn_probs=True`` returns ``(out, softmax_lse)``: flash-attn 3 has no
  probabilities to return;
* no dropout and no ALiBi (flash-attn 3 has neither).

The performance arguments (``num_splits``, ``pack_gqa``, ``sm_margin``,
``scheduler_metadata``, ``deterministic``) change how the kernels schedule work, never
the result: they are checked for type and otherwise ignored. The FP8 descales
(``q_descale``, ``k_descale``, ``v_descale``) are accepted at their neutral value (None,
or all ones); others raise ValueError: refattn does not quantise.

``qv`` (scores ``scale (q k^T + qv v^T)``, default scale ``1/sqrt(E + Ev)``) and
``attention_chunk`` (queries see the keys of their own chunk, aligned bottom-right as the
causal mask) are :func:`refattn.attention`'s ``qv=`` and ``attention_chunk=``, taken by
``flash_attn_func``; the varlen and KV-cache functions refuse them by name. Each
function translates its arguments into the flash-attn 2 front-ends of
:mod:`refattn.compat.flash_attn` with ``lse_convention="fa3"``; nothing here computes
attention.
"""

from __future__ import annotations

import numbers
from typing import Any

from .._namespace import infer_namespace
from .flash_attn import _dense, _varlen
from .flash_attn._kvcache import kvcache_forward

__all__ = [
    "flash_attn_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
]


# --- arguments that change nothing, or that the core does not take yet -----------------------


def _core_variants(*, qv: Any, attention_chunk: Any, front_end: str = "dense") -> dict[str, Any]:
    """flash-attn 3's ``qv`` and ``attention_chunk`` as keyword arguments of
    :func:`refattn.attention` (``qv=``, ``attention_chunk=``; flash-attn's chunks are
    aligned bottom-right, as its causal mask), empty at their neutral values. refattn's
    varlen and KV-cache front-ends do not take them: there they are refused by name."""
    if isinstance(attention_chunk, bool) or not isinstance(attention_chunk, numbers.Integral):
        raise TypeError(f"attention_chunk must be an int (0 = off); got {attention_chunk!r}")
    if attention_chunk < 0:
        raise ValueError(f"attention_chunk must be >= 0 (0 = off); got {int(attention_chunk)}")
    wanted: dict[str, Any] = {}
    if qv is not None:
        wanted["qv"] = qv
    if attention_chunk:
        wanted["attention_chunk"] = int(attention_chunk)
    if front_end != "dense":
        for name in wanted:
            raise TypeError(
                f"refattn's {front_end} front-end does not take {name}: flash-attn 3's "
                f"{name}={'<array>' if name == 'qv' else wanted[name]} is reproduced by "
                f"flash_attn_func only; pass {'None' if name == 'qv' else '0'}"
            )
    return wanted


def _check_performance(*, num_splits: Any = 0, pack_gqa: Any = None, sm_margin: Any = 0,
                       deterministic: Any = False) -> None:
    for name, value in (("num_splits", num_splits), ("sm_margin", sm_margin)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int; got {value!r}")
    if pack_gqa is not None and not isinstance(pack_gqa, bool):
        raise TypeError(f"pack_gqa must be None, True or False; got {pack_gqa!r}")
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be True or False; got {deterministic!r}")


def _check_descales(**descales: Any) -> None:
    """FP8 descale factors: None or all ones (a factor of 1 changes nothing)."""
    for name, d in descales.items():
        if d is None:
            continue
        xp, _ = infer_namespace({name: d}, required=(name,))
        if not bool(xp.all(d == 1)):
            raise ValueError(
                f"{name} must be None or all ones: refattn computes in float64 and does "
                "not dequantise FP8 inputs; pass the dequantised tensors instead"
            )


def _scale(softmax_scale: Any, q: Any, qv: Any) -> Any:
    # flash-attn 3's default: 1/sqrt of q's head dimension plus qv's when qv is given.
    if softmax_scale is not None or qv is None:
        return softmax_scale
    return float(q.shape[-1] + qv.shape[-1]) ** -0.5


# --- flash_attn_func -------------------------------------------------------------------------


def flash_attn_func(
    q: Any,
    k: Any,
    v: Any,
    softmax_scale: float | None = None,
    causal: bool = False,
    qv: Any = None,
    q_descale: Any = None, k_descale: Any = None, v_descale: Any = None,
    window_size: tuple[int, int] = (-1, -1),
    attention_chunk: int = 0,
    softcap: float = 0.0,
    num_splits: int = 1,
    pack_gqa: bool | None = None,
    deterministic: bool = False,
    sm_margin: int = 0,
    return_attn_probs: bool = False,
    *,
    xp: Any = None,
    _sinks: Any = None,
) -> Any:
    """``flash_attn_interface.flash_attn_func`` (flash-attn 3), computed in float64.

    Parameters
    ----------
    q, k, v : array
        (B, L, H, E), (B, S, K, E), (B, S, K, Ev); K divides H.
    softmax_scale : float, optional
        Multiplies q @ k^T; defaults to 1/sqrt(E).
    causal : bool
        Bottom-right causal mask: query i sees keys j <= i + S - L.
    qv : None
        flash-attn 3's extra query against the values; refattn.attention does not take it
        yet: anything but None raises TypeError.
    q_descale, k_descale, v_descale : None
        FP8 descale factors: None or all ones (no effect), others raise ValueError.
    window_size : (int, int)
        (left, right): query i sees keys i + S - L - left .. i + S - L + right, -1 =
        unlimited, taken literally as flash-attn 3 does; ints or 0-d integer arrays.
    attention_chunk : int
        0 (off); other values raise TypeError until refattn.attention takes them.
    softcap : float
        > 0: scores become ``softcap * tanh(s / softcap)``; 0 turns it off.
    num_splits, pack_gqa, deterministic, sm_margin :
        Performance settings of flash-attn 3: checked for type, no effect on the result.
    return_attn_probs : bool
        Also return the LSE: ``(out, softmax_lse)``, as flash-attn 3 does.
    xp : namespace or str, optional
        Keyword only: array namespace of the inputs or its name; inferred when None.

    Returns
    -------
    array or tuple
        ``out`` (B, L, H, Ev) in q's dtype, or ``(out, softmax_lse)`` with
        ``softmax_lse`` (B, H, L) float32 (float64 for float64 inputs), -inf on rows that
        see no key.

    Raises
    ------
    TypeError
        ``qv`` or a nonzero ``attention_chunk`` (not yet in the core), arguments of the
        wrong type; the rest as :func:`refattn.compat.flash_attn.flash_attn_func`.
    ValueError
        Non-neutral descales, shapes that do not fit, a window edge below -1, a negative
        softcap.

    Examples
    --------
    >>> import numpy as np
    >>> from refattn.compat import flash_attn_interface as fa3
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((1, 4, 1, 8))
    >>> k, v = (rng.standard_normal((1, 1, 1, 8)) for _ in range(2))
    >>> out, lse = fa3.flash_attn_func(q, k, v, window_size=(1, 1), return_attn_probs=True)
    >>> lse[0, 0] == -np.inf    # queries 0 and 1 sit before the window's reach of key 0
    array([ True,  True, False, False])
    """
    _check_performance(num_splits=num_splits, pack_gqa=pack_gqa, sm_margin=sm_margin,
                       deterministic=deterministic)
    _check_descales(q_descale=q_descale, k_descale=k_descale, v_descale=v_descale)
    variants = _core_variants(qv=qv, attention_chunk=attention_chunk)
    if _sinks is not None:
        variants["sinks"] = _sinks
    res = _dense.flash_attn_func(
        q, k, v, 0.0, _scale(softmax_scale, q, qv), causal, window_size, softcap, None,
        deterministic, return_attn_probs, lse_convention="fa3", xp=xp, _variants=variants)
    return (res[0], res[1]) if return_attn_probs else res


def flash_attn_qkvpacked_func(
    qkv: Any,
    softmax_scale: float | None = None,
    causal: bool = False,
    q_descale: Any = None, k_descale: Any = None, v_descale: Any = None,
    window_size: tuple[int, int] = (-1, -1),
    attention_chunk: int = 0,
    softcap: float = 0.0,
    deterministic: bool = False,
    num_heads_q: int | None = None,
    sm_margin: int = 0,
    return_attn_probs: bool = False,
    *,
    xp: Any = None,
) -> Any:
    """``flash_attn_interface.flash_attn_qkvpacked_func`` (flash-attn 3).

    Parameters
    ----------
    qkv : array
        (B, L, 3, H, E), or (B, L, H + 2K, E) with ``num_heads_q = H``: the query heads,
        then K key heads, then K value heads.
    num_heads_q : int, optional
        The number of query heads of the 4-D form.
    softmax_scale, causal, q_descale, k_descale, v_descale, window_size, attention_chunk, \
softcap, deterministic, sm_margin, return_attn_probs, xp :
        As for :func:`flash_attn_func`.

    Returns
    -------
    array or tuple
        As :func:`flash_attn_func`.

    Raises
    ------
    ValueError
        A ``qkv`` of neither form, or ``num_heads_q`` that does not split it; the rest as
        :func:`flash_attn_func`.

    Examples
    --------
    >>> import numpy as np
    >>> from refattn.compat import flash_attn_interface as fa3
    >>> qkv = np.random.default_rng(0).standard_normal((1, 5, 6, 8))   # H=4, K=1
    >>> out = fa3.flash_attn_qkvpacked_func(qkv, causal=True, num_heads_q=4)
    >>> want = fa3.flash_attn_func(qkv[:, :, :4], qkv[:, :, 4:5], qkv[:, :, 5:],
    ...                            causal=True)
    >>> bool(np.array_equal(out, want))
    True
    """
    xp_, _ = infer_namespace({"qkv": qkv}, xp=xp, required=("qkv",))
    if qkv.ndim == 5 and qkv.shape[2] == 3:
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    elif qkv.ndim == 4 and num_heads_q is not None:
        H = int(num_heads_q)
        K = (qkv.shape[2] - H) // 2
        if H <= 0 or K <= 0 or H + 2 * K != qkv.shape[2]:
            raise ValueError(
                f"num_heads_q={num_heads_q} does not split qkv's {qkv.shape[2]} heads into "
                "H query heads and K key and K value heads (H + 2K)"
            )
        q, k, v = qkv[:, :, :H], qkv[:, :, H:H + K], qkv[:, :, H + K:]
    else:
        raise ValueError(
            "qkv must be (B, L, 3, H, E), or (B, L, H + 2K, E) with num_heads_q; got shape "
            f"{tuple(qkv.shape)} with num_heads_q={num_heads_q}"
        )
    return flash_attn_func(q, k, v, softmax_scale, causal, None, q_descale, k_descale,
                           v_descale, window_size, attention_chunk, softcap, 1, None,
                           deterministic, sm_margin, return_attn_probs, xp=xp_)


# --- flash_attn_varlen_func ------------------------------------------------------------------


def _used(name: str, used: Any, cu: Any, xp: Any) -> tuple[Any, Any]:
    """(the kept token indices, the offsets of the kept tokens) for ``seqused``."""
    cu = xp.astype(cu, xp.int64)
    lengths = cu[1:] - cu[:-1]
    B = lengths.shape[0]
    if not xp.isdtype(used.dtype, "integral") or tuple(used.shape) != (B,):
        raise ValueError(f"{name} must be a (B,) = ({B},) integer array; got dtype "
                         f"{used.dtype}, shape {tuple(used.shape)}")
    used = xp.astype(used, xp.int64)
    if bool(xp.any((used < 0) | (used > lengths))):
        raise ValueError(f"{name} must lie in 0 .. each sequence's length "
                         f"{[int(n) for n in lengths]}; got {[int(u) for u in used]}")
    keep = [xp.arange(int(cu[b]), int(cu[b]) + int(used[b]), dtype=xp.int64,
                      device=cu.device) for b in range(B)]
    index = xp.concat(keep) if keep else xp.zeros((0,), dtype=xp.int64, device=cu.device)
    offsets = xp.concat([xp.zeros((1,), dtype=xp.int64, device=cu.device),
                         xp.cumulative_sum(used)])
    return index, offsets


def flash_attn_varlen_func(
    q: Any,
    k: Any,
    v: Any,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    max_seqlen_q: int,
    max_seqlen_k: int,
    seqused_q: Any = None,
    seqused_k: Any = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    qv: Any = None,
    q_descale: Any = None, k_descale: Any = None, v_descale: Any = None,
    window_size: tuple[int, int] = (-1, -1),
    attention_chunk: int = 0,
    softcap: float = 0.0,
    num_splits: int = 1,
    pack_gqa: bool | None = None,
    deterministic: bool = False,
    sm_margin: int = 0,
    return_attn_probs: bool = False,
    *,
    xp: Any = None,
) -> Any:
    """``flash_attn_interface.flash_attn_varlen_func`` (flash-attn 3), computed in float64.

    Sequences packed end to end; sequence b's queries attend only its own keys, with
    positions local to the sequence and aligned bottom-right.

    Parameters
    ----------
    q, k, v : array
        Packed (total_q, H, E), (total_k, K, E), (total_k, K, Ev).
    cu_seqlens_q, cu_seqlens_k : integer array
        (B + 1,) offsets. (flash-attn 3 also takes None with batched inputs; use
        :func:`flash_attn_func` for those.)
    max_seqlen_q, max_seqlen_k : int
        At least the longest query (key) sequence.
    seqused_q, seqused_k : integer array, optional
        (B,): only the first ``seqused_q[b]`` queries and ``seqused_k[b]`` keys of
        sequence b take part, and alignment uses these lengths (flash-attn 3's
        ``hopper/seqlen.h``). The other query rows are left unwritten by flash-attn 3;
        refattn gives them output 0 and LSE -inf.
    softmax_scale, causal, qv, q_descale, k_descale, v_descale, window_size, \
attention_chunk, softcap, num_splits, pack_gqa, deterministic, sm_margin, xp :
        As for :func:`flash_attn_func`, per sequence.
    return_attn_probs : bool
        Also return the LSE (H, total_q).

    Returns
    -------
    array or tuple
        ``out`` (total_q, H, Ev), or ``(out, softmax_lse)``.

    Raises
    ------
    TypeError, ValueError
        As :func:`flash_attn_func` and
        :func:`refattn.compat.flash_attn.flash_attn_varlen_func`; also ``seqused_q`` /
        ``seqused_k`` of the wrong shape or beyond a sequence's length.

    Examples
    --------
    >>> import numpy as np
    >>> from refattn.compat import flash_attn_interface as fa3
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((7, 2, 8)) for _ in range(3))
    >>> cu = np.asarray([0, 3, 7], dtype=np.int32)
    >>> used = np.asarray([3, 2], dtype=np.int32)        # sequence 1 uses 2 of its 4
    >>> out = fa3.flash_attn_varlen_func(q, k, v, cu, cu, 4, 4, seqused_q=used,
    ...                                  seqused_k=used, causal=True)
    >>> want = fa3.flash_attn_func(q[None, 3:5], k[None, 3:5], v[None, 3:5], causal=True)
    >>> bool(np.allclose(out[3:5], want[0])), bool(np.all(out[5:] == 0))
    (True, True)
    """
    _check_performance(num_splits=num_splits, pack_gqa=pack_gqa, sm_margin=sm_margin,
                       deterministic=deterministic)
    _check_descales(q_descale=q_descale, k_descale=k_descale, v_descale=v_descale)
    variants = _core_variants(qv=qv, attention_chunk=attention_chunk, front_end="varlen")
    if cu_seqlens_q is None or cu_seqlens_k is None:
        raise TypeError("refattn's flash_attn_varlen_func needs cu_seqlens_q and "
                        "cu_seqlens_k; for batched (B, L, H, E) inputs use flash_attn_func")
    scale = _scale(softmax_scale, q, qv)
    call = dict(dropout_p=0.0, softmax_scale=scale, causal=causal, window_size=window_size,
                softcap=softcap, deterministic=deterministic,
                return_attn_probs=return_attn_probs, lse_convention="fa3", **variants)
    if seqused_q is None and seqused_k is None:
        res = _varlen.flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                             max_seqlen_q, max_seqlen_k, xp=xp, **call)
        return (res[0], res[1]) if return_attn_probs else res
    xp, device = infer_namespace({"q": q, "k": k, "v": v},
                                 {"cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k,
                                  "seqused_q": seqused_q, "seqused_k": seqused_k}, xp=xp,
                                 required=("q", "k", "v"))
    # Only the used tokens take part: gathered into packed arrays of their own, run, and
    # the results scattered back among zeros (out) and -inf (LSE).
    rows, cu_q = (_used("seqused_q", seqused_q, cu_seqlens_q, xp) if seqused_q is not None
                  else (None, cu_seqlens_q))
    keys, cu_k = (_used("seqused_k", seqused_k, cu_seqlens_k, xp) if seqused_k is not None
                  else (None, cu_seqlens_k))
    qu = q if rows is None else xp.take(q, rows, axis=0)
    ku, vu = (k, v) if keys is None else (xp.take(k, keys, axis=0), xp.take(v, keys, axis=0))
    res = _varlen.flash_attn_varlen_func(qu, ku, vu, cu_q, cu_k, max_seqlen_q, max_seqlen_k,
                                         xp=xp, **call)
    out_u: Any = res[0] if return_attn_probs else res
    lse_u: Any = res[1] if return_attn_probs else None
    if rows is None:
        return (out_u, lse_u) if return_attn_probs else out_u
    total = q.shape[0]
    hits = (xp.reshape(xp.arange(total, dtype=xp.int64, device=device), (total, 1))
            == xp.reshape(rows, (1, -1)))  # (total_q, used)
    source = xp.argmax(xp.astype(hits, xp.int8), axis=1) if rows.shape[0] else None
    written = xp.any(hits, axis=1)
    if source is None:
        out = xp.zeros((total, *out_u.shape[1:]), dtype=out_u.dtype, device=device)
    else:
        out = xp.where(xp.reshape(written, (total, 1, 1)), xp.take(out_u, source, axis=0),
                       xp.zeros((), dtype=out_u.dtype, device=device))
    if not return_attn_probs:
        return out
    ninf = xp.asarray(-xp.inf, dtype=lse_u.dtype, device=device)
    lse = (xp.full((lse_u.shape[0], total), -xp.inf, dtype=lse_u.dtype, device=device)
           if source is None else
           xp.where(xp.reshape(written, (1, total)), xp.take(lse_u, source, axis=1), ninf))
    return out, lse


# --- flash_attn_with_kvcache -----------------------------------------------------------------


def flash_attn_with_kvcache(
    q: Any,
    k_cache: Any,
    v_cache: Any,
    k: Any = None,
    v: Any = None,
    qv: Any = None,
    rotary_cos: Any = None,
    rotary_sin: Any = None,
    cache_seqlens: Any = None,
    cache_batch_idx: Any = None,
    cache_leftpad: Any = None,
    page_table: Any = None,
    cu_seqlens_q: Any = None,
    cu_seqlens_k_new: Any = None,
    max_seqlen_q: int | None = None,
    rotary_seqlens: Any = None,
    q_descale: Any = None,
    k_descale: Any = None,
    v_descale: Any = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    attention_chunk: int = 0,
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    scheduler_metadata: Any = None,
    num_splits: int = 0,
    pack_gqa: bool | None = None,
    sm_margin: int = 0,
    return_softmax_lse: bool = False,
    *,
    xp: Any = None,
) -> Any:
    """``flash_attn_interface.flash_attn_with_kvcache`` (flash-attn 3), computed in float64.

    Appends the step's ``k``, ``v`` to each sequence's cache at ``cache_seqlens[b]``,
    **in place** as flash-attn does (NumPy, torch, array-api-strict; immutable or
    read-only caches raise TypeError), then attends q over the sequence's keys, query i
    at key position ``i + n_b - L`` with ``n_b = cache_seqlens[b] - cache_leftpad[b] +
    Lnew``. The window is taken literally (flash-attn 3).

    Parameters
    ----------
    q : array
        (B, L, H, E), or packed (total_q, H, E) with ``cu_seqlens_q``.
    k_cache, v_cache : array
        (B_cache, S_cache, K, E) / (.., Ev), or paged (num_pages, page_size, K, E) /
        (.., Ev) with ``page_table``.
    k, v : array, optional
        New keys and values (B, Lnew, K, E) / (.., Ev), or packed (total_new, K, E) with
        ``cu_seqlens_k_new``.
    qv : None
        Not yet in refattn.attention: anything but None raises TypeError.
    rotary_cos, rotary_sin : array, optional
        (seqlen_ro, rotary_dim / 2), with k: as for
        :func:`refattn.compat.flash_attn.flash_attn_with_kvcache`; positions start at
        ``rotary_seqlens[b]`` when given, else at ``cache_seqlens[b]``.
    cache_seqlens : int or integer array, optional
        Entries already cached per sequence, counted from the start of the cache row.
    cache_batch_idx : integer array, optional
        (B,): sequence b uses cache row (or, with ``page_table``, page-table row)
        ``cache_batch_idx[b]``.
    cache_leftpad : integer array, optional
        (B,): sequence b's keys start at cache position ``cache_leftpad[b]``
        (contiguous caches).
    page_table : integer array, optional
        (B, max_pages): page table of a paged cache.
    cu_seqlens_q : integer array, optional
        (B + 1,) offsets of packed queries; needs ``max_seqlen_q``.
    cu_seqlens_k_new : integer array, optional
        (B + 1,) offsets of packed new keys.
    max_seqlen_q : int, optional
        At least the longest query sequence, with ``cu_seqlens_q``.
    rotary_seqlens : integer array, optional
        (B,): position of each sequence's first new key for the rotary embedding.
    q_descale, k_descale, v_descale, softmax_scale, causal, window_size, attention_chunk, \
softcap :
        As for :func:`flash_attn_func`.
    rotary_interleaved : bool
        True (the default): GPT-J pairs (2m, 2m + 1); False: GPT-NeoX pairs
        (d, d + rotary_dim / 2).
    scheduler_metadata, num_splits, pack_gqa, sm_margin :
        Performance settings: no effect on the result.
    return_softmax_lse : bool
        Also return the LSE.
    xp : namespace or str, optional
        Keyword only: array namespace of the inputs or its name; inferred when None.

    Returns
    -------
    array or tuple
        ``out`` (B, L, H, Ev) (packed: (total_q, H, Ev)); with ``return_softmax_lse``
        flash-attn 3's ``(out, softmax_lse, out_accum, softmax_lse_accum)``:
        ``softmax_lse`` (B, H, L) (packed: (H, total_q)), -inf on rows that see no key,
        and flash-attn 3's split-K scratch buffers, which carry no result: empty arrays
        here.

    Raises
    ------
    TypeError
        Caches that cannot be written in place, ``qv`` or a nonzero ``attention_chunk``;
        the rest as :func:`refattn.compat.flash_attn.flash_attn_with_kvcache`.
    ValueError
        As :func:`refattn.compat.flash_attn.flash_attn_with_kvcache`; also
        ``cu_seqlens_q`` without ``max_seqlen_q``, or offsets that do not fit.

    Examples
    --------
    >>> import numpy as np
    >>> from refattn.compat import flash_attn_interface as fa3
    >>> rng = np.random.default_rng(0)
    >>> k_cache, v_cache = (rng.standard_normal((2, 6, 2, 8)) for _ in range(2))
    >>> q, k, v = (rng.standard_normal((2, 1, 2, 8)) for _ in range(3))
    >>> out, lse, *_ = fa3.flash_attn_with_kvcache(q, k_cache, v_cache, k, v,
    ...                                            cache_seqlens=3, causal=True,
    ...                                            return_softmax_lse=True)
    >>> bool(np.array_equal(k_cache[:, 3], k[:, 0]))      # written in place
    True
    >>> bool(np.allclose(out, fa3.flash_attn_func(q, k_cache[:, :4], v_cache[:, :4])))
    True
    """
    if scheduler_metadata is not None and not hasattr(scheduler_metadata, "shape"):
        raise TypeError(f"scheduler_metadata must be None or an array; got "
                        f"{type(scheduler_metadata).__name__}")
    _check_performance(num_splits=num_splits, pack_gqa=pack_gqa, sm_margin=sm_margin)
    _check_descales(q_descale=q_descale, k_descale=k_descale, v_descale=v_descale)
    _core_variants(qv=qv, attention_chunk=attention_chunk, front_end="KV-cache")
    common = dict(rotary_cos=rotary_cos, rotary_sin=rotary_sin, softmax_scale=softmax_scale,
                  causal=causal, window_size=window_size, softcap=softcap,
                  rotary_interleaved=rotary_interleaved, alibi_slopes=None, version=3,
                  lse_convention="fa3", return_lse=return_softmax_lse,
                  table_name="page_table")
    if cu_seqlens_q is None and cu_seqlens_k_new is None:
        out, lse = kvcache_forward(
            q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens,
            cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad,
            block_table=page_table, rotary_seqlens=rotary_seqlens, xp=xp, **common)
    else:
        out, lse = _packed_kvcache(
            q, k_cache, v_cache, k, v, cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k_new=cu_seqlens_k_new, max_seqlen_q=max_seqlen_q,
            cache_seqlens=cache_seqlens, cache_batch_idx=cache_batch_idx,
            cache_leftpad=cache_leftpad, page_table=page_table,
            rotary_seqlens=rotary_seqlens, xp=xp, common=common)
    if not return_softmax_lse:
        return out
    xp_, _ = infer_namespace({"out": out})
    empty = xp_.zeros((0,), dtype=xp_.float32, device=out.device)
    return out, lse, empty, empty


def _packed_kvcache(q: Any, k_cache: Any, v_cache: Any, k: Any, v: Any, *, cu_seqlens_q: Any,
                    cu_seqlens_k_new: Any, max_seqlen_q: Any, cache_seqlens: Any,
                    cache_batch_idx: Any, cache_leftpad: Any, page_table: Any,
                    rotary_seqlens: Any, xp: Any, common: dict[str, Any]) -> tuple[Any, Any]:
    """Packed queries and/or new keys: one sequence at a time, each an ordinary B = 1
    call on the same caches (each writes its own rows, in place)."""
    xp, device = infer_namespace(
        {"q": q, "k_cache": k_cache, "v_cache": v_cache, "k": k, "v": v},
        {"cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k_new": cu_seqlens_k_new}, xp=xp,
        required=("q", "k_cache", "v_cache"))
    if cu_seqlens_q is not None:
        if max_seqlen_q is None:
            raise ValueError("cu_seqlens_q needs max_seqlen_q (flash-attn: 'max_seqlen_q "
                             "must be provided if cu_seqlens_q is provided')")
        lengths = _varlen._lengths("cu_seqlens_q", cu_seqlens_q, q.shape[0], xp)
        _varlen._check_max_seqlen("max_seqlen_q", max_seqlen_q, lengths, xp)
        cu_q = [int(c) for c in xp.astype(cu_seqlens_q, xp.int64)]
        B = len(cu_q) - 1
    else:
        B = q.shape[0]
    if cu_seqlens_k_new is not None:
        if k is None:
            raise ValueError("cu_seqlens_k_new describes packed k and v: give them")
        _varlen._lengths("cu_seqlens_k_new", cu_seqlens_k_new, k.shape[0], xp)
        cu_k = [int(c) for c in xp.astype(cu_seqlens_k_new, xp.int64)]
        if len(cu_k) - 1 != B:
            raise ValueError(f"cu_seqlens_k_new must describe the {B} sequences of q; got "
                             f"{len(cu_k) - 1}")

    def row(x: Any, b: int) -> Any:
        return x if x is None or isinstance(x, numbers.Integral) else x[b:b + 1]

    outs, lses = [], []
    for b in range(B):
        qb = q[cu_q[b]:cu_q[b + 1]][None] if cu_seqlens_q is not None else q[b:b + 1]
        kb = vb = None
        if k is not None:
            kb, vb = ((k[cu_k[b]:cu_k[b + 1]][None], v[cu_k[b]:cu_k[b + 1]][None])
                      if cu_seqlens_k_new is not None else (k[b:b + 1], v[b:b + 1]))
        # Sequence b's own cache: its page-table row, or its cache row (both through
        # cache_batch_idx when given, as flash-attn 3 reads them).
        if page_table is not None:
            table = page_table if cache_batch_idx is not None else page_table[b:b + 1]
            idx = None if cache_batch_idx is None else cache_batch_idx[b:b + 1]
        else:
            table = None
            idx = (cache_batch_idx[b:b + 1] if cache_batch_idx is not None
                   else xp.asarray([b], dtype=xp.int64, device=device))
        out_b, lse_b = kvcache_forward(
            qb, k_cache, v_cache, kb, vb, cache_seqlens=row(cache_seqlens, b),
            cache_batch_idx=idx, cache_leftpad=row(cache_leftpad, b), block_table=table,
            rotary_seqlens=row(rotary_seqlens, b), xp=xp, **common)
        outs.append(out_b[0])
        lses.append(None if lse_b is None else lse_b[0])
    if cu_seqlens_q is None:
        out = xp.stack(outs, axis=0)
        lse = None if lses[0] is None else xp.stack(lses, axis=0)
    else:
        out = xp.concat(outs, axis=0)
        lse = None if lses[0] is None else xp.concat(lses, axis=1)
    return out, lse
