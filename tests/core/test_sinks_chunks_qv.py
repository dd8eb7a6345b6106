"""Attention sinks (``sinks=``), chunked local attention (``attention_chunk=``) and the qv
term (``qv=``) on every path, forward and backward, against constructions written here:

* sinks: one more score column holding the sink, with a zero value row, softmaxed by
  hand (NumPy) and differentiated by torch autograd;
* chunks: the mask built with loops from ``(i + shift) // chunk == j // chunk``;
* qv: the scores ``scale (q k^T + qv v^T)`` formed by hand (torch), autograd for the
  gradients.

Tolerances are ``refattn._tolerance``'s derived first-order bounds, applied to the problem
the option is equivalent to (the sink as one more score of size |sink|, qv as a longer
head dim ``[q, qv] . [k, v]``), plus the rounding the blocked path's sink scaling adds.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refattn
from refattn._agnostic import _blocked
from refattn._agnostic._blocked import key_spans, query_blocks
from refattn._problem import build_problem
from refattn._tolerance import gradient_rounding_bound, rounding_bound
from tests.helpers.cases import EPS64, Case, assert_close_within, cases, repeat_heads

torch = pytest.importorskip("torch")

U = EPS64 / 2
PATHS = [{"implementation": "direct"}, {"implementation": "blocked"},
         {"precision": "compensated"}]
PATH_IDS = ["direct", "blocked", "compensated"]


# ------------------------------------------------------------------ the constructions


def explicit_chunks(L: int, S: int, chunk: int, shift: int) -> np.ndarray:
    """Loop-built chunk mask: query i (at key position i + shift) sees key j when both
    positions fall in the same chunk [c * chunk, (c + 1) * chunk)."""
    m = np.zeros((L, S), dtype=bool)
    for i in range(L):
        for j in range(S):
            m[i, j] = math.floor((i + shift) / chunk) == math.floor(j / chunk)
    return m


def explicit_causal(L: int, S: int, shift: int) -> np.ndarray:
    return np.array([[j <= i + shift for j in range(S)] for i in range(L)], dtype=bool)


def torch_reference(case: Case, dout: np.ndarray, *, sinks=None, qv=None, mask=None):
    """Output, LSE and autograd gradients of the explicit construction, in float64.

    The sink is a score column appended to every row of its head, with a zero value row
    appended to V; qv adds the product ``qv v^T`` to the scores before the scale."""
    H, E = case.H, case.E
    leaves = {"q": case.q, "k": case.k, "v": case.v}
    if sinks is not None:
        leaves["sinks"] = sinks
    if qv is not None:
        leaves["qv"] = qv
    t = {n: torch.tensor(x, dtype=torch.float64, requires_grad=True) for n, x in leaves.items()}
    k = t["k"].repeat_interleave(H // case.k.shape[-3], dim=-3)
    v = t["v"].repeat_interleave(H // case.v.shape[-3], dim=-3)
    s = t["q"] @ k.transpose(-1, -2)
    if qv is not None:
        s = s + t["qv"] @ v.transpose(-1, -2)
    s = s / math.sqrt(E)
    if mask is not None:
        s = s.masked_fill(~torch.from_numpy(mask), -math.inf)
    if sinks is not None:
        column = t["sinks"].reshape(H, 1, 1).expand(*s.shape[:-1], 1)
        s = torch.cat([s, column], dim=-1)
        v = torch.cat([v, torch.zeros((*v.shape[:-2], 1, v.shape[-1]), dtype=v.dtype)],
                      dim=-2)
    lse = torch.logsumexp(s, dim=-1)
    # A row with nothing visible (no sink, every key masked) gives 0, refattn's "zero".
    p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)
    out = p @ v
    (out * torch.from_numpy(dout)).sum().backward()
    grads = {n: x.grad.numpy() for n, x in t.items()}
    return out.detach().numpy(), lse.detach().numpy(), grads


def bounds(case: Case, dout: np.ndarray, *, sinks=None, qv=None):
    """Forward and gradient bounds of ``refattn._tolerance`` for the equivalent problem:
    qv as a longer head dim, the sink as one more logit of size |sink| (a bias)."""
    scale = case.E ** -0.5
    q, k, v = case.q, repeat_heads(case.k, case.H), repeat_heads(case.v, case.H)
    if qv is not None:
        q, k = np.concatenate([q, qv], -1), np.concatenate([k, v], -1)
    bias = None if sinks is None else np.abs(sinks).reshape(-1, 1, 1) * np.ones((1, 1, 1))
    out_tol = rounding_bound(q, k, v, scale=scale, bias=bias)
    g = gradient_rounding_bound(q, k, v, dout, scale=scale, bias=bias)
    if sinks is not None:
        # The blocked path scales its rows by 1 / (1 + exp(sink - lse)) afterwards: the
        # exponent's rounding (its size plus one) and the division's, relative to max|V|.
        top = float(np.max(np.abs(sinks))) + scale * float(
            np.max(np.abs(q).sum(-1))) * float(np.max(np.abs(k)))
        out_tol += (top + 4) * U * float(np.max(np.abs(v), initial=0.0))
    return out_tol, g


def sink_grad_bound(case: Case, dout: np.ndarray, g: dict[str, float]) -> float:
    """d sink_h = -sum_i P_sink,i (dO_i . O_i) over the n = batch x L rows of a head: each
    term is off by the output's relative error and the Ev-term dot product's, bounded
    by n Ev max|dO| (2 (dV's bound per row) + (Ev + n + 2) u max|V|)."""
    n = max(1, int(np.prod(case.batch, dtype=int)) * case.L)
    Ev = case.v.shape[-1]
    gmax, vmax = float(np.max(np.abs(dout))), float(np.max(np.abs(case.v)))
    return n * Ev * gmax * (2 * g["dv"] + (Ev + n + 2) * U * vmax + 2 * g["dq"])


def run(backend, case, dout, path, **options):
    xs = [backend.asarray(x) for x in (case.q, case.k, case.v)]
    conv = {n: backend.asarray(x) if isinstance(x, np.ndarray) else x
            for n, x in options.items()}
    res = refattn.attention(*xs, return_lse=True, **path, **conv)
    grads = refattn.attention_backward(backend.asarray(dout), *xs, **path, **conv)
    return res, grads


def assert_lse(got: np.ndarray, want: np.ndarray, tol: float, what: str) -> None:
    # Rows with no visible key have LSE -inf in both; the others are compared.
    empty = want == -np.inf
    assert np.array_equal(got == -np.inf, empty), f"{what}: the -inf rows differ"
    assert_close_within(np.where(empty, 0.0, got), np.where(empty, 0.0, want), tol,
                        f"{what} lse")


def check(backend, res, grads, ref, out_tol, g, *, sink_tol=None, what=""):
    out, lse, rg = ref
    assert_close_within(backend.to_numpy(res.out), out, out_tol, f"{what} out")
    assert_lse(backend.to_numpy(res.lse), lse, out_tol, what)
    assert_close_within(backend.to_numpy(grads.dq), rg["q"], g["dq"], f"{what} dq")
    assert_close_within(backend.to_numpy(grads.dk), rg["k"], g["dk"] + g["dv"], f"{what} dk")
    assert_close_within(backend.to_numpy(grads.dv), rg["v"], g["dv"] + g["dk"], f"{what} dv")
    if "sinks" in rg:
        assert_close_within(backend.to_numpy(grads.dsinks), rg["sinks"], sink_tol,
                            f"{what} dsinks")
    else:
        assert grads.dsinks is None
    if "qv" in rg:
        assert_close_within(backend.to_numpy(grads.dqv), rg["qv"], g["dq"], f"{what} dqv")
    else:
        assert grads.dqv is None


# ------------------------------------------------------------------ sinks


def numpy_sink_softmax(case: Case, sinks: np.ndarray, mask: np.ndarray | None):
    """Out and LSE with the sink column appended, softmaxed by hand in NumPy."""
    k, v = repeat_heads(case.k, case.H), repeat_heads(case.v, case.H)
    s = case.q @ np.swapaxes(k, -1, -2) / math.sqrt(case.E)
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    column = np.broadcast_to(sinks.reshape(-1, 1, 1), (*s.shape[:-1], 1))
    full = np.concatenate([s, column], axis=-1)
    m = np.max(full, axis=-1, keepdims=True)
    e = np.exp(full - m)
    z = np.sum(e, axis=-1, keepdims=True)
    weights = e / z
    v_full = np.concatenate([v, np.zeros((*v.shape[:-2], 1, v.shape[-1]))], axis=-2)
    return weights @ v_full, (np.log(z) + m)[..., 0], weights[..., :-1]


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@given(case=cases(), sink_scale=st.sampled_from([0.0, 1.0, 10.0]), masked=st.booleans(),
       masked_rows=st.sampled_from(["zero", "nan", "uniform"]))
def test_sinks_equal_a_concatenated_sink_column(backend, path, case, sink_scale, masked,
                                                masked_rows):
    sinks = case.rng.standard_normal(case.H) * sink_scale
    # Some rows with no visible key at all: the sink then takes the whole row.
    mask = case.random_mask(density=0.6, min_true_per_row=0) if masked else None
    want_out, want_lse, want_w = numpy_sink_softmax(case, sinks, mask)
    xs = [backend.asarray(x) for x in (case.q, case.k, case.v)]
    got = refattn.attention(*xs, sinks=backend.asarray(sinks), return_lse=True,
                            return_weights=True,
                            mask=None if mask is None else backend.asarray(mask),
                            masked_rows=masked_rows, **path)
    dout = case.rng.standard_normal(want_out.shape)
    out_tol, _ = bounds(case, dout, sinks=sinks)
    # The masked-row policy never applies: every row has its (finite) sink.
    assert_close_within(backend.to_numpy(got.out), want_out, out_tol, "out")
    assert_close_within(backend.to_numpy(got.lse), want_lse, out_tol, "lse")
    assert_close_within(backend.to_numpy(got.weights), want_w, out_tol, "weights")


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@given(case=cases(), causal=st.booleans())
def test_sink_gradients_match_torch_autograd(backend, path, case, causal):
    sinks = case.rng.standard_normal(case.H) * 2.0
    mask = explicit_causal(case.L, case.S, 0) if causal else None
    dout = case.rng.standard_normal((*case.batch, case.H, case.L, case.v.shape[-1]))
    ref = torch_reference(case, dout, sinks=sinks, mask=mask)
    out_tol, g = bounds(case, dout, sinks=sinks)
    res, grads = run(backend, case, dout, path, sinks=sinks, causal=causal)
    check(backend, res, grads, ref, out_tol, g, sink_tol=sink_grad_bound(case, dout, g),
          what="sinks")


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_a_row_that_sees_no_key_gives_zero_and_the_sink_as_lse(path):
    rng = np.random.default_rng(3)
    q, k, v = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4)), \
        rng.standard_normal((2, 5, 6))
    mask = np.ones((2, 3, 5), dtype=bool)
    mask[:, 1] = False
    sinks = np.array([0.5, -3.0])
    for masked_rows in ("zero", "nan", "uniform"):
        res = refattn.attention(q, k, v, mask=mask, sinks=sinks, masked_rows=masked_rows,
                                return_lse=True, **path)
        assert np.all(res.out[:, 1] == 0.0)
        np.testing.assert_array_equal(res.lse[:, 1], sinks)
        g = refattn.attention_backward(np.ones_like(res.out), q, k, v, mask=mask,
                                       sinks=sinks, masked_rows=masked_rows, **path)
        # The row's output is 0 whatever q, k and the sink: nothing flows from it.
        assert np.all(g.dq[:, 1] == 0.0)
    # A sink of -inf is no sink: the masked-row policy is back.
    res = refattn.attention(q, k, v, mask=mask, sinks=np.full(2, -np.inf), masked_rows="nan",
                            **path)
    assert np.all(np.isnan(res[:, 1]))
    plain = refattn.attention(q, k, v, mask=mask, implementation="direct")
    np.testing.assert_allclose(res[:, [0, 2]], plain[:, [0, 2]], rtol=0, atol=1e-14)


