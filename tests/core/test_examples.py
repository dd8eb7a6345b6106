"""Edge cases of ``refattn.attention`` pinned by hand-derived expectations."""

from __future__ import annotations

import math

import numpy as np
import pytest

import refattn

EPS = np.finfo(np.float64).eps


def _np(backend, x):
    return backend.to_numpy(x)


def test_hand_derived_two_keys(backend):
    # One query q = (1, 0), keys (1, 0) and (0, 0), scale 1: logits (1, 0), so the
    # weights are e/(e+1) and 1/(e+1); values 2 and -1.
    q = np.array([[1.0, 0.0]])
    k = np.array([[1.0, 0.0], [0.0, 0.0]])
    v = np.array([[2.0], [-1.0]])
    res = refattn.attention(*(backend.asarray(x) for x in (q, k, v)), scale=1.0,
                            return_weights=True, return_lse=True)
    e = math.e
    w = np.array([[e / (e + 1), 1 / (e + 1)]])
    np.testing.assert_allclose(_np(backend, res.weights), w, rtol=4 * EPS)
    np.testing.assert_allclose(_np(backend, res.out), w @ v, rtol=8 * EPS)
    np.testing.assert_allclose(_np(backend, res.lse), [math.log(e + 1)], rtol=4 * EPS)


@pytest.mark.parametrize("L,S", [(0, 3), (2, 0), (0, 0)])
def test_empty_sequences(backend, L, S):
    q = np.ones((2, 3, L, 4))
    k = np.ones((2, 3, S, 4))
    v = np.ones((2, 3, S, 5))
    res = refattn.attention(*(backend.asarray(x) for x in (q, k, v)), return_weights=True,
                            return_lse=True)
    out = _np(backend, res.out)
    assert out.shape == (2, 3, L, 5)
    assert np.all(out == 0.0)  # no keys: every row is fully masked, policy "zero"
    assert _np(backend, res.weights).shape == (2, 3, L, S)
    assert np.all(_np(backend, res.lse) == -np.inf)


@pytest.mark.parametrize("policy", ["zero", "nan", "uniform"])
def test_fully_masked_rows_follow_the_policy(backend, policy):
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((3, 4)), rng.standard_normal((5, 4))
    v = rng.standard_normal((5, 2))
    mask = np.ones((3, 5), dtype=bool)
    mask[1] = False
    res = refattn.attention(*(backend.asarray(x) for x in (q, k, v)),
                            mask=backend.asarray(mask), masked_rows=policy, return_lse=True)
    row = _np(backend, res.out)[1]
    expected = {"zero": np.zeros(2), "nan": np.full(2, np.nan), "uniform": v.mean(axis=0)}
    np.testing.assert_allclose(row, expected[policy], rtol=4 * EPS, atol=0)
    assert _np(backend, res.lse)[1] == -np.inf
    assert np.all(np.isfinite(_np(backend, res.out)[[0, 2]]))


def test_bottom_right_alignment_with_more_queries_than_keys(backend):
    # L = 3, S = 2: query i sees keys j <= i - 1, so row 0 sees nothing, row 1 only key 0,
    # row 2 both keys.
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((3, 4)), rng.standard_normal((2, 4))
    v = np.array([[1.0, 10.0], [-3.0, 5.0]])
    res = refattn.attention(*(backend.asarray(x) for x in (q, k, v)), causal=True,
                            alignment="bottom_right", return_weights=True)
    out, w = _np(backend, res.out), _np(backend, res.weights)
    np.testing.assert_array_equal(out[0], [0.0, 0.0])
    np.testing.assert_array_equal(w[1], [1.0, 0.0])
    np.testing.assert_array_equal(out[1], v[0])
    assert np.all(w[2] > 0)


