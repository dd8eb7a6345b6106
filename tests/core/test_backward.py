"""The analytic backward pass: ``attention_backward`` and the torch-convention helper.

Three independent references:

* torch autograd through torch's math backend, in float64;
* central finite differences of ``refattn.attention`` itself (no torch involved);
* identities of the softmax (shift invariance, the LSE's role, dropout p = 1).

Every tolerance is a first-order rounding-error bound built from the data (unit roundoff,
lengths, magnitudes), derived in ``_grad_bounds`` and ``_fd_tolerance``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refattn
from tests.helpers.cases import divisors
from tests.helpers.gradients import Bounds, grad_bounds, np_sum_to

U64 = float(np.finfo(np.float64).eps) / 2  # unit roundoff of float64
U32 = float(np.finfo(np.float32).eps) / 2
EPS64 = float(np.finfo(np.float64).eps)
# Gradual underflow: below the normal range an operation errs by up to half the smallest
# subnormal in absolute terms, which no relative bound covers (tiny scales reach there).
ETA64 = float(np.finfo(np.float64).smallest_subnormal)


# --- cases --------------------------------------------------------------------------------


@dataclass
class Case:
    batch: tuple[int, ...]
    H: int
    K: int
    Kv: int
    L: int
    S: int
    E: int
    Ev: int
    scale: float | None
    causal: str | None  # None, "top_left" or "bottom_right"
    mask_shape: tuple[int, ...] | None
    empty_row: bool  # force query row 0 to be fully masked by the mask
    bias_shape: tuple[int, ...] | None
    bias_neg_inf: bool  # sprinkle -inf into the bias
    dropout_p: float
    keep_shape: tuple[int, ...] | None
    layout: str
    masked_rows: str
    seed: int

    @property
    def scale_value(self) -> float:
        return 1.0 / np.sqrt(self.E) if self.scale is None else self.scale

    @property
    def scores_shape(self) -> tuple[int, ...]:
        return (*self.batch, self.H, self.L, self.S)


@dataclass
class Data:
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    dout: np.ndarray
    mask: np.ndarray | None
    bias: np.ndarray | None
    keep: np.ndarray | None
    allowed: np.ndarray | None  # mask AND causal, built here independently of refattn


@st.composite
def cases(
    draw: st.DrawFn, *, max_h: int = 4, max_len: int = 4, max_dim: int = 4,
    policies: tuple[str, ...] = ("zero",), layouts: tuple[str, ...] = ("BHLD", "BLHD"),
) -> Case:
    batch = draw(st.sampled_from([(), (1,), (2,)]))
    H = draw(st.sampled_from([h for h in (1, 2, 4) if h <= max_h]))
    K = draw(st.sampled_from(divisors(H)))
    Kv = draw(st.sampled_from(divisors(H)))
    L = draw(st.integers(1, max_len))
    S = draw(st.integers(1, max_len + 1))
    E = draw(st.integers(1, max_dim))
    Ev = draw(st.integers(1, max_dim))
    scale = draw(st.one_of(
        st.none(), st.sampled_from([0.0, -0.75]),
        st.floats(-1.5, 1.5, allow_nan=False, allow_infinity=False),
    ))
    causal = draw(st.sampled_from([None, "top_left", "bottom_right"]))
    full = (*batch, H, L, S)
    mask_shape = draw(st.sampled_from([None, (L, S), (H, L, S), full]))
    empty_row = mask_shape is not None and draw(st.booleans())
    bias_shape = draw(st.sampled_from(
        [None, (L, S), (H, 1, S), (*batch, 1, 1, S), (S,), full]
    ))
    bias_neg_inf = bias_shape is not None and draw(st.booleans())
    dropout_p = draw(st.sampled_from([0.0, 0.0, 0.25, 0.5]))
    keep_shape = draw(st.sampled_from([(L, S), full])) if dropout_p else None
    return Case(
        batch=batch, H=H, K=K, Kv=Kv, L=L, S=S, E=E, Ev=Ev, scale=scale, causal=causal,
        mask_shape=mask_shape, empty_row=empty_row, bias_shape=bias_shape,
        bias_neg_inf=bias_neg_inf, dropout_p=dropout_p, keep_shape=keep_shape,
        layout=draw(st.sampled_from(layouts)), masked_rows=draw(st.sampled_from(policies)),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def make_data(case: Case, *, amplitude: float = 2.0) -> Data:
    rng = np.random.default_rng(case.seed)

    def uniform(*shape: int) -> np.ndarray:
        return rng.uniform(-amplitude, amplitude, shape)

    q = uniform(*case.batch, case.H, case.L, case.E)
    k = uniform(*case.batch, case.K, case.S, case.E)
    v = uniform(*case.batch, case.Kv, case.S, case.Ev)
    dout = uniform(*case.batch, case.H, case.L, case.Ev)
    mask = None
    if case.mask_shape is not None:
        mask = rng.random(case.mask_shape) < 0.7
        if case.empty_row:
            mask[..., 0, :] = False
    bias = None
    if case.bias_shape is not None:
        bias = uniform(*case.bias_shape)
        if case.bias_neg_inf:
            bias[rng.random(case.bias_shape) < 0.2] = -np.inf
    keep = None if case.keep_shape is None else rng.random(case.keep_shape) >= case.dropout_p
    allowed = mask
    if case.causal is not None:
        shift = 0 if case.causal == "top_left" else case.S - case.L
        tri = np.tril(np.ones((case.L, case.S), dtype=bool), k=shift)
        allowed = tri if allowed is None else allowed & tri
    return Data(q, k, v, dout, mask, bias, keep, allowed)


def _swap(x: np.ndarray) -> np.ndarray:
    return np.swapaxes(x, -3, -2)


def _refattn_kwargs(case: Case, data: Data, backend: Any) -> dict[str, Any]:
    def conv(x: np.ndarray | None) -> Any:
        return None if x is None else backend.asarray(x)

    return dict(
        mask=conv(data.mask), bias=conv(data.bias), causal=case.causal is not None,
        alignment=case.causal or "top_left", scale=case.scale, dropout_p=case.dropout_p,
        dropout_mask=conv(data.keep), masked_rows=case.masked_rows, layout=case.layout,
    )


def refattn_grads(case: Case, data: Data, backend: Any, **extra: Any) -> list[np.ndarray | None]:
    """attention_backward on ``backend``, returned as NumPy arrays in BHLD."""
    t = _swap if case.layout == "BLHD" else (lambda x: x)
    q, k, v, dout = (backend.asarray(t(x)) for x in (data.q, data.k, data.v, data.dout))
    g = refattn.attention_backward(dout, q, k, v, **_refattn_kwargs(case, data, backend), **extra)
    assert isinstance(g, refattn.AttentionGrads)
    out = [t(backend.to_numpy(x)) for x in (g.dq, g.dk, g.dv)]
    out.append(None if g.dbias is None else backend.to_numpy(g.dbias))
    return out


# --- torch autograd reference -------------------------------------------------------------


def torch_grads(case: Case, data: Data) -> list[np.ndarray | None]:
    """torch.autograd through torch's math backend, float64."""
    torch = pytest.importorskip("torch")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    def leaf(x: np.ndarray) -> Any:
        return torch.tensor(x, dtype=torch.float64, requires_grad=True)

    q, k, v = leaf(data.q), leaf(data.k), leaf(data.v)
    bias = None if data.bias is None else leaf(data.bias)
    if case.dropout_p == 0.0 and bias is None:
        # The public function, with torch's own is_causal where it can express the case.
        is_causal = case.causal == "top_left" and data.mask is None
        attn_mask = None if data.allowed is None or is_causal else torch.from_numpy(data.allowed)
        with sdpa_kernel(SDPBackend.MATH):
            out = sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=case.scale,
                       enable_gqa=True)
    else:
        # The math kernel itself, which takes an explicit dropout keep-mask. It wants an
        # additive float mask (the public function converts bool masks to 0 / -inf).
        attn_mask = bias
        if data.allowed is not None:
            additive = torch.from_numpy(np.where(data.allowed, 0.0, -np.inf))
            attn_mask = additive if bias is None else bias + additive
        keep = None if data.keep is None else torch.from_numpy(data.keep)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Dropout mask should only be used for testing"
            out, _ = torch.ops.aten._scaled_dot_product_attention_math(
                q, k, v, attn_mask, case.dropout_p, False, keep, scale=case.scale,
                enable_gqa=True,
            )
    out.backward(torch.from_numpy(data.dout))
    grads = [x.grad.numpy() for x in (q, k, v)]
    grads.append(None if bias is None else bias.grad.numpy())
    return grads


