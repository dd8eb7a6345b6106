"""Each edge class of the strategies gets a deliberate share of the draws.

The shares are judged from the drawn arrays (tests/helpers/edge_shares.py), not from
the class the strategy chose, over hypothesis's own generation (derandomized, as the
CI profile draws). The minimums are design targets: every class at least 5 % of the
draws, causal at least 25 % (docs/testing.rst lists the measured shares).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import find, settings

from refattn.testing import strategies as ras
from tests.helpers.edge_shares import features, shares

pytest.importorskip("torch")

N = 600
MINIMUM = 0.05
MINIMUM_CAUSAL = 0.25


def documented(dtype: str = "float64", shape=None, **kwargs):
    # The call of the documented test file (docs/testing.rst, "A complete test file").
    shape = ras.shapes(min_len=1) if shape is None else shape
    return ras.attention_cases(convention="torch", library="torch", dtype=dtype,
                               dropout=False, shape=shape, **kwargs)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_documented_draws_give_each_edge_class_its_share(dtype):
    n, got = shares(documented(dtype), N)
    assert n == N
    for feature in ("neg_inf_mask", "masked_rows", "huge_logits", "longer_keys",
                    "longer_queries", "square", "one_kv_head", "grouped_kv_heads"):
        assert got[feature] >= MINIMUM, (feature, got)
    assert got["causal"] >= MINIMUM_CAUSAL, got
    # torch refuses attn_mask with is_causal; min_len=1 rules out empty sequences.
    assert got["causal_with_mask"] == 0 and got["empty"] == 0, got


def test_the_refattn_convention_draws_causal_with_masks_and_empty_sequences():
    n, got = shares(ras.attention_cases(convention="refattn"), N // 2)
    for feature in ("neg_inf_mask", "masked_rows", "causal_with_mask", "huge_logits",
                    "empty", "grouped_kv_heads", "square"):
        assert got[feature] >= MINIMUM, (feature, got)
    assert got["causal"] >= MINIMUM_CAUSAL, got


def test_without_edge_cases_the_draws_are_plain():
    # Plain draws have no -inf in a float mask and logits of at most 10 typical size.
    _, plain = shares(documented(edge_cases=False), N // 2)
    assert plain["neg_inf_mask"] == 0 and plain["huge_logits"] == 0, plain
    _, edged = shares(documented(), N // 2)
    assert edged["causal"] > plain["causal"] and edged["masked_rows"] > plain["masked_rows"]


def test_shapes_without_edge_cases_draw_square_and_grouped_shapes_less_often():
    _, plain = shares(documented(shape=ras.shapes(min_len=1, edge_cases=False)), N // 2)
    _, edged = shares(documented(), N // 2)
    assert edged["square"] > plain["square"] and edged["grouped_kv_heads"] > \
        plain["grouped_kv_heads"]


def test_cases_shrink_to_plain():
    case = find(documented(), lambda c: True, settings=settings(database=None))
    assert case.kwargs["attn_mask"] is None and not case.kwargs["is_causal"]
    # The smallest shape, L = S = E = 1, is square by the letter of the class.
    assert features(case) <= {"square"}


@pytest.mark.parametrize("feature", ["neg_inf_mask", "masked_rows", "huge_logits",
                                     "grouped_kv_heads", "longer_queries"])
def test_a_case_that_needs_an_edge_shrinks_to_a_small_one(feature):
    # What a failing test reports: the smallest case of the class, not a large one.
    case = find(documented(), lambda c: feature in features(c),
                settings=settings(max_examples=2000, database=None))
    s = case.shape
    assert math.prod(s.batch) == 1 and s.L <= 2 and s.S <= 2 and s.E <= 4, s
    assert s.H == (4 if feature == "grouped_kv_heads" else 1), s


def test_huge_logits_reach_beyond_exps_range():
    # Independently of how the strategy chose them: exp overflows at the smaller
    # magnitude's own size in the precision it names, not a little below it.
    for dtype, work in (("float64", np.float64), ("float16", np.float32)):
        t, big = ras.huge_logit_magnitudes(dtype)
        with np.errstate(over="ignore"):
            assert np.isinf(np.exp(work(t * 1.001))) and np.isfinite(np.exp(work(t * 0.999)))
        assert big > t


def test_huge_logit_magnitudes_refuses_an_unknown_dtype():
    with pytest.raises(ValueError, match="dtype must be one of"):
        ras.huge_logit_magnitudes("int8")
