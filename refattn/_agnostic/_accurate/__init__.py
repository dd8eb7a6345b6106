"""Error-free transformations and the compensated attention path (``precision="compensated"``).

A plain float64 attention rounds every logit ``scale * q.k`` with an absolute error that
grows with ``|q||k|``, and ``exp`` turns that absolute error into a relative error of the
weight: with logits of a few hundred the output is off by hundreds of ulp. This package
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

from ._attention import compensated_attention, compensated_backward
from ._eft import (
    exp_df,
    fast_two_sum,
    log_df,
    split,
    sum_df,
    two_product,
    two_sum,
)
from ._ozaki import _slices as _slices  # private, checked directly by the package's tests
from ._ozaki import (
    matmul_df,
    next_power_of_two,
    slice_bits,
)

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