# --- error bounds -------------------------------------------------------------------------


def _grad_bounds(case: Case, data: Data, u: float = U64) -> list[np.ndarray | None]:
    return grad_bounds(
        data.q, data.k, data.v, data.dout, scale=case.scale_value, bias=data.bias,
        allowed=data.allowed, keep=data.keep, dropout_p=case.dropout_p,
        masked_rows=case.masked_rows, u=u,
    ).bounds


def _assert_within(got: np.ndarray, want: np.ndarray, bound: np.ndarray, name: str) -> None:
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    err = np.abs(got - want)
    bad = ~(err <= bound)
    if np.any(bad):
        worst = np.unravel_index(np.argmax(np.where(bad, err - bound, -np.inf)), err.shape)
        raise AssertionError(
            f"{name}: {int(bad.sum())} entries outside the bound; worst at {worst}: "
            f"got {got[worst]!r}, want {want[worst]!r}, bound {bound[worst]!r}"
        )


# --- against torch autograd ---------------------------------------------------------------


@given(case=cases())
def test_gradients_match_torch_autograd_float64(backend, case):
    data = make_data(case)
    got = refattn_grads(case, data, backend)
    want = torch_grads(case, data)
    # Two float64 implementations of the same formulas: each within _grad_bounds of the
    # exact gradient, so within twice it of each other.
    for name, g, w, b in zip(("dq", "dk", "dv", "dbias"), got, want, _grad_bounds(case, data),
                             strict=True):
        if w is None:
            assert g is None, f"{name} should be None without a bias"
        else:
            _assert_within(g, w, 2 * b, name)


def _policy_case(draw_case: Case) -> Case:
    # A fully masked row is what the policies are about: make sure there is one.
    draw_case.mask_shape = draw_case.mask_shape or (draw_case.L, draw_case.S)
    draw_case.empty_row = True
    draw_case.bias_neg_inf = False  # -inf in the bias would fall outside the finite fill
    return draw_case


