"""refattn.compat.flash_attn against flash-attn 2's semantics, constructed here.

flash-attn needs a CUDA GPU, so the reference is a NumPy transcription of what its
forward pass computes (Dao-AILab/flash-attention, flash_attn/flash_attn_interface.py,
csrc/flash_attn/flash_api.cpp, csrc/flash_attn/src/mask.h and softmax.h):

* ``flash_params``: how mha_fwd / mha_varlen_fwd / mha_fwd_kvcache and
  set_params_fprop turn (causal, window_size) into the kernel's is_causal / is_local
  and window edges;
* ``flash_reference``: the kernel's per-row column limits, softcap then ALiBi (in the
  kernel's two forms: ``+slope * col`` on the causal branch, ``-slope * |row + S - L -
  col|`` elsewhere) then -inf, the softmax, the LSE (+inf where the exp-sum is 0),
  dropout scaling.

Hand-worked examples pin the transcription where it departs from the docstring
formula (the clamped right edge when L > S + 1). Varlen is checked against the loop
over sequences of the same reference, the KV cache against the reference over each
sequence's concatenated keys. Tolerances are the derived rounding bounds of
tests/helpers/variants.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refattn
from refattn.compat.flash_attn import (
    flash_attn_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
)
from tests.helpers.cases import Case
from tests.helpers.variants import U64, assert_within, forward_bound, lse_bound, weight_bound

# --- the reference -------------------------------------------------------------------------


def flash_params(seqlen_q: int, seqlen_k: int, window_size: tuple[int, int], causal: bool,
                 has_alibi: bool) -> tuple[bool, bool, int, int]:
    """(is_causal, is_local, window_left, window_right) as the kernel receives them.

    Transcribed from mha_fwd (the same lines open mha_varlen_fwd with max_seqlen_q/k and
    mha_fwd_kvcache with the cache capacity) and set_params_fprop.
    """
    wl, wr = window_size
    if wl >= seqlen_k:
        wl = -1
    if wr >= seqlen_k:
        wr = -1
    if seqlen_q == 1 and not has_alibi:
        causal = False
    if causal:
        wr = 0
    is_causal = wl < 0 and wr == 0
    if wl < 0 and wr >= 0:
        wl = seqlen_k
    if wl >= 0 and wr < 0:
        wr = seqlen_k
    is_local = (wl >= 0 or wr >= 0) and not is_causal
    return is_causal, is_local, wl, wr


def flash_reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, scale: float,
                    params: tuple[bool, bool, int, int], softcap: float,
                    slopes: np.ndarray | None, keep: np.ndarray | None = None,
                    dropout_p: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(out (B, L, H, Ev), lse (B, H, L), probs (B, H, L, S)) of one batch, in float64."""
    is_causal, is_local, wl, wr = params
    B, L, H, _ = q.shape
    S, K = k.shape[1], k.shape[2]
    qh = q.transpose(0, 2, 1, 3)
    kh = np.repeat(k.transpose(0, 2, 1, 3), H // K, axis=1)
    vh = np.repeat(v.transpose(0, 2, 1, 3), H // K, axis=1)
    s = scale * (qh @ kh.swapaxes(-1, -2))
    if softcap > 0:
        s = softcap * np.tanh(s / softcap)
    row = np.arange(L)[:, None]
    col = np.arange(S)[None, :]
    if slopes is not None:
        sl = slopes.reshape((-1, H, 1, 1))
        s = s + sl * col if is_causal else s - sl * np.abs(row + S - L - col)
    allowed = np.ones((L, S), dtype=bool)
    if is_causal or is_local:
        right_limit = np.minimum(S, row + 1 + S - L + (0 if is_causal else wr))
        allowed = col < right_limit
        if is_local:
            allowed &= col >= np.maximum(0, row + S - L - wl)
    s = np.where(allowed, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True, initial=-np.inf)
    e = np.exp(s - np.where(m == -np.inf, 0.0, m))
    total = e.sum(axis=-1, keepdims=True)
    probs = e / np.where(total == 0, 1.0, total)
    lse = np.where(total == 0, np.inf, np.log(np.where(total == 0, 1.0, total)) + m)[..., 0]
    weights = probs if keep is None else probs * keep / (1 - dropout_p)
    out = (weights @ vh).transpose(0, 2, 1, 3)
    return out, lse, probs


# --- cases ---------------------------------------------------------------------------------


@dataclass(kw_only=True)
class FlashCase(Case):
    """A case in flash-attn's layout, q (B, L, H, E), with flash-attn's options."""

    layout: ClassVar[str] = "BLHD"

    causal: bool
    window_size: tuple[int, int]
    softcap: float
    slopes: np.ndarray | None
    scale_option: float | None

    @property
    def scale(self) -> float:
        E = self.q.shape[-1]
        return 1 / math.sqrt(E) if self.scale_option is None else self.scale_option

    def logit_extra(self, L: int, S: int) -> float:
        """Largest |ALiBi term| + softcap: what the logit carries besides q.k."""
        extra = self.softcap
        if self.slopes is not None:
            extra += float(np.max(np.abs(self.slopes), initial=0.0)) * (L + S)
        return extra


@st.composite
def cases(draw: st.DrawFn, *, B: int | None = None, L: int | None = None,
          S: int | None = None) -> FlashCase:
    B = draw(st.integers(1, 2)) if B is None else B
    L = draw(st.integers(0, 6)) if L is None else L
    S = draw(st.integers(0, 6)) if S is None else S
    K = draw(st.sampled_from([1, 2]))
    H = K * draw(st.sampled_from([1, 2]))
    E, Ev = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    slopes_kind = draw(st.sampled_from([None, "H", "BH"]))
    return FlashCase(
        q=2 * rng.standard_normal((B, L, H, E)), k=2 * rng.standard_normal((B, S, K, E)),
        v=rng.standard_normal((B, S, K, Ev)), causal=draw(st.booleans()),
        window_size=(draw(st.integers(-1, 7)), draw(st.integers(-1, 7))),
        softcap=draw(st.sampled_from([0.0, 0.0, 0.7, 4.0])),
        slopes=None if slopes_kind is None else rng.uniform(
            0.0, 1.0, (H,) if slopes_kind == "H" else (B, H)),
        scale_option=draw(st.sampled_from([None, None, 0.0, -0.6, 1.3])),
    )


def kwargs(case: FlashCase, backend: Any) -> dict[str, Any]:
    return dict(causal=case.causal, window_size=case.window_size, softcap=case.softcap,
                softmax_scale=case.scale_option,
                alibi_slopes=None if case.slopes is None else backend.asarray(case.slopes))


def bshd(x: np.ndarray) -> np.ndarray:
    # (B, L, H, D) -> (B, H, L, D) for the bound helpers, which read the last two axes.
    return x.transpose(0, 2, 1, 3)


# --- flash_attn_func -----------------------------------------------------------------------


@given(data=st.data())
def test_flash_attn_func_matches_flash_semantics(backend, data):
    case = data.draw(cases())
    B, L, H, _ = case.q.shape
    S = case.k.shape[1]
    dropout_p = data.draw(st.sampled_from([0.0, 0.0, 0.25]))
    keep = None
    extra: dict[str, Any] = {}
    if dropout_p:
        keep = np.random.default_rng(L * 7 + S).random((B, H, L, S)) >= dropout_p
        extra = dict(dropout_p=dropout_p, dropout_mask=backend.asarray(keep))
    out, lse, probs = flash_attn_func(
        *(backend.asarray(x) for x in (case.q, case.k, case.v)), return_attn_probs=True,
        **kwargs(case, backend), **extra)
    params = flash_params(L, S, case.window_size, case.causal, case.slopes is not None)
    want_out, want_lse, want_p = flash_reference(
        case.q, case.k, case.v, scale=case.scale, params=params, softcap=case.softcap,
        slopes=case.slopes, keep=keep, dropout_p=dropout_p)
    extra_logit = case.logit_extra(L, S)
    bound = forward_bound(bshd(case.q), bshd(case.k), bshd(case.v), scale=case.scale,
                          logit_extra=extra_logit) / (1 - dropout_p)
    assert_within(backend.to_numpy(out), want_out, bound, "out")
    # The causal-ALiBi correction adds slope * position once more: one rounding of |lse|.
    lse_tol = lse_bound(bshd(case.q), bshd(case.k), scale=case.scale,
                        logit_extra=extra_logit, lse=want_lse)
    lse_tol = lse_tol + 2 * U64 * np.where(np.isfinite(want_lse), np.abs(want_lse), 0.0)
    assert_within(backend.to_numpy(lse), want_lse, lse_tol, "lse")
    signed = want_p if keep is None else np.where(keep, want_p, -want_p)
    assert_within(backend.to_numpy(probs), signed,
                  weight_bound(bshd(case.q), bshd(case.k), scale=case.scale,
                               logit_extra=extra_logit), "S_dmask")


def test_a_right_edge_clamped_to_s_hides_keys_from_early_queries():
    # L=10, S=4, window (1, -1): flash-attn 2 turns the unlimited right edge into S = 4.
    # Query i sits at key position i - 6 and sees keys j with max(0, i - 7) <= j <
    # min(4, i - 6 + 1 + 4) = min(4, i - 1): none for i <= 1, key 0 alone for i = 2, and
    # from i = 5 on everything the left edge allows, as if the right edge were unlimited.
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 10, 1, 4))
    k, v = (rng.standard_normal((1, 4, 1, 4)) for _ in range(2))
    out, lse, _ = flash_attn_func(q, k, v, window_size=(1, -1), return_attn_probs=True)
    assert np.all(out[0, :2] == 0) and np.all(lse[0, 0, :2] == np.inf)
    assert np.allclose(out[0, 2], v[0, 0], rtol=0, atol=4 * U64)  # one key: weight 1
    unclamped = refattn.attention(q, k, v, window=(1, None), alignment="bottom_right",
                                  layout="BLHD")
    # The same keys, the same arithmetic path: only rounding-free equality is expected.
    assert np.array_equal(out[0, 5:], unclamped[0, 5:])
    assert not np.allclose(out[0, :2], unclamped[0, :2])


