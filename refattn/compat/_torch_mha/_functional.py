"""``multi_head_attention_forward``: torch's functional multi-head attention in float64.

The steps, in torch's order, are listed in :doc:`multihead`; here are the projections,
the merging of the masks into one additive bias and the extra ``bias_k``/``bias_v`` and
zero-attention keys. The attention step itself is in ``_weights``, the argument checks
in ``_checks``.
"""

from __future__ import annotations

from typing import Any

import array_api_compat

from ..._namespace import infer_namespace
from ..._types import Array, Device, Namespace
from ._checks import (
    check_bool,
    check_dropout,
    check_extra_keys,
    check_masks,
    check_out_projection,
    check_positive_int,
    check_ranks,
    check_shape,
    projection_weights,
)
from ._weights import attend, returned_weights

__all__ = ["multi_head_attention_forward"]


def multi_head_attention_forward(
    query: Array,
    key: Array,
    value: Array,
    embed_dim_to_check: int,
    num_heads: int,
    in_proj_weight: Array | None,
    in_proj_bias: Array | None,
    bias_k: Array | None,
    bias_v: Array | None,
    add_zero_attn: bool,
    dropout_p: float,
    out_proj_weight: Array | None,
    out_proj_bias: Array | None,
    training: bool = True,
    key_padding_mask: Array | None = None,
    need_weights: bool = True,
    attn_mask: Array | None = None,
    use_separate_proj_weight: bool = False,
    q_proj_weight: Array | None = None,
    k_proj_weight: Array | None = None,
    v_proj_weight: Array | None = None,
    static_k: Array | None = None,
    static_v: Array | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
    *,
    dropout_mask: Array | None = None,
    rng: Any = None,
    xp: Namespace | None = None,
) -> tuple[Array, Array | None]:
    """``torch.nn.functional.multi_head_attention_forward``, computed in float64.

    Same signature and semantics as torch 2.13 (sequence-first layout, no ``batch_first``);
    every array may come from any supported library (all from one). Outputs are cast back
    to the dtype of ``query``. Shape legend: L target length, S source length, N batch,
    E embed_dim, H num_heads, D = E // H.

    Parameters
    ----------
    query, key, value : array
        (L, N, E), (S, N, kdim), (S, N, vdim) batched, or (L, E), (S, kdim), (S, vdim)
        unbatched; one real floating dtype.
    embed_dim_to_check : int
        Must equal E, the last dim of ``query``.
    num_heads : int
        H; must divide E.
    in_proj_weight : array or None
        (3E, E): the q, k, v projection weights stacked along dim 0. Used unless
        ``use_separate_proj_weight``.
    in_proj_bias : array or None
        (3E,): the q, k, v projection biases.
    bias_k, bias_v : array or None
        (1, 1, E) (or (E,)): one extra key/value appended after the projection; give both
        or neither.
    add_zero_attn : bool
        Append one all-zero key/value (after ``bias_k``/``bias_v``).
    dropout_p : float
        Dropout probability on the attention weights, applied only when ``training``.
    out_proj_weight, out_proj_bias : array
        (E_out, E) and (E_out,) or None: the output projection.
    training : bool
        Apply dropout. With ``dropout_p > 0`` it needs ``dropout_mask`` or ``rng``.
    key_padding_mask : array, optional
        (N, S) or (S,) unbatched. Bool: True = this key is padding (ignored). Float: added
        to the scores of that key.
    need_weights : bool
        Return the attention weights. True computes a plain softmax, so a query that can
        see no key gets NaN (output and weights); False follows SDPA, which gives that
        query a 0 attention output (so the out-projection's bias alone).
    attn_mask : array, optional
        (L, S) or (N*H, L, S) ((H, L, S) unbatched). Bool: True = NOT allowed to attend.
        Float: added to the scores. Merged with ``key_padding_mask`` by adding the
        additive forms; a bool mask meeting a float mask (or two float dtypes) emits
        torch's deprecation ``UserWarning``.
    use_separate_proj_weight : bool
        Use ``q_proj_weight`` (E, E), ``k_proj_weight`` (E, kdim), ``v_proj_weight``
        (E, vdim) instead of ``in_proj_weight``.
    q_proj_weight, k_proj_weight, v_proj_weight : array, optional
        The separate projection weights.
    static_k, static_v : array, optional
        (N*H, S', D): keys/values that replace the projected ones (head index n*H + h).
    average_attn_weights : bool
        Average the returned weights over heads.
    is_causal : bool
        torch's hint that ``attn_mask`` is the causal mask. It needs ``attn_mask``; when
        there is no ``key_padding_mask`` and ``need_weights=False`` the top-left causal
        mask replaces ``attn_mask`` (whatever it holds), otherwise ``attn_mask`` is used.
        refattn still checks ``attn_mask``'s dtype and shape there; torch skips them.
    dropout_mask : bool array, optional
        refattn extra: the keep-mask (True = keep), (N, H, L, S_final) or (H, L, S_final)
        unbatched, where S_final counts the ``bias_k`` and zero-attention positions.
    rng : int or numpy.random.Generator, optional
        refattn extra: draws the keep-mask as
        ``numpy.random.default_rng(rng).random((N, H, L, S_final)) >= dropout_p``.
    xp : namespace or str, optional
        Array namespace of the inputs or its name, e.g. ``xp="numpy"``; inferred
        when None.

    Returns
    -------
    attn_output : array
        (L, N, E_out) or (L, E_out) unbatched, in the dtype of ``query``.
    attn_output_weights : array or None
        With ``need_weights``: (N, L, S_final) averaged over heads, or (N, H, L, S_final)
        (unbatched without N), after dropout. None otherwise.

    Raises
    ------
    TypeError
        Non-bool/non-float masks, mixed libraries or dtypes of query/key/value, non-bool
        flags.
    ValueError
        Wrong ranks or shapes (each naming the argument and the expected shape), E not
        divisible by H, ``is_causal`` without ``attn_mask``, dropout without a keep-mask
        or seed. (torch raises AssertionError or RuntimeError for most of these.)

    Examples
    --------
    >>> import numpy as np
    >>> import refattn
    >>> rng = np.random.default_rng(0)
    >>> L, N, E, H = 3, 2, 4, 2
    >>> x = rng.standard_normal((L, N, E))
    >>> w_in, w_out = rng.standard_normal((3 * E, E)), rng.standard_normal((E, E))
    >>> pad = np.array([[False, False, True], [False, False, False]])  # True = padding
    >>> out, w = refattn.multi_head_attention_forward(
    ...     x, x, x, E, H, w_in, None, None, None, False, 0.0, w_out, None,
    ...     key_padding_mask=pad)
    >>> out.shape, w.shape
    ((3, 2, 4), (2, 3, 3))
    >>> float(w[0, :, 2].max())  # the padded key gets no weight
    0.0
    """
    floating = {
        "query": query, "key": key, "value": value, "in_proj_weight": in_proj_weight,
        "in_proj_bias": in_proj_bias, "bias_k": bias_k, "bias_v": bias_v,
        "out_proj_weight": out_proj_weight, "out_proj_bias": out_proj_bias,
        "q_proj_weight": q_proj_weight, "k_proj_weight": k_proj_weight,
        "v_proj_weight": v_proj_weight, "static_k": static_k, "static_v": static_v,
    }
    others = {
        "key_padding_mask": key_padding_mask, "attn_mask": attn_mask,
        "dropout_mask": dropout_mask,
    }
    xp, device = infer_namespace(floating, others, xp=xp,
                                 required=("query", "key", "value"))
    for name, flag in (
        ("add_zero_attn", add_zero_attn), ("training", training),
        ("need_weights", need_weights), ("use_separate_proj_weight", use_separate_proj_weight),
        ("average_attn_weights", average_attn_weights), ("is_causal", is_causal),
    ):
        check_bool(name, flag)
    H = check_positive_int("num_heads", num_heads)
    batched = check_ranks(query, key, value, key_padding_mask, attn_mask)
    kpm_shape = None if key_padding_mask is None else tuple(key_padding_mask.shape)

    # Work batch-first, (N, L, E), in float64 from here on.
    if batched:
        q_in, k_in, v_in = (xp.permute_dims(x, (1, 0, 2)) for x in (query, key, value))
    else:
        q_in, k_in, v_in = (x[None, ...] for x in (query, key, value))
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask[None, ...]
    N, L, E = q_in.shape

    # -- masks: dtype rules, the deprecation warning, the is_causal hint --
    check_masks(key_padding_mask, attn_mask, xp=xp)
    if is_causal and attn_mask is None:
        raise ValueError(
            "is_causal=True needs attn_mask (torch treats is_causal as a hint that attn_mask "
            "is the causal mask: 'Need attn_mask if specifying the is_causal hint'); pass "
            "the causal mask as attn_mask too"
        )
    # The hint replaces the mask only where torch hands it to SDPA as is_causal: no padding
    # mask to merge and no weights to compute.
    causal = is_causal and key_padding_mask is None and not need_weights

    # -- projections --
    E_check = check_positive_int("embed_dim_to_check", embed_dim_to_check)
    if E != E_check:
        raise ValueError(
            f"query's embedding dim is {E} (shape {tuple(query.shape)}) but "
            f"embed_dim_to_check is {E_check}"
        )
    if E % H:
        raise ValueError(f"embed_dim {E} is not divisible by num_heads {H}")
    D = E // H
    (w_q, w_k, w_v), (b_q, b_k, b_v) = projection_weights(
        key, value, E, in_proj_weight, in_proj_bias, use_separate_proj_weight,
        q_proj_weight, k_proj_weight, v_proj_weight,
    )
    check_out_projection(out_proj_weight, out_proj_bias, E)
    check_extra_keys(bias_k, bias_v, static_k, static_v, N * H, D, E)

    q = xp.reshape(_linear(xp.astype(q_in, xp.float64), w_q, b_q, xp=xp), (N, L, H, D))
    k = _keys(k_in, w_k, b_k, bias_k, static_k, H, xp=xp)
    v = _keys(v_in, w_v, b_v, bias_v, static_v, H, xp=xp)
    if k.shape[1] != v.shape[1]:
        raise ValueError(
            f"keys and values must have as many positions: {k.shape[1]} keys "
            f"({'static_k' if static_k is not None else 'key'}), {v.shape[1]} "
            f"values ({'static_v' if static_v is not None else 'value'})"
        )
    if add_zero_attn:
        zeros = xp.zeros((N, 1, H, D), dtype=xp.float64, device=device)
        k = xp.concat((k, zeros), axis=1)
        v = xp.concat((v, zeros), axis=1)
    S_key = k_in.shape[1]
    S_src = S_key if static_k is None else static_k.shape[1]
    S_final = k.shape[1]

    bias = _merged_bias(
        attn_mask, key_padding_mask, kpm_shape, batched=batched, causal=causal, N=N, H=H,
        L=L, S_key=S_key, S_src=S_src, S_final=S_final, xp=xp, device=device,
    )
    p = check_dropout(
        training, dropout_p, dropout_mask, rng,
        (N, H, L, S_final) if batched else (H, L, S_final),
        "(N, num_heads, L, S_final)" if batched else "(num_heads, L, S_final)",
    )
    out, weights = attend(
        q, k, v, bias, causal=causal, p=p, dropout_mask=dropout_mask, rng=rng,
        need_weights=need_weights, xp=xp,
    )

    out = _linear(xp.reshape(out, (N, L, E)), out_proj_weight, out_proj_bias, xp=xp)
    out = xp.permute_dims(out, (1, 0, 2)) if batched else out[0, ...]
    weights = returned_weights(
        weights, average=average_attn_weights, batched=batched, dtype=query.dtype, xp=xp
    )
    return xp.astype(out, query.dtype), weights