@given(case=cases(policies=("nan",), layouts=("BHLD",)).map(_policy_case))
def test_nan_policy_matches_autograd_of_the_plain_softmax(backend, case):
    torch = pytest.importorskip("torch")
    data = make_data(case)
    got = refattn_grads(case, data, backend)
    leaves = [torch.tensor(x, requires_grad=True) for x in (data.q, data.k, data.v)]
    q, k, v = leaves
    bias = None if data.bias is None else torch.tensor(data.bias, requires_grad=True)
    kr = k.repeat_interleave(case.H // case.K, dim=-3)
    vr = v.repeat_interleave(case.H // case.Kv, dim=-3)
    s = case.scale_value * (q @ kr.transpose(-1, -2))
    if bias is not None:
        s = s + bias
    s = s + torch.from_numpy(np.where(data.allowed, 0.0, -np.inf))
    p = torch.softmax(s, dim=-1)  # NaN on fully masked rows
    if data.keep is not None:
        p = p.masked_fill(~torch.from_numpy(data.keep), 0.0) / (1.0 - case.dropout_p)
    (p @ vr).backward(torch.from_numpy(data.dout))
    want = [x.grad.numpy() for x in leaves] + [None if bias is None else bias.grad.numpy()]
    bounds = _grad_bounds(case, data)
    for name, g, w, b in zip(("dq", "dk", "dv", "dbias"), got, want, bounds, strict=True):
        if w is None:
            continue
        # NaN exactly where the plain softmax's autograd has NaN; the rest as above.
        np.testing.assert_array_equal(np.isnan(g), np.isnan(w), err_msg=name)
        finite = ~np.isnan(w)
        _assert_within(g[finite], w[finite], 2 * np.broadcast_to(b, w.shape)[finite], name)


@given(case=cases(policies=("uniform",), layouts=("BHLD",)).map(_policy_case))
def test_uniform_policy_matches_autograd_of_a_finite_fill(backend, case):
    # JAX's convention: masked scores replaced (jnp.where) by a huge finite negative. On a
    # fully masked row every score is the fill, the softmax is uniform, and the where
    # passes no gradient to the scores: dS = 0 while dV still gets dO / S.
    torch = pytest.importorskip("torch")
    data = make_data(case)
    got = refattn_grads(case, data, backend)
    leaves = [torch.tensor(x, requires_grad=True) for x in (data.q, data.k, data.v)]
    q, k, v = leaves
    bias = None if data.bias is None else torch.tensor(data.bias, requires_grad=True)
    kr = k.repeat_interleave(case.H // case.K, dim=-3)
    vr = v.repeat_interleave(case.H // case.Kv, dim=-3)
    s = case.scale_value * (q @ kr.transpose(-1, -2))
    if bias is not None:
        s = s + bias
    fill = torch.tensor(torch.finfo(torch.float64).min, dtype=torch.float64)
    p = torch.softmax(torch.where(torch.from_numpy(data.allowed), s, fill), dim=-1)
    if data.keep is not None:
        p = p.masked_fill(~torch.from_numpy(data.keep), 0.0) / (1.0 - case.dropout_p)
    (p @ vr).backward(torch.from_numpy(data.dout))
    want = [x.grad.numpy() for x in leaves] + [None if bias is None else bias.grad.numpy()]
    for name, g, w, b in zip(("dq", "dk", "dv", "dbias"), got, want, _grad_bounds(case, data),
                             strict=True):
        if w is not None:
            _assert_within(g, w, 2 * b, name)


# --- against finite differences of refattn.attention ---------------------------------------

CBRT_EPS = EPS64 ** (1 / 3)


def _fd_tolerance(case: Case, data: Data, name: str, h: float, b: Bounds) -> np.ndarray:
    """Bound on |central difference - computed gradient| for one input's entries.

    phi(x) = sum(dO * attention(x)). The central difference (phi(x+h) - phi(x-h)) / step,
    with step the exactly represented (x+h) - (x-h), is off from phi'(x) by
    * truncation h^2/6 max|phi'''|. Moving one entry of q, k or the bias tilts some rows'
      scores linearly, s(t) = s + t a with |a_j| <= alpha; for one row phi is
      E_P(t)[w], w_j = (dO . v_j) keep_j / (1 - p), and its third t-derivative is the
      joint cumulant E[w~ a~^3] - 3 Var(a) E[w~ a~], at most 64 max|w| alpha^3 (|a~| <=
      2 alpha, |w~| <= 2 max|w|). Summing over every row gives the bound 64 W alpha^3
      with W = sum over rows of max_j |w_j|; alpha = |scale| max|k| for q, |scale| max|q|
      for k, 1 for the bias. phi is linear in v: no truncation error there. (Moving x
      by h changes these magnitudes by O(h), far inside the factor 64's slack);
    * rounding: each phi carries at most eps_phi = sum |dO| (rho + (S + 2 + N) u) Om, with
      Om = |P_drop| |V| and N the number of output entries summed (rho as in
      grad_bounds), so the difference quotient carries eps_phi / h;
    * the computed gradient's own error (grad_bounds).
    """
    index = ("q", "k", "v", "bias").index(name)
    s_abs = abs(case.scale_value)
    vr = np.repeat(data.v, case.H // case.Kv, axis=-3)
    keep = 1.0 if data.keep is None else data.keep / (1.0 - case.dropout_p)
    w = np.abs(data.dout @ np.swapaxes(vr, -1, -2)) * keep
    W = float(np.sum(np.broadcast_to(w, case.scores_shape).max(axis=-1)))
    alpha = {"q": s_abs * np.max(np.abs(data.k)), "k": s_abs * np.max(np.abs(data.q)),
             "bias": 1.0, "v": 0.0}[name]
    truncation = h**2 / 6 * 64 * W * alpha**3
    out_mag = b.p_drop @ np.abs(vr)
    eps_phi = float(np.sum(np.abs(data.dout) * out_mag)) * (
        b.rho + (case.S + 2 + out_mag.size) * U64)
    return truncation + eps_phi / h + b.bounds[index]


@given(case=cases(max_len=3, max_dim=3, policies=("zero", "uniform")))
def test_gradients_match_central_differences_of_attention(backend, case):
    data = make_data(case, amplitude=1.5)
    kwargs = _refattn_kwargs(case, data, backend)
    kwargs.pop("bias")
    t = _swap if case.layout == "BLHD" else (lambda x: x)
    inputs = {"q": data.q, "k": data.k, "v": data.v}
    if data.bias is not None:
        inputs["bias"] = data.bias

    def phi(arrays: dict[str, np.ndarray]) -> float:
        bias = arrays.get("bias")
        out = refattn.attention(
            *(backend.asarray(t(arrays[n])) for n in ("q", "k", "v")),
            bias=None if bias is None else backend.asarray(bias), **kwargs,
        )
        return float(np.sum(data.dout * t(backend.to_numpy(out))))

    grads = dict(zip(("q", "k", "v", "bias"), refattn_grads(case, data, backend), strict=True))
    b = grad_bounds(data.q, data.k, data.v, data.dout, scale=case.scale_value, bias=data.bias,
                    allowed=data.allowed, keep=data.keep, dropout_p=case.dropout_p,
                    masked_rows=case.masked_rows)
    for name, x in inputs.items():
        # h ~ eps^(1/3) * (size of x) balances the h^2 truncation against eps / h rounding.
        h = CBRT_EPS * max(1.0, float(np.max(np.abs(x[np.isfinite(x)]), initial=0.0)))
        fd = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            if not np.isfinite(x[idx]):
                continue  # a -inf bias entry: the gradient there is 0, checked below
            plus, minus = dict(inputs), dict(inputs)
            plus[name], minus[name] = x.copy(), x.copy()
            plus[name][idx] += h
            minus[name][idx] -= h
            step = plus[name][idx] - minus[name][idx]
            fd[idx] = (phi(plus) - phi(minus)) / step
        tol = _fd_tolerance(case, data, name, h, b)
        _assert_within(grads[name], fd, np.broadcast_to(tol, x.shape), f"d{name}")


# --- identities ---------------------------------------------------------------------------


@given(case=cases(layouts=("BHLD",)))
def test_rows_of_a_full_bias_gradient_sum_to_zero(backend, case):
    # softmax(s + c) = softmax(s): the gradient along (1, ..., 1) of any row vanishes,
    # dropout or not, since rowsum(P * dP) is exactly the D term.
    case.bias_shape = case.scores_shape
    data = make_data(case)
    dbias = refattn_grads(case, data, backend)[3]
    bound = _grad_bounds(case, data)[3]
    # Each entry carries at most its bound; S of them are summed (plus S u per term).
    tol = np.sum(bound, axis=-1) * (1 + case.S * U64) + case.S * U64 * np.sum(
        np.abs(dbias), axis=-1)
    assert np.all(np.abs(np.sum(dbias, axis=-1)) <= tol)


def test_dropout_p_one_gives_zero_gradients(backend):
    # The output is identically zero whatever q, k, v and bias: every gradient is zero,
    # even on rows the "nan" policy would poison.
    rng = np.random.default_rng(3)
    q, k, v, dout = (backend.asarray(rng.standard_normal(s))
                     for s in ((2, 3, 5), (2, 4, 5), (2, 4, 4), (2, 3, 4)))
    mask = np.ones((3, 4), dtype=bool)
    mask[0] = False
    for policy in ("zero", "nan", "uniform"):
        g = refattn.attention_backward(
            dout, q, k, v, bias=backend.asarray(rng.standard_normal((3, 4))),
            mask=backend.asarray(mask), dropout_p=1.0, masked_rows=policy,
            dropout_mask=backend.asarray(np.zeros((2, 3, 4), dtype=bool)),
        )
        for x in g:
            np.testing.assert_array_equal(backend.to_numpy(x), 0.0)


def test_fully_masked_rows_get_zero_gradients_under_the_zero_policy(backend):
    rng = np.random.default_rng(4)
    q, k, v, dout = (rng.standard_normal((2, 5, 3)) for _ in range(4))
    mask = rng.random((2, 5, 5)) < 0.6
    mask[:, 1] = False  # row 1 of each head sees no key
    bias = rng.standard_normal((5, 5))
    g = refattn.attention_backward(
        *(backend.asarray(x) for x in (dout, q, k, v)), mask=backend.asarray(mask),
        bias=backend.asarray(bias),
    )
    np.testing.assert_array_equal(backend.to_numpy(g.dq)[:, 1], 0.0)
    np.testing.assert_array_equal(backend.to_numpy(g.dbias)[1], 0.0)
    # Changing dO on the masked row changes nothing (the row's output is a constant 0).
    dout2 = dout.copy()
    dout2[:, 1] = rng.standard_normal(dout2[:, 1].shape)
    g2 = refattn.attention_backward(
        *(backend.asarray(x) for x in (dout2, q, k, v)), mask=backend.asarray(mask),
        bias=backend.asarray(bias),
    )
    for a, b in zip(g, g2, strict=True):
        np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b))


# --- shapes, broadcasting, layouts, dtypes -------------------------------------------------


@pytest.mark.parametrize(
    "bias_shape",
    [(5, 7), (4, 1, 7), (2, 1, 1, 7), (7,), (1, 7), (1, 1, 1, 1), (2, 4, 5, 7), (4, 5, 1)],
)
def test_dbias_has_the_bias_shape_and_sums_the_broadcast_axes(backend, bias_shape):
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 4, 5, 3))
    k = rng.standard_normal((2, 2, 7, 3))
    v = rng.standard_normal((2, 1, 7, 2))
    dout = rng.standard_normal((2, 4, 5, 2))
    bias = rng.standard_normal(bias_shape)
    args = [backend.asarray(x) for x in (dout, q, k, v)]
    small = refattn.attention_backward(*args, bias=backend.asarray(bias), causal=True)
    full = refattn.attention_backward(
        *args, bias=backend.asarray(np.broadcast_to(bias, (2, 4, 5, 7)).copy()), causal=True
    )
    got = backend.to_numpy(small.dbias)
    assert got.shape == bias_shape
    # The chain rule through broadcasting: d/d(small bias) = sum over the copies. The two
    # results differ only by the order of the final sums: n terms, n u relative each.
    want = np_sum_to(backend.to_numpy(full.dbias), bias_shape)
    n = 2 * 4 * 5 * 7 // int(np.prod(bias_shape))
    mag = np_sum_to(np.abs(backend.to_numpy(full.dbias)), bias_shape)
    _assert_within(got, want, 2 * n * U64 * mag, "dbias")


@pytest.mark.parametrize(
    "shapes",
    [
        # q, k, v with leading dims that broadcast against each other
        ((4, 3, 2), (2, 2, 5, 2), (2, 1, 5, 3)),
        ((3, 1, 4, 3, 2), (1, 2, 4, 5, 2), (2, 2, 5, 3)),
        ((3, 2), (2, 1, 5, 2), (5, 3)),  # a 2-D query meets 4-D keys
        ((3, 2), (5, 2), (5, 3)),  # no head axis at all
        ((1, 2, 3, 2), (2, 2, 5, 2), (2, 2, 5, 3)),
    ],
)
def test_gradients_of_broadcast_inputs_have_the_inputs_shapes(backend, shapes):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal(s) for s in shapes)
    bias = rng.standard_normal((3, 5))
    out_shape = refattn.attention(q, k, v).shape
    dout = rng.standard_normal(out_shape)
    g = refattn.attention_backward(*(backend.asarray(x) for x in (dout, q, k, v)),
                                   bias=backend.asarray(bias))
    # torch autograd of the formula with torch's own broadcasting (matmul broadcasts the
    # batch dims) and repeat_interleave for grouped heads.
    leaves = [torch.tensor(x, requires_grad=True) for x in (q, k, v, bias)]
    tq, tk, tv, tb = leaves
    H = q.shape[-3] if q.ndim >= 3 else 1

    def heads(x: Any) -> Any:
        return x if x.ndim < 3 else x.repeat_interleave(H // x.shape[-3], dim=-3)

    scale = 1.0 / np.sqrt(q.shape[-1])
    p = torch.softmax(scale * (tq @ heads(tk).transpose(-1, -2)) + tb, dim=-1)
    (p @ heads(tv)).backward(torch.from_numpy(dout))
    three = [x if x.ndim >= 3 else x[None] for x in (q, k, v, dout)]
    bounds = grad_bounds(*three, scale=scale, bias=bias).bounds
    for name, got, leaf, bound in zip(("dq", "dk", "dv", "dbias"), g, leaves, bounds,
                                      strict=True):
        got = backend.to_numpy(got)
        assert got.shape == tuple(leaf.shape), name
        # Two float64 implementations, each within grad_bounds (which sums the broadcast
        # copies like the chain rule does).
        _assert_within(got, leaf.grad.numpy(), 2 * bound.reshape(got.shape), name)


def test_blhd_gradients_are_the_transposed_bhld_gradients(backend):
    rng = np.random.default_rng(7)
    q = rng.standard_normal((2, 4, 3, 5))
    k, v = rng.standard_normal((2, 2, 6, 5)), rng.standard_normal((2, 2, 6, 3))
    dout = rng.standard_normal((2, 4, 3, 3))
    bias = rng.standard_normal((4, 3, 6))
    a = refattn.attention_backward(*(backend.asarray(x) for x in (dout, q, k, v)),
                                   bias=backend.asarray(bias), causal=True)
    b = refattn.attention_backward(*(backend.asarray(_swap(x)) for x in (dout, q, k, v)),
                                   bias=backend.asarray(bias), causal=True, layout="BLHD")
    for x, y in zip(a[:3], b[:3], strict=True):
        np.testing.assert_array_equal(_swap(backend.to_numpy(x)), backend.to_numpy(y))
    np.testing.assert_array_equal(backend.to_numpy(a.dbias), backend.to_numpy(b.dbias))


def test_low_precision_inputs_get_float64_gradients_rounded_once(backend):
    rng = np.random.default_rng(8)
    arrays = [rng.standard_normal(s).astype(np.float32)
              for s in ((2, 3, 3), (2, 3, 4), (2, 5, 4), (2, 5, 3))]  # dout, q, k, v
    bias = rng.standard_normal((3, 5)).astype(np.float32)
    g32 = refattn.attention_backward(*(backend.asarray(x) for x in arrays),
                                     bias=backend.asarray(bias))
    g64 = refattn.attention_backward(*(backend.asarray(x.astype(np.float64)) for x in arrays),
                                     bias=backend.asarray(bias.astype(np.float64)))
    for x, y in zip(g32, g64, strict=True):
        got = backend.to_numpy(x)
        assert got.dtype == np.float32
        # float32 -> float64 is exact, so the computation is the float64 one, rounded once.
        np.testing.assert_array_equal(got, backend.to_numpy(y).astype(np.float32))


def test_float32_bias_gets_a_float32_gradient(backend):
    rng = np.random.default_rng(9)
    q, k, v, dout = (backend.asarray(rng.standard_normal((2, 3, 4))) for _ in range(4))
    bias = rng.standard_normal((3, 3)).astype(np.float32)
    g = refattn.attention_backward(dout, q, k, v, bias=backend.asarray(bias))
    assert backend.to_numpy(g.dbias).dtype == np.float32
    assert backend.to_numpy(g.dq).dtype == np.float64


def test_compute_dtype_float32_stays_within_the_float32_bound(backend):
    case = Case(
        batch=(2,), H=2, K=1, Kv=2, L=3, S=5, E=4, Ev=3, scale=None, causal="bottom_right",
        mask_shape=None, empty_row=False, bias_shape=(3, 5), bias_neg_inf=False,
        dropout_p=0.0, keep_shape=None, layout="BHLD", masked_rows="zero", seed=10,
    )
    data = make_data(case)
    got = refattn_grads(case, data, backend, compute_dtype="float32")
    exact = refattn_grads(case, data, backend)
    # Each is within the one-implementation bound at its unit roundoff (the float32 one's
    # inputs are float64 values rounded to float32 first: a relative u32 more on q, k, v,
    # bias, which the slack in the score bound's E + 4 and in the final 4 u covers).
    bounds32, bounds64 = _grad_bounds(case, data, u=U32), _grad_bounds(case, data)
    for name, g, w, b32, b64 in zip(("dq", "dk", "dv", "dbias"), got, exact, bounds32,
                                    bounds64, strict=True):
        assert g.dtype == np.float64  # the inputs' dtype
        _assert_within(g, w, b32 + b64, name)
    # ... and really was computed in float32 (it differs from the float64 result).
    assert any(np.any(g != w) for g, w in zip(got, exact, strict=True))


def test_empty_query_or_key_axes(backend):
    rng = np.random.default_rng(11)
    for L, S in ((0, 4), (3, 0), (0, 0)):
        q, k, v = (rng.standard_normal(s) for s in ((2, L, 3), (2, S, 3), (2, S, 5)))
        dout = rng.standard_normal((2, L, 5))
        g = refattn.attention_backward(*(backend.asarray(x) for x in (dout, q, k, v)),
                                       bias=backend.asarray(np.zeros((L, S))))
        for x, ref in zip(g, (q, k, v, np.zeros((L, S))), strict=True):
            got = backend.to_numpy(x)
            assert got.shape == ref.shape
            # No (query, key) pair exists: every output is a constant (0) and nothing
            # flows back.
            np.testing.assert_array_equal(got, 0.0)


# --- options: rng, implementation, precision ----------------------------------------------


def test_rng_redraws_the_forward_keep_mask(backend):
    rng = np.random.default_rng(12)
    q, k, v, dout = (backend.asarray(rng.standard_normal((2, 3, 4, 5))) for _ in range(4))
    res = refattn.attention(q, k, v, dropout_p=0.3, rng=123, return_dropout_mask=True)
    a = refattn.attention_backward(dout, q, k, v, dropout_p=0.3, rng=123)
    b = refattn.attention_backward(dout, q, k, v, dropout_p=0.3, dropout_mask=res.dropout_mask)
    c = refattn.attention_backward(dout, q, k, v, dropout_p=0.3,
                                   rng=np.random.default_rng(123))
    for x, y, z in zip(a[:3], b[:3], c[:3], strict=True):
        np.testing.assert_array_equal(backend.to_numpy(x), backend.to_numpy(y))
        np.testing.assert_array_equal(backend.to_numpy(x), backend.to_numpy(z))


def test_implementation_direct_equals_the_default(backend):
    rng = np.random.default_rng(13)
    q, k, v, dout = (backend.asarray(rng.standard_normal((2, 3, 4))) for _ in range(4))
    a = refattn.attention_backward(dout, q, k, v, implementation="direct")
    b = refattn.attention_backward(dout, q, k, v)
    for x, y in zip(a[:3], b[:3], strict=True):
        np.testing.assert_array_equal(backend.to_numpy(x), backend.to_numpy(y))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"implementation": "cuda"}, ValueError,
         "implementation='cuda' runs on CuPy arrays; got numpy arrays"),
        ({"precision": "exact"}, ValueError, "precision must be one of"),
        ({"masked_rows": "ignore"}, ValueError, "masked_rows must be one of"),
        ({"layout": "BSHD"}, ValueError, "layout must be one of"),
        ({"dropout_p": 0.5}, ValueError, "needs an explicit dropout_mask"),
        ({"rng": 1}, ValueError, "dropout_p is 0"),
        ({"causal": 1}, TypeError, "causal must be True or False"),
        ({"alignment": "center"}, ValueError, "alignment must be one of"),
        ({"scale": float("nan")}, ValueError, "scale must be finite"),
    ],
)
def test_option_errors(kwargs, error, match):
    rng = np.random.default_rng(14)
    q, k, v, dout = (rng.standard_normal((2, 3, 4)) for _ in range(4))
    with pytest.raises(error, match=match):
        refattn.attention_backward(dout, q, k, v, **kwargs)