def test_docstring_window_formula_where_flash_does_not_clamp():
    # For L <= S + 1 the clamping is invisible and the docstring's formula holds: query i
    # sees keys i + S - L - left .. i + S - L + right (-1: unlimited), built here by hand.
    rng = np.random.default_rng(1)
    L, S = 4, 6
    q = rng.standard_normal((1, L, 1, 3))
    k, v = (rng.standard_normal((1, S, 1, 3)) for _ in range(2))
    for window in [(1, 0), (0, 2), (-1, 1), (2, -1), (0, 0)]:
        i = np.arange(L)[:, None] + S - L
        j = np.arange(S)[None, :]
        ok = np.ones((L, S), dtype=bool)
        if window[0] >= 0:
            ok &= j >= i - window[0]
        if window[1] >= 0:
            ok &= j <= i + window[1]
        s = np.where(ok, (q[0, :, 0] @ k[0, :, 0].T) / math.sqrt(3), -np.inf)
        p = np.exp(s - s.max(axis=1, keepdims=True))
        want = (p / p.sum(axis=1, keepdims=True)) @ v[0, :, 0]
        got = flash_attn_func(q, k, v, window_size=window)[0, :, 0]
        # Logits of 3 terms of O(1) and 6 keys: a few dozen ulp is far above rounding.
        assert np.allclose(got, want, rtol=0, atol=64 * U64), window