def test_top_left_alignment_with_more_keys_than_queries(backend):
    rng = np.random.default_rng(2)
    q, k, v = rng.standard_normal((2, 3)), rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    w = _np(backend, refattn.attention(*(backend.asarray(x) for x in (q, k, v)), causal=True,
                                       return_weights=True).weights)
    np.testing.assert_array_equal(w[0, 1:], 0.0)
    np.testing.assert_array_equal(w[1, 2:], 0.0)
    assert w[0, 0] == 1.0


def test_head_dims_of_keys_and_values_may_differ(backend):
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal(s) for s in [(2, 5, 7), (2, 6, 7), (2, 6, 3)])
    assert refattn.attention(*(backend.asarray(x) for x in (q, k, v))).shape == (2, 5, 3)


def test_huge_logits_give_the_value_of_the_winning_key(backend):
    # Logit gaps of ~1e4 make every other weight exp(-1e4) = 0 exactly in float64: the
    # stable softmax must return the winning value exactly, not NaN.
    q = np.array([[100.0, 0.0], [-100.0, 0.0]])
    k = np.array([[100.0, 0.0], [0.0, 100.0], [-100.0, 0.0]])
    v = np.array([[1.5], [2.5], [3.5]])
    out = _np(backend, refattn.attention(*(backend.asarray(x) for x in (q, k, v)), scale=1.0))
    np.testing.assert_array_equal(out, [[1.5], [3.5]])


def test_nan_in_one_query_row_stays_in_that_row(backend):
    rng = np.random.default_rng(4)
    q, k, v = rng.standard_normal((3, 4)), rng.standard_normal((5, 4)), rng.standard_normal((5, 2))
    q[1, 2] = np.nan
    out = _np(backend, refattn.attention(*(backend.asarray(x) for x in (q, k, v))))
    assert np.all(np.isnan(out[1]))
    assert np.all(np.isfinite(out[[0, 2]]))


def test_zero_scale_gives_the_mean_of_the_values(backend):
    rng = np.random.default_rng(5)
    q = rng.standard_normal((3, 4)) * 100
    k, v = rng.standard_normal((6, 4)), rng.standard_normal((6, 2))
    out = _np(backend, refattn.attention(*(backend.asarray(x) for x in (q, k, v)), scale=0.0))
    # Weights are exactly 1/6; the mean of 6 terms is off by at most 6 u max|V|.
    np.testing.assert_allclose(out, np.broadcast_to(v.mean(axis=0), (3, 2)), rtol=0,
                               atol=6 * EPS * np.abs(v).max())


def test_negative_scale_equals_negated_queries(backend):
    rng = np.random.default_rng(6)
    q, k, v = rng.standard_normal((3, 4)), rng.standard_normal((6, 4)), rng.standard_normal((6, 2))
    a = _np(backend, refattn.attention(*(backend.asarray(x) for x in (q, k, v)), scale=-0.4))
    b = _np(backend, refattn.attention(*(backend.asarray(x) for x in (-q, k, v)), scale=0.4))
    np.testing.assert_array_equal(a, b)  # negation is exact, so is everything after it


def test_default_scale_is_one_over_sqrt_head_dim(backend):
    rng = np.random.default_rng(7)
    q, k, v = rng.standard_normal((3, 9)), rng.standard_normal((4, 9)), rng.standard_normal((4, 2))
    a = _np(backend, refattn.attention(*(backend.asarray(x) for x in (q, k, v))))
    b = _np(backend, refattn.attention(*(backend.asarray(x) for x in (q, k, v)), scale=1 / 3))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_results_come_back_in_the_input_dtype(backend, dtype):
    if backend.name == "array_api_strict" and dtype == "float16":
        pytest.skip("array-api-strict has no float16")
    rng = np.random.default_rng(8)
    q, k, v = (rng.standard_normal((2, 3, 4)).astype(dtype) for _ in range(3))
    res = refattn.attention(*(backend.asarray(x) for x in (q, k, v)), return_weights=True,
                            return_lse=True)
    for x in (res.out, res.weights, res.lse):
        assert str(_np(backend, x).dtype) == dtype
    exact = refattn.attention(*(backend.asarray(x.astype(np.float64)) for x in (q, k, v)))
    # A float64 result rounded once: within half an ulp of the dtype, relative to max|out|.
    half_ulp = np.finfo(dtype).eps / 2 * np.abs(_np(backend, exact)).max()
    assert np.abs(_np(backend, res.out).astype(np.float64) - _np(backend, exact)).max() <= half_ulp