def test_attention_grads_stay_a_four_tuple():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, 4)) for _ in range(3))
    g = refattn.attention_backward(q, q, k, v, sinks=np.zeros(2), qv=q)
    dq, dk, dv, dbias = g
    assert len(g) == 4 and dbias is None
    assert g.dsinks.shape == (2,) and g.dqv.shape == q.shape
    assert "dsinks=" in repr(g)
    plain = refattn.attention_backward(q, q, k, v)
    assert plain.dsinks is None and plain.dqv is None


# ------------------------------------------------------------------ chunks


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@given(case=cases(max_len=9), chunk=st.integers(1, 5), causal=st.booleans(),
       left=st.one_of(st.none(), st.integers(0, 3)),
       alignment=st.sampled_from(["top_left", "bottom_right"]))
def test_chunks_equal_the_explicit_mask(backend, path, case, chunk, causal, left, alignment):
    shift = 0 if alignment == "top_left" else case.S - case.L
    mask = explicit_chunks(case.L, case.S, chunk, shift)
    if causal:
        mask &= explicit_causal(case.L, case.S, shift)
    if left is not None:
        mask &= np.array([[j >= i + shift - left for j in range(case.S)]
                          for i in range(case.L)])
    dout = case.rng.standard_normal((*case.batch, case.H, case.L, case.v.shape[-1]))
    ref = torch_reference(case, dout, mask=mask)
    out_tol, g = bounds(case, dout)
    window = None if left is None else (left, None)
    res, grads = run(backend, case, dout, path, attention_chunk=chunk, causal=causal,
                     window=window, alignment=alignment)
    check(backend, res, grads, ref, out_tol, g, what="chunks")


