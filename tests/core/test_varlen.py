"""refattn.attention_varlen(_backward): packed batches against the loop over sequences.

The reference is the definition: run ``refattn.attention`` on every sequence apart
(with the core's own causal / window / alignment / softcap / ALiBi options) and
concatenate. A second reference is the packed problem with an explicit block-diagonal
mask and ALiBi bias built here entry by entry. Tolerances are the derived rounding
bounds of tests/helpers/variants.py, taken over the packed problem (its longer rows only add
terms to the bounds, so they cover the per-sequence computations too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refattn
from tests.helpers.cases import divisors
from tests.helpers.variants import (
    U64,
    alibi_bias,
    assert_within,
    forward_bound,
    grad_bound,
    lse_bound,
    weight_bound,
    window_mask,
)


@dataclass
class Case:
    lens_q: list[int]
    lens_k: list[int]
    H: int
    K: int
    Kv: int
    E: int
    Ev: int
    causal: bool
    alignment: str
    window: tuple[int | None, int | None] | None
    softcap: float | None
    slopes: np.ndarray | None
    masked_rows: str
    scale_option: float | None
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    dout: np.ndarray

    @property
    def B(self) -> int:
        return len(self.lens_q)

    @property
    def cu_q(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lens_q)]).astype(np.int32)

    @property
    def cu_k(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lens_k)]).astype(np.int32)

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.E) if self.scale_option is None else self.scale_option

    def shift(self, b: int) -> int:
        return 0 if self.alignment == "top_left" else self.lens_k[b] - self.lens_q[b]

    def slopes_of(self, b: int) -> np.ndarray | None:
        if self.slopes is None:
            return None
        return self.slopes if self.slopes.ndim == 1 else self.slopes[b]

    @property
    def logit_extra(self) -> float:
        """Largest |ALiBi term| + softcap: what is added to a logit besides q.k."""
        extra = self.softcap or 0.0
        if self.slopes is not None:
            extra += float(np.max(np.abs(self.slopes))) * (max(self.lens_q) + max(self.lens_k))
        return extra


SIDES = st.sampled_from([None, -1, 0, 1, 3])


@st.composite
def cases(draw: st.DrawFn, *, policies: tuple[str, ...] = ("zero", "nan")) -> Case:
    B = draw(st.integers(1, 3))
    lens_q = draw(st.lists(st.integers(0, 4), min_size=B, max_size=B))
    lens_k = lens_q if draw(st.booleans()) else draw(
        st.lists(st.integers(0, 5), min_size=B, max_size=B))
    K = draw(st.sampled_from([1, 2]))
    H = K * draw(st.sampled_from([1, 2]))
    Kv = draw(st.sampled_from(divisors(H)))
    E, Ev = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    window = draw(st.one_of(st.none(), st.tuples(SIDES, SIDES)))
    slopes_kind = draw(st.sampled_from([None, "H", "BH"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    slopes = None if slopes_kind is None else rng.uniform(
        0.0, 1.0, (H,) if slopes_kind == "H" else (B, H))
    tq, tk = sum(lens_q), sum(lens_k)
    return Case(
        lens_q=lens_q, lens_k=lens_k, H=H, K=K, Kv=Kv, E=E, Ev=Ev, causal=draw(st.booleans()),
        alignment=draw(st.sampled_from(["top_left", "bottom_right"])), window=window,
        softcap=draw(st.sampled_from([None, 1.5])), slopes=slopes,
        masked_rows=draw(st.sampled_from(policies)),
        scale_option=draw(st.sampled_from([None, None, 0.0, -0.7, 1.3])),
        q=rng.standard_normal((tq, H, E)), k=rng.standard_normal((tk, K, E)),
        v=rng.standard_normal((tk, Kv, Ev)), dout=rng.standard_normal((tq, H, Ev)),
    )


def options(case: Case, backend: Any) -> dict[str, Any]:
    return dict(causal=case.causal, alignment=case.alignment, window=case.window,
                softcap=case.softcap, masked_rows=case.masked_rows, scale=case.scale_option,
                alibi_slopes=None if case.slopes is None else backend.asarray(case.slopes))


def sequences(case: Case) -> list[tuple[slice, slice]]:
    cu_q, cu_k = case.cu_q, case.cu_k
    return [(slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])) for b in range(case.B)]


def loop_forward(case: Case, backend: Any, keep: np.ndarray | None = None,
                 dropout_p: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The definition: one ``attention`` per sequence, outputs and LSEs concatenated."""
    outs, lses = [], []
    for b, (sq, sk) in enumerate(sequences(case)):
        slopes = case.slopes_of(b)
        extra = {} if keep is None else {
            "dropout_p": dropout_p, "dropout_mask": backend.asarray(keep[:, sq, sk])}
        res = refattn.attention(
            *(backend.asarray(x) for x in (case.q[sq], case.k[sk], case.v[sk])),
            causal=case.causal, alignment=case.alignment, window=case.window,
            softcap=case.softcap, masked_rows=case.masked_rows, layout="BLHD",
            alibi_slopes=None if slopes is None else backend.asarray(slopes),
            scale=case.scale_option, return_lse=True, **extra,
        )
        outs.append(backend.to_numpy(res.out))
        lses.append(backend.to_numpy(res.lse))
    return np.concatenate(outs, axis=0), np.concatenate(lses, axis=1)


