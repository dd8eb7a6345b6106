"""Error-free transformations (TwoSum, Veltkamp's split, TwoProduct) and double-float
arithmetic: division, Tang's table-driven ``exp``, ``log`` by one Newton step, sums."""

from __future__ import annotations

import functools
import math
from decimal import Context, Decimal
from typing import Any

# Veltkamp's constant 2^ceil(53/2) + 1: splits a float64 into two halves of <= 26 bits.
_SPLITTER = 134217729.0
# exp_df: 2^_TABLE_BITS table entries; |reduced argument| <= ln2 / 2^(_TABLE_BITS + 1).
_TABLE_BITS = 12
# Beyond +-708 exp leaves the normal range; weights below e^-708 (relative to the row's
# largest weight, which is 1) are far below any rounding of the result.
_EXP_LIMIT = 708.0


# --------------------------------------------------------------------------- EFTs


def two_sum(a: Any, b: Any) -> tuple[Any, Any]:
    """Knuth's TwoSum: ``s + err == a + b`` exactly, ``s = fl(a + b)``."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def fast_two_sum(a: Any, b: Any) -> tuple[Any, Any]:
    """Dekker's FastTwoSum: exact like ``two_sum`` when ``|a| >= |b|`` (or a == 0)."""
    s = a + b
    return s, b - (s - a)


def split(a: Any) -> tuple[Any, Any]:
    """Veltkamp's split ``a == hi + lo`` with both halves of at most 26 significant bits.

    Exact for ``|a| < 2^996`` (beyond that ``_SPLITTER * a`` overflows).
    """
    t = _SPLITTER * a
    hi = t - (t - a)
    return hi, a - hi


