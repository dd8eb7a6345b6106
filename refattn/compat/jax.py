"""JAX's conventions: ``jax.nn.dot_product_attention``.

Reproduces the XLA implementation of jax 0.10 (``jax/_src/nn/functions.py``):

* layout (B, T, N, H) (or (T, N, H) without a batch); K key/value heads divide N,
  query head n uses key head n // (N / K);
* logits = scale * q.k, then ``+ bias``, then every mask (the boolean ``mask``, True =
  attend; ``is_causal``, top-left; ``local_window_size``, top-left; the sequence
  lengths) replaces the logit by the finite fill ``-0.7 * float32 max``;
* so a fully masked row is not special to JAX: its softmax is uniform, the output the
  mean of the values (``masked_rows="uniform"`` here), and its log-sum-exp the fill;
* query rows past ``query_seq_lengths`` are then multiplied by 0.

JAX computes that softmax in float32 for every input dtype, float64 included (it rounds
the logits to float32 first), so its float64 results carry float32-sized errors; refattn
computes in float64. JAX releases before jax-ml/jax#37457 (May 2026) used
``-0.7 * float64 max`` for float64 inputs, which overflows to -inf in float32 and makes
fully masked rows NaN there; ``refattn.attention(..., masked_rows="nan")`` reproduces
those.

JAX arrays are computed on the host with NumPy in float64 (whatever
``jax_enable_x64`` says) and the results put back on the query's device; other
libraries' arrays stay in their library.
"""

from __future__ import annotations

import numbers
from typing import Any

import array_api_compat
import numpy as np

from .. import _validate
from .._front_door import attention
from .._namespace import check_array, infer_namespace, namespace_library

__all__ = ["dot_product_attention"]

IMPLEMENTATIONS = (None, "xla", "cudnn")
# JAX's mask fill for float64/float32/bfloat16/float16 inputs alike: logits are at least
# float32 and the fill is capped at float32's range (_get_large_negative).
FILL = np.float32(-0.7 * float(np.finfo(np.float32).max))


def _as_4d(name: str, x: Any, xp: Any, *, at_most: bool) -> Any:
    # JAX's _ensure_4d: missing leading axes are added.
    if (at_most and x.ndim > 4) or (not at_most and x.ndim not in (3, 4)):
        wanted = "at most 4-D" if at_most else "4-D (B, T/S, N/K, H) or 3-D (T/S, N/K, H)"
        raise ValueError(f"{name} must be {wanted}; got shape {tuple(x.shape)}")
    return xp.reshape(x, (1,) * (4 - x.ndim) + tuple(x.shape))


def _window(local_window_size: Any) -> tuple[int, int] | None:
    if local_window_size is None:
        return None
    if isinstance(local_window_size, numbers.Integral) and not isinstance(local_window_size,
                                                                          bool):
        local_window_size = (local_window_size, local_window_size)
    if not isinstance(local_window_size, (tuple, list)) or len(local_window_size) != 2:
        raise TypeError(
            "local_window_size must be an int or a pair (left, right) of ints; got "
            f"{local_window_size!r}"
        )
    sides = []
    for side, value in zip(("left", "right"), local_window_size, strict=True):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(
                f"local_window_size's {side} size must be an int; got "
                f"{type(value).__name__} {value!r}"
            )
        if value < 0:
            # JAX would read a negative size as a window that excludes the query's own
            # position; refattn's windows always contain it, so it is refused.
            raise ValueError(
                f"local_window_size's {side} size must be >= 0; got {int(value)}"
            )
        sides.append(int(value))
    return sides[0], sides[1]


def _seq_lengths(name: str, lengths: Any, B: int, xp: Any) -> Any:
    if not xp.isdtype(lengths.dtype, "integral"):
        raise TypeError(f"{name} must have an integer dtype (JAX: int32); got {lengths.dtype}")
    if tuple(lengths.shape) != (B,):
        raise ValueError(f"{name} must have shape (B,) = ({B},); got {tuple(lengths.shape)}")
    return xp.astype(lengths, xp.int64)


def _check_heads(name: str, x: Any, B: int, N: int, T: int, S: int) -> None:
    # JAX groups a bias or mask's head axis as (K, G), so it must be 1 or N: exactly
    # what broadcasting to (B, N, T, S) allows.
    _validate.check_broadcastable(name, x, (B, N, T, S), "(B, N, T, S)")


