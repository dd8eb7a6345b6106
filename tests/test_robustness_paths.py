"""One semantics on every path: NaN and infinity, the scaling order, empty problems.

Each class is probed on the direct, blocked and compensated paths (the front door with
``implementation=`` / ``precision=`` forced, and the blocked path with small blocks so
that whole key blocks are skipped). Expected values come from torch's math backend in
float64, from exact identities, or from the rule of docs/semantics.rst ("Non-finite
values") applied by hand; never from the code under test.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refattn
from refattn._tolerance import gradient_rounding_bound, rounding_bound
from tests.helpers.paths import blocked_attention, blocked_attention_backward

torch = pytest.importorskip("torch")
F = torch.nn.functional
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

PATHS = {
    "direct": dict(implementation="direct"),
    "blocked": dict(implementation="blocked"),
    "compensated": dict(precision="compensated"),
}


def _torch_math(q, k, v, *, causal=False, mask=None, bias=None, scale=None):
    """torch's math SDPA in float64, the reference of docs/semantics.rst."""
    attn_mask = None
    if mask is not None:
        attn_mask = torch.from_numpy(mask)
    elif bias is not None:
        attn_mask = torch.from_numpy(bias)
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(
            torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v),
            attn_mask=attn_mask, is_causal=causal, scale=scale)
    return out.numpy()


def _same_pattern(actual, desired, bound):
    """NaN where desired is NaN, the same infinities, finite entries within ``bound``."""
    actual, desired = np.asarray(actual), np.asarray(desired)
    assert actual.shape == desired.shape
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(desired))
    np.testing.assert_array_equal(np.isposinf(actual), np.isposinf(desired))
    np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(desired))
    finite = np.isfinite(desired)
    assert np.all(np.abs(actual[finite] - desired[finite]) <= bound)


def _qkv(shape_q, S, Ev=None, seed=0):
    rng = np.random.default_rng(seed)
    *lead, L, E = shape_q
    q = rng.standard_normal(shape_q)
    k = rng.standard_normal((*lead, S, E))
    v = rng.standard_normal((*lead, S, E if Ev is None else Ev))
    return q, k, v


# --- empty problems ---------------------------------------------------------------------

_SIZES = dict(B=2, H=2, L=6, S=5, E=4, Ev=3)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("axis", list(_SIZES))
@pytest.mark.parametrize("causal", [False, True])
def test_every_zero_size_axis(path, axis, causal):
    sizes = dict(_SIZES, **{axis: 0})
    B, H, L, S, E, Ev = (sizes[a] for a in ("B", "H", "L", "S", "E", "Ev"))
    q, k, v = _qkv((B, H, L, E), S, Ev)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = refattn.attention(q, k, v, causal=causal, return_lse=True,
                                return_weights=True, **PATHS[path])
        grads = refattn.attention_backward(np.ones((B, H, L, Ev)), q, k, v, causal=causal,
                                           **PATHS[path])
    assert res.out.shape == (B, H, L, Ev)
    assert res.lse.shape == (B, H, L) and res.weights.shape == (B, H, L, S)
    if S == 0:
        # docs/semantics.rst: an empty S gives rows of zeros (nothing to attend), and
        # an LSE of -inf (the log of an empty sum).
        np.testing.assert_array_equal(res.out, 0.0)
        np.testing.assert_array_equal(res.lse, -np.inf)
    else:
        expected = _torch_math(q, k, v, causal=causal)
        _same_pattern(res.out, expected, rounding_bound(q, k, v, scale=E ** -0.5 if E else 1))
    assert (grads.dq.shape, grads.dk.shape, grads.dv.shape) == (q.shape, k.shape, v.shape)
    if S == 0 or L == 0:
        # The output does not depend on the inputs at all: zero gradients.
        for g in (grads.dq, grads.dk, grads.dv):
            np.testing.assert_array_equal(g, 0.0)


# --- the scaling order ------------------------------------------------------------------