# --- output= and lse= ----------------------------------------------------------------------


def _saved_problem(backend: Any) -> tuple[Any, ...]:
    rng = np.random.default_rng(15)
    q = rng.standard_normal((2, 4, 3, 5))
    k = rng.standard_normal((2, 2, 6, 5))
    v = rng.standard_normal((2, 1, 6, 4))
    dout = rng.standard_normal((2, 4, 3, 4))
    bias = rng.standard_normal((2, 4, 3, 6))
    mask = rng.random((3, 6)) < 0.7
    mask[1] = False  # one fully masked row: lse -inf there
    return tuple(backend.asarray(x) for x in (dout, q, k, v, bias, mask))


def _lse_path_tolerance(b: Bounds, lse: np.ndarray, *, extra: float = 0.0) -> list:
    """Bound on |lse path - softmax path| for each gradient.

    The softmax path is within b.bounds of the exact gradient. The LSE path's weight
    exp(S - lse) carries the score error delta, the given LSE's own error (at most
    delta + (S + 3) u + 2 u |lse|), u |S - lse| <= u (A + |lse|) from the subtraction and
    u from exp: rho + u (1 + A + 3 max|lse|) relative, against rho in grad_bounds. The
    gradients are linear in the weights (D coming from the output), so the LSE path is
    within b.bounds + u (1 + A + 3 max|lse| + extra) * magnitude.
    """
    finite = np.abs(lse[np.isfinite(lse)])
    rel = U64 * (1 + b.A + 3 * float(np.max(finite, initial=0.0)) + extra)
    return [None if bd is None else bd + rel * m for bd, m in zip(b.bounds, b.mags,
                                                                   strict=True)]


