"""The fused forward pass: checks, launch planning and the kernel call.

Shape legend: B batch, H query heads, K key heads, Kv value heads, L query length,
S key length, E head dim of q/k, Ev head dim of v.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np

from . import _launch, _modules, _operands

__all__ = ["check_qkv", "flash_attention", "flash_forward", "kernel_layout", "on_device"]

_SCALAR = {"float32": np.float32, "float64": np.float64}


def _dtype_name(x: Any) -> str:
    return np.dtype(x.dtype).name


def check_qkv(q: Any, k: Any, v: Any, compute_dtype: str,
              extra: tuple[tuple[str, Any], ...] = ()) -> tuple[int, ...]:
    """Check the (B, heads, length, dim) arrays a kernel takes; (B, H, K, Kv, L, S, E, Ev)."""
    if compute_dtype not in _SCALAR:
        raise _launch.UnsupportedLaunch(
            f"compute_dtype must be 'float32' or 'float64', got {compute_dtype!r}"
        )
    for name, x in (("q", q), ("k", k), ("v", v), *extra):
        if x.ndim != 4:
            raise ValueError(f"{name} must be 4-D (B, heads, length, dim), got shape {x.shape}")
        if _dtype_name(x) != compute_dtype:
            raise ValueError(f"{name} has dtype {_dtype_name(x)}, expected {compute_dtype}")
        if not x.flags.c_contiguous:
            # The kernel indexes raw pointers; CuPy would pass a strided view unnoticed.
            raise ValueError(f"{name} must be C-contiguous")
    B, H, L, E = q.shape
    Bk, K, S, Ek = k.shape
    Bv, Kv, Sv, Ev = v.shape
    if not B == Bk == Bv:
        raise ValueError(f"batch dims differ: q {B}, k {Bk}, v {Bv}")
    if Ek != E:
        raise ValueError(f"q and k head dims differ: {E} and {Ek}")
    if Sv != S:
        raise ValueError(f"k and v lengths differ: {S} and {Sv}")
    if H > 0 and (K == 0 or Kv == 0 or H % K or H % Kv):
        raise ValueError(f"key heads ({K}) and value heads ({Kv}) must divide query heads ({H})")
    return B, H, K, Kv, L, S, E, Ev


def on_device(x: Any) -> Any:
    """The context that makes `x`'s device current (CuPy launches on the current one).

    A cupy.cuda.Device is a context manager; NumPy's "cpu" device under the shim is not.
    """
    device: Any = getattr(x, "device", None)
    return device if hasattr(device, "__enter__") else contextlib.nullcontext()


def flash_forward(
    q: Any,
    k: Any,
    v: Any,
    *,
    compute_dtype: str,
    need_lse: bool,
    xp: Any = None,
    **options: Any,
) -> tuple[Any, Any]:
    """Attention forward with the fused kernel: ``(out, lse)``, lse None unless asked.

    Parameters
    ----------
    q, k, v : arrays of shape (B, H, L, E), (B, K, S, E), (B, Kv, S, Ev)
        C-contiguous CuPy arrays (NumPy arrays under the CPU shim), already broadcast to
        one batch dim and cast to `compute_dtype`. K and Kv must divide H: query head h
        reads key head ``h // (H // K)`` and value head ``h // (H // Kv)``.
    compute_dtype : {"float32", "float64"}
        The dtype of the inputs and of every operation in the kernel.
    need_lse : bool
        Return the natural-log LSE of each row, (B, H, L); -inf for a fully masked row.
    **options
        The score options, as :func:`refattn._cuda._operands.kernel_options` takes them:
        ``scale`` (required), ``causal``, ``alignment``, ``window``, ``mask``, ``bias``,
        ``dropout_mask``, ``dropout_p``, ``masked_rows``, ``softcap``.
    xp : namespace, optional
        The inputs' array namespace (the dispatcher passes the one it inferred).

    Returns
    -------
    out : array (B, H, L, Ev)
    lse : array (B, H, L) or None

    Raises
    ------
    ValueError
        Inputs that break the contract above.
    refattn._cuda._launch.UnsupportedLaunch
        A problem the kernel cannot run (head dim over 256, shared memory over the
        device's limit); the dispatcher falls back to the array-API path.

    Examples
    --------
    On a GPU (CuPy arrays):

    >>> import cupy  # doctest: +SKIP
    >>> q = cupy.random.standard_normal((1, 2, 8, 16))  # doctest: +SKIP
    >>> pad = cupy.arange(8) < 6  # the last two keys are padding  # doctest: +SKIP
    >>> out, lse = flash_forward(q, q, q, scale=0.25, causal=True,  # doctest: +SKIP
    ...                          alignment="top_left", compute_dtype="float64",
    ...                          need_lse=True, mask=pad)
    """
    if xp is None:
        import array_api_compat

        xp = array_api_compat.array_namespace(q, k, v)
    B, H, K, Kv, L, S, E, Ev = check_qkv(q, k, v, compute_dtype)
    opts = _operands.kernel_options(shape=(B, H, L, S), dtype=compute_dtype, xp=xp, **options)
    with on_device(q):
        return _launch_forward(q, k, v, opts, compute_dtype=compute_dtype,
                               need_lse=need_lse, xp=xp)


def _launch_forward(q: Any, k: Any, v: Any, opts: _operands.KernelOptions, *,
                    compute_dtype: str, need_lse: bool, xp: Any) -> tuple[Any, Any]:
    B, H, L, E = q.shape
    K, S = k.shape[1], k.shape[2]
    Kv, Ev = v.shape[1], v.shape[3]
    plan = _launch.plan_flash_forward(
        batch=B, heads=H, query_len=L, key_len=S, head_dim=E, value_head_dim=Ev,
        dtype=compute_dtype, max_dynamic_smem=_modules.max_dynamic_shared_memory(),
    )
    out = xp.empty((B, H, L, Ev), dtype=q.dtype)
    lse = xp.empty((B, H, L), dtype=q.dtype)
    if B * H * L == 0:
        return out, (lse if need_lse else None)

    kernel = _modules.get_module("flash_fwd.cu").get_function(plan.config.name_expression)
    if plan.needs_smem_opt_in:
        # Set on every launch: CuPy keeps one function per device, and the driver call
        # is cheap next to the launch.
        kernel.max_dynamic_shared_size_bytes = plan.shared_mem
    i32 = np.int32
    kernel(
        plan.grid,
        plan.block,
        (
            q, k, v, out, lse, *opts.operands,
            i32(H), i32(H // K), i32(H // Kv), i32(L), i32(S), i32(E), i32(Ev),
            i32(plan.m_tiles), *opts.tail(compute_dtype),
        ),
        shared_mem=plan.shared_mem,
    )
    return out, (lse if need_lse else None)


def kernel_layout(x: Any, batch: tuple[int, ...], xp: Any) -> Any:
    """(..., heads, length, dim) -> (B, heads, length, dim), C-contiguous.

    NumPy and CuPy arrays both copy with .copy(order="C"); the array API has no
    contiguity control.
    """
    x = xp.broadcast_to(x, (*batch, *x.shape[-3:]))
    x = xp.reshape(x, (math.prod(batch), *x.shape[-3:]))
    return x if x.flags.c_contiguous else x.copy(order="C")


def flash_attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    batch_shape: tuple[int, ...],
    compute_dtype: Any,
    need_lse: bool,
    xp: Any = None,
    **options: Any,
) -> tuple[Any, Any]:
    """:func:`flash_forward` for inputs with any leading (batch) dims.

    q (..., H, L, E), k (..., K, S, E) and v (..., Kv, S, Ev) in the compute dtype; their
    leading dims broadcast to `batch_shape`, as do those of `mask`, `bias` and
    `dropout_mask` (broadcastable to (*batch_shape, H, L, S)). `compute_dtype` is
    "float32" / "float64" or the dtype itself. Returns out (*batch_shape, H, L, Ev) and
    lse (*batch_shape, H, L) or None.

    Examples
    --------
    On a GPU (CuPy arrays); k and v broadcast over the first batch dim, the mask over
    batch and heads:

    >>> import cupy  # doctest: +SKIP
    >>> q = cupy.random.standard_normal((2, 3, 4, 8, 16))  # doctest: +SKIP
    >>> kv = cupy.random.standard_normal((1, 3, 2, 8, 16))  # doctest: +SKIP
    >>> mask = cupy.tril(cupy.ones((8, 8), bool))  # doctest: +SKIP
    >>> out, _ = flash_attention(q, kv, kv, batch_shape=(2, 3), scale=0.25,  # doctest: +SKIP
    ...                          mask=mask, compute_dtype="float64", need_lse=False)
    """
    if xp is None:
        import array_api_compat

        xp = array_api_compat.array_namespace(q, k, v)
    batch = tuple(int(n) for n in batch_shape)
    q4, k4, v4 = (kernel_layout(x, batch, xp) for x in (q, k, v))
    out, lse = flash_forward(q4, k4, v4, compute_dtype=np.dtype(compute_dtype).name,
                             need_lse=need_lse, xp=xp,
                             **_operands.flatten_operands(options, batch, xp))
    out = xp.reshape(out, (*batch, *out.shape[1:]))
    if lse is not None:
        lse = xp.reshape(lse, (*batch, *lse.shape[1:]))
    return out, lse