@pytest.mark.parametrize("path", list(PATHS))
def test_scale_applied_before_the_product_cannot_overflow(path):
    # The issue's case: 1e155 * 1e155 overflows, 1e155 * 1e155 * 1e-308 = 1e2 does not.
    q, k, v = _qkv((1, 2, 7, 4), 7, seed=1)
    big = refattn.attention(q * 1e155, k * 1e155, v, scale=1e-308, **PATHS[path])
    expected = _torch_math(q * 1e155, k * 1e155, v, scale=1e-308)
    assert np.all(np.isfinite(expected))
    # The inputs to both are the same floats: two float64 evaluations of one problem.
    assert np.max(np.abs(big - expected)) <= rounding_bound(q * 1e155, k * 1e155, v,
                                                              scale=1e-308)


@pytest.mark.parametrize("path", list(PATHS))
def test_power_of_two_scaling_identity(path):
    # attention(q 2^512, k 2^512, scale 2^-1022) is attention(q, k, scale 4): every
    # scaling is by a power of two, so the two problems are the same real numbers, and
    # (scale q) k^T forms the same floats for both (q 2^-510 against k 2^512 is q 4
    # against k, exponent for exponent).
    q, k, v = _qkv((2, 2, 9, 5), 11, seed=2)
    g = np.random.default_rng(3).standard_normal((2, 2, 9, 5))
    up = 2.0 ** 512
    big = refattn.attention(q * up, k * up, v, scale=2.0 ** -1022, **PATHS[path])
    small = refattn.attention(q, k, v, scale=4.0, **PATHS[path])
    gbig = refattn.attention_backward(g, q * up, k * up, v, scale=2.0 ** -1022, **PATHS[path])
    gsmall = refattn.attention_backward(g, q, k, v, scale=4.0, **PATHS[path])
    bound = rounding_bound(q, k, v, scale=4.0)
    gb = gradient_rounding_bound(q, k, v, g, scale=4.0)
    assert np.max(np.abs(big - small)) <= bound
    # dQ = scale dS K and dK = scale dS^T Q carry the inverse power of two.
    assert np.max(np.abs(gbig.dq * up - gsmall.dq)) <= gb["dq"]
    assert np.max(np.abs(gbig.dk * up - gsmall.dk)) <= gb["dk"]
    assert np.max(np.abs(gbig.dv - gsmall.dv)) <= gb["dv"]
    if path == "direct":
        # The same floats, the same arithmetic: the same bits.
        np.testing.assert_array_equal(big, small)
        np.testing.assert_array_equal(gbig.dq * up, gsmall.dq)


# --- NaN and infinity -------------------------------------------------------------------


def _run_all(q, k, v, **options):
    """The output on every path (the blocked one also with small blocks, so that whole
    key blocks are skipped), with the weights and LSE of the array-API paths."""
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for name, path in PATHS.items():
            results[name] = refattn.attention(q, k, v, return_lse=True, return_weights=True,
                                              **path, **options)
        mask, bias = options.get("mask"), options.get("bias")
        results["blocked-small"] = blocked_attention(
            q, k, v, scale=q.shape[-1] ** -0.5, allowed=mask, bias=bias,
            causal=options.get("causal", False), return_weights=True, block_l=3, block_s=4,
            xp=np)
    return results


def _check_all(q, k, v, **options):
    results = _run_all(q, k, v, **options)
    expected = _torch_math(q, k, v, causal=options.get("causal", False),
                           mask=options.get("mask"), bias=options.get("bias"))
    finite = [np.where(np.isfinite(x), x, 0.0) for x in (q, k, v)]
    bound = rounding_bound(*finite, scale=q.shape[-1] ** -0.5)
    direct = results["direct"]
    for name, res in results.items():
        _same_pattern(res.out, expected, bound)
        # The LSE and the weights follow the direct path's (torch returns neither).
        np.testing.assert_array_equal(np.isnan(res.lse), np.isnan(direct.lse), err_msg=name)
        np.testing.assert_array_equal(np.isnan(res.weights), np.isnan(direct.weights),
                                      err_msg=name)


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("masking", ["causal", "mask", None])
def test_a_non_finite_input_entry(where, value, masking):
    # One non-finite entry, at a key some rows may not see (key 5 of 12, causal): the
    # rows that cannot see it are affected exactly as on torch's math backend.
    q, k, v = _qkv((1, 2, 12, 4), 12, seed=4)
    {"q": q, "k": k, "v": v}[where][0, 1, 5, 2] = value
    options = {}
    if masking == "causal":
        options["causal"] = True
    elif masking == "mask":
        options["mask"] = np.random.default_rng(5).random((12, 12)) < 0.5
    _check_all(q, k, v, **options)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("at", [(2, 9), (9, 2)])  # above and below the diagonal
