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
