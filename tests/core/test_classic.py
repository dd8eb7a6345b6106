"""The classic forms (``attention_scores``, ``bmm_attention``, ``attention_pooling``) against
their textbook definitions (evaluated row by row with exactly rounded sums) and against the
torch code they replace (``torch.einsum``, ``torch.bmm`` + ``torch.softmax``, an
``nn.Linear(F, 1)`` scorer)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refattn
from refattn._tolerance import rounding_bound
from tests.helpers.cases import assert_close_within, cases

U = float(np.finfo(np.float64).eps) / 2  # unit roundoff of float64


def _textbook_softmax_sum(logits: np.ndarray, allowed: np.ndarray, values: np.ndarray):
    """w_j = exp(s_j) / sum_i exp(s_i) over allowed j, out = sum_j w_j v_j, per row.

    Sums are math.fsum (exactly rounded), so this reference is accurate to a few ulp;
    a row with no allowed entry is 0/0, the textbook's NaN.
    """
    weights = np.zeros(logits.shape)
    out = np.zeros((*logits.shape[:-1], values.shape[-1]))
    for idx in np.ndindex(*logits.shape[:-1]):
        s, a = logits[idx], allowed[idx]
        if not a.any():
            weights[idx] = np.nan
            out[idx] = np.nan
            continue
        m = max(s[a])
        e = [math.exp(s[j] - m) if a[j] else 0.0 for j in range(len(s))]
        total = math.fsum(e)
        weights[idx] = [x / total for x in e]
        vals = values[idx[:-1]] if values.ndim == logits.ndim else values
        out[idx] = [math.fsum(weights[idx][j] * vals[j, f] for j in range(len(s)))
                    for f in range(vals.shape[-1])]
    return out, weights


# --- attention_scores ------------------------------------------------------------------------


def _scores_bound(q: np.ndarray, k: np.ndarray, scale: float) -> np.ndarray:
    """Elementwise bound on two evaluations of scale * q.k: the E-term dot product is off
    by at most E u sum|q_e k_e| (plus u for the scaling), each; so 2 (E + 1) u |scale|
    (|q| @ |k|^T)."""
    E = q.shape[-1]
    return 2 * (E + 1) * U * abs(scale) * (np.abs(q) @ np.swapaxes(np.abs(k), -1, -2))


@given(case=cases(), scale=st.sampled_from([1.0, 0.5, -2.0]))
def test_scores_match_the_einsum_contraction_of_blhd_inputs(backend, case, scale):
    ql, kl = (np.swapaxes(x, -3, -2) for x in (case.q, case.k))
    kr = np.repeat(kl, case.H // kl.shape[-2], axis=-2)       # grouped-query heads
    expected = scale * np.einsum("...qhd,...khd->...hqk", ql, kr)
    out = refattn.attention_scores(backend.asarray(ql), backend.asarray(kl), layout="BLHD",
                                   scale=scale)
    got = backend.to_numpy(out)
    assert got.shape == (*case.batch, case.H, case.L, case.S)
    bound = _scores_bound(case.q, np.repeat(case.k, case.H // case.k.shape[-3], axis=-3), scale)
    assert np.all(np.abs(got - expected) <= bound)


@given(case=cases(gqa=False, batch=False))
def test_scores_match_torch_einsum_and_matmul(case):
    torch = pytest.importorskip("torch")
    q, k = torch.from_numpy(case.q), torch.from_numpy(case.k)
    bhld = torch.einsum("hqd,hkd->hqk", q, k).numpy()
    via_matmul = (q @ k.transpose(-2, -1)).numpy()
    blhd = torch.einsum("qhd,khd->hqk", q.transpose(0, 1), k.transpose(0, 1)).numpy()
    bound = _scores_bound(case.q, case.k, 1.0)
    ours = refattn.attention_scores(q, k)
    assert isinstance(ours, torch.Tensor)
    for expected in (bhld, via_matmul, blhd):
        assert np.all(np.abs(ours.numpy() - expected) <= bound)


def test_scores_scale_none_is_one_over_root_e_and_2d_inputs_work():
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((3, 5)), rng.standard_normal((4, 5))
    # The same multiplication by the same float64 number: identical results.
    np.testing.assert_array_equal(refattn.attention_scores(q, k, scale=None),
                                  refattn.attention_scores(q, k, scale=1 / math.sqrt(5)))
    s = refattn.attention_scores(q, k)
    assert s.shape == (3, 4)
    assert np.all(np.abs(s - q @ k.T) <= _scores_bound(q, k, 1.0))


def test_scores_of_float32_inputs_are_float64_rounded_once():
    rng = np.random.default_rng(1)
    q, k = (rng.standard_normal((2, 3, 4)).astype(np.float32) for _ in range(2))
    s = refattn.attention_scores(q, k)
    exact = refattn.attention_scores(q.astype(np.float64), k.astype(np.float64))
    assert s.dtype == np.float32
    # One rounding of the float64 value to float32: half a float32 ulp, relative.
    assert np.all(np.abs(s - exact) <= np.finfo(np.float32).eps / 2 * np.abs(exact))


SCORES_ERRORS = {
    "layout": (dict(layout="BSHD"), ValueError, r"layout must be one of"),
    "dtype": (dict(k=np.ones((2, 5, 4), np.float32)), TypeError,
              r"q and k must share one dtype; got q float64, k float32"),
    "head-dim": (dict(k=np.ones((2, 5, 3))), ValueError, r"k's head dim E must equal q's"),
    "heads": (dict(q=np.ones((3, 4, 4))), ValueError, r"k's head count must divide q's"),
    "rank": (dict(q=np.ones(4)), ValueError, r"q must be at least 2-D"),
    "scale": (dict(scale=float("inf")), ValueError, r"scale must be finite"),
    "integer": (dict(q=np.ones((2, 4, 4), np.int32)), TypeError, r"q must have a real floating"),
}


@pytest.mark.parametrize("name", list(SCORES_ERRORS))
def test_scores_errors(name):
    changes, exc, pattern = SCORES_ERRORS[name]
    args = {"q": np.ones((2, 4, 4)), "k": np.ones((2, 5, 4)), **changes}
    with pytest.raises(exc, match=pattern):
        refattn.attention_scores(args.pop("q"), args.pop("k"), **args)


# --- bmm_attention ---------------------------------------------------------------------------


@st.composite
def bmm_cases(draw):
    B, L, S, Fd = (draw(st.integers(1, 4)) for _ in range(4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x1, x2 = rng.standard_normal((B, L, Fd)), rng.standard_normal((B, S, Fd))
    mask = None
    if draw(st.booleans()):
        # Density 0.5 over few keys leaves some queries with no key: the NaN rows.
        mask = rng.random(draw(st.sampled_from([(B, L, S), (L, S), (B, 1, S)]))) < 0.5
    return x1, x2, mask


@given(drawn=bmm_cases())
def test_bmm_attention_matches_textbook_and_torch_bmm(backend, drawn):
    x1, x2, mask = drawn
    allowed = np.ones((x1.shape[0], x1.shape[1], x2.shape[1]), bool) if mask is None else (
        np.broadcast_to(mask, (x1.shape[0], x1.shape[1], x2.shape[1])))
    exp_out, exp_w = _textbook_softmax_sum(x1 @ np.swapaxes(x2, 1, 2), allowed, x2)
    conv = None if mask is None else backend.asarray(mask)
    out, w = refattn.bmm_attention(backend.asarray(x1), backend.asarray(x2), mask=conv)
    bound = rounding_bound(x1, x2, x2, scale=1.0)
    assert_close_within(backend.to_numpy(out), exp_out, bound, "bmm out vs textbook")
    # Weights: each one relative 2 delta + (S + 3) u, bounded in absolute terms by the
    # same quantity without the max|V| factor; rounding_bound / max|V| is exactly that
    # (and more), so it serves with max|V| taken as 1.
    w_bound = rounding_bound(x1, x2, np.ones((1, 1, 1)), scale=1.0)
    assert_close_within(backend.to_numpy(w), exp_w, w_bound, "bmm weights vs textbook")
    torch = pytest.importorskip("torch")
    t1, t2 = torch.from_numpy(x1), torch.from_numpy(x2)
    scores = torch.bmm(t1, t2.transpose(1, 2))
    if mask is not None:
        scores = scores.masked_fill(~torch.from_numpy(np.array(allowed)), float("-inf"))
    tw = torch.softmax(scores, dim=-1)
    assert_close_within(backend.to_numpy(out), torch.bmm(tw, t2).numpy(), bound,
                        "bmm out vs torch")
    assert_close_within(backend.to_numpy(w), tw.numpy(), w_bound, "bmm weights vs torch")


def test_bmm_attention_masked_rows_policies():
    rng = np.random.default_rng(2)
    x1, x2 = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4))
    mask = np.ones((2, 3, 5), bool)
    mask[1, 2] = False
    nan_out, nan_w = refattn.bmm_attention(x1, x2, mask=mask)
    assert np.all(np.isnan(nan_out[1, 2])) and np.all(np.isnan(nan_w[1, 2]))
    zero_out, zero_w = refattn.bmm_attention(x1, x2, mask=mask, masked_rows="zero")
    assert np.all(zero_out[1, 2] == 0) and np.all(zero_w[1, 2] == 0)
    uni_out, uni_w = refattn.bmm_attention(x1, x2, mask=mask, masked_rows="uniform")
    # Weights 1/5 each: the mean of x2's rows, up to the 5-term sum's rounding (5 u each).
    np.testing.assert_allclose(uni_out[1, 2], x2[1].mean(axis=0), rtol=0,
                               atol=2 * 5 * U * np.abs(x2[1]).max())
    # The other rows do not depend on the policy.
    np.testing.assert_array_equal(nan_out[0], zero_out[0])
    np.testing.assert_array_equal(nan_out[0], uni_out[0])


def test_bmm_attention_is_unscaled():
    # One key pair with logits (a, 0): softmax gives sigmoid(a); any 1/sqrt(F) would not.
    x1 = np.array([[[2.0, 0.0, 0.0, 0.0]]])
    x2 = np.array([[[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]])
    _, w = refattn.bmm_attention(x1, x2)
    # Two-term softmax: exp, sum and division, 4 u relative.
    np.testing.assert_allclose(w[0, 0, 0], 1 / (1 + math.exp(-2.0)), rtol=4 * U)


BMM_ERRORS = {
    "rank": (dict(x2=np.ones((5, 4))), ValueError, r"same leading \(batch\) dims"),
    "batch": (dict(x2=np.ones((3, 5, 4))), ValueError, r"same leading \(batch\) dims"),
    "features": (dict(x2=np.ones((2, 5, 3))), ValueError, r"same feature dim F"),
    "mask-dtype": (dict(mask=np.ones((2, 3, 5))), TypeError,
                   r"mask must be a boolean array \(True = take part\)"),
    "mask-shape": (dict(mask=np.ones((2, 3, 4), bool)), ValueError,
                   r"mask of shape \(2, 3, 4\) does not broadcast"),
    "masked_rows": (dict(masked_rows="inf"), ValueError, r"masked_rows must be one of"),
    "x1-rank": (dict(x1=np.ones(4)), ValueError, r"at least 2-D"),
}


@pytest.mark.parametrize("name", list(BMM_ERRORS))
def test_bmm_attention_errors(name):
    changes, exc, pattern = BMM_ERRORS[name]
    args = {"x1": np.ones((2, 3, 4)), "x2": np.ones((2, 5, 4)), **changes}
    with pytest.raises(exc, match=pattern):
        refattn.bmm_attention(args.pop("x1"), args.pop("x2"), **args)


# --- attention_pooling -----------------------------------------------------------------------


@st.composite
def pooling_cases(draw):
    B, S, Fd = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal((B, S, Fd))
    w = rng.standard_normal(Fd)
    w_shape = draw(st.sampled_from([(Fd,), (Fd, 1), (1, Fd)]))
    bias_kind = draw(st.sampled_from(["none", "float", "0d", "(1,)"]))
    b = float(rng.standard_normal() * 3)
    bias = {"none": None, "float": b, "0d": np.asarray(b), "(1,)": np.asarray([b])}[bias_kind]
    mask = rng.random((B, S)) < 0.7 if draw(st.booleans()) else None
    return x, w.reshape(w_shape), bias, mask


def _pooling_bounds(x, w, bias) -> tuple[float, float]:
    """Bounds on two evaluations of the pooled vector and of the weights.

    Logits (an F-term dot product plus the bias) are off by delta <= (F + 2) u M, M the
    largest |x|.|w| + |b|; a weight then by 2 delta + (S + 3) u (relative, so absolute as
    weights are <= 1); the S-term weighted sum adds S u, times max|x|. Doubled for two.
    """
    Fd, S = x.shape[-1], x.shape[-2]
    M = float(np.max(np.abs(x) @ np.abs(w.reshape(-1)))) + (0.0 if bias is None else abs(
        float(np.asarray(bias).reshape(()))))
    delta = (Fd + 2) * U * M
    pooled = 2 * (2 * delta + (2 * S + 3) * U) * float(np.abs(x).max())
    return pooled, 2 * (2 * delta + (S + 3) * U)


@given(drawn=pooling_cases())
def test_pooling_with_a_linear_scorer_matches_textbook_and_torch(backend, drawn):
    x, w, bias, mask = drawn
    logits = x @ w.reshape(-1) + (0.0 if bias is None else float(np.asarray(bias).reshape(())))
    allowed = np.ones(x.shape[:2], bool) if mask is None else mask
    exp_pooled, exp_w = _textbook_softmax_sum(logits[:, None, :], allowed[:, None, :], x)
    def conv(a):
        return a if a is None or isinstance(a, float) else backend.asarray(a)

    pooled, weights = refattn.attention_pooling(
        backend.asarray(x), scorer_weight=backend.asarray(w), scorer_bias=conv(bias),
        mask=conv(mask))
    bound, w_bound = _pooling_bounds(x, w, bias)
    assert_close_within(backend.to_numpy(pooled), exp_pooled[:, 0], bound, "pooled vs textbook")
    assert_close_within(backend.to_numpy(weights), exp_w[:, 0], w_bound, "weights vs textbook")
    torch = pytest.importorskip("torch")
    lin = torch.nn.Linear(x.shape[-1], 1, bias=bias is not None, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w.reshape(1, -1)))
        if bias is not None:
            lin.bias.fill_(float(np.asarray(bias).reshape(())))
        scores = lin(torch.from_numpy(x)).squeeze(-1)
        if mask is not None:
            scores = scores.masked_fill(~torch.from_numpy(mask), float("-inf"))
        tw = torch.softmax(scores, dim=1)
        tpooled = torch.bmm(tw.unsqueeze(1), torch.from_numpy(x)).squeeze(1)
    assert_close_within(backend.to_numpy(pooled), tpooled.numpy(), bound, "pooled vs torch")
    assert_close_within(backend.to_numpy(weights), tw.numpy(), w_bound, "weights vs torch")


def test_pooling_with_given_scores_and_the_bias_shift_invariance():
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((3, 6, 2)), rng.standard_normal(2)
    scores = x @ w
    p_scores, w_scores = refattn.attention_pooling(x, scores=scores)
    p_scorer, w_scorer = refattn.attention_pooling(x, scorer_weight=w)
    # Same logits (x @ w, one float64 evaluation each): the same softmax arithmetic.
    np.testing.assert_array_equal(w_scores, w_scorer)
    np.testing.assert_array_equal(p_scores, p_scorer)
    _, w_shift = refattn.attention_pooling(x, scorer_weight=w, scorer_bias=7.5)
    # softmax(s + b) = softmax(s): only the rounding of s + b differs, u (|s| + |b|) per
    # logit, moving each weight by at most twice that, relative.
    M = float(np.abs(scores).max()) + 7.5
    np.testing.assert_allclose(w_shift, w_scorer, rtol=0, atol=2 * (2 * U * M + 9 * U))
    # Weights of float32 scores are still computed in float64.
    _, w32 = refattn.attention_pooling(x, scores=scores.astype(np.float32))
    assert w32.dtype == np.float64


def test_pooling_masked_rows_policies_and_2d_input():
    x = np.arange(8.0).reshape(1, 4, 2)
    none_valid = np.zeros((1, 4), bool)
    pooled, weights = refattn.attention_pooling(x, scores=np.zeros((1, 4)), mask=none_valid)
    assert np.all(np.isnan(pooled)) and np.all(np.isnan(weights))
    pooled, _ = refattn.attention_pooling(x, scores=np.zeros((1, 4)), mask=none_valid,
                                          masked_rows="zero")
    assert np.all(pooled == 0)
    pooled, _ = refattn.attention_pooling(x, scores=np.zeros((1, 4)), mask=none_valid,
                                          masked_rows="uniform")
    np.testing.assert_array_equal(pooled, [[3.0, 4.0]])   # mean of the rows, exact here
    p2, w2 = refattn.attention_pooling(x[0], scores=np.zeros(4))
    assert p2.shape == (2,) and w2.shape == (4,)
    np.testing.assert_array_equal(p2, [3.0, 4.0])


POOLING_ERRORS = {
    "both": (dict(scores=np.zeros((2, 5)), scorer_weight=np.ones(3)), ValueError,
             r"give exactly one of scores and scorer_weight"),
    "neither": (dict(), ValueError, r"give exactly one of scores and scorer_weight"),
    "bias-without-weight": (dict(scores=np.zeros((2, 5)), scorer_bias=1.0), ValueError,
                            r"scorer_bias is only used with scorer_weight"),
    "scores-shape": (dict(scores=np.zeros((2, 4))), ValueError,
                     r"scores must have shape x.shape\[:-1\] = \(2, 5\)"),
    "weight-shape": (dict(scorer_weight=np.ones((3, 2))), ValueError,
                     r"scorer_weight must have shape \(F,\), \(F, 1\) or"),
    "bias-shape": (dict(scorer_weight=np.ones(3), scorer_bias=np.ones(2)), ValueError,
                   r"scorer_bias must be a real number or an array of shape \(\) or \(1,\)"),
    "mask-dtype": (dict(scores=np.zeros((2, 5)), mask=np.ones((2, 5))), TypeError,
                   r"mask must be a boolean array \(True = valid position\)"),
    "mask-shape": (dict(scores=np.zeros((2, 5)), mask=np.ones((2, 4), bool)), ValueError,
                   r"mask of shape \(2, 4\) does not broadcast"),
    "x-rank": (dict(x=np.ones(3), scores=np.zeros(3)), ValueError, r"x must be at least 2-D"),
    "masked_rows": (dict(scores=np.zeros((2, 5)), masked_rows="drop"), ValueError,
                    r"masked_rows must be one of"),
    "integer-scores": (dict(scores=np.zeros((2, 5), np.int64)), TypeError,
                       r"scores must have a real floating dtype"),
}


@pytest.mark.parametrize("name", list(POOLING_ERRORS))
def test_pooling_errors(name):
    changes, exc, pattern = POOLING_ERRORS[name]
    args = {"x": np.ones((2, 5, 3)), **changes}
    with pytest.raises(exc, match=pattern):
        refattn.attention_pooling(args.pop("x"), **args)


def test_xp_must_match_the_inputs():
    torch = pytest.importorskip("torch")
    q, k = np.ones((2, 3, 4)), np.ones((2, 5, 4))
    np.testing.assert_array_equal(refattn.attention_scores(q, k, xp=np), q @ k.transpose(0, 2, 1))
    for call in (lambda: refattn.attention_scores(q, k, xp=torch),
                 lambda: refattn.bmm_attention(q, k, xp=torch),
                 lambda: refattn.attention_pooling(k, scores=np.zeros((2, 5)), xp=torch)):
        with pytest.raises(TypeError, match=r"xp is the torch namespace but \w+ is a numpy"):
            call()
    out, _ = refattn.bmm_attention(q, k, xp=np)
    pooled, _ = refattn.attention_pooling(k, scores=np.zeros((2, 5)), xp=np)
    # All-equal keys (and zero scores) give weights 1/5 on rows of ones, so 1: each weight
    # is 1/5 rounded (u relative) and the 5-term sum adds 4u.
    np.testing.assert_allclose(out, np.ones((2, 3, 4)), rtol=0, atol=5 * U)
    np.testing.assert_allclose(pooled, np.ones((2, 4)), rtol=0, atol=5 * U)
