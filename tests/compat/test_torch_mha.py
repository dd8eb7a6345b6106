"""``refattn.multi_head_attention_forward`` and ``refattn.MultiheadAttention`` against torch 2.13.

The expected values are torch's own, in float64: ``torch.nn.functional.
multi_head_attention_forward`` under the math SDPA backend and ``torch.nn.MultiheadAttention``
(its reference path and, separately, its inference fast path), with the weights copied over
by ``from_torch``. torch's dropout is reproduced by drawing torch's own keep-mask from the same
seed (CPU ``F.dropout`` and the math SDPA backend both call ``bernoulli_(1 - p)`` on a tensor
of the score shape) and handing it to refattn as ``dropout_mask``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refattn
from tests.helpers.cases import assert_close_within

torch = pytest.importorskip("torch")
F = torch.nn.functional
pytestmark = pytest.mark.torch

U = float(np.finfo(np.float64).eps) / 2  # unit roundoff of float64


# --- cases --------------------------------------------------------------------------------


@dataclass
class MHACase:
    """One multi-head attention problem, all NumPy, inputs sequence-first as torch's F."""

    E: int
    H: int
    kdim: int
    vdim: int
    batched: bool
    N: int
    L: int
    S: int
    params: dict[str, np.ndarray]
    query: np.ndarray
    key: np.ndarray
    value: np.ndarray
    add_zero_attn: bool = False
    attn_mask: np.ndarray | None = None
    key_padding_mask: np.ndarray | None = None
    static_k: np.ndarray | None = None
    static_v: np.ndarray | None = None
    need_weights: bool = True
    average_attn_weights: bool = True
    is_causal: bool = False
    training: bool = False
    dropout: float = 0.0
    torch_seed: int = 0
    self_attention: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def separate(self) -> bool:
        return "q_proj_weight" in self.params

    @property
    def S_final(self) -> int:
        return self.S + ("bias_k" in self.params) + self.add_zero_attn

    @property
    def dropout_active(self) -> bool:
        return self.training and self.dropout > 0


def _params(rng, E, H, kdim, vdim, bias, add_bias_kv) -> dict[str, np.ndarray]:
    # Entries of size ~1/sqrt(fan_in) keep projected values O(1), as torch's initialisers
    # do, so the logits stay within a few units and the softmax is well spread.
    p = {}
    if kdim == E and vdim == E:
        p["in_proj_weight"] = rng.standard_normal((3 * E, E)) / math.sqrt(E)
    else:
        p["q_proj_weight"] = rng.standard_normal((E, E)) / math.sqrt(E)
        p["k_proj_weight"] = rng.standard_normal((E, kdim)) / math.sqrt(kdim)
        p["v_proj_weight"] = rng.standard_normal((E, vdim)) / math.sqrt(vdim)
    p["out_proj.weight"] = rng.standard_normal((E, E)) / math.sqrt(E)
    if bias:
        p["in_proj_bias"] = rng.standard_normal(3 * E) * 0.5
        p["out_proj.bias"] = rng.standard_normal(E) * 0.5
    if add_bias_kv:
        p["bias_k"] = rng.standard_normal((1, 1, E))
        p["bias_v"] = rng.standard_normal((1, 1, E))
    return p


def _mask(rng, kind: str, shape: tuple[int, ...], density: float) -> np.ndarray | None:
    """bool: True = masked out with probability ``density``; float: additive, some -inf."""
    if kind == "none":
        return None
    if kind == "bool":
        return rng.random(shape) < density
    values = rng.standard_normal(shape) * 2.0
    return np.where(rng.random(shape) < density, -np.inf, values)


@st.composite
def mha_cases(draw, *, statics: bool = True) -> MHACase:
    """Every constructor flag and forward argument, batched and unbatched, random masks."""
    H = draw(st.integers(1, 3))
    D = draw(st.integers(1, 3))
    E = H * D
    kdim = draw(st.sampled_from([E, E, 1, 4]))
    vdim = draw(st.sampled_from([E, E, 2, 5]))
    bias, add_bias_kv, add_zero_attn = (draw(st.booleans()) for _ in range(3))
    batched = draw(st.booleans())
    N = draw(st.integers(1, 3)) if batched else 1
    L, S = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    self_attention = kdim == vdim == E and L == S and draw(st.booleans())

    def inputs(length, dim):
        shape = (length, N, dim) if batched else (length, dim)
        return rng.uniform(-1.0, 1.0, shape)

    query = inputs(L, E)
    key = query if self_attention else inputs(S, kdim)
    value = query if self_attention else inputs(S, vdim)
    case = MHACase(
        E=E, H=H, kdim=kdim, vdim=vdim, batched=batched, N=N, L=L, S=S,
        params=_params(rng, E, H, kdim, vdim, bias, add_bias_kv), query=query, key=key,
        value=value, add_zero_attn=add_zero_attn, self_attention=self_attention,
        torch_seed=seed % 2**31,
    )
    density = draw(st.sampled_from([0.2, 0.6, 0.95]))  # 0.95: many fully masked rows
    am_kind = draw(st.sampled_from(["none", "bool", "float"]))
    am_shape = draw(st.sampled_from(["2d", "3d"]))
    heads = N * H if batched else H
    shape = (L, S) if am_shape == "2d" else (heads, L, S)
    case.attn_mask = _mask(rng, am_kind, shape, density)
    kpm_kind = draw(st.sampled_from(["none", "bool", "float"]))
    case.key_padding_mask = _mask(rng, kpm_kind, (N, S) if batched else (S,), density / 2)
    case.need_weights = draw(st.booleans())
    case.average_attn_weights = draw(st.booleans())
    case.is_causal = draw(st.booleans())
    if case.is_causal and case.attn_mask is None:
        # The hint needs attn_mask; give it the mask it claims to be.
        case.attn_mask = np.triu(np.ones((L, S), dtype=bool), k=1)
    case.training = draw(st.booleans())
    case.dropout = draw(st.sampled_from([0.0, 0.3, 1.0]))
    if statics and not add_bias_kv and draw(st.booleans()):
        case.static_k = rng.standard_normal((heads, S, D))
        case.static_v = rng.standard_normal((heads, S, D))
    return case


# --- torch and refattn calls --------------------------------------------------------------


def _t(x):
    return None if x is None else torch.from_numpy(np.array(x, copy=True))