def loop_backward(case: Case, backend: Any, keep: np.ndarray | None = None,
                  dropout_p: float = 0.0) -> list[np.ndarray]:
    dq, dk, dv = [], [], []
    for b, (sq, sk) in enumerate(sequences(case)):
        slopes = case.slopes_of(b)
        extra = {} if keep is None else {
            "dropout_p": dropout_p, "dropout_mask": backend.asarray(keep[:, sq, sk])}
        g = refattn.attention_backward(
            *(backend.asarray(x) for x in (case.dout[sq], case.q[sq], case.k[sk], case.v[sk])),
            causal=case.causal, alignment=case.alignment, window=case.window,
            softcap=case.softcap, masked_rows=case.masked_rows, layout="BLHD",
            alibi_slopes=None if slopes is None else backend.asarray(slopes),
            scale=case.scale_option, **extra,
        )
        dq.append(backend.to_numpy(g.dq))
        dk.append(backend.to_numpy(g.dk))
        dv.append(backend.to_numpy(g.dv))
    return [np.concatenate(x, axis=0) for x in (dq, dk, dv)]


def packed_mask_and_bias(case: Case) -> tuple[np.ndarray, np.ndarray | None]:
    """(total_q, total_k) mask and (H, total_q, total_k) ALiBi bias, block by block."""
    tq, tk = sum(case.lens_q), sum(case.lens_k)
    mask = np.zeros((tq, tk), dtype=bool)
    bias = None if case.slopes is None else np.zeros((case.H, tq, tk))
    left, right = (None, None) if case.window is None else (
        None if s in (None, -1) else s for s in case.window)
    if case.causal:
        right = 0 if right is None else min(right, 0)
    for b, (sq, sk) in enumerate(sequences(case)):
        lq, lk = case.lens_q[b], case.lens_k[b]
        mask[sq, sk] = window_mask(lq, lk, left, right, case.shift(b))
        if bias is not None:
            bias[:, sq, sk] = alibi_bias(case.slopes_of(b), lq, lk, case.shift(b))
    return mask, bias


def bhld(x: np.ndarray) -> np.ndarray:
    return np.swapaxes(x, 0, 1)


def bounds(case: Case, keep: np.ndarray | None = None, dropout_p: float = 0.0
           ) -> tuple[float, list[np.ndarray]]:
    mask, bias = packed_mask_and_bias(case)
    fwd = forward_bound(bhld(case.q), bhld(case.k), bhld(case.v), scale=case.scale,
                        logit_extra=case.logit_extra)
    if dropout_p:
        fwd /= 1 - dropout_p  # kept weights are scaled up by 1 / (1 - p)
    grads = grad_bound(bhld(case.q), bhld(case.k), bhld(case.v), bhld(case.dout),
                       scale=case.scale, bias=bias, allowed=mask, softcap=case.softcap,
                       keep=keep, dropout_p=dropout_p)
    return fwd, [bhld(g) for g in grads]