def test_float32_compute_dtype_is_a_float32_computation(backend):
    rng = np.random.default_rng(9)
    q, k, v = (rng.standard_normal((4, 16, 8)) * 3 for _ in range(3))
    xs = [backend.asarray(x) for x in (q, k, v)]
    f64 = _np(backend, refattn.attention(*xs))
    f32 = _np(backend, refattn.attention(*xs, compute_dtype="float32"))
    assert f32.dtype == np.float64  # cast back to the input dtype
    err = np.abs(f32 - f64).max()
    # A float32 computation is visibly off (well above float64 rounding) but within the
    # first-order float32 bound: 2 (E + 2) u32 |logit| + (2S + 3) u32, times max|V|.
    u32 = np.finfo(np.float32).eps / 2
    logit = np.abs(q).sum(-1).max() * np.abs(k).max() / np.sqrt(8)
    assert 1e3 * EPS < err <= (2 * 10 * u32 * logit + 35 * u32) * np.abs(v).max()


def test_inputs_are_never_written_to(backend):
    rng = np.random.default_rng(10)
    arrays = [rng.standard_normal((2, 3, 4)) for _ in range(3)]
    mask = rng.random((3, 3)) < 0.5
    bias = rng.standard_normal((3, 3))
    keep = rng.random((2, 3, 3)) < 0.5
    copies = [a.copy() for a in (*arrays, mask, bias, keep)]
    given = [backend.asarray(a) for a in (*arrays, mask, bias, keep)]
    refattn.attention(*given[:3], mask=given[3], bias=given[4], dropout_p=0.5,
                      dropout_mask=given[5], causal=True, return_weights=True)
    for before, after in zip(copies, given, strict=True):
        np.testing.assert_array_equal(_np(backend, after), before)


def test_rank_two_inputs_give_rank_two_outputs(backend):
    rng = np.random.default_rng(11)
    q, k, v = rng.standard_normal((3, 4)), rng.standard_normal((5, 4)), rng.standard_normal((5, 2))
    res = refattn.attention(*(backend.asarray(x) for x in (q, k, v)), return_weights=True,
                            return_lse=True)
    assert (res.out.shape, res.weights.shape, res.lse.shape) == ((3, 2), (3, 5), (3,))


def test_leading_dims_broadcast_like_matmul(backend):
    rng = np.random.default_rng(12)
    q = rng.standard_normal((2, 3, 4, 5))
    k = rng.standard_normal((3, 6, 5))       # no batch axis: shared by both batches
    v = rng.standard_normal((1, 3, 6, 2))
    out = _np(backend, refattn.attention(*(backend.asarray(x) for x in (q, k, v))))
    explicit = _np(backend, refattn.attention(
        backend.asarray(q), backend.asarray(np.broadcast_to(k, (2, 3, 6, 5)).copy()),
        backend.asarray(np.broadcast_to(v, (2, 3, 6, 2)).copy())))
    assert out.shape == (2, 3, 4, 2)
    np.testing.assert_array_equal(out, explicit)