def _torch_keep_mask(case: MHACase) -> np.ndarray | None:
    """The keep-mask torch draws after ``torch.manual_seed(case.torch_seed)``.

    CPU dropout fills a float64 tensor of the score shape (N*H, L, S_final) with
    ``bernoulli_(1 - p)`` (p = 1 draws nothing and drops everything: all-False here too).
    """
    if not case.dropout_active:
        return None
    torch.manual_seed(case.torch_seed)
    shape = (case.N * case.H, case.L, case.S_final)
    noise = torch.empty(shape, dtype=torch.float64).bernoulli_(1.0 - case.dropout)
    keep = noise.numpy() != 0.0
    return keep.reshape((case.N, case.H, case.L, case.S_final) if case.batched
                        else (case.H, case.L, case.S_final))


def _functional_args(case: MHACase, conv) -> tuple[tuple, dict]:
    p = {name: conv(x) for name, x in case.params.items()}
    q = conv(case.query)
    k = q if case.self_attention else conv(case.key)
    v = q if case.self_attention else conv(case.value)
    args = (
        q, k, v, case.E, case.H, p.get("in_proj_weight"), p.get("in_proj_bias"),
        p.get("bias_k"), p.get("bias_v"), case.add_zero_attn, case.dropout,
        p["out_proj.weight"], p.get("out_proj.bias"),
    )
    kwargs = dict(
        training=case.training, key_padding_mask=conv(case.key_padding_mask),
        need_weights=case.need_weights, attn_mask=conv(case.attn_mask),
        use_separate_proj_weight=case.separate, q_proj_weight=p.get("q_proj_weight"),
        k_proj_weight=p.get("k_proj_weight"), v_proj_weight=p.get("v_proj_weight"),
        static_k=conv(case.static_k), static_v=conv(case.static_v),
        average_attn_weights=case.average_attn_weights, is_causal=case.is_causal,
    )
    return args, kwargs


def _numpy(x):
    return None if x is None else x.detach().numpy()


