"""``precision="compensated"``: error-free transformations and their error bounds.

Ground truth: Python's exact rationals (``fractions.Fraction``) for the error-free
transformations, mpmath for ``exp``/``log``, and ``refattn.testing.exact_attention``
(itself checked against an independent scalar mpmath reference in test_exact.py) for
attention. Every bound is derived in the comment or docstring next to it; u = 2^-53.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import array_api_compat.numpy as xnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refattn
from refattn._agnostic import _accurate as acc
from refattn.testing import exact_attention
from tests.helpers.cases import Case, exact_cases

mpmath = pytest.importorskip("mpmath")

U = 2.0**-53

finite = st.floats(-(2.0**900), 2.0**900, allow_nan=False, allow_infinity=False)
moderate = st.floats(-(2.0**400), 2.0**400, allow_nan=False, allow_infinity=False).filter(
    lambda x: x == 0 or abs(x) > 2.0**-400
)


# --- error-free transformations --------------------------------------------------------


@given(a=finite, b=finite)
def test_two_sum_is_exact(a: float, b: float) -> None:
    s, e = acc.two_sum(np.float64(a), np.float64(b))
    assert s == a + b
    assert Fraction(s) + Fraction(e) == Fraction(a) + Fraction(b)


@given(a=finite, b=finite)
def test_fast_two_sum_is_exact_when_ordered(a: float, b: float) -> None:
    a, b = (a, b) if abs(a) >= abs(b) else (b, a)
    s, e = acc.fast_two_sum(np.float64(a), np.float64(b))
    assert Fraction(s) + Fraction(e) == Fraction(a) + Fraction(b)


def _bits(x: float) -> int:
    # Significant bits of x: the length of its odd integer mantissa.
    if x == 0:
        return 0
    n, d = Fraction(x).as_integer_ratio()
    n = abs(n)
    while n % 2 == 0:
        n //= 2
    return n.bit_length()


@given(a=st.floats(-(2.0**990), 2.0**990, allow_nan=False))
def test_split_halves_have_26_bits(a: float) -> None:
    hi, lo = acc.split(np.float64(a))
    assert Fraction(hi) + Fraction(lo) == Fraction(a)
    # Veltkamp: hi takes 26 bits and lo the remaining 27 less the one its sign absorbs.
    assert _bits(hi) <= 26 and _bits(lo) <= 26


@given(a=moderate, b=moderate)
def test_two_product_is_exact(a: float, b: float) -> None:
    p, e = acc.two_product(np.float64(a), np.float64(b))
    assert p == a * b
    assert Fraction(p) + Fraction(e) == Fraction(a) * Fraction(b)


@given(p=st.floats(0.0, 2.0**969, allow_nan=False))
def test_next_power_of_two(p: float) -> None:
    got = float(acc.next_power_of_two(np.asarray([p]), xp=xnp)[0])
    if p == 0:
        assert got == 0
    else:
        m, e = math.frexp(p)  # p = m 2^e, m in [0.5, 1)
        assert got == (p if m == 0.5 else math.ldexp(1.0, e))


def test_slice_bits_is_the_largest_exact_width() -> None:
    # A sum of n products of two b-bit integers is below n 2^(2b): exact in float64 while
    # that is at most 2^53, and the width is the largest one that keeps it so.
    for n in [*range(1, 300), 511, 512, 513, 4096, 10**5]:
        b = acc.slice_bits(n)
        assert 2 * b + math.ceil(math.log2(n)) <= 53 < 2 * (b + 1) + math.ceil(math.log2(n))


@given(
    rows=st.integers(1, 3), n=st.integers(1, 70), cols=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1), spread=st.sampled_from([0, 30, 300]),
)
def test_slices_and_matmul_df(rows: int, n: int, cols: int, seed: int, spread: int) -> None:
    """The Ozaki product against the exact rational product.

    Per entry (i, j), with A_i >= max|a_i| and B_j >= max|b_j| the powers of two the
    slicing uses and b = slice_bits(2n): the terms left to the ordinary matmul are below
    1.25 n 2^-2b A_i B_j in sum and are rounded by at most 3n u of that; 2^-2b <= 8n u;
    the final additions add 2u^2 of the result. So |hi + lo - a@b| <= (30 n^3 + 2) u^2
    A_i B_j.
    """
    rng = np.random.default_rng(seed)
    # Entries spread over 2^-spread .. 2^spread in magnitude, signs mixed.
    a = rng.standard_normal((rows, n)) * 2.0 ** rng.integers(-spread, spread + 1, (rows, n))
    b = rng.standard_normal((n, cols)) * 2.0 ** rng.integers(-spread, spread + 1, (n, cols))
    bits = acc.slice_bits(2 * n)
    for x, axis in ((a, -1), (b, -2)):
        x1, x2, xr = acc._slices(x, axis=axis, bits=bits, bound=None, xp=xnp)
        assert np.array_equal(x1 + x2 + xr, x)  # the splitting itself is exact
        bound = acc.next_power_of_two(np.max(np.abs(x), axis=axis, keepdims=True), xp=xnp)
        grid = np.where(bound == 0, 1.0, bound * 2.0**-bits)
        assert np.array_equal(np.round(x1 / grid), x1 / grid)  # integers of <= bits bits
        assert np.all(np.abs(x1) <= bound)
    hi, lo = acc.matmul_df(a, None, b, xp=xnp)
    A = acc.next_power_of_two(np.max(np.abs(a), axis=-1), xp=xnp)
    B = acc.next_power_of_two(np.max(np.abs(b), axis=0), xp=xnp)
    for i in range(rows):
        for j in range(cols):
            exact = sum(Fraction(a[i, e]) * Fraction(b[e, j]) for e in range(n))
            err = abs(Fraction(hi[i, j]) + Fraction(lo[i, j]) - exact)
            assert err <= (30 * n**3 + 2) * Fraction(U) ** 2 * Fraction(A[i]) * Fraction(B[j])


# --- exp and log in double-float -------------------------------------------------------

# exp_df's relative error, derived (|r| <= ln2/8192 < 2^-13.5 the reduced argument):
# the reduction's last subtraction rounds by u|r| <= 2^-66.5; the degree-4 Taylor
# truncation r^5/120 <= 2^-74; the sum r + tail rounds by 2^-66.5; the product th * s by
# u |s| th <= 2^-66.5 th; table entries 2^-106; the low-part additions O(u 2^-13). In all
# below 2^-64.5: 2^-64.
EXP_REL = 2.0**-64


@given(
    x=st.one_of(
        st.floats(-669.0, 708.0), st.floats(-0.01, 0.01), st.integers(-600, 600).map(float)
    ),
    frac=st.floats(-1.0, 1.0),
)
def test_exp_df(x: float, frac: float) -> None:
    xl = frac * math.ulp(x) / 2  # a valid low part: at most half an ulp of the high part
    eh, el = acc.exp_df(np.asarray([x]), np.asarray([xl]), xp=xnp)
    with mpmath.workdps(40):
        want = mpmath.exp(mpmath.mpf(x) + mpmath.mpf(xl))
        err = abs(mpmath.mpf(float(eh[0])) + mpmath.mpf(float(el[0])) - want)
        assert err <= EXP_REL * want


def test_exp_df_special_values() -> None:
    x = np.array([0.0, -np.inf, np.nan, -708.5, -800.0, -690.0])
    eh, el = acc.exp_df(x, np.zeros_like(x), xp=xnp)
    assert eh[0] == 1.0 and el[0] == 0.0
    assert eh[1] == 0.0 and el[1] == 0.0
    assert np.isnan(eh[2])
    # Below -708 the result is the library's subnormal exp; the weights there are below
    # e^-708 of the row's largest one, far below any rounding of the result.
    assert np.array_equal(eh[3:5], np.exp(x[3:5])) and np.all(el[3:5] == 0)
    # Between -708 and -669 the low part is subnormal: relative accuracy of u at least,
    # absolute of 2^-1074.
    with mpmath.workdps(40):
        want = mpmath.exp(-690)
        assert abs(mpmath.mpf(float(eh[5])) + mpmath.mpf(float(el[5])) - want) <= U * want


@given(z=st.floats(0.5, 2.0**20), frac=st.floats(-1.0, 1.0))
def test_log_df(z: float, frac: float) -> None:
    # One Newton step from the library's log: the error is that of exp_df (relative
    # 2^-64, i.e. absolute 2^-64 in the log) plus d^2/2 = O(u^2 log(z)^2): below 2^-63.
    zl = frac * math.ulp(z) / 2
    yh, yl = acc.log_df(np.asarray([z]), np.asarray([zl]), xp=xnp)
    with mpmath.workdps(40):
        want = mpmath.log(mpmath.mpf(z) + mpmath.mpf(zl))
        assert abs(mpmath.mpf(float(yh[0])) + mpmath.mpf(float(yl[0])) - want) <= 2.0**-63


# --- attention against the exact result --------------------------------------------------


def _on(backend: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: (backend.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in kwargs.items()}


def _run(backend: Any, case: Case, **options: Any) -> Any:
    kw = _on(backend, case.options)
    kw.pop("softcap", None)
    return refattn.attention(
        backend.asarray(case.q), backend.asarray(case.k), backend.asarray(case.v), **kw, **options
    )


def _vmax(case: Case) -> float:
    # Outputs are convex combinations of V rows, times 1/(1 - p) under dropout.
    p = case.options.get("dropout_p", 0.0)
    return float(np.max(np.abs(case.v), initial=0.0)) / (1.0 - p if p < 1 else 1.0)


logits = st.sampled_from([1.0, 30.0, 300.0, 1000.0])


@given(data=st.data(), logit=logits)
def test_compensated_within_its_bound(backend: Any, data: st.DataObject, logit: float) -> None:
    """Output, LSE and weights against exact_attention, for logits up to 1000.

    The compensated result is the exact one rounded once (half an ulp), plus the effect
    of relative weight errors of at most eps = 2 EXP_REL (exp_df and the normaliser; the
    double-float logits' error, (60 E^3 + 12 E + 32) u^2 |scale| max|q| max|k|, is below
    2^-80 at these sizes), which moves the output by at most 2 eps max|V|.
    exact_attention's own rounding adds half an ulp. Hence
    |out - exact| <= ulp(exact) + 4 EXP_REL max|V|. The LSE is off by the normaliser's
    relative error (EXP_REL) plus log_df's (EXP_REL) plus the two roundings, 2^-63 and
    an ulp; 2^-62 covers the logits' share too. Weights: ulp + 2 eps * weight.
    """
    _check_forward(backend, data.draw(exact_cases(logit=logit)))


def _check_forward(backend: Any, case: Case) -> None:
    kw = case.options
    kw.pop("softcap", None)
    res = _run(backend, case, precision="compensated", return_lse=True, return_weights=True)
    want = exact_attention(case.q, case.k, case.v, return_lse=True, return_weights=True, **kw)
    out, lse, w = (backend.to_numpy(x) for x in (res.out, res.lse, res.weights))
    assert np.array_equal(np.isnan(out), np.isnan(want.out))
    ok = ~np.isnan(want.out)
    bound = np.spacing(np.abs(want.out[ok])) + 4 * EXP_REL * _vmax(case)
    assert np.all(np.abs(out[ok] - want.out[ok]) <= bound)
    assert np.array_equal(lse == -np.inf, want.lse == -np.inf)
    fin = np.isfinite(want.lse)
    lse_bound = np.spacing(np.abs(want.lse[fin])) + 2.0**-62
    assert np.all(np.abs(lse[fin] - want.lse[fin]) <= lse_bound)
    ok = ~np.isnan(want.weights)
    assert np.array_equal(np.isnan(w), np.isnan(want.weights))
    # Weights below e^-669 have a subnormal low part (or, below e^-708, are the library's
    # subnormal exp), and TwoProduct is inexact on subnormals: there the error is counted
    # in units of 2^-1074 (exp 1, the division's quotient, TwoProduct and correction 2
    # each: 7); 64 units leave a margin, and are 10^-300 below anything that matters.
    # Below e^-708 the library's exp takes the high part alone: dropping the low part
    # (at most half an ulp of 708, 2^-44) is a relative error of up to 2^-44 in the
    # unnormalised weight exp(s - max), and the division by the row sum z in [1, S]
    # keeps that absolute error: up to 2^-44 z w <= 2^-44 S w, on weights below 2^-1021.
    w_want = want.weights[ok]
    n_keys = case.k.shape[-2]
    dropped = np.where(w_want < 2.0**-1021, 2.0**-44 * n_keys * w_want, 0.0)
    wb = np.spacing(w_want) + 4 * EXP_REL * w_want + 64 * 2.0**-1074 + dropped
    assert np.all(np.abs(w[ok] - want.weights[ok]) <= wb)


def _standard_bound(case: Case) -> float:
    """First-order bound on |out - exact| of the plain float64 path (docs/accuracy.rst).

    A logit carries (E + 2)u A, A the largest |scale| sum|q||k| + |bias| (matmul, scale,
    bias); subtracting the row maximum rounds by u |x| <= 2u A; exp adds an ulp (2u). So
    each weight is off by eps = (E + 4)u A + 2u relative, moving the output by 2 eps
    max|V|; the row sum, the division and the weighted sum add (2S + 2)u max|V|; the
    exact result's rounding and the output's own add an ulp of max|V|. Second-order terms
    are covered by a factor 1.01.
    """
    E, S = case.q.shape[-1], case.k.shape[-2]
    eps = (E + 4) * U * _logit_bound(case) + 2 * U
    vmax = _vmax(case)
    return 1.01 * (vmax * (2 * eps + (2 * S + 2) * U) + 2 * np.spacing(vmax))


def _logit_bound(case: Case) -> float:
    # A >= |scale| sum_e |q_ie||k_je| + |bias_ij| for every (i, j): Cauchy-Schwarz on the
    # largest row norms, plus the largest finite bias.
    norms = [float(np.max(np.linalg.norm(x, axis=-1), initial=0.0)) for x in (case.q, case.k)]
    A = abs(case.scale_value) * norms[0] * norms[1]
    bias = case.options.get("bias")
    if bias is not None:
        A += float(np.max(np.abs(bias[np.isfinite(bias)]), initial=0.0))
    return A


@given(data=st.data(), logit=logits)
def test_standard_within_its_bound(backend: Any, data: st.DataObject, logit: float) -> None:
    case = data.draw(exact_cases(logit=logit))
    case.options.pop("softcap", None)
    out = backend.to_numpy(_run(backend, case))
    want = exact_attention(case.q, case.k, case.v, **case.options)
    assert np.array_equal(np.isnan(out), np.isnan(want))
    ok = ~np.isnan(want)
    assert np.max(np.abs(out[ok] - want[ok]), initial=0.0) <= _standard_bound(case)


def test_compensated_beats_standard_on_large_logits() -> None:
    # Keys and queries near one direction: logits near 230 that differ by O(1), so many
    # weights matter and each carries the plain path's logit rounding (~E u 230, some
    # thousand u): its output is off by many ulp, the compensated one by at most one.
    rng = np.random.default_rng(7)
    base = rng.standard_normal(16)
    base *= 30.0 / np.linalg.norm(base)
    q = base + 0.1 * rng.standard_normal((2, 6, 16))
    k = base + 0.1 * rng.standard_normal((2, 8, 16))
    v = rng.standard_normal((2, 8, 3))
    want = exact_attention(q, k, v)
    ulp = np.spacing(np.max(np.abs(v)))
    std = np.max(np.abs(refattn.attention(q, k, v) - want)) / ulp
    comp = np.max(np.abs(refattn.attention(q, k, v, precision="compensated") - want)) / ulp
    assert comp <= 1.0 < std


@given(data=st.data(), logit=logits)
def test_compensated_backward_within_its_bound(
    backend: Any, data: st.DataObject, logit: float
) -> None:
    """Gradients against exact_attention's, for logits up to 1000.

    Each weight P_j is off by at most 2^-63 relative (exp_df and the normaliser, 2^-64
    each). dS_j = P_j (dP_j - D) with |dP_j|, |D| <= sum|dO| max|V|: P_j's error moves it
    by 2^-62 P_j sum|dO| max|V|, D's (a P-weighted mean) by 2^-63 P_j sum|dO| max|V|;
    the Ozaki products and compensated sums add terms of order n^3 u^2, below 2^-80 of
    the same scale at these sizes. So each dS_j is off by at most 2^-61 P_j sum|dO|
    max|V|, and summed into the gradients: dq by |scale| max|K| G, dk by
    |scale| max|Q| R G, d bias by R G, dv by 2^-62 R max|dO| / (1 - p), where
    G = 2^-61 sum|dO| max|V| / (1 - p) and R bounds the number of rows summed into one
    entry (batch * H * L). Plus one rounding of the result and one of the exact result:
    an ulp.
    """
    _check_backward(backend, data.draw(exact_cases(logit=logit)))


def _check_backward(backend: Any, case: Case) -> None:
    kw = case.options
    kw.pop("softcap", None)
    got = refattn.attention_backward(
        backend.asarray(case.dout), backend.asarray(case.q), backend.asarray(case.k),
        backend.asarray(case.v), precision="compensated", **_on(backend, kw),
    )
    want = exact_attention(case.q, case.k, case.v, grad_out=case.dout, **kw)
    big = {name: float(np.max(np.abs(x), initial=0.0)) for name, x in
           (("q", case.q), ("k", case.k), ("v", case.v))}
    g = 2.0**-61 * float(np.max(np.sum(np.abs(case.dout), axis=-1), initial=0.0)) * _vmax(case)
    rows = case.dout.size // max(case.dout.shape[-1], 1)
    scale = abs(case.scale_value)
    bounds = {
        "dq": scale * big["k"] * g,
        "dk": scale * big["q"] * rows * g,
        "dv": 2.0**-62 * rows * float(np.max(np.abs(case.dout), initial=0.0)) / (
            1 - kw.get("dropout_p", 0.0) if kw.get("dropout_p", 0.0) < 1 else 1),
        "dbias": rows * g,
    }
    for name, extra in bounds.items():
        x, y = getattr(got, name), getattr(want, name)
        if y is None:
            assert x is None
            continue
        x = backend.to_numpy(x)
        assert x.shape == y.shape, name
        assert np.array_equal(np.isnan(x), np.isnan(y)), name
        ok = ~np.isnan(y)
        assert np.all(np.abs(x[ok] - y[ok]) <= np.spacing(np.abs(y[ok])) + extra), name


@given(data=st.data(), logit=logits, chunk=st.sampled_from([1, 40]))
def test_row_chunks_within_the_same_bounds(
    backend: Any, data: st.DataObject, logit: float, chunk: int
) -> None:
    # Query rows are processed in chunks of about _CHUNK_SCORES scores; tiny chunks (one
    # row, or a few) exercise the slicing of masks, bias and keep-masks by rows and the
    # sums over chunks (dK, dV, a bias broadcast over queries). The bounds are those of
    # the two tests above: chunking changes the order of exact or compensated sums only.
    case = data.draw(exact_cases(logit=logit))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(acc._attention, "_CHUNK_SCORES", chunk)  # where _row_chunks reads it
        _check_forward(backend, case)
        _check_backward(backend, case)


def test_compensated_backward_takes_no_saved_forward() -> None:
    q = np.ones((1, 2, 3))
    g = np.ones((1, 2, 3))
    for saved in ({"output": g}, {"lse": np.zeros((1, 2))}):
        with pytest.raises(ValueError, match="do not pass output= or lse="):
            refattn.attention_backward(g, q, q, q, precision="compensated", **saved)


# --- the front door ----------------------------------------------------------------------


def test_layouts_ranks_dtypes_and_dropout() -> None:
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 5, 4, 8))  # BLHD: B=2, L=5, H=4, E=8
    k = rng.standard_normal((2, 6, 2, 8))
    v = rng.standard_normal((2, 6, 2, 3))
    kw = dict(layout="BLHD", causal=True, dropout_p=0.3, rng=11, return_dropout_mask=True,
              return_lse=True, return_weights=True)
    c = refattn.attention(q, k, v, precision="compensated", **kw)
    s = refattn.attention(q, k, v, **kw)
    assert np.array_equal(c.dropout_mask, s.dropout_mask)
    # The two paths differ by at most the standard path's bound (see _standard_bound)
    # plus the compensated one's ulp: 2 (E + 4)u A + (2S + 4)u relative to max|V|/(1 - p)
    # for outputs, to 1 for weights and to A + log S for the LSE.
    A = float(np.max(np.linalg.norm(q, axis=-1)) * np.max(np.linalg.norm(k, axis=-1))) / np.sqrt(8)
    rel = 2 * (8 + 4) * U * A + (2 * 6 + 4) * U
    for name, size in (("out", np.max(np.abs(v)) / 0.7), ("weights", 1.0), ("lse", A + np.log(6))):
        x, y = getattr(c, name), getattr(s, name)
        assert x.shape == y.shape
        assert np.max(np.abs(x - y)) <= rel * size, name
    # 2-D inputs and float32: the result takes the input's rank and dtype.
    out = refattn.attention(q[0, :, 0].astype(np.float32), k[0, :, 0].astype(np.float32),
                            v[0, :, 0].astype(np.float32), precision="compensated")
    assert out.shape == (5, 3) and out.dtype == np.float32


def test_nan_propagates_like_standard() -> None:
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal(s) for s in ((3, 4, 5), (3, 6, 5), (3, 6, 2)))
    q[0, 1, 2] = np.nan
    v[1, 3, 0] = np.nan
    c = refattn.attention(q, k, v, precision="compensated")
    s = refattn.attention(q, k, v)
    assert np.array_equal(np.isnan(c), np.isnan(s)) and np.isnan(c).any()


@pytest.mark.parametrize(
    "options", [{"compute_dtype": "float32"}, {"implementation": "blocked"}]
)
def test_compensated_option_errors(options: dict[str, Any]) -> None:
    q = np.ones((1, 2, 3))
    message = "precision='compensated' computes in float64 on the direct path"
    with pytest.raises(ValueError, match=message):
        refattn.attention(q, q, q, precision="compensated", **options)
