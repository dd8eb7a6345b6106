"""flash-attn's conventions: ``flash_attn_func``, ``flash_attn_varlen_func``,
``flash_attn_with_kvcache``.

Reproduces the forward pass of flash-attn 2 (the ``flash_attn`` package, read at
Dao-AILab/flash-attention commit 0251105a: ``flash_attn/flash_attn_interface.py``,
``csrc/flash_attn/flash_api.cpp`` and the kernels' ``mask.h`` / ``softmax.h``):

* layout (B, L, H, E) ("BSHD"); key/value heads K divide H (head h uses key head
  h // (H / K));
* causal masks and windows aligned bottom-right: query i sits at key position
  i + S - L; ``window_size=(left, right)`` lets it see keys
  [i + S - L - left, i + S - L + right], -1 = unlimited, normalised exactly as
  ``flash_api.cpp`` does (see ``flash_window``);
* softcap ``c * tanh(s / c)`` on the scaled scores, then ALiBi
  ``-slope * |i + S - L - j|``, then the masks (-inf); softcap=0 is off;
* a row that sees no key gives output 0 and LSE +inf (flash-attn 2) or -inf
  (flash-attn 3: ``lse_convention="fa3"``);
* the LSE is float32 (float64 for float64 inputs: refattn's oracle keeps its precision).

Each function translates its arguments into :func:`refattn.attention`,
:func:`refattn.attention_varlen` or :func:`refattn.attention_with_kvcache`; nothing
here computes attention.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

from .. import _validate
from .._front_door import attention
from .._namespace import infer_namespace
from ..kvcache import attention_with_kvcache
from ..varlen import attention_varlen

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache"]

LSE_CONVENTIONS = ("fa2", "fa3")


# --- argument translation ----------------------------------------------------------------


class _FlashWindow(NamedTuple):
    """flash-attn's causal / window_size arguments as refattn sees them."""

    window: tuple[int | None, int | None] | None  # bottom-right (left, right), None = all
    causal_alibi: bool  # the kernel's "is_causal" branch, which writes ALiBi as +slope * j


def _check_window_size(window_size: Any) -> tuple[int, int]:
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(
            f"window_size must be a pair (left, right) of ints, -1 = unlimited; got "
            f"{window_size!r}"
        )
    sides: list[int] = []
    for side, value in zip(("left", "right"), window_size, strict=True):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(
                f"window_size[{len(sides)}] ({side}) must be an int (-1 = unlimited); got "
                f"{type(value).__name__} {value!r}"
            )
        if value < -1:
            # flash-attn reads every negative value as "unlimited"; anything but -1 is far
            # more likely a slip than a request, so it is refused rather than guessed at.
            raise ValueError(
                f"window_size[{len(sides)}] ({side}) must be >= 0, or -1 for unlimited; got "
                f"{int(value)}"
            )
        sides.append(int(value))
    return sides[0], sides[1]


def flash_window(window_size: Any, causal: Any, *, seqlen_q: int, seqlen_k: int,
                 has_alibi: bool) -> _FlashWindow:
    """flash-attn 2's normalisation of ``causal`` and ``window_size`` (mha_fwd,
    mha_varlen_fwd and mha_fwd_kvcache in flash_api.cpp, then set_params_fprop).

    An internal helper shared by this module's front-ends, the audit behind
    ``refattn check`` (``refattn._audit``) and ``refattn.testing.strategies``; it is
    not public API.

    ``seqlen_k`` is the length the C++ front-end clamps with: S for flash_attn_func,
    ``max_seqlen_k`` for the varlen form, the cache capacity for the KV cache. Its quirk
    is kept: with a finite left edge, an unlimited (-1) or too large right edge becomes
    ``seqlen_k``, which hides every key from the first L - S - 1 queries when L > S + 1.

    Parameters
    ----------
    window_size : (int, int)
        flash-attn's ``(left, right)``, -1 = unlimited.
    causal : bool
        flash-attn's ``causal``.
    seqlen_q, seqlen_k : int
        The query length and the length the C++ front-end clamps with (see above).
    has_alibi : bool
        Whether ALiBi slopes are given (they change what ``causal`` means).

    Returns
    -------
    _FlashWindow
        ``window``, refattn's bottom-right ``(left, right)`` or None for no window, and
        ``causal_alibi``, whether the kernel's causal ALiBi branch applies.
    """
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False; got {causal!r}")
    left, right = _check_window_size(window_size)
    if left >= seqlen_k:
        left = -1
    if right >= seqlen_k:
        right = -1
    if seqlen_q == 1 and not has_alibi:
        causal = False  # one query at the last key position sees every key either way
    if causal:
        right = 0
    is_causal = left < 0 and right == 0
    if left < 0 and right < 0:
        return _FlashWindow(None, False)
    if left < 0:
        left = seqlen_k
    if right < 0:
        right = seqlen_k
    return _FlashWindow((left, right), is_causal and has_alibi)


