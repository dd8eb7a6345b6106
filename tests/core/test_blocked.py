"""The blocked (online-softmax) path against the direct (materialised) path.

The direct path is checked against torch and mpmath elsewhere; here the blocked path must
agree with it for every option (masks and biases of every broadcast shape, both causal
alignments with L < S and L > S, grouped-query heads with K != Kv, dropout keep-masks,
the three masked-row policies, LSE and weights, empty and length-1 axes, block sizes that
do not divide L or S, one-element blocks), within a rounding-error bound derived from the
data. Plus what only the blocked path has: skipped causal blocks, bit-identical results
whatever the thread count, bounded memory, the dispatch by size and the thread setting.
"""

from __future__ import annotations

import math
import tracemalloc
from dataclasses import dataclass, replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refattn
from refattn import _front_door as attention_module
from refattn._agnostic._blocked import (
    RESCALE_THRESHOLD,
    SCORE_BLOCK_ELEMENTS,
    choose_blocks,
    key_spans,
    query_blocks,
)
from refattn._arrays import sum_to_shape
from refattn._tolerance import rounding_bound
from tests.helpers.cases import Case, divisors
from tests.helpers.gradients import grad_bounds, np_sum_to
from tests.helpers.paths import (
    blocked_attention,
    blocked_attention_backward,
    direct_attention,
    direct_backward,
)

U64 = float(np.finfo(np.float64).eps) / 2  # unit roundoff of float64

# --- cases ------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Problem(Case):
    """A case with every option of the blocked path spelled out, and its block sizes."""

    scale: float
    mask: np.ndarray | None
    bias: np.ndarray | None
    keep: np.ndarray | None
    dropout_p: float
    causal: bool
    alignment: str
    masked_rows: str
    block_l: int
    block_s: int
    left: int | None = None  # a window's left edge: keys j >= i + shift - left
    slopes: np.ndarray | None = None  # ALiBi slopes, (H,) or (*batch, H)

    @property
    def base_shift(self) -> int:
        return 0 if self.alignment == "top_left" else self.S - self.L

    def allowed(self) -> np.ndarray | None:
        """The user's mask AND the causal triangle AND the window's lower edge, built
        here independently of refattn."""
        allowed = self.mask
        ones = np.ones((self.L, self.S), dtype=bool)
        if self.causal:
            tri = np.tril(ones, k=self.base_shift)
            allowed = tri if allowed is None else allowed & tri
        if self.left is not None:
            above = ~np.tril(ones, k=self.base_shift - self.left - 1)
            allowed = above if allowed is None else allowed & above
        return allowed

    def full_bias(self) -> np.ndarray | None:
        """The bias plus ALiBi's -slope |i + shift - j|, built here for the direct path."""
        if self.slopes is None:
            return self.bias
        i = np.arange(self.L)[:, None] + self.base_shift
        j = np.arange(self.S)[None, :]
        alibi = -self.slopes[..., None, None] * np.abs(i - j)
        return alibi if self.bias is None else self.bias + alibi

    def key_blocks(self) -> int:
        return max(1, math.ceil(self.S / self.block_s))


@st.composite
def problems(draw: st.DrawFn, *, max_len: int = 7, dropout: bool = True) -> Problem:
    """Small attention problems with every option of the blocked path drawn."""
    batch = draw(st.sampled_from([(), (2,), (2, 1)]))
    H = draw(st.sampled_from([1, 2, 4, 6]))
    K = draw(st.sampled_from(divisors(H)))
    Kv = draw(st.sampled_from(divisors(H)))
    L = draw(st.integers(0, max_len))
    S = draw(st.integers(0, max_len + 1))
    E = draw(st.integers(1, 5))
    Ev = draw(st.integers(1, 4))
    full = (*batch, H, L, S)
    mask_shape = draw(st.sampled_from([None, (L, S), (H, 1, S), (1, L, 1), full]))
    bias_shape = draw(st.sampled_from([None, (S,), (L, S), (H, L, 1), (*batch, 1, 1, S), full]))
    dropout_p = draw(st.sampled_from([0.0, 0.0, 0.3, 1.0])) if dropout else 0.0
    keep_shape = draw(st.sampled_from([(L, S), (H, 1, S), full])) if dropout_p else None
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    magnitude = draw(st.sampled_from([0.5, 2.0, 6.0]))
    # k and v may have fewer batch dims than q (leading dims broadcast like matmul).
    kv_batch = batch if draw(st.booleans()) else batch[1:]
    q = rng.uniform(-magnitude, magnitude, (*batch, H, L, E))
    k = rng.uniform(-magnitude, magnitude, (*kv_batch, K, S, E))
    v = rng.uniform(-2, 2, (*kv_batch, Kv, S, Ev))
    mask = None if mask_shape is None else rng.random(mask_shape) < 0.7
    bias = None
    if bias_shape is not None:
        bias = rng.uniform(-3, 3, bias_shape)
        if draw(st.booleans()):
            bias[rng.random(bias_shape) < 0.2] = -np.inf  # -inf in a bias masks too
    keep = None if keep_shape is None else rng.random(keep_shape) >= dropout_p
    out_batch = np.broadcast_shapes(batch, kv_batch)
    dout = rng.uniform(-1, 1, (*out_batch, H, L, Ev))
    left = draw(st.one_of(st.none(), st.none(), st.integers(0, 4)))
    slopes = None
    if draw(st.integers(0, 3)) == 0:
        # Mostly positive, as in ALiBi; a negative slope makes the bias rise with distance.
        slopes = rng.uniform(-0.3, 1.0, draw(st.sampled_from([(H,), (*out_batch, H)])))
    return Problem(
        q=q, k=k, v=v, scale=draw(st.sampled_from([E**-0.5, 0.0, -0.8, 1.3])), mask=mask,
        bias=bias, keep=keep, dropout_p=dropout_p, causal=draw(st.booleans()),
        alignment=draw(st.sampled_from(["top_left", "bottom_right"])),
        masked_rows=draw(st.sampled_from(["zero", "nan", "uniform"])),
        block_l=draw(st.integers(1, 4)), block_s=draw(st.integers(1, 5)), dout=dout,
        left=left, slopes=slopes,
    )