def torch_functional(case: MHACase):
    """torch's F.multi_head_attention_forward under the math SDPA backend, and its warnings."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    args, kwargs = _functional_args(case, _t)
    with warnings.catch_warnings(record=True) as caught, sdpa_kernel(SDPBackend.MATH):
        warnings.simplefilter("always")
        torch.manual_seed(case.torch_seed)
        out, w = F.multi_head_attention_forward(*args, **kwargs)
    return _numpy(out), _numpy(w), _mismatch_warnings(caught)


def refattn_functional(case: MHACase, conv=lambda x: x):
    args, kwargs = _functional_args(case, lambda x: None if x is None else conv(x))
    keep = _torch_keep_mask(case)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, w = refattn.multi_head_attention_forward(
            *args, **kwargs, dropout_mask=None if keep is None else conv(keep))
    return out, w, _mismatch_warnings(caught)


def _mismatch_warnings(caught) -> int:
    return sum(
        1 for w in caught
        if issubclass(w.category, UserWarning) and "mismatched key_padding_mask" in str(w.message)
    )


# --- the derived tolerance ----------------------------------------------------------------


def _abs_linear(x, w, b):
    """Magnitude |x| |W|^T + |b| of x @ W^T + b: what its rounding error is relative to."""
    m = np.abs(x) @ np.abs(w).T
    return m if b is None else m + np.abs(b)


def mha_bounds(case: MHACase) -> tuple[float, float]:
    """Bounds on |refattn - torch| for the output and for the weights.

    First-order rounding analysis of one float64 evaluation, u the unit roundoff; the
    bound for comparing two evaluations is twice it:

    * in-projection, a dot product of n = kdim (or E, vdim) terms plus a bias: error at
      most (n + 1) u times its magnitude |x||W|^T + |b|;
    * a logit ``q.k / sqrt(D)`` plus mask: (D + 4) u A from its own arithmetic (the dot
      product, the scaling, the mask addition, torch's split of the scale) plus
      (n_q + 1) u A + (n_k + 1) u A carried in from the projections; A the largest
      magnitude ``|q|.|k| / sqrt(D) + |mask|``;
    * a logit error delta moves a weight by a relative 2 delta; exp, the row sum and the
      division add (S + 3) u; kept weights are scaled by f = 1 / (1 - p);
    * an attention output row sum_j w_j v_j adds S u, and carries the value projection's
      (n_v + 1) u: at most f Vmax (2 delta + (2S + 3) u + (n_v + 1) u);
    * the out-projection multiplies that by max row sum |W_o| and adds (E + 1) u of its
      own magnitude.
    """
    p, N, H, E = case.params, case.N, case.H, case.E
    D = E // H

    def batch_first(x):
        return np.moveaxis(x, 0, 1) if case.batched else x[None]

    xq, xk, xv = batch_first(case.query), batch_first(case.key), batch_first(case.value)
    if case.separate:
        wq, wk, wv = p["q_proj_weight"], p["k_proj_weight"], p["v_proj_weight"]
    else:
        wq, wk, wv = np.split(p["in_proj_weight"], 3)
    bq = bk = bv = None
    if "in_proj_bias" in p:
        bq, bk, bv = np.split(p["in_proj_bias"], 3)
    qa = _abs_linear(xq, wq, bq)
    ka = _abs_linear(xk, wk, bk)
    va = _abs_linear(xv, wv, bv)
    if case.static_k is not None:
        ka = np.abs(case.static_k).reshape(N, H, -1, D).transpose(0, 2, 1, 3).reshape(N, -1, E)
        va = np.abs(case.static_v).reshape(N, H, -1, D).transpose(0, 2, 1, 3).reshape(N, -1, E)
    if "bias_k" in p:
        ka = np.concatenate([ka, np.broadcast_to(np.abs(p["bias_k"]).reshape(1, 1, E),
                                                 (N, 1, E))], axis=1)
        va = np.concatenate([va, np.broadcast_to(np.abs(p["bias_v"]).reshape(1, 1, E),
                                                 (N, 1, E))], axis=1)
    qh = qa.reshape(N, -1, H, D).transpose(0, 2, 1, 3)
    kh = ka.reshape(N, -1, H, D).transpose(0, 2, 1, 3)
    A = float(np.max(qh @ kh.transpose(0, 1, 3, 2), initial=0.0)) / math.sqrt(D)
    for m in (case.attn_mask, case.key_padding_mask):
        if m is not None and m.dtype != bool:
            A += float(np.max(np.abs(m[np.isfinite(m)]), initial=0.0))
    n_q, n_k, n_v = wq.shape[1], wk.shape[1], wv.shape[1]
    delta = ((D + 4) + (n_q + 1) + (n_k + 1)) * U * A
    S = case.S_final
    f = 1.0 / (1.0 - case.dropout) if case.dropout_active and case.dropout < 1 else 1.0
    vmax = float(np.max(va, initial=0.0))
    weight_one = f * (2 * delta + (S + 3) * U)
    head_out = f * vmax * (2 * delta + (2 * S + 3) * U + (n_v + 1) * U)
    wo_rows = float(np.max(np.abs(p["out_proj.weight"]).sum(axis=1)))
    bo = float(np.max(np.abs(p.get("out_proj.bias", np.zeros(1)))))
    out_one = head_out * wo_rows + (E + 1) * U * (f * vmax * wo_rows + bo)
    return 2 * out_one, 2 * weight_one


def check_against(case, out, w, expected_out, expected_w, what):
    out_tol, w_tol = mha_bounds(case)
    assert_close_within(out, expected_out, out_tol, f"{what}: output")
    if expected_w is None:
        assert w is None, f"{what}: weights returned although need_weights=False"
    else:
        assert_close_within(w, expected_w, w_tol, f"{what}: weights")


# --- agreement with torch -----------------------------------------------------------------


@given(case=mha_cases())
def test_functional_agrees_with_torch_math_backend(case):
    expected_out, expected_w, torch_warned = torch_functional(case)
    out, w, warned = refattn_functional(case)
    check_against(case, out, w, expected_out, expected_w, "F.multi_head_attention_forward")
    # The deprecation warning for mixed mask types: emitted exactly where torch emits it.
    assert (warned > 0) == (torch_warned > 0)


def _module_inputs(case: MHACase, batch_first: bool):
    def layout(x):
        return np.swapaxes(x, 0, 1) if (batch_first and case.batched) else x

    return layout(case.query), layout(case.key), layout(case.value)


def _torch_module(case: MHACase, batch_first: bool):
    tmod = torch.nn.MultiheadAttention(
        case.E, case.H, dropout=case.dropout, bias="in_proj_bias" in case.params,
        add_bias_kv="bias_k" in case.params, add_zero_attn=case.add_zero_attn,
        kdim=case.kdim, vdim=case.vdim, batch_first=batch_first, dtype=torch.float64,
    )
    tmod.load_state_dict({name: _t(x) for name, x in case.params.items()})
    tmod.train(case.training)
    return tmod


@given(case=mha_cases(statics=False), batch_first=st.booleans())
def test_module_agrees_with_torch_module(case, batch_first):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    tmod = _torch_module(case, batch_first)
    mha = refattn.MultiheadAttention.from_torch(tmod)
    q, k, v = _module_inputs(case, batch_first)
    tq = _t(q)
    tk, tv = (tq, tq) if case.self_attention else (_t(k), _t(v))
    forward = dict(
        key_padding_mask=case.key_padding_mask, need_weights=case.need_weights,
        attn_mask=case.attn_mask, average_attn_weights=case.average_attn_weights,
        is_causal=case.is_causal,
    )
    # The parameters require grad and autograd is on, so torch takes its reference path
    # (the fast path is tested below). Only with dropout is the math backend forced, to
    # reproduce its random stream; otherwise torch picks its SDPA kernel itself.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(case.torch_seed)
        if case.dropout_active:
            with sdpa_kernel(SDPBackend.MATH):
                t_out, t_w = tmod(tq, tk, tv, **{n: _t(x) if isinstance(x, np.ndarray) else x
                                                 for n, x in forward.items()})
        else:
            t_out, t_w = tmod(tq, tk, tv, **{n: _t(x) if isinstance(x, np.ndarray) else x
                                             for n, x in forward.items()})
    torch_warned = _mismatch_warnings(caught)
    keep = _torch_keep_mask(case)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, w = mha(q, q if case.self_attention else k, q if case.self_attention else v,
                     **forward, dropout_mask=keep)
    check_against(case, out, w, _numpy(t_out), _numpy(t_w), "nn.MultiheadAttention")
    assert (_mismatch_warnings(caught) > 0) == (torch_warned > 0)


def _fast_path_case(rng, *, kpm: bool, am: bool, need_weights: bool, average: bool):
    N, L, H, D = 2, 4, 2, 3
    E = H * D
    x = rng.uniform(-1, 1, (L, N, E))
    case = MHACase(E=E, H=H, kdim=E, vdim=E, batched=True, N=N, L=L, S=L,
                   params=_params(rng, E, H, E, E, True, False), query=x, key=x, value=x,
                   self_attention=True, need_weights=need_weights,
                   average_attn_weights=average)
    if am:
        case.attn_mask = rng.random((L, L)) < 0.5
        case.attn_mask[1] = True          # query 1 sees no key at all
    if kpm:
        case.key_padding_mask = rng.random((N, L)) < 0.3
        case.key_padding_mask[1] = True   # batch entry 1 is all padding
    return case


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("masks", ["none", "attn", "padding", "both"])
def test_torch_fast_path_differs_only_on_fully_masked_rows_without_weights(
    masks, need_weights, monkeypatch
):
    case = _fast_path_case(
        np.random.default_rng(7), kpm=masks in ("padding", "both"),
        am=masks in ("attn", "both"), need_weights=need_weights, average=True,
    )
    tmod = _torch_module(case, batch_first=True).eval()
    taken = []
    native = torch._native_multi_head_attention

    def spy(*args, **kwargs):
        taken.append(True)
        return native(*args, **kwargs)

    monkeypatch.setattr(torch, "_native_multi_head_attention", spy)
    x = _t(np.swapaxes(case.query, 0, 1))
    with torch.no_grad():
        t_out, t_w = tmod(x, x, x, key_padding_mask=_t(case.key_padding_mask),
                          attn_mask=_t(case.attn_mask), need_weights=need_weights)
    assert taken, "torch did not take its fast path for this configuration"
    mha = refattn.MultiheadAttention.from_torch(tmod)
    xn = x.numpy()
    out, w = mha(xn, xn, xn, key_padding_mask=case.key_padding_mask,
                 attn_mask=case.attn_mask, need_weights=need_weights)
    expected = _numpy(t_out)
    if not need_weights and masks != "none":
        # Documented difference: the fast path's masked softmax gives a query that sees no
        # key NaN; the reference (SDPA) path and refattn give it a zero attention output,
        # so the output row is exactly the out-projection bias.
        dead = np.all(np.isnan(expected), axis=-1)
        assert dead.any()
        np.testing.assert_array_equal(out[dead], np.broadcast_to(
            case.params["out_proj.bias"], out[dead].shape))
        expected = np.where(dead[..., None], out, expected)
    check_against(case, out, w, expected, _numpy(t_w), "fast path")


# --- the same core checks on every backend --------------------------------------------


def _core_cases() -> dict[str, MHACase]:
    rng = np.random.default_rng(11)
    E, H, N, L, S = 6, 2, 2, 3, 4
    base = MHACase(E=E, H=H, kdim=E, vdim=E, batched=True, N=N, L=L, S=S,
                   params=_params(rng, E, H, E, E, True, False),
                   query=rng.uniform(-1, 1, (L, N, E)), key=rng.uniform(-1, 1, (S, N, E)),
                   value=rng.uniform(-1, 1, (S, N, E)))
    am = rng.random((L, S)) < 0.4
    am[2] = True                                  # a query that sees no key
    kpm = rng.random((N, S)) < 0.3
    sep_params = _params(rng, E, H, 3, 5, True, True)
    return {
        "masks-weights-nan-rows": replace(base, attn_mask=am, key_padding_mask=kpm,
                                          average_attn_weights=False),
        "masks-sdpa-zero-rows": replace(base, attn_mask=am, key_padding_mask=kpm,
                                        need_weights=False),
        "separate-bias-kv-zero-attn-float-3d": replace(
            base, kdim=3, vdim=5, params=sep_params, add_zero_attn=True,
            key=rng.uniform(-1, 1, (S, N, 3)), value=rng.uniform(-1, 1, (S, N, 5)),
            attn_mask=np.where(rng.random((N * H, L, S)) < 0.3, -np.inf,
                               rng.standard_normal((N * H, L, S)))),
        "dropout-explicit-mask": replace(base, training=True, dropout=0.4,
                                         key_padding_mask=kpm, torch_seed=3),
        "causal-hint": replace(base, attn_mask=np.triu(np.ones((L, S), bool), 1),
                               is_causal=True, need_weights=False),
        "unbatched": replace(base, batched=False, N=1, query=base.query[:, 0],
                             key=base.key[:, 0], value=base.value[:, 0],
                             key_padding_mask=kpm[0], attn_mask=am),
    }


@pytest.mark.parametrize("name", list(_core_cases()))
def test_core_functional_cases_on_every_backend(backend, name):
    case = _core_cases()[name]
    expected_out, expected_w, _ = torch_functional(case)
    out, w, _ = refattn_functional(case, conv=backend.asarray)
    assert refattn._namespace.library_name(out) == refattn._namespace.library_name(
        backend.asarray(np.zeros(1)))
    check_against(case, backend.to_numpy(out), None if w is None else backend.to_numpy(w),
                  expected_out, expected_w, name)


@pytest.mark.parametrize("name", ["masks-weights-nan-rows", "separate-bias-kv-zero-attn-float-3d",
                                  "dropout-explicit-mask", "unbatched"])
def test_core_module_cases_on_every_backend(backend, name):
    case = _core_cases()[name]
    expected_out, expected_w, _ = torch_functional(case)
    tmod = _torch_module(case, batch_first=True)
    mha = refattn.MultiheadAttention.from_torch(tmod, like=backend.asarray(np.zeros(1)))
    q, k, v = (backend.asarray(x) for x in _module_inputs(case, batch_first=True))
    keep = _torch_keep_mask(case)

    def conv(x):
        return None if x is None else backend.asarray(x)

    out, w = mha(q, k, v, key_padding_mask=conv(case.key_padding_mask),
                 attn_mask=conv(case.attn_mask), need_weights=case.need_weights,
                 average_attn_weights=case.average_attn_weights, dropout_mask=conv(keep))
    out = backend.to_numpy(out)
    if case.batched:
        out = np.swapaxes(out, 0, 1)
    check_against(case, out, None if w is None else backend.to_numpy(w), expected_out,
                  expected_w, name)


# --- semantics stated in the docs, checked from first principles ------------------------


def _small_module(**kw):
    return refattn.MultiheadAttention(6, 3, seed=5, **kw)


def test_fully_masked_query_is_nan_with_weights_and_zero_attention_without():
    mha = _small_module(batch_first=True)
    mha.out_proj.bias = np.random.default_rng(0).standard_normal(6)
    x = np.random.default_rng(1).uniform(-1, 1, (2, 3, 6))
    am = np.zeros((3, 3), dtype=bool)
    am[1] = True
    out_w, w = mha(x, x, x, attn_mask=am)
    out_s, none = mha(x, x, x, attn_mask=am, need_weights=False)
    assert none is None
    assert np.all(np.isnan(out_w[:, 1])) and np.all(np.isnan(w[:, 1]))
    # Zero attention output, then the out-projection: exactly its bias.
    np.testing.assert_array_equal(out_s[:, 1], np.broadcast_to(mha.out_proj.bias, (2, 6)))
    rows = [0, 2]
    # The other queries agree between the two paths up to their rounding: two
    # evaluations of logits of magnitude <= A differ by a few (E + D) u A, well inside
    # 64 u times max|out| here (A < 3 for inputs and weights of this size).
    np.testing.assert_allclose(out_w[:, rows], out_s[:, rows], rtol=0,
                               atol=64 * U * np.abs(out_s).max())


def test_bool_masks_are_true_for_masked_out_and_merge_with_padding_by_addition():
    # Same problem written with float masks: True -> -inf, and the padding mask added.
    mha = _small_module()
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, (3, 2, 6))
    am = rng.random((3, 3)) < 0.3
    kpm = rng.random((2, 3)) < 0.3
    out_b, w_b = mha(x, x, x, attn_mask=am, key_padding_mask=kpm)
    fam = np.where(am, -np.inf, 0.0)
    fkpm = np.where(kpm, -np.inf, 0.0)
    out_f, w_f = mha(x, x, x, attn_mask=fam, key_padding_mask=fkpm)
    # Adding 0 or -inf to a score is exact, so both forms are the same arithmetic.
    np.testing.assert_array_equal(out_b, out_f)
    np.testing.assert_array_equal(w_b, w_f)
    merged = fam[None, None] + fkpm[:, None, None, :]          # (N, 1, L, S)
    out_m, _ = mha(x, x, x, attn_mask=np.broadcast_to(merged, (2, 3, 3, 3)).reshape(6, 3, 3))
    np.testing.assert_array_equal(out_b, out_m)


def test_mixed_bool_and_float_masks_warn_and_are_converted():
    mha = _small_module()
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, (3, 2, 6))
    am = rng.standard_normal((3, 3))
    kpm = np.array([[False, True, False], [False, False, False]])
    with pytest.warns(UserWarning, match="mismatched key_padding_mask and attn_mask"):
        out_mixed, _ = mha(x, x, x, attn_mask=am, key_padding_mask=kpm)
    out_float, _ = mha(x, x, x, attn_mask=am, key_padding_mask=np.where(kpm, -np.inf, 0.0))
    np.testing.assert_array_equal(out_mixed, out_float)


def test_bias_kv_and_zero_attn_append_keys_that_take_part():
    mha = refattn.MultiheadAttention(4, 2, add_bias_kv=True, add_zero_attn=True, seed=1)
    x = np.random.default_rng(4).uniform(-1, 1, (3, 4))     # unbatched
    kpm = np.array([True, True, True])                       # every real key is padding
    out, w = mha(x, x, x, key_padding_mask=kpm, average_attn_weights=False)
    assert w.shape == (2, 3, 5)
    np.testing.assert_array_equal(w[..., :3], 0.0)
    # Only bias_k (logit q.bias_k / sqrt(D)) and the zero key (logit 0) remain.
    q = x @ mha.in_proj_weight[:4].T                          # biases are zero at init
    qh = q.reshape(3, 2, 2).transpose(1, 0, 2)
    bk = mha.bias_k.reshape(2, 2)
    logit = np.einsum("hld,hd->hl", qh, bk) / np.sqrt(2)
    p_bias = 1.0 / (1.0 + np.exp(-logit))                     # softmax of (logit, 0)
    # Two-term softmax: exp, sum and division add at most 4u relative; the logit's own
    # dot product of D = 2 terms after a projection of E = 4 terms, (2 + 4 + 2) u of its
    # magnitude (< 4 here), moves p by at most that times p(1 - p) <= 1/4.
    np.testing.assert_allclose(w[..., 3], p_bias, rtol=0, atol=(4 + 8 * 4 / 4) * U * 2)
    np.testing.assert_allclose(w[..., 4], 1 - p_bias, rtol=0, atol=(4 + 8 * 4 / 4) * U * 2)


def test_is_causal_hint_replaces_the_mask_only_on_the_sdpa_path_without_padding():
    mha = _small_module()
    rng = np.random.default_rng(5)
    x = rng.uniform(-1, 1, (4, 2, 6))
    wrong = np.zeros((4, 4), dtype=bool)                       # "no mask", hinted causal
    causal = np.triu(np.ones((4, 4), dtype=bool), k=1)
    hinted, _ = mha(x, x, x, attn_mask=wrong, is_causal=True, need_weights=False)
    truly_causal, _ = mha(x, x, x, attn_mask=causal, need_weights=False)
    unmasked, _ = mha(x, x, x, need_weights=False)
    np.testing.assert_array_equal(hinted, truly_causal)
    # With weights, or with a padding mask, the mask given is used and the hint ignored.
    hinted_w, _ = mha(x, x, x, attn_mask=wrong, is_causal=True)
    plain_w, _ = mha(x, x, x)
    np.testing.assert_array_equal(hinted_w, plain_w)
    kpm = np.zeros((2, 4), dtype=bool)
    hinted_p, _ = mha(x, x, x, attn_mask=wrong, key_padding_mask=kpm, is_causal=True,
                      need_weights=False)
    np.testing.assert_array_equal(hinted_p, unmasked)


def test_dropout_only_in_training_and_never_drawn_silently():
    mha = _small_module(dropout=0.5)
    x = np.random.default_rng(6).uniform(-1, 1, (3, 2, 6))
    with pytest.raises(ValueError, match=r"dropout_p=0.5 in training needs dropout_mask"):
        mha(x, x, x)
    keep = np.random.default_rng(7).random((2, 3, 3, 3)) >= 0.5
    out_keep, w_keep = mha(x, x, x, dropout_mask=keep, average_attn_weights=False)
    out_seed, _ = mha(x, x, x, rng=8)
    out_seed2, _ = mha(x, x, x, rng=8)
    np.testing.assert_array_equal(out_seed, out_seed2)
    mha.eval()
    out_eval, w_eval = mha(x, x, x, average_attn_weights=False)
    # Returned weights are after dropout: kept ones scaled by 1 / (1 - p) = 2 (exact).
    np.testing.assert_array_equal(w_keep, np.where(keep, w_eval * 2.0, 0.0))
    # The documented draw: default_rng(seed).random((N, H, L, S_final)) >= p.
    drawn = np.random.default_rng(8).random((2, 3, 3, 3)) >= 0.5
    out_drawn, _ = mha.train()(x, x, x, dropout_mask=drawn)
    np.testing.assert_array_equal(out_seed, out_drawn)
    mha.eval()
    with pytest.raises(ValueError, match=r"no dropout is applied \(training=False"):
        mha(x, x, x, dropout_mask=keep)


def test_dropout_keeps_torch_nan_on_fully_masked_rows_even_when_all_dropped():
    mha = _small_module(dropout=0.5)
    x = np.random.default_rng(9).uniform(-1, 1, (3, 6))
    am = np.zeros((3, 3), dtype=bool)
    am[0] = True
    keep = np.ones((3, 3, 3), dtype=bool)
    keep[:, 0] = False            # the fully masked row is also entirely dropped
    out, w = mha(x, x, x, attn_mask=am, dropout_mask=keep)
    # torch's dropout multiplies: NaN * 0 = NaN, so the row stays NaN.
    assert np.all(np.isnan(out[0])) and np.all(np.isnan(w[0]))
    assert not np.any(np.isnan(out[1:]))


def test_float32_inputs_are_computed_in_float64_and_cast_back():
    tmod = torch.nn.MultiheadAttention(6, 2, dtype=torch.float32)
    mha32 = refattn.MultiheadAttention.from_torch(tmod)
    mha64 = refattn.MultiheadAttention.from_torch(tmod, dtype="float64")
    assert mha32.in_proj_weight.dtype == np.float32
    x = np.random.default_rng(10).uniform(-1, 1, (3, 2, 6)).astype(np.float32)
    out, w = mha32(x, x, x)
    exact, exact_w = mha64(x.astype(np.float64), x.astype(np.float64), x.astype(np.float64))
    assert out.dtype == np.float32 and w.dtype == np.float32
    # One rounding of the float64 result to float32: within half a float32 ulp.
    half_ulp = np.finfo(np.float32).eps / 2
    assert np.all(np.abs(out - exact) <= half_ulp * np.abs(exact))
    assert np.all(np.abs(w - exact_w) <= half_ulp * np.abs(exact_w))


def test_functional_output_projection_may_change_the_width():
    rng = np.random.default_rng(12)
    x = rng.uniform(-1, 1, (3, 2, 4))
    w_in, b_in = rng.standard_normal((12, 4)), rng.standard_normal(12)
    w_out, b_out = rng.standard_normal((7, 4)), rng.standard_normal(7)
    args = (x, x, x, 4, 2, w_in, b_in, None, None, False, 0.0, w_out, b_out)
    out, w = refattn.multi_head_attention_forward(*args)
    t_out, t_w = F.multi_head_attention_forward(*(_t(a) if isinstance(a, np.ndarray) else a
                                                  for a in args))
    assert out.shape == (3, 2, 7)
    # Projections of 4 terms, logits of D = 2, S = 3 keys and an out-projection of 4
    # terms: a few dozen u of magnitudes below 40 here.
    np.testing.assert_allclose(out, t_out.numpy(), rtol=0, atol=64 * 40 * U)


# --- construction, initialisation, copies to and from torch -------------------------------


def test_initialiser_follows_torchs_distributions():
    E = 64
    mha = refattn.MultiheadAttention(E, 4, add_bias_kv=True, seed=0)
    # xavier_uniform on (3E, E): U(-b, b), b = sqrt(6 / (E + 3E)). With 3E^2 = 12288
    # draws the largest |w| falls short of b by more than 1% with probability
    # 0.99^12288 < 1e-50.
    b = math.sqrt(6.0 / (4 * E))
    w = np.abs(mha.in_proj_weight)
    assert w.max() <= b and w.max() > 0.99 * b
    # nn.Linear's default for out_proj: U(-1/sqrt(E), 1/sqrt(E)), same argument (E^2 draws).
    o = np.abs(mha.out_proj.weight)
    assert o.max() <= 1 / math.sqrt(E) and o.max() > 0.99 / math.sqrt(E)
    assert np.all(mha.in_proj_bias == 0) and np.all(mha.out_proj.bias == 0)
    assert mha.bias_k.shape == (1, 1, E)
    # xavier_normal on (1, 1, E): N(0, 1/E). bias_k and bias_v of 8 seeds, scaled by
    # sqrt(E), pool n = 4096 draws of N(0, 1): the sample std has relative standard error
    # 1/sqrt(2n) ~ 1.1% and the mean standard error 1/sqrt(n); 6 standard errors each is
    # a false alarm rate below 1e-8.
    E_small = 256
    draws = np.concatenate([
        np.concatenate([m.bias_k.ravel(), m.bias_v.ravel()]) * math.sqrt(E_small)
        for m in (refattn.MultiheadAttention(E_small, 1, add_bias_kv=True, seed=s)
                  for s in range(8))
    ])
    n = draws.size
    assert n == 4096
    assert abs(draws.std() - 1.0) <= 6 / math.sqrt(2 * n)
    assert abs(draws.mean()) <= 6 / math.sqrt(n)


def test_seed_makes_initialisation_reproducible_and_dtype_like_xp_choose_storage():
    a = refattn.MultiheadAttention(4, 2, kdim=3, seed=3)
    b = refattn.MultiheadAttention(4, 2, kdim=3, seed=np.random.default_rng(3))
    c = refattn.MultiheadAttention(4, 2, kdim=3, seed=4)
    np.testing.assert_array_equal(a.k_proj_weight, b.k_proj_weight)
    assert not np.array_equal(a.k_proj_weight, c.k_proj_weight)
    assert a.in_proj_weight is None and a.q_proj_weight.shape == (4, 4)
    assert a.k_proj_weight.shape == (4, 3) and a.v_proj_weight.shape == (4, 4)
    assert refattn.MultiheadAttention(4, 2, dtype="float32").in_proj_weight.dtype == np.float32
    t = refattn.MultiheadAttention(4, 2, xp=torch, dtype=torch.float32)
    assert isinstance(t.in_proj_weight, torch.Tensor) and t.in_proj_weight.dtype == torch.float32
    like = refattn.MultiheadAttention(4, 2, like=torch.zeros(1, dtype=torch.float64))
    assert isinstance(like.out_proj.weight, torch.Tensor)
    np.testing.assert_array_equal(like.out_proj.weight.numpy(),
                                  refattn.MultiheadAttention(4, 2).out_proj.weight)
    no_bias = refattn.MultiheadAttention(4, 2, bias=False)
    assert no_bias.in_proj_bias is None and no_bias.out_proj.bias is None


@pytest.mark.parametrize("flags", [
    dict(), dict(bias=False), dict(add_bias_kv=True, add_zero_attn=True),
    dict(kdim=3, vdim=5, batch_first=True), dict(dropout=0.25),
])
def test_from_torch_and_to_torch_round_trip(flags):
    tmod = torch.nn.MultiheadAttention(6, 2, dtype=torch.float64, **flags).eval()
    mha = refattn.MultiheadAttention.from_torch(tmod)
    assert mha.training is False and mha.batch_first == flags.get("batch_first", False)
    assert mha.dropout == flags.get("dropout", 0.0)
    back = mha.to_torch()
    assert isinstance(back, torch.nn.MultiheadAttention) and back.training is False
    original, copied = tmod.state_dict(), back.state_dict()
    assert original.keys() == copied.keys()
    for name in original:
        assert torch.equal(original[name], copied[name]), name
    # Copies, not views: changing the torch module leaves the refattn one alone.
    with torch.no_grad():
        for p in tmod.parameters():
            p.add_(1.0)
    again = refattn.MultiheadAttention.from_torch(back)
    for name, p in mha._named_parameters().items():
        np.testing.assert_array_equal(p, again._named_parameters()[name])
    # refattn -> torch -> refattn, through a torch-tensor module too.
    t_side = refattn.MultiheadAttention.from_torch(tmod, xp=torch)
    assert isinstance(t_side.out_proj.weight, torch.Tensor)
    assert torch.equal(t_side.to_torch().out_proj.weight, tmod.out_proj.weight)


def test_train_and_eval_set_the_mode_like_torch():
    mha = refattn.MultiheadAttention(4, 2)
    assert mha.training is True
    assert mha.eval() is mha and mha.training is False
    assert mha.train() is mha and mha.training is True
    assert mha.to_torch().training is True
    assert "embed_dim=4" in repr(mha) and "Linear" in repr(mha.out_proj)


# --- errors: one test per bad argument -----------------------------------------------------


def _good_functional_args():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (3, 2, 4))
    return dict(
        query=x, key=x, value=x, embed_dim_to_check=4, num_heads=2,
        in_proj_weight=rng.standard_normal((12, 4)), in_proj_bias=np.zeros(12), bias_k=None,
        bias_v=None, add_zero_attn=False, dropout_p=0.0,
        out_proj_weight=rng.standard_normal((4, 4)), out_proj_bias=np.zeros(4),
    )


def _sep_weights():
    return dict(use_separate_proj_weight=True, q_proj_weight=np.ones((4, 4)),
                k_proj_weight=np.ones((4, 4)), v_proj_weight=np.ones((4, 4)))


FUNCTIONAL_ERRORS = {
    "num_heads-not-dividing": (dict(num_heads=3), ValueError,
                               r"embed_dim 4 is not divisible by num_heads 3"),
    "num_heads-zero": (dict(num_heads=0), ValueError, r"num_heads must be a positive integer"),
    "embed_dim_to_check": (dict(embed_dim_to_check=5), ValueError,
                           r"embedding dim is 4 .* embed_dim_to_check is 5"),
    "uint8-attn_mask": (dict(attn_mask=np.zeros((3, 3), np.uint8)), TypeError,
                        r"attn_mask must be bool .* or floating .*got dtype uint8"),
    "int-key_padding_mask": (dict(key_padding_mask=np.zeros((2, 3), np.int64)), TypeError,
                             r"key_padding_mask must be bool .*got dtype int64"),
    "4d-attn_mask": (dict(attn_mask=np.zeros((1, 2, 3, 3), bool)), ValueError,
                     r"attn_mask must be 2-D \(L, S\) or 3-D .*got shape \(1, 2, 3, 3\)"),
    "2d-attn_mask-shape": (dict(attn_mask=np.zeros((3, 2), bool)), ValueError,
                           r"attn_mask must have shape \(3, 3\) \(L, S\); got \(3, 2\)"),
    "3d-attn_mask-shape": (dict(attn_mask=np.zeros((2, 3, 3), bool)), ValueError,
                           r"attn_mask must have shape \(4, 3, 3\) \(N\*num_heads, L, S\)"),
    "kpm-rank": (dict(key_padding_mask=np.zeros(3, bool)), ValueError,
                 r"key_padding_mask must be \(N, S\) for a batched query; got shape \(3,\)"),
    "kpm-shape": (dict(key_padding_mask=np.zeros((2, 4), bool)), ValueError,
                  r"key_padding_mask must have shape \(2, 3\)"),
    "query-rank": (dict(query=np.ones((1, 3, 2, 4))), ValueError,
                   r"query must be \(L, N, E\) batched or \(L, E\) unbatched"),
    "key-rank": (dict(key=np.ones((3, 4))), ValueError,
                 r"for a batched \(3-D\) query, key and value must be 3-D"),
    "key-value-shape": (dict(value=np.ones((4, 2, 4))), ValueError,
                        r"key shape \(3, 2, 4\) does not match value shape \(4, 2, 4\)"),
    "key-dim-packed": (dict(key=np.ones((3, 2, 5)), value=np.ones((3, 2, 5))), ValueError,
                       r"key and value must have embed_dim 4 features"),
    "dtype-mismatch": (dict(key=np.ones((3, 2, 4), np.float32)), TypeError,
                       r"query, key and value must share one dtype"),
    "integer-query": (dict(query=np.ones((3, 2, 4), np.int64)), TypeError,
                      r"query must have a real floating dtype"),
    "in_proj_weight-missing": (dict(in_proj_weight=None), ValueError,
                               r"use_separate_proj_weight=False needs in_proj_weight"),
    "in_proj_weight-shape": (dict(in_proj_weight=np.ones((8, 4))), ValueError,
                             r"in_proj_weight must have shape \(12, 4\)"),
    "in_proj_bias-shape": (dict(in_proj_bias=np.ones(8)), ValueError,
                           r"in_proj_bias must have shape \(12,\)"),
    "q_proj_weight-missing": ({**_sep_weights(), "q_proj_weight": None}, ValueError,
                              r"use_separate_proj_weight=True needs q_proj_weight"),
    "k_proj_weight-shape": ({**_sep_weights(), "k_proj_weight": np.ones((4, 3))}, ValueError,
                            r"k_proj_weight must have shape \(4, 4\)"),
    "separate-seq-mismatch": ({**_sep_weights(), "value": np.ones((4, 2, 4))}, ValueError,
                              r"key and value must have the same sequence and batch dims"),
    "out_proj_weight-shape": (dict(out_proj_weight=np.ones((4, 3))), ValueError,
                              r"out_proj_weight must be a \(E_out, embed_dim\) array"),
    "out_proj_bias-shape": (dict(out_proj_bias=np.ones(3)), ValueError,
                            r"out_proj_bias must have shape \(4,\)"),
    "bias_k-alone": (dict(bias_k=np.ones((1, 1, 4))), ValueError,
                     r"bias_k and bias_v must be given together"),
    "bias_k-shape": (dict(bias_k=np.ones((1, 2, 4)), bias_v=np.ones((1, 1, 4))), ValueError,
                     r"bias_k must have shape \(1, 1, embed_dim\)"),
    "bias_k-with-static": (dict(bias_k=np.ones((1, 1, 4)), bias_v=np.ones((1, 1, 4)),
                                static_k=np.ones((4, 3, 2))), ValueError,
                           r"bias_k/bias_v cannot be added to static_k"),
    "static_k-shape": (dict(static_k=np.ones((2, 3, 2))), ValueError,
                       r"static_k must have shape \(N\*num_heads, S, head_dim\) = \(4, S, 2\)"),
    "static_v-length": (dict(static_v=np.ones((4, 5, 2))), ValueError,
                        r"keys and values must have as many positions: 3 keys \(key\), 5"),
    "attn_mask-with-longer-static_k": (dict(static_k=np.ones((4, 5, 2)),
                                            static_v=np.ones((4, 5, 2)),
                                            attn_mask=np.zeros((3, 5), bool)), ValueError,
                                       r"attn_mask cannot be used when static_k has 5"),
    "is_causal-without-mask": (dict(is_causal=True), ValueError,
                               r"is_causal=True needs attn_mask"),
    "dropout-without-mask": (dict(dropout_p=0.1), ValueError,
                             r"dropout_p=0.1 in training needs dropout_mask .* or rng"),
    "dropout_p-range": (dict(dropout_p=1.5), ValueError, r"dropout_p must lie in \[0, 1\]"),
    "dropout_mask-in-eval": (dict(dropout_p=0.1, training=False, rng=0), ValueError,
                             r"dropout_mask or rng given but no dropout is applied"),
    "dropout_mask-shape": (dict(dropout_p=0.1, dropout_mask=np.ones((2, 2, 3, 4), bool)),
                           ValueError, r"dropout_mask must have shape \(2, 2, 3, 3\)"),
    "dropout_mask-dtype": (dict(dropout_p=0.1, dropout_mask=np.ones((2, 2, 3, 3))), TypeError,
                           r"dropout_mask must be a boolean array"),
    "flag-not-bool": (dict(need_weights=1), TypeError, r"need_weights must be True or False"),
    "mixed-libraries": (dict(attn_mask=torch.zeros(3, 3, dtype=torch.bool)), TypeError,
                        r"arrays from two libraries"),
}


@pytest.mark.parametrize("name", list(FUNCTIONAL_ERRORS))
def test_functional_errors(name):
    changes, exc, pattern = FUNCTIONAL_ERRORS[name]
    kwargs = {**_good_functional_args(), **changes}
    with pytest.raises(exc, match=pattern):
        refattn.multi_head_attention_forward(**kwargs)


def test_unbatched_masks_have_their_own_shapes():
    kwargs = _good_functional_args()
    x = kwargs["query"][:, 0]
    kwargs.update(query=x, key=x, value=x)
    with pytest.raises(ValueError, match=r"attn_mask must have shape \(2, 3, 3\) \(num_heads"):
        refattn.multi_head_attention_forward(**kwargs, attn_mask=np.zeros((4, 3, 3), bool))
    with pytest.raises(ValueError, match=r"key_padding_mask must be \(S,\) for a unbatched"):
        refattn.multi_head_attention_forward(**kwargs, key_padding_mask=np.zeros((1, 3), bool))
    with pytest.raises(ValueError, match=r"for an unbatched \(2-D\) query, key and value"):
        refattn.multi_head_attention_forward(**{**kwargs, "key": np.ones((3, 2, 4))})


CONSTRUCTOR_ERRORS = {
    "embed_dim": (dict(embed_dim=0), ValueError, r"embed_dim must be a positive integer"),
    "num_heads": (dict(num_heads=-1), ValueError, r"num_heads must be a positive integer"),
    "divisible": (dict(num_heads=3), ValueError, r"embed_dim 4 must be divisible by num_heads 3"),
    "dropout": (dict(dropout=-0.1), ValueError, r"dropout must be a probability in \[0, 1\]"),
    "kdim": (dict(kdim=0), ValueError, r"kdim must be a positive integer"),
    "vdim": (dict(vdim=2.5), ValueError, r"vdim must be a positive integer"),
    "bias": (dict(bias="yes"), TypeError, r"bias must be True or False"),
    "dtype": (dict(dtype="int32"), TypeError, r"dtype must be a real floating dtype"),
    "seed": (dict(seed=1.5), TypeError, r"seed must be an int seed or a numpy.random.Generator"),
    "like": (dict(like=[1.0]), TypeError, r"like must be an array"),
}


@pytest.mark.parametrize("name", list(CONSTRUCTOR_ERRORS))
def test_constructor_errors(name):
    changes, exc, pattern = CONSTRUCTOR_ERRORS[name]
    with pytest.raises(exc, match=pattern):
        refattn.MultiheadAttention(**{"embed_dim": 4, "num_heads": 2, **changes})


def test_train_mode_must_be_bool():
    with pytest.raises(TypeError, match=r"mode must be True or False"):
        refattn.MultiheadAttention(4, 2).train(1)


def test_parameters_and_inputs_from_two_libraries():
    mha = refattn.MultiheadAttention(4, 2)
    x = torch.zeros(3, 2, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"query is a torch array but in_proj_weight is a numpy"):
        mha(x, x, x)


def test_xp_must_match_the_inputs():
    import array_api_strict

    kwargs = _good_functional_args()
    out, _ = refattn.multi_head_attention_forward(**kwargs, xp=np)
    assert isinstance(out, np.ndarray)
    with pytest.raises(TypeError, match=r"xp is the array_api_strict namespace but query is a "
                                        r"numpy array"):
        refattn.multi_head_attention_forward(**kwargs, xp=array_api_strict)
    mha = refattn.MultiheadAttention(4, 2)
    x = kwargs["query"]
    np.testing.assert_array_equal(mha(x, x, x, xp=np)[0], mha(x, x, x)[0])
    with pytest.raises(TypeError, match=r"xp is the torch namespace"):
        mha(x, x, x, xp=torch)


def test_to_torch_device_argument():
    mha = refattn.MultiheadAttention(4, 2, xp=torch)
    tmod = mha.to_torch(device="cpu")
    assert tmod.in_proj_weight.device.type == "cpu"
    assert torch.equal(tmod.in_proj_weight.detach(), mha.in_proj_weight)