def test_saved_output_and_lse_give_the_recomputed_gradients(backend):
    dout, q, k, v, bias, mask = _saved_problem(backend)
    res = refattn.attention(q, k, v, bias=bias, mask=mask, return_lse=True)
    a = refattn.attention_backward(dout, q, k, v, bias=bias, mask=mask)
    b = refattn.attention_backward(dout, q, k, v, bias=bias, mask=mask, output=res.out,
                                   lse=res.lse)
    qn, kn, vn, dn = (backend.to_numpy(x) for x in (q, k, v, dout))
    bounds = grad_bounds(qn, kn, vn, dn, scale=1 / np.sqrt(5), bias=backend.to_numpy(bias),
                         allowed=backend.to_numpy(mask))
    lse_bounds = _lse_path_tolerance(bounds, backend.to_numpy(res.lse))
    for name, x, y, b1, b2 in zip(("dq", "dk", "dv", "dbias"), a, b, bounds.bounds,
                                  lse_bounds, strict=True):
        _assert_within(backend.to_numpy(y), backend.to_numpy(x), b1 + b2, name)


def test_given_lse_is_the_one_used(backend):
    # P = exp(S - lse): raising the LSE by c scales P, hence every gradient, by exp(-c)
    # (D comes from the given output and is unchanged).
    dout, q, k, v, bias, mask = _saved_problem(backend)
    res = refattn.attention(q, k, v, bias=bias, mask=mask, return_lse=True)
    a = refattn.attention_backward(dout, q, k, v, bias=bias, mask=mask, output=res.out,
                                   lse=res.lse)
    c = 0.75
    b = refattn.attention_backward(dout, q, k, v, bias=bias, mask=mask, output=res.out,
                                   lse=res.lse + c)
    qn, kn, vn, dn = (backend.to_numpy(x) for x in (q, k, v, dout))
    bounds = grad_bounds(qn, kn, vn, dn, scale=1 / np.sqrt(5), bias=backend.to_numpy(bias),
                         allowed=backend.to_numpy(mask))
    # Both run the LSE path; lse + c adds u (|lse| + c) to the argument of exp, and the
    # test's exp(-c) * x one more u.
    tol = _lse_path_tolerance(bounds, backend.to_numpy(res.lse), extra=c + 1)
    for name, x, y, t in zip(("dq", "dk", "dv", "dbias"), a, b, tol, strict=True):
        x, y = backend.to_numpy(x), backend.to_numpy(y)
        _assert_within(y, np.exp(-c) * x, 2 * t, name)


