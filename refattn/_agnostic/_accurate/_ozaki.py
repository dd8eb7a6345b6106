"""Error-free matrix products of Ozaki et al.: operands cut into slices whose pairwise
products, summed over the inner length, are exact in float64."""

from __future__ import annotations

from typing import Any

from ._eft import (
    fast_two_sum,
    two_sum,
)

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
