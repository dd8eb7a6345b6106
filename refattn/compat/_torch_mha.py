"""torch's multi-head attention: ``multi_head_attention_forward`` and ``MultiheadAttention``.

Reproduces torch 2.13's reference path (``torch.nn.functional.multi_head_attention_forward``,
which ``torch.nn.MultiheadAttention.forward`` calls outside its inference fast path). What
torch does, and so what this does, in order:

1. in-projection: packed ``in_proj_weight`` (q, k, v stacked along dim 0) or three separate
   weights when kdim/vdim differ from embed_dim; ``in_proj_bias`` split in three;
2. boolean masks are True = masked OUT (the inverse of SDPA) and become additive
   0/-inf; float masks are additive; ``attn_mask`` and ``key_padding_mask`` merge by adding;
3. ``bias_k``/``bias_v`` append one key/value (after the projection), ``add_zero_attn`` then
   one zero key/value; the masks are padded with 0 so the new positions take part;
4. ``need_weights=True`` runs a plain softmax (fully masked rows are NaN) and returns the
   weights after dropout; ``need_weights=False`` runs SDPA (fully masked rows are 0);
5. out-projection.

All of it is array-API arithmetic around one ``refattn.attention`` call, in float64; the
results are cast back to the query's dtype.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import array_api_compat
import numpy as np

from .._front_door import attention
from .._namespace import infer_namespace, library_name
from .._validate import check_dropout_p

__all__ = ["MultiheadAttention", "multi_head_attention_forward"]


# --- argument checks ---------------------------------------------------------------------


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {value!r}")


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return int(value)


def _check_shape(name: str, x: Any, expected: tuple[int, ...], meaning: str) -> None:
    if x is not None and tuple(x.shape) != expected:
        raise ValueError(f"{name} must have shape {expected} {meaning}; got {tuple(x.shape)}")


def _check_mask_dtype(name: str, mask: Any, xp: Any) -> None:
    # torch accepts bool and floating masks only (`_canonical_mask`); an integer 0/1 mask is
    # ambiguous between "keep" and "mask out", so it is refused rather than guessed.
    if not (xp.isdtype(mask.dtype, "bool") or xp.isdtype(mask.dtype, "real floating")):
        raise TypeError(
            f"{name} must be bool (True = masked out) or floating (added to the scores); "
            f"got dtype {mask.dtype}"
        )


def _additive(mask: Any, *, xp: Any, device: Any) -> Any:
    # torch's `_canonical_mask`: True -> -inf, False -> 0; float masks are used as they are.
    if xp.isdtype(mask.dtype, "bool"):
        neg_inf = xp.asarray(-xp.inf, dtype=xp.float64, device=device)
        zero = xp.asarray(0.0, dtype=xp.float64, device=device)
        return xp.where(mask, neg_inf, zero)
    return xp.astype(mask, xp.float64)


def _pad_last(x: Any, *, xp: Any) -> Any:
    # One more key position that takes part: additive 0 (torch's `pad(mask, (0, 1))`).
    zeros = xp.zeros((*x.shape[:-1], 1), dtype=x.dtype, device=array_api_compat.device(x))
    return xp.concat((x, zeros), axis=-1)


def _linear(x: Any, weight: Any, bias: Any, *, xp: Any) -> Any:
    # torch.nn.functional.linear: x @ W^T + b, here in float64.
    y = x @ xp.astype(weight, xp.float64).T
    return y if bias is None else y + xp.astype(bias, xp.float64)


# --- the functional form ----------------------------------------------------------------


def multi_head_attention_forward(
    query: Any,
    key: Any,
    value: Any,
    embed_dim_to_check: int,
    num_heads: int,
    in_proj_weight: Any,
    in_proj_bias: Any,
    bias_k: Any,
    bias_v: Any,
    add_zero_attn: bool,
    dropout_p: float,
    out_proj_weight: Any,
    out_proj_bias: Any,
    training: bool = True,
    key_padding_mask: Any = None,
    need_weights: bool = True,
    attn_mask: Any = None,
    use_separate_proj_weight: bool = False,
    q_proj_weight: Any = None,
    k_proj_weight: Any = None,
    v_proj_weight: Any = None,
    static_k: Any = None,
    static_v: Any = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
    *,
    dropout_mask: Any = None,
    rng: Any = None,
    xp: Any = None,
) -> tuple[Any, Any]:
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
    xp : namespace, optional
        Array namespace of the inputs; inferred when None.

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
    xp, device = infer_namespace(floating, others, xp=xp)
    for name, flag in (
        ("add_zero_attn", add_zero_attn), ("training", training),
        ("need_weights", need_weights), ("use_separate_proj_weight", use_separate_proj_weight),
        ("average_attn_weights", average_attn_weights), ("is_causal", is_causal),
    ):
        _check_bool(name, flag)
    H = _check_positive_int("num_heads", num_heads)
    batched = _check_ranks(query, key, value, key_padding_mask, attn_mask)
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
    _check_masks(key_padding_mask, attn_mask, xp=xp)
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
    E_check = _check_positive_int("embed_dim_to_check", embed_dim_to_check)
    if E != E_check:
        raise ValueError(
            f"query's embedding dim is {E} (shape {tuple(query.shape)}) but "
            f"embed_dim_to_check is {E_check}"
        )
    if E % H:
        raise ValueError(f"embed_dim {E} is not divisible by num_heads {H}")
    D = E // H
    (w_q, w_k, w_v), (b_q, b_k, b_v) = _projection_weights(
        key, value, E, in_proj_weight, in_proj_bias, use_separate_proj_weight,
        q_proj_weight, k_proj_weight, v_proj_weight,
    )
    _check_out_projection(out_proj_weight, out_proj_bias, E)
    _check_extra_keys(bias_k, bias_v, static_k, static_v, N * H, D, E)

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

    # -- masks to one additive float64 bias broadcastable to (N, H, L, S_final) --
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
            _check_shape("attn_mask", attn_mask, (L, S_src), "(L, S)")
        elif batched:
            _check_shape("attn_mask", attn_mask, (N * H, L, S_src), "(N*num_heads, L, S)")
        else:
            _check_shape("attn_mask", attn_mask, (H, L, S_src), "(num_heads, L, S) unbatched")
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

    # -- dropout: only in training, never drawn silently --
    p = check_dropout_p(dropout_p) if training else 0.0
    if p == 0.0 and (dropout_mask is not None or rng is not None):
        raise ValueError(
            "dropout_mask or rng given but no dropout is applied "
            f"(training={training}, dropout_p={dropout_p})"
        )
    if p > 0.0 and dropout_mask is None and rng is None:
        raise ValueError(
            f"dropout_p={p} in training needs dropout_mask (bool, True = keep) or rng (int "
            "seed or numpy.random.Generator): refattn never draws random numbers silently"
        )
    if dropout_mask is not None:
        expected = (N, H, L, S_final) if batched else (H, L, S_final)
        _check_shape("dropout_mask", dropout_mask, expected,
                     "(N, num_heads, L, S_final)" if batched else "(num_heads, L, S_final)")

    if need_weights:
        out, weights = _attend_with_weights(q, k, v, bias, p, dropout_mask, rng, xp=xp)
    else:
        # torch's math SDPA scales q and k by sqrt(1/sqrt(D)) each before the product.
        root = math.sqrt(1.0 / math.sqrt(D))
        out = attention(
            q * root, k * root, v, bias=bias, causal=causal, alignment="top_left", scale=1.0,
            dropout_p=p, dropout_mask=dropout_mask, rng=rng, masked_rows="zero",
            layout="BLHD", xp=xp,
        )
        weights = None

    out = _linear(xp.reshape(out, (N, L, E)), out_proj_weight, out_proj_bias, xp=xp)
    out = xp.permute_dims(out, (1, 0, 2)) if batched else out[0, ...]
    out = xp.astype(out, query.dtype)
    if weights is not None:
        if average_attn_weights:
            weights = xp.mean(weights, axis=1)
        if not batched:
            weights = weights[0, ...]
        weights = xp.astype(weights, query.dtype)
    return out, weights


def _check_ranks(query: Any, key: Any, value: Any, kpm: Any, attn_mask: Any) -> bool:
    # torch's `_mha_shape_check`, plus one dtype for query, key and value. True = batched.
    if query.ndim == 3:
        batched = True
        if key.ndim != 3 or value.ndim != 3:
            raise ValueError(
                "for a batched (3-D) query, key and value must be 3-D (S, N, E); got key "
                f"{tuple(key.shape)} and value {tuple(value.shape)}"
            )
    elif query.ndim == 2:
        batched = False
        if key.ndim != 2 or value.ndim != 2:
            raise ValueError(
                "for an unbatched (2-D) query, key and value must be 2-D (S, E); got key "
                f"{tuple(key.shape)} and value {tuple(value.shape)}"
            )
    else:
        raise ValueError(
            "query must be (L, N, E) batched or (L, E) unbatched; got shape "
            f"{tuple(query.shape)}"
        )
    if kpm is not None and kpm.ndim != (2 if batched else 1):
        raise ValueError(
            f"key_padding_mask must be {'(N, S)' if batched else '(S,)'} for a "
            f"{'batched' if batched else 'unbatched'} query; got shape {tuple(kpm.shape)}"
        )
    if attn_mask is not None and attn_mask.ndim not in (2, 3):
        raise ValueError(
            "attn_mask must be 2-D (L, S) or 3-D (N*num_heads, L, S); got shape "
            f"{tuple(attn_mask.shape)}"
        )
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            "query, key and value must share one dtype; got query "
            f"{query.dtype}, key {key.dtype}, value {value.dtype}"
        )
    return batched


def _check_masks(kpm: Any, attn_mask: Any, *, xp: Any) -> None:
    for name, m in (("key_padding_mask", kpm), ("attn_mask", attn_mask)):
        if m is not None:
            _check_mask_dtype(name, m, xp)
    if kpm is not None and attn_mask is not None and kpm.dtype != attn_mask.dtype:
        # torch's `_canonical_mask` warns (a plain UserWarning) and goes on by adding the
        # additive forms; so do we.
        warnings.warn(
            "Support for mismatched key_padding_mask and attn_mask is deprecated. Use "
            f"same type for both instead. (key_padding_mask {kpm.dtype}, "
            f"attn_mask {attn_mask.dtype})",
            UserWarning,
            stacklevel=3,
        )


def _projection_weights(
    key: Any, value: Any, E: int, in_proj_weight: Any, in_proj_bias: Any, separate: bool,
    q_proj_weight: Any, k_proj_weight: Any, v_proj_weight: Any,
) -> tuple[tuple[Any, Any, Any], tuple[Any, Any, Any]]:
    # (w_q, w_k, w_v), (b_q, b_k, b_v): packed along dim 0 in q, k, v order, or separate.
    # key and value are in the caller's layout, features last.
    if separate:
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(
                "key and value must have the same sequence and batch dims; got key "
                f"{tuple(key.shape)}, value {tuple(value.shape)}"
            )
        for name, w in (("q_proj_weight", q_proj_weight), ("k_proj_weight", k_proj_weight),
                        ("v_proj_weight", v_proj_weight)):
            if w is None:
                raise ValueError(f"use_separate_proj_weight=True needs {name}")
        _check_shape("q_proj_weight", q_proj_weight, (E, E), "(embed_dim, embed_dim)")
        _check_shape("k_proj_weight", k_proj_weight, (E, key.shape[-1]), "(embed_dim, key's dim)")
        _check_shape("v_proj_weight", v_proj_weight, (E, value.shape[-1]),
                     "(embed_dim, value's dim)")
        weights = (q_proj_weight, k_proj_weight, v_proj_weight)
    else:
        if tuple(key.shape) != tuple(value.shape):
            raise ValueError(
                f"key shape {tuple(key.shape)} does not match value shape "
                f"{tuple(value.shape)} (use_separate_proj_weight=False)"
            )
        if in_proj_weight is None:
            raise ValueError("use_separate_proj_weight=False needs in_proj_weight")
        _check_shape("in_proj_weight", in_proj_weight, (3 * E, E), "(3 * embed_dim, embed_dim)")
        if key.shape[-1] != E:
            raise ValueError(
                f"key and value must have embed_dim {E} features with the packed "
                f"in_proj_weight; got key {tuple(key.shape)}"
            )
        weights = tuple(in_proj_weight[i * E:(i + 1) * E, :] for i in range(3))
    _check_shape("in_proj_bias", in_proj_bias, (3 * E,), "(3 * embed_dim,)")
    if in_proj_bias is None:
        return weights, (None, None, None)
    return weights, tuple(in_proj_bias[i * E:(i + 1) * E] for i in range(3))


def _check_out_projection(weight: Any, bias: Any, E: int) -> None:
    # torch's linear allows any output width E_out; the input width must be E.
    if weight is None or weight.ndim != 2 or weight.shape[1] != E:
        raise ValueError(
            "out_proj_weight must be a (E_out, embed_dim) array with embed_dim = "
            f"{E}; got {None if weight is None else tuple(weight.shape)}"
        )
    _check_shape("out_proj_bias", bias, (weight.shape[0],), "(E_out,)")


def _check_extra_keys(
    bias_k: Any, bias_v: Any, static_k: Any, static_v: Any, NH: int, D: int, E: int
) -> None:
    if (bias_k is None) != (bias_v is None):
        raise ValueError("bias_k and bias_v must be given together (add_bias_kv) or not at all")
    for name, b in (("bias_k", bias_k), ("bias_v", bias_v)):
        if b is not None and (b.shape[-1:] != (E,) or math.prod(b.shape) != E):
            raise ValueError(
                f"{name} must have shape (1, 1, embed_dim) = (1, 1, {E}); got {tuple(b.shape)}"
            )
    if bias_k is not None and (static_k is not None or static_v is not None):
        raise ValueError("bias_k/bias_v cannot be added to static_k/static_v")
    for name, st in (("static_k", static_k), ("static_v", static_v)):
        if st is not None and (st.ndim != 3 or st.shape[0] != NH or st.shape[2] != D):
            raise ValueError(
                f"{name} must have shape (N*num_heads, S, head_dim) = ({NH}, S, {D}); "
                f"got {tuple(st.shape)}"
            )


def _keys(x: Any, weight: Any, bias: Any, extra: Any, static: Any, H: int, *, xp: Any) -> Any:
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


def _attend_with_weights(
    q: Any, k: Any, v: Any, bias: Any, p: float, dropout_mask: Any, rng: Any, *, xp: Any
) -> tuple[Any, Any]:
    # torch's need_weights path: softmax(baddbmm(mask, q * sqrt(1/D), k^T)), a plain
    # softmax (NaN rows), then dropout on the weights it returns.
    N, L, H, D = q.shape
    res = attention(
        q * math.sqrt(1.0 / float(D)), k, v, bias=bias, scale=1.0, dropout_p=p,
        dropout_mask=dropout_mask, rng=rng, masked_rows="nan", layout="BLHD",
        return_weights=True, return_dropout_mask=True, xp=xp,
    )
    out, weights = res.out, res.weights
    if p > 0.0:
        # torch's dropout multiplies by the scaled keep-mask, so a NaN weight stays NaN
        # even where dropped; refattn's dropout selects, so restore torch's NaN here.
        keep = xp.reshape(res.dropout_mask, weights.shape)
        factor = 0.0 if p == 1.0 else 1.0 / (1.0 - p)
        weights = weights * xp.astype(keep, xp.float64) * factor
        nan_rows = xp.any(xp.isnan(weights), axis=-1)  # (N, H, L)
        nan = xp.asarray(xp.nan, dtype=xp.float64, device=array_api_compat.device(q))
        out = xp.where(xp.permute_dims(nan_rows, (0, 2, 1))[..., None], nan, out)
    return out, weights


# --- the module form --------------------------------------------------------------------


class _Linear:
    """The ``out_proj`` holder: ``weight`` (E_out, E) and ``bias`` (E_out,) or None."""

    def __init__(self, weight: Any, bias: Any) -> None:
        self.weight = weight
        self.bias = bias

    def __repr__(self) -> str:
        return f"Linear(weight {tuple(self.weight.shape)}, bias={self.bias is not None})"


_DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")


def _resolve_namespace(like: Any, xp: Any) -> tuple[Any, Any]:
    if like is not None:
        return infer_namespace({"like": like}, xp=xp)
    if xp is None:
        return array_api_compat.array_namespace(np.empty(0)), None
    # A namespace given alone: ask it for an array, then wrap it as the compat layer does.
    return array_api_compat.array_namespace(xp.empty((0,))), None


def _resolve_dtype(dtype: Any, xp: Any) -> Any:
    if dtype is None:
        return xp.float64
    if isinstance(dtype, str):
        if dtype in _DTYPE_NAMES and hasattr(xp, dtype):
            return getattr(xp, dtype)
    else:
        for name in _DTYPE_NAMES:
            if hasattr(xp, name) and dtype == getattr(xp, name):
                return dtype
    raise TypeError(
        f"dtype must be a real floating dtype of the parameters' library; got {dtype!r}"
    )


def _dtype_name(dtype: Any, xp: Any) -> str:
    for name in _DTYPE_NAMES:
        if hasattr(xp, name) and dtype == getattr(xp, name):
            return name
    raise TypeError(f"not a real floating dtype: {dtype!r}")


def _host(x: Any) -> np.ndarray:
    # A host NumPy copy of an array of any library, for copying weights between libraries.
    lib = library_name(x)
    if lib == "torch":
        return x.detach().cpu().float().numpy() if str(x.dtype) == "torch.bfloat16" else (
            x.detach().cpu().numpy()
        )
    if lib == "cupy":
        return x.get()
    return np.from_dlpack(x)


def _generator(seed: Any) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        return np.random.default_rng(int(seed))
    raise TypeError(f"seed must be an int or a numpy.random.Generator; got {seed!r}")


class MultiheadAttention:
    """``torch.nn.MultiheadAttention`` without torch: parameters are arrays of any library.

    The constructor takes torch's arguments in torch's order; the forward pass is
    :func:`multi_head_attention_forward` (torch 2.13's reference path) in float64, with
    ``batch_first`` handled as torch does. Parameters are initialised as torch does
    (xavier_uniform in-projection, U(-1/sqrt(E), 1/sqrt(E)) out-projection weight, zero
    biases, xavier_normal ``bias_k``/``bias_v``) but from a NumPy generator seeded by
    ``seed``, so they are reproducible; copy a torch module's weights with
    :meth:`from_torch`.

    Parameters
    ----------
    embed_dim : int
        E, the model dimension (query features and output features).
    num_heads : int
        H; must divide E. Each head has D = E // H features.
    dropout : float
        Dropout probability on the attention weights, used in training mode only.
    bias : bool
        Give the in- and out-projections biases.
    add_bias_kv : bool
        Learnable ``bias_k``/``bias_v`` (1, 1, E) appended to the keys/values.
    add_zero_attn : bool
        Append an all-zero key/value.
    kdim, vdim : int, optional
        Key and value feature counts (default E); when either differs from E the
        projections are three separate weights ``q_proj_weight`` (E, E),
        ``k_proj_weight`` (E, kdim), ``v_proj_weight`` (E, vdim) instead of
        ``in_proj_weight`` (3E, E).
    batch_first : bool
        Batched inputs and outputs are (N, L, E) instead of (L, N, E); ignored for
        unbatched inputs.
    seed : int or numpy.random.Generator
        refattn extra: seeds the initialiser (draw order: projection weights q, k, v or
        packed, out-projection weight, bias_k, bias_v).
    dtype : dtype or str, optional
        refattn extra: dtype of the parameters (default float64).
    like : array, optional
        refattn extra: put the parameters in this array's library and on its device.
    xp : namespace, optional
        refattn extra: the parameters' array library (default NumPy).

    Attributes
    ----------
    in_proj_weight, in_proj_bias, q_proj_weight, k_proj_weight, v_proj_weight, bias_k, \
bias_v : array or None
        As in torch (None where torch registers None).
    out_proj : object
        With ``weight`` (E, E) and ``bias`` (E,) or None.
    training : bool
        Dropout is applied only when True (see :meth:`train`, :meth:`eval`).

    Notes
    -----
    torch's module takes an inference fast path (``torch._native_multi_head_attention``)
    in eval mode without autograd for batch_first self-attention with an even head count,
    bool masks, no bias_kv/zero_attn and packed biased projections. It agrees with this
    reference path except that with ``need_weights=False`` a query that sees no key gets
    NaN there, where the reference (SDPA) path and refattn give 0 before the
    out-projection.

    Examples
    --------
    >>> import numpy as np
    >>> import refattn
    >>> mha = refattn.MultiheadAttention(8, 2, batch_first=True, seed=0)
    >>> x = np.random.default_rng(1).standard_normal((3, 5, 8))   # N=3, L=5, E=8
    >>> causal = np.triu(np.ones((5, 5), dtype=bool), k=1)          # True = masked out
    >>> out, w = mha(x, x, x, attn_mask=causal)
    >>> out.shape, w.shape
    ((3, 5, 8), (3, 5, 5))
    >>> bool(np.allclose(w.sum(axis=-1), 1.0)), float(w[0, 0, 1])
    (True, 0.0)
    >>> out2, none = mha(x, x, x, attn_mask=causal, need_weights=False, is_causal=True)
    >>> bool(np.allclose(out, out2)), none is None
    (True, True)
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        *,
        seed: Any = 0,
        dtype: Any = None,
        like: Any = None,
        xp: Any = None,
    ) -> None:
        E = _check_positive_int("embed_dim", embed_dim)
        H = _check_positive_int("num_heads", num_heads)
        if E % H:
            raise ValueError(f"embed_dim {E} must be divisible by num_heads {H}")
        for name, flag in (("bias", bias), ("add_bias_kv", add_bias_kv),
                           ("add_zero_attn", add_zero_attn), ("batch_first", batch_first)):
            _check_bool(name, flag)
        self.embed_dim = E
        self.num_heads = H
        self.head_dim = E // H
        self.kdim = E if kdim is None else _check_positive_int("kdim", kdim)
        self.vdim = E if vdim is None else _check_positive_int("vdim", vdim)
        self._qkv_same_embed_dim = self.kdim == E and self.vdim == E
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not (
            0.0 <= dropout <= 1.0
        ):
            raise ValueError(f"dropout must be a probability in [0, 1]; got {dropout!r}")
        self.dropout = float(dropout)
        self.add_zero_attn = add_zero_attn
        self.batch_first = batch_first
        self.training = True
        self._xp, self._device = _resolve_namespace(like, xp)
        self._dtype = _resolve_dtype(dtype, self._xp)

        gen = _generator(seed)

        def uniform(shape: tuple[int, ...], bound: float) -> np.ndarray:
            return gen.uniform(-bound, bound, size=shape)

        def xavier_uniform(shape: tuple[int, int]) -> np.ndarray:
            # torch.nn.init.xavier_uniform_: fan_out = rows, fan_in = columns.
            return uniform(shape, math.sqrt(6.0 / (shape[0] + shape[1])))

        if self._qkv_same_embed_dim:
            self.in_proj_weight = self._param(xavier_uniform((3 * E, E)))
            self.q_proj_weight = self.k_proj_weight = self.v_proj_weight = None
        else:
            self.in_proj_weight = None
            self.q_proj_weight = self._param(xavier_uniform((E, E)))
            self.k_proj_weight = self._param(xavier_uniform((E, self.kdim)))
            self.v_proj_weight = self._param(xavier_uniform((E, self.vdim)))
        # nn.Linear's default (kaiming_uniform with a = sqrt(5)) is U(-1/sqrt(E), 1/sqrt(E));
        # MultiheadAttention leaves the out-projection weight at that.
        out_weight = self._param(uniform((E, E), 1.0 / math.sqrt(E)))
        self.in_proj_bias = self._param(np.zeros(3 * E)) if bias else None
        self.out_proj = _Linear(out_weight, self._param(np.zeros(E)) if bias else None)
        if add_bias_kv:
            # xavier_normal_ on (1, 1, E): fan_in = fan_out = E, std = sqrt(2 / 2E).
            std = math.sqrt(1.0 / E)
            self.bias_k = self._param(gen.normal(0.0, std, size=(1, 1, E)))
            self.bias_v = self._param(gen.normal(0.0, std, size=(1, 1, E)))
        else:
            self.bias_k = self.bias_v = None

    def _param(self, host: np.ndarray) -> Any:
        return self._xp.asarray(host, dtype=self._dtype, device=self._device)

    def __repr__(self) -> str:
        return (
            f"MultiheadAttention(embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"dropout={self.dropout}, kdim={self.kdim}, vdim={self.vdim}, "
            f"batch_first={self.batch_first})"
        )

    # -- training mode, as torch.nn.Module --

    def train(self, mode: bool = True) -> MultiheadAttention:
        """Set training mode (dropout applied) and return self.

        Examples
        --------
        >>> import refattn
        >>> refattn.MultiheadAttention(4, 2).eval().train().training
        True
        """
        _check_bool("mode", mode)
        self.training = mode
        return self

    def eval(self) -> MultiheadAttention:
        """Set evaluation mode (no dropout) and return self.

        Examples
        --------
        >>> import refattn
        >>> refattn.MultiheadAttention(4, 2).eval().training
        False
        """
        return self.train(False)

    # -- forward --

    def forward(
        self,
        query: Any,
        key: Any,
        value: Any,
        key_padding_mask: Any = None,
        need_weights: bool = True,
        attn_mask: Any = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        dropout_mask: Any = None,
        rng: Any = None,
        xp: Any = None,
    ) -> tuple[Any, Any]:
        """torch's ``MultiheadAttention.forward`` (reference path), in float64.

        Parameters
        ----------
        query, key, value : array
            (L, E), (S, kdim), (S, vdim) unbatched; (L, N, E) etc. batched, or (N, L, E)
            etc. with ``batch_first``. The parameters' library.
        key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
            As in :func:`multi_head_attention_forward`: bool masks are True = masked out,
            ``need_weights=True`` gives NaN for queries that see no key, False gives 0.
        dropout_mask, rng
            refattn extras: the keep-mask (N, H, L, S_final) or a seed; one of them is
            required in training mode with ``dropout > 0``, and neither may be given
            otherwise.
        xp : namespace, optional
            Array namespace of the inputs; inferred when None.

        Returns
        -------
        attn_output, attn_output_weights
            As torch: the output in the input layout and the query's dtype; the weights
            (N, L, S_final), (N, H, L, S_final) unaveraged, or None.

        Examples
        --------
        >>> import numpy as np
        >>> import refattn
        >>> mha = refattn.MultiheadAttention(4, 2, add_zero_attn=True).eval()
        >>> x = np.random.default_rng(0).standard_normal((3, 4))   # unbatched (L, E)
        >>> out, w = mha.forward(x, x, x, average_attn_weights=False)
        >>> out.shape, w.shape   # S_final = 3 keys + 1 zero key
        ((3, 4), (2, 3, 4))
        """
        # torch transposes batched inputs to sequence-first and back; unbatched ones stay.
        swap = self.batch_first and getattr(query, "ndim", None) == 3
        if swap:
            query, key, value = (_swap01(x) for x in (query, key, value))
        out, weights = multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight,
            self.in_proj_bias, self.bias_k, self.bias_v, self.add_zero_attn, self.dropout,
            self.out_proj.weight, self.out_proj.bias, training=self.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            use_separate_proj_weight=not self._qkv_same_embed_dim,
            q_proj_weight=self.q_proj_weight, k_proj_weight=self.k_proj_weight,
            v_proj_weight=self.v_proj_weight, average_attn_weights=average_attn_weights,
            is_causal=is_causal, dropout_mask=dropout_mask, rng=rng, xp=xp,
        )
        if swap:
            out = _swap01(out)
        return out, weights

    __call__ = forward

    # -- weights to and from torch --

    _PARAMETERS = ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight",
                   "v_proj_weight", "bias_k", "bias_v")

    def _named_parameters(self) -> dict[str, Any]:
        # torch's state_dict keys.
        named = {name: getattr(self, name) for name in self._PARAMETERS}
        named["out_proj.weight"] = self.out_proj.weight
        named["out_proj.bias"] = self.out_proj.bias
        return {name: p for name, p in named.items() if p is not None}

    @classmethod
    def from_torch(
        cls, module: Any, *, dtype: Any = None, like: Any = None, xp: Any = None
    ) -> MultiheadAttention:
        """Copy a ``torch.nn.MultiheadAttention``: its configuration, weights and mode.

        Parameters
        ----------
        module : torch.nn.MultiheadAttention
            The module to copy; it is not modified.
        dtype : dtype or str, optional
            Dtype of the copies; default the module's own dtype.
        like : array, optional
            Put the copies in this array's library and on its device.
        xp : namespace, optional
            The copies' library; default NumPy (host copies).

        Returns
        -------
        MultiheadAttention
            Independent copies of the weights (later changes to either side do not
            propagate), with the module's ``training`` flag.

        Examples
        --------
        >>> import torch, refattn
        >>> tmod = torch.nn.MultiheadAttention(4, 2, kdim=3, dtype=torch.float64)
        >>> mha = refattn.MultiheadAttention.from_torch(tmod)
        >>> mha.k_proj_weight.shape, mha.in_proj_weight is None
        ((4, 3), True)
        """
        host = {name: _host(p) for name, p in module.state_dict().items()}
        if dtype is None:
            dtype = str(next(iter(module.state_dict().values())).dtype).removeprefix("torch.")
        new = cls(
            module.embed_dim, module.num_heads, module.dropout,
            bias=module.in_proj_bias is not None, add_bias_kv=module.bias_k is not None,
            add_zero_attn=module.add_zero_attn, kdim=module.kdim, vdim=module.vdim,
            batch_first=module.batch_first, seed=0, dtype=dtype, like=like, xp=xp,
        )
        for name in new._named_parameters():
            value = new._param(np.array(host[name], copy=True))
            if name.startswith("out_proj."):
                setattr(new.out_proj, name.removeprefix("out_proj."), value)
            else:
                setattr(new, name, value)
        new.training = bool(module.training)
        return new

    def to_torch(self, *, device: Any = None) -> Any:
        """A ``torch.nn.MultiheadAttention`` with this configuration, weights and mode.

        Parameters
        ----------
        device : torch.device or str, optional
            Where to put the module; default the parameters' device for torch
            parameters, else the CPU.

        Returns
        -------
        torch.nn.MultiheadAttention
            In the parameters' dtype, holding copies of the weights.

        Examples
        --------
        >>> import torch, refattn
        >>> mha = refattn.MultiheadAttention(4, 2, add_bias_kv=True, seed=3)
        >>> tmod = mha.to_torch()
        >>> tmod.bias_k.dtype, bool((tmod.bias_k.detach().numpy() == mha.bias_k).all())
        (torch.float64, True)
        """
        import torch

        params = self._named_parameters()
        first = next(iter(params.values()))
        if device is None:
            device = first.device if library_name(first) == "torch" else "cpu"
        dtype = getattr(torch, _dtype_name(first.dtype, self._xp))
        module = torch.nn.MultiheadAttention(
            self.embed_dim, self.num_heads, self.dropout, bias=self.in_proj_bias is not None,
            add_bias_kv=self.bias_k is not None, add_zero_attn=self.add_zero_attn,
            kdim=self.kdim, vdim=self.vdim, batch_first=self.batch_first, device=device,
            dtype=dtype,
        )
        state = {}
        for name, p in params.items():
            if library_name(p) == "torch":
                state[name] = p.detach().clone()
            else:
                state[name] = torch.from_numpy(np.array(_host(p), copy=True))
        module.load_state_dict({n: t.to(device=device, dtype=dtype) for n, t in state.items()})
        module.train(self.training)
        return module


def _swap01(x: Any) -> Any:
    # (N, L, E) <-> (L, N, E) for batch_first; 2-D arrays (unbatched) pass unchanged.
    if getattr(x, "ndim", None) != 3:
        return x
    return array_api_compat.array_namespace(x).permute_dims(x, (1, 0, 2))
