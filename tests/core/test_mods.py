"""refattn.mods: each ready-made mod against an explicit mask or bias built here.

Three levels, on every backend:
* the mod evaluated on index grids equals the explicit NumPy construction exactly
  (booleans; additive terms up to one rounding);
* ``attention`` / ``attention_backward`` with the mod equal the same calls with the
  explicit ``mask=`` / ``bias=``: bit for bit for mask mods (the same scores get the same
  0 / -inf added, so any difference is a different mask), within derived rounding
  bounds for score mods;
* the softcap derivative against torch autograd of an explicit formula and against
  central differences of ``attention`` itself.
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
from refattn import mods
from tests.helpers.cases import Case
from tests.helpers.variants import (
    U64,
    alibi_bias,
    assert_within,
    forward_bound,
    grad_bound,
    window_mask,
)

# --- problems -----------------------------------------------------------------------------


@dataclass
class Problem(Case):
    """A case at the default scale 1/sqrt(E), with a gradient of the output."""

    @property
    def scale(self) -> float:
        return self.scale_value

    @property
    def nbatch(self) -> int:
        return math.prod(self.batch)


@st.composite
def problems(draw: st.DrawFn, *, square: bool = False, batch: bool = True) -> Problem:
    batch_shape = draw(st.sampled_from([(), (2,), (2, 1)])) if batch else ()
    K = draw(st.sampled_from([1, 2]))
    H = K * draw(st.sampled_from([1, 2]))
    L = draw(st.integers(1, 5))
    S = L if square else draw(st.integers(1, 6))
    E, Ev = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q = rng.standard_normal((*batch_shape, H, L, E))
    k = rng.standard_normal((*batch_shape, K, S, E))
    v = rng.standard_normal((*batch_shape, K, S, Ev))
    dout = rng.standard_normal((*batch_shape, H, L, Ev))
    return Problem(q, k, v, dout=dout, rng=rng)


def grids(xp: Any, batch: tuple[int, ...], H: int, L: int, S: int) -> tuple[Any, ...]:
    """The index grids a mod is called with, built here as docs/conventions.rst describes them."""
    n = math.prod(batch)
    b = (xp.reshape(xp.arange(n), (*batch, 1, 1, 1)) if batch
         else xp.zeros((1, 1, 1), dtype=xp.int64))
    return (b, xp.reshape(xp.arange(H), (H, 1, 1)), xp.reshape(xp.arange(L), (L, 1)),
            xp.reshape(xp.arange(S), (1, S)))


def evaluate_mask(backend: Any, mod: Any, batch: tuple[int, ...], H: int, L: int,
                  S: int) -> np.ndarray:
    out = mod(*grids(backend.xp, batch, H, L, S))
    assert backend.xp.isdtype(out.dtype, "bool")
    return np.broadcast_to(backend.to_numpy(out), (*batch, H, L, S))


def on(backend: Any, *arrays: np.ndarray) -> list[Any]:
    return [backend.asarray(a) for a in arrays]


def both_equal(got: Any, want: Any, backend: Any, what: str) -> None:
    np.testing.assert_array_equal(backend.to_numpy(got), backend.to_numpy(want), err_msg=what)


SIDES = st.sampled_from([None, -1, 0, 1, 2, 5])
ALIGNMENTS = st.sampled_from(["top_left", "bottom_right"])


# --- mask mods evaluated on grids ---------------------------------------------------------


@given(L=st.integers(0, 6), S=st.integers(0, 7), alignment=ALIGNMENTS)
def test_causal_mod_is_the_shifted_triangle(backend, L, S, alignment):
    shift = 0 if alignment == "top_left" else S - L
    mod = mods.causal(alignment, L=L, S=S)
    got = evaluate_mask(backend, mod, (), 1, L, S)[0]
    np.testing.assert_array_equal(got, np.tril(np.ones((L, S), dtype=bool), k=shift))


@given(L=st.integers(1, 6), S=st.integers(1, 7), left=SIDES, right=SIDES, alignment=ALIGNMENTS)
def test_sliding_window_mod_is_the_band(backend, L, S, left, right, alignment):
    shift = 0 if alignment == "top_left" else S - L
    mod = mods.sliding_window(left, right, alignment=alignment, L=L, S=S)
    got = evaluate_mask(backend, mod, (), 1, L, S)[0]
    # The band written out entry by entry, -1 and None both meaning "no limit".
    lo = None if left in (None, -1) else left
    hi = None if right in (None, -1) else right
    want = np.array([[(lo is None or j >= i + shift - lo) and (hi is None or j <= i + shift + hi)
                      for j in range(S)] for i in range(L)], dtype=bool).reshape(L, S)
    np.testing.assert_array_equal(got, want)


@given(n=st.integers(1, 7), prefix=st.integers(0, 8))
def test_prefix_lm_mod_is_bidirectional_prefix_then_causal(backend, n, prefix):
    got = evaluate_mask(backend, mods.prefix_lm(prefix), (), 1, n, n)[0]
    want = np.tril(np.ones((n, n), dtype=bool))
    want[:, :prefix] = True
    np.testing.assert_array_equal(got, want)


def test_prefix_lm_mod_takes_one_length_per_flat_batch_index(backend):
    lengths = np.array([0, 2, 5, 1, 3, 4])  # batch (2, 3) flattened in C order
    got = evaluate_mask(backend, mods.prefix_lm(backend.asarray(lengths)), (2, 3), 2, 5, 5)
    for flat, n in enumerate(lengths):
        want = np.tril(np.ones((5, 5), dtype=bool))
        want[:, :n] = True
        np.testing.assert_array_equal(got[np.unravel_index(flat, (2, 3))], np.stack([want] * 2))


@given(L=st.integers(1, 7), S=st.integers(1, 7), seed=st.integers(0, 2**32 - 1),
       self_attention=st.booleans())
def test_document_mask_mod_matches_equal_ids(backend, L, S, seed, self_attention):
    rng = np.random.default_rng(seed)
    ids_q = np.sort(rng.integers(0, 3, L))
    ids_kv = ids_q if self_attention else np.sort(rng.integers(0, 3, S))
    S = ids_kv.shape[0]
    mod = mods.document_mask(*on(backend, ids_q, *(() if self_attention else (ids_kv,))))
    got = evaluate_mask(backend, mod, (2,), 1, L, S)
    want = np.array([[ids_q[i] == ids_kv[j] for j in range(S)] for i in range(L)]).reshape(L, S)
    np.testing.assert_array_equal(got, np.broadcast_to(want, got.shape))


def test_document_mask_mod_with_ids_per_batch_row(backend):
    rng = np.random.default_rng(1)
    ids_q = np.sort(rng.integers(0, 3, (4, 5)), axis=1)  # batch (2, 2) flattened: 4 rows
    ids_kv = np.sort(rng.integers(0, 3, (4, 6)), axis=1)
    got = evaluate_mask(backend, mods.document_mask(*on(backend, ids_q, ids_kv)), (2, 2), 3, 5, 6)
    for flat in range(4):
        want = ids_q[flat][:, None] == ids_kv[flat][None, :]
        np.testing.assert_array_equal(got[np.unravel_index(flat, (2, 2))],
                                      np.broadcast_to(want, (3, 5, 6)))


# --- mask mods through attention: bit for bit against the explicit mask --------------------


def mask_cases(p: Problem, kind: str, backend: Any, draw: Any) -> tuple[Any, np.ndarray]:
    """A mask mod of ``kind`` and the same mask written out here, (*batch, H, L, S)."""
    full = (*p.batch, p.H, p.L, p.S)
    if kind == "causal":
        alignment = draw(ALIGNMENTS)
        shift = 0 if alignment == "top_left" else p.S - p.L
        return (mods.causal(alignment, L=p.L, S=p.S),
                np.broadcast_to(np.tril(np.ones((p.L, p.S), dtype=bool), k=shift), full))
    if kind == "window":
        left, right, alignment = draw(SIDES), draw(SIDES), draw(ALIGNMENTS)
        shift = 0 if alignment == "top_left" else p.S - p.L
        lo = None if left in (None, -1) else left
        hi = None if right in (None, -1) else right
        return (mods.sliding_window(left, right, alignment=alignment, L=p.L, S=p.S),
                np.broadcast_to(window_mask(p.L, p.S, lo, hi, shift), full))
    if kind == "prefix":
        lengths = p.rng.integers(0, p.S + 1, p.nbatch)
        want = np.tril(np.ones((p.nbatch, p.L, p.S), dtype=bool))
        for n, m in zip(lengths, want, strict=True):
            m[:, :n] = True
        return (mods.prefix_lm(backend.asarray(lengths)),
                np.broadcast_to(want.reshape(*p.batch, 1, p.L, p.S), full))
    ids_q = np.sort(p.rng.integers(0, 2, (p.nbatch, p.L)), axis=1)
    ids_kv = np.sort(p.rng.integers(0, 2, (p.nbatch, p.S)), axis=1)
    want = (ids_q[:, :, None] == ids_kv[:, None, :]).reshape(*p.batch, 1, p.L, p.S)
    return mods.document_mask(*on(backend, ids_q, ids_kv)), np.broadcast_to(want, full)


@given(p=problems(square=False), kind=st.sampled_from(["causal", "window", "prefix", "doc"]),
       data=st.data())
def test_mask_mods_through_attention_equal_the_explicit_mask(backend, p, kind, data):
    mod, mask = mask_cases(p, kind, backend, data.draw)
    q, k, v, dout = on(backend, p.q, p.k, p.v, p.dout)
    m = backend.asarray(np.ascontiguousarray(mask))
    with_mod = refattn.attention(q, k, v, mask_mod=mod, return_lse=True)
    explicit = refattn.attention(q, k, v, mask=m, return_lse=True)
    both_equal(with_mod.out, explicit.out, backend, "out")
    both_equal(with_mod.lse, explicit.lse, backend, "lse")
    g_mod = refattn.attention_backward(dout, q, k, v, mask_mod=mod)
    g_explicit = refattn.attention_backward(dout, q, k, v, mask=m)
    for name in ("dq", "dk", "dv"):
        both_equal(getattr(g_mod, name), getattr(g_explicit, name), backend, name)


@given(p=problems(), alignment=ALIGNMENTS, left=SIDES, right=SIDES)
def test_causal_and_window_mods_equal_the_core_options(backend, p, alignment, left, right):
    q, k, v = on(backend, p.q, p.k, p.v)
    for mod, option in (
        (mods.causal(alignment, L=p.L, S=p.S), {"causal": True}),
        (mods.sliding_window(left, right, alignment=alignment, L=p.L, S=p.S),
         {"window": (left, right)}),
    ):
        both_equal(refattn.attention(q, k, v, mask_mod=mod),
                   refattn.attention(q, k, v, alignment=alignment, **option), backend,
                   str(option))


# --- score mods ---------------------------------------------------------------------------


def _compare_with_bias(backend: Any, p: Problem, mod: Any, bias: np.ndarray) -> None:
    """attention(score_mod=mod) against attention(bias=bias), forward and backward."""
    q, k, v, dout = on(backend, p.q, p.k, p.v, p.dout)
    b = backend.asarray(bias)
    extra = float(np.max(np.abs(bias), initial=0.0))
    got = refattn.attention(q, k, v, score_mod=mod)
    want = refattn.attention(q, k, v, bias=b)
    # Two float64 evaluations of one attention whose logits carry the added term.
    bound = forward_bound(p.q, p.k, p.v, scale=p.scale, logit_extra=extra)
    assert_within(backend.to_numpy(got), backend.to_numpy(want), bound, "out")
    g_mod = refattn.attention_backward(dout, q, k, v, score_mod=mod)
    g_bias = refattn.attention_backward(dout, q, k, v, bias=b)
    bounds = grad_bound(p.q, p.k, p.v, p.dout, scale=p.scale, bias=bias)
    for name, bnd in zip(("dq", "dk", "dv"), bounds, strict=True):
        # Each is within its bound of the exact gradient: within twice it of each other.
        assert_within(backend.to_numpy(getattr(g_mod, name)),
                      backend.to_numpy(getattr(g_bias, name)), 2 * bnd, name)


@given(p=problems(), per_batch=st.booleans(), alignment=ALIGNMENTS)
def test_alibi_mod_equals_the_explicit_bias(backend, p, per_batch, alignment):
    shape = (p.nbatch, p.H) if per_batch else (p.H,)
    slopes = p.rng.uniform(0.0, 1.0, shape)
    shift = 0 if alignment == "top_left" else p.S - p.L
    per = slopes.reshape(*p.batch, p.H) if per_batch else slopes
    bias = np.broadcast_to(alibi_bias(per, p.L, p.S, shift), (*p.batch, p.H, p.L, p.S))
    mod = mods.alibi(backend.asarray(slopes), alignment=alignment, L=p.L, S=p.S)
    _compare_with_bias(backend, p, mod, np.ascontiguousarray(bias))


@given(p=problems(batch=False), per_head=st.booleans(), m=st.integers(0, 3),
       alignment=ALIGNMENTS, explicit_m=st.booleans())
def test_relative_position_bias_mod_equals_the_explicit_bias(backend, p, per_head, m,
                                                             alignment, explicit_m):
    table = p.rng.standard_normal((p.H, 2 * m + 1) if per_head else (2 * m + 1,))
    shift = 0 if alignment == "top_left" else p.S - p.L
    bias = np.empty((p.H, p.L, p.S))
    for h in range(p.H):
        row = table[h] if per_head else table
        for i in range(p.L):
            for j in range(p.S):
                bias[h, i, j] = row[min(max(j - i - shift, -m), m) + m]
    # max_distance given, or left to be read off the table's odd width.
    mod = mods.relative_position_bias(backend.asarray(table), m if explicit_m else None,
                                      alignment=alignment, L=p.L, S=p.S)
    _compare_with_bias(backend, p, mod, bias)


@given(p=problems(), cap=st.sampled_from([0.5, 2.0, 30.0]))
def test_softcap_mod_forward_equals_the_explicit_formula(backend, p, cap):
    q, k, v = on(backend, p.q, p.k, p.v)
    got = refattn.attention(q, k, v, score_mod=mods.softcap(cap))
    kr = np.repeat(p.k, p.H // p.k.shape[-3], axis=-3)
    vr = np.repeat(p.v, p.H // p.v.shape[-3], axis=-3)
    s = cap * np.tanh(p.scale * (p.q @ np.swapaxes(kr, -1, -2)) / cap)
    w = np.exp(s - s.max(axis=-1, keepdims=True))
    want = (w / w.sum(axis=-1, keepdims=True)) @ vr
    bound = forward_bound(p.q, p.k, p.v, scale=p.scale, logit_extra=cap)
    assert_within(backend.to_numpy(got), want, bound, "out")
    # Without a bias the core's own softcap (applied before the bias) is the same map.
    assert_within(backend.to_numpy(got), backend.to_numpy(refattn.attention(q, k, v, softcap=cap)),
                  bound, "out vs softcap=")


@given(p=problems(), cap=st.sampled_from([0.5, 2.0, 30.0]), with_mask=st.booleans())
def test_softcap_mod_gradients_equal_torch_autograd(backend, p, cap, with_mask):
    torch = pytest.importorskip("torch")
    mask = None
    if with_mask:
        # A band that keeps key 0 in every row: no row is fully masked, where torch's
        # plain softmax would give NaN and refattn's default 0.
        band = window_mask(p.L, p.S, 1, None, 0)
        band[:, 0] = True
        mask = np.array(np.broadcast_to(band, (p.H, p.L, p.S)))
    q, k, v, dout = on(backend, p.q, p.k, p.v, p.dout)
    extra = {} if mask is None else {"mask": backend.asarray(mask)}
    got = refattn.attention_backward(dout, q, k, v, score_mod=mods.softcap(cap), **extra)
    # The explicit forward, differentiated by torch: scale, cap, mask, softmax, @ V.
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (p.q, p.k, p.v))
    kr = tk.repeat_interleave(p.H // p.k.shape[-3], dim=-3)
    vr = tv.repeat_interleave(p.H // p.v.shape[-3], dim=-3)
    s = cap * torch.tanh(p.scale * (tq @ kr.transpose(-1, -2)) / cap)
    if mask is not None:
        s = s.masked_fill(~torch.from_numpy(mask), -math.inf)
    out = torch.softmax(s, dim=-1) @ vr
    out.backward(torch.from_numpy(p.dout))
    bounds = grad_bound(p.q, p.k, p.v, p.dout, scale=p.scale, softcap=cap,
                        allowed=mask)
    for name, t, bnd in zip(("dq", "dk", "dv"), (tq, tk, tv), bounds, strict=True):
        assert_within(backend.to_numpy(getattr(got, name)), t.grad.numpy(), 2 * bnd, name)


@pytest.mark.parametrize("which", ["softcap", "relative_position_bias"])
def test_score_mod_gradients_match_central_differences(backend, which):
    rng = np.random.default_rng(7)
    q, k, v, dout = (rng.standard_normal(s) for s in ((2, 4, 3), (2, 5, 3), (2, 5, 2),
                                                       (2, 4, 2)))
    table = rng.standard_normal((2, 5))
    if which == "softcap":
        mod = mods.softcap(0.7)  # logits of a few units: the cap bends them hard
        extra, bias = 0.7, None
    else:
        mod = mods.relative_position_bias(backend.asarray(table))
        extra = float(np.max(np.abs(table)))
        bias = np.full((2, 4, 5), extra)  # magnitudes are all grad_bound needs
    qb, vb, db = on(backend, q, v, dout)
    grad = backend.to_numpy(refattn.attention_backward(db, qb, backend.asarray(k), vb,
                                                       score_mod=mod).dk)
    u = rng.standard_normal(k.shape)

    def phi(t: float) -> float:
        out = refattn.attention(qb, backend.asarray(k + t * u), vb, score_mod=mod)
        return float(np.sum(dout * backend.to_numpy(out)))

    def central(h: float) -> float:
        return (phi(h) - phi(-h)) / (2 * h)

    h = 1e-3
    d_h, d_half = central(h), central(h / 2)
    want = float(np.sum(grad * u))
    # D(h) = phi'(0) + a h^2 + O(h^4): the h^2 term of D(h/2) is (D(h) - D(h/2)) / 3
    # (Richardson), and at h = 1e-3 the O(h^4) remainder of these O(1) scores is far
    # below it, so twice that covers truncation. Rounding: each output entry is within
    # half the two-evaluation forward bound of exact, so phi within sum|dO| times that,
    # and the quotient within 2 sum|dO| (bound / 2) / (2 (h / 2)). The gradient's own
    # error (grad_bound) is added too.
    fwd = forward_bound(q, np.abs(k) + h * np.abs(u), v, scale=1 / math.sqrt(3),
                        logit_extra=extra)
    truncation = 2 * abs(d_h - d_half) / 3
    rounding = float(np.sum(np.abs(dout))) * fwd / h
    own = float(np.sum(np.abs(u) * grad_bound(q, k, v, dout, scale=1 / math.sqrt(3),
                                              softcap=0.7 if which == "softcap" else None,
                                              bias=bias)[1]))
    assert abs(d_half - want) <= truncation + rounding + own, (d_half, want, d_h)
    # and the estimate is meaningful: the truncation term is small against the derivative
    assert truncation <= 1e-4 * max(abs(want), 1.0)


# --- the derivative attributes ------------------------------------------------------------


def test_softcap_derivative_is_the_derivative_of_the_mod(backend):
    xp = backend.xp
    s = np.linspace(-5.0, 5.0, 41)
    mod = mods.softcap(1.5)
    got = backend.to_numpy(mod.derivative(backend.asarray(s), None, None, None, None))
    # d/ds c tanh(s/c) = sech(s/c)^2 = 1 / cosh(s/c)^2 (an identity independent of tanh);
    # 1 - t^2 rounds t (1 u) and squares and subtracts it (2 more u): <= 4 u absolute.
    want = 1.0 / np.cosh(s / 1.5) ** 2
    assert_within(got, want, 4 * U64, "derivative")
    assert xp.isdtype(mod(backend.asarray(s), None, None, None, None).dtype, "real floating")


def test_additive_score_mods_have_derivative_exactly_one(backend):
    s = backend.asarray(np.linspace(-3.0, 3.0, 12).reshape(1, 3, 4))
    b, h, qi, kj = grids(backend.xp, (), 1, 3, 4)
    for mod in (mods.alibi(backend.asarray(np.array([0.5]))),
                mods.relative_position_bias(backend.asarray(np.ones(3)))):
        np.testing.assert_array_equal(
            np.broadcast_to(backend.to_numpy(mod.derivative(s, b, h, qi, kj)), (1, 3, 4)), 1.0)


# --- error paths --------------------------------------------------------------------------


def test_bottom_right_mods_need_the_lengths():
    for make in (lambda: mods.causal("bottom_right", L=3),
                 lambda: mods.sliding_window(1, 0, alignment="bottom_right", S=4),
                 lambda: mods.alibi(np.ones(2), alignment="bottom_right"),
                 lambda: mods.relative_position_bias(np.ones(3), alignment="bottom_right")):
        with pytest.raises(ValueError, match=r"alignment='bottom_right'\) needs the lengths "
                                             r"L and S"):
            make()


def test_bad_alignment_and_lengths():
    with pytest.raises(ValueError, match=r"alignment must be one of 'top_left', 'bottom_right'"):
        mods.causal("diagonal")
    with pytest.raises(ValueError, match=r"L must be a non-negative int; got -1"):
        mods.causal("bottom_right", L=-1, S=3)
    with pytest.raises(TypeError, match=r"S must be a non-negative int; got float 3.0"):
        mods.causal("bottom_right", L=1, S=3.0)


@pytest.mark.parametrize("left,right,exc,match", [
    (-2, 0, ValueError, r"\(left, right\)\[0\] \(left\) must be a non-negative int; got -2"),
    (1, 1.5, TypeError, r"\(left, right\)\[1\] \(right\) must be a non-negative int; got "
                        r"float 1.5"),
    (True, 0, TypeError, r"\[0\] \(left\) must be a non-negative int; got bool True"),
])
def test_bad_window_sides(left, right, exc, match):
    with pytest.raises(exc, match=match):
        mods.sliding_window(left, right)


def test_bad_prefix_lengths():
    with pytest.raises(ValueError, match=r"prefix_length must be a non-negative int; got -1"):
        mods.prefix_lm(-1)
    with pytest.raises(TypeError, match=r"prefix_length must have an integral dtype"):
        mods.prefix_lm(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"prefix_length must be 1-D; got shape \(2, 1\)"):
        mods.prefix_lm(np.array([[1], [2]]))
    with pytest.raises(TypeError, match=r"prefix_length must be an array .* got str"):
        mods.prefix_lm("3")


def test_per_batch_values_must_match_the_batch():
    q = np.ones((3, 1, 2, 2))
    with pytest.raises(ValueError, match=r"prefix_length has 2 batch rows but attention has 3 "
                                         r"batch elements"):
        refattn.attention(q, q, q, mask_mod=mods.prefix_lm(np.array([1, 2])))
    with pytest.raises(ValueError, match=r"doc_ids_q has 2 batch rows but attention has 3"):
        refattn.attention(q, q, q, mask_mod=mods.document_mask(np.zeros((2, 2), dtype=int)))
    with pytest.raises(ValueError, match=r"slopes has 2 batch rows but attention has 3"):
        refattn.attention(q, q, q, score_mod=mods.alibi(np.ones((2, 1))))


def test_bad_document_ids():
    with pytest.raises(TypeError, match=r"doc_ids_q must have an integral dtype; got float64"):
        mods.document_mask(np.zeros(3))
    with pytest.raises(ValueError, match=r"doc_ids_kv must be 1-D or 2-D; got shape \(1, 1, 3\)"):
        mods.document_mask(np.zeros(3, dtype=int), np.zeros((1, 1, 3), dtype=int))
    with pytest.raises(ValueError, match=r"both be 1-D, or both 2-D .* got shapes \(3,\) and "
                                         r"\(1, 3\)"):
        mods.document_mask(np.zeros(3, dtype=int), np.zeros((1, 3), dtype=int))
    with pytest.raises(ValueError, match=r"same batch size; got shapes \(2, 3\) and \(1, 3\)"):
        mods.document_mask(np.zeros((2, 3), dtype=int), np.zeros((1, 3), dtype=int))
    q = np.ones((1, 4, 2))
    with pytest.raises(ValueError, match=r"doc_ids_q covers 3 query positions but attention "
                                         r"asked for position 3"):
        refattn.attention(q, q, q, mask_mod=mods.document_mask(np.zeros(3, dtype=int)))
    with pytest.raises(ValueError, match=r"doc_ids_kv covers 2 key positions"):
        refattn.attention(q, q, q, mask_mod=mods.document_mask(np.zeros(4, dtype=int),
                                                               np.zeros(2, dtype=int)))


def test_mods_refuse_arrays_of_another_library():
    torch = pytest.importorskip("torch")
    q = torch.ones((2, 3, 4), dtype=torch.float64)
    with pytest.raises(TypeError, match=r"doc_ids_q is a numpy array but attention runs on "
                                        r"torch arrays"):
        refattn.attention(q, q, q, mask_mod=mods.document_mask(np.zeros(3, dtype=int)))
    with pytest.raises(TypeError, match=r"slopes is a numpy array but attention runs on torch"):
        refattn.attention(q, q, q, score_mod=mods.alibi(np.ones(2)))
    with pytest.raises(TypeError, match=r"doc_ids_q is a numpy array but doc_ids_kv is a torch"):
        mods.document_mask(np.zeros(3, dtype=int), torch.zeros(3, dtype=torch.int64))


def test_bad_slopes_and_tables():
    with pytest.raises(TypeError, match=r"slopes must have a real floating dtype; got int64"):
        mods.alibi(np.ones(2, dtype=np.int64))
    with pytest.raises(ValueError, match=r"slopes must be 1-D or 2-D; got shape \(1, 1, 2\)"):
        mods.alibi(np.ones((1, 1, 2)))
    q = np.ones((3, 2, 4))
    with pytest.raises(ValueError, match=r"slopes has 2 heads .* but attention has H=3"):
        refattn.attention(q, q, q, score_mod=mods.alibi(np.ones(2)))
    with pytest.raises(ValueError, match=r"odd length 2 \* max_distance \+ 1; got shape \(4,\)"):
        mods.relative_position_bias(np.ones(4))
    with pytest.raises(ValueError, match=r"length 2 \* max_distance \+ 1 = 5; got shape "
                                         r"\(2, 3\)"):
        mods.relative_position_bias(np.ones((2, 3)), max_distance=2)
    with pytest.raises(ValueError, match=r"table has 2 heads \(shape \(2, 3\)\) but attention "
                                         r"has H=3"):
        refattn.attention(q, q, q, score_mod=mods.relative_position_bias(np.ones((2, 3))))


@pytest.mark.parametrize("cap,exc", [(0.0, ValueError), (-1.0, ValueError),
                                     (math.inf, ValueError), (math.nan, ValueError),
                                     (True, TypeError), ("2", TypeError)])
def test_bad_softcap(cap, exc):
    with pytest.raises(exc, match=r"softcap cap must be"):
        mods.softcap(cap)