def _softcap(softcap: Any) -> float | None:
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a real number (0 = off); got {softcap!r}")
    value = float(softcap)
    if value < 0 or value != value:
        raise ValueError(f"softcap must be >= 0 (0 turns it off); got {value}")
    return value if value > 0 else None


def _check_convention(lse_convention: Any) -> None:
    _validate.check_choice("lse_convention", lse_convention, LSE_CONVENTIONS)


def _not_implemented(name: str, value: Any, function: str, hint: str) -> None:
    if value is not None:
        raise NotImplementedError(
            f"{name} is not implemented by refattn's {function} front-end; {hint}"
        )


def _compute_inputs(xp: Any, *arrays: Any) -> tuple[Any, ...]:
    # float16/bfloat16 inputs are widened to float64 here so that the output is rounded
    # once, float64 -> input dtype, and the LSE can come back in float32 (flash-attn's
    # dtype) instead of being rounded to the 16-bit input dtype first.
    dtype = arrays[0].dtype
    if dtype in (xp.float32, xp.float64):
        return arrays
    return tuple(None if x is None else xp.astype(x, xp.float64) for x in arrays)


def _lse_dtype(xp: Any, dtype: Any) -> Any:
    return xp.float64 if dtype == xp.float64 else xp.float32


def _flash_lse(lse: Any, *, convention: str, slopes: Any, q_pos: Any, dtype: Any,
               xp: Any) -> Any:
    """refattn's LSE (-inf on rows that see no key) in flash-attn's convention.

    ``slopes`` and ``q_pos`` (broadcasting to ``lse``) are given on the kernel's causal
    ALiBi branch, which adds ``+slope * j`` instead of ``-slope * |i + S - L - j|``: the
    two differ by the row constant ``slope * (i + S - L)``, which leaves the softmax
    unchanged but is part of the LSE the kernel returns.
    """
    if slopes is not None:
        lse = lse + slopes * xp.astype(q_pos, lse.dtype)
    # The kernels test the row's exp-sum: 0 (no key) or NaN give +inf (FA2), -inf (FA3).
    empty = xp.isnan(lse) | (lse == -xp.inf)
    fill = xp.asarray(xp.inf if convention == "fa2" else -xp.inf, dtype=lse.dtype,
                      device=lse.device)
    return xp.astype(xp.where(empty, fill, lse), dtype)


def _s_dmask(weights: Any, keep: Any, xp: Any) -> Any:
    # flash-attn's S_dmask marks dropped entries by a negative sign.
    return weights if keep is None else xp.where(keep, weights, -weights)


def _shape4(name: str, x: Any, legend: str) -> tuple[int, int, int, int]:
    if x.ndim != 4:
        raise ValueError(f"{name} must be 4-D {legend}; got shape {tuple(x.shape)}")
    B, L, H, D = x.shape
    return int(B), int(L), int(H), int(D)