def _optional(convert, x):
    return None if x is None else convert(x)


def _run(backend, p: Problem, *, path: str, num_threads: int = 1, return_weights: bool = True):
    xp = backend.xp

    def conv(x):
        return _optional(backend.asarray, x)

    q, k, v, bias, keep = (conv(x) for x in (p.q, p.k, p.v, p.bias, p.keep))
    if path == "direct":
        res = direct_attention(
            q, k, v, scale=p.scale, bias=conv(p.full_bias()), allowed=conv(p.allowed()),
            keep=keep,
            dropout_p=p.dropout_p, masked_rows=p.masked_rows, xp=xp,
        )
    else:
        res = blocked_attention(
            q, k, v, scale=p.scale, bias=bias, allowed=conv(p.mask), keep=keep,
            dropout_p=p.dropout_p, masked_rows=p.masked_rows, causal=p.causal,
            alignment=p.alignment, return_weights=return_weights, block_l=p.block_l,
            block_s=p.block_s, num_threads=num_threads, window_left=p.left,
            alibi_slopes=conv(p.slopes), xp=xp,
        )
    return tuple(_optional(backend.to_numpy, x) for x in (res.out, res.lse, res.weights))


# --- bounds -----------------------------------------------------------------------------


def _score_magnitude(p: Problem) -> float:
    """A' = |scale| max_i ||q_i||_1 max_j |k_j|_inf + max |finite bias|: no score (nor a
    shift, which is a computed score) is larger in magnitude, to first order."""
    if p.L == 0 or p.S == 0:
        return 0.0
    A = abs(p.scale) * float(np.max(np.abs(p.q).sum(axis=-1))) * float(np.max(np.abs(p.k)))
    bias = p.full_bias()
    if bias is not None:
        A += float(np.max(np.abs(bias[np.isfinite(bias)]), initial=0.0))
    return A


def _blocked_exponent_error(p: Problem) -> float:
    """Absolute error of one exponent x = s - c of the blocked forward.

    x comes out of one product [scale q, -c] . [k, 1] (E + 1 terms and the rounding of
    scale q: (E + 2) u (A' + |c|) <= 2 (E + 2) u A'), the bias addition, and at most
    one correction ``x -= delta`` per key block, each rounding a value of size at most
    2 A' + RESCALE_THRESHOLD: (nb + 1) u (2 A' + tau) for nb key blocks.
    """
    A, nb = _score_magnitude(p), p.key_blocks()
    # ALiBi: slope * distance and its sum with the bias, per block on the blocked path
    # and once in the test's explicit bias: three more roundings of size <= A.
    alibi = 3 * U64 * A if p.slopes is not None else 0.0
    return (2 * (p.q.shape[-1] + 2) * U64 * A + (nb + 1) * U64 * (2 * A + RESCALE_THRESHOLD)
            + alibi)


def _blocked_sum_error(p: Problem) -> float:
    """Relative error of the blocked path's normaliser and accumulator: the S-term sums
    (S u each, plus u for the division) and, per rescaling (at most one per key block),
    exp and a product on each of the two: (2 S + 1 + 4 nb) u."""
    return (2 * p.S + 1 + 4 * p.key_blocks()) * U64


def _blocked_lse_error(p: Problem) -> float:
    """|lse - exact| for the blocked path: lse = shift + log(total) carries the exponents'
    error, the relative error of total, and the rounding of the shift (raised at most
    once per block, |shift| <= A') and of the final addition (|lse| <= A' + log S)."""
    A, nb = _score_magnitude(p), p.key_blocks()
    return (_blocked_exponent_error(p) + _blocked_sum_error(p)
            + (nb + 2) * U64 * (A + math.log(max(p.S, 1)) + RESCALE_THRESHOLD))


def _bounds(p: Problem) -> dict[str, float]:
    """Bounds on |blocked - direct| for out, lse and weights: the sum of each path's own
    bound against the exact result (first order).

    Direct: ``rounding_bound`` / 2 for the output (a logit error delta = (E + 2) u A'
    moves a weight by a relative 2 delta, the reductions add (2S + 3) u); delta +
    (S + 3) u + u |lse| for the LSE; 2 delta + (S + 3) u for a weight (<= 1).
    Blocked: the same with its own exponent and sum errors (above).
    """
    vmax = float(np.max(np.abs(p.v), initial=0.0))
    keep_scale = 1.0 / (1.0 - p.dropout_p) if p.dropout_p < 1 else 0.0
    A = _score_magnitude(p)
    delta = (p.q.shape[-1] + 2) * U64 * A
    d_b = _blocked_exponent_error(p)
    direct_out = rounding_bound(p.q, p.k, p.v, scale=p.scale, bias=p.full_bias(),
                                dropout_p=p.dropout_p) / 2
    blocked_out = vmax * (2 * d_b + _blocked_sum_error(p) + 2 * U64) * keep_scale
    direct_lse = delta + (p.S + 3) * U64 + U64 * (A + math.log(max(p.S, 1)))
    direct_w = 2 * delta + (p.S + 3) * U64
    blocked_w = d_b + _blocked_sum_error(p) + 2 * U64  # exp(x) / total, x and total as above
    return {
        "out": direct_out + blocked_out,
        "lse": direct_lse + _blocked_lse_error(p),
        "weights": direct_w + blocked_w,
    }


