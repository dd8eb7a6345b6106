"""Hypothesis strategies and tolerances shared by the core tests.

Cases are drawn as sizes plus a seed; the arrays themselves come from NumPy's
generator, which keeps shrinking fast (hypothesis shrinks the sizes, not the floats).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hypothesis import strategies as st

EPS64 = float(np.finfo(np.float64).eps)


@dataclass
class Case:
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    options: dict[str, Any] = field(default_factory=dict)
    rng: np.random.Generator = field(default_factory=np.random.default_rng)

    @property
    def H(self) -> int:
        return self.q.shape[-3]

    @property
    def L(self) -> int:
        return self.q.shape[-2]

    @property
    def S(self) -> int:
        return self.k.shape[-2]

    @property
    def E(self) -> int:
        return self.q.shape[-1]

    @property
    def batch(self) -> tuple[int, ...]:
        return self.q.shape[:-3]

    def mask(self, *, density: float = 0.7, min_true_per_row: int = 1,
             shape: tuple[int, ...] | None = None) -> np.ndarray:
        """A random boolean mask; each row keeps at least ``min_true_per_row`` keys."""
        shape = shape or (*self.batch, self.H, self.L, self.S)
        m = self.rng.random(shape) < density
        if min_true_per_row and self.S:
            m[..., self.rng.integers(0, self.S)] = True
        return m


@st.composite
def cases(draw: st.DrawFn, *, min_len: int = 1, max_len: int = 6, gqa: bool = True,
          batch: bool = True, logit: float | None = None) -> Case:
    """Sizes (batch, H, K | H, Kv | H, L, S, E, Ev) and random float64 arrays."""
    batch_shape = draw(st.sampled_from([(), (1,), (2,), (2, 1)])) if batch else ()
    K = draw(st.sampled_from([1, 2]))
    groups = draw(st.sampled_from([1, 2, 3])) if gqa else 1
    H = K * groups
    Kv = draw(st.sampled_from([d for d in range(1, H + 1) if H % d == 0])) if gqa else H
    L = draw(st.integers(min_len, max_len))
    S = draw(st.integers(min_len, max_len + 1))
    E = draw(st.integers(1, 8))
    Ev = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**32 - 1))
    magnitude = logit if logit is not None else draw(st.sampled_from([0.5, 1.0, 4.0]))
    rng = np.random.default_rng(seed)
    # Entries of std a give logits q.k / sqrt(E) of std a**2.
    amp = np.sqrt(magnitude)
    q = rng.standard_normal((*batch_shape, H, L, E)) * amp
    k = rng.standard_normal((*batch_shape, K, S, E)) * amp
    v = rng.standard_normal((*batch_shape, Kv, S, Ev))
    return Case(q, k, v, rng=rng)


def repeat_heads(x: np.ndarray, H: int) -> np.ndarray:
    """Explicit repeat_interleave of the head axis up to H heads (independent of refattn)."""
    return np.repeat(x, H // x.shape[-3], axis=-3)


def softmax_bound(S: int) -> float:
    """|sum(weights) - 1| for one softmax row of S terms.

    exp and the division add a relative error of at most 2u to each weight, the row
    sum (S - 1)u to the normaliser and the test's own sum (S - 1)u: (2S + 2)u in all,
    u = eps / 2; a factor 2 for torch, whose exp is a vectorised approximation within
    an ulp.
    """
    return (2 * S + 2) * EPS64


def output_bound(case: Case, *, scale: float, bias: np.ndarray | None = None,
                 dropout_p: float = 0.0) -> float:
    """Bound on the difference of two float64 attention evaluations of ``case``.

    The derivation is in ``refattn._tolerance.rounding_bound``: logits carry at most
    (E + 2)u times their largest possible magnitude, each weight then moves by twice
    that (relative), and the reductions add (2S + 3)u; doubled for two evaluations.
    """
    from refattn._tolerance import rounding_bound

    return rounding_bound(case.q, case.k, case.v, scale=scale, bias=bias, dropout_p=dropout_p)


def assert_close_within(actual: Any, desired: np.ndarray, bound: float, what: str) -> None:
    """assert max|actual - desired| <= bound with matching NaN positions."""
    a = np.asarray(actual, dtype=np.float64)
    assert a.shape == desired.shape, f"{what}: shape {a.shape} != {desired.shape}"
    assert np.array_equal(np.isnan(a), np.isnan(desired)), f"{what}: NaN positions differ"
    finite = ~np.isnan(desired)
    err = float(np.max(np.abs(a - desired)[finite], initial=0.0))
    assert err <= bound, f"{what}: max error {err:.3e} exceeds the derived bound {bound:.3e}"