def _two_product_presplit(a: Any, a_hi: Any, a_lo: Any, b: Any) -> tuple[Any, Any]:
    # Dekker's TwoProduct with the first factor already split (table constants, scalars).
    p = a * b
    b_hi, b_lo = split(b)
    return p, ((a_hi * b_hi - p) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo


def two_product(a: Any, b: Any) -> tuple[Any, Any]:
    """Dekker's TwoProduct: ``p + err == a * b`` exactly, ``p = fl(a * b)``.

    Exact unless ``a * b`` underflows or a factor exceeds ``2^996`` in magnitude.
    """
    a_hi, a_lo = split(a)
    return _two_product_presplit(a, a_hi, a_lo, b)


def _df_div(nh: Any, nl: Any, dh: Any, dl: Any) -> tuple[Any, Any]:
    # (nh + nl) / (dh + dl) as a double-float: one correction of the float quotient. The
    # residual nh - q0*dh is exact (TwoProduct, then Sterbenz: q0*dh is within a factor 2
    # of nh), so the only errors are O(u^2) relative.
    q0 = nh / dh
    ph, pl = two_product(q0, dh)
    r = (((nh - ph) - pl) + nl) - q0 * dl
    return fast_two_sum(q0, r / dh)


# ------------------------------------------------------- double-float exp and log


def _bits(x: float, bits: int) -> float:
    # x rounded to `bits` significant bits (exact integer arithmetic, no double rounding).
    m, e = math.frexp(x)
    return math.ldexp(round(m * 2**bits), e - bits)


@functools.cache
def _exp_constants() -> dict[str, Any]:
    # Computed once with the standard library's decimal module at 60 digits, so every
    # table entry is right to the last bit of its double-float (2^-106 relative). The
    # 4096 entries 2^(j/4096) are products of two 64-entry tables (50 ms, once).
    ctx = Context(prec=60)
    n = 2**_TABLE_BITS
    ln2 = ctx.ln(Decimal(2))
    step = ctx.divide(ln2, Decimal(n))
    # Cody-Waite: step = c1 + c2 + c3 with c1, c2 of 31 bits, so that n * c1 and n * c2
    # are exact for the |n| < 2^22 that |x| <= 708 produces.
    c1 = _bits(float(step), 31)
    c2 = _bits(float(ctx.subtract(step, Decimal(c1))), 31)
    c3 = float(ctx.subtract(ctx.subtract(step, Decimal(c1)), Decimal(c2)))
    coarse = [ctx.power(Decimal(2), ctx.divide(Decimal(a), Decimal(64))) for a in range(64)]
    fine = [ctx.power(Decimal(2), ctx.divide(Decimal(b), Decimal(n))) for b in range(n // 64)]
    hi, lo = [], []
    for j in range(n):
        t = ctx.multiply(coarse[j // (n // 64)], fine[j % (n // 64)])
        h = float(t)
        hi.append(h)
        lo.append(float(ctx.subtract(t, Decimal(h))))
    return {
        "inv_step": float(ctx.divide(Decimal(1), step)),
        "c1": c1, "c2": c2, "c3": c3, "hi": hi, "lo": lo,
        # 2^k for k in [-1022, 1023], indexed by k + 1022: exact powers of two built in
        # Python, since the array API has no ldexp.
        "pow2": [2.0**k for k in range(-1022, 1024)],
    }


def _take(table: list[float], index: Any, *, xp: Any, device: Any) -> Any:
    # xp.take wants 1-D indices: look up through a flat view and restore the shape.
    t = xp.asarray(table, dtype=xp.float64, device=device)
    return xp.reshape(xp.take(t, xp.reshape(index, (-1,))), index.shape)


def exp_df(xh: Any, xl: Any, *, xp: Any) -> tuple[Any, Any]:
    """``exp(xh + xl)`` as a double-float ``(hi, lo)``.

    Tang's table method: ``x = n ln2/4096 + r`` with ``n = 4096 k + j``, so that
    ``exp(x) = 2^k 2^(j/4096) exp(r)``, ``|r| <= ln2/8192 < 2^-13``; ``2^(j/4096)`` comes
    from a double-float table, ``exp(r) - 1`` from its degree-4 Taylor polynomial. The
    relative error is below 2^-64 for ``|x| <= 669`` (derivation in docs/accuracy.rst);
    below -669 the low part is subnormal, and below -708 the result is the library's
    (subnormal or zero) ``exp``; NaN stays NaN. About 35 array operations; the library's
    ``exp`` (itself up to an ulp off) is not used inside [-708, 708].

    Parameters
    ----------
    xh, xl
        float64 arrays of one shape, ``|xl| <= ulp(xh)``.
    xp
        Array namespace.
    """
    c = _exp_constants()
    device = xh.device
    # 708 itself is inside: e^708 = 3.0e307 and its power of two 2^1021 are normal.
    valid = (xh > -_EXP_LIMIT) & (xh <= _EXP_LIMIT)
    zero = xp.asarray(0.0, dtype=xh.dtype, device=device)
    x = xp.where(valid, xh, zero)
    n = xp.round(x * c["inv_step"])
    # Cody-Waite: x - n*c1 is exact (both on a grid of 2^-66 or coarser, the difference
    # below 2^-13), n*c2 is exact; the two last additions round by 2^-67.5 each, as
    # |r| < 2^-13.5 (xl - n*c3 is below 2^-43, its own rounding negligible).
    r = ((x - n * c["c1"]) - n * c["c2"]) + (xl - n * c["c3"])
    # exp(r) - 1 = r + r^2/2 + r^3/6 + r^4/24 + O(2^-74); the sum rounds by 2^-66.5.
    s = r + (r * r) * (0.5 + r * (1.0 / 6 + r * (1.0 / 24)))
    ni = xp.astype(n, xp.int64)
    j = ni & (2**_TABLE_BITS - 1)
    th = _take(c["hi"], j, xp=xp, device=device)
    tl = _take(c["lo"], j, xp=xp, device=device)
    # (th + tl)(1 + s) = th + th*s + tl + tl*s: th*s rounds by u |s| th (2^-66.5 th), the
    # sum th + th*s is exact by FastTwoSum.
    eh, el = fast_two_sum(th, th * s)
    el = el + (tl + tl * s)
    p2 = _take(c["pow2"], (ni >> _TABLE_BITS) + 1022, xp=xp, device=device)
    # Outside [-708, 708] (and for NaN) the library's exp: 0, subnormal, inf or NaN.
    return xp.where(valid, eh * p2, xp.exp(xh)), xp.where(valid, el * p2, zero)


def log_df(zh: Any, zl: Any, *, xp: Any) -> tuple[Any, Any]:
    """``log(zh + zl)`` as a double-float, for ``zh > 0``.

    One Newton step on the library's ``log``: with ``y0 = log(zh)`` and ``e = exp(y0)`` in
    double-float, ``log(z) = y0 + log(1 + d)``, ``d = (z - e)/e = O(u)``, and dropping
    ``d^2/2`` costs O(u^2). The error is that of ``exp_df`` (below 2^-64 absolute, for
    z up to e^669) plus O(u^2 |log z|).
    """
    y0 = xp.log(zh)
    eh, el = exp_df(y0, xp.zeros_like(y0), xp=xp)
    # zh - eh is exact (Sterbenz: e is within a few ulp of z).
    d = ((zh - eh) + (zl - el)) / eh
    return fast_two_sum(y0, d)


# ------------------------------------------------ double-float sums and products


def sum_df(hi: Any, lo: Any, *, axis: int, xp: Any) -> tuple[Any, Any]:
    """Sum of a double-float array over one axis, as a double-float (pairwise TwoSum).

    The high parts are added pairwise with TwoSum, the errors and low parts with
    ordinary additions; with n terms the result is within ``(log2 n + 2) u^2 sum|x|`` of
    the exact sum.
    """
    if axis not in (-1, hi.ndim - 1):
        axes = [i for i in range(hi.ndim) if i != axis % hi.ndim] + [axis % hi.ndim]
        hi, lo = (xp.permute_dims(x, tuple(axes)) for x in (hi, lo))
    lo = xp.zeros_like(hi) + lo  # lo may be a broadcastable scalar
    while hi.shape[-1] > 1:
        if hi.shape[-1] % 2:
            pad = xp.zeros((*hi.shape[:-1], 1), dtype=hi.dtype, device=hi.device)
            hi, lo = xp.concat((hi, pad), axis=-1), xp.concat((lo, pad), axis=-1)
        hi, e = two_sum(hi[..., 0::2], hi[..., 1::2])
        lo = (lo[..., 0::2] + lo[..., 1::2]) + e
    if hi.shape[-1] == 0:
        zero = xp.zeros(hi.shape[:-1], dtype=hi.dtype, device=hi.device)
        return zero, zero
    return two_sum(hi[..., 0], lo[..., 0])


def _sum_to_shape_df(hi: Any, lo: Any, shape: tuple[int, ...], *, xp: Any) -> tuple[Any, Any]:
    # The adjoint of broadcasting (sum over the axes an array of `shape` was stretched
    # along), in double-float.
    while hi.ndim > len(shape):
        hi, lo = sum_df(hi, lo, axis=0, xp=xp)
    for axis, n in enumerate(shape):
        if n == 1 and hi.shape[axis] != 1:
            hi, lo = sum_df(hi, lo, axis=axis, xp=xp)
            hi, lo = (xp.expand_dims(x, axis=axis) for x in (hi, lo))
    return hi, lo


def _mul_df(xh: Any, xl: Any, ch: Any, cl: Any, *, xp: Any) -> tuple[Any, Any]:
    # (xh + xl) * (ch + cl), to O(u^2); ch, cl Python floats or arrays.
    c = xp.asarray(ch, dtype=xh.dtype, device=xh.device) if isinstance(ch, float) else ch
    p, e = two_product(xh, c)
    return fast_two_sum(p, e + (xh * cl + xl * ch))
