"""The plain low-precision baseline and the per-tensor budgets built on it.

The flash-attention authors judge a kernel in fp16 / bf16 / fp32 against a reference
of higher precision by comparing its error with the error of a *plain* implementation
run in the kernel's own precision. refattn computes that plain baseline itself, with
its own direct path in float32 and the roundings of a low-precision implementation
inserted where such an implementation rounds:

1. the inputs hold values of the low dtype (they are given in it);
2. the scores, accumulated in float32 and then through scale, softcap, bias, ALiBi and
   a score_mod, are rounded to the low dtype (a low-precision GEMM writes its output in
   the low dtype, and so does each elementwise step after it);
3. the softmax, computed in float32 from those scores, is rounded to the low dtype
   before the product with V (accumulated in float32), whose result is rounded too.

Gradients are those of this forward: refattn's float32 backward through the rounded
scores, with the baseline's own low-precision output in ``rowsum(dO * O)`` (as a fused
backward uses its saved output), each gradient rounded to the low dtype.

For float32 every rounding is the identity and the baseline is refattn's plain float32
path.

"A plain implementation" is defined up to the order of its operations, and on a small
problem one order may be off by a fraction of an ulp where another is off by several:
a single baseline can be lucky. So the baseline comes in three orders, differing in where
the softmax scale is applied (``SCALE_PLACEMENTS``), and the rule takes the largest of
their errors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._front_door import attention, attention_backward

__all__ = [
    "EPS",
    "SCALE_PLACEMENTS",
    "Baseline",
    "dtype_name",
    "low_precision_baseline",
    "numpy_rounder",
]

#: Machine epsilon (spacing of floats at 1) of the dtypes the rule knows.
EPS = {"float64": 2.0**-52, "float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}


def dtype_name(x: Any) -> str:
    """``"float32"``, ``"bfloat16"``, ... for an array of any library (``"bool"`` etc. too)."""
    # torch.bfloat16, array_api_strict.float32, numpy's float16 and ml_dtypes' bfloat16
    # all end in the bare name.
    return str(x.dtype).rsplit(".", 1)[-1]


def numpy_rounder(name: str) -> Callable[[np.ndarray], np.ndarray]:
    """float32 NumPy array -> its values rounded to ``name`` (returned as float32)."""
    if name in ("float32", "float64"):
        return lambda x: x
    if name == "float16":
        return lambda x: x.astype(np.float16).astype(np.float32)
    if name != "bfloat16":
        raise ValueError(f"no low-precision rounding for dtype {name!r}")
    try:
        import ml_dtypes

        return lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32)
    except ImportError:
        pass
    try:
        import torch
    except ImportError:
        raise ImportError(
            "bfloat16 on NumPy needs ml_dtypes (pip install ml_dtypes) or torch"
        ) from None
    return lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16).to(
        torch.float32).numpy()


@dataclass
class Baseline:
    """The baseline's output and gradients (float32 arrays holding low-precision values)."""

    out: Any
    dq: Any = None
    dk: Any = None
    dv: Any = None
    dbias: Any = None


def _swap_last3(x: Any, xp: Any) -> Any:
    axes = list(range(x.ndim))
    axes[-3], axes[-2] = axes[-2], axes[-3]
    return xp.permute_dims(x, tuple(axes))