# --- forward ------------------------------------------------------------------------------


@given(case=cases())
def test_varlen_equals_the_loop_over_sequences(backend, case):
    res = refattn.attention_varlen(
        *(backend.asarray(x) for x in (case.q, case.k, case.v, case.cu_q, case.cu_k)),
        return_lse=True, **options(case, backend),
    )
    want_out, want_lse = loop_forward(case, backend)
    fwd, _ = bounds(case)
    assert_within(backend.to_numpy(res.out), want_out, fwd, "out")
    bound = lse_bound(bhld(case.q), bhld(case.k), scale=case.scale,
                      logit_extra=case.logit_extra, lse=want_lse)
    assert_within(backend.to_numpy(res.lse), want_lse, bound, "lse")


@given(case=cases(policies=("zero",)))
def test_varlen_equals_attention_with_the_explicit_block_mask(backend, case):
    mask, bias = packed_mask_and_bias(case)
    got = refattn.attention_varlen(
        *(backend.asarray(x) for x in (case.q, case.k, case.v, case.cu_q, case.cu_k)),
        return_weights=True, **options(case, backend),
    )
    want = refattn.attention(
        *(backend.asarray(x[None]) for x in (case.q, case.k, case.v)), layout="BLHD",
        mask=backend.asarray(mask), softcap=case.softcap, return_weights=True,
        scale=case.scale_option,
        bias=None if bias is None else backend.asarray(bias),
    )
    fwd, _ = bounds(case)
    assert_within(backend.to_numpy(got.out), backend.to_numpy(want.out)[0], fwd, "out")
    weights = backend.to_numpy(got.weights)
    assert weights.shape == (case.H, sum(case.lens_q), sum(case.lens_k))
    # Outside its own sequence's block (and window) a query's weight is exactly 0.
    assert np.all(weights[:, ~mask] == 0.0)
    bound = weight_bound(bhld(case.q), bhld(case.k), scale=case.scale,
                         logit_extra=case.logit_extra)
    assert_within(weights, backend.to_numpy(want.weights)[0], bound, "weights")


