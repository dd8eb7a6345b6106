"""Small attention "kernels" in torch SDPA's convention, one correct and several broken.

They stand for the code a user audits with ``refattn check package.module:function``
and judges with ``refattn.testing.assert_attention_close``. Each computes like a typical
low-precision kernel: inputs in their dtype, logits and softmax in float32 (float64 for
float64 inputs), the output rounded back to the input dtype. They run on NumPy
(bfloat16 through ml_dtypes) and torch arrays alike, through array_api_compat.

The broken ones carry one classic bug each:

* ``wrong_scale``: divides by E instead of sqrt(E);
* ``off_by_one_causal``: lets query i see key i + 1 too;
* ``ignores_mask``: drops ``attn_mask`` on the floor;
* ``no_max_subtraction``: exponentiates the raw logits in the input dtype, which
  overflows float16 (exp(s) > 65504 for s > 11.1);
* ``nan_for_masked_rows``: a plain softmax, NaN on fully masked rows (torch gives 0).
"""

from __future__ import annotations

import math
from typing import Any

import array_api_compat


def _work_dtype(x: Any, xp: Any) -> Any:
    return xp.float64 if "float64" in str(x.dtype) else xp.float32


def _attention(query: Any, key: Any, value: Any, attn_mask: Any = None, dropout_p: float = 0.0,
               is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
               *, bug: str | None = None) -> Any:
    if dropout_p:
        raise NotImplementedError("these kernels have no dropout")
    xp = array_api_compat.array_namespace(query)
    work = _work_dtype(query, xp)
    q, k, v = (xp.astype(x, work) for x in (query, key, value))
    E, L, S = q.shape[-1], q.shape[-2], k.shape[-2]
    H = q.shape[-3] if q.ndim >= 3 else 1
    if enable_gqa and k.ndim >= 3 and k.shape[-3] != H:
        k = xp.repeat(k, H // k.shape[-3], axis=-3)
    if enable_gqa and v.ndim >= 3 and v.shape[-3] != H:
        v = xp.repeat(v, H // v.shape[-3], axis=-3)
    if scale is None:
        scale = 1.0 / E if bug == "wrong_scale" else 1.0 / math.sqrt(E)
    s = (q @ xp.matrix_transpose(k)) * scale
    neg_inf = xp.asarray(-math.inf, dtype=work)
    if attn_mask is not None and bug != "ignores_mask":
        if "bool" in str(attn_mask.dtype):
            s = xp.where(attn_mask, s, neg_inf)
        else:
            s = s + xp.astype(attn_mask, work)
    if is_causal:
        i = xp.arange(L)[:, None]
        j = xp.arange(S)[None, :]
        reach = 1 if bug == "off_by_one_causal" else 0
        s = xp.where(j <= i + reach, s, neg_inf)
    if S == 0:
        # No keys: every row is empty, and torch's answer is a zero row.
        return xp.zeros((*s.shape[:-1], v.shape[-1]), dtype=query.dtype)
    if bug == "no_max_subtraction":
        e = xp.astype(xp.exp(xp.astype(s, query.dtype)), work)
        return xp.astype((e / xp.sum(e, axis=-1, keepdims=True)) @ v, query.dtype)
    m = xp.max(s, axis=-1, keepdims=True)
    if bug != "nan_for_masked_rows":
        # A fully masked row has max -inf: shift by 0 instead, so its weights are 0.
        m = xp.where(m == -math.inf, xp.zeros_like(m), m)
    e = xp.exp(s - m)
    total = xp.sum(e, axis=-1, keepdims=True)
    if bug != "nan_for_masked_rows":
        total = xp.where(total == 0, xp.ones_like(total), total)
    return xp.astype((e / total) @ v, query.dtype)


def correct(query: Any, key: Any, value: Any, attn_mask: Any = None, dropout_p: float = 0.0,
            is_causal: bool = False, scale: float | None = None,
            enable_gqa: bool = False) -> Any:
    """A correct kernel in torch SDPA's convention."""
    return _attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def _broken(bug: str) -> Any:
    def kernel(query: Any, key: Any, value: Any, attn_mask: Any = None,
               dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
               enable_gqa: bool = False) -> Any:
        return _attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                          enable_gqa, bug=bug)

    kernel.__name__ = kernel.__qualname__ = bug
    return kernel


wrong_scale = _broken("wrong_scale")
off_by_one_causal = _broken("off_by_one_causal")
ignores_mask = _broken("ignores_mask")
no_max_subtraction = _broken("no_max_subtraction")
nan_for_masked_rows = _broken("nan_for_masked_rows")


def no_gqa(query: Any, key: Any, value: Any, attn_mask: Any = None, dropout_p: float = 0.0,
           is_causal: bool = False, scale: float | None = None) -> Any:
    """A correct kernel that does not take ``enable_gqa`` (the audit skips that group)."""
    return _attention(query, key, value, attn_mask, dropout_p, is_causal, scale)


def crashes(query: Any, key: Any, value: Any, **kwargs: Any) -> Any:
    """A kernel that raises on every call."""
    raise RuntimeError("kernel exploded")


def detached_normaliser(query: Any, key: Any, value: Any, attn_mask: Any = None,
                        dropout_p: float = 0.0, is_causal: bool = False,
                        scale: float | None = None, enable_gqa: bool = False) -> Any:
    """Right forward, wrong gradients: the softmax's row sum is detached from autograd
    (torch tensors; on other arrays it is the correct kernel)."""
    xp = array_api_compat.array_namespace(query)
    work = _work_dtype(query, xp)
    q, k, v = (xp.astype(x, work) for x in (query, key, value))
    s = (q @ xp.matrix_transpose(k)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if is_causal:
        i, j = xp.arange(q.shape[-2])[:, None], xp.arange(k.shape[-2])[None, :]
        s = xp.where(j <= i, s, xp.asarray(-math.inf, dtype=work))
    e = xp.exp(s - xp.max(s, axis=-1, keepdims=True))
    total = xp.sum(e, axis=-1, keepdims=True)
    if hasattr(total, "detach"):
        total = total.detach()
    return xp.astype((e / total) @ v, query.dtype)


def flash_top_left(q: Any, k: Any, v: Any, dropout_p: float = 0.0,
                   softmax_scale: float | None = None, causal: bool = False,
                   window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                   alibi_slopes: Any = None, deterministic: bool = False,
                   return_attn_probs: bool = False) -> Any:
    """flash-attn's signature with torch's top-left causal alignment (a classic port bug).

    Computes with refattn in float32 on (B, L, H, E) arrays."""
    import refattn

    if dropout_p or softcap or alibi_slopes is not None or window_size != (-1, -1):
        raise NotImplementedError("only causal and softmax_scale")
    out = refattn.attention(q, k, v, causal=causal, alignment="top_left", scale=softmax_scale,
                            layout="BLHD", compute_dtype="float32")
    return out


def flash_drawing_dropout(q: Any, k: Any, v: Any, dropout_p: float = 0.0, *args: Any,
                          return_attn_probs: bool = False, **kwargs: Any) -> Any:
    """flash-attn's signature and dropout contract: it draws its own keep-mask and,
    with ``return_attn_probs``, reports it in the sign of S_dmask (refattn's flash
    front-end computes, a fixed generator stands in for the GPU's)."""
    import numpy as np

    from refattn.compat.flash_attn import flash_attn_func

    rng = np.random.default_rng(123) if dropout_p else None
    return flash_attn_func(q, k, v, dropout_p, *args, return_attn_probs=return_attn_probs,
                           rng=rng, **kwargs)


def flex_ignores_block_mask(query: Any, key: Any, value: Any, score_mod: Any = None,
                            block_mask: Any = None, scale: Any = None,
                            enable_gqa: bool = False) -> Any:
    """A FlexAttention-convention kernel that forgets its mask."""
    from refattn.compat.flex import flex_attention

    return flex_attention(query, key, value, score_mod=score_mod, block_mask=None, scale=scale,
                          enable_gqa=enable_gqa)