def _rounded_score_mod(user_mod: Any, round_to: Callable[[Any], Any], xp: Any) -> Any:
    # Rounds the final pre-mask scores. Its derivative is the user's mod's (rounding has
    # slope 1 almost everywhere): the given one, or for an affine mod f(s + 1) - f(s),
    # the rule refattn's backward applies to mods without a derivative.
    def mod(s: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        if user_mod is not None:
            s = user_mod(s, b, h, q_idx, kv_idx)
        return round_to(s)

    def derivative(s: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        if user_mod is None:
            return xp.ones_like(s)
        own = getattr(user_mod, "derivative", None)
        if own is not None:
            return own(s, b, h, q_idx, kv_idx)
        return user_mod(s + 1.0, b, h, q_idx, kv_idx) - user_mod(s, b, h, q_idx, kv_idx)

    mod.derivative = derivative  # type: ignore[attr-defined]
    return mod


#: Where a plain implementation applies the softmax scale: to the products (refattn,
#: cuBLAS's alpha), to the queries first (flash-attn's reference ``q / sqrt(d)``), or
#: split as sqrt(scale) onto queries and keys (torch's math backend).
SCALE_PLACEMENTS = ("products", "query", "split")


def _placement_factors(placement: str, scale: float) -> tuple[float, float, float]:
    # (factor on q, factor on k, scale left for the products).
    if placement == "products" or scale == 0:
        return 1.0, 1.0, scale
    if placement == "query":
        return scale, 1.0, 1.0
    root = math.sqrt(abs(scale))
    return root, math.copysign(root, scale), 1.0


def low_precision_baseline(
    q: Any,
    k: Any,
    v: Any,
    *,
    round_to: Callable[[Any], Any],
    options: dict[str, Any],
    grad_out: Any = None,
    placement: str = "products",
    xp: Any,
) -> Baseline:
    """The plain low-precision baseline (module docstring) in the namespace of q.

    Parameters
    ----------
    q, k, v
        The inputs (any real floating dtype; cast to float32 exactly when they hold
        low-precision values).
    round_to
        Rounds a float32 array of the namespace to the low dtype, returning float32.
    options
        ``refattn.attention`` options; a dropout must come as ``dropout_mask`` (an
        ``rng`` would be drawn again by the backward).
    grad_out
        When given, the baseline's gradients are computed too.
    placement
        One of ``SCALE_PLACEMENTS``: where the scale is applied. A scale applied to q or
        k rounds them once more (and their gradients once more by the chain rule).
    xp
        The array namespace of q, k, v.
    """
    f32 = xp.float32
    q32, k32, v32 = (round_to(xp.astype(x, f32)) for x in (q, k, v))
    opts = {name: value for name, value in options.items() if name != "implementation"}
    E = q.shape[-1]
    scale = opts.get("scale")
    scale = float(scale) if scale is not None else (1.0 / math.sqrt(E) if E else 1.0)
    alpha, beta, opts["scale"] = _placement_factors(placement, scale)
    qs = q32 if alpha == 1 else round_to(q32 * alpha)
    ks = k32 if beta == 1 else round_to(k32 * beta)
    for name in ("bias", "alibi_slopes"):
        if opts.get(name) is not None:
            opts[name] = xp.astype(opts[name], f32)
    opts["score_mod"] = _rounded_score_mod(opts.get("score_mod"), round_to, xp)
    res = attention(qs, ks, v32, compute_dtype="float32", return_weights=True,
                    return_dropout_mask=True, implementation="direct", **opts)
    weights = round_to(res.weights)
    p = float(opts.get("dropout_p", 0.0))
    if res.dropout_mask is not None:
        zero = xp.zeros_like(weights)
        weights = zero if p >= 1 else round_to(
            xp.where(res.dropout_mask, weights, zero) * (1.0 / (1.0 - p)))
    values = v32
    blhd = opts.get("layout", "BHLD") == "BLHD"
    if blhd and values.ndim >= 3:
        values = _swap_last3(values, xp)
    if values.ndim >= 3 and weights.ndim >= 3 and weights.shape[-3] != values.shape[-3]:
        # Grouped-query: value head k serves query heads k*G .. k*G+G-1.
        groups = weights.shape[-3] // values.shape[-3]
        *lead, n, s, d = values.shape
        values = xp.reshape(xp.broadcast_to(values[..., None, :, :], (*lead, n, groups, s, d)),
                            (*lead, n * groups, s, d))
    out = round_to(weights @ values)
    if blhd and out.ndim >= 3:
        out = _swap_last3(out, xp)
    if tuple(out.shape) != tuple(res.out.shape):  # pragma: no cover - a refattn bug
        raise RuntimeError(f"baseline output {tuple(out.shape)} != oracle's "
                           f"{tuple(res.out.shape)}")
    base = Baseline(out=out)
    if grad_out is None:
        return base
    grads = attention_backward(
        round_to(xp.astype(grad_out, f32)), qs, ks, v32, compute_dtype="float32",
        output=out, implementation="direct", **opts,
    )
    base.dq, base.dk, base.dv = (round_to(g) for g in grads[:3])
    # The chain rule through the prescaling: d/dq = alpha d/dq' (one more rounding).
    if alpha != 1:
        base.dq = round_to(base.dq * alpha)
    if beta != 1:
        base.dk = round_to(base.dk * beta)
    base.dbias = None if grads.dbias is None else round_to(xp.astype(grads.dbias, f32))
    return base