def test_nan_policy_stays_inside_each_sequence(backend):
    # Sequence 0: 2 queries, 1 key, window (0, 0) bottom-right: query 0 sits at position
    # -1 and sees nothing (NaN under "nan"), query 1 sees key 0 alone (weight exactly 1).
    # Sequence 1: 1 query, no keys: an empty sum, 0 under both policies. Sequence 2: 1
    # query, 2 keys, unaffected.
    rng = np.random.default_rng(9)
    cu_q, cu_k = np.array([0, 2, 3, 4]), np.array([0, 1, 1, 3])
    q, dout = rng.standard_normal((4, 1, 2)), rng.standard_normal((4, 1, 2))
    k, v = rng.standard_normal((3, 1, 2)), rng.standard_normal((3, 1, 2))
    args = [backend.asarray(x) for x in (q, k, v, cu_q, cu_k)]
    opts = dict(window=(0, 0), alignment="bottom_right", masked_rows="nan")
    res = refattn.attention_varlen(*args, return_weights=True, return_lse=True, **opts)
    w = backend.to_numpy(res.weights)[0]
    assert np.isnan(w[0, 0]) and np.all(w[0, 1:] == 0.0)
    np.testing.assert_array_equal(w[1:3], [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    out = backend.to_numpy(res.out)
    assert np.all(np.isnan(out[0])) and np.all(out[2] == 0.0) and np.all(np.isfinite(out[3]))
    np.testing.assert_array_equal(out[1], v[0])
    lse = backend.to_numpy(res.lse)[0]
    np.testing.assert_array_equal(lse[[0, 2]], [-np.inf, -np.inf])
    # One visible key: the LSE is that score, q.k / sqrt(2) (log 1 = 0 exactly), each
    # side within 3 u sum|q||k| / sqrt(2) of it (the 2-term dot product 2 u, the scale
    # or the division 1 u): 6 u apart at most.
    score = float(q[1, 0] @ k[0, 0]) / np.sqrt(2)
    assert abs(lse[1] - score) <= 6 * U64 * float(np.abs(q[1, 0]) @ np.abs(k[0, 0])) / np.sqrt(2)
    g = refattn.attention_varlen_backward(backend.asarray(dout), *args, **opts)
    dq, dk, dv = (backend.to_numpy(x) for x in g[:3])
    # NaN reaches the dead row's dq and its own sequence's key 0, nothing else.
    assert np.all(np.isnan(dq[0])) and np.all(np.isfinite(dq[1:]))
    assert np.all(np.isnan(dk[0])) and np.all(np.isnan(dv[0]))
    assert np.all(np.isfinite(dk[1:])) and np.all(np.isfinite(dv[1:]))
    # dropout_p = 1 zeroes everything, NaN rows included (as attention does).
    drop = dict(opts, dropout_p=1.0, dropout_mask=backend.asarray(np.zeros((1, 4, 3), bool)))
    np.testing.assert_array_equal(backend.to_numpy(refattn.attention_varlen(*args, **drop)), 0)
    for x in refattn.attention_varlen_backward(backend.asarray(dout), *args, **drop)[:3]:
        np.testing.assert_array_equal(backend.to_numpy(x), 0.0)


def test_varlen_with_float32_inputs_and_compute(backend):
    rng = np.random.default_rng(11)
    cu = np.array([0, 3, 3, 7])
    q, k, v = (rng.standard_normal((7, 2, 4)).astype(np.float32) for _ in range(3))
    got = refattn.attention_varlen(*(backend.asarray(x) for x in (q, k, v, cu, cu)),
                                   causal=True, compute_dtype="float32")
    assert backend.to_numpy(got).dtype == np.float32
    for s in (slice(0, 3), slice(3, 7)):
        want = refattn.attention(*(backend.asarray(x[s]) for x in (q, k, v)), causal=True,
                                 layout="BLHD", compute_dtype="float32")
        # Two float32 evaluations: the rounding bound with float32's unit roundoff.
        bound = forward_bound(bhld(q[s]), bhld(k[s]), bhld(v[s]), scale=0.5, dtype=np.float32)
        assert_within(backend.to_numpy(got)[s], backend.to_numpy(want).astype(np.float64),
                      bound, "out")
    default = refattn.attention_varlen(*(backend.asarray(x) for x in (q, k, v, cu, cu)))
    assert backend.to_numpy(default).dtype == np.float32  # computed in float64, cast back


@given(case=cases(policies=("zero",)), p=st.sampled_from([0.25, 0.5]),
       seed=st.integers(0, 2**32 - 1))
def test_varlen_dropout_mask_takes_each_sequences_block(backend, case, p, seed):
    tq, tk = sum(case.lens_q), sum(case.lens_k)
    keep = np.random.default_rng(seed).random((case.H, tq, tk)) >= p
    args = [backend.asarray(x) for x in (case.q, case.k, case.v, case.cu_q, case.cu_k)]
    got = refattn.attention_varlen(*args, dropout_p=p, dropout_mask=backend.asarray(keep),
                                   return_dropout_mask=True, **options(case, backend))
    np.testing.assert_array_equal(backend.to_numpy(got.dropout_mask), keep)
    want, _ = loop_forward(case, backend, keep, p)
    fwd, grads = bounds(case, keep, p)
    assert_within(backend.to_numpy(got.out), want, fwd, "out")
    g = refattn.attention_varlen_backward(
        backend.asarray(case.dout), *args, dropout_p=p, dropout_mask=backend.asarray(keep),
        **options(case, backend))
    for name, got_g, want_g, bnd in zip(("dq", "dk", "dv"), g[:3],
                                        loop_backward(case, backend, keep, p), grads,
                                        strict=True):
        assert_within(backend.to_numpy(got_g), want_g, 2 * bnd, name)


def test_varlen_rng_draws_the_mask_at_the_packed_shape(backend):
    rng = np.random.default_rng(5)
    cu_q, cu_k = np.array([0, 2, 5]), np.array([0, 4, 6])
    q, k, v = rng.standard_normal((5, 2, 3)), *(rng.standard_normal((6, 2, 3)) for _ in range(2))
    args = [backend.asarray(x) for x in (q, k, v, cu_q, cu_k)]
    res = refattn.attention_varlen(*args, dropout_p=0.5, rng=123, return_dropout_mask=True)
    keep = backend.to_numpy(res.dropout_mask)
    assert keep.shape == (2, 5, 6) and keep.dtype == bool
    # The same seed draws the same mask: passing it explicitly gives the same output.
    again = refattn.attention_varlen(*args, dropout_p=0.5, dropout_mask=res.dropout_mask)
    np.testing.assert_array_equal(backend.to_numpy(again), backend.to_numpy(res.out))


# --- backward -----------------------------------------------------------------------------


@given(case=cases())
def test_varlen_backward_equals_the_loop_over_sequences(backend, case):
    args = [backend.asarray(x) for x in (case.dout, case.q, case.k, case.v, case.cu_q,
                                         case.cu_k)]
    got = refattn.attention_varlen_backward(*args, **options(case, backend))
    assert got.dbias is None
    _, grads = bounds(case)
    for name, g, want, bnd in zip(("dq", "dk", "dv"), got[:3], loop_backward(case, backend),
                                  grads, strict=True):
        # Each within its bound of the exact gradient, so within twice it of each other.
        assert_within(backend.to_numpy(g), want, 2 * bnd, name)


@given(case=cases(policies=("zero",)))
def test_varlen_backward_from_saved_output_and_lse(backend, case):
    args = [backend.asarray(x) for x in (case.q, case.k, case.v, case.cu_q, case.cu_k)]
    fwd = refattn.attention_varlen(*args, return_lse=True, **options(case, backend))
    got = refattn.attention_varlen_backward(backend.asarray(case.dout), *args, output=fwd.out,
                                            lse=fwd.lse, **options(case, backend))
    _, grads = bounds(case)
    # The saved output and LSE carry the forward's rounding, which the weights rebuilt
    # from them inherit: within the same first-order bound as recomputing them.
    for name, g, want, bnd in zip(("dq", "dk", "dv"), got[:3], loop_backward(case, backend),
                                  grads, strict=True):
        assert_within(backend.to_numpy(g), want, 2 * bnd, name)


def test_explicit_namespace(backend):
    rng = np.random.default_rng(6)
    cu = np.array([0, 2, 5])
    q, k, v, dout = (backend.asarray(rng.standard_normal((5, 2, 3))) for _ in range(4))
    c = backend.asarray(cu)
    # The same computation whether xp is inferred or given: identical results.
    np.testing.assert_array_equal(
        backend.to_numpy(refattn.attention_varlen(q, k, v, c, c, xp=backend.xp)),
        backend.to_numpy(refattn.attention_varlen(q, k, v, c, c)))
    np.testing.assert_array_equal(
        backend.to_numpy(refattn.attention_varlen_backward(dout, q, k, v, c, c,
                                                           xp=backend.xp).dk),
        backend.to_numpy(refattn.attention_varlen_backward(dout, q, k, v, c, c).dk))


def test_a_namespace_that_does_not_match():
    import array_api_strict

    with pytest.raises(TypeError, match=r"xp is the array_api_strict namespace but q is a "
                                        r"numpy array"):
        call(xp=array_api_strict)
    with pytest.raises(TypeError, match=r"xp is the array_api_strict namespace"):
        refattn.attention_varlen_backward(np.ones((5, 2, 3)), Q, KV, KV, CU_Q, CU_K,
                                          xp=array_api_strict)


# --- validation ---------------------------------------------------------------------------

Q = np.random.default_rng(0).standard_normal((5, 2, 3))
KV = np.random.default_rng(1).standard_normal((6, 2, 3))
CU_Q, CU_K = np.array([0, 2, 5]), np.array([0, 4, 6])


def call(**kw: Any) -> Any:
    args = dict(q=Q, k=KV, v=KV, cu_seqlens_q=CU_Q, cu_seqlens_k=CU_K)
    args.update(kw)
    return refattn.attention_varlen(args.pop("q"), args.pop("k"), args.pop("v"),
                                    args.pop("cu_seqlens_q"), args.pop("cu_seqlens_k"), **args)


@pytest.mark.parametrize("kw,exc,match", [
    ({"cu_seqlens_q": np.array([0.0, 2.0, 5.0])}, TypeError,
     r"cu_seqlens_q must have an integer dtype .* got float64"),
    ({"cu_seqlens_k": np.array([[0, 4, 6]])}, ValueError,
     r"cu_seqlens_k must be 1-D of length B \+ 1 >= 2 .* got shape \(1, 3\)"),
    ({"cu_seqlens_q": np.array([5])}, ValueError, r"cu_seqlens_q must be 1-D of length B \+ 1"),
    ({"cu_seqlens_q": np.array([1, 2, 5])}, ValueError,
     r"cu_seqlens_q must start at 0; got cu_seqlens_q\[0\] = 1"),
    ({"cu_seqlens_q": np.array([0, 2, 4])}, ValueError,
     r"cu_seqlens_q must end at the number of packed queries \(5, axis 0 of the queries\); "
     r"got cu_seqlens_q\[-1\] = 4"),
    ({"cu_seqlens_k": np.array([0, 4, 7])}, ValueError,
     r"cu_seqlens_k must end at the number of packed keys \(6"),
    ({"cu_seqlens_q": np.array([0, 3, 2, 5])}, ValueError,
     r"cu_seqlens_q must be non-decreasing; got cu_seqlens_q\[1\] = 3 > cu_seqlens_q\[2\] = 2"),
    ({"cu_seqlens_q": np.array([0, 2, 2, 5])}, ValueError,
     r"same number of sequences; got lengths 4 and 3"),
    ({"q": Q[None]}, ValueError, r"q must be 3-D \(total_q, H, E\) .* got shape \(1, 5, 2, 3\)"),
    ({"v": KV[:, 0]}, ValueError, r"v must be 3-D \(total_k, Kv, Ev\)"),
    ({"alibi_slopes": np.ones(3)}, ValueError,
     r"alibi_slopes must have shape \(H,\) = \(2,\) or \(B, H\) = \(2, 2\); got \(3,\)"),
    ({"dropout_p": 0.5, "dropout_mask": np.ones((2, 5, 7), dtype=bool)}, ValueError,
     r"dropout_mask of shape \(2, 5, 7\) does not broadcast to \(H, total_q, total_k\) = "
     r"\(2, 5, 6\)"),
    ({"dropout_p": 0.5, "dropout_mask": np.ones((1, 2, 5, 6), dtype=bool)}, ValueError,
     r"dropout_mask of shape \(1, 2, 5, 6\) does not broadcast"),
    ({"masked_rows": "uniform"}, ValueError, r"masked_rows must be one of 'zero', 'nan'"),
    ({"alignment": "center"}, ValueError, r"alignment must be one of"),
    ({"window": (1, 2, 3)}, TypeError, r"window must be a pair \(left, right\)"),
    ({"window": (-3, 0)}, ValueError, r"window\[0\] \(left\) must be a non-negative int"),
    ({"causal": 1}, TypeError, r"causal must be True or False; got 1"),
    ({"cu_seqlens_q": [0, 2, 5]}, TypeError, r"cu_seqlens_q must be an array of a library"),
])
def test_bad_arguments(kw, exc, match):
    with pytest.raises(exc, match=match):
        call(**kw)


def test_offsets_from_another_library():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"arrays from two libraries: q is a torch array but "
                                        r"cu_seqlens_q is a numpy array"):
        call(q=torch.from_numpy(Q), k=torch.from_numpy(KV), v=torch.from_numpy(KV))


@pytest.mark.parametrize("kw,match", [
    ({"grad_out": np.ones((5, 2, 4))}, r"grad_out must have the output's shape \(total_q, H, "
                                       r"Ev\) = \(5, 2, 3\); got \(5, 2, 4\)"),
    ({"output": np.ones((1, 5, 2, 3))}, r"output must have the output's shape"),
    ({"lse": np.ones((5, 2))}, r"lse must have shape \(H, total_q\) = \(2, 5\); got \(5, 2\)"),
])
def test_bad_backward_arguments(kw, match):
    args = {"grad_out": np.ones((5, 2, 3))}
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        refattn.attention_varlen_backward(args.pop("grad_out"), Q, KV, KV, CU_Q, CU_K, **args)
