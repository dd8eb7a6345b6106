"""refattn.testing.strategies produce what they promise, shrink small, and refuse bad
arguments when they are built."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import find, given, settings
from hypothesis import strategies as st

import refattn
from refattn.testing import strategies as ras


@given(s=ras.shapes(max_len=5, max_heads=6, max_head_dim=4))
def test_shapes_respect_their_bounds_and_gqa(s):
    assert s.H % s.K == 0 and s.H % s.Kv == 0
    assert 0 <= s.L <= 5 and 0 <= s.S <= 5 and 1 <= s.E <= 4 and 1 <= s.Ev <= 4
    assert len(s.batch) <= 2 and all(1 <= b <= 3 for b in s.batch)


@given(s=ras.shapes(gqa=False, equal_lengths=True, equal_head_dims=True, min_len=2))
def test_shape_constraints(s):
    assert s.K == s.Kv == s.H and s.L == s.S >= 2 and s.E == s.Ev


@given(data=st.data(), dtype=st.sampled_from(["float64", "float32", "float16"]))
def test_qkv_have_the_shape_and_dtype_asked_for(data, dtype):
    s = data.draw(ras.shapes(max_len=4))
    q, k, v = data.draw(ras.qkv(s, dtype=dtype))
    assert (q.shape, k.shape, v.shape) == (s.q, s.k, s.v)
    assert {str(x.dtype) for x in (q, k, v)} == {dtype}


@given(data=st.data(), magnitude=st.sampled_from([1.0, 100.0]))
def test_logit_magnitude_sets_the_size_of_the_logits(data, magnitude):
    s = data.draw(ras.shapes(min_len=8, max_len=8, min_head_dim=16, max_head_dim=16,
                             max_batch_dims=0, gqa=False))
    q, k, _ = data.draw(ras.qkv(s, logit_magnitude=magnitude))
    logits = q @ np.swapaxes(k, -1, -2) / 4.0   # scale 1/sqrt(E), E = 16
    # Entries of std sqrt(m): each product has variance m**2, the sum over E = 16 of them
    # std 4m, divided by sqrt(E) = 4: std m. Over >= 64 samples the sample std is within
    # a factor 3 of m with overwhelming odds.
    assert magnitude / 3 < logits.std() < magnitude * 3


@given(data=st.data(), need=st.integers(0, 3))
def test_bool_masks_keep_the_minimum_per_row(data, need):
    s = data.draw(ras.shapes(min_len=1, max_len=5))
    m = data.draw(ras.bool_masks(s, min_true_per_row=need))
    assert m.dtype == bool
    np.broadcast_shapes(m.shape, s.scores)  # broadcastable, or this raises
    assert (m.sum(axis=-1) >= min(need, s.S)).all()


@given(data=st.data())
def test_fully_masked_rows_are_present_when_asked(data):
    s = data.draw(ras.shapes(min_len=1, max_len=5))
    m = data.draw(ras.bool_masks(s, fully_masked_rows=True))
    assert (~m.any(axis=-1)).any()


@given(data=st.data())
def test_float_and_dropout_masks(data):
    s = data.draw(ras.shapes(max_len=4))
    b = data.draw(ras.float_masks(s, dtype="float32", broadcast=False))
    assert b.shape == s.scores and b.dtype == np.float32
    keep = data.draw(ras.dropout_masks(s, 1.0))
    assert keep.shape == s.scores and not keep.any()


@given(case=ras.attention_cases(convention="refattn"))
def test_refattn_cases_are_accepted_by_attention(case):
    out = refattn.attention(case.q, case.k, case.v, **case.kwargs)
    assert out.shape == case.shape.out


@given(case=ras.attention_cases(convention="torch"))
def test_torch_cases_are_accepted_by_the_sdpa_front_end(case):
    out = refattn.scaled_dot_product_attention(case.q, case.k, case.v, **case.kwargs)
    assert out.shape == case.shape.out
    assert not (case.kwargs["is_causal"] and case.kwargs["attn_mask"] is not None)


def test_torch_library_gives_tensors():
    torch = pytest.importorskip("torch")
    case = find(ras.attention_cases(library="torch", dtype="bfloat16", convention="torch"),
                lambda c: True)
    assert isinstance(case.q, torch.Tensor) and case.q.dtype == torch.bfloat16


def test_shapes_shrink_to_the_smallest_failing_case():
    smallest = find(ras.shapes(), lambda s: s.L >= 3 and s.H >= 2,
                    settings=settings(max_examples=2000, database=None))
    assert (smallest.batch, smallest.H, smallest.L, smallest.S, smallest.E, smallest.Ev) == \
        ((), 2, 3, 0, 1, 1)


def test_cases_shrink_towards_no_options():
    case = find(ras.attention_cases(), lambda c: c.shape.L >= 1,
                settings=settings(max_examples=500, database=None))
    assert case.kwargs == {"scale": None}
    assert case.shape.L == 1 and case.shape.H == 1


@pytest.mark.parametrize("factory,kwargs,error,message", [
    (ras.shapes, {"min_heads": 0}, ValueError, "heads must satisfy 1 <= min"),
    (ras.shapes, {"min_len": 5, "max_len": 2}, ValueError, "lengths must satisfy"),
    (ras.shapes, {"max_head_dim": 2.5}, TypeError, "head dims bounds must be ints"),
    (ras.attention_cases, {"convention": "jaxx"}, ValueError, "convention must be one of"),
    (ras.attention_cases, {"dtype": "int8"}, ValueError, "dtype must be one of"),
    (ras.attention_cases, {"library": "tensorflow"}, ValueError, "library must be one of"),
    (ras.attention_cases, {"logit_magnitudes": ()}, ValueError, "must not be empty"),
])
def test_bad_arguments_fail_when_the_strategy_is_built(factory, kwargs, error, message):
    with pytest.raises(error, match=message):
        factory(**kwargs)


S = ras.Shape((), 1, 1, 1, 2, 2, 1, 1)


@pytest.mark.parametrize("call,message", [
    (lambda: ras.qkv(S, logit_magnitude=0.0), "logit_magnitude must be a positive"),
    (lambda: ras.bool_masks(S, min_true_per_row=-1), "min_true_per_row must be"),
    (lambda: ras.bool_masks(S, min_true_per_row=1, fully_masked_rows=True), "contradicts"),
    (lambda: ras.dropout_masks(S, 1.5), r"dropout_p must lie in \[0, 1\]"),
])
def test_bad_arguments_of_the_array_strategies(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --- windows, varlen offsets and the flash / jax conventions ------------------------------


@given(w=ras.windows(max_size=5))
def test_windows_are_pairs_of_sizes_or_unlimited(w):
    assert w != (None, None)
    assert all(side is None or (isinstance(side, int) and 0 <= side <= 5) for side in w)


@given(w=ras.windows(max_size=3, unlimited=False))
def test_windows_without_unlimited_sides(w):
    assert all(isinstance(side, int) for side in w)


@given(cu=ras.cu_seqlens(min_batch=2, max_batch=3, min_len=1, max_len=4))
def test_cu_seqlens_are_running_totals(cu):
    lengths = np.diff(cu)
    assert cu.dtype == np.int32 and cu[0] == 0 and 2 <= lengths.size <= 3
    assert ((lengths >= 1) & (lengths <= 4)).all()


@given(case=ras.varlen_cases(max_batch=3, max_len=6))
def test_varlen_cases_equal_attention_per_sequence(case):
    out = refattn.attention_varlen(case.q, case.k, case.v, case.cu_seqlens_q,
                                   case.cu_seqlens_k, **case.kwargs)
    assert out.shape == (sum(case.lengths_q), case.q.shape[1], case.v.shape[2])
    # Sequence by sequence, the packed batch is plain attention (its own definition):
    # the same arithmetic on the same values, so equal up to float64 rounding of sums
    # taken in another order (a few ulp of max|V| per key: 16 * eps * S * max|V|).
    cq, ck = np.asarray(case.cu_seqlens_q), np.asarray(case.cu_seqlens_k)
    for b in range(len(case.lengths_q)):
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        if cq[b + 1] == cq[b]:
            continue
        want = refattn.attention(case.q[qs], case.k[ks], case.v[ks], layout="BLHD",
                                 **case.kwargs)
        S = max(int(ck[b + 1] - ck[b]), 1)
        tol = 16 * np.finfo(np.float64).eps * S * max(float(np.abs(case.v).max(initial=0)), 1)
        np.testing.assert_allclose(out[qs], want, rtol=0, atol=tol)


@given(case=ras.attention_cases(convention="flash"))
def test_flash_cases_are_accepted_by_the_flash_front_end(case):
    from refattn.compat.flash_attn import flash_attn_func

    out = flash_attn_func(case.q, case.k, case.v, **case.kwargs)
    s = case.shape
    assert out.shape == (s.batch[0], s.L, s.H, s.Ev)
    assert case.q.shape == (s.batch[0], s.L, s.H, s.E)


@given(case=ras.attention_cases(convention="jax"))
def test_jax_cases_are_accepted_by_the_jax_front_end(case):
    from refattn.compat.jax import dot_product_attention

    out = dot_product_attention(case.q, case.k, case.v, **case.kwargs)
    s = case.shape
    assert out.shape == (s.batch[0], s.L, s.H, s.E)
    assert "dropout_p" not in case.kwargs


def test_flash_cases_on_torch_are_tensors_in_blhd():
    torch = pytest.importorskip("torch")
    case = find(ras.attention_cases(convention="flash", library="torch", dtype="float16"),
                lambda c: c.shape.L != c.shape.H and "alibi_slopes" in c.kwargs,
                settings=settings(max_examples=500, database=None))
    assert isinstance(case.q, torch.Tensor) and case.q.dtype == torch.float16
    assert case.q.shape[1] == case.shape.L and case.q.is_contiguous()
    assert case.kwargs["alibi_slopes"].dtype == torch.float32


@pytest.mark.parametrize("call,error,message", [
    (lambda: ras.windows(max_size=-1), ValueError, "window sizes must satisfy"),
    (lambda: ras.cu_seqlens(min_batch=0), ValueError, "batch must satisfy"),
    (lambda: ras.cu_seqlens(library="tensorflow"), ValueError, "library must be one of"),
    (lambda: ras.varlen_cases(max_len=-1), ValueError, "lengths must satisfy"),
    (lambda: ras.varlen_cases(logit_magnitudes=()), ValueError, "must not be empty"),
])
def test_bad_arguments_of_the_new_strategies(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("convention", ["refattn", "torch", "flash", "jax"])
@given(data=st.data())
def test_options_translate_each_convention_into_attention(convention, data):
    # The convention's own front-end and refattn.attention with the case's options run
    # the same float64 arithmetic: equal results, NaN included.
    from refattn.compat.flash_attn import flash_attn_func
    from refattn.compat.jax import dot_product_attention

    case = data.draw(ras.attention_cases(convention=convention))
    front = {"refattn": refattn.attention, "torch": refattn.scaled_dot_product_attention,
             "flash": flash_attn_func, "jax": dot_product_attention}[convention]
    want = front(case.q, case.k, case.v, **case.kwargs)
    got = refattn.attention(case.q, case.k, case.v, **case.options())
    np.testing.assert_array_equal(got, want)


# --- edge classes: the parameters behind them ----------------------------------------


@given(data=st.data())
def test_every_shape_edge_class_respects_the_bounds(data):
    # The classes bend plain draws to their shape; whatever the bounds, the result must
    # stay inside them (and a class the bounds rule out must not be drawn).
    lo_len = data.draw(st.integers(0, 4))
    hi_len = data.draw(st.integers(lo_len, 6))
    lo_h = data.draw(st.integers(1, 4))
    hi_h = data.draw(st.integers(lo_h, 9))
    lo_e = data.draw(st.integers(1, 4))
    hi_e = data.draw(st.integers(lo_e, 6))
    gqa, eq_len, eq_dim = (data.draw(st.booleans()) for _ in range(3))
    s = data.draw(ras.shapes(min_len=lo_len, max_len=hi_len, min_heads=lo_h, max_heads=hi_h,
                             min_head_dim=lo_e, max_head_dim=hi_e, gqa=gqa,
                             equal_lengths=eq_len, equal_head_dims=eq_dim))
    assert lo_len <= s.L <= hi_len and lo_len <= s.S <= hi_len
    assert lo_h <= s.H <= hi_h and lo_e <= s.E <= hi_e and lo_e <= s.Ev <= hi_e
    assert s.H % s.K == 0 and s.H % s.Kv == 0
    assert gqa or s.K == s.Kv == s.H
    assert not eq_len or s.L == s.S
    assert not eq_dim or s.E == s.Ev


@pytest.mark.parametrize("edge,holds", [
    ("longer_keys", lambda s: s.L < s.S),
    ("longer_queries", lambda s: s.L > s.S),
    ("square", lambda s: s.L == s.S == s.E),
    ("one_kv_head", lambda s: s.K == s.Kv == 1 < s.H),
    ("grouped_kv_heads", lambda s: 1 < s.K == s.Kv < s.H),
    ("empty", lambda s: s.L == 0 or s.S == 0),
])
def test_each_shape_edge_class_is_drawn(edge, holds):
    assert edge in ras.SHAPE_EDGES
    find(ras.shapes(max_heads=6), holds, settings=settings(max_examples=300, database=None))


def test_shape_edge_classes_the_bounds_rule_out_are_not_drawn():
    # min_len = max_len: no L != S, no empty; gqa=False: K = H; E range apart from L's.
    @settings(max_examples=60, database=None)
    @given(s=ras.shapes(min_len=3, max_len=3, gqa=False, min_head_dim=5, max_head_dim=8))
    def check(s):
        assert s.L == s.S == 3 and s.K == s.Kv == s.H and s.E != s.L

    check()


@given(data=st.data(), fully=st.booleans())
def test_float_masks_with_infinities_hold_minus_inf_and_finite_numbers(data, fully):
    s = data.draw(ras.shapes(min_len=1, max_len=5))
    b = data.draw(ras.float_masks(s, infinities=True, fully_masked_rows=fully))
    np.broadcast_shapes(b.shape, s.scores)
    assert not np.isnan(b).any() and not np.isposinf(b).any()
    if fully:
        assert np.isneginf(b).all(axis=-1).any()


def test_float_masks_with_infinities_draw_minus_inf():
    find(ras.float_masks(ras.Shape((), 1, 1, 1, 3, 3, 1, 1), infinities=True),
         lambda b: np.isneginf(b).any() and np.isfinite(b).any(),
         settings=settings(max_examples=100, database=None))


@given(b=ras.float_masks(ras.Shape((), 1, 1, 1, 3, 3, 1, 1), magnitude=0.0))
def test_float_masks_without_infinities_are_finite(b):
    assert (b == 0).all()


@pytest.mark.parametrize("convention", ["refattn", "torch", "flash", "jax"])
def test_attention_cases_draw_logits_beyond_exps_range(convention):
    # The huge-logit class: some logit beyond log(float64 max) in a float64 case.
    limit = np.log(np.finfo(np.float64).max)

    def huge(c):
        q, k = (np.asarray(x) for x in (c.q, c.k))
        if convention in ("flash", "jax"):
            q, k = np.swapaxes(q, -2, -3), np.swapaxes(k, -2, -3)
        return q.size > 0 and k.size > 0 and np.abs(q @ np.swapaxes(
            np.repeat(k, c.shape.H // c.shape.K, axis=-3), -1, -2)).max() > limit

    find(ras.attention_cases(convention=convention), huge,
         settings=settings(max_examples=300, database=None))


@pytest.mark.parametrize("call,message", [
    (lambda: ras.shapes(edge_cases="yes"), "edge_cases must be a bool"),
    (lambda: ras.attention_cases(edge_cases=None), "edge_cases must be a bool"),
    (lambda: ras.float_masks(S, infinities=1), "infinities must be a bool"),
    (lambda: ras.float_masks(S, fully_masked_rows="no"), "fully_masked_rows must be a bool"),
])
def test_edge_flags_must_be_bools(call, message):
    with pytest.raises(TypeError, match=message):
        call()


@pytest.mark.parametrize("magnitude", [-1.0, float("inf"), "3"])
def test_float_masks_refuse_a_bad_magnitude(magnitude):
    with pytest.raises(ValueError, match="magnitude must be a non-negative finite number"):
        ras.float_masks(S, magnitude=magnitude)
