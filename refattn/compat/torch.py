"""torch's conventions: ``torch.nn.functional.scaled_dot_product_attention``.

Reproduces the math backend of torch 2.13 (``torch.ops.aten._scaled_dot_product_attention_math``):
top-left causal, boolean masks True = take part, float masks added, heads broadcast like
batch dims unless ``enable_gqa``, fully masked rows give 0 (``_safe_softmax``).
"""

from __future__ import annotations

from typing import Any

from .._arrays import sum_to_shape
from .._front_door import AttentionGrads, attention, attention_backward
from .._namespace import dtype_is, infer_namespace
from .._validate import broadcast_shapes, check_one_dtype
from ._torch_mha import MultiheadAttention, multi_head_attention_forward

__all__ = [
    "MultiheadAttention",
    "multi_head_attention_forward",
    "scaled_dot_product_attention",
    "scaled_dot_product_attention_backward",
]


def _broadcast_heads(query: Any, key: Any, value: Any, xp: Any) -> Any:
    # Without enable_gqa torch treats the head axis as one more batch axis of matmul, so
    # a query with one head meets every key head. Broadcasting the query explicitly
    # turns that into refattn's grouped-query rule (K and Kv then divide H).
    heads = [x.shape[-3] for x in (query, key, value) if x.ndim >= 3]
    if len(heads) == 3 and heads[0] == heads[1] == heads[2]:
        return query  # the common case: one head count, nothing to broadcast
    try:
        H = broadcast_shapes(*((h,) for h in heads))[0] if heads else 1
    except ValueError:
        raise ValueError(
            "query, key and value head counts must be equal or 1 (they broadcast like "
            f"batch dims) unless enable_gqa=True; got shapes query {tuple(query.shape)}, "
            f"key {tuple(key.shape)}, value {tuple(value.shape)}"
        ) from None
    if query.ndim >= 3 and query.shape[-3] != H:
        query = xp.broadcast_to(query, (*query.shape[:-3], H, *query.shape[-2:]))
    elif query.ndim == 2 and H > 1:
        query = xp.broadcast_to(query, (H, *query.shape))
    return query


def scaled_dot_product_attention(
    query: Any,
    key: Any,
    value: Any,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
    dropout_mask: Any = None,
    rng: Any = None,
    xp: Any = None,
) -> Any:
    """``torch.nn.functional.scaled_dot_product_attention``, computed in float64.

    Same signature and semantics as torch 2.13's math backend; the result is cast back to
    the dtype of ``query``. Works on NumPy, torch, CuPy and array-api-strict arrays.

    Parameters
    ----------
    query, key, value : array
        (..., H, L, E), (..., K, S, E), (..., Kv, S, Ev); at least 2-D, one dtype.
    attn_mask : array, optional
        Boolean (True = take part) or float (added to the scores), broadcastable to
        (..., H, L, S). A float mask must be float32 or the query's dtype (torch's rule).
    dropout_p : float
        Dropout probability; needs ``dropout_mask`` or ``rng`` (refattn never draws
        random numbers silently). Kept weights are scaled by 1/(1 - dropout_p);
        ``dropout_p=1`` gives zeros (torch's explicit-mask test hook gives NaN there).
    is_causal : bool
        Top-left causal mask ``tril(ones(L, S))``. Raises together with ``attn_mask``, as
        torch's math backend does (torch's CPU fused path instead ANDs the two).
    scale : float, optional
        Defaults to 1/sqrt(E).
    enable_gqa : bool
        Let K and Kv divide H (repeat_interleave of key/value heads). Without it, head
        counts broadcast like batch dims.
    dropout_mask : bool array, optional
        Keep-mask (True = keep), broadcastable to (..., H, L, S).
    rng : int or numpy.random.Generator, optional
        Draws the keep-mask on the host.
    xp : namespace or str, optional
        Array namespace of the inputs or its name, e.g. ``xp="numpy"``; inferred
        when None.

    Returns
    -------
    array
        (..., H, L, Ev) in the dtype of ``query``.

    Examples
    --------
    >>> import numpy as np
    >>> import refattn
    >>> rng = np.random.default_rng(1)
    >>> q, k, v = (rng.standard_normal((1, 2, 4, 8)) for _ in range(3))
    >>> keep = np.tril(np.ones((4, 4), dtype=bool))
    >>> out = refattn.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    >>> bool(np.allclose(out, refattn.scaled_dot_product_attention(q, k, v, is_causal=True)))
    True
    """
    xp, query, mask, bias = sdpa_translate(
        query, key, value, attn_mask, is_causal, enable_gqa, xp
    )
    return attention(
        query, key, value, mask=mask, bias=bias, causal=is_causal, alignment="top_left",
        scale=scale, dropout_p=dropout_p, dropout_mask=dropout_mask, rng=rng,
        masked_rows="zero", xp=xp,
    )


# --- backward -------------------------------------------------------------------------