def test_dropout_with_an_explicit_keep_mask(backend):
    rng = np.random.default_rng(13)
    q, k, v = (rng.standard_normal((2, 4, 3)) for _ in range(3))
    keep = rng.random((2, 4, 4)) >= 0.25
    xs = [backend.asarray(x) for x in (q, k, v)]
    res = refattn.attention(*xs, dropout_p=0.25, dropout_mask=backend.asarray(keep),
                            return_weights=True, return_dropout_mask=True)
    w = _np(backend, res.weights)   # before dropout
    expected = (np.where(keep, w, 0.0) / 0.75) @ v
    np.testing.assert_allclose(_np(backend, res.out), expected, rtol=0,
                               atol=8 * EPS * np.abs(v).max() * 4 / 0.75)
    np.testing.assert_array_equal(_np(backend, res.dropout_mask), keep)
    plain = _np(backend, refattn.attention(*xs, return_weights=True).weights)
    np.testing.assert_array_equal(w, plain)


def test_dropout_drawn_from_a_seed_is_reproducible_and_returned(backend):
    rng = np.random.default_rng(14)
    xs = [backend.asarray(rng.standard_normal((2, 3, 5, 4))) for _ in range(3)]
    a = refattn.attention(*xs, dropout_p=0.5, rng=7, return_dropout_mask=True)
    b = refattn.attention(*xs, dropout_p=0.5, rng=np.random.default_rng(7),
                          return_dropout_mask=True)
    keep = _np(backend, a.dropout_mask)
    assert keep.shape == (2, 3, 5, 5) and keep.dtype == bool
    np.testing.assert_array_equal(keep, _np(backend, b.dropout_mask))
    np.testing.assert_array_equal(_np(backend, a.out), _np(backend, b.out))
    # The mask is NumPy's draw at the full score shape, so any backend reproduces it.
    np.testing.assert_array_equal(keep, np.random.default_rng(7).random((2, 3, 5, 5)) >= 0.5)
    again = refattn.attention(*xs, dropout_p=0.5, dropout_mask=a.dropout_mask)
    np.testing.assert_array_equal(_np(backend, again), _np(backend, a.out))


def test_dropout_p_one_drops_everything(backend):
    xs = [backend.asarray(np.ones((2, 3, 4))) for _ in range(3)]
    keep = backend.asarray(np.zeros((2, 3, 3), dtype=bool))
    out = _np(backend, refattn.attention(*xs, dropout_p=1.0, dropout_mask=keep))
    np.testing.assert_array_equal(out, 0.0)
    out = _np(backend, refattn.attention(*xs, dropout_p=1.0, rng=0))
    np.testing.assert_array_equal(out, 0.0)


def test_fields_not_asked_for_are_none(backend):
    xs = [backend.asarray(np.ones((2, 3, 4))) for _ in range(3)]
    res = refattn.attention(*xs, return_lse=True)
    assert isinstance(res, refattn.AttentionResult)
    assert res.weights is None and res.dropout_mask is None and res.lse is not None
    res = refattn.attention(*xs, return_dropout_mask=True)
    assert res.dropout_mask is None  # no dropout, no mask
    out = refattn.attention(*xs)
    assert not isinstance(out, tuple)


def test_blhd_layout_swaps_heads_and_positions(backend):
    rng = np.random.default_rng(15)
    q, k, v = rng.standard_normal((2, 5, 4, 3)), rng.standard_normal((2, 6, 2, 3)), \
        rng.standard_normal((2, 6, 2, 7))
    def sw(x):
        return np.swapaxes(x, -2, -3)

    res = refattn.attention(*(backend.asarray(x) for x in (q, k, v)), layout="BLHD",
                            causal=True, return_lse=True)
    ref = refattn.attention(*(backend.asarray(sw(x).copy()) for x in (q, k, v)), causal=True,
                            return_lse=True)
    np.testing.assert_array_equal(_np(backend, res.out), sw(_np(backend, ref.out)))
    np.testing.assert_array_equal(_np(backend, res.lse), _np(backend, ref.lse))


def test_explicit_namespace_is_accepted(backend):
    xs = [backend.asarray(np.ones((2, 3, 4))) for _ in range(3)]
    out = refattn.attention(*xs, xp=backend.xp)
    assert out.shape == (2, 3, 4)