def test_a_non_finite_bias_entry(value, at):
    q, k, v = _qkv((1, 1, 12, 4), 12, seed=6)
    bias = np.where(np.tril(np.ones((12, 12), bool)), 0.0, -np.inf)
    bias[at] = value
    _check_all(q, k, v, bias=bias)


def test_the_issue_examples():
    # A NaN in k at key 30 of 40, causal: torch's math backend makes all 40 rows NaN.
    q, k, v = _qkv((1, 1, 40, 8), 40, seed=7)
    k[0, 0, 30, 2] = np.nan
    for name, path in PATHS.items():
        out = refattn.attention(q, k, v, causal=True, **path)
        assert np.all(np.isnan(out).any(axis=-1)), name


@pytest.mark.slow
@pytest.mark.parametrize("where", ["k", "v"])
def test_the_issue_examples_at_the_blocked_default(where):
    # L = S = 1100 takes the blocked path by default; a NaN at key 1000 reaches every row.
    q, k, v = _qkv((1, 1, 1100, 8), 1100, seed=8)
    {"k": k, "v": v}[where][0, 0, 1000, 2] = np.nan
    out = refattn.attention(q, k, v, causal=True)
    expected = _torch_math(q, k, v, causal=True)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
    assert np.isnan(expected).any(axis=-1).all()


@given(
    where=st.sampled_from(["q", "k", "v", "bias"]),
    value=st.sampled_from([math.nan, math.inf, -math.inf]),
    row=st.integers(0, 9), col=st.integers(0, 10), dim=st.integers(0, 2),
    causal=st.booleans(), seed=st.integers(0, 2**16),
)
def test_random_non_finite_placement(where, value, row, col, dim, causal, seed):
    q, k, v = _qkv((1, 2, 10, 3), 11, seed=seed)
    bias = np.random.default_rng(seed + 1).standard_normal((10, 11))
    if where == "bias":
        bias[row, col] = value
    else:
        {"q": q, "k": k, "v": v}[where][0, 1, row if where == "q" else col, dim] = value
    _check_all(q, k, v, bias=bias, causal=causal) if not causal else _check_all(
        q, k, v, bias=np.where(np.tril(np.ones((10, 11), bool)), bias, -np.inf))



# --- NaN and infinity in the backward ---------------------------------------------------
# docs/semantics.rst ("Non-finite values"): the gradients are those of torch's math
# backend by autograd, where every (query, key) pair takes part; a masked pair has weight
# 0 (NaN on a row made NaN), and 0 times a NaN or an infinity is NaN.


def _grads_all(grad_out, q, k, v, **options):
    """The gradients on every path, the blocked one also with small blocks (whole key
    blocks skipped: the causal triangle's, and a random mask's where it hides one)."""
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for name, path in PATHS.items():
            results[name] = refattn.attention_backward(grad_out, q, k, v, **path, **options)
        results["blocked-small"] = blocked_attention_backward(
            grad_out, q, k, v, out=None, lse=None, scale=q.shape[-1] ** -0.5,
            allowed=options.get("mask"), bias=options.get("bias"),
            causal=options.get("causal", False), block_l=3, block_s=4, xp=np)
    return results


