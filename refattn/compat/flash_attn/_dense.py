"""``flash_attn_func``: flash-attn 2's dense forward pass, translated to
:func:`refattn.attention`."""

from __future__ import annotations

from typing import Any

from ..._front_door import attention
from ..._namespace import infer_namespace
from ._args import (
    _check_convention,
    _check_kv_pair,
    _compute_inputs,
    _flash_lse,
    _lse_dtype,
    _s_dmask,
    _shape4,
    _softcap,
    flash_window,
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
    _variants: dict[str, Any] | None = None,
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
        Whose conventions: ``"fa2"`` (the default) or ``"fa3"``. They differ in the LSE
        of a row that sees no key (or whose exp-sum is NaN), +inf in flash-attn 2 and
        -inf in flash-attn 3, and in the window: flash-attn 3 takes ``window_size``
        literally, without flash-attn 2's clamping, and has no causal ALiBi branch
        (the LSE carries no row constant).
    xp : namespace or str, optional
        Array namespace of the inputs or its name, e.g. ``xp="numpy"``; inferred
        when None.

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
    # flash-attn 3's qv and attention_chunk and flash-attn 4's learnable sinks, handed
    # over by refattn.compat.flash_attn_interface / flash_attn_cute as refattn.attention's
    # qv=, attention_chunk= and sinks= (not part of flash-attn 2's signature).
    variants = dict(_variants or {})
    qv = variants.get("qv")
    xp, _ = infer_namespace({"q": q, "k": k, "v": v, "alibi_slopes": alibi_slopes, "qv": qv,
                             "sinks": variants.get("sinks")},
                            {"dropout_mask": dropout_mask}, xp=xp,
                            required=("q", "k", "v"))
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
                      has_alibi=alibi_slopes is not None,
                      version=3 if lse_convention == "fa3" else 2)
    named = {"q": q, "k": k, "v": v} if qv is None else {"q": q, "k": k, "v": v, "qv": qv}
    dtype, (qc, kc, vc, *qvc) = _compute_inputs(xp, named)
    if qvc:
        variants["qv"] = qvc[0]
    res = attention(
        qc, kc, vc, window=fw.window, alignment="bottom_right", scale=softmax_scale,
        softcap=cap, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
        dropout_mask=dropout_mask, rng=rng, masked_rows="zero", layout="BLHD",
        return_lse=return_attn_probs, return_weights=return_attn_probs,
        return_dropout_mask=return_attn_probs, xp=xp, **variants,
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