def test_causal_alibi_lse_carries_the_kernels_row_constant():
    # On the causal branch the kernel adds +slope * j: softmax unchanged, LSE larger by
    # slope * (i + S - L) than log sum exp(s - slope |i + S - L - j|). By hand with L = 1
    # (the single query sits at key position S - 1 = 2 and sees every key) and q.k = 0:
    q = np.zeros((1, 1, 1, 2))
    k = np.zeros((1, 3, 1, 2))
    v = np.arange(3.0).reshape(1, 3, 1, 1)
    slope = np.asarray([0.5])
    _, lse, _ = flash_attn_func(q, k, v, causal=True, alibi_slopes=slope,
                                return_attn_probs=True)
    # scores 0 + 0.5 * j for j = 0, 1, 2: lse = log(1 + e^0.5 + e^1).
    assert lse[0, 0, 0] == pytest.approx(math.log(1 + math.exp(0.5) + math.e), abs=4 * U64)
    _, lse_nc, _ = flash_attn_func(q, k, v, alibi_slopes=slope, return_attn_probs=True)
    # Not causal: -0.5 * |2 - j| = -1, -0.5, 0, i.e. the same minus slope * (S - 1) = 1.
    assert lse_nc[0, 0, 0] == pytest.approx(math.log(1 + math.exp(0.5) + math.e) - 1.0,
                                            abs=4 * U64)


