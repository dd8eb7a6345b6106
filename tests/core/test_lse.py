"""The log-sum-exp that ``attention(..., return_lse=True)`` returns.

It must be the natural-log LSE of the final scores (scaled, biased, masked) of every
(..., H, L) row, -inf on fully masked rows, whatever the layout, dropout or masked-row
policy. References: torch.logsumexp of scores built here independently, exact identities
(scale 0 gives log of the number of allowed keys), and mpmath.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refattn
from tests.helpers.cases import divisors

U64 = float(np.finfo(np.float64).eps) / 2  # unit roundoff of float64
EPS64 = float(np.finfo(np.float64).eps)


@st.composite
def problems(draw: st.DrawFn, *, min_len: int = 0, amplitude: float = 2.0) -> dict[str, Any]:
    """Sizes, options and NumPy arrays of one attention problem (BHLD)."""
    batch = draw(st.sampled_from([(), (1,), (2,)]))
    H = draw(st.sampled_from([1, 2, 4]))
    K = draw(st.sampled_from(divisors(H)))
    L = draw(st.integers(min_len, 4))
    S = draw(st.integers(min_len, 5))
    E = draw(st.integers(1, 6))
    scale = draw(st.one_of(st.none(), st.sampled_from([0.0, -0.75]),
                           st.floats(-2.0, 2.0, allow_nan=False)))
    causal = draw(st.sampled_from([None, "top_left", "bottom_right"]))
    full = (*batch, H, L, S)
    mask_shape = draw(st.sampled_from([None, (L, S), (H, L, S), full]))
    bias_shape = draw(st.sampled_from([None, (L, S), (H, 1, S), (*batch, 1, 1, S), full]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q = rng.uniform(-amplitude, amplitude, (*batch, H, L, E))
    k = rng.uniform(-amplitude, amplitude, (*batch, K, S, E))
    v = rng.standard_normal((*batch, K, S, 2))
    mask = None
    if mask_shape is not None:
        mask = rng.random(mask_shape) < 0.7
        if L and draw(st.booleans()):
            mask[..., 0, :] = False  # a fully masked row
    bias = None
    if bias_shape is not None:
        bias = rng.uniform(-amplitude, amplitude, bias_shape)
        if draw(st.booleans()):
            bias[rng.random(bias_shape) < 0.2] = -np.inf
    return dict(q=q, k=k, v=v, mask=mask, bias=bias, causal=causal, scale=scale)


def _final_scores(p: dict[str, Any]) -> np.ndarray:
    """scale * q @ k^T + bias, masked with -inf: built here, not by refattn."""
    q, k = p["q"], p["k"]
    H, L, S, E = q.shape[-3], q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1 / math.sqrt(E) if p["scale"] is None else p["scale"]
    s = scale * (q @ np.swapaxes(np.repeat(k, H // k.shape[-3], axis=-3), -1, -2))
    if p["bias"] is not None:
        s = s + p["bias"]
    allowed = p["mask"]
    if p["causal"] is not None:
        shift = 0 if p["causal"] == "top_left" else S - L
        tri = np.tril(np.ones((L, S), dtype=bool), k=shift)
        allowed = tri if allowed is None else allowed & tri
    if allowed is not None:
        s = np.where(allowed, s, -np.inf)
    return s


def _lse_bound(p: dict[str, Any], lse: np.ndarray) -> np.ndarray:
    """First-order bound on |computed LSE - exact| for ONE float64 implementation.

    A score carries at most (E + 2) u A, A = |scale| sum_e |q_e||k_e| + |bias| of its row
    (E products and sums, the scale, the bias); the LSE is 1-Lipschitz in the max-norm of
    its row, so it inherits that. exp(s - max), the S-term sum and the log add
    (S + 3) u + u log S (the log of a sum with relative error (S + 2) u, itself rounded),
    and the final max + log adds u |lse|.
    """
    q, k = p["q"], p["k"]
    H, S, E = q.shape[-3], k.shape[-2], q.shape[-1]
    scale = 1 / math.sqrt(E) if p["scale"] is None else p["scale"]
    a = abs(scale) * (np.abs(q) @ np.swapaxes(np.abs(np.repeat(k, H // k.shape[-3], axis=-3)),
                                              -1, -2))
    if p["bias"] is not None:
        a = a + np.where(np.isfinite(p["bias"]), np.abs(p["bias"]), 0.0)
    A = np.max(a, axis=-1, initial=0.0)
    finite = np.where(np.isfinite(lse), np.abs(lse), 0.0)
    return (E + 2) * U64 * A + (S + 3 + math.log(max(S, 1))) * U64 + U64 * finite


def _run(backend: Any, p: dict[str, Any], **options: Any) -> Any:
    def conv(x: Any) -> Any:
        return None if x is None else backend.asarray(x)

    return refattn.attention(
        conv(p["q"]), conv(p["k"]), conv(p["v"]), mask=conv(p["mask"]), bias=conv(p["bias"]),
        causal=p["causal"] is not None, alignment=p["causal"] or "top_left", scale=p["scale"],
        return_lse=True, **options,
    )


@given(p=problems())
def test_lse_is_torch_logsumexp_of_the_final_scores(backend, p):
    torch = pytest.importorskip("torch")
    lse = backend.to_numpy(_run(backend, p).lse)
    s = _final_scores(p)
    want = torch.logsumexp(torch.from_numpy(np.ascontiguousarray(s)), dim=-1).numpy()
    assert lse.shape == want.shape
    dead = np.all(s == -np.inf, axis=-1)  # also every row when S = 0
    np.testing.assert_array_equal(lse[dead], -np.inf)
    np.testing.assert_array_equal(want[dead], -np.inf)
    assert np.all(np.isfinite(lse[~dead]))
    # Two float64 implementations, each within _lse_bound of the exact value.
    bound = 2 * _lse_bound(p, want)
    err = np.abs(lse[~dead] - want[~dead])
    assert np.all(err <= bound[~dead]), (err.max(), bound[~dead].min())


@given(p=problems(min_len=1), c=st.floats(-50.0, 50.0, allow_nan=False))
def test_scale_zero_gives_log_of_the_allowed_key_count_plus_a_constant_bias(backend, p, c):
    # Every score is 0 (+ c): the LSE is log(n) + c exactly, n the allowed keys of the
    # row, in natural log. The computation is exact up to the log (faithful: 1 ulp) and
    # the final addition of c (1 ulp): |err| <= eps (|log n| + |log n + c|).
    L, S = p["q"].shape[-2], p["k"].shape[-2]
    p = dict(p, scale=0.0, bias=np.full((L, S), c))
    lse = backend.to_numpy(_run(backend, p).lse)
    allowed = np.isfinite(_final_scores(p))
    n = np.broadcast_to(allowed, (*lse.shape, S)).sum(axis=-1)
    live = n > 0
    np.testing.assert_array_equal(lse[~live], -np.inf)
    want = np.log(n[live]) + c
    tol = EPS64 * (np.abs(np.log(n[live])) + np.abs(want))
    assert np.all(np.abs(lse[live] - want) <= tol)


@pytest.mark.parametrize("seed", range(4))
def test_lse_against_mpmath(backend, seed):
    mpmath = pytest.importorskip("mpmath")
    rng = np.random.default_rng(seed)
    # Logits of a few tens, where float64 loses most: the bound grows with A.
    q, k = rng.uniform(-4, 4, (2, 3, 8)), rng.uniform(-4, 4, (2, 5, 8))
    bias = rng.uniform(-4, 4, (3, 5))
    mask = rng.random((3, 5)) < 0.7
    mask[:, 0] = True
    p = dict(q=q, k=k, v=rng.standard_normal((2, 5, 2)), mask=mask, bias=bias, causal=None,
             scale=-0.4)
    lse = backend.to_numpy(_run(backend, p).lse)
    with mpmath.workdps(60):
        want = np.empty(lse.shape)
        for h, i in np.ndindex(lse.shape):
            terms = [
                mpmath.exp(mpmath.mpf(-0.4) * mpmath.fsum(
                    mpmath.mpf(float(a)) * mpmath.mpf(float(b)) for a, b in zip(q[h, i], k[h, j],
                                                                                strict=True))
                    + mpmath.mpf(float(bias[i, j])))
                for j in range(5) if mask[i, j]
            ]
            want[h, i] = float(mpmath.log(mpmath.fsum(terms)))
    # One implementation against the exact value (mpmath at 60 digits, rounded once).
    assert np.all(np.abs(lse - want) <= _lse_bound(p, want) + U64 * np.abs(want))


@given(p=problems(min_len=1))
def test_lse_ignores_dropout_layout_and_masked_row_policy(backend, p):
    base = backend.to_numpy(_run(backend, p).lse)
    shape = (*p["q"].shape[:-1], p["k"].shape[-2])
    keep = backend.asarray(np.random.default_rng(0).random(shape) >= 0.5)
    dropped = backend.to_numpy(_run(backend, p, dropout_p=0.5, dropout_mask=keep).lse)
    np.testing.assert_array_equal(dropped, base)  # the LSE is of the weights before dropout
    for policy in ("nan", "uniform"):
        np.testing.assert_array_equal(
            backend.to_numpy(_run(backend, p, masked_rows=policy).lse), base)
    swapped = {**p, **{n: np.swapaxes(p[n], -3, -2) for n in ("q", "k", "v")}}
    blhd = backend.to_numpy(_run(backend, swapped, layout="BLHD").lse)
    np.testing.assert_array_equal(blhd, base)  # always (..., H, L), whatever the layout


def test_lse_shapes_and_dtypes(backend):
    rng = np.random.default_rng(1)
    # 2-D inputs: no head axis, an (L,) LSE.
    q, k, v = (backend.asarray(rng.standard_normal(s)) for s in ((3, 4), (5, 4), (5, 2)))
    assert tuple(refattn.attention(q, k, v, return_lse=True).lse.shape) == (3,)
    # float32 inputs: computed in float64, returned as float32.
    q, k, v = (backend.asarray(rng.standard_normal(s).astype(np.float32))
               for s in ((2, 4, 3, 4), (2, 2, 5, 4), (2, 1, 5, 2)))
    lse32 = backend.to_numpy(refattn.attention(q, k, v, return_lse=True).lse)
    assert lse32.shape == (2, 4, 3) and lse32.dtype == np.float32
    q64, k64, v64 = (backend.asarray(backend.to_numpy(x).astype(np.float64)) for x in (q, k, v))
    lse64 = backend.to_numpy(refattn.attention(q64, k64, v64, return_lse=True).lse)
    np.testing.assert_array_equal(lse32, lse64.astype(np.float32))  # rounded once
    # No keys: every row is fully masked. No queries: an empty LSE.
    q, k, v = (backend.asarray(rng.standard_normal(s)) for s in ((2, 3, 4), (2, 0, 4), (2, 0, 2)))
    empty_keys = backend.to_numpy(refattn.attention(q, k, v, return_lse=True).lse)
    assert empty_keys.shape == (2, 3)
    np.testing.assert_array_equal(empty_keys, -np.inf)
    q = backend.asarray(rng.standard_normal((2, 0, 4)))
    k, v = (backend.asarray(rng.standard_normal(s)) for s in ((2, 5, 4), (2, 5, 2)))
    assert tuple(refattn.attention(q, k, v, return_lse=True).lse.shape) == (2, 0)


def test_lse_has_the_batch_shape_of_the_scores(backend):
    # A batch dim carried by v alone does not reach the scores, so not the LSE either;
    # attention_backward accepts this LSE as it is.
    rng = np.random.default_rng(2)
    q, k = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4))
    v = rng.standard_normal((6, 2, 5, 2))
    res = refattn.attention(*(backend.asarray(x) for x in (q, k, v)), return_lse=True)
    assert tuple(res.out.shape) == (6, 2, 3, 2)
    assert tuple(res.lse.shape) == (2, 3)
