"""``flash_attn_varlen_func``: flash-attn 2's packed variable-length forward pass,
translated to :func:`refattn.attention_varlen`."""

from __future__ import annotations

import numbers
from typing import Any

from ... import _validate
from ..._namespace import infer_namespace
from ...varlen import attention_varlen
from ._args import (
    _check_convention,
    _check_kv_pair,
    _compute_inputs,
    _flash_lse,
    _lse_dtype,
    _not_implemented,
    _s_dmask,
    _softcap,
    flash_window,
)

# --- flash_attn_varlen_func ----------------------------------------------------------------


def _lengths(name: str, cu: Any, total: int, xp: Any) -> Any:
    """Sequence lengths from offsets, checked enough for this module's own indexing
    (refattn.attention_varlen checks them again, with the same rules)."""
    if not xp.isdtype(cu.dtype, "integral"):
        raise TypeError(f"{name} must have an integer dtype (int32 or int64); got {cu.dtype}")
    if cu.ndim != 1 or cu.shape[0] < 2:
        raise ValueError(
            f"{name} must be 1-D of length B + 1 >= 2; got shape {tuple(cu.shape)}"
        )
    cu = xp.astype(cu, xp.int64)
    lengths = cu[1:] - cu[:-1]
    if int(cu[0]) != 0 or int(cu[-1]) != total or bool(xp.any(lengths < 0)):
        raise ValueError(
            f"{name} must run non-decreasing from 0 to {total} (the packed length); got "
            f"{[int(c) for c in cu]}"
        )
    return lengths