def _assert_close(got: np.ndarray, want: np.ndarray, bound: float, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    # Non-finite entries (NaN rows, -inf LSE of fully masked rows) must agree exactly.
    finite = np.isfinite(want)
    assert np.array_equal(np.isfinite(got), finite), f"{what}: non-finite positions differ"
    assert np.array_equal(got[~finite], want[~finite], equal_nan=True), (
        f"{what}: non-finite values differ"
    )
    err = float(np.max(np.abs(got[finite] - want[finite]), initial=0.0))
    assert err <= bound, f"{what}: max difference {err:.3e} exceeds the derived bound {bound:.3e}"


# --- blocked == direct ------------------------------------------------------------------


@given(p=problems())
def test_blocked_matches_direct(backend, p):
    want = _run(backend, p, path="direct")
    got = _run(backend, p, path="blocked")
    bounds = _bounds(p)
    for name, g, w in zip(("out", "lse", "weights"), got, want, strict=True):
        _assert_close(g, w, bounds[name], name)


@given(p=problems(max_len=5))
def test_fully_masked_rows_follow_the_policy(backend, p):
    # Force a fully masked row (query 0 masked out everywhere): the policies differ there.
    if p.L == 0 or p.S == 0:
        return
    mask = np.ones((p.L, p.S), dtype=bool) if p.mask is None else p.mask.copy()
    mask[..., 0, :] = False
    p.mask = mask
    want = _run(backend, p, path="direct")
    got = _run(backend, p, path="blocked")
    bounds = _bounds(p)
    for name, g, w in zip(("out", "lse", "weights"), got, want, strict=True):
        _assert_close(g, w, bounds[name], name)


@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize(("L", "S"), [(13, 5), (5, 13), (9, 9), (1, 7), (7, 1)])
def test_causal_shapes_and_alignments(backend, alignment, L, S):
    # L > S and L < S put the diagonal outside the square: whole query blocks then see
    # nothing (top_left with L > S never does; bottom_right with L > S does).
    rng = np.random.default_rng(L * 100 + S)
    p = Problem(
        q=rng.standard_normal((2, 3, L, 4)), k=rng.standard_normal((2, 1, S, 4)),
        v=rng.standard_normal((2, 1, S, 2)), scale=0.5, mask=None, bias=None, keep=None,
        dropout_p=0.0, causal=True, alignment=alignment, masked_rows="zero", block_l=2,
        block_s=3,
    )
    want = _run(backend, p, path="direct")
    got = _run(backend, p, path="blocked")
    bounds = _bounds(p)
    for name, g, w in zip(("out", "lse", "weights"), got, want, strict=True):
        _assert_close(g, w, bounds[name], name)


def test_default_blocks_through_the_front_door(backend):
    # implementation="blocked" with the automatic block sizes, BLHD layout, float32
    # inputs (computed in float64, cast back) and GQA, against implementation="direct".
    rng = np.random.default_rng(7)
    q = rng.standard_normal((2, 70, 4, 8)).astype(np.float32)  # BLHD: L=70, H=4
    k = rng.standard_normal((2, 600, 2, 8)).astype(np.float32)  # S=600: two key blocks
    v = rng.standard_normal((2, 600, 2, 3)).astype(np.float32)
    args = [backend.asarray(x) for x in (q, k, v)]
    kw = dict(causal=True, alignment="bottom_right", layout="BLHD", return_lse=True,
              return_weights=True)
    want = refattn.attention(*args, implementation="direct", **kw)
    got = refattn.attention(*args, implementation="blocked", **kw)
    # Both are float64 results rounded once to float32: they may differ by one float32
    # rounding of values of size <= max|v| (out), |lse| and 1 (weights), plus the float64
    # difference, which is far below that.
    u32 = float(np.finfo(np.float32).eps) / 2
    vmax = float(np.abs(v).max())
    for name, bound in (("out", 2 * u32 * vmax), ("lse", 2 * u32 * 40.0), ("weights", 2 * u32)):
        g, w = backend.to_numpy(getattr(got, name)), backend.to_numpy(getattr(want, name))
        assert g.dtype == np.float32
        _assert_close(g.astype(np.float64), w.astype(np.float64), bound, name)


@pytest.mark.parametrize("case", ["rising", "very_negative", "small", "masked_first"])
def test_lazy_shift_paths(backend, case):
    # Each way the forward's shift may move, against the direct path:
    # "rising": every key block's scores exceed the previous block's by more than
    #   RESCALE_THRESHOLD, so every block rescales;
    # "very_negative": every score is about -1000, so the first finite scores sit far
    #   below the initial shift of 0 (a factor exp(1000) must not appear);
    # "small": logits of order 1, where the Cauchy-Schwarz bound lets every block after
    #   the first skip the max pass;
    # "masked_first": the first key block is masked for every row, so the shift is set
    #   in a later block.
    L, S, E = 6, 24, 3
    rng = np.random.default_rng(17)
    q = rng.uniform(0.5, 1.0, (1, L, E))
    k = rng.uniform(-0.1, 0.1, (1, S, E))
    v = rng.standard_normal((1, S, 2))
    bias = mask = None
    if case == "rising":
        k[0, :, 0] = np.arange(S) * 20.0  # +20 per key, +80 per block of 4
    elif case == "very_negative":
        bias = -1000.0 - rng.uniform(0, 5, (L, S))
    elif case == "masked_first":
        mask = np.ones((L, S), dtype=bool)
        mask[:, :4] = False
    p = Problem(q=q, k=k, v=v, scale=1.0, mask=mask, bias=bias, keep=None, dropout_p=0.0,
                causal=False, alignment="top_left", masked_rows="zero", block_l=4, block_s=4)
    want = _run(backend, p, path="direct")
    got = _run(backend, p, path="blocked")
    bounds = _bounds(p)
    for name, g, w in zip(("out", "lse", "weights"), got, want, strict=True):
        assert np.all(np.isfinite(g)), name
        _assert_close(g, w, bounds[name], name)


def test_empty_axes(backend):
    xp = backend.xp
    for L, S in ((0, 4), (3, 0), (0, 0)):
        q = backend.asarray(np.ones((2, L, 3)))
        k = backend.asarray(np.ones((1, S, 3)))
        v = backend.asarray(np.ones((1, S, 2)))
        res = blocked_attention(
            q, k, v, scale=1.0, bias=None, allowed=None, keep=None, dropout_p=0.0,
            masked_rows="nan", return_weights=True, xp=xp,
        )
        assert tuple(res.out.shape) == (2, L, 2)
        assert tuple(res.weights.shape) == (2, L, S)
        # No keys: nothing to weigh, the output is 0 whatever the policy; LSE is -inf.
        assert np.all(backend.to_numpy(res.out) == 0.0)
        assert np.all(backend.to_numpy(res.lse) == -np.inf)


# --- backward -------------------------------------------------------------------------


def _run_backward(backend, p: Problem, *, path: str, num_threads: int = 1, saved=None):
    xp = backend.xp

    def conv(x):
        return _optional(backend.asarray, x)

    args = [conv(x) for x in (p.dout, p.q, p.k, p.v)]
    out, lse = (None, None) if saved is None else (conv(saved[0]), conv(saved[1]))
    common = dict(scale=p.scale, keep=conv(p.keep), dropout_p=p.dropout_p,
                  masked_rows=p.masked_rows, out=out, lse=lse, xp=xp)
    if path == "direct":
        g = direct_backward(*args, bias=conv(p.full_bias()), allowed=conv(p.allowed()),
                            **common)
        # The direct path differentiates bias + ALiBi: the bias's gradient is that summed
        # back to the bias's own shape.
        dbias = None if p.bias is None else sum_to_shape(g.dbias, p.bias.shape, xp=xp)
    else:
        g = blocked_attention_backward(
            *args, bias=conv(p.bias), allowed=conv(p.mask), causal=p.causal,
            alignment=p.alignment, block_l=p.block_l, block_s=p.block_s,
            num_threads=num_threads, window_left=p.left, alibi_slopes=conv(p.slopes),
            **common,
        )
        dbias = g.dbias
    return [None if x is None else backend.to_numpy(x) for x in (g.dq, g.dk, g.dv, dbias)]


def _user_bias_bounds(p: Problem, b):
    """``grad_bounds`` of bias + ALiBi, its d bias part summed back to the user's bias
    shape (a sum of entries is within the sum of their bounds); None without a bias."""
    if p.slopes is None:
        return b
    bounds, mags = list(b.bounds), list(b.mags)
    for values in (bounds, mags):
        values[3] = None if p.bias is None else np_sum_to(
            np.broadcast_to(values[3], p.full_bias().shape), p.bias.shape)
    return replace(b, bounds=bounds, mags=mags)


def _grad_tolerances(p: Problem) -> list[np.ndarray | None]:
    """Bounds on |blocked - direct| per gradient entry.

    ``grad_bounds`` bounds one implementation of the direct formulas, linearly in the
    relative error rho of a weight: bound = (rho + c) * magnitude. The blocked backward
    rebuilds each weight as exp(S - lse) from the blocked forward's LSE, so its rho grows
    by the error of that exponent (below); dP - D out of one product [dO, -D] . [v, 1]
    is within the (Ev + S + 2) u (|dP| + |D|) that ``grad_bounds`` already allows.
    """
    if p.L == 0 or p.S == 0 or p.dropout_p >= 1:
        # Nothing to compute, or an output identically 0: both give exact zeros.
        return [0.0, 0.0, 0.0, None if p.bias is None else 0.0]
    b = _user_bias_bounds(p, grad_bounds(
        p.q, p.k, p.v, p.dout, scale=p.scale, bias=p.full_bias(), allowed=p.allowed(),
        keep=p.keep, dropout_p=p.dropout_p, masked_rows=p.masked_rows))
    # The exponent S - lse comes out of one product with E + 1 terms, the LSE among them:
    # (E + 2) u (A' + |lse|), and the LSE itself carries the blocked forward's error.
    A = _score_magnitude(p)
    extra = ((p.q.shape[-1] + 2) * U64 * (2 * A + math.log(max(p.S, 1)))
             + _blocked_lse_error(p))
    return [None if bound is None else bound + (bound + extra * mag)
            for bound, mag in zip(b.bounds, b.mags, strict=True)]


def _assert_grads_close(got, want, tolerances) -> None:
    for name, g, w, tol in zip(("dq", "dk", "dv", "dbias"), got, want, tolerances,
                               strict=True):
        if w is None:
            assert g is None, f"{name} should be None without a bias"
            continue
        assert g.shape == w.shape, f"{name}: shape {g.shape} != {w.shape}"
        finite = np.isfinite(w)
        assert np.array_equal(np.isfinite(g), finite), f"{name}: non-finite positions differ"
        assert np.array_equal(g[~finite], w[~finite], equal_nan=True), name
        err = np.abs(g[finite] - w[finite])
        bound = np.broadcast_to(tol, w.shape)[finite]
        worst = int(np.argmax(err - bound)) if err.size else 0
        assert np.all(err <= bound), (
            f"{name}: difference {err[worst]:.3e} over the derived bound {bound[worst]:.3e}"
        )


@given(p=problems())
def test_blocked_backward_matches_direct(backend, p):
    want = _run_backward(backend, p, path="direct")
    got = _run_backward(backend, p, path="blocked")
    _assert_grads_close(got, want, _grad_tolerances(p))


@given(p=problems(max_len=5))
def test_blocked_backward_fully_masked_rows(backend, p):
    # Query 0 fully masked: "nan" and "uniform" rows weigh every key, also keys the
    # causal mask hides, so the blocked backward must then visit every block.
    if p.L == 0 or p.S == 0:
        return
    mask = np.ones((p.L, p.S), dtype=bool) if p.mask is None else p.mask.copy()
    mask[..., 0, :] = False
    p.mask = mask
    want = _run_backward(backend, p, path="direct")
    got = _run_backward(backend, p, path="blocked")
    _assert_grads_close(got, want, _grad_tolerances(p))


@given(p=problems(max_len=5))
def test_blocked_backward_uses_the_saved_output_and_lse(backend, p):
    # Given the same saved forward (the direct path's), the two backwards differ only by
    # their own rounding: the direct path's bound for each of them.
    fwd = _run(backend, p, path="direct", return_weights=False)
    saved = (fwd[0], fwd[1])
    want = _run_backward(backend, p, path="direct", saved=saved)
    got = _run_backward(backend, p, path="blocked", saved=saved)
    if p.L == 0 or p.S == 0 or p.dropout_p >= 1:
        tolerances = _grad_tolerances(p)
    else:
        b = _user_bias_bounds(p, grad_bounds(
            p.q, p.k, p.v, p.dout, scale=p.scale, bias=p.full_bias(), allowed=p.allowed(),
            keep=p.keep, dropout_p=p.dropout_p, masked_rows=p.masked_rows))
        tolerances = [None if x is None else 2 * x for x in b.bounds]
    _assert_grads_close(got, want, tolerances)


def test_backward_front_door_blocked_equals_direct(backend):
    rng = np.random.default_rng(21)
    q = rng.standard_normal((2, 70, 4, 8))  # BLHD: L=70, H=4
    k = rng.standard_normal((2, 600, 2, 8))  # S=600: two key blocks, K=2
    v = rng.standard_normal((2, 600, 1, 3))  # Kv=1
    bias = rng.standard_normal((4, 1, 600))
    dout = rng.standard_normal((2, 70, 4, 3))
    args = [backend.asarray(x) for x in (dout, q, k, v)]
    kw = dict(causal=True, alignment="bottom_right", layout="BLHD", bias=backend.asarray(bias))
    want = refattn.attention_backward(*args, implementation="direct", **kw)
    got = refattn.attention_backward(*args, implementation="blocked", **kw)
    def sw(x):
        return np.swapaxes(x, -3, -2)

    def same(x):
        return x

    # The blocks the front door chooses: grouped heads G = 2 stacked per block.
    block_l, block_s = choose_blocks(70, 600, 2)
    p = Problem(q=sw(q), k=sw(k), v=sw(v), scale=8**-0.5, mask=None, bias=bias, keep=None,
                dropout_p=0.0, causal=True, alignment="bottom_right", masked_rows="zero",
                block_l=block_l, block_s=block_s, dout=sw(dout))
    tolerances = _grad_tolerances(p)
    as_bhld = [sw, sw, sw, same]
    _assert_grads_close(
        [f(backend.to_numpy(x)) for f, x in zip(as_bhld, got, strict=True)],
        [f(backend.to_numpy(x)) for f, x in zip(as_bhld, want, strict=True)], tolerances,
    )


# --- skipping -------------------------------------------------------------------------


def _band(L, S, shift, causal, left):
    """Loop-free but independent: the causal diagonal j <= i + shift and the lower edge
    j >= i + shift - left of a window, as a boolean (L, S) array."""
    visible = np.tril(np.ones((L, S), dtype=bool), k=shift) if causal else np.ones((L, S), bool)
    if left is not None:
        visible &= ~np.tril(np.ones((L, S), dtype=bool), k=shift - left - 1)
    return visible


@given(
    L=st.integers(0, 12), S=st.integers(0, 12), block_l=st.integers(1, 5),
    block_s=st.integers(1, 9), causal=st.booleans(),
    alignment=st.sampled_from(["top_left", "bottom_right"]),
    left=st.one_of(st.none(), st.integers(0, 6)),
)
def test_key_spans_visit_exactly_the_needed_blocks(L, S, block_l, block_s, causal, alignment,
                                                   left):
    shift = 0 if alignment == "top_left" else S - L
    visible = _band(L, S, shift, causal, left)
    low = None if left is None else shift - left
    for l0 in range(0, L, block_l):
        l1 = min(l0 + block_l, L)
        rows = visible[l0:l1]
        covered = np.zeros(S, dtype=bool)
        last = None
        for span in key_spans(l0, l1, S, block_s, causal=causal, shift=shift if causal else 0,
                              low=low):
            # In order, contiguous (hidden spans are dropped only before the first).
            assert (last is None or last == span.start) and span.start < span.stop <= S
            last = span.stop
            block = rows[:, span.start:span.stop]
            assert block.any(), f"span {span} of rows [{l0}, {l1}) is fully masked"
            assert span.masked == (not block.all()), f"span {span}: wrong 'masked' flag"
            covered[span.start:span.stop] = True
        # Every visible key of the block is visited.
        assert not np.any(rows.any(axis=0) & ~covered)


@given(
    L=st.integers(0, 12), S=st.integers(1, 12), block_l=st.integers(1, 5),
    block_s=st.integers(1, 5), causal=st.booleans(),
    alignment=st.sampled_from(["top_left", "bottom_right"]),
    left=st.one_of(st.none(), st.integers(0, 6)),
)
def test_query_blocks_are_the_transpose_of_key_spans(L, S, block_l, block_s, causal,
                                                      alignment, left):
    # The backward visits, for each key range, the query blocks that see it: exactly the
    # query blocks whose key spans overlap the range.
    base = 0 if alignment == "top_left" else S - L
    shift = base if causal else 0
    low = None if left is None else base - left
    band = _band(L, S, base, causal, left)
    for s0 in range(0, S, block_s):
        s1 = min(s0 + block_s, S)
        want = [
            l0 for l0 in range(0, L, block_l)
            if any(span.start < s1 and s0 < span.stop
                   for span in key_spans(l0, min(l0 + block_l, L), S, block_s,
                                         causal=causal, shift=shift, low=low))
        ]
        got = query_blocks(s0, s1, L, block_l, causal=causal, shift=shift, low=low)
        # query_blocks may start a block early (it stays on the block grid): any extra
        # block it lists must see none of the range, and is then fully masked there.
        listed = [blk.start for blk in got]
        assert set(want) <= set(listed)
        for blk in got:
            visible = band[blk.start:blk.stop, s0:s1]
            if blk.start not in want:
                assert not visible.any()
            assert blk.masked == (not visible.all())


def test_causal_work_is_about_half():
    # The reason for passing (causal, alignment): at L = S = 4096 with the default blocks
    # the causal path computes close to half the scores. Exact count: each query block of
    # block_l rows visits keys up to its last row, so the area is the triangle plus
    # block_l (block_l - 1) / 2 per block.
    L = S = 4096
    block_l, block_s = choose_blocks(L, S, 1)
    area = sum(
        (min(l0 + block_l, L) - l0) * (span.stop - span.start)
        for l0 in range(0, L, block_l)
        for span in key_spans(l0, min(l0 + block_l, L), S, block_s, causal=True, shift=0)
    )
    triangle = L * (L + 1) // 2
    assert area == triangle + (L // block_l) * block_l * (block_l - 1) // 2
    # That is (1 + block_l / L) / 2 of the full L x S, to O(1/L): the causal forward
    # costs about half of the non-causal one when block_l << L.
    assert area / (L * S) <= (1 + block_l / L) / 2 + 1 / L


def test_hidden_values_reach_the_output_as_on_the_direct_path(backend):
    # With top-left alignment and L < S, keys j >= L are hidden from every query, and in
    # each query block keys past its last row are hidden from the whole block; the
    # blocked path skips them. docs/semantics.rst ("Non-finite values"): the direct path
    # (torch's math backend) multiplies hidden values by weight 0, and 0 * NaN is NaN, so
    # a NaN value reaches its column of every row, also rows whose blocks skip it.
    L, S, block_l, block_s = 8, 12, 2, 3
    rng = np.random.default_rng(3)
    q, k = rng.standard_normal((1, L, 4)), rng.standard_normal((1, S, 4))
    v = rng.standard_normal((1, S, 3))
    v[:, 9:, 0] = np.nan  # hidden from every row
    v[:, 5, 1] = np.nan  # seen from row 5 on; the blocks of rows [0, 4) stop before it
    res = blocked_attention(
        *(backend.asarray(x) for x in (q, k, v)), scale=0.5, bias=None, allowed=None,
        keep=None, dropout_p=0.0, masked_rows="zero", causal=True, alignment="top_left",
        block_l=block_l, block_s=block_s, xp=backend.xp,
    )
    out = backend.to_numpy(res.out)
    assert np.all(np.isnan(out[..., :2])), "columns 0 and 1 meet a NaN value in every row"
    # Column 2 has no NaN value: the direct path on the same inputs.
    p = Problem(q=q, k=k, v=v, scale=0.5, mask=None, bias=None, keep=None,
                dropout_p=0.0, causal=True, alignment="top_left", masked_rows="zero",
                block_l=block_l, block_s=block_s)
    want = _run(backend, p, path="direct")[0]
    # The bound of the finite entries: V's magnitude without its NaNs.
    bound = _bounds(replace(p, v=np.where(np.isnan(v), 0.0, v)))["out"]
    _assert_close(out, want, bound, "every row")


# --- threads --------------------------------------------------------------------------


@given(p=problems(max_len=4), threads=st.sampled_from([2, 3, 5]))
def test_bit_identical_whatever_the_thread_count(backend, p, threads):
    one = _run(backend, p, path="blocked", num_threads=1)
    many = _run(backend, p, path="blocked", num_threads=threads)
    for a, b in zip(one, many, strict=True):
        assert np.array_equal(a, b, equal_nan=True)
    # The backward too, including the ordered sums into broadcast dk, dv, dq and d bias.
    one = _run_backward(backend, p, path="blocked", num_threads=1)
    many = _run_backward(backend, p, path="blocked", num_threads=threads)
    for a, b in zip(one, many, strict=True):
        assert (a is None and b is None) or np.array_equal(a, b, equal_nan=True)


@pytest.mark.parametrize("threads", [1, 3])
def test_an_error_in_a_worker_reaches_the_caller(threads):
    # A keep-mask that does not broadcast against a block fails inside the work items;
    # the error must come out of the call (not hang it), whatever the thread count.
    import array_api_compat.numpy as xnp

    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((4, 6, 3)) for _ in range(3))
    bad_keep = np.ones((4, 6, 5), dtype=bool)  # 5 keys where there are 6
    with pytest.raises(ValueError):
        blocked_attention(q, k, v, scale=1.0, bias=None, allowed=None, keep=bad_keep,
                          dropout_p=0.5, masked_rows="zero", block_l=2, block_s=4,
                          num_threads=threads, xp=xnp)
    dout = rng.standard_normal((4, 6, 3))
    with pytest.raises(ValueError):
        blocked_attention_backward(dout, q, k, v, scale=1.0, bias=None, allowed=None,
                                   keep=bad_keep, dropout_p=0.5, masked_rows="zero",
                                   out=dout, lse=np.zeros((4, 6)), block_l=2, block_s=4,
                                   num_threads=threads, xp=xnp)


def test_front_door_bit_identical_across_set_num_threads(backend):
    rng = np.random.default_rng(11)
    # Four work items (B = 2 x H = 2) for up to four threads.
    q, k, v = (backend.asarray(rng.standard_normal((2, 2, 150, 4))) for _ in range(3))
    results = []
    for n in (1, 2, 4):
        with refattn.set_num_threads(n):
            results.append(backend.to_numpy(
                refattn.attention(q, k, v, causal=True, implementation="blocked")
            ))
    assert all(np.array_equal(results[0], r) for r in results[1:])


def test_set_num_threads_restores_and_defaults():
    from refattn._threads import available_cores

    before = refattn.get_num_threads()
    with refattn.set_num_threads(3) as setting:
        assert refattn.get_num_threads() == 3
        assert "3" in repr(setting)
        with refattn.set_num_threads(None):
            assert refattn.get_num_threads() == available_cores()
        assert refattn.get_num_threads() == 3
    assert refattn.get_num_threads() == before
    # Called without ``with`` it stays in effect; undo it by hand.
    previous = refattn.set_num_threads(2)
    try:
        assert refattn.get_num_threads() == 2
    finally:
        previous.__exit__(None, None, None)
    assert refattn.get_num_threads() == before


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (0, ValueError, "num_threads must be at least 1"),
        (-2, ValueError, "got -2"),
        (1.5, TypeError, r"positive int or None \(all available cores\); got float 1.5"),
        (True, TypeError, "got bool True"),
        ("4", TypeError, "got str '4'"),
    ],
)
def test_set_num_threads_rejects(value, error, message):
    before = refattn.get_num_threads()
    with pytest.raises(error, match=message):
        refattn.set_num_threads(value)
    assert refattn.get_num_threads() == before