@pytest.mark.parametrize("convention,fill", [("fa2", np.inf), ("fa3", -np.inf)])
def test_lse_of_rows_that_see_no_key(convention, fill):
    # causal with L = 3 > S = 1: rows 0 and 1 sit at key positions -2 and -1.
    rng = np.random.default_rng(2)
    q = rng.standard_normal((1, 3, 2, 4))
    k, v = (rng.standard_normal((1, 1, 2, 4)) for _ in range(2))
    out, lse, probs = flash_attn_func(q, k, v, causal=True, return_attn_probs=True,
                                      lse_convention=convention)
    assert np.all(out[0, :2] == 0) and np.all(probs[0, :, :2] == 0)
    assert np.all(lse[0, :, :2] == fill)
    assert np.all(np.isfinite(lse[0, :, 2]))


@pytest.mark.parametrize("dtype,lse_dtype", [("float64", "float64"), ("float32", "float32"),
                                             ("float16", "float32")])
def test_dtypes_of_the_results(dtype, lse_dtype):
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 3, 2, 4)).astype(dtype) for _ in range(3))
    out, lse, probs = flash_attn_func(q, k, v, return_attn_probs=True)
    assert out.dtype == dtype and probs.dtype == dtype and lse.dtype == lse_dtype
    # The output is the float64 result rounded once to the input dtype.
    wide = flash_attn_func(*(x.astype(np.float64) for x in (q, k, v)))
    assert np.array_equal(out, wide.astype(dtype))


def test_dtypes_on_torch():
    torch = pytest.importorskip("torch")
    q, k, v = (torch.randn(1, 3, 2, 8, dtype=torch.bfloat16) for _ in range(3))
    out, lse, probs = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert probs.dtype == torch.bfloat16 and lse.shape == (1, 2, 3)


def test_rng_draws_the_mask_it_reports():
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((2, 3, 2, 4)) for _ in range(3))
    out, _, probs = flash_attn_func(q, k, v, dropout_p=0.5, rng=7, return_attn_probs=True)
    keep = probs >= 0
    again = flash_attn_func(q, k, v, dropout_p=0.5, dropout_mask=keep)
    assert np.array_equal(out, again)
    # deterministic only picks a backward kernel in flash-attn: same forward.
    assert np.array_equal(out, flash_attn_func(q, k, v, dropout_p=0.5, rng=7,
                                               deterministic=True))


@pytest.mark.parametrize("kw,exc,match", [
    (dict(window_size=(1, 2, 3)), TypeError, "window_size must be a pair"),
    (dict(window_size=(1.5, 0)), TypeError, r"window_size\[0\] \(left\) must be an int"),
    (dict(window_size=(0, -2)), ValueError, r"window_size\[1\] \(right\) must be >= 0"),
    (dict(softcap=-1.0), ValueError, "softcap must be >= 0"),
    (dict(softcap="1"), TypeError, "softcap must be a real number"),
    (dict(causal=1), TypeError, "causal must be True or False"),
    (dict(lse_convention="fa4"), ValueError, "lse_convention must be one of"),
    (dict(dropout_p=0.2), ValueError, "dropout_mask"),
])
def test_bad_arguments(kw, exc, match):
    q = np.zeros((1, 2, 2, 4))
    with pytest.raises(exc, match=match):
        flash_attn_func(q, q, q, **kw)