def _check_max_seqlen(name: str, value: Any, lengths: Any, xp: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    longest = int(xp.max(lengths))
    if longest > value:
        raise ValueError(
            f"{name}={int(value)} is below the longest sequence ({longest}): flash-attn "
            "would leave the rows past it unwritten"
        )
    return int(value)


def _packed_positions(cu_q: Any, cu_k: Any, total_q: int, *, xp: Any, device: Any
                      ) -> tuple[Any, Any, Any]:
    """Per packed query token: sequence id, position in its sequence, and its key
    position ``i + S_b - L_b`` (bottom-right)."""
    cu_q = xp.astype(cu_q, xp.int64)
    cu_k = xp.astype(cu_k, xp.int64)
    tokens = xp.arange(total_q, dtype=xp.int64, device=device)
    seg = xp.astype(xp.searchsorted(cu_q[1:], tokens, side="right"), xp.int64)
    local = tokens - xp.take(cu_q, seg, axis=0)
    shift = (cu_k[1:] - cu_k[:-1]) - (cu_q[1:] - cu_q[:-1])
    return seg, local, local + xp.take(shift, seg, axis=0)


def _pack_keep_mask(mask: Any, cu_q: Any, cu_k: Any, H: int, max_q: int, max_k: int, *,
                    xp: Any) -> Any:
    """A (B, H, max_seqlen_q, max_seqlen_k) keep-mask (flash-attn's per-sequence S_dmask
    layout) as refattn.attention_varlen's packed (H, total_q, total_k) one."""
    B = cu_q.shape[0] - 1
    target = (B, H, max_q, max_k)
    _validate.check_broadcastable("dropout_mask", mask, target,
                                  "(B, H, max_seqlen_q, max_seqlen_k)")
    mask = xp.broadcast_to(mask, target)
    total_q, total_k = int(cu_q[-1]), int(cu_k[-1])
    seg_q, loc_q, _ = _packed_positions(cu_q, cu_k, total_q, xp=xp, device=mask.device)
    seg_k, loc_k, _ = _packed_positions(cu_k, cu_k, total_k, xp=xp, device=mask.device)
    rows = xp.reshape(xp.permute_dims(mask, (0, 2, 1, 3)), (B * max_q, H, max_k))
    rows = xp.take(rows, seg_q * max_q + loc_q, axis=0)  # (total_q, H, max_k)
    packed = xp.take(rows, loc_k, axis=2)  # (total_q, H, total_k)
    # Entries between two sequences are masked anyway; True keeps them out of the way.
    same = xp.reshape(seg_q, (total_q, 1, 1)) == xp.reshape(seg_k, (1, 1, total_k))
    return xp.permute_dims(packed | ~same, (1, 0, 2))


def _unpack_scores(packed: Any, cu_q: Any, cu_k: Any, max_q: int, max_k: int, *,
                   xp: Any) -> Any:
    """(H, total_q, total_k) -> (B, H, max_seqlen_q, max_seqlen_k), zero-padded."""
    H = packed.shape[0]
    blocks = []
    for b in range(cu_q.shape[0] - 1):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        block = packed[:, q0:q1, k0:k1]
        pad_rows = xp.zeros((H, max_q - (q1 - q0), k1 - k0), dtype=packed.dtype,
                            device=packed.device)
        block = xp.concat([block, pad_rows], axis=1)
        pad_cols = xp.zeros((H, max_q, max_k - (k1 - k0)), dtype=packed.dtype,
                            device=packed.device)
        blocks.append(xp.concat([block, pad_cols], axis=2))
    return xp.stack(blocks, axis=0)


def flash_attn_varlen_func(
    q: Any,
    k: Any,
    v: Any,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Any = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: Any = None,
    *,
    dropout_mask: Any = None,
    rng: Any = None,
    lse_convention: str = "fa2",
    xp: Any = None,
) -> Any:
    """``flash_attn.flash_attn_varlen_func``, computed in float64.

    Sequences of different lengths packed end to end; sequence b's queries
    ``cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1`` attend only its own keys, with
    positions (causal, window, ALiBi) local to the sequence and aligned bottom-right.

    Parameters
    ----------
    q, k, v : array
        Packed (total_q, H, E), (total_k, K, E), (total_k, K, Ev).
    cu_seqlens_q, cu_seqlens_k : integer array
        (B + 1,) offsets: 0 first, non-decreasing, total_q (total_k) last.
    max_seqlen_q, max_seqlen_k : int
        At least the longest query (key) sequence. As in flash-attn, ``max_seqlen_k``
        is the length window edges are clamped with, and ``max_seqlen_q == 1`` the
        single-query case.
    dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic :
        As for :func:`flash_attn_func`, per sequence.
    return_attn_probs : bool
        Also return the LSE and the probabilities.
    block_table : None
        Paged keys and values are not implemented here (use
        :func:`flash_attn_with_kvcache`, or gather the pages into packed k and v); a
        value other than None raises NotImplementedError.
    dropout_mask : bool array, optional
        Keyword only: keep-mask in flash-attn's per-sequence layout
        (B, H, max_seqlen_q, max_seqlen_k) (entry [b, h, i, j] for query i and key j
        of sequence b), or broadcastable to it.
    rng : int or numpy.random.Generator, optional
        Keyword only: draws the keep-mask on the host at (H, total_q, total_k).
    lse_convention : {"fa2", "fa3"}
        As for :func:`flash_attn_func`.
    xp : namespace or str, optional
        Array namespace of the inputs or its name, e.g. ``xp="numpy"``; inferred
        when None.

    Returns
    -------
    array or tuple
        ``out`` (total_q, H, Ev); with ``return_attn_probs`` ``(out, softmax_lse,
        S_dmask)``: ``softmax_lse`` (H, total_q) in float32 (float64 for float64 inputs),
        ``S_dmask`` (B, H, max_seqlen_q, max_seqlen_k), the probabilities of each
        sequence zero-padded, negated where dropped.

    Raises
    ------
    TypeError, ValueError
        As :func:`flash_attn_func` and :func:`refattn.attention_varlen`; also
        ``max_seqlen_q`` / ``max_seqlen_k`` below the longest sequence.
    NotImplementedError
        A ``block_table``.

    Examples
    --------
    >>> import numpy as np
    >>> from refattn.compat.flash_attn import flash_attn_func, flash_attn_varlen_func
    >>> rng = np.random.default_rng(0)
    >>> cu = np.asarray([0, 3, 7], dtype=np.int32)       # sequences of 3 and 4 tokens
    >>> q, k, v = (rng.standard_normal((7, 2, 8)) for _ in range(3))
    >>> out = flash_attn_varlen_func(q, k, v, cu, cu, 4, 4, causal=True)
    >>> out.shape
    (7, 2, 8)
    >>> second = flash_attn_func(q[None, 3:], k[None, 3:], v[None, 3:], causal=True)
    >>> bool(np.allclose(out[3:], second[0]))
    True
    """
    _not_implemented("block_table", block_table, "flash_attn_varlen_func",
                     "use flash_attn_with_kvcache for a paged cache, or gather the pages "
                     "into packed k and v")
    xp, device = infer_namespace({"q": q, "k": k, "v": v, "alibi_slopes": alibi_slopes},
                                 {"cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k,
                                  "dropout_mask": dropout_mask}, xp=xp,
                                 required=("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k"))
    _check_convention(lse_convention)
    for name, x, legend in (("q", q, "(total_q, H, E)"), ("k", k, "(total_k, K, E)"),
                            ("v", v, "(total_k, K, Ev)")):
        if x.ndim != 3:
            raise ValueError(f"{name} must be 3-D {legend}; got shape {tuple(x.shape)}")
    _check_kv_pair(tuple(k.shape), tuple(v.shape), "k", "v")
    max_q = _check_max_seqlen("max_seqlen_q", max_seqlen_q,
                              _lengths("cu_seqlens_q", cu_seqlens_q, q.shape[0], xp), xp)
    max_k = _check_max_seqlen("max_seqlen_k", max_seqlen_k,
                              _lengths("cu_seqlens_k", cu_seqlens_k, k.shape[0], xp), xp)
    cap = _softcap(softcap)
    fw = flash_window(window_size, causal, seqlen_q=max_q, seqlen_k=max_k,
                      has_alibi=alibi_slopes is not None,
                      version=3 if lse_convention == "fa3" else 2)
    H = q.shape[1]
    keep = None
    if dropout_mask is not None:
        if not xp.isdtype(dropout_mask.dtype, "bool"):
            raise TypeError(
                f"dropout_mask must be a boolean array (True = keep); got dtype "
                f"{dropout_mask.dtype}"
            )
        if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0]:
            raise ValueError(
                "cu_seqlens_q and cu_seqlens_k must describe the same number of "
                f"sequences; got lengths {cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}"
            )
        keep = _pack_keep_mask(dropout_mask, cu_seqlens_q, cu_seqlens_k, H, max_q, max_k,
                               xp=xp)
    dtype, (qc, kc, vc) = _compute_inputs(xp, {"q": q, "k": k, "v": v})
    res = attention_varlen(
        qc, kc, vc, cu_seqlens_q, cu_seqlens_k, alignment="bottom_right", window=fw.window,
        scale=softmax_scale, softcap=cap, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
        dropout_mask=keep, rng=rng, masked_rows="zero", return_lse=return_attn_probs,
        return_weights=return_attn_probs, return_dropout_mask=return_attn_probs, xp=xp,
    )
    if not return_attn_probs:
        return xp.astype(res, dtype)
    slopes = q_pos = None
    if fw.causal_alibi:
        seg, _, q_pos = _packed_positions(cu_seqlens_q, cu_seqlens_k, q.shape[0], xp=xp,
                                          device=device)
        slopes = xp.astype(alibi_slopes, res.lse.dtype)
        # (H, 1), or the slopes of each token's own sequence (H, total_q).
        slopes = (xp.reshape(slopes, (H, 1)) if slopes.ndim == 1
                  else xp.permute_dims(xp.take(slopes, seg, axis=0), (1, 0)))
    lse = _flash_lse(res.lse, convention=lse_convention, slopes=slopes, q_pos=q_pos,
                     dtype=_lse_dtype(xp, dtype), xp=xp)
    probs = _s_dmask(res.weights, res.dropout_mask, xp)
    probs = _unpack_scores(probs, xp.astype(cu_seqlens_q, xp.int64),
                           xp.astype(cu_seqlens_k, xp.int64), max_q, max_k, xp=xp)
    return xp.astype(res.out, dtype), lse, xp.astype(probs, dtype)