def test_blas_pool_is_held_at_one_thread_and_restored():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import array_api_compat.numpy as xnp

    from refattn import _threads

    def blas_threads():
        return [i["num_threads"] for i in threadpoolctl.threadpool_info()
                if i["user_api"] == "blas"]

    before = blas_threads()
    with _threads.worker_threads(xnp) as n:
        assert n == refattn.get_num_threads()
        assert all(t == 1 for t in blas_threads())
        with _threads.worker_threads(xnp):  # nested/concurrent users share the limit
            assert all(t == 1 for t in blas_threads())
        assert all(t == 1 for t in blas_threads())
    assert blas_threads() == before


# --- dispatch and errors ----------------------------------------------------------------


def _record_paths(monkeypatch):
    calls = []
    for name in ("direct_attention", "blocked_attention"):
        original = getattr(attention_module, name)

        def recorder(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(attention_module, name, recorder)
    return calls


def test_dispatch_by_score_size(monkeypatch):
    calls = _record_paths(monkeypatch)
    monkeypatch.setattr(attention_module, "DIRECT_MAX_SCORES", 2 * 3 * 4 * 5)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 3, 4, 6))
    small = rng.standard_normal((2, 3, 5, 6))  # scores (2, 3, 4, 5): at the threshold
    large = rng.standard_normal((2, 3, 6, 6))  # scores (2, 3, 4, 6): above it
    refattn.attention(q, small, small)
    refattn.attention(q, large, large)
    refattn.attention(q, large, large, implementation="direct")
    refattn.attention(q, small, small, implementation="blocked")
    refattn.attention(q, large, large, precision="compensated")  # direct path only
    assert calls == ["direct_attention", "blocked_attention", "direct_attention",
                     "blocked_attention"]