def _dot_product_attention(
    query: Any, key: Any, value: Any, bias: Any, mask: Any, *, scale: Any, is_causal: Any,
    query_seq_lengths: Any, key_value_seq_lengths: Any, local_window_size: Any,
    implementation: Any, return_residual: Any, xp: Any,
) -> Any:
    xp, device = infer_namespace(
        {"query": query, "key": key, "value": value, "bias": bias},
        {"mask": mask, "query_seq_lengths": query_seq_lengths,
         "key_value_seq_lengths": key_value_seq_lengths}, xp=xp,
        required=("query", "key", "value"))
    _validate.check_choice("implementation", implementation, IMPLEMENTATIONS)
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be True or False; got {is_causal!r}")
    window = _window(local_window_size)
    out_shape = tuple(query.shape)
    q, k, v = (_as_4d(n, x, xp, at_most=False)
               for n, x in (("query", query), ("key", key), ("value", value)))
    B, S, K, H = k.shape
    if tuple(v.shape) != (B, S, K, H) or v.dtype != k.dtype:
        raise ValueError(
            f"value must have key's shape {(B, S, K, H)} and dtype {k.dtype}; got "
            f"{tuple(v.shape)} {v.dtype}"
        )
    if q.shape[0] != B or q.shape[3] != H or q.dtype != k.dtype:
        raise ValueError(
            f"query must have shape (B={B}, T, N, H={H}) and dtype {k.dtype}; got "
            f"{tuple(q.shape)} {q.dtype}"
        )
    T, N = q.shape[1], q.shape[2]
    if N % K:
        raise ValueError(
            f"the number of query heads must be a multiple of key/value heads; got {N} vs {K}"
        )
    if bias is not None:
        bias = _as_4d("bias", bias, xp, at_most=True)
        _check_heads("bias", bias, B, N, T, S)
    if mask is not None:
        if not xp.isdtype(mask.dtype, "bool"):
            raise ValueError(f"mask must be a boolean array (True = attend); got {mask.dtype}")
        mask = _as_4d("mask", mask, xp, at_most=True)
        _check_heads("mask", mask, B, N, T, S)
    q_rows = None
    if query_seq_lengths is not None:
        lengths = _seq_lengths("query_seq_lengths", query_seq_lengths, B, xp)
        rows = xp.arange(T, dtype=xp.int64, device=device)
        q_rows = xp.reshape(rows, (1, T)) < xp.reshape(lengths, (B, 1))  # (B, T)
        padded = xp.reshape(q_rows, (B, 1, T, 1))
        mask = padded if mask is None else mask & padded
    if key_value_seq_lengths is not None:
        lengths = _seq_lengths("key_value_seq_lengths", key_value_seq_lengths, B, xp)
        cols = xp.arange(S, dtype=xp.int64, device=device)
        padded = xp.reshape(xp.reshape(cols, (1, S)) < xp.reshape(lengths, (B, 1)),
                            (B, 1, 1, S))
        mask = padded if mask is None else mask & padded
    res = attention(
        q, k, v, mask=mask, bias=bias, causal=is_causal, window=window,
        alignment="top_left", scale=scale, masked_rows="uniform", layout="BLHD",
        return_lse=return_residual, xp=xp,
    )
    out = res.out if return_residual else res
    if q_rows is not None:
        # JAX multiplies (a NaN row stays NaN) rather than selects.
        out = out * xp.astype(xp.reshape(q_rows, (B, T, 1, 1)), out.dtype)
    out = xp.reshape(out, out_shape)
    if not return_residual:
        return out
    lse = res.lse
    if S > 0:
        # A fully masked row's log-sum-exp over S fills is fill + log(S), which rounds to
        # the fill in float32 (its ulp is ~2e31); JAX then casts it to the key's dtype.
        fill = xp.asarray(float(FILL), dtype=xp.float64, device=device)
        lse = xp.where(lse == -xp.inf, xp.astype(fill, lse.dtype), lse)
    lse = xp.permute_dims(lse, (0, 2, 1))  # (B, N, T) -> (B, T, N)
    return out, xp.reshape(lse, out_shape[:-1])


def _from_jax(x: Any) -> Any:
    # Host copy in float64 (exact for every float dtype), integers and booleans as they are.
    a = np.asarray(x)
    return a.astype(np.float64) if a.dtype.kind == "f" or a.dtype.name == "bfloat16" else a


