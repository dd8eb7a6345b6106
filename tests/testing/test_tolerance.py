"""The derived error bounds hold against an arbitrary-precision evaluation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refattn
from refattn._tolerance import baseline_budget, max_abs_error, rounding_bound

mpmath = pytest.importorskip("mpmath")


def exact(q, k, v, scale):
    """Attention with every float64 input taken as the exact number it is (60 digits)."""
    with mpmath.workdps(60):
        out = np.empty((q.shape[0], v.shape[1]))
        for i in range(q.shape[0]):
            logits = [mpmath.mpf(scale) * mpmath.fsum(mpmath.mpf(a) * mpmath.mpf(b)
                                                      for a, b in zip(q[i], k[j], strict=True))
                      for j in range(k.shape[0])]
            m = max(logits)
            w = [mpmath.exp(s - m) for s in logits]
            total = mpmath.fsum(w)
            for c in range(v.shape[1]):
                out[i, c] = float(mpmath.fsum(wj * mpmath.mpf(v[j, c])
                                              for j, wj in enumerate(w)) / total)
    return out


@given(seed=st.integers(0, 2**32 - 1), logit=st.sampled_from([1.0, 30.0, 300.0]),
       S=st.integers(1, 5), E=st.integers(1, 5))
def test_rounding_bound_holds_for_float64_and_float32(seed, logit, S, E):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((3, E)) * np.sqrt(logit)
    k = rng.standard_normal((S, E)) * np.sqrt(logit)
    v = rng.standard_normal((S, 2))
    scale = 1 / np.sqrt(E)
    truth = exact(q, k, v, scale)
    # The bound covers two evaluations; one evaluation against the truth needs half.
    for dtype in ("float64", "float32"):
        got = refattn.attention(q, k, v, compute_dtype=dtype)
        assert max_abs_error(got, truth) <= rounding_bound(q, k, v, scale=scale,
                                                           dtype=np.dtype(dtype)) / 2


def test_rounding_bound_is_zero_when_there_is_nothing_to_compute():
    assert rounding_bound(np.ones((0, 3)), np.ones((2, 3)), np.ones((2, 1)), scale=1.0) == 0.0


def test_max_abs_error_ignores_matching_non_finite_entries():
    assert max_abs_error(np.array([np.nan, 1.0]), np.array([np.nan, 1.5])) == 0.5


def test_baseline_budget_is_factor_times_baseline_plus_one_unit_roundoff():
    got = baseline_budget(1e-6, factor=2.0, dtype=np.dtype(np.float32), vmax=4.0)
    assert got == 2e-6 + np.finfo(np.float32).eps / 2 * 4.0
