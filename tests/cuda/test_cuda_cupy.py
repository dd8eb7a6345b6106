"""The kernels on a real GPU through CuPy: launch, dtype dispatch, module cache.

Gated on ``cupy.cuda.is_available()`` (CuPy imports without a GPU), so these skip on
machines without one, CI included; the CPU shim covers the kernel logic there.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from refattn._cuda import _launch, _modules, flash_forward
from refattn._cuda_shim import ShimModule

pytestmark = pytest.mark.cuda


@pytest.fixture
def cupy_modules(cupy_device) -> Iterator[object]:
    """The default factory (``cupy.RawModule``), whatever a previous test installed."""
    factory, smem = _modules.set_module_factory(None)
    try:
        yield cupy_device
    finally:
        _modules.set_module_factory(factory, max_dynamic_smem=smem)


def _inputs(shape, dtype, seed=0):
    B, H, K, Kv, L, S, E, Ev = shape
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, H, L, E)).astype(dtype),
            rng.standard_normal((B, K, S, E)).astype(dtype),
            rng.standard_normal((B, Kv, S, Ev)).astype(dtype))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(("causal", "alignment"),
                         [(False, "top_left"), (True, "top_left"), (True, "bottom_right")])
@pytest.mark.parametrize("shape", [
    (2, 4, 2, 1, 33, 70, 64, 64),
    (1, 2, 2, 2, 70, 5, 64, 40),
    (1, 3, 1, 3, 300, 257, 128, 128),
    (1, 2, 1, 1, 17, 40, 256, 256),  # over 48 KiB of shared memory: the opt-in path
], ids=lambda s: "x".join(map(str, s)))
def test_gpu_matches_reference(cupy_modules, mismatch, shape, causal, alignment,
                               dtype) -> None:
    cupy = cupy_modules
    q, k, v = _inputs(shape, dtype)
    scale = 1 / np.sqrt(shape[6])
    out, lse = flash_forward(cupy.asarray(q), cupy.asarray(k), cupy.asarray(v), scale=scale,
                             causal=causal, alignment=alignment, compute_dtype=dtype,
                             need_lse=True)
    assert isinstance(out, cupy.ndarray) and out.dtype == np.dtype(dtype)
    problem = mismatch(cupy.asnumpy(out), cupy.asnumpy(lse), q, k, v, scale=scale,
                       causal=causal, alignment=alignment)
    assert problem is None, problem


def test_gpu_and_shim_agree(cupy_modules, gxx, mismatch) -> None:
    """Same source, two executions: each within the reference's bound, so of each other."""
    cupy = cupy_modules
    q, k, v = _inputs((1, 2, 1, 2, 33, 70, 16, 24), "float64", seed=4)
    gpu_out, gpu_lse = flash_forward(cupy.asarray(q), cupy.asarray(k), cupy.asarray(v),
                                     scale=0.25, causal=True, alignment="bottom_right",
                                     compute_dtype="float64", need_lse=True)
    with _modules.module_factory(ShimModule, max_dynamic_smem=232448):
        cpu_out, cpu_lse = flash_forward(q, k, v, scale=0.25, causal=True,
                                         alignment="bottom_right", compute_dtype="float64",
                                         need_lse=True)
    for out, lse in ((cupy.asnumpy(gpu_out), cupy.asnumpy(gpu_lse)), (cpu_out, cpu_lse)):
        problem = mismatch(out, lse, q, k, v, scale=0.25, causal=True,
                           alignment="bottom_right")
        assert problem is None, problem
    np.testing.assert_array_equal(np.isneginf(cupy.asnumpy(gpu_lse)), np.isneginf(cpu_lse))


def test_every_instantiation_loads_on_the_device(cupy_modules) -> None:
    cupy = cupy_modules
    module = _modules.get_module("flash_fwd.cu")
    assert isinstance(module, cupy.RawModule)
    assert _modules.get_module("flash_fwd.cu") is module
    for cfg in _launch.all_flash_configs():
        kernel = module.get_function(cfg.name_expression)
        assert kernel.num_regs > 0 and kernel.local_size_bytes == 0, cfg


def test_shared_memory_limit_comes_from_the_device(cupy_modules) -> None:
    cupy = cupy_modules
    expected = cupy.cuda.Device().attributes["MaxSharedMemoryPerBlockOptin"]
    assert _modules.max_dynamic_shared_memory() == expected >= 48 * 1024


def test_empty_and_fully_masked_on_gpu(cupy_modules) -> None:
    cupy = cupy_modules
    q, k, v = _inputs((1, 1, 1, 1, 9, 0, 16, 8), "float32")
    out, lse = flash_forward(cupy.asarray(q), cupy.asarray(k), cupy.asarray(v), scale=0.5,
                             causal=False, alignment="top_left", compute_dtype="float32",
                             need_lse=True)
    assert float(cupy.abs(out).max()) == 0.0
    assert bool(cupy.isneginf(lse).all())


# ------------------------------------------------------------------ every option, on CuPy
import refattn  # noqa: E402
from tests.helpers.cuda_bounds import (  # noqa: E402
    Problem,
    backward_tolerance,
    forward_tolerance,
    mismatch,
)