@pytest.mark.parametrize("shapes,match", [
    (((2, 2, 4), (1, 2, 2, 4), (1, 2, 2, 4)), r"q must be 4-D \(B, L, H, E\)"),
    (((1, 2, 2, 4), (1, 2, 2, 4), (1, 3, 2, 4)), "k and v must agree"),
    (((1, 2, 2, 4), (2, 2, 2, 4), (2, 2, 2, 4)), "with q's B=1"),
    (((1, 2, 3, 4), (1, 2, 2, 4), (1, 2, 2, 4)), "divide"),
])
def test_bad_shapes(shapes, match):
    q, k, v = (np.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        flash_attn_func(q, k, v)


# --- flash_attn_varlen_func ----------------------------------------------------------------


@st.composite
def varlen_cases(draw: st.DrawFn) -> tuple[FlashCase, list[int], list[int], int, int]:
    B = draw(st.integers(1, 3))
    lens_q = draw(st.lists(st.integers(0, 4), min_size=B, max_size=B))
    lens_k = draw(st.lists(st.integers(0, 5), min_size=B, max_size=B))
    # max_seqlen_* may exceed the longest sequence: it is what flash-attn clamps with.
    max_q = max(lens_q) + draw(st.sampled_from([0, 0, 2]))
    max_k = max(lens_k) + draw(st.sampled_from([0, 0, 3]))
    case = draw(cases(B=1, L=sum(lens_q), S=sum(lens_k)))
    if case.slopes is not None and case.slopes.ndim == 2:
        case.slopes = np.random.default_rng(B).uniform(0.0, 1.0, (B, case.slopes.shape[1]))
    return case, lens_q, lens_k, max_q, max_k


def offsets(lens: list[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)


@given(data=st.data())
def test_varlen_is_the_loop_over_sequences(backend, data):
    case, lens_q, lens_k, max_q, max_k = data.draw(varlen_cases())
    B, H = len(lens_q), case.q.shape[2]
    cu_q, cu_k = offsets(lens_q), offsets(lens_k)
    dropout_p = data.draw(st.sampled_from([0.0, 0.3]))
    keep = None
    extra: dict[str, Any] = {}
    if dropout_p:
        keep = np.random.default_rng(B).random((B, H, max_q, max_k)) >= dropout_p
        extra = dict(dropout_p=dropout_p, dropout_mask=backend.asarray(keep))
    q, k, v = case.q[0], case.k[0], case.v[0]
    out, lse, probs = flash_attn_varlen_func(
        *(backend.asarray(x) for x in (q, k, v, cu_q, cu_k)), max_q, max_k,
        return_attn_probs=True, **kwargs(case, backend), **extra)
    out, lse, probs = (backend.to_numpy(x) for x in (out, lse, probs))
    assert out.shape == q.shape[:2] + v.shape[2:] and lse.shape == (H, cu_q[-1])
    assert probs.shape == (B, H, max_q, max_k)
    params = flash_params(max_q, max_k, case.window_size, case.causal,
                          case.slopes is not None)
    for b in range(B):
        sq, sk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        slopes = None if case.slopes is None else (
            case.slopes if case.slopes.ndim == 1 else case.slopes[b])
        kb = None if keep is None else keep[b:b + 1, :, :lens_q[b], :lens_k[b]]
        want_out, want_lse, want_p = flash_reference(
            q[None, sq], k[None, sk], v[None, sk], scale=case.scale, params=params,
            softcap=case.softcap, slopes=slopes, keep=kb, dropout_p=dropout_p)
        extra_logit = case.logit_extra(max_q, max_k)
        bound = forward_bound(bshd(q[None, sq]), bshd(k[None, sk]), bshd(v[None, sk]),
                              scale=case.scale, logit_extra=extra_logit) / (1 - dropout_p)
        assert_within(out[sq], want_out[0], bound, f"out of sequence {b}")
        tol = lse_bound(bshd(q[None, sq]), bshd(k[None, sk]), scale=case.scale,
                        logit_extra=extra_logit, lse=want_lse[0])
        tol = tol + 2 * U64 * np.where(np.isfinite(want_lse[0]), np.abs(want_lse[0]), 0.0)
        assert_within(lse[:, sq], want_lse[0], tol, f"lse of sequence {b}")
        padded = np.zeros((H, max_q, max_k))
        signed = want_p[0] if kb is None else np.where(kb[0], want_p[0], -want_p[0])
        padded[:, :lens_q[b], :lens_k[b]] = signed
        assert_within(probs[b], padded, weight_bound(
            bshd(q[None, sq]), bshd(k[None, sk]), scale=case.scale,
            logit_extra=extra_logit), f"S_dmask of sequence {b}")


def test_varlen_equals_flash_attn_func_on_equal_lengths():
    # B sequences of one length packed are flash_attn_func's batch, reshaped.
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((3, 4, 2, 4)) for _ in range(3))
    cu = np.arange(0, 13, 4, dtype=np.int32)
    packed = flash_attn_varlen_func(*(x.reshape(12, 2, 4) for x in (q, k, v)), cu, cu, 4, 4,
                                    causal=True, window_size=(2, -1), softcap=3.0)
    batched = flash_attn_func(q, k, v, causal=True, window_size=(2, -1), softcap=3.0)
    assert np.allclose(packed, batched.reshape(12, 2, 4), rtol=0, atol=1e-15)


def test_varlen_rng_mask_round_trips_through_s_dmask():
    # The drawn packed mask comes back in S_dmask's per-sequence layout (its sign), and
    # given back as dropout_mask in that layout it reproduces the output exactly.
    rng = np.random.default_rng(9)
    cu_q, cu_k = np.asarray([0, 2, 5], dtype=np.int32), np.asarray([0, 3, 4], dtype=np.int32)
    q = rng.standard_normal((5, 2, 4))
    k, v = (rng.standard_normal((4, 1, 4)) for _ in range(2))
    out, _, probs = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 3, 3, dropout_p=0.5, rng=3,
                                           causal=True, return_attn_probs=True)
    again = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 3, 3, dropout_p=0.5, causal=True,
                                   dropout_mask=probs >= 0, deterministic=True)
    assert np.array_equal(out, again)
    assert np.any(probs < 0)  # something was dropped