def dot_product_attention(
    query: Any,
    key: Any,
    value: Any,
    bias: Any = None,
    mask: Any = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: Any = None,
    key_value_seq_lengths: Any = None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: str | None = None,
    return_residual: bool = False,
    xp: Any = None,
) -> Any:
    """``jax.nn.dot_product_attention`` (XLA implementation), computed in float64.

    Same signature, layout, defaults and return values as jax 0.10. Takes JAX arrays
    (returned as JAX arrays on the query's device) and every array library refattn
    takes.

    Parameters
    ----------
    query : array
        (B, T, N, H) or (T, N, H).
    key, value : array
        (B, S, K, H) or (S, K, H), one shape and the query's dtype; K divides N (query
        head n uses key head n // (N / K)).
    bias : array, optional
        Added to the scaled logits before any mask; at most 4-D, broadcastable to
        (B, N, T, S) with a head axis of 1 or N (missing leading axes are added).
    mask : bool array, optional
        True = attend; shape rules as ``bias``.
    scale : float, optional
        Defaults to 1/sqrt(H).
    is_causal : bool
        Top-left causal mask: query i attends keys j <= i.
    query_seq_lengths, key_value_seq_lengths : integer array, optional
        (B,): queries at or past ``query_seq_lengths[b]`` are masked and their output
        rows set to 0; keys at or past ``key_value_seq_lengths[b]`` are masked.
    local_window_size : int or (int, int), optional
        (left, right) >= 0, top-left: query i attends keys i - left .. i + right; an
        int w means (w, w).
    implementation : {None, "xla", "cudnn"}
        Validated as JAX does; refattn computes the XLA semantics for each (cuDNN's
        own restrictions on windows and shapes are not reproduced).
    return_residual : bool
        Also return the log-sum-exp (B, T, N) (or (T, N)) in the key's dtype; a fully
        masked row's is JAX's fill ``-0.7 * float32 max`` (cast to that dtype).
    xp : namespace or str, optional
        Array namespace of the inputs or its name, e.g. ``xp="numpy"``; inferred
        when None.

    Returns
    -------
    array or tuple
        The output, shaped and typed like ``query``, or ``(output, residual)``.

    Raises
    ------
    TypeError
        Mixed libraries, integer or complex data, non-integer sequence lengths, a
        window that is not ints.
    ValueError
        Shapes or dtypes that do not fit as JAX checks them (value not key's shape and
        dtype, query's batch, head size or dtype not key's, N not a multiple of K, a
        bias or mask that does not broadcast to (B, N, T, S), a non-boolean mask), a
        negative window size, an unknown ``implementation``.

    Examples
    --------
    >>> import numpy as np
    >>> from refattn.compat.jax import dot_product_attention
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((2, 4, 6, 8)).astype(np.float32)   # B, T, N=6 heads, H
    >>> k, v = (rng.standard_normal((2, 5, 3, 8)).astype(np.float32) for _ in range(2))
    >>> out = dot_product_attention(q, k, v, is_causal=True)
    >>> out.shape, out.dtype
    ((2, 4, 6, 8), dtype('float32'))

    A fully masked row is not zeroed: JAX's finite fill makes it the mean of the values.

    >>> mask = np.ones((1, 1, 4, 5), dtype=bool)
    >>> mask[..., 0, :] = False
    >>> out, lse = dot_product_attention(q, k, v, mask=mask, return_residual=True)
    >>> bool(np.allclose(out[:, 0, 0], v.mean(axis=1)[:, 0]))   # head 0 uses key head 0
    True
    >>> float(lse[0, 0, 0])
    -2.3819763e+38
    """
    for name, x in (("query", query), ("key", key), ("value", value)):
        check_array(name, x)  # before the JAX test below looks at what it was given
    named = (query, key, value, bias, mask, query_seq_lengths, key_value_seq_lengths)
    if not any(array_api_compat.is_jax_array(x) for x in named):
        return _dot_product_attention(
            query, key, value, bias, mask, scale=scale, is_causal=is_causal,
            query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
            local_window_size=local_window_size, implementation=implementation,
            return_residual=return_residual, xp=xp)
    # JAX arrays: NumPy on the host in float64, so that the oracle's precision does not
    # depend on jax_enable_x64 (without it JAX has no float64 arrays to compute in).
    import jax

    if xp is not None and namespace_library(xp) != "jax":
        raise TypeError(f"xp is the {namespace_library(xp)} namespace but the inputs are JAX "
                        "arrays")
    dtypes = [np.asarray(x).dtype for x in (query, key, value)]
    if len(set(dtypes)) > 1:
        raise ValueError(
            f"query, key and value must have one dtype; got {', '.join(map(str, dtypes))}"
        )
    dtype = dtypes[0]
    host = [None if x is None else _from_jax(x) if array_api_compat.is_jax_array(x) else x
            for x in named]
    res = _dot_product_attention(
        *host[:5], scale=scale, is_causal=is_causal, query_seq_lengths=host[5],
        key_value_seq_lengths=host[6], local_window_size=local_window_size,
        implementation=implementation, return_residual=return_residual, xp=None)
    target = array_api_compat.device(next(x for x in named if array_api_compat.is_jax_array(x)))
    results = res if return_residual else (res,)
    back = tuple(jax.device_put(np.asarray(r).astype(dtype), target) for r in results)
    return back if return_residual else back[0]
