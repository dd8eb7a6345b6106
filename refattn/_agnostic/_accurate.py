"""Error-free transformations and the compensated attention path (``precision="compensated"``).

A plain float64 attention rounds every logit ``scale * q.k`` with an absolute error that
grows with ``|q||k|``, and ``exp`` turns that absolute error into a relative error of the
weight: with logits of a few hundred the output is off by hundreds of ulp. This module
carries every quantity that is exponentiated or accumulated as a *double-float*, an
unevaluated sum ``hi + lo`` of two float64 numbers (about 106 bits), and rounds once at the
end:

* logits: ``scale * q`` as an exact ``TwoProduct``, then ``q @ k^T`` by the error-free
  matrix product of Ozaki et al. (each operand cut into slices whose pairwise products,
  summed over the head dim, are exact in float64, so the work stays in ordinary matmuls);
* the bias, the row maximum and the masks in double-float (``TwoSum``);
* ``exp`` of a double-float in double-float (Tang's table method; the library's ``exp``,
  itself off by up to an ulp, is not used);
* the normaliser and ``P @ V`` by the same error-free matrix product, the LSE by one Newton
  step on the library's ``log``, and the final division in double-float;
* the backward (``compensated_backward``) likewise, every product and sum error-free or
  compensated.

Query rows are processed in chunks of about ``_CHUNK_SCORES`` scores, which bounds the
memory and keeps the many temporaries small enough to be recycled.

Only the array API standard is used, so the path runs on every backend. The small helpers
(``two_sum``, ``split``, ``two_product`` ...) use arithmetic operators only; they work on
arrays of any library and on Python floats alike and need no namespace. They assume
round-to-nearest float64 arithmetic without contraction of ``a * b + c`` into an FMA, which
holds for elementwise array operations (each is its own kernel).

References: T. Ogita, S. M. Rump, S. Oishi, "Accurate sum and dot product", SIAM J. Sci.
Comput. 26 (2005); K. Ozaki, T. Ogita, S. Oishi, S. M. Rump, "Error-free transformations of
matrix multiplication by using fast routines of matrix multiplication and its
applications", Numer. Algorithms 59 (2012); P. T. P. Tang, "Table-driven implementation of
the exponential function in IEEE floating-point arithmetic", ACM TOMS 15 (1989).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from decimal import Context, Decimal
from typing import TYPE_CHECKING, Any

from .._results import AttentionGrads, AttentionResult
from .._types import Array

if TYPE_CHECKING:
    from .._problem import AttentionProblem

__all__ = [
    "compensated_attention",
    "compensated_backward",
    "exp_df",
    "fast_two_sum",
    "log_df",
    "matmul_df",
    "next_power_of_two",
    "slice_bits",
    "split",
    "sum_df",
    "two_product",
    "two_sum",
]

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


# ------------------------------------------------------ error-free matrix products


def slice_bits(n: int) -> int:
    """Bits per Ozaki slice so that a sum of ``n`` products of two slices is exact.

    A slice holds integers of at most ``b`` bits times a per-row power of two, so a
    product of two has ``2b`` bits on a common grid and a sum of ``n`` of them needs
    ``2b + ceil(log2 n) <= 53`` bits: exact in float64 whatever order the matmul
    accumulates in.

    Examples
    --------
    >>> slice_bits(64), slice_bits(512), slice_bits(1)
    (23, 22, 26)
    """
    return (53 - max(n - 1, 0).bit_length()) // 2


def next_power_of_two(p: Any, *, xp: Any) -> Any:
    """Smallest power of two ``>= p`` for ``p >= 0`` (0 for 0), exactly, without logs.

    Rump, Ogita and Oishi's NextPowerTwo: for ``q = p / u`` the rounding of ``q + p``
    lands on a neighbour of ``q`` whose distance is that power of two; ``p`` itself when
    it already is one. Valid for ``p < 2^970`` (``p / u`` must not overflow).
    """
    q = p * 2.0**53
    step = xp.abs((q + p) - q)
    return xp.where(step == 0, p, step)


def _slices(x: Any, *, axis: int, bits: int, bound: Any, xp: Any) -> tuple[Any, Any, Any]:
    # Ozaki/Rump's ExtractScalar twice: x = x1 + x2 + rest exactly, where x1 (x2) holds
    # integer multiples of bound * 2^-bits (2^-2 bits) of magnitude <= bound (bound 2^-bits).
    # Adding sigma = 0.75 * 2^(53 - bits) * bound lands x + sigma in a binade whose ulp is
    # bound * 2^-bits, so the rounding of that sum is the extraction.
    if x.shape[axis] == 0:
        return x, x, x
    if bound is None:
        bound = next_power_of_two(xp.max(xp.abs(x), axis=axis, keepdims=True), xp=xp)
    sigma = bound * (0.75 * 2.0 ** (53 - bits))
    x1 = (x + sigma) - sigma
    rest = x - x1
    sigma = sigma * 2.0**-bits
    x2 = (rest + sigma) - sigma
    return x1, x2, rest - x2


def _b_parts3(b: Any, *, bits: int, xp: Any) -> tuple[Any, Any, Any]:
    # The right operand of _product_df, sliced per column (b = b1 + b2 + br exactly) and
    # stacked as the products need it; computed once and shared by every row chunk.
    b1, b2, br = _slices(b, axis=-2, bits=bits, bound=None, xp=xp)
    return b1, xp.concat((b2, b1), axis=-2), xp.concat((br, b - b1, b), axis=-2)


def _b_slices(b: Any, *, bits: int, xp: Any) -> tuple[Any, Any, Any, Any, Any]:
    # The right operand of _product3_df: b = b1 + b2 + br per column, b - b1, and b.
    b1, b2, br = _slices(b, axis=-2, bits=bits, bound=None, xp=xp)
    return b1, b2, br, b - b1, b


def _product_df(
    a: tuple[Any, Any, Any], bp: tuple[Any, Any, Any], *, xp: Any
) -> tuple[Any, Any]:
    # (a1 + a2 + a_rest) @ b as a double-float, a and b = bp (_b_parts3) sliced with the
    # same `bits` = slice_bits(2n). a1@b1 is exact; so is a1@b2 + a2@b1, one matmul of
    # inner length 2n on a common grid; the rest, a1@br + a2@(b - b1) + a_rest@b, is
    # below 2^(1 - 2 bits) of sum |a||b| and rounds by O(n u 2^-2bits) of it. The a side
    # is concatenated, so it should be the small operand.
    a1, a2, a_rest = a
    b1, b_mid, b_rest = bp
    mid = xp.concat((a1, a2), axis=-1) @ b_mid
    rest = xp.concat((a1, a2, a_rest), axis=-1) @ b_rest
    hi, lo = two_sum(a1 @ b1, mid)
    return fast_two_sum(hi, lo + rest)


def _product3_df(
    a: tuple[Any, Any, Any], bs: tuple[Any, Any, Any, Any, Any], b_lo: Any, *, xp: Any
) -> tuple[Any, Any]:
    # (a1 + a2 + a3) @ (b + b_lo) as a double-float, for a large operand a sliced with
    # `bits` (a3 the rest) and b = bs (_b_slices, same bits): separate matmuls, none of
    # them on a concatenated copy of a. a1@b1 is exact, a1@b2 and a2@b1 are exact but
    # added with one rounding (u 2^-bits of sum|a||b|), the rest is below 2^(1 - 2 bits)
    # of sum|a||b| (plus n 2^-2bits bound(a) max|b| for a3) and rounds by n u of it:
    # within (16 n^3 + 2) u^2 of sum|a| max|b| and n bound(a) max|b| together.
    a1, a2, a3 = a
    b1, b2, br, b_minus, b = bs
    rest = (a1 @ br + a2 @ b_minus) + a3 @ b
    if b_lo is not None:
        rest = rest + a1 @ b_lo
    hi, lo = two_sum(a1 @ b1, a1 @ b2 + a2 @ b1)
    return fast_two_sum(hi, lo + rest)


def matmul_df(ah: Any, al: Any, b: Any, *, xp: Any) -> tuple[Any, Any]:
    """``(ah + al) @ b`` as a double-float by the error-free product of Ozaki et al.

    ``ah`` is cut into slices per row, ``b`` per column; ``al`` (None or below an ulp of
    ``ah``) joins the ordinary matmul of the small terms. With ``n`` the inner length
    and ``A_i``, ``B_j`` the powers of two above the largest ``|a_i.|`` and ``|b_.j|``,
    the error is at most ``(30 n^3 + 2) u^2 A_i B_j`` (u = 2^-53), next to
    ``n u A_i B_j`` for a plain matmul: three matmuls, of inner lengths n, 2n and 3n.
    """
    bits = slice_bits(2 * ah.shape[-1])
    return _product_df(_a_parts(ah, al, bits=bits, xp=xp), _b_parts3(b, bits=bits, xp=xp), xp=xp)


def _a_parts(ah: Any, al: Any, *, bits: int, xp: Any) -> tuple[Any, Any, Any]:
    # The left operand's slices per row; al joins the rest (rounding u 2^-2bits of |a|,
    # far below what the results need).
    a1, a2, ar = _slices(ah, axis=-1, bits=bits, bound=None, xp=xp)
    return a1, a2, ar if al is None else ar + al


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


# ----------------------------------------------------------------- the attention path

# Query rows are processed in chunks of about this many score entries (4 MiB arrays):
# the double-float work makes a few dozen temporaries per score, and arrays this size
# are recycled by the allocator instead of being mapped afresh (three times faster on
# NumPy), while memory stays bounded whatever L is.
_CHUNK_SCORES = 2**19


def _group_rows(x: Any, heads: int, *, xp: Any) -> Any:
    # (..., H, L, D) -> (..., heads, G*L, D), G = H // heads: the query heads that share a
    # key/value head become one taller matrix, so matmul broadcasting does GQA.
    *lead, h, l_, d = x.shape
    return xp.reshape(x, (*lead, heads, (h // heads) * l_, d))


def _ungroup_rows(x: Any, H: int, *, xp: Any) -> Any:
    *lead, kh, gl, d = x.shape
    return xp.reshape(x, (*lead, H, (kh * gl) // H, d))


def _sum_groups_df(hi: Any, lo: Any, heads: int, *, xp: Any) -> tuple[Any, Any]:
    # (..., H, S, D) -> (..., heads, S, D), summing each group of H // heads query heads.
    *lead, h, s, d = hi.shape
    if h == heads:
        return hi, lo
    hi, lo = (xp.reshape(x, (*lead, heads, h // heads, s, d)) for x in (hi, lo))
    return sum_df(hi, lo, axis=-3, xp=xp)


def _accumulate(acc: tuple[Any, Any] | None, hi: Any, lo: Any) -> tuple[Any, Any]:
    # Double-float running sum over row chunks.
    if acc is None:
        return hi, lo
    h, e = two_sum(acc[0], hi)
    return h, (acc[1] + lo) + e


def _dropout_factor(dropout_p: float) -> tuple[float, float]:
    # 1 / (1 - p) as a double-float of Python floats; 1 - p itself is exact by TwoSum.
    ch, cl = two_sum(1.0, -float(dropout_p))
    return _df_div(1.0, 0.0, ch, cl)


def _row_chunks(q: Any, S: int) -> list[slice]:
    L = q.shape[-2]
    per = max(1, _CHUNK_SCORES // max(1, math.prod(q.shape[:-2]) * S))
    return [slice(i, min(i + per, L)) for i in range(0, L, per)] or [slice(0, 0)]


def _rows(x: Any, rows: slice, L: int) -> Any:
    # The rows of an optional (..., L or 1, S) array (mask, bias, keep) for one chunk.
    if x is None or x.ndim < 2 or x.shape[-2] != L or L == 1:
        return x
    return x[..., rows, :]


@dataclass
class _Side:
    """What keys and values contribute, sliced once for every row chunk."""

    k_parts: tuple[Any, Any, Any]  # k^T for the logits (_b_parts3, bits s_bits)
    s_bits: int
    v_slices: tuple[Any, Any, Any, Any, Any]  # v for P @ V (_b_slices, bits w_bits)
    w_bits: int
    K: int
    Kv: int
    S: int


def _side(k: Any, v: Any, rows: int, *, xp: Any) -> _Side:
    s_bits = slice_bits(2 * k.shape[-1])
    # Weights are sliced once for P @ V (inner length S) and, in the backward,
    # P^T dO (inner length: the chunk's rows).
    w_bits = slice_bits(max(k.shape[-2], rows, 1))
    return _Side(
        k_parts=_b_parts3(xp.matrix_transpose(k), bits=s_bits, xp=xp), s_bits=s_bits,
        v_slices=_b_slices(v, bits=w_bits, xp=xp), w_bits=w_bits,
        K=k.shape[-3], Kv=v.shape[-3], S=k.shape[-2],
    )


@dataclass
class _Forward:
    """One row chunk of the compensated forward pass, double-floats as (hi, lo)."""

    wh: Any  # exp(score - shift) (..., H, rows, S), before dropout and before the "nan"
    wl: Any  # policy (0 on fully masked rows then)
    w: tuple[Any, Any, Any]  # wh + wl in three Ozaki slices (w_bits), keep applied
    zh: Any  # row sums of w (..., rows, 1); 1 where the row is empty
    zl: Any
    nh: Any  # (w * keep) @ v (..., rows, Ev)
    nl: Any
    lse: Any  # float (..., rows), -inf on fully masked rows
    row_masked: Any  # (..., rows, 1) bool


def _forward(
    q: Any, side: _Side, *, scale: float, bias: Any, allowed: Any, keep: Any,
    masked_rows: str, xp: Any,
) -> _Forward:
    dtype, device = q.dtype, q.device
    H, S, K = q.shape[-3], side.S, side.K
    zero = xp.asarray(0.0, dtype=dtype, device=device)
    neg_inf = xp.asarray(-xp.inf, dtype=dtype, device=device)

    # scale * q = qh + ql exactly (TwoProduct); then the error-free product with k^T, q's
    # slices the small, concatenated side; GQA groups of query heads as taller matrices.
    qh, ql = two_product(q, xp.asarray(float(scale), dtype=dtype, device=device))
    qh, ql = (_group_rows(x, K, xp=xp) for x in (qh, ql))
    sh, sl = _product_df(_a_parts(qh, ql, bits=side.s_bits, xp=xp), side.k_parts, xp=xp)
    sh, sl = (_ungroup_rows(x, H, xp=xp) for x in (sh, sl))
    ok = allowed  # None or bool: False marks a masked score
    if bias is not None:
        # -inf entries mask; they enter as 0, so the TwoSum never meets inf - inf.
        finite = xp.isfinite(bias)
        sh, t = two_sum(sh, xp.where(finite, bias, zero))
        sl = sl + t
        ok = finite if ok is None else xp.logical_and(ok, finite)

    # Any shift near the row maximum keeps exp in range; the shift is exact (a float) and
    # the subtraction is carried in double-float, so the choice costs no accuracy.
    if S:
        shift = xp.max(sh if ok is None else xp.where(ok, sh, neg_inf), axis=-1, keepdims=True)
    else:
        shift = xp.full((*sh.shape[:-1], 1), -xp.inf, dtype=dtype, device=device)
    row_masked = shift == neg_inf
    shift = xp.where(row_masked, zero, shift)
    xh, t = two_sum(sh, -shift)
    xl = t + sl
    if ok is not None:
        xh = xp.where(ok, xh, neg_inf)  # exp_df gives exactly 0 there
    if masked_rows == "uniform":
        # Weight 1 on every key of a fully masked row: its output is the mean of V.
        xh = xp.where(row_masked, zero, xh)
        xl = xp.where(row_masked, zero, xl)
    wh, wl = exp_df(xh, xl, xp=xp)

    # Weights lie in [0, 1 + 2^-40]: one fixed bound (2) serves every row, so the
    # slicing is element-wise and serves P @ V and the backward's P^T dO alike.
    w1, w2, w3 = _slices(wh, axis=-1, bits=side.w_bits,
                         bound=xp.asarray(2.0, dtype=dtype, device=device), xp=xp)
    w3 = w3 + wl  # rounds by u 2^-2bits: far below what the results need
    # The sums of w1 and w2 are exact (at most S terms of w_bits bits on one grid).
    zh, zl = two_sum(xp.sum(w1, axis=-1, keepdims=True), xp.sum(w2, axis=-1, keepdims=True))
    zh, zl = fast_two_sum(zh, zl + xp.sum(w3, axis=-1, keepdims=True))
    # Fully masked rows have z = 0 (but under the "uniform" policy): divide them by 1.
    zh = xp.where(zh == 0, xp.ones_like(zh), zh)
    lh, ll = log_df(zh, zl, xp=xp)
    lh, t = two_sum(shift, lh)
    lse = xp.where(row_masked, neg_inf, lh + (t + ll))[..., 0]
    if masked_rows == "nan":
        # The plain softmax's NaN weights; like the standard path, dropout's keep-mask
        # then zeroes the dropped ones (a NaN row that drops every key gives 0). wh
        # itself stays finite: z is formed from it.
        w1 = xp.where(row_masked, xp.asarray(xp.nan, dtype=dtype, device=device), w1)
    if keep is not None:
        w1, w2, w3 = (xp.where(keep, x, zero) for x in (w1, w2, w3))

    parts = tuple(_group_rows(x, side.Kv, xp=xp) for x in (w1, w2, w3))
    nh, nl = _product3_df(parts, side.v_slices, None, xp=xp)
    return _Forward(
        wh=wh, wl=wl, w=(w1, w2, w3), zh=zh, zl=zl,
        nh=_ungroup_rows(nh, H, xp=xp), nl=_ungroup_rows(nl, H, xp=xp), lse=lse,
        row_masked=row_masked,
    )


def compensated_attention(problem: AttentionProblem, *, need_weights: bool
                          ) -> AttentionResult:
    """Attention with double-float logits, exponentials and sums; one rounding at the end.

    The problem and semantics of ``direct_attention`` (q, k, v float64), plus
    ``need_weights``: the weights, a double-float division per score, are only formed
    when asked for (``AttentionResult.weights`` is None otherwise). Query rows are
    processed in chunks, so the extra memory is bounded (a few dozen arrays of
    ``_CHUNK_SCORES`` entries) whatever L is.

    Error (first order, u = 2^-53): a logit is off by at most
    ``delta = (60 E^3 + 12 E + 32) u^2 C``, ``C = |scale| max|q| max|k| + max|bias|``, a
    weight by ``eps <= 2^-64 + delta`` relative, the output by
    ``ulp(out)/2 + (2 eps + u 2^-b) max|V| / (1 - p)`` with ``b = slice_bits(S)``, the
    LSE by ``ulp(lse)/2 + 2^-63 + delta``: about half an ulp of max|V| for E <= 256,
    S <= 4096, C <= 2^12. The derivation is in docs/accuracy.rst.
    """
    q, k, v, xp, scale = problem.q, problem.k, problem.v, problem.xp, problem.scale
    bias, allowed, keep = problem.bias_with_alibi, problem.visible, problem.keep
    dropout_p, masked_rows = problem.dropout_p, problem.masked_rows
    L, S = q.shape[-2], k.shape[-2]
    chunks = _row_chunks(q, S)
    side = _side(k, v, chunks[0].stop - chunks[0].start, xp=xp)
    factor = _dropout_factor(dropout_p) if keep is not None and dropout_p < 1.0 else None
    outs, lses, weights = [], [], []
    for rows in chunks:
        f = _forward(q[..., rows, :], side, scale=scale, bias=_rows(bias, rows, L),
                     allowed=_rows(allowed, rows, L), keep=_rows(keep, rows, L),
                     masked_rows=masked_rows, xp=xp)
        lses.append(f.lse)
        if S == 0:
            # No keys: there is nothing to weigh, every policy gives the empty sum 0.
            outs.append(f.nh)
            weights.append(f.wh)
            continue
        if keep is not None and dropout_p >= 1.0:
            outs.append(xp.zeros_like(f.nh))
        else:
            # out = n / (z (1 - p)): divide by z, then multiply by 1/(1 - p).
            oh, ol = _df_div(f.nh, f.nl, f.zh, f.zl)
            if factor is not None:
                oh, ol = _mul_df(oh, ol, *factor, xp=xp)
            outs.append(oh + ol)
        if need_weights:
            ph, pl = _df_div(f.wh, f.wl, f.zh, f.zl)
            w = ph + pl
            if masked_rows == "nan":
                w = xp.where(f.row_masked, xp.asarray(xp.nan, dtype=w.dtype, device=w.device), w)
            weights.append(w)
    return AttentionResult(
        out=xp.concat(outs, axis=-2), lse=xp.concat(lses, axis=-1),
        weights=xp.concat(weights, axis=-2) if need_weights else None,
    )


def compensated_backward(problem: AttentionProblem, grad_out: Array) -> AttentionGrads:
    """The gradients of ``direct_backward`` with double-float intermediates.

    With w the unnormalised weights and z their row sums from the compensated forward
    (P = w / z), ``dP = dO V^T``, ``D = rowsum(P dP keep) = dO . n / z`` (n the forward's
    numerator: a product over Ev, not over S) and ``G = w (dP keep - D) = z dS (1 - p)``;
    then ``dQ = scale G K / z``, ``dK = scale G^T (Q / z)``, ``dV = (w keep)^T (dO / z)``
    and ``d bias = G / z``, all divided by 1 - p. Every product is an error-free Ozaki
    product, G a TwoProduct, the sums over row chunks, grouped heads and broadcast axes
    compensated; each gradient is rounded once. Same arguments and conventions as
    ``direct_backward`` (without the saved ``out``/``lse``: they would carry the rounding
    this path avoids).
    """
    q, k, v, xp, scale = problem.q, problem.k, problem.v, problem.xp, problem.scale
    bias, allowed, keep = problem.bias_with_alibi, problem.visible, problem.keep
    dropout_p, masked_rows = problem.dropout_p, problem.masked_rows
    dtype, device = q.dtype, q.device
    zero = xp.asarray(0.0, dtype=dtype, device=device)
    H, K, Kv, L, S = q.shape[-3], k.shape[-3], v.shape[-3], q.shape[-2], k.shape[-2]
    # No keys (the output is the constant 0) or dropout_p = 1 (the output is identically
    # zero): nothing flows back.
    if (keep is not None and dropout_p >= 1.0) or S == 0:
        dq, dk, dv = (xp.zeros(x.shape, dtype=dtype, device=device) for x in (q, k, v))
        dbias = None if bias is None else xp.zeros(bias.shape, dtype=dtype, device=device)
        return AttentionGrads(dq=dq, dk=dk, dv=dv, dbias=dbias)
    ch, cl = _dropout_factor(dropout_p) if keep is not None else (1.0, 0.0)
    chunks = _row_chunks(q, S)
    side = _side(k, v, chunks[0].stop - chunks[0].start, xp=xp)
    vt_bits = slice_bits(2 * v.shape[-1])
    vt_parts = _b_parts3(xp.matrix_transpose(v), bits=vt_bits, xp=xp)  # for dP = dO V^T
    q_bits = slice_bits(S)
    k_slices = _b_slices(k, bits=q_bits, xp=xp)  # for dQ = G K
    bias_rows = bias is not None and bias.ndim >= 2 and bias.shape[-2] == L and L != 1

    dq_rows, db_rows = [], []
    dv_acc = dk_acc = db_acc = None
    for rows in chunks:
        q_r, go = q[..., rows, :], grad_out[..., rows, :]
        keep_r = _rows(keep, rows, L)
        f = _forward(q_r, side, scale=scale, bias=_rows(bias, rows, L),
                     allowed=_rows(allowed, rows, L), keep=keep_r, masked_rows=masked_rows,
                     xp=xp)
        zh, zl, nh, nl = f.zh, f.zl, f.nh, f.nl

        # dV += (w keep)^T (dO / z), per query head (inner length: the chunk's rows).
        gh, gl = _df_div(go, zero, zh, zl)
        part = _product3_df(tuple(xp.matrix_transpose(x) for x in f.w),
                            _b_slices(gh, bits=side.w_bits, xp=xp), gl, xp=xp)
        dv_acc = _accumulate(dv_acc, *part)

        # dP = dO V^T (before dropout's keep), and D (1 - p) = rowsum(P dP keep) = dO.n/z.
        dph, dpl = _product_df(_a_parts(_group_rows(go, Kv, xp=xp), None, bits=vt_bits, xp=xp),
                               vt_parts, xp=xp)
        dph, dpl = (_ungroup_rows(x, H, xp=xp) for x in (dph, dpl))
        if keep_r is not None:
            dph, dpl = (xp.where(keep_r, x, zero) for x in (dph, dpl))
        th, tl = two_product(go, nh)
        eh, el = sum_df(th, tl + go * nl, axis=-1, xp=xp)
        dh, dl = _df_div(eh[..., None], el[..., None], zh, zl)
        # G = w (dP keep - D (1 - p)) = z dS (1 - p).
        rh, rl = two_sum(dph, -dh)
        rl = rl + (dpl - dl)
        Gh, Gl = two_product(f.wh, rh)
        Gh, Gl = fast_two_sum(Gh, Gl + (f.wh * rl + f.wl * rh))
        if masked_rows == "uniform":
            # Weights 1/S on fully masked rows are constants of q, k and bias.
            Gh, Gl = (xp.where(f.row_masked, zero, x) for x in (Gh, Gl))
        elif masked_rows == "nan":
            # The plain softmax's NaN propagates through its gradient.
            Gh = xp.where(f.row_masked, xp.asarray(xp.nan, dtype=dtype, device=device), Gh)

        # dQ rows = G K / z: G sliced per query row (inner length S).
        parts = _a_parts(Gh, Gl, bits=q_bits, xp=xp)
        dqh, dql = _product3_df(tuple(_group_rows(x, K, xp=xp) for x in parts), k_slices,
                                None, xp=xp)
        dqh, dql = (_ungroup_rows(x, H, xp=xp) for x in (dqh, dql))
        dq_rows.append(_df_div(dqh, dql, zh, zl))

        # dK += G^T (Q / z): G sliced per key column (inner length: the chunk's rows).
        r_bits = slice_bits(rows.stop - rows.start)
        g1, g2, gr = _slices(Gh, axis=-2, bits=r_bits, bound=None, xp=xp)
        parts = tuple(xp.matrix_transpose(x) for x in (g1, g2, gr + Gl))
        qzh, qzl = _df_div(q_r, zero, zh, zl)
        part = _product3_df(parts, _b_slices(qzh, bits=r_bits, xp=xp), qzl, xp=xp)
        dk_acc = _accumulate(dk_acc, *part)

        if bias is not None:
            bh, bl = _df_div(Gh, Gl, zh, zl)
            if bias_rows:
                shape = (*bias.shape[:-2], rows.stop - rows.start, bias.shape[-1])
                db_rows.append(_sum_to_shape_df(bh, bl, shape, xp=xp))
            else:
                db_acc = _accumulate(db_acc, *_sum_to_shape_df(bh, bl, tuple(bias.shape),
                                                               xp=xp))

    # The common factors: scale / (1 - p) of dQ and dK, 1 / (1 - p) of dV and d bias.
    sh_, sl_ = two_product(float(scale), ch)
    sh_, sl_ = fast_two_sum(sh_, sl_ + float(scale) * cl)

    def rounded(hi: Any, lo: Any, shape: tuple[int, ...], c: tuple[Any, Any]) -> Any:
        hi, lo = _sum_to_shape_df(hi, lo, shape, xp=xp)
        hi, lo = _mul_df(hi, lo, *c, xp=xp)
        return hi + lo

    dq = rounded(xp.concat([x[0] for x in dq_rows], axis=-2),
                 xp.concat([x[1] for x in dq_rows], axis=-2), tuple(q.shape), (sh_, sl_))
    assert dk_acc is not None and dv_acc is not None  # there is at least one chunk
    dkh, dkl = _sum_groups_df(dk_acc[0], dk_acc[1], K, xp=xp)
    dk = rounded(dkh, dkl, tuple(k.shape), (sh_, sl_))
    dvh, dvl = _sum_groups_df(dv_acc[0], dv_acc[1], Kv, xp=xp)
    dv = rounded(dvh, dvl, tuple(v.shape), (ch, cl))
    dbias = None
    if bias is not None:
        if bias_rows:
            db_acc = (xp.concat([x[0] for x in db_rows], axis=-2),
                      xp.concat([x[1] for x in db_rows], axis=-2))
        assert db_acc is not None
        dbias = rounded(db_acc[0], db_acc[1], tuple(bias.shape), (ch, cl))
    return AttentionGrads(dq=dq, dk=dk, dv=dv, dbias=dbias)