def _merged_bias(
    attn_mask: Array | None, key_padding_mask: Array | None, kpm_shape: tuple[int, ...] | None,
    *, batched: bool, causal: bool, N: int, H: int, L: int, S_key: int, S_src: int,
    S_final: int, xp: Namespace, device: Device,
) -> Array | None:
    # The masks as one additive float64 bias broadcastable to (N, H, L, S_final); None
    # when there is none (or the causal hint replaces attn_mask and there is no padding).
    bias = None
    if attn_mask is not None:
        if S_src != S_key:
            # torch checks attn_mask against key's length and then fails to add it to the
            # scores over static_k's positions.
            raise ValueError(
                f"attn_mask cannot be used when static_k has {S_src} positions but key has "
                f"{S_key}: torch checks attn_mask against key's length"
            )
        if attn_mask.ndim == 2:
            check_shape("attn_mask", attn_mask, (L, S_src), "(L, S)")
        elif batched:
            check_shape("attn_mask", attn_mask, (N * H, L, S_src), "(N*num_heads, L, S)")
        else:
            check_shape("attn_mask", attn_mask, (H, L, S_src), "(num_heads, L, S) unbatched")
        if not causal:
            bias = _additive(attn_mask, xp=xp, device=device)
            bias = xp.reshape(bias, (1, 1, L, S_src) if attn_mask.ndim == 2 else (N, H, L, S_src))
    if key_padding_mask is not None:
        expected = (N, S_src) if batched else (S_src,)
        if kpm_shape != expected:
            raise ValueError(
                f"key_padding_mask must have shape {expected} "
                f"({'(N, S)' if batched else '(S,) unbatched'}); got {kpm_shape}"
            )
        kpm = xp.reshape(_additive(key_padding_mask, xp=xp, device=device), (N, 1, 1, S_src))
        bias = kpm if bias is None else bias + kpm
    if bias is not None:
        for _ in range(S_final - S_src):  # the bias_k and zero-attention positions
            bias = _pad_last(bias, xp=xp)
    return bias