@given(case=cases(min_len=3, max_len=12, batch=False), chunk=st.integers(1, 6),
       causal=st.booleans(), block_l=st.integers(1, 4), block_s=st.integers(1, 4),
       alignment=st.sampled_from(["top_left", "bottom_right"]))
def test_chunks_on_small_blocks(case, chunk, causal, block_l, block_s, alignment):
    # Small blocks cross chunk edges and lie wholly outside chunks (skipped).
    shift = 0 if alignment == "top_left" else case.S - case.L
    mask = explicit_chunks(case.L, case.S, chunk, shift)
    if causal:
        mask &= explicit_causal(case.L, case.S, shift)
    dout = case.rng.standard_normal((case.H, case.L, case.v.shape[-1]))
    out, lse, rg = torch_reference(case, dout, mask=mask)
    out_tol, g = bounds(case, dout)
    problem = build_problem(case.q, case.k, case.v, attention_chunk=chunk, causal=causal,
                            alignment=alignment)
    res = _blocked.blocked_attention(problem, block_l=block_l, block_s=block_s)
    assert_close_within(res.out, out, out_tol, "out")
    grads = _blocked.blocked_attention_backward(problem, dout, out=None, lse=None,
                                                block_l=block_l, block_s=block_s)
    assert_close_within(grads.dq, rg["q"], g["dq"], "dq")
    assert_close_within(grads.dk, rg["k"], g["dk"], "dk")
    assert_close_within(grads.dv, rg["v"], g["dv"], "dv")


