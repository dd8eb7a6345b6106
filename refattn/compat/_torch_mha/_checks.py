"""Argument checks of torch's multi-head attention, each naming the argument and what it expected.

torch raises AssertionError or RuntimeError for most of these; refattn raises ValueError
or TypeError with the expected shape spelled out (see :doc:`multihead`).
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

from ..._types import Array, Namespace
from ..._validate import check_dropout_p

__all__ = [
    "check_bool",
    "check_dropout",
    "check_extra_keys",
    "check_masks",
    "check_out_projection",
    "check_positive_int",
    "check_ranks",
    "check_shape",
    "projection_weights",
]


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {value!r}")


def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return int(value)


def check_shape(name: str, x: Array | None, expected: tuple[int, ...], meaning: str) -> None:
    if x is not None and tuple(x.shape) != expected:
        raise ValueError(f"{name} must have shape {expected} {meaning}; got {tuple(x.shape)}")


def check_mask_dtype(name: str, mask: Array, xp: Namespace) -> None:
    # torch accepts bool and floating masks only (`_canonical_mask`); an integer 0/1 mask is
    # ambiguous between "keep" and "mask out", so it is refused rather than guessed.
    if not (xp.isdtype(mask.dtype, "bool") or xp.isdtype(mask.dtype, "real floating")):
        raise TypeError(
            f"{name} must be bool (True = masked out) or floating (added to the scores); "
            f"got dtype {mask.dtype}"
        )


def check_ranks(
    query: Array, key: Array, value: Array, kpm: Array | None, attn_mask: Array | None
) -> bool:
    # torch's `_mha_shape_check`, plus one dtype for query, key and value. True = batched.
    if query.ndim not in (2, 3):
        raise ValueError(
            "query must be (L, N, E) batched or (L, E) unbatched; got shape "
            f"{tuple(query.shape)}"
        )
    batched = query.ndim == 3
    if key.ndim != query.ndim or value.ndim != query.ndim:
        expected = (
            "a batched (3-D) query, key and value must be 3-D (S, N, E)" if batched
            else "an unbatched (2-D) query, key and value must be 2-D (S, E)"
        )
        raise ValueError(
            f"for {expected}; got key {tuple(key.shape)} and value {tuple(value.shape)}"
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


def check_masks(kpm: Array | None, attn_mask: Array | None, *, xp: Namespace) -> None:
    for name, m in (("key_padding_mask", kpm), ("attn_mask", attn_mask)):
        if m is not None:
            check_mask_dtype(name, m, xp)
    if kpm is not None and attn_mask is not None and kpm.dtype != attn_mask.dtype:
        # torch's `_canonical_mask` warns (a plain UserWarning) and goes on by adding the
        # additive forms; so do we. stacklevel=3: the caller of multi_head_attention_forward.
        warnings.warn(
            "Support for mismatched key_padding_mask and attn_mask is deprecated. Use "
            f"same type for both instead. (key_padding_mask {kpm.dtype}, "
            f"attn_mask {attn_mask.dtype})",
            UserWarning,
            stacklevel=3,
        )


def projection_weights(
    key: Array, value: Array, E: int, in_proj_weight: Array | None,
    in_proj_bias: Array | None, separate: bool, q_proj_weight: Array | None,
    k_proj_weight: Array | None, v_proj_weight: Array | None,
) -> tuple[tuple[Array, Array, Array], tuple[Array, Array, Array]]:
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
        check_shape("q_proj_weight", q_proj_weight, (E, E), "(embed_dim, embed_dim)")
        check_shape("k_proj_weight", k_proj_weight, (E, key.shape[-1]), "(embed_dim, key's dim)")
        check_shape("v_proj_weight", v_proj_weight, (E, value.shape[-1]),
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
        check_shape("in_proj_weight", in_proj_weight, (3 * E, E), "(3 * embed_dim, embed_dim)")
        if key.shape[-1] != E:
            raise ValueError(
                f"key and value must have embed_dim {E} features with the packed "
                f"in_proj_weight; got key {tuple(key.shape)}"
            )
        weights = tuple(in_proj_weight[i * E:(i + 1) * E, :] for i in range(3))
    check_shape("in_proj_bias", in_proj_bias, (3 * E,), "(3 * embed_dim,)")
    if in_proj_bias is None:
        return weights, (None, None, None)
    return weights, tuple(in_proj_bias[i * E:(i + 1) * E] for i in range(3))


def check_out_projection(weight: Array | None, bias: Array | None, E: int) -> None:
    # torch's linear allows any output width E_out; the input width must be E.
    if weight is None or weight.ndim != 2 or weight.shape[1] != E:
        raise ValueError(
            "out_proj_weight must be a (E_out, embed_dim) array with embed_dim = "
            f"{E}; got {None if weight is None else tuple(weight.shape)}"
        )
    check_shape("out_proj_bias", bias, (weight.shape[0],), "(E_out,)")


def check_extra_keys(
    bias_k: Array | None, bias_v: Array | None, static_k: Array | None,
    static_v: Array | None, NH: int, D: int, E: int,
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


def check_dropout(
    training: bool, dropout_p: Any, dropout_mask: Array | None, rng: Any,
    expected: tuple[int, ...], meaning: str,
) -> float:
    """The dropout probability applied (0 outside training); never drawn silently."""
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
    check_shape("dropout_mask", dropout_mask, expected, meaning)
    return p
