"""softcap and score_mod on the blocked path, against the direct path.

The blocked path applies the non-additive score transforms per block of scores (the
score_mod sees each block's own index grids) and cannot fold the online softmax's shift
into the product there. These tests draw small problems with tiny blocks (so that a
problem spans many blocks, causal ones skipped and masked ones cut by the diagonal) and
compare forward and backward with the direct path, which evaluates the same transforms
once on the whole score array, within a first-order bound derived below from the data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import array_api_compat
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refattn
from refattn._agnostic._blocked import (
    RESCALE_THRESHOLD,
)
from refattn._agnostic._masks import index_grids
from refattn._agnostic._scores import ScoreMods
from tests.helpers.cases import Case, divisors
from tests.helpers.paths import (
    blocked_attention,
    blocked_attention_backward,
    direct_attention,
    direct_backward,
)

U64 = float(np.finfo(np.float64).eps) / 2
ETA64 = float(np.finfo(np.float64).smallest_subnormal)


class RelativeBias:
    """Affine: 0.75 s + 0.1 (h + 1) (q - kv) - 0.2 b. Uses every grid."""

    slope = 0.75

    def __call__(self, score, b, h, q_idx, kv_idx):
        xp = array_api_compat.array_namespace(score)
        offset = 0.1 * xp.astype((h + 1) * (q_idx - kv_idx), score.dtype)
        return score * 0.75 + offset - 0.2 * xp.astype(b, score.dtype)

    @staticmethod
    def numpy(s, b, h, i, j):
        return 0.75 * s + 0.1 * (h + 1) * (i - j) - 0.2 * b


class Cube:
    """Not affine, with its derivative: s + 0.01 s^3."""

    def __call__(self, score, b, h, q_idx, kv_idx):
        return score + 0.01 * score * score * score

    def derivative(self, score, b, h, q_idx, kv_idx):
        return 1 + 0.03 * score * score

    @staticmethod
    def numpy(s, b, h, i, j):
        return s + 0.01 * s**3


@dataclass(kw_only=True)
class ModProblem(Case):
    """A case with softcap and a score_mod on the blocked path, and its block sizes."""

    scale: float
    bias: np.ndarray | None
    mask: np.ndarray | None
    causal: bool
    alignment: str
    softcap: float | None
    mod: object | None
    block_l: int
    block_s: int

    @property
    def batch(self):
        return np.broadcast_shapes(self.q.shape[:-3], self.k.shape[:-3])

    def allowed(self):
        allowed = self.mask
        if self.causal:
            shift = 0 if self.alignment == "top_left" else self.S - self.L
            tri = np.tril(np.ones((self.L, self.S), dtype=bool), k=shift)
            allowed = tri if allowed is None else allowed & tri
        return allowed


@st.composite
def mod_problems(draw):
    batch = draw(st.sampled_from([(), (2,), (2, 1)]))
    H = draw(st.sampled_from([1, 2, 4]))
    K = draw(st.sampled_from(divisors(H)))
    L, S = draw(st.integers(1, 8)), draw(st.integers(1, 9))
    E, Ev = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    magnitude = draw(st.sampled_from([0.5, 2.0, 5.0]))
    q = rng.uniform(-magnitude, magnitude, (*batch, H, L, E))
    k = rng.uniform(-magnitude, magnitude, (*batch, K, S, E))
    v = rng.uniform(-2, 2, (*batch, K, S, Ev))
    bias = rng.uniform(-2, 2, draw(st.sampled_from([(L, S), (H, 1, S)]))) \
        if draw(st.booleans()) else None
    mask = rng.random((L, S)) < 0.8 if draw(st.booleans()) else None
    softcap = draw(st.sampled_from([None, 0.5, 3.0]))
    mod = draw(st.sampled_from([None, RelativeBias(), Cube()]))
    if softcap is None and mod is None:
        softcap = 1.0  # always at least one transform: the plain case is tested elsewhere
    return ModProblem(
        q=q, k=k, v=v, dout=rng.uniform(-1, 1, (*batch, H, L, Ev)),
        scale=draw(st.sampled_from([E**-0.5, -0.7])), bias=bias, mask=mask,
        causal=draw(st.booleans()), alignment=draw(st.sampled_from(["top_left", "bottom_right"])),
        softcap=softcap, mod=mod, block_l=draw(st.integers(1, 4)),
        block_s=draw(st.integers(1, 4)),
    )


# --- the bound --------------------------------------------------------------------------


def _numpy_scores(p: ModProblem):
    """Final scores, written out in NumPy from the documented order, and magnitudes."""
    H, K = p.q.shape[-3], p.k.shape[-3]
    kr = np.repeat(p.k, H // K, axis=-3)
    raw = abs(p.scale) * (np.abs(p.q) @ np.swapaxes(np.abs(kr), -1, -2))
    s = p.scale * (p.q @ np.swapaxes(kr, -1, -2))
    if p.softcap is not None:
        s = p.softcap * np.tanh(s / p.softcap)
    if p.bias is not None:
        s = s + p.bias
    biased = s
    if p.mod is not None:
        b = np.arange(math.prod(p.batch)).reshape((*p.batch, 1, 1, 1)) if p.batch else 0
        h = np.arange(H).reshape(H, 1, 1)
        i, j = np.arange(p.L).reshape(-1, 1), np.arange(p.S).reshape(1, -1)
        s = p.mod.numpy(s, b, h, i, j)
    return raw, biased, s, kr


def _tolerances(p: ModProblem):
    """First-order bounds on |blocked - direct| for out, lse and each gradient.

    A score is one product of E terms (scale q first on the blocked path, after on the
    direct one: (E + 2) u A_raw), through the cap (slope <= 1; tanh, the division and
    the product: 4 u cap), the bias addition (u |biased|) and the mod (slope m, its own
    roundings 4 u |final|); then the blocked path subtracts a shift at most once per
    key block, nb + 2 roundings of size 2 A + RESCALE_THRESHOLD. That exponent error e
    moves a weight by a relative 2e, the sums add (2 S + 1 + 4 nb) u. Each path has its
    error against the exact value; their difference is bounded by the sum (factor 2).

    The backward's dS = P (dP - D) is rebuilt from the LSE (its error e + the LSE's),
    then multiplied by the slopes: the cap's slope 1 - t^2 moves by e / cap at most
    (its derivative is <= 1 / cap), the cube's 1 + 0.03 s^2 by 0.06 |s| e, each with
    4 u of its own. The magnitudes are ``grad_bounds``': |dS| <= P (|dO| |V|^T + D).
    """
    raw, biased, final, kr = _numpy_scores(p)
    allowed = p.allowed()
    vis = np.ones(final.shape, dtype=bool) if allowed is None else \
        np.broadcast_to(allowed, final.shape)
    A_raw = float(np.max(raw))
    A_b = float(np.max(np.abs(biased)))
    A = max(float(np.max(np.abs(final))), A_b, 1.0)
    m = RelativeBias.slope if isinstance(p.mod, RelativeBias) else \
        1 + 0.03 * A_b**2 if isinstance(p.mod, Cube) else 1.0
    cap = 4 * U64 * p.softcap if p.softcap is not None else 0.0
    E, S, L, Ev = p.q.shape[-1], p.S, p.L, p.v.shape[-1]
    nb = max(1, -(-S // p.block_s))
    e = m * ((E + 2) * U64 * A_raw + cap + U64 * A_b) + 4 * U64 * A \
        + (nb + 2) * U64 * (2 * A + RESCALE_THRESHOLD)
    sums = (2 * S + 1 + 4 * nb) * U64
    vmax = float(np.max(np.abs(p.v)))
    out_tol = 2 * vmax * (2 * e + sums + 2 * U64)
    lse_tol = 2 * (e + sums + (nb + 2) * U64 * (A + math.log(S) + RESCALE_THRESHOLD))

    s = np.where(vis, final, -np.inf)
    top = np.max(s, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    w = np.exp(s - top)
    total = w.sum(axis=-1, keepdims=True)
    P = np.divide(w, total, out=np.zeros_like(w), where=total > 0)
    H, K = p.q.shape[-3], p.k.shape[-3]
    vr = np.repeat(p.v, H // K, axis=-3)
    dout_abs = np.abs(p.dout)
    dp_mag = dout_abs @ np.swapaxes(np.abs(vr), -1, -2)
    d_mag = np.sum(dout_abs * (P @ np.abs(vr)), axis=-1, keepdims=True)
    ds_mag = P * (dp_mag + d_mag) * m
    rho = 2 * (2 * e + lse_tol / 2) + (S + Ev + L + E + 24) * U64
    rho += (e / p.softcap if p.softcap is not None else 0.0)
    rho += 0.06 * A_b * e if isinstance(p.mod, Cube) else 0.0
    sa = abs(p.scale)
    g = H // K

    def heads(x):
        return x.reshape((*x.shape[:-3], K, g, *x.shape[-2:])).sum(axis=-3)

    mags = [sa * (ds_mag @ np.abs(kr)), heads(sa * (np.swapaxes(ds_mag, -1, -2) @ np.abs(p.q))),
            heads(np.swapaxes(P, -1, -2) @ dout_abs), ds_mag]
    grads = [2 * rho * x + 64 * ETA64 for x in mags]
    return out_tol, lse_tol, grads


# --- running both paths -----------------------------------------------------------------


def _mods(p: ModProblem, backend, with_grids: bool) -> ScoreMods:
    grids = None
    if with_grids and p.mod is not None:
        grids = index_grids(tuple(p.batch), p.q.shape[-3], p.L, p.S, xp=backend.xp,
                            device=None)
    return ScoreMods(softcap=p.softcap, score_mod=p.mod, grids=grids)


def _both(backend, p: ModProblem):
    xp = backend.xp

    def conv(x):
        return None if x is None else backend.asarray(x)

    q, k, v, dout, bias = (conv(x) for x in (p.q, p.k, p.v, p.dout, p.bias))
    common = dict(scale=p.scale, bias=bias, keep=None, dropout_p=0.0, masked_rows="zero",
                  xp=xp)
    direct = direct_attention(q, k, v, allowed=conv(p.allowed()),
                              mods=_mods(p, backend, True), **common)
    blocked = blocked_attention(q, k, v, allowed=conv(p.mask), causal=p.causal,
                                alignment=p.alignment, block_l=p.block_l, block_s=p.block_s,
                                mods=_mods(p, backend, False), **common)
    d_grads = direct_backward(dout, q, k, v, allowed=conv(p.allowed()), out=None, lse=None,
                              mods=_mods(p, backend, True), **common)
    b_grads = blocked_attention_backward(
        dout, q, k, v, allowed=conv(p.mask), causal=p.causal, alignment=p.alignment,
        block_l=p.block_l, block_s=p.block_s, out=None, lse=None,
        mods=_mods(p, backend, False), **common)
    return direct, blocked, d_grads, b_grads


def _close(got, want, tol, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, what
    finite = np.isfinite(want)
    assert np.array_equal(np.isfinite(got), finite), f"{what}: non-finite positions differ"
    err = np.abs(np.where(finite, got, 0.0) - np.where(finite, want, 0.0))
    tol = np.broadcast_to(tol, err.shape)
    worst = np.unravel_index(np.argmax(err - tol), err.shape) if err.size else None
    assert np.all(err <= tol), f"{what}: {err[worst]:.3e} > bound {tol[worst]:.3e} at {worst}"


@given(p=mod_problems())
def test_blocked_softcap_and_score_mod_match_direct(backend, p):
    direct, blocked, dg, bg = _both(backend, p)
    out_tol, lse_tol, grad_tols = _tolerances(p)
    _close(backend.to_numpy(blocked.out), backend.to_numpy(direct.out), out_tol, "out")
    _close(backend.to_numpy(blocked.lse), backend.to_numpy(direct.lse), lse_tol, "lse")
    for name, g, d, tol in zip(("dq", "dk", "dv", "dbias"), (bg.dq, bg.dk, bg.dv, bg.dbias),
                               (dg.dq, dg.dk, dg.dv, dg.dbias), grad_tols, strict=True):
        if d is None:
            assert g is None
            continue
        tol = _reduce_to(tol, tuple(d.shape))
        _close(backend.to_numpy(g), backend.to_numpy(d), tol, name)


def _reduce_to(x, shape):
    # A magnitude bound of a broadcast input's gradient is the sum over the broadcast axes.
    lead = x.ndim - len(shape)
    if lead > 0:
        x = x.sum(axis=tuple(range(lead)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(axis=axes, keepdims=True) if axes else x


def test_front_door_blocked_takes_softcap_and_score_mod(backend):
    # implementation="blocked" through refattn.attention / attention_backward, with the
    # automatic blocks (two key blocks), GQA, a window and BLHD, against "direct".
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 40, 4, 8))
    k = rng.standard_normal((2, 600, 2, 8))
    v = rng.standard_normal((2, 600, 2, 3))
    dout = rng.standard_normal((2, 40, 4, 3))
    xs = [backend.asarray(x) for x in (dout, q, k, v)]
    kw = dict(softcap=2.0, score_mod=RelativeBias(), window=(300, 5), layout="BLHD",
              alignment="bottom_right")
    want = refattn.attention(*xs[1:], implementation="direct", return_lse=True, **kw)
    got = refattn.attention(*xs[1:], implementation="blocked", return_lse=True, **kw)
    # Logits are within softcap * 0.75 + 0.1 * 4 * 600 + 0.2: about 242 in magnitude.
    tol = 64 * (8 + 2 * 600) * U64 * 250 * float(np.abs(v).max())
    _close(backend.to_numpy(got.out), backend.to_numpy(want.out), tol, "out")
    _close(backend.to_numpy(got.lse), backend.to_numpy(want.lse), 64 * 600 * U64 * 250, "lse")
    gw = refattn.attention_backward(*xs, implementation="direct", **kw)
    gg = refattn.attention_backward(*xs, implementation="blocked", **kw)
    for a, b in zip(gg[:3], gw[:3], strict=True):
        _close(backend.to_numpy(a), backend.to_numpy(b), tol * 40, "gradient")


def test_a_mod_that_broadcasts_wider_is_refused_on_the_blocked_path():
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((1, 6, 4)) for _ in range(3))
    # The result gains a leading axis: a block of scores cannot take it.
    with pytest.raises(ValueError, match=r"score_mod must return an array of its score "
                                         r"argument's shape; on a block of scores of shape"):
        refattn.attention(q, k, v, score_mod=lambda s, b, h, qi, kj: s + q[..., :1, :1, None],
                          implementation="blocked")


def test_a_non_affine_mod_without_derivative_is_refused_by_the_blocked_backward():
    rng = np.random.default_rng(8)
    q, k, v = (rng.standard_normal((2, 5, 3)) for _ in range(3))

    def square(s, b, h, qi, kj):
        return s * s

    refattn.attention(q, k, v, score_mod=square, implementation="blocked")
    with pytest.raises(ValueError, match="needs a mod affine in the score"):
        refattn.attention_backward(np.ones((2, 5, 3)), q, k, v, score_mod=square,
                                   implementation="blocked")


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 7 query rows x 9 keys through the front door, so that the ready-made
    mods meet many blocks (block grids of one batch index and one run of heads)."""
    import refattn._agnostic._blocked._plan as blocked_module

    monkeypatch.setattr(blocked_module, "choose_blocks",
                        lambda L, S, group, backward=False: (7, 9))