@pytest.mark.parametrize("kw,exc,match", [
    (dict(block_table=np.zeros((2, 1), dtype=np.int32)), NotImplementedError,
     "block_table is not implemented by refattn's flash_attn_varlen_func front-end"),
    (dict(max_seqlen_q=2), ValueError, r"max_seqlen_q=2 is below the longest sequence \(3\)"),
    (dict(max_seqlen_k=2.0), TypeError, "max_seqlen_k must be an int"),
    (dict(cu_seqlens_q=np.asarray([0, 3, 4], dtype=np.int32)), ValueError,
     "cu_seqlens_q must run non-decreasing from 0 to 5"),
    (dict(cu_seqlens_k=np.asarray([0.0, 3.0, 5.0])), TypeError,
     "cu_seqlens_k must have an integer dtype"),
    (dict(dropout_p=0.5, dropout_mask=np.ones((2, 2, 3, 4), dtype=bool)), ValueError,
     r"dropout_mask of shape \(2, 2, 3, 4\) does not broadcast"),
    (dict(dropout_p=0.5, dropout_mask=np.ones((2, 2, 3, 3))), TypeError,
     "dropout_mask must be a boolean array"),
])
def test_varlen_bad_arguments(kw, exc, match):
    q = np.zeros((5, 2, 4))
    args = dict(cu_seqlens_q=np.asarray([0, 3, 5], dtype=np.int32),
                cu_seqlens_k=np.asarray([0, 2, 5], dtype=np.int32), max_seqlen_q=3,
                max_seqlen_k=3)
    args.update(kw)
    with pytest.raises(exc, match=match):
        flash_attn_varlen_func(q, q, q, **args)