def test_given_output_is_the_one_used(backend):
    # D = rowsum(dO * O) is per row and feeds dS = P (dP - D), hence dQ (row by row), dK
    # and d bias, but not dV = P_drop^T dO. A NaN planted in one row of the output shows
    # exactly that.
    dout, q, k, v, bias, mask = _saved_problem(backend)
    out = backend.to_numpy(refattn.attention(q, k, v, bias=bias, mask=mask))
    poisoned = out.copy()
    poisoned[:, 2, 0, 0] = np.nan  # head 2, query 0: a live row
    g = refattn.attention_backward(dout, q, k, v, bias=bias, mask=mask,
                                   output=backend.asarray(poisoned))
    g0 = refattn.attention_backward(dout, q, k, v, bias=bias, mask=mask,
                                    output=backend.asarray(out))
    dq, dbias = backend.to_numpy(g.dq), backend.to_numpy(g.dbias)
    assert np.all(np.isnan(dq[:, 2, 0])) and np.all(np.isnan(dbias[:, 2, 0]))
    dq[:, 2, 0] = dbias[:, 2, 0] = 0.0
    assert not np.any(np.isnan(dq)) and not np.any(np.isnan(dbias))
    assert np.all(np.isnan(backend.to_numpy(g.dk)[:, 1]))  # key head 1 serves query head 2
    np.testing.assert_array_equal(backend.to_numpy(g.dv), backend.to_numpy(g0.dv))