def _blocked_equals_direct(backend, xs, tol, **kw):
    """Front-door forward (out, LSE) and backward, blocked against direct, within tol
    (40 tol for the gradients, which scale with |dO| max|V| and S)."""
    want = refattn.attention(*xs[1:], implementation="direct", return_lse=True, **kw)
    got = refattn.attention(*xs[1:], implementation="blocked", return_lse=True, **kw)
    for name in ("out", "lse"):
        _close(backend.to_numpy(getattr(got, name)), backend.to_numpy(getattr(want, name)),
               tol, name)
    gw = refattn.attention_backward(*xs, implementation="direct", **kw)
    gg = refattn.attention_backward(*xs, implementation="blocked", **kw)
    for a, b in zip(gg[:3], gw[:3], strict=True):
        _close(backend.to_numpy(a), backend.to_numpy(b), tol * 40, "gradient")


def _front_door_inputs(backend, seed, B, H, L, S, E):
    """rng, the backend's (dout, q, k, v) and max|v| of a standard normal problem."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((B, H, n, E)) for n in (L, S, S))
    dout = rng.standard_normal((B, H, L, E))
    return rng, [backend.asarray(x) for x in (dout, q, k, v)], float(np.abs(v).max())


def test_ready_made_score_mods_on_the_blocked_path(backend, small_blocks):
    from refattn import mods

    B, H, L, S, E = 3, 4, 20, 30, 5
    rng, xs, vmax = _front_door_inputs(backend, 11, B, H, L, S, E)
    slopes = rng.uniform(0.1, 1.0, (B, H))
    table = rng.standard_normal((H, 2 * 6 + 1))
    for mod in (mods.alibi(backend.asarray(slopes)), mods.alibi(backend.asarray(slopes[0])),
                mods.softcap(1.5), mods.relative_position_bias(backend.asarray(table), 6)):
        # Logits below |q| |k| / sqrt(E) + 1.0 * (L + S) + 3 max|table|: about 60 here.
        _blocked_equals_direct(backend, xs, 64 * (E + 2 * S) * U64 * 60 * vmax, score_mod=mod)


@pytest.mark.parametrize("implementation", ["direct", "blocked"])
def test_ready_made_mods_check_their_tables_on_both_paths(small_blocks, implementation):
    # The blocked path calls the mod once on whole grids before the blocks, so a table
    # that does not fit the batch or the heads is refused there with the direct path's
    # message, not on some block.
    from refattn import mods

    rng = np.random.default_rng(12)
    q, k, v = (rng.standard_normal((3, 4, 20, 5)) for _ in range(3))
    with pytest.raises(ValueError, match=r"slopes has 5 batch rows but attention has 3 "
                                         r"batch elements"):
        refattn.attention(q, k, v, score_mod=mods.alibi(rng.uniform(size=(5, 4))),
                          implementation=implementation)
    with pytest.raises(ValueError, match=r"table has 2 heads \(shape \(2, 5\)\) but attention "
                                         r"has H=4 query heads"):
        refattn.attention(q, k, v, implementation=implementation,
                          score_mod=mods.relative_position_bias(rng.standard_normal((2, 5))))


def test_ready_made_mask_mods_on_the_blocked_path(backend, small_blocks):
    # mask_mod is evaluated per block on the blocked path (never on the whole grid there).
    from refattn import mods

    B, H, L, S, E = 2, 3, 20, 26, 4
    rng, xs, vmax = _front_door_inputs(backend, 13, B, H, L, S, E)
    docs_q = np.sort(rng.integers(0, 3, (B, L)), axis=1)
    docs_k = np.sort(rng.integers(0, 3, (B, S)), axis=1)
    for mod in (mods.causal(), mods.sliding_window(3, 1, alignment="bottom_right", L=L, S=S),
                mods.prefix_lm(backend.asarray(np.array([4, 9]))),
                mods.document_mask(backend.asarray(docs_q), backend.asarray(docs_k))):
        _blocked_equals_direct(backend, xs, 64 * (E + 2 * S) * U64 * 10 * vmax, mask_mod=mod,
                               masked_rows="uniform")


def test_mask_mod_errors_on_the_blocked_path(small_blocks):
    from refattn import mods

    rng = np.random.default_rng(14)
    q, k, v = (rng.standard_normal((2, 3, 20, 4)) for _ in range(3))
    with pytest.raises(TypeError, match="mask_mod must return a boolean array"):
        refattn.attention(q, k, v, mask_mod=lambda b, h, qi, kj: qi - kj,
                          implementation="blocked")
    table = rng.random((20, 20)) < 0.5
    with pytest.raises(ValueError, match=r"mask_mod's result must broadcast to its block of "
                                         r"scores; on a block of shape \(1, 1, 7, 9\)"):
        refattn.attention(q, k, v, mask_mod=lambda b, h, qi, kj: table,
                          implementation="blocked")
    with pytest.raises(ValueError, match=r"doc_ids_q has 5 batch rows but attention has 2"):
        refattn.attention(q, k, v, implementation="blocked",
                          mask_mod=mods.document_mask(rng.integers(0, 2, (5, 20))))
