"""``refattn.attention`` and ``attention_backward`` route to the fused kernels: the dispatch
glue, run on the CPU shim, which serves NumPy arrays to the kernels
(``serve_numpy_arrays``). Tolerances are the derived bounds of ``tests/helpers/cuda_bounds.py``.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import refattn
from tests.helpers.cuda_bounds import Problem, backward_tolerance, forward_tolerance, mismatch


def _data(seed=0, *, batch=(2,), H=4, K=2, Kv=1, L=7, S=9, E=16, Ev=8):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((*batch, H, L, E))
    k = rng.standard_normal((*batch, K, S, E))
    v = rng.standard_normal((*batch, Kv, S, Ev))
    return rng, q, k, v


def _flat(x, batch_ndim):
    # (*batch, ...) -> (prod(batch), ...), for the bounds' 4-D view.
    return x.reshape(-1, *x.shape[batch_ndim:])


def _check_forward(got, q, k, v, options, scale):
    ref = refattn.attention(q, k, v, scale=scale, implementation="direct", return_lse=True,
                            **options)
    nb = q.ndim - 3
    full = (*q.shape[:-3],)
    prob = Problem(_flat(q, nb), _flat(np.broadcast_to(k, (*full, *k.shape[-3:])), nb),
                   _flat(np.broadcast_to(v, (*full, *v.shape[-3:])), nb), scale,
                   {n: (_flat(np.broadcast_to(x, (*full, *q.shape[-3:-1], k.shape[-2])), nb)
                        if n in ("mask", "bias", "dropout_mask") and x is not None else x)
                    for n, x in options.items()})
    tol_out, tol_lse = forward_tolerance(prob, "float64")
    for problem in (mismatch("out", _flat(got.out, nb), _flat(ref.out, nb), tol_out),
                    mismatch("lse", _flat(got.lse, nb), _flat(ref.lse, nb), tol_lse)):
        assert problem is None, problem


OPTION_SETS = {
    "causal": dict(causal=True, alignment="bottom_right"),
    "mask and bias": dict(mask=np.tril(np.ones((7, 9), bool), 2), bias=np.ones((4, 1, 9))),
    "window": dict(window=(2, 1), alignment="bottom_right"),
    "softcap": dict(softcap=2.0, causal=True),
    "ALiBi": dict(alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625]), causal=True,
                  alignment="bottom_right"),
    "nan rows": dict(mask=np.arange(9) < np.arange(7)[:, None] - 3, masked_rows="nan"),
    "uniform rows": dict(window=(0, 0), alignment="bottom_right", masked_rows="uniform",
                         bias=np.where(np.eye(7, 9, 2, dtype=bool), -np.inf, 0.0)),
}


@pytest.mark.parametrize("implementation", [None, "cuda"])
@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_kernel_serves_supported_options_and_matches_the_direct_path(kernel_calls, name,
                                                                     implementation):
    _, q, k, v = _data()
    options = OPTION_SETS[name]
    got = refattn.attention(q, k, v, return_lse=True, implementation=implementation,
                            scale=0.5, **options)
    assert kernel_calls == ["flash_attention"]
    _check_forward(got, q, k, v, options, 0.5)


def test_dropout_from_a_seed_reaches_the_kernel_and_comes_back(kernel_calls):
    _, q, k, v = _data(1)
    got = refattn.attention(q, k, v, dropout_p=0.3, rng=5, return_lse=True,
                            return_dropout_mask=True, implementation="cuda", scale=0.25)
    assert kernel_calls == ["flash_attention"]
    assert got.dropout_mask.shape == (2, 4, 7, 9) and got.dropout_mask.dtype == bool
    # The same seed draws the same mask on the direct path.
    _check_forward(got, q, k, v, dict(dropout_p=0.3, dropout_mask=got.dropout_mask), 0.25)


def test_mask_mod_reaches_the_kernel_as_a_mask(kernel_calls):
    _, q, k, v = _data(2)

    def band(b, h, i, j):
        return abs(i - j) <= h  # wider for later heads

    got = refattn.attention(q, k, v, mask_mod=band, return_lse=True, implementation="cuda",
                            scale=0.25)
    assert kernel_calls == ["flash_attention"]
    mask = np.abs(np.arange(7)[:, None] - np.arange(9)) <= np.arange(4)[:, None, None]
    _check_forward(got, q, k, v, dict(mask=mask), 0.25)


def test_leading_dims_layout_and_float32_inputs(kernel_calls):
    # Two batch dims, k/v broadcast over the first, BLHD layout, float32 inputs computed
    # in float64 (the default) and cast back.
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 3, 7, 4, 16)).astype(np.float32)  # (B1, B2, L, H, E)
    k = rng.standard_normal((1, 3, 9, 2, 16)).astype(np.float32)
    v = rng.standard_normal((1, 3, 9, 2, 8)).astype(np.float32)
    mask = rng.random((2, 1, 1, 7, 9)) < 0.8  # broadcast along B2 only: expanded on B
    got = refattn.attention(q, k, v, layout="BLHD", mask=mask, return_lse=True,
                            implementation="cuda")
    ref = refattn.attention(q, k, v, layout="BLHD", mask=mask, return_lse=True,
                            implementation="direct")
    assert kernel_calls == ["flash_attention"]
    assert got.out.dtype == np.float32 and got.out.shape == (2, 3, 7, 4, 8)
    # Both are float64 results rounded once to float32: within one float32 ulp of each
    # other's float64 values, i.e. 2 u32 |out| apart at most, plus the float64 bound.
    u32 = np.finfo(np.float32).eps / 2
    tol = 2 * u32 * np.abs(ref.out.astype(np.float64)) + 1e-12
    assert np.all(np.abs(got.out.astype(np.float64) - ref.out) <= tol)


# ------------------------------------------------------------------ backward
@pytest.mark.parametrize("saved", [False, True])
@pytest.mark.parametrize("implementation", [None, "cuda"])
def test_backward_runs_the_kernels(kernel_calls, implementation, saved):
    rng, q, k, v = _data(4, H=6, K=3, Kv=2)
    dout = rng.standard_normal((2, 6, 7, 8))
    options = dict(mask=rng.random((7, 9)) < 0.8, bias=rng.standard_normal((6, 1, 9)),
                   window=(3, None), dropout_p=0.2, dropout_mask=rng.random((2, 6, 7, 9)) > 0.2,
                   masked_rows="uniform", softcap=3.0)
    extra = {}
    if saved:
        fwd = refattn.attention(q, k, v, scale=0.25, return_lse=True, implementation="cuda",
                                **options)
        extra = dict(output=fwd.out, lse=fwd.lse)
        kernel_calls.clear()
    got = refattn.attention_backward(dout, q, k, v, scale=0.25, implementation=implementation,
                                     **options, **extra)
    # The saved output and LSE spare the forward.
    assert kernel_calls == ([] if saved else ["flash_attention"]) + ["flash_attention_backward"]
    ref = refattn.attention_backward(dout, q, k, v, scale=0.25, implementation="direct",
                                     **options)
    tols = backward_tolerance(Problem(q, k, v, 0.25, options), dout, "float64")
    for name, g, w, t in zip(("dq", "dk", "dv", "dbias"), got, ref, tols, strict=True):
        problem = mismatch(name, g, w, t)
        assert problem is None, problem


def test_backward_sums_broadcast_inputs(kernel_calls):
    # k and v broadcast over the batch, a 2-D bias: the kernels' per-batch gradients are
    # summed back to each input's shape.
    rng = np.random.default_rng(5)
    q = rng.standard_normal((3, 2, 6, 8))
    k = rng.standard_normal((2, 10, 8))
    v = rng.standard_normal((1, 1, 10, 4))
    bias = rng.standard_normal((6, 10))
    dout = rng.standard_normal((3, 2, 6, 4))
    got = refattn.attention_backward(dout, q, k, v, bias=bias, causal=True,
                                     implementation="cuda")
    assert kernel_calls == ["flash_attention", "flash_attention_backward"]
    ref = refattn.attention_backward(dout, q, k, v, bias=bias, causal=True,
                                     implementation="direct")
    kb, vb = np.broadcast_to(k, (3, 2, 10, 8)), np.broadcast_to(v, (3, 1, 10, 4))
    tols = backward_tolerance(
        Problem(q, np.ascontiguousarray(kb), np.ascontiguousarray(vb), 8 ** -0.5,
                dict(bias=bias, causal=True)), dout, "float64")
    # The bounds are per batch entry. Summing the 3 entries adds their errors, plus at
    # most 2 u sum |g_b| of rounding per implementation, which each entry's bound (at
    # least 2 u times its magnitude, see _bounds) already exceeds: twice the sum covers.
    tols[1] = 2 * tols[1].sum(axis=0)
    tols[2] = 2 * tols[2].sum(axis=(0, 1), keepdims=True)
    for name, g, w, t in zip(("dq", "dk", "dv", "dbias"), got, ref, tols, strict=True):
        assert g.shape == w.shape
        problem = mismatch(name, g, w, t)
        assert problem is None, problem


# ------------------------------------------------------------------ what the kernels lack
CUDA_LACKS = "implementation='cuda' does not support "
UNSUPPORTED = [
    ({"score_mod": lambda s, b, h, i, j: s * 2.0}, CUDA_LACKS + "score_mod"),
    ({"sinks": np.zeros(2)}, CUDA_LACKS + "sinks"),
    ({"attention_chunk": 2}, CUDA_LACKS + "attention_chunk"),
    ({"qv": np.ones((1, 2, 5, 8))}, CUDA_LACKS + "qv"),
    # The front door refuses this pair before any path is chosen.
    ({"precision": "compensated"},
     "precision='compensated' computes in float64 on the direct path; got "
     "compute_dtype=None, implementation='cuda'"),
]


@pytest.mark.parametrize(("kwargs", "message"), [
    *UNSUPPORTED, ({"return_weights": True}, CUDA_LACKS + "return_weights=True")])
def test_none_falls_back_and_cuda_names_the_option(kernel_calls, kwargs, message):
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((1, 2, 5, 8)) for _ in range(3))
    out = refattn.attention(q, k, v, **kwargs)
    assert kernel_calls == []
    assert (out.out if isinstance(out, tuple) else out).shape == (1, 2, 5, 8)
    with pytest.raises(ValueError, match=re.escape(message)):
        refattn.attention(q, k, v, implementation="cuda", **kwargs)


@pytest.mark.parametrize(("kwargs", "message"), UNSUPPORTED)
def test_backward_falls_back_and_cuda_names_the_option(kernel_calls, kwargs, message):
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((1, 2, 5, 8)) for _ in range(3))
    g = refattn.attention_backward(q, q, k, v, **kwargs)
    assert kernel_calls == [] and g.dq.shape == q.shape
    with pytest.raises(ValueError, match=re.escape(message)):
        refattn.attention_backward(q, q, k, v, implementation="cuda", **kwargs)


def test_launch_problems_fall_back_or_are_named(kernel_calls, shim_backend):
    # A device with too little shared memory for E = Ev = 256 in float64.
    shim_backend(max_dynamic_smem=48 * 1024)
    rng = np.random.default_rng(8)
    q = rng.standard_normal((1, 1, 4, 256))
    assert refattn.attention(q, q, q).shape == (1, 1, 4, 256)
    assert refattn.attention_backward(q, q, q, q).dq.shape == (1, 1, 4, 256)
    for call in (lambda: refattn.attention(q, q, q, implementation="cuda"),
                 lambda: refattn.attention_backward(q, q, q, q, implementation="cuda")):
        with pytest.raises(ValueError, match="implementation='cuda' does not support E=256, "
                                             "Ev=256 in float64 needs .* bytes"):
            call()


def test_cuda_needs_cupy_arrays():
    q = np.ones((1, 2, 3, 4))
    for call in (refattn.attention, lambda *a, **kw: refattn.attention_backward(q, *a, **kw)):
        with pytest.raises(ValueError, match=r"implementation='cuda' runs on CuPy arrays; "
                                             r"got numpy arrays"):
            call(q, q, q, implementation="cuda")


def test_alibi_backward_runs_the_kernels(kernel_calls):
    # ALiBi arrives folded into the bias; with no bias of the user's there is no dbias.
    rng, q, k, v = _data(7)
    dout = rng.standard_normal((2, 4, 7, 8))
    options = dict(alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625]), causal=True,
                   alignment="bottom_right")
    got = refattn.attention_backward(dout, q, k, v, scale=0.25, implementation="cuda",
                                     **options)
    assert kernel_calls == ["flash_attention", "flash_attention_backward"]
    assert got.dbias is None
    ref = refattn.attention_backward(dout, q, k, v, scale=0.25, implementation="direct",
                                     **options)
    alibi = -(options["alibi_slopes"][:, None, None]
              * np.abs(np.arange(7)[:, None] + 2 - np.arange(9)))
    tols = backward_tolerance(Problem(q, k, v, 0.25, dict(bias=alibi, causal=True,
                                                          alignment="bottom_right")),
                              dout, "float64")
    for name, g, w, t in zip(("dq", "dk", "dv"), got[:3], ref[:3], tols[:3], strict=True):
        problem = mismatch(name, g, w, t)
        assert problem is None, problem