def test_default_threshold_is_documented_value():
    # The docs (docs/performance.rst and the attention docstring) state 2**20.
    assert attention_module.DIRECT_MAX_SCORES == 2**20


@pytest.mark.parametrize("bad", ["Blocked", "flash", "cuda_blocked", 1])
def test_bad_implementation_name(bad):
    x = np.ones((1, 2, 3))
    with pytest.raises(ValueError, match=r"implementation must be one of None, 'direct', "
                                         r"'blocked'.*; got"):
        refattn.attention(x, x, x, implementation=bad)


def test_blocked_refuses_compensated_precision():
    x = np.ones((1, 2, 3))
    with pytest.raises(ValueError, match="precision='compensated' computes in float64 on the "
                                         "direct path"):
        refattn.attention(x, x, x, implementation="blocked", precision="compensated")


# --- memory -----------------------------------------------------------------------------


def test_extra_memory_is_per_block_not_per_score_matrix():
    # NumPy reports its allocations to tracemalloc. At L = S = 4096 one float64 score
    # matrix is 128 MiB. The blocked path holds, per worker, at most four blocks of
    # SCORE_BLOCK_ELEMENTS scores at once (the scores, their exp, and the same two for
    # the first block's shift sample and max), plus its copies of the inputs (q scaled,
    # [K^T; 1], [V, 1]) and the outputs (out and LSE).
    import array_api_compat.numpy as xnp

    L = S = 4096
    E = Ev = 8
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, n, E)) for n in (L, S, S))
    tracemalloc.start()
    try:
        blocked_attention(
            q, k, v, scale=0.3, bias=None, allowed=None, keep=None, dropout_p=0.0,
            masked_rows="zero", causal=True, num_threads=2, xp=xnp,
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    workers, block_bytes = 2, 8 * SCORE_BLOCK_ELEMENTS
    copies = 8 * (L * E + (E + 1) * S + S * (Ev + 1) + L * Ev + L)
    budget = workers * 4 * block_bytes + copies
    assert peak <= budget, f"peak {peak / 2**20:.1f} MiB over budget {budget / 2**20:.1f} MiB"
    assert budget < L * S * 8 / 10  # the point: a tenth of one score matrix


def test_window_left_edge_skips_the_keys_it_hides(backend):
    # A sliding window (left=2, right=0, top-left, L = S = 12): rows [8, 12) see keys
    # >= 6 only, and their blocks skip keys 0..3. NaN keys and values at 0..3: the
    # forward follows the direct path (docs/semantics.rst, "Non-finite values": a NaN
    # score at a masked position poisons its row), so every row is NaN; the backward's
    # blocks of rows [8, 12) do not read them (the gradients do not follow that rule
    # yet, as docs/semantics.rst says).
    L = S = 12
    rng = np.random.default_rng(4)
    q, k = rng.standard_normal((1, L, 4)), rng.standard_normal((1, S, 4))
    v = rng.standard_normal((1, S, 2))
    k[:, :4, :] = np.nan
    v[:, :4, :] = np.nan
    xs = [backend.asarray(x) for x in (q, k, v)]
    kw = dict(scale=0.5, bias=None, allowed=None, keep=None, dropout_p=0.0,
              masked_rows="zero", causal=True, alignment="top_left", block_l=4, block_s=3,
              window_left=2, xp=backend.xp)
    res = blocked_attention(*xs, **kw)
    out = backend.to_numpy(res.out)
    assert np.all(np.isnan(out)), "every row has a NaN score, masked or not"
    clean_k, clean_v = np.where(np.isnan(k), 0.0, k), np.where(np.isnan(v), 0.0, v)
    p = Problem(q=q, k=clean_k, v=clean_v, scale=0.5, mask=None, bias=None, keep=None,
                dropout_p=0.0, causal=True, alignment="top_left", masked_rows="zero",
                block_l=4, block_s=3, left=2, dout=rng.standard_normal((1, L, 2)))
    grads = blocked_attention_backward(backend.asarray(p.dout), *xs, out=None, lse=None, **kw)
    # The forward's NaN rows (all of them) reach the backward through the saved output
    # and LSE: every gradient entry is NaN, as on the direct path with the same inputs.
    nan_grads = _run_backward(backend, replace(p, k=k, v=v), path="direct")
    for name, got, want in zip("qkv", (grads.dq, grads.dk, grads.dv), nan_grads, strict=False):
        assert np.array_equal(np.isnan(backend.to_numpy(got)), np.isnan(want)), f"d{name}"


def test_window_and_alibi_take_no_score_sized_memory():
    # The left edge, ALiBi and mask_mod are applied per block (not materialised at
    # (L, S)), so a window with ALiBi, softcap and a document mask through the front door
    # stays within the per-block budget of the plain blocked path at L = S = 4096, where
    # an (L, S) float64 ALiBi alone would be 128 MiB and the window's or the document
    # mask's booleans 16 MiB each.
    from refattn import mods

    L = S = 4096
    E = Ev = 8
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((1, n, E)) for n in (L, S, S))
    # The first blocked call of a process settles the allocator with one untouched
    # 31 MiB array (refattn._threads); have it happen before the measurement.
    refattn.attention(q[:, :2], k[:, :2], v[:, :2], implementation="blocked")
    tracemalloc.start()
    try:
        refattn.attention(q, k, v, window=(300, 0), alibi_slopes=np.array([0.25]),
                          softcap=5.0, implementation="blocked",
                          mask_mod=mods.document_mask(np.arange(L) // 1000))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    workers, block_bytes = refattn.get_num_threads(), 8 * SCORE_BLOCK_ELEMENTS
    copies = 8 * (L * E + (E + 1) * S + S * (Ev + 1) + 2 * L * Ev + 2 * L)
    # Per worker: the four blocks of the plain path, and the per-block ALiBi distances
    # and the softcapped scores (three more).
    budget = workers * 7 * block_bytes + copies
    assert peak <= budget, f"peak {peak / 2**20:.1f} MiB over budget {budget / 2**20:.1f} MiB"
    assert budget < L * S * 8 / 4