def test_lse_from_attention_with_batch_only_on_v_is_accepted(backend):
    # The scores (and so attention's LSE) lack a batch dim that only v carries.
    rng = np.random.default_rng(16)
    arrays = (rng.standard_normal((3, 2, 3, 2)), rng.standard_normal((2, 3, 4)),
              rng.standard_normal((2, 5, 4)), rng.standard_normal((3, 2, 5, 2)))
    dout, q, k, v = (backend.asarray(x) for x in arrays)
    res = refattn.attention(q, k, v, return_lse=True)
    assert tuple(res.lse.shape) == (2, 3)
    a = refattn.attention_backward(dout, q, k, v, lse=res.lse, output=res.out)
    b = refattn.attention_backward(dout, q, k, v)
    bounds = grad_bounds(*arrays[1:], arrays[0], scale=0.5)
    lse_bounds = _lse_path_tolerance(bounds, backend.to_numpy(res.lse))
    for name, x, y, b1, b2 in zip(("dq", "dk", "dv"), a, b, bounds.bounds, lse_bounds,
                                  strict=False):
        _assert_within(backend.to_numpy(x), backend.to_numpy(y), b1 + b2, name)


def test_2d_inputs_take_a_1d_lse(backend):
    rng = np.random.default_rng(17)
    q, k, v, dout = (backend.asarray(rng.standard_normal(s)) for s in ((3, 4), (5, 4),
                                                                         (5, 2), (3, 2)))
    res = refattn.attention(q, k, v, return_lse=True)
    g = refattn.attention_backward(dout, q, k, v, lse=res.lse, output=res.out)
    assert tuple(g.dq.shape) == (3, 4) and tuple(g.dk.shape) == (5, 4)
    with pytest.raises(ValueError, match=r"lse of shape \(1, 3\)"):
        refattn.attention_backward(dout, q, k, v, lse=backend.asarray(np.zeros((1, 3))))


@pytest.mark.parametrize(
    ("name", "shape", "match"),
    [
        ("grad_out", (2, 4, 3, 5), r"grad_out must have the output's shape \(2, 4, 3, 4\)"),
        ("grad_out", (4, 3, 4), r"grad_out must have the output's shape"),
        ("output", (2, 4, 4, 3), r"output must have the output's shape \(2, 4, 3, 4\)"),
        ("lse", (2, 4, 6), r"lse of shape \(2, 4, 6\) does not match.*\(2, 4, 3\)"),
        ("lse", (2, 1, 3), r"lse of shape \(2, 1, 3\)"),
        ("lse", (3,), r"lse of shape \(3,\)"),
        ("lse", (5, 2, 4, 3), r"lse of shape \(5, 2, 4, 3\)"),
    ],
)
def test_saved_array_shape_errors(backend, name, shape, match):
    dout, q, k, v, bias, mask = _saved_problem(backend)
    kwargs = {"grad_out": dout, name: backend.asarray(np.zeros(shape))}
    with pytest.raises(ValueError, match=match):
        refattn.attention_backward(kwargs.pop("grad_out"), q, k, v, **kwargs)


def test_blhd_grad_out_shape_is_checked_in_the_blhd_layout():
    rng = np.random.default_rng(18)
    q, k, v = (rng.standard_normal((2, 5, 3, 4)) for _ in range(3))  # (B, L, H, D)
    refattn.attention_backward(np.zeros((2, 5, 3, 4)), q, k, v, layout="BLHD")
    with pytest.raises(ValueError, match=r"\(2, 5, 3, 4\) \(\.\.\., H, L, Ev in layout 'BLHD'"):
        refattn.attention_backward(np.zeros((2, 3, 5, 4)), q, k, v, layout="BLHD")


def test_saved_array_namespace_and_dtype_errors():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(19)
    q, k, v, dout = (torch.from_numpy(rng.standard_normal((2, 3, 4))) for _ in range(4))
    with pytest.raises(TypeError, match="q is a torch array but grad_out is a numpy array"):
        refattn.attention_backward(dout.numpy(), q, k, v)
    with pytest.raises(TypeError, match="output is a numpy array"):
        refattn.attention_backward(dout, q, k, v, output=dout.numpy())
    with pytest.raises(TypeError, match="lse is a numpy array"):
        refattn.attention_backward(dout, q, k, v, lse=np.zeros((2, 3)))
    with pytest.raises(TypeError, match="grad_out must have a real floating dtype"):
        refattn.attention_backward(torch.zeros((2, 3, 4), dtype=torch.int64), q, k, v)
    with pytest.raises(TypeError, match="grad_out must be an array"):
        refattn.attention_backward([[0.0]], q, k, v)
    with pytest.raises(TypeError, match="xp is the numpy namespace but q is a torch array"):
        refattn.attention_backward(dout, q, k, v, xp=np)


# --- the torch-convention helper ------------------------------------------------------------


def _sdpa_torch_grads(dout, q, k, v, attn_mask=None, **kwargs):
    torch = pytest.importorskip("torch")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    leaves = [torch.tensor(x, requires_grad=True) for x in (q, k, v)]
    mask = None
    if attn_mask is not None:
        mask = torch.tensor(attn_mask, requires_grad=attn_mask.dtype != np.bool_)
    with sdpa_kernel(SDPBackend.MATH):
        out = sdpa(*leaves, attn_mask=mask, **kwargs)
    out.backward(torch.from_numpy(dout))
    grads = [x.grad.numpy() for x in leaves]
    grads.append(mask.grad.numpy() if mask is not None and mask.requires_grad else None)
    return grads