def _check_kv_pair(k_shape: tuple[int, ...], v_shape: tuple[int, ...], k_name: str,
                   v_name: str) -> None:
    if k_shape[:-1] != v_shape[:-1]:
        raise ValueError(
            f"{k_name} and {v_name} must agree on all axes but the last (flash-attn gives "
            f"keys and values the same heads); got shapes {k_shape} and {v_shape}"
        )


# --- flash_attn_func -----------------------------------------------------------------------


def flash_attn_func(
    q: Any,
    k: Any,
    v: Any,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Any = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    dropout_mask: Any = None,
    rng: Any = None,
    lse_convention: str = "fa2",
    xp: Any = None,
) -> Any:
    """``flash_attn.flash_attn_func``, computed in float64.

    Same signature, layout, defaults and return values as flash-attn 2's forward pass;
    the output is rounded once to the dtype of ``q``.

    Parameters
    ----------
    q, k, v : array
        (B, L, H, E), (B, S, K, E), (B, S, K, Ev); K divides H (query head h uses key
        head h // (H / K)). Any real floating dtype, one for all three.
    dropout_p : float
        Dropout probability; needs ``dropout_mask`` or ``rng`` (flash-attn draws its own
        mask, refattn never draws silently). Kept weights are scaled by 1/(1 - p).
    softmax_scale : float, optional
        Multiplies q @ k^T; defaults to 1/sqrt(E).
    causal : bool
        Bottom-right causal mask: query i sees keys j <= i + S - L.
    window_size : (int, int)
        (left, right): query i sees keys i + S - L - left .. i + S - L + right; -1 means
        unlimited. Combined with ``causal`` as flash-attn 2 does (right becomes 0);
        with a finite left edge an unlimited right edge is S (flash-attn 2's quirk,
        visible only when L > S + 1).
    softcap : float
        > 0: scores become ``softcap * tanh(s / softcap)`` before ALiBi and masks;
        0 (the default) turns it off.
    alibi_slopes : array, optional
        (H,) or (B, H): adds ``-slope * |i + S - L - j|`` to the scores.
    deterministic : bool
        Accepted and ignored: it picks flash-attn's backward kernel, and refattn is
        deterministic anyway.
    return_attn_probs : bool
        Also return the LSE and the attention probabilities (below).
    dropout_mask : bool array, optional
        Keyword only, refattn's addition: the keep-mask (True = keep), broadcastable to
        (B, H, L, S), e.g. ``S_dmask >= 0`` cropped from a flash-attn run.
    rng : int or numpy.random.Generator, optional
        Keyword only: draws the keep-mask on the host instead.
    lse_convention : {"fa2", "fa3"}
        LSE of a row that sees no key (or whose exp-sum is NaN): +inf as flash-attn 2
        returns it, or -inf as flash-attn 3 does.
    xp : namespace, optional
        Array namespace of the inputs; inferred when None.

    Returns
    -------
    array or tuple
        ``out`` (B, L, H, Ev) in the dtype of q; with ``return_attn_probs`` the tuple
        ``(out, softmax_lse, S_dmask)``: ``softmax_lse`` (B, H, L) in float32 (float64
        for float64 inputs), ``S_dmask`` (B, H, L, S) the exact softmax probabilities
        in q's dtype, negated where dropout dropped them. flash-attn pads S_dmask to
        multiples of 128, may scale it differently and returns an empty tensor when
        ``dropout_p`` is 0; refattn returns the probabilities in every case.

    Raises
    ------
    TypeError
        Mixed libraries or dtypes, a non-boolean keep-mask, a window that is not a pair
        of ints.
    ValueError
        Shapes that do not fit (not 4-D, batch or sequence sizes that differ, K not
        dividing H), a window edge below -1, a negative softcap, an unknown
        ``lse_convention``; dropout problems as :func:`refattn.attention`.

    Notes
    -----
    On flash-attn 2's causal ALiBi branch (``causal=True``, or a window (-1, 0), with
    ``alibi_slopes``) the kernel adds ``+slope * j`` to the scores instead of
    ``-slope * |i + S - L - j|``. The output is the same; the LSE it returns is larger by
    ``slope * (i + S - L)``, and so is the LSE returned here.

    Examples
    --------
    >>> import numpy as np
    >>> from refattn.compat.flash_attn import flash_attn_func
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((2, 3, 4, 8))     # B=2, L=3, H=4, E=8
    >>> k, v = (rng.standard_normal((2, 5, 2, 8)) for _ in range(2))   # S=5, K=2
    >>> out = flash_attn_func(q, k, v, causal=True)
    >>> out.shape
    (2, 3, 4, 8)

    The causal mask is aligned bottom-right: the last query sees every key.

    >>> full = flash_attn_func(q, k, v)
    >>> bool(np.allclose(out[:, -1], full[:, -1]))
    True
    >>> out, lse, probs = flash_attn_func(q, k, v, window_size=(1, 0),
    ...                                   return_attn_probs=True)
    >>> lse.dtype, probs.shape
    (dtype('float64'), (2, 4, 3, 5))
    """
    xp, _ = infer_namespace({"q": q, "k": k, "v": v, "alibi_slopes": alibi_slopes},
                            {"dropout_mask": dropout_mask}, xp=xp)
    _check_convention(lse_convention)
    B, L, H, E = _shape4("q", q, "(B, L, H, E)")
    k_shape = _shape4("k", k, "(B, S, K, E)")
    v_shape = _shape4("v", v, "(B, S, K, Ev)")
    _check_kv_pair(k_shape, v_shape, "k", "v")
    if k_shape[0] != B or k_shape[3] != E:
        raise ValueError(
            f"k must have shape (B, S, K, E) with q's B={B} and E={E}; got {k_shape}"
        )
    S = k_shape[1]
    cap = _softcap(softcap)
    fw = flash_window(window_size, causal, seqlen_q=L, seqlen_k=S,
                      has_alibi=alibi_slopes is not None)
    dtype = q.dtype
    qc, kc, vc = _compute_inputs(xp, q, k, v)
    res = attention(
        qc, kc, vc, window=fw.window, alignment="bottom_right", scale=softmax_scale,
        softcap=cap, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
        dropout_mask=dropout_mask, rng=rng, masked_rows="zero", layout="BLHD",
        return_lse=return_attn_probs, return_weights=return_attn_probs,
        return_dropout_mask=return_attn_probs, xp=xp,
    )
    if not return_attn_probs:
        return xp.astype(res, dtype)
    slopes = q_pos = None
    if fw.causal_alibi:
        slopes = xp.astype(alibi_slopes, res.lse.dtype)
        slopes = xp.reshape(slopes, (*slopes.shape, 1))  # (H, 1) or (B, H, 1)
        q_pos = xp.arange(L, dtype=xp.int64, device=res.lse.device) + (S - L)
    lse = _flash_lse(res.lse, convention=lse_convention, slopes=slopes, q_pos=q_pos,
                     dtype=_lse_dtype(xp, dtype), xp=xp)
    return (xp.astype(res.out, dtype), lse,
            xp.astype(_s_dmask(res.weights, res.dropout_mask, xp), dtype))


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
    xp : namespace, optional
        Array namespace of the inputs; inferred when None.

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
                                  "dropout_mask": dropout_mask}, xp=xp)
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
                      has_alibi=alibi_slopes is not None)
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
    dtype = q.dtype
    qc, kc, vc = _compute_inputs(xp, q, k, v)
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
    xp : namespace, optional
        Array namespace of the inputs; inferred when None.

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
         "cache_batch_idx": cache_batch_idx, "block_table": block_table}, xp=xp)
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
                      has_alibi=alibi_slopes is not None)
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
    dtype = q.dtype
    qc, kcc, vcc, kn, vn = _compute_inputs(xp, q, k_cache, v_cache, k, v)
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