def _additive(mask: Array, *, xp: Namespace, device: Device) -> Array:
    # torch's `_canonical_mask`: True -> -inf, False -> 0; float masks are used as they are.
    if xp.isdtype(mask.dtype, "bool"):
        neg_inf = xp.asarray(-xp.inf, dtype=xp.float64, device=device)
        zero = xp.asarray(0.0, dtype=xp.float64, device=device)
        return xp.where(mask, neg_inf, zero)
    return xp.astype(mask, xp.float64)


def _pad_last(x: Array, *, xp: Namespace) -> Array:
    # One more key position that takes part: additive 0 (torch's `pad(mask, (0, 1))`).
    zeros = xp.zeros((*x.shape[:-1], 1), dtype=x.dtype, device=array_api_compat.device(x))
    return xp.concat((x, zeros), axis=-1)


def _linear(x: Array, weight: Array, bias: Array | None, *, xp: Namespace) -> Array:
    # torch.nn.functional.linear: x @ W^T + b, here in float64.
    y = x @ xp.astype(weight, xp.float64).T
    return y if bias is None else y + xp.astype(bias, xp.float64)


def _keys(
    x: Array, weight: Array, bias: Array | None, extra: Array | None, static: Array | None,
    H: int, *, xp: Namespace,
) -> Array:
    # Keys (or values) as (N, S, H, D): projected, or static; then bias_k (bias_v) appended
    # after the projection, since it is a key already.
    N, S, _ = x.shape
    if static is not None:
        NH, S_static, D = static.shape
        st = xp.reshape(xp.astype(static, xp.float64), (N, H, S_static, D))
        return xp.permute_dims(st, (0, 2, 1, 3))  # static is (N*H, S, D), index n*H + h
    y = _linear(xp.astype(x, xp.float64), weight, bias, xp=xp)
    E = y.shape[-1]
    if extra is not None:
        row = xp.reshape(xp.astype(extra, xp.float64), (1, 1, E))
        y = xp.concat((y, xp.broadcast_to(row, (N, 1, E))), axis=1)
    return xp.reshape(y, (N, y.shape[1], H, E // H))