@given(L=st.integers(1, 20), S=st.integers(1, 20), block=st.integers(1, 6),
       chunk=st.integers(1, 7), start=st.integers(0, 19), shift=st.integers(-5, 5))
def test_skipped_blocks_hold_no_visible_pair(L, S, block, chunk, start, shift):
    # The spans the blocked path drops are exactly those no row of the block may see.
    start = min(start, L - 1)
    stop = min(L, start + block)
    visible = explicit_chunks(L, S, chunk, shift)[start:stop]
    spans = key_spans(start, stop, S, block, causal=False, shift=0, chunk=chunk,
                      position_shift=shift)
    kept = np.zeros(S, dtype=bool)
    for span in spans:
        kept[span.start:span.stop] = True
        assert visible[:, span.start:span.stop].any()
    assert not visible[:, ~kept].any()
    # The transpose: query blocks visited for the keys [start', stop').
    k0 = min(start, S - 1)
    k1 = min(S, k0 + block)
    seen = explicit_chunks(L, S, chunk, shift)[:, k0:k1]
    rows = np.zeros(L, dtype=bool)
    for blk in query_blocks(k0, k1, L, block, causal=False, shift=0, chunk=chunk,
                            position_shift=shift):
        rows[blk.start:blk.stop] = True
    assert not seen[~rows].any()


