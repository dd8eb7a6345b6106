"""The core variants of ``attention`` and ``attention_backward``: windows, softcap, ALiBi,
score_mod and mask_mod, against constructions written independently here (explicit
masks and biases built with loops, torch autograd for the non-additive transforms)."""

from __future__ import annotations

import array_api_compat
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refattn
from tests.helpers.cases import assert_close_within, cases, output_bound


def explicit_window(L, S, left, right, shift):
    """Loop-built window mask: query i sees j with i+shift-left <= j <= i+shift+right."""
    m = np.zeros((L, S), dtype=bool)
    for i in range(L):
        for j in range(S):
            lo_ok = left is None or j >= i + shift - left
            hi_ok = right is None or j <= i + shift + right
            m[i, j] = lo_ok and hi_ok
    return m


def explicit_alibi(slopes, L, S, shift):
    """Loop-built ALiBi bias (H, L, S)."""
    bias = np.zeros((len(slopes), L, S))
    for h, slope in enumerate(slopes):
        for i in range(L):
            for j in range(S):
                bias[h, i, j] = -slope * abs(i + shift - j)
    return bias


sides = st.one_of(st.none(), st.integers(0, 4))


@given(case=cases(), left=sides, right=sides, causal=st.booleans(),
       alignment=st.sampled_from(["top_left", "bottom_right"]),
       implementation=st.sampled_from(["direct", "blocked"]))
def test_window_equals_the_explicit_mask(backend, case, left, right, causal, alignment,
                                         implementation):
    shift = 0 if alignment == "top_left" else case.S - case.L
    if causal:
        right = 0 if right is None else min(right, 0)
    explicit = explicit_window(case.L, case.S, left, right, shift)
    xs = [backend.asarray(x) for x in (case.q, case.k, case.v)]
    got = refattn.attention(*xs, window=(left, -1 if right is None else right) if not causal
                            else (left, right), causal=causal, alignment=alignment,
                            implementation=implementation, return_lse=True)
    ref = refattn.attention(*xs, mask=backend.asarray(explicit), implementation="direct",
                            return_lse=True)
    bound = output_bound(case, scale=case.E**-0.5)
    assert_close_within(backend.to_numpy(got.out), backend.to_numpy(ref.out), bound, "window")
    np.testing.assert_allclose(backend.to_numpy(got.lse), backend.to_numpy(ref.lse),
                               rtol=0, atol=bound + 1e-300)
    gout = backend.asarray(case.rng.standard_normal(got.out.shape))
    g = refattn.attention_backward(gout, *xs, window=(left, right), causal=causal,
                                   alignment=alignment, implementation=implementation)
    r = refattn.attention_backward(gout, *xs, mask=backend.asarray(explicit))
    for a, b in zip(g[:3], r[:3], strict=True):
        # Same arithmetic up to summation order; gradients scale with |dO| max|V| too.
        gb = bound * (1 + float(np.abs(backend.to_numpy(gout)).max())) * 8
        assert_close_within(backend.to_numpy(a), backend.to_numpy(b), gb, "window grads")


@given(case=cases(gqa=False), alignment=st.sampled_from(["top_left", "bottom_right"]),
       per_batch=st.booleans())
def test_alibi_equals_the_explicit_bias(backend, case, alignment, per_batch):
    shift = 0 if alignment == "top_left" else case.S - case.L
    slopes = case.rng.uniform(0.05, 1.0, size=case.H)
    bias = explicit_alibi(slopes, case.L, case.S, shift)
    given_slopes = np.broadcast_to(slopes, (*case.batch, case.H)).copy() if per_batch else slopes
    xs = [backend.asarray(x) for x in (case.q, case.k, case.v)]
    got = refattn.attention(*xs, alibi_slopes=backend.asarray(given_slopes), alignment=alignment)
    ref = refattn.attention(*xs, bias=backend.asarray(bias))
    assert_close_within(backend.to_numpy(got), backend.to_numpy(ref),
                        output_bound(case, scale=case.E**-0.5, bias=bias), "ALiBi")