# --- flash_attn_with_kvcache ---------------------------------------------------------------


@st.composite
def kvcache_cases(draw: st.DrawFn) -> tuple[FlashCase, np.ndarray, np.ndarray, np.ndarray, int]:
    B = draw(st.integers(1, 3))
    L_new = draw(st.integers(0, 2))
    L = draw(st.integers(1, 3))
    capacity = draw(st.integers(L_new, 6))
    lens = np.asarray(draw(st.lists(st.integers(0, capacity - L_new), min_size=B,
                                    max_size=B)), dtype=np.int32)
    case = draw(cases(B=B, L=L, S=capacity))
    rng = np.random.default_rng(int(lens.sum()) + 11 * L_new)
    k_new = rng.standard_normal((B, L_new, *case.k.shape[2:]))
    v_new = rng.standard_normal((B, L_new, *case.v.shape[2:]))
    return case, lens, k_new, v_new, L_new


@given(data=st.data())
def test_kvcache_is_attention_over_the_concatenated_keys(backend, data):
    case, lens, k_new, v_new, L_new = data.draw(kvcache_cases())
    B, L = case.q.shape[:2]
    capacity = case.k.shape[1]
    new = dict(k=backend.asarray(k_new), v=backend.asarray(v_new)) if L_new else {}
    k_cache, v_cache = backend.asarray(case.k), backend.asarray(case.v)
    res = flash_attn_with_kvcache(
        backend.asarray(case.q), k_cache, v_cache,
        cache_seqlens=backend.asarray(lens), return_softmax_lse=True,
        **kwargs(case, backend), **new)
    assert len(res) == 2  # (out, softmax_lse): the caches are updated in place
    out, lse = backend.to_numpy(res[0]), backend.to_numpy(res[1])
    want_k, want_v = case.k.copy(), case.v.copy()
    for b in range(B):
        want_k[b, lens[b]:lens[b] + L_new] = k_new[b]
        want_v[b, lens[b]:lens[b] + L_new] = v_new[b]
    assert np.array_equal(backend.to_numpy(k_cache), want_k)
    assert np.array_equal(backend.to_numpy(v_cache), want_v)
    params = flash_params(L, capacity, case.window_size, case.causal, case.slopes is not None)
    for b in range(B):
        n = int(lens[b]) + L_new
        slopes = None if case.slopes is None else (
            case.slopes if case.slopes.ndim == 1 else case.slopes[b])
        want_out, want_lse, _ = flash_reference(
            case.q[b:b + 1], want_k[b:b + 1, :n], want_v[b:b + 1, :n], scale=case.scale,
            params=params, softcap=case.softcap, slopes=slopes)
        extra_logit = case.logit_extra(L, capacity)
        bound = forward_bound(bshd(case.q[b:b + 1]), bshd(want_k[b:b + 1, :n]),
                              bshd(want_v[b:b + 1, :n]), scale=case.scale,
                              logit_extra=extra_logit)
        assert_within(out[b], want_out[0], bound, f"out of sequence {b}")
        tol = lse_bound(bshd(case.q[b:b + 1]), bshd(want_k[b:b + 1, :n]), scale=case.scale,
                        logit_extra=extra_logit, lse=want_lse[0])
        tol = tol + 2 * U64 * np.where(np.isfinite(want_lse[0]), np.abs(want_lse[0]), 0.0)
        assert_within(lse[b], want_lse[0], tol, f"lse of sequence {b}")


