"""The fused backward pass: dQ, dK, dV (and d bias) from the forward's output and LSE.

Shape legend: B batch, H query heads, K key heads, Kv value heads, L query length,
S key length, E head dim of q/k, Ev head dim of v.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import _launch, _modules, _operands
from ._forward import check_qkv, kernel_layout, on_device

__all__ = ["flash_attention_backward", "flash_backward"]


def flash_backward(
    dout: Any,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    *,
    compute_dtype: str,
    need_dbias: bool = False,
    xp: Any = None,
    **options: Any,
) -> tuple[Any, Any, Any, Any]:
    """Gradients of :func:`flash_forward` with the fused kernels: ``(dq, dk, dv, dbias)``.

    Recomputes the weights tile by tile from `lse` (P = exp(S - lse)), as
    FlashAttention-2's backward does, with D = rowsum(dout * out) computed first. One
    kernel owns query tiles and writes dQ (and dS for the bias gradient); the other owns
    key tiles and loops over the query heads of each key/value head's group, so dK and
    dV are summed over grouped-query heads in registers, without atomics: the results
    are deterministic.

    Parameters
    ----------
    dout : array (B, H, L, Ev)
        Gradient of the loss with respect to the output.
    q, k, v : arrays (B, H, L, E), (B, K, S, E), (B, Kv, S, Ev)
        The forward inputs, as :func:`flash_forward` takes them.
    out, lse : arrays (B, H, L, Ev) and (B, H, L)
        The forward's output and LSE for the same options (-inf marks a fully masked
        row).
    compute_dtype, **options
        The forward's dtype and score options, as :func:`flash_forward` takes them.
    need_dbias : bool
        Also return dS, the gradient of an additive bias, at the full (B, H, L, S): the
        caller sums it over the axes its bias was broadcast along.
    xp : namespace, optional
        The inputs' array namespace.

    Returns
    -------
    dq, dk, dv : arrays of the shapes of q, k, v
    dbias : array (B, H, L, S) or None

    Raises
    ------
    ValueError
        Inputs that break the contract above.
    refattn._cuda._launch.UnsupportedLaunch
        A problem the kernels cannot run; the dispatcher falls back.

    Examples
    --------
    On a GPU (CuPy arrays):

    >>> import cupy  # doctest: +SKIP
    >>> q = cupy.random.standard_normal((1, 2, 8, 16))  # doctest: +SKIP
    >>> out, lse = flash_forward(q, q, q, scale=0.25, causal=True,  # doctest: +SKIP
    ...                          compute_dtype="float64", need_lse=True)
    >>> dq, dk, dv, _ = flash_backward(cupy.ones_like(out), q, q, q, out,  # doctest: +SKIP
    ...                                lse, scale=0.25, causal=True,
    ...                                compute_dtype="float64")
    """
    if xp is None:
        import array_api_compat

        xp = array_api_compat.array_namespace(dout, q, k, v)
    B, H, K, Kv, L, S, E, Ev = check_qkv(q, k, v, compute_dtype,
                                         extra=(("dout", dout), ("out", out)))
    for name, x in (("dout", dout), ("out", out)):
        if tuple(x.shape) != (B, H, L, Ev):
            raise ValueError(f"{name} must have shape {(B, H, L, Ev)}, got {tuple(x.shape)}")
    if tuple(lse.shape) != (B, H, L) or np.dtype(lse.dtype).name != compute_dtype:
        raise ValueError(
            f"lse must be a {compute_dtype} array of shape {(B, H, L)}, got "
            f"{np.dtype(lse.dtype).name} {tuple(lse.shape)}"
        )
    if not lse.flags.c_contiguous:
        raise ValueError("lse must be C-contiguous")
    opts = _operands.kernel_options(shape=(B, H, L, S), dtype=compute_dtype, xp=xp, **options)
    with on_device(q):
        return _launch_backward(dout, q, k, v, out, lse, opts, compute_dtype=compute_dtype,
                                need_dbias=need_dbias, xp=xp)


def _launch_backward(dout: Any, q: Any, k: Any, v: Any, out: Any, lse: Any,
                     opts: _operands.KernelOptions, *, compute_dtype: str, need_dbias: bool,
                     xp: Any) -> tuple[Any, Any, Any, Any]:
    B, H, L, E = q.shape
    K, S = k.shape[1], k.shape[2]
    Kv, Ev = v.shape[1], v.shape[3]
    dq_plan, dkdv_plan = _launch.plan_flash_backward(
        batch=B, heads=H, key_heads=K, value_heads=Kv, query_len=L, key_len=S, head_dim=E,
        value_head_dim=Ev, dtype=compute_dtype,
        max_dynamic_smem=_modules.max_dynamic_shared_memory(),
    )
    dtype = q.dtype
    # Zeros, not empty: a launch with an empty grid writes nothing (H = 0 with K > 0),
    # and dS stays 0 where the dQ kernel skips a key tile outside the window.
    dq = xp.zeros((B, H, L, E), dtype=dtype)
    dk = xp.zeros((B, K, S, E), dtype=dtype)
    dv = xp.zeros((B, Kv, S, Ev), dtype=dtype)
    dbias = xp.zeros((B, H, L, S), dtype=dtype) if need_dbias else None
    if opts.all_dropped:
        # dropout_p = 1: the output is identically 0, whatever the inputs, so nothing
        # flows back (the array-API path's rule, NaN rows included).
        return dq, dk, dv, dbias
    # rowsum(P * dP) = rowsum(dO * O): dropout needs no separate term.
    delta = xp.sum(dout * out, axis=-1)
    if not delta.flags.c_contiguous:
        delta = delta.copy(order="C")
    flags = opts.flags | (_operands.FLAG_DBIAS if need_dbias else 0)
    tail = opts.tail(compute_dtype)
    tail = (*tail[:4], np.int32(flags), *tail[5:])
    i32 = np.int32
    dbias_arg = dbias if dbias is not None else xp.zeros((1,), dtype=dtype)

    if dq_plan.grid[0] > 0:
        kernel = _modules.get_module("flash_bwd.cu").get_function(dq_plan.config.name_expression)
        if dq_plan.needs_smem_opt_in:
            kernel.max_dynamic_shared_size_bytes = dq_plan.shared_mem
        kernel(
            dq_plan.grid, dq_plan.block,
            (q, k, v, dout, lse, delta, dq, dbias_arg, *opts.operands,
             i32(H), i32(H // K), i32(H // Kv), i32(L), i32(S), i32(E), i32(Ev),
             i32(dq_plan.m_tiles), *tail),
            shared_mem=dq_plan.shared_mem,
        )
    if dkdv_plan.grid[0] > 0:
        kernel = _modules.get_module("flash_bwd.cu").get_function(
            dkdv_plan.config.name_expression)
        if dkdv_plan.needs_smem_opt_in:
            kernel.max_dynamic_shared_size_bytes = dkdv_plan.shared_mem
        kernel(
            dkdv_plan.grid, dkdv_plan.block,
            (q, k, v, dout, lse, delta, dk, dv, *opts.operands,
             i32(H), i32(H // K), i32(H // Kv), i32(dkdv_plan.heads_per_block), i32(L),
             i32(S), i32(E), i32(Ev), i32(dkdv_plan.m_tiles), *tail),
            shared_mem=dkdv_plan.shared_mem,
        )
    return dq, dk, dv, dbias


def flash_attention_backward(
    dout: Any,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    *,
    batch_shape: tuple[int, ...],
    compute_dtype: Any,
    need_dbias: bool = False,
    xp: Any = None,
    **options: Any,
) -> tuple[Any, Any, Any, Any]:
    """:func:`flash_backward` for inputs with any leading (batch) dims.

    q, k, v, mask, bias and dropout_mask as for :func:`flash_attention`; dout and out
    (..., H, L, Ev) and lse (..., H, L) broadcast to `batch_shape` too. Returns dq
    (*batch_shape, H, L, E), dk (*batch_shape, K, S, E), dv (*batch_shape, Kv, S, Ev)
    (per batch entry: the caller sums them over the batch dims its inputs were
    broadcast along) and dbias (*batch_shape, H, L, S) or None.

    Examples
    --------
    On a GPU (CuPy arrays), with a bias broadcast over the batch:

    >>> import cupy  # doctest: +SKIP
    >>> q = cupy.random.standard_normal((2, 3, 4, 8, 16))  # doctest: +SKIP
    >>> bias = cupy.random.standard_normal((4, 8, 8))  # doctest: +SKIP
    >>> out, lse = flash_attention(q, q, q, batch_shape=(2, 3), scale=0.25,  # doctest: +SKIP
    ...                            bias=bias, compute_dtype="float64", need_lse=True)
    >>> g = flash_attention_backward(out, q, q, q, out, lse,  # doctest: +SKIP
    ...                              batch_shape=(2, 3), scale=0.25, bias=bias,
    ...                              compute_dtype="float64", need_dbias=True)
    >>> g[3].shape  # doctest: +SKIP
    (2, 3, 4, 8, 8)
    """
    if xp is None:
        import array_api_compat

        xp = array_api_compat.array_namespace(dout, q, k, v)
    batch = tuple(int(n) for n in batch_shape)
    q4, k4, v4, dout4, out4 = (kernel_layout(x, batch, xp) for x in (q, k, v, dout, out))
    lse4 = xp.broadcast_to(lse, (*batch, *lse.shape[-2:]))
    lse4 = xp.reshape(lse4, (math.prod(batch), *lse.shape[-2:]))
    if not lse4.flags.c_contiguous:
        lse4 = lse4.copy(order="C")
    dq, dk, dv, dbias = flash_backward(
        dout4, q4, k4, v4, out4, lse4, compute_dtype=np.dtype(compute_dtype).name,
        need_dbias=need_dbias, xp=xp, **_operands.flatten_operands(options, batch, xp),
    )
    dq, dk, dv = (xp.reshape(g, (*batch, *g.shape[1:])) for g in (dq, dk, dv))
    if dbias is not None:
        dbias = xp.reshape(dbias, (*batch, *dbias.shape[1:]))
    return dq, dk, dv, dbias