@given(case=cases())
def test_mask_mod_equals_the_explicit_mask(backend, case):
    def mod(b, h, q_idx, kv_idx):
        # Even heads causal, odd heads see everything but the first key.
        return ((h % 2 == 0) & (kv_idx <= q_idx)) | ((h % 2 == 1) & (kv_idx > 0))

    explicit = np.zeros((case.H, case.L, case.S), dtype=bool)
    for h in range(case.H):
        for i in range(case.L):
            for j in range(case.S):
                explicit[h, i, j] = (j <= i) if h % 2 == 0 else (j > 0)
    xs = [backend.asarray(x) for x in (case.q, case.k, case.v)]
    got = refattn.attention(*xs, mask_mod=mod)
    ref = refattn.attention(*xs, mask=backend.asarray(explicit))
    np.testing.assert_array_equal(backend.to_numpy(got), backend.to_numpy(ref))


@given(case=cases())
def test_affine_score_mod_equals_the_explicit_bias(backend, case):
    def mod(score, b, h, q_idx, kv_idx):
        # A per-head relative bias: 0.1 * head * (q - kv), plus the score halved. The
        # integer grids are cast explicitly: strict array-API libraries do not mix kinds.
        xp = array_api_compat.array_namespace(score)
        return score * 0.5 + 0.1 * xp.astype(h * (q_idx - kv_idx), score.dtype)

    bias = np.zeros((case.H, case.L, case.S))
    for h in range(case.H):
        for i in range(case.L):
            for j in range(case.S):
                bias[h, i, j] = 0.1 * h * (i - j)
    xs = [backend.asarray(x) for x in (case.q, case.k, case.v)]
    scale = 0.5 * case.E**-0.5
    got = refattn.attention(*xs, score_mod=mod)
    ref = refattn.attention(*xs, bias=backend.asarray(bias), scale=scale)
    bound = output_bound(case, scale=scale, bias=bias)
    assert_close_within(backend.to_numpy(got), backend.to_numpy(ref), bound, "score_mod")
    gout = case.rng.standard_normal(got.shape)
    g = refattn.attention_backward(backend.asarray(gout), *xs, score_mod=mod)
    r = refattn.attention_backward(backend.asarray(gout), *xs, bias=backend.asarray(bias),
                                   scale=scale)
    gb = bound * (1 + float(np.abs(gout).max())) * 8
    for a, b in zip(g[:3], r[:3], strict=True):
        assert_close_within(backend.to_numpy(a), backend.to_numpy(b), gb, "score_mod grads")


torch = pytest.importorskip("torch")


def torch_reference(q, k, v, *, scale, softcap=None, bias=None, score_mod=None, mask=None):
    """The order of docs/variants.rst written out in torch ops, differentiated by autograd."""
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias
    if score_mod is not None:
        s = score_mod(s)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


class _Cube:
    """A non-affine score_mod with its derivative: s + 0.01 s^3."""

    def __call__(self, score, b, h, q_idx, kv_idx):
        return score + 0.01 * score * score * score

    def derivative(self, score, b, h, q_idx, kv_idx):
        return 1 + 0.03 * score * score


@pytest.mark.torch
@given(case=cases(gqa=False, min_len=1), softcap=st.sampled_from([None, 0.5, 5.0]),
       cube=st.booleans())