def test_kvcache_paged_and_batch_index_forms_agree_with_the_contiguous_one():
    rng = np.random.default_rng(6)
    B, page, pages_per_seq, H, E = 2, 2, 3, 2, 4
    k_cache, v_cache = (rng.standard_normal((B, page * pages_per_seq, H, E)) for _ in range(2))
    q, k, v = (rng.standard_normal((B, 1, H, E)) for _ in range(3))
    lens = np.asarray([2, 4], dtype=np.int32)
    # Paged: the pages of both sequences shuffled into one pool.
    order = rng.permutation(B * pages_per_seq)
    pool_k = k_cache.reshape(B * pages_per_seq, page, H, E)[np.argsort(order)]
    pool_v = v_cache.reshape(B * pages_per_seq, page, H, E)[np.argsort(order)]
    table = order.reshape(B, pages_per_seq).astype(np.int32)
    # cache_batch_idx: the same rows, stored reversed among an extra unused row.
    rows_k = np.concatenate([k_cache[::-1], rng.standard_normal((1, *k_cache.shape[1:]))])
    rows_v = np.concatenate([v_cache[::-1], rng.standard_normal((1, *v_cache.shape[1:]))])
    spare = rows_k[2].copy()
    idx = np.asarray([1, 0], dtype=np.int32)
    kw = dict(cache_seqlens=lens, causal=True, window_size=(3, 0), return_softmax_lse=True)
    want = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, **kw)
    got = flash_attn_with_kvcache(q, pool_k, pool_v, k, v, block_table=table, **kw)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    assert np.array_equal(pool_k[table].reshape(k_cache.shape), k_cache)
    assert np.array_equal(pool_v[table].reshape(v_cache.shape), v_cache)
    got = flash_attn_with_kvcache(q, rows_k, rows_v, k, v, cache_batch_idx=idx, **kw)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    assert np.array_equal(rows_k[:2][::-1], k_cache) and np.array_equal(rows_k[2], spare)
    assert np.array_equal(rows_v[:2][::-1], v_cache)


def test_kvcache_without_seqlens_reads_the_whole_cache():
    rng = np.random.default_rng(7)
    q = rng.standard_normal((2, 2, 2, 4))
    k_cache, v_cache = (rng.standard_normal((2, 5, 1, 4)) for _ in range(2))
    out = flash_attn_with_kvcache(q, k_cache, v_cache, causal=True, num_splits=3,
                                  rotary_interleaved=False)
    # num_splits and rotary_interleaved (without rotary tables) change nothing.
    assert np.array_equal(out, flash_attn_func(q, k_cache, v_cache, causal=True))


@pytest.mark.parametrize("kw,exc,match", [
    (dict(k="new", cache_seqlens=None), ValueError, "give cache_seqlens with them"),
    (dict(cache_batch_idx=np.asarray([0, 0]), k="new"), ValueError,
     "cache_batch_idx must be distinct"),
    (dict(cache_batch_idx=np.asarray([0, 3])), ValueError,
     r"cache_batch_idx entries must be rows of the cache \(0 .. 1\)"),
    (dict(cache_batch_idx=np.asarray([0.0, 1.0])), TypeError,
     "cache_batch_idx must have an integer dtype"),
    (dict(cache_batch_idx=np.asarray([0, 1]), block_table=np.zeros((2, 3), dtype=np.int32)),
     ValueError, "cache_batch_idx cannot be combined with block_table"),
    (dict(num_splits=1.5), TypeError, "num_splits must be an int"),
    (dict(window_size=(-3, 0)), ValueError, r"window_size\[0\] \(left\) must be >= 0"),
    (dict(lse_convention="FA2"), ValueError, "lse_convention must be one of"),
])
def test_kvcache_bad_arguments(kw, exc, match):
    rng = np.random.default_rng(8)
    q = rng.standard_normal((2, 1, 2, 4))
    cache = rng.standard_normal((2, 3, 2, 4))
    args = dict(cache_seqlens=np.asarray([1, 2], dtype=np.int32))
    if kw.pop("k", None) == "new":
        args.update(k=q, v=q)
    args.update(kw)
    with pytest.raises(exc, match=match):
        flash_attn_with_kvcache(q, cache, cache, **args)