def _gpu_problem(name: str, dtype: str) -> Problem:
    """Larger than the shim's cases: many key tiles, every bucket's neighbourhood."""
    rng = np.random.default_rng(GPU_CASES.index(name))
    f = lambda *s: rng.standard_normal(s).astype(dtype).astype(np.float64)  # noqa: E731
    if name == "causal gqa":
        return Problem(f(2, 8, 300, 64), f(2, 2, 257, 64), f(2, 2, 257, 64), 0.125,
                       dict(causal=True, alignment="bottom_right"))
    if name == "mask bias dropout":
        L, S = 130, 200
        return Problem(f(2, 4, L, 128), f(2, 4, S, 128), f(2, 4, S, 96), 128 ** -0.5,
                       dict(mask=rng.random((2, 1, 1, S)) < 0.9, bias=f(4, L, S),
                            dropout_p=0.2, dropout_mask=rng.random((2, 4, L, S)) >= 0.2))
    if name == "window softcap":
        return Problem(f(1, 6, 256, 256), f(1, 3, 256, 256), f(1, 2, 256, 256), 0.0625,
                       dict(window=(40, 8), softcap=8.0, masked_rows="uniform"))
    if name == "nan rows":
        return Problem(f(1, 2, 100, 32), f(1, 1, 60, 32), f(1, 1, 60, 16), 0.2,
                       dict(causal=True, alignment="bottom_right", masked_rows="nan"))
    raise KeyError(name)


GPU_CASES = ["causal gqa", "mask bias dropout", "window softcap", "nan rows"]


def _to_gpu(cupy, prob: Problem, dtype: str):
    conv = lambda x: cupy.asarray(x.astype(dtype))  # noqa: E731
    opts = {k: (cupy.asarray(v) if k in ("mask", "dropout_mask") else
                conv(v) if k == "bias" else v) for k, v in prob.options.items()}
    return conv(prob.q), conv(prob.k), conv(prob.v), opts


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", GPU_CASES)
def test_gpu_kernels_match_the_array_api_path_on_cupy(cupy_modules, name, dtype) -> None:
    """Forward and backward through refattn.attention(implementation="cuda") against the
    same calls with implementation="direct" on the same device, in float64."""
    cupy = cupy_modules
    prob = _gpu_problem(name, dtype)
    q, k, v, opts = _to_gpu(cupy, prob, dtype)
    q64, k64, v64, opts64 = _to_gpu(cupy, prob, "float64")
    got = refattn.attention(q, k, v, scale=prob.scale, implementation="cuda",
                            compute_dtype=dtype, return_lse=True, **opts)
    ref = refattn.attention(q64, k64, v64, scale=prob.scale, implementation="direct",
                            return_lse=True, **opts64)
    tol_out, tol_lse = forward_tolerance(prob, dtype)
    for problem in (mismatch("out", cupy.asnumpy(got.out), cupy.asnumpy(ref.out), tol_out),
                    mismatch("lse", cupy.asnumpy(got.lse), cupy.asnumpy(ref.lse), tol_lse)):
        assert problem is None, problem

    dout = np.random.default_rng(1).standard_normal(got.out.shape).astype(dtype)
    grads = refattn.attention_backward(cupy.asarray(dout), q, k, v, scale=prob.scale,
                                       implementation="cuda", compute_dtype=dtype, **opts)
    ref_grads = refattn.attention_backward(cupy.asarray(dout.astype(np.float64)), q64, k64,
                                           v64, scale=prob.scale, implementation="direct",
                                           **opts64)
    tols = backward_tolerance(prob, dout.astype(np.float64), dtype)
    for label, g, w, t in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads, tols,
                              strict=True):
        if w is None:
            assert g is None
            continue
        assert isinstance(g, cupy.ndarray) and g.dtype == np.dtype(dtype)
        problem = mismatch(label, cupy.asnumpy(g), cupy.asnumpy(w), t)
        assert problem is None, problem


def test_gpu_backward_is_deterministic(cupy_modules) -> None:
    """No atomics: two runs give the same bits, GQA reductions included."""
    cupy = cupy_modules
    prob = _gpu_problem("causal gqa", "float64")
    q, k, v, opts = _to_gpu(cupy, prob, "float64")
    dout = cupy.asarray(np.random.default_rng(2).standard_normal((2, 8, 300, 64)))
    runs = [refattn.attention_backward(dout, q, k, v, scale=prob.scale, implementation="cuda",
                                       **opts) for _ in range(2)]
    for a, b in zip(*runs, strict=True):
        if a is not None:
            assert bool((a == b).all())


def test_gpu_and_shim_backward_agree(cupy_modules, gxx) -> None:
    """Same source, two executions: each within the reference's bound."""
    from refattn._cuda import flash_attention, flash_attention_backward

    cupy = cupy_modules
    prob = _gpu_problem("nan rows", "float64")
    dout = np.random.default_rng(3).standard_normal((1, 2, 100, 16))
    kw = dict(prob.options, scale=prob.scale, compute_dtype="float64", batch_shape=(1,))

    def grads(xp_arrays):
        q, k, v, do = xp_arrays
        out, lse = flash_attention(q, k, v, need_lse=True, **kw)
        return flash_attention_backward(do, q, k, v, out, lse, **kw)[:3]

    gpu = [cupy.asnumpy(g) for g in grads([cupy.asarray(x) for x in
                                           (prob.q, prob.k, prob.v, dout)])]
    with _modules.module_factory(ShimModule, max_dynamic_smem=232448):
        cpu = grads([prob.q, prob.k, prob.v, dout])
    _, _, ref = prob.reference(dout)
    tols = backward_tolerance(prob, dout, "float64")
    for results in (gpu, cpu):
        for label, g, w, t in zip(("dq", "dk", "dv"), results, ref, tols, strict=True):
            problem = mismatch(label, g, w, t)
            assert problem is None, problem


def test_every_backward_instantiation_loads_on_the_device(cupy_modules) -> None:
    module = _modules.get_module("flash_bwd.cu")
    for kernel in ("flash_bwd_dq", "flash_bwd_dkdv"):
        for cfg in _launch.all_flash_configs(kernel):
            fn = module.get_function(cfg.name_expression)
            assert fn.num_regs > 0 and fn.local_size_bytes == 0, cfg