@pytest.mark.parametrize(
    ("shapes", "mask_kind", "kwargs"),
    [
        (((2, 4, 3, 5), (2, 2, 6, 5), (2, 1, 6, 3)), "float", {"enable_gqa": True}),
        (((2, 4, 3, 5), (2, 4, 6, 5), (2, 4, 6, 3)), "bool", {"scale": -0.5}),
        (((2, 4, 3, 5), (2, 4, 6, 5), (2, 4, 6, 3)), None, {"is_causal": True}),
        (((2, 1, 3, 5), (2, 4, 6, 5), (2, 4, 6, 3)), None, {}),  # query head broadcast
        (((3, 5), (2, 4, 6, 5), (2, 1, 6, 3)), "float", {"scale": 0.0}),
        (((4, 3, 5), (4, 6, 5), (4, 6, 3)), "float32", {}),
    ],
)
def test_sdpa_backward_matches_torch_autograd(backend, shapes, mask_kind, kwargs):
    rng = np.random.default_rng(20)
    q, k, v = (rng.standard_normal(s) for s in shapes)
    out_shape = refattn.scaled_dot_product_attention(q, k, v, **kwargs).shape
    dout = rng.standard_normal(out_shape)
    attn_mask = None
    if mask_kind == "bool":
        attn_mask = rng.random((3, 6)) < 0.6
        attn_mask[0] = False  # a fully masked row
    elif mask_kind is not None:
        attn_mask = rng.standard_normal((4, 3, 6)).astype(
            np.float32 if mask_kind == "float32" else np.float64)
    want = _sdpa_torch_grads(dout, q, k, v, attn_mask, **kwargs)
    got = refattn.scaled_dot_product_attention_backward(
        *(backend.asarray(x) for x in (dout, q, k, v)),
        attn_mask=None if attn_mask is None else backend.asarray(attn_mask), **kwargs,
    )
    # The bound of the translated problem: the query broadcast over the key heads unless
    # enable_gqa, a bool mask or is_causal as allowed, a float mask as bias.
    H = max(x.shape[-3] for x in (q, k, v) if x.ndim >= 3)
    q_b = q if kwargs.get("enable_gqa") else np.broadcast_to(q, (*q.shape[:-3], H, *q.shape[-2:]))
    allowed = attn_mask if mask_kind == "bool" else None
    if kwargs.get("is_causal"):
        allowed = np.tril(np.ones((q.shape[-2], k.shape[-2]), dtype=bool))
    scale = kwargs.get("scale")
    b = grad_bounds(
        q_b, k, v, dout, scale=1 / np.sqrt(q.shape[-1]) if scale is None else scale,
        bias=None if mask_kind in (None, "bool") else attn_mask.astype(np.float64),
        allowed=allowed,
    )
    # Summing the broadcast query's n head gradients adds n u of their magnitude.
    n = q_b.size // q.size
    b.bounds[0] = np_sum_to(b.bounds[0], q.shape) + n * U64 * np_sum_to(b.mags[0], q.shape)
    for name, g, w, bound in zip(("dq", "dk", "dv", "dbias"), got, want, b.bounds,
                                 strict=True):
        if w is None:
            assert g is None, name
            continue
        g = backend.to_numpy(g)
        assert g.shape == w.shape and g.dtype == w.dtype, name
        # Two float64 implementations, each within the bound; a float32 mask's gradient
        # is then rounded to float32 on each side (u32 relative each).
        tol = 2 * bound + (2 * U32 * np.abs(w) if w.dtype == np.float32 else 0.0)
        _assert_within(g.astype(np.float64), w.astype(np.float64), tol, name)


def test_sdpa_backward_with_a_dropout_keep_mask(backend):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(21)
    q, k, v = (rng.standard_normal((2, 2, 4, 3)) for _ in range(3))
    dout = rng.standard_normal((2, 2, 4, 3))
    keep = rng.random((2, 2, 4, 4)) >= 0.4
    additive = rng.standard_normal((4, 4))
    leaves = [torch.tensor(x, requires_grad=True) for x in (q, k, v, additive)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, _ = torch.ops.aten._scaled_dot_product_attention_math(
            *leaves[:3], leaves[3], 0.4, False, torch.from_numpy(keep))
    out.backward(torch.from_numpy(dout))
    got = refattn.scaled_dot_product_attention_backward(
        *(backend.asarray(x) for x in (dout, q, k, v)), attn_mask=backend.asarray(additive),
        dropout_p=0.4, dropout_mask=backend.asarray(keep),
    )
    bounds = grad_bounds(q, k, v, dout, scale=1 / np.sqrt(3), bias=additive, keep=keep,
                         dropout_p=0.4).bounds
    for name, g, leaf, bound in zip(("dq", "dk", "dv", "dbias"), got, leaves, bounds,
                                    strict=True):
        # Two float64 implementations, each within the bound.
        _assert_within(backend.to_numpy(g), leaf.grad.numpy(), 2 * bound, name)


def test_sdpa_backward_float32_query_broadcast_is_rounded_once(backend):
    # The broadcast query's head gradients are summed in float64, then rounded once.
    rng = np.random.default_rng(22)
    q = rng.standard_normal((1, 1, 3, 4)).astype(np.float32)
    k, v, dout = (rng.standard_normal((1, 4, 5, 4)).astype(np.float32) for _ in range(3))
    dout = dout[..., :3, :]
    g32 = refattn.scaled_dot_product_attention_backward(
        *(backend.asarray(x) for x in (dout, q, k, v)))
    g64 = refattn.scaled_dot_product_attention_backward(
        *(backend.asarray(x.astype(np.float64)) for x in (dout, q, k, v)))
    for a, b in zip(g32[:3], g64[:3], strict=True):
        a = backend.to_numpy(a)
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, backend.to_numpy(b).astype(np.float32))


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((), {"attn_mask": np.ones((3, 5), dtype=bool), "is_causal": True}, ValueError,
         "attn_mask and is_causal=True given together"),
        ((), {"attn_mask": np.ones((3, 5), dtype=np.float16)}, TypeError,
         "attn_mask must be bool, float32 or the query's dtype"),
        ((), {"is_causal": 1}, TypeError, "is_causal must be True or False"),
        ((), {"enable_gqa": "yes"}, TypeError, "enable_gqa must be True or False"),
        ((), {"dropout_p": 0.5}, ValueError, "needs an explicit dropout_mask"),
        ("1d", {}, ValueError, "query must be at least 2-D"),
        ("heads", {}, ValueError, "head counts must be equal or 1"),
        ("grad", {}, ValueError, "grad_out must have the output's shape"),
    ],
)
def test_sdpa_backward_errors(args, kwargs, error, match):
    rng = np.random.default_rng(23)
    q, k, v = (rng.standard_normal((2, 2, 3 if i == 0 else 5, 4)) for i in range(3))
    dout = rng.standard_normal((2, 2, 3, 4))
    if args == "1d":
        q = rng.standard_normal(4)
    elif args == "heads":
        k = rng.standard_normal((2, 3, 5, 4))
    elif args == "grad":
        dout = dout[..., :2, :]
    with pytest.raises(error, match=match):
        refattn.scaled_dot_product_attention_backward(dout, q, k, v, **kwargs)
