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