# ------------------------------------------------------------------ qv


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@given(case=cases(), causal=st.booleans())
def test_qv_matches_torch_autograd(backend, path, case, causal):
    qv = case.rng.standard_normal((*case.batch, case.H, case.L, case.v.shape[-1]))
    mask = explicit_causal(case.L, case.S, 0) if causal else None
    dout = case.rng.standard_normal((*case.batch, case.H, case.L, case.v.shape[-1]))
    ref = torch_reference(case, dout, qv=qv, mask=mask)
    out_tol, g = bounds(case, dout, qv=qv)
    res, grads = run(backend, case, dout, path, qv=qv, causal=causal)
    check(backend, res, grads, ref, out_tol, g, what="qv")


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@given(case=cases(max_len=8), chunk=st.integers(1, 4))
def test_all_three_together(backend, path, case, chunk):
    sinks = case.rng.standard_normal(case.H)
    qv = case.rng.standard_normal((*case.batch, case.H, case.L, case.v.shape[-1]))
    mask = explicit_chunks(case.L, case.S, chunk, 0) & explicit_causal(case.L, case.S, 0)
    dout = case.rng.standard_normal((*case.batch, case.H, case.L, case.v.shape[-1]))
    ref = torch_reference(case, dout, sinks=sinks, qv=qv, mask=mask)
    out_tol, g = bounds(case, dout, sinks=sinks, qv=qv)
    res, grads = run(backend, case, dout, path, sinks=sinks, qv=qv, attention_chunk=chunk,
                     causal=True)
    check(backend, res, grads, ref, out_tol, g, sink_tol=sink_grad_bound(case, dout, g),
          what="all")


def test_qv_in_the_blhd_layout():
    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((2, 5, 4, 3)), rng.standard_normal((2, 6, 2, 3)), \
        rng.standard_normal((2, 6, 2, 7))
    qv = rng.standard_normal((2, 5, 4, 7))
    got = refattn.attention(q, k, v, qv=qv, layout="BLHD")

    def swap(x):
        return np.swapaxes(x, 1, 2)

    want = refattn.attention(swap(q), swap(k), swap(v), qv=swap(qv))
    np.testing.assert_allclose(got, swap(want), rtol=0, atol=1e-15)
    g = refattn.attention_backward(np.ones_like(got), q, k, v, qv=qv, layout="BLHD")
    gw = refattn.attention_backward(np.ones_like(want), swap(q), swap(k), swap(v),
                                    qv=swap(qv))
    np.testing.assert_allclose(g.dqv, swap(gw.dqv), rtol=0, atol=1e-14)


# ------------------------------------------------------------------ errors and kernels


def _qkv():
    rng = np.random.default_rng(0)
    return rng.standard_normal((2, 4, 3, 8)), rng.standard_normal((2, 2, 5, 8)), \
        rng.standard_normal((2, 2, 5, 6))


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"sinks": np.zeros(3)}, ValueError,
     "sinks must have shape (H,) = (4,), one logit per query head; got (3,)"),
    ({"sinks": np.zeros((2, 4))}, ValueError, "sinks must have shape (H,) = (4,)"),
    ({"sinks": np.zeros(4, dtype=np.int64)}, TypeError,
     "sinks must have a real floating dtype (float16, bfloat16, float32 or float64); got "
     "int64"),
    ({"attention_chunk": 0}, ValueError, "attention_chunk must be a positive int"),
    ({"attention_chunk": True}, ValueError, "attention_chunk must be a positive int"),
    ({"attention_chunk": 2.0}, ValueError, "got 2.0"),
    ({"qv": np.zeros((2, 4, 3, 8))}, ValueError,
     "qv must have q's shape with v's head dim Ev = 6: (..., H, L, Ev) = (2, 4, 3, 6); "
     "got (2, 4, 3, 8)"),
])
def test_errors_name_the_argument(kwargs, error, message):
    q, k, v = _qkv()
    for call in (lambda: refattn.attention(q, k, v, **kwargs),
                 lambda: refattn.attention_backward(np.zeros((2, 4, 3, 6)), q, k, v,
                                                    **kwargs)):
        with pytest.raises(error, match=re.escape(message)):
            call()


def test_qv_error_in_the_user_layout():
    q, k, v = (np.swapaxes(x, 1, 2) for x in _qkv())
    with pytest.raises(ValueError, match=re.escape(
            "(..., L, H, Ev) = (2, 3, 4, 6); got (2, 3, 4, 8)")):
        refattn.attention(q, k, v, qv=np.zeros((2, 3, 4, 8)), layout="BLHD")


@pytest.mark.parametrize("name", ["sinks", "attention_chunk", "qv"])
def test_the_kernels_name_each_option_unsupported(name):
    from refattn._cuda._support import unsupported

    q, k, v = _qkv()
    value = {"sinks": np.zeros(4), "attention_chunk": 2, "qv": np.zeros((2, 4, 3, 6))}[name]
    problem = build_problem(q, k, v, **{name: value})
    assert unsupported(problem, return_weights=False) == name
    assert unsupported(build_problem(q, k, v), return_weights=False) is None