def sdpa_translate(
    query: Any, key: Any, value: Any, attn_mask: Any, is_causal: Any, enable_gqa: Any, xp: Any
) -> tuple[Any, Any, Any, Any]:
    """Translate torch's SDPA arguments into refattn's.

    An internal helper shared by this module's front-ends and the audit behind
    ``refattn check`` (``refattn._audit``); it is not public API.

    Parameters
    ----------
    query, key, value, attn_mask, is_causal, enable_gqa
        As :func:`scaled_dot_product_attention` takes them.
    xp : namespace or None
        The arrays' namespace; inferred when None.

    Returns
    -------
    tuple
        ``(xp, query, mask, bias)``: the namespace, the query with its heads broadcast
        (unless ``enable_gqa``), and ``attn_mask`` as a boolean ``mask`` or an additive
        ``bias`` (the other None).
    """
    # torch's arguments -> (xp, query with broadcast heads, mask, bias): the one place
    # where torch's SDPA conventions become refattn's, for the forward and the backward.
    xp, _ = infer_namespace(
        {"query": query, "key": key, "value": value}, {"attn_mask": attn_mask}, xp=xp,
        required=("query", "key", "value"),
    )
    # Named as torch names them (the front door would say q, k and v).
    check_one_dtype({"query": query, "key": key, "value": value})
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.ndim < 2:
            raise ValueError(
                f"{name} must be at least 2-D; got shape {tuple(x.shape)} "
                "(torch: 'Expected query, key, and value to all be at least 2 dimensional')"
            )
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be True or False; got {is_causal!r}")
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"enable_gqa must be True or False; got {enable_gqa!r}")
    mask = bias = None
    if attn_mask is not None:
        if is_causal:
            raise ValueError(
                "attn_mask and is_causal=True given together; torch's math backend refuses "
                "this ('Explicit attn_mask should not be set when is_causal=True'). Fold the "
                "causal structure into attn_mask instead"
            )
        if dtype_is(xp, attn_mask.dtype, "bool"):
            mask = attn_mask
        elif attn_mask.dtype == xp.float32 or attn_mask.dtype == query.dtype:
            bias = attn_mask
        else:
            raise TypeError(
                "attn_mask must be bool, float32 or the query's dtype "
                f"({query.dtype}); got {attn_mask.dtype}"
            )
    if not enable_gqa:
        query = _broadcast_heads(query, key, value, xp)
    return xp, query, mask, bias


def scaled_dot_product_attention_backward(
    grad_out: Any,
    query: Any,
    key: Any,
    value: Any,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
    dropout_mask: Any = None,
    xp: Any = None,
) -> AttentionGrads:
    """Gradients of ``scaled_dot_product_attention`` (torch's conventions), in float64.

    What ``torch.autograd`` gives for torch 2.13's math backend, computed analytically by
    :func:`refattn.attention_backward`: the arguments are translated exactly as
    :func:`refattn.scaled_dot_product_attention` translates them, and the gradient of a
    float ``attn_mask`` is returned as ``dbias``.

    Parameters
    ----------
    grad_out : array
        Gradient of the loss with respect to the output, shape (..., H, L, Ev).
    query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa : optional
        As for ``scaled_dot_product_attention``. A dropout needs ``dropout_mask``.
    dropout_mask : bool array, optional
        The keep-mask (True = keep) the forward pass used, broadcastable to
        (..., H, L, S).
    xp : namespace or str, optional
        Array namespace of the inputs or its name, e.g. ``xp="numpy"``; inferred
        when None.

    Returns
    -------
    AttentionGrads
        ``(dq, dk, dv, dbias)`` in the shapes and dtypes of query, key, value and of a
        float ``attn_mask``; ``dbias`` is None for a boolean or absent ``attn_mask``. A
        query whose single head was broadcast over the key heads gets its gradient
        summed over them.

    Examples
    --------
    >>> import numpy as np
    >>> import refattn
    >>> rng = np.random.default_rng(2)
    >>> q = rng.standard_normal((1, 4, 3, 8))
    >>> k, v = (rng.standard_normal((1, 2, 6, 8)) for _ in range(2))
    >>> additive = rng.standard_normal((3, 6))          # float attn_mask, shape (L, S)
    >>> dout = rng.standard_normal((1, 4, 3, 8))
    >>> g = refattn.scaled_dot_product_attention_backward(
    ...     dout, q, k, v, attn_mask=additive, enable_gqa=True)
    >>> g.dq.shape, g.dk.shape, g.dbias.shape
    ((1, 4, 3, 8), (1, 2, 6, 8), (3, 6))

    Softmax ignores a constant added to a row, so each row of the mask's gradient sums
    to zero:

    >>> bool(np.allclose(g.dbias.sum(axis=-1), 0.0))
    True
    """
    query_in = query
    xp, query, mask, bias = sdpa_translate(
        query, key, value, attn_mask, is_causal, enable_gqa, xp
    )
    broadcast_query = tuple(query.shape) != tuple(query_in.shape)
    if broadcast_query:
        # The broadcast query's head gradients are summed back to one head; do the sum in
        # float64, before the single rounding to the input dtype (a cast up is exact).
        query, key, value, grad_out = (
            xp.astype(x, xp.float64) for x in (query, key, value, grad_out)
        )
    grads = attention_backward(
        grad_out, query, key, value, mask=mask, bias=bias, causal=is_causal,
        alignment="top_left", scale=scale, dropout_p=dropout_p, dropout_mask=dropout_mask,
        masked_rows="zero", xp=xp,
    )
    if not broadcast_query:
        return grads
    dtype = query_in.dtype
    return AttentionGrads(
        dq=xp.astype(sum_to_shape(grads.dq, query_in.shape, xp=xp), dtype),
        dk=xp.astype(grads.dk, dtype),
        dv=xp.astype(grads.dv, dtype),
        dbias=grads.dbias,
    )