def test_softcap_bias_and_score_mod_follow_the_documented_order(case, softcap, cube):
    bias = case.rng.standard_normal((case.L, case.S))
    mask = case.random_mask()
    scale = case.E**-0.5
    tq, tk, tv = (torch.from_numpy(x).requires_grad_(True) for x in (case.q, case.k, case.v))
    tb = torch.from_numpy(bias).requires_grad_(True)
    mod = _Cube() if cube else None
    expected = torch_reference(tq, tk, tv, scale=scale, softcap=softcap, bias=tb,
                               mask=torch.from_numpy(mask),
                               score_mod=(lambda s: s + 0.01 * s**3) if cube else None)
    gout = torch.from_numpy(case.rng.standard_normal(tuple(expected.shape)))
    expected.backward(gout)
    got = refattn.attention(case.q, case.k, case.v, softcap=softcap, bias=bias, mask=mask,
                            score_mod=mod)
    # Logits now reach softcap + |bias| + the cube's growth; bound with that magnitude.
    logit = (softcap or np.abs(case.q).sum(-1).max() * np.abs(case.k).max() * scale) \
        + np.abs(bias).max()
    bound = output_bound(case, scale=scale, bias=np.abs(bias) + logit + 0.01 * logit**3)
    assert_close_within(got, expected.detach().numpy(), bound, "softcap/score_mod forward")
    grads = refattn.attention_backward(gout.numpy(), case.q, case.k, case.v, softcap=softcap,
                                       bias=bias, mask=mask, score_mod=mod)
    gb = bound * (1 + float(gout.abs().max())) * 16
    for ours, theirs in zip(grads, (tq.grad, tk.grad, tv.grad, tb.grad), strict=True):
        assert_close_within(ours, theirs.numpy(), gb, "softcap/score_mod gradient")


def test_a_non_affine_score_mod_without_derivative_is_refused_in_the_backward():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, 4)) for _ in range(3))
    def square(s, b, h, qi, kj):
        return s * s

    refattn.attention(q, k, v, score_mod=square)  # the forward needs no derivative
    with pytest.raises(ValueError, match="needs a mod affine in the score"):
        refattn.attention_backward(np.ones((2, 3, 4)), q, k, v, score_mod=square)


@pytest.mark.parametrize("kwargs,error,message", [
    ({"window": 3}, TypeError, r"window must be a pair \(left, right\)"),
    ({"window": (1, 2, 3)}, TypeError, r"window must be a pair"),
    ({"window": (-2, 0)}, ValueError, r"window's left edge must be a non-negative int"),
    ({"window": (0, 1.5)}, ValueError, r"window's right edge must be"),
    ({"softcap": 0.0}, ValueError, r"softcap must be positive and finite"),
    ({"softcap": float("inf")}, ValueError, r"softcap must be positive and finite"),
    ({"softcap": "1"}, TypeError, r"softcap must be a positive real number"),
    ({"alibi_slopes": np.ones(3)}, ValueError, r"alibi_slopes of shape \(3,\) does not "
                                                r"broadcast"),
    ({"alibi_slopes": np.ones(4, dtype=np.int64)}, TypeError,
     r"alibi_slopes must have a real floating dtype"),
    ({"score_mod": 3}, TypeError, r"score_mod must be a callable or None; got int"),
    ({"mask_mod": "causal"}, TypeError, r"mask_mod must be a callable or None; got str"),
    ({"mask_mod": lambda b, h, qi, kj: qi - kj}, TypeError,
     r"mask_mod must return a boolean array"),
    ({"score_mod": lambda s, b, h, qi, kj: s, "precision": "compensated"}, ValueError,
     r"precision='compensated' does not support score_mod"),
])
def test_bad_variant_arguments(kwargs, error, message):
    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((2, 4, 3, 5)), rng.standard_normal((2, 4, 6, 5)), \
        rng.standard_normal((2, 4, 6, 2))
    with pytest.raises(error, match=message):
        refattn.attention(q, k, v, **kwargs)


def test_minus_one_means_unlimited_like_flash_attn():
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((1, 5, 4)) for _ in range(3))
    a = refattn.attention(q, k, v, window=(-1, -1))
    b = refattn.attention(q, k, v)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(refattn.attention(q, k, v, window=(-1, 0)),
                                  refattn.attention(q, k, v, causal=True))
