"""Properties of ``refattn.attention`` that must hold for every input, on every backend."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import refattn
from tests.helpers.cases import (
    assert_close_within,
    cases,
    output_bound,
    repeat_heads,
    softmax_bound,
)


def _np(backend, x):
    return backend.to_numpy(x).astype(np.float64)


@given(case=cases(), policy=st.sampled_from(["zero", "nan", "uniform"]))
def test_weight_rows_sum_to_one(backend, case, policy):
    mask = case.random_mask(density=0.6, min_true_per_row=0)
    res = refattn.attention(
        *(backend.asarray(x) for x in (case.q, case.k, case.v)), mask=backend.asarray(mask),
        masked_rows=policy, return_weights=True,
    )
    w = _np(backend, res.weights)
    sums = w.sum(axis=-1)
    full = np.broadcast_to(~mask.any(axis=-1), sums.shape)
    assert np.all(np.abs(sums[~full] - 1.0) <= softmax_bound(case.S))
    if policy == "zero":
        assert np.all(w[full] == 0.0)
    elif policy == "nan":
        assert np.all(np.isnan(w[full]))
    else:
        assert np.all(w[full] == 1.0 / case.S)


@given(case=cases(), shift=st.floats(-20.0, 20.0))
def test_adding_a_constant_to_a_row_changes_nothing(backend, case, shift):
    bias = case.rng.standard_normal((case.L, case.S))
    row_shift = case.rng.uniform(-1, 1, size=(case.L, 1)) * shift
    q, k, v = (backend.asarray(x) for x in (case.q, case.k, case.v))
    base = _np(backend, refattn.attention(q, k, v, bias=backend.asarray(bias)))
    moved = refattn.attention(q, k, v, bias=backend.asarray(bias + row_shift))
    # The shift enters every logit, so the logit magnitude in the bound grows by |shift|.
    bound = output_bound(case, scale=case.E**-0.5, bias=np.abs(bias) + abs(shift))
    assert_close_within(moved, base, bound, "row-shifted scores")


@given(case=cases())
def test_permuting_keys_with_values_changes_nothing(backend, case):
    perm = case.rng.permutation(case.S)
    mask = case.random_mask()
    bias = case.rng.standard_normal((case.L, case.S))
    args = dict(mask=backend.asarray(mask), bias=backend.asarray(bias))
    base = _np(backend, refattn.attention(
        *(backend.asarray(x) for x in (case.q, case.k, case.v)), **args))
    permuted = refattn.attention(
        backend.asarray(case.q), backend.asarray(case.k[..., perm, :]),
        backend.asarray(case.v[..., perm, :]), mask=backend.asarray(mask[..., perm]),
        bias=backend.asarray(bias[..., perm]),
    )
    # Only the order of the two S-term sums changes.
    assert_close_within(permuted, base, output_bound(case, scale=case.E**-0.5, bias=bias),
                        "permuted keys")


@given(case=cases())
def test_masked_keys_and_values_do_not_matter(backend, case):
    mask = case.random_mask(density=0.5)
    kmask = np.broadcast_to(mask.any(axis=(-2,)), (*case.batch, case.H, case.S))
    # A key position masked for every query of every head that reads it.
    dead = ~kmask.any(axis=tuple(range(kmask.ndim - 1)))
    k2, v2 = case.k.copy(), case.v.copy()
    k2[..., dead, :] = case.rng.standard_normal(k2[..., dead, :].shape) * 1e3
    v2[..., dead, :] = case.rng.standard_normal(v2[..., dead, :].shape) * 1e3
    m = backend.asarray(mask)
    base = _np(backend, refattn.attention(
        *(backend.asarray(x) for x in (case.q, case.k, case.v)), mask=m))
    other = _np(backend, refattn.attention(
        backend.asarray(case.q), backend.asarray(k2), backend.asarray(v2), mask=m))
    # exp(-inf) is exactly 0 and 0 * finite is exactly 0: nothing else may change, bit
    # for bit.
    np.testing.assert_array_equal(other, base)


@given(case=cases(), where=st.sampled_from(["k", "v"]))
def test_nan_at_a_masked_position_propagates_as_in_torch(backend, case, where):
    # torch adds -inf to masked scores, so a NaN score there survives (NaN + -inf = NaN);
    # in V, 0 * NaN = NaN. refattn follows.
    mask = np.ones((case.L, case.S), dtype=bool)
    mask[:, 0] = False
    k, v = case.k.copy(), case.v.copy()
    (k if where == "k" else v)[..., 0, :] = np.nan
    out = _np(backend, refattn.attention(
        backend.asarray(case.q), backend.asarray(k), backend.asarray(v),
        mask=backend.asarray(mask)))
    assert np.isnan(out).all()


@given(case=cases())
def test_gqa_equals_explicitly_repeated_heads(backend, case):
    q = backend.asarray(case.q)
    grouped = refattn.attention(q, backend.asarray(case.k), backend.asarray(case.v),
                                causal=True, alignment="bottom_right")
    repeated = _np(backend, refattn.attention(
        q, backend.asarray(repeat_heads(case.k, case.H)),
        backend.asarray(repeat_heads(case.v, case.H)), causal=True, alignment="bottom_right"))
    assert_close_within(grouped, repeated, output_bound(case, scale=case.E**-0.5), "GQA")


@given(case=cases(), alignment=st.sampled_from(["top_left", "bottom_right"]))
def test_causal_equals_the_explicit_triangular_mask(backend, case, alignment):
    shift = 0 if alignment == "top_left" else case.S - case.L
    tri = np.tril(np.ones((case.L, case.S), dtype=bool), k=shift)
    q, k, v = (backend.asarray(x) for x in (case.q, case.k, case.v))
    causal = refattn.attention(q, k, v, causal=True, alignment=alignment)
    explicit = _np(backend, refattn.attention(q, k, v, mask=backend.asarray(tri)))
    np.testing.assert_array_equal(_np(backend, causal), explicit)


@given(case=cases())
def test_bool_mask_equals_float_mask_of_minus_infinity(backend, case):
    mask = case.random_mask(min_true_per_row=0)
    additive = np.where(mask, 0.0, -np.inf)
    q, k, v = (backend.asarray(x) for x in (case.q, case.k, case.v))
    as_bool = _np(backend, refattn.attention(q, k, v, mask=backend.asarray(mask)))
    as_float = _np(backend, refattn.attention(q, k, v, bias=backend.asarray(additive)))
    np.testing.assert_array_equal(as_float, as_bool)


@given(case=cases(gqa=False))
def test_outputs_lie_in_the_convex_hull_of_the_values(backend, case):
    mask = case.random_mask(min_true_per_row=0)
    out = _np(backend, refattn.attention(
        *(backend.asarray(x) for x in (case.q, case.k, case.v)), mask=backend.asarray(mask)))
    v = case.v[..., None, :, :]  # (..., H, 1, S, Ev) against mask (..., H, L, S)
    allowed = mask[..., None]
    hi = np.where(allowed, v, -np.inf).max(axis=-2)
    lo = np.where(allowed, v, np.inf).min(axis=-2)
    # A convex combination computed in floating point can overshoot by the rounding of
    # the S-term weighted sum and of the weights: (2S + 3)u max|V|.
    slack = (2 * case.S + 3) * np.finfo(np.float64).eps / 2 * np.abs(case.v).max()
    rows = mask.any(axis=-1)
    rows_b = np.broadcast_to(rows, out.shape[:-1])
    assert np.all(out[rows_b] <= np.broadcast_to(hi, out.shape)[rows_b] + slack)
    assert np.all(out[rows_b] >= np.broadcast_to(lo, out.shape)[rows_b] - slack)
    assert np.all(out[~rows_b] == 0.0)