def _check_grads(q, k, v, grad_out=None, **options):
    if grad_out is None:
        grad_out = np.random.default_rng(11).standard_normal(q.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = _torch_math_grads(q, k, v, grad_out, causal=options.get("causal", False),
                                     mask=options.get("mask"), bias=options.get("bias"))
    finite = [np.where(np.isfinite(x), x, 0.0) for x in (q, k, v, grad_out)]
    bias = options.get("bias")
    bound = gradient_rounding_bound(
        *finite, scale=q.shape[-1] ** -0.5,
        bias=None if bias is None else np.where(np.isfinite(bias), bias, 0.0),
        bias_shape=None if bias is None else bias.shape)
    for name, grads in _grads_all(grad_out, q, k, v, **options).items():
        for what, got, want in zip(("dq", "dk", "dv", "dbias"), grads, expected,
                                   strict=True):
            if want is not None:
                try:
                    _same_pattern(got, want, bound[what])
                except AssertionError as exc:
                    raise AssertionError(f"{name} {what}") from exc


@pytest.mark.parametrize("where", ["q", "k", "v", "grad_out"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("masking", ["causal", "mask", None])
def test_a_non_finite_entry_in_the_backward(where, value, masking):
    # Key 5 of 12 (query 5 for q and dO), which rows 0..4 may not attend (causal): a NaN
    # query row makes dK and dV of every key NaN, masked keys included; an infinite key
    # entry makes its column of dQ NaN in every row (0 * inf); a non-finite value makes
    # dQ and dK NaN everywhere (through rowsum(dO * O)).
    q, k, v = _qkv((1, 2, 12, 4), 12, seed=12)
    grad_out = np.random.default_rng(13).standard_normal(q.shape)
    {"q": q, "k": k, "v": v, "grad_out": grad_out}[where][0, 1, 5, 2] = value
    options = {}
    if masking == "causal":
        options["causal"] = True
    elif masking == "mask":
        options["mask"] = np.random.default_rng(5).random((12, 12)) < 0.5
    _check_grads(q, k, v, grad_out, **options)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("at", [(2, 9), (9, 2)])  # above and below the diagonal
def test_a_non_finite_bias_entry_in_the_backward(value, at):
    # A NaN or +inf bias entry makes its row's weights NaN at every key: dK and dV of
    # every key, and the whole row of d bias, are NaN; -inf masks.
    q, k, v = _qkv((1, 1, 12, 4), 12, seed=14)
    bias = np.where(np.tril(np.ones((12, 12), bool)), 0.0, -np.inf)
    bias[at] = value
    _check_grads(q, k, v, bias=bias)


@given(
    where=st.sampled_from(["q", "k", "v", "bias"]),
    value=st.sampled_from([math.nan, math.inf, -math.inf]),
    row=st.integers(0, 9), col=st.integers(0, 10), dim=st.integers(0, 2),
    causal=st.booleans(), seed=st.integers(0, 2**16),
)
def test_random_non_finite_placement_in_the_backward(where, value, row, col, dim, causal,
                                                      seed):
    q, k, v = _qkv((1, 2, 10, 3), 11, seed=seed)
    bias = np.random.default_rng(seed + 1).standard_normal((10, 11))
    if causal:
        bias = np.where(np.tril(np.ones((10, 11), bool)), bias, -np.inf)
    if where == "bias":
        bias[row, col] = value
    else:
        {"q": q, "k": k, "v": v}[where][0, 1, row if where == "q" else col, dim] = value
    _check_grads(q, k, v, bias=bias)


# --- the CUDA kernels, run by the CPU shim ----------------------------------------------
# The kernels skip the key blocks a mask hides, so a problem with a NaN or infinity goes
# to the array-API paths (docs/gpu.rst); the shim runs the unchanged kernel sources on
# NumPy arrays, as tests/cuda does, so the routing is exercised without a GPU.


def _torch_math_grads(q, k, v, grad_out, *, causal=False, mask=None, bias=None):
    """dq, dk, dv (and d bias) of torch's math SDPA by autograd in float64."""
    leaves = [torch.from_numpy(x.copy()).requires_grad_() for x in (q, k, v)]
    attn_mask = None if mask is None else torch.from_numpy(mask)
    if bias is not None:
        attn_mask = torch.from_numpy(bias.copy()).requires_grad_()
        leaves.append(attn_mask)
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(*leaves[:3], attn_mask=attn_mask,
                                             is_causal=causal)
    out.backward(torch.from_numpy(grad_out))
    grads = [x.grad.numpy() for x in leaves]
    return (*grads, None) if bias is None else tuple(grads)


# L = S = 70 is three key tiles of the kernels: causal rows 0..31 skip the last two.
_KERNEL_CASES = {
    "nan k at a hidden key": ("k", (0, 0, 66, 2), math.nan),
    "inf k at a hidden key": ("k", (0, 0, 66, 2), math.inf),
    "nan v at a hidden key": ("v", (0, 0, 66, 2), math.nan),
    "-inf v at a hidden key": ("v", (0, 0, 66, 2), -math.inf),
    "nan q": ("q", (0, 1, 5, 0), math.nan),
    "nan bias at a hidden key": ("bias", (3, 60), math.nan),
    "+inf bias at a hidden key": ("bias", (3, 60), math.inf),
}


def _kernel_problem(case):
    where, at, value = _KERNEL_CASES[case]
    q, k, v = _qkv((1, 2, 70, 8), 70, seed=9)
    grad_out = np.random.default_rng(10).standard_normal(q.shape)
    options = dict(causal=True)
    if where == "bias":
        options = dict(bias=np.where(np.tril(np.ones((70, 70), bool)), 0.0, -np.inf))
        options["bias"][at] = value
    else:
        {"q": q, "k": k, "v": v}[where][at] = value
    return q, k, v, grad_out, options


@pytest.mark.parametrize("case", list(_KERNEL_CASES))
def test_kernels_leave_non_finite_inputs_to_the_array_api_paths(kernel_calls, case):
    q, k, v, grad_out, options = _kernel_problem(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = refattn.attention(q, k, v, **options)
        grads = refattn.attention_backward(grad_out, q, k, v, **options)
        expected = _torch_math(q, k, v, **options)
        expected_grads = _torch_math_grads(q, k, v, grad_out, **options)
    assert kernel_calls == []
    finite = [np.where(np.isfinite(x), x, 0.0) for x in (q, k, v)]
    _same_pattern(out, expected, rounding_bound(*finite, scale=8 ** -0.5))
    for got, want in zip(grads, expected_grads, strict=True):
        if want is not None:
            _same_pattern(got, want, np.inf)
    # Asked for by name, the kernels refuse and say why rather than skip the NaN.
    with pytest.raises(ValueError, match="non-finite inputs"):
        refattn.attention(q, k, v, implementation="cuda", **options)
    with pytest.raises(ValueError, match="non-finite inputs"):
        refattn.attention_backward(grad_out, q, k, v, implementation="cuda", **options)


@pytest.mark.parametrize("what", ["grad_out", "output"])
def test_kernels_leave_a_non_finite_saved_gradient_to_the_array_api_paths(kernel_calls,
                                                                           what):
    # dO (and a given output) meet every key in dV = P^T dO and rowsum(dO * O): a NaN
    # in row 3 reaches dV of the keys that row may not attend (0 * NaN), on the
    # direct path as in torch's autograd.
    q, k, v, grad_out, _ = _kernel_problem("nan q")
    q[0, 1, 5, 0] = 0.0
    res = refattn.attention(q, k, v, causal=True, implementation="direct", return_lse=True)
    output = res.out.copy()
    {"grad_out": grad_out, "output": output}[what][0, 0, 3, 1] = math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        grads = refattn.attention_backward(grad_out, q, k, v, causal=True, output=output,
                                           lse=res.lse)
        direct = refattn.attention_backward(grad_out, q, k, v, causal=True, output=output,
                                            lse=res.lse, implementation="direct")
    assert kernel_calls == []
    assert np.isnan(direct.dk[0, 0, 60]).all()
    for got, want in zip(grads[:3], direct[:3], strict=True):
        _same_pattern(got, want, np.inf)
    with pytest.raises(ValueError, match="non-finite inputs"):
        refattn.attention_backward(grad_out, q, k, v, causal=True, output=output,
                                   lse=res.lse, implementation="cuda")


def test_kernels_still_take_finite_problems_and_minus_inf_masks(kernel_calls):
    # The check routes only what it must: -inf in the bias masks, it is no NaN.
    q, k, v, grad_out, options = _kernel_problem("nan bias at a hidden key")
    options["bias"][3, 60] = -math.inf
    refattn.attention(q, k, v, **options)
    refattn.attention_backward(grad_out, q, k, v, **options)
    # The backward, given no output, recomputes it with the forward kernel.
    assert kernel_calls == ["flash_attention", "flash_attention", "flash_attention_backward"]
