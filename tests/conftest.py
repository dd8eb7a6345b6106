"""Shared fixtures: the ``xp`` backend fixture and hypothesis profiles.

The suite runs the same tests on NumPy, array-api-strict and torch-CPU tensors (and
on CuPy where a GPU is present) through the ``backend`` fixture, which converts NumPy
test data into the backend's arrays and back.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow],
    derandomize=True, print_blob=True,
)
settings.register_profile(
    "dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile(
    "nightly", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile(
    os.environ.get("REFATTN_HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
)


@pytest.fixture(scope="session")
def shim_build_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep the CPU shim's kernel builds of this session out of the user's cache unless
    one is set (``REFATTN_CUSHIM_CACHE``)."""
    if os.environ.get("REFATTN_CUSHIM_CACHE"):
        yield
        return
    os.environ["REFATTN_CUSHIM_CACHE"] = str(tmp_path_factory.mktemp("cushim"))
    try:
        yield
    finally:
        del os.environ["REFATTN_CUSHIM_CACHE"]


@pytest.fixture
def kernel_calls(shim_build_cache: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """NumPy inputs go to the fused kernels, built and run on the CPU shim; yields the
    list of the kernel entry points that ran (``flash_attention``,
    ``flash_attention_backward``). Without g++ a skip, a failure under CI."""
    from refattn._cuda import _modules, _paths
    from refattn._cuda_shim import ShimModule, compiler, serve_numpy_arrays

    if compiler() is None:
        if os.environ.get("CI"):
            pytest.fail("no C++ compiler (g++) for the CPU shim (CI must provide it)")
        pytest.skip("no C++ compiler (g++) for the CPU shim")
    calls: list[str] = []
    for name in ("flash_attention", "flash_attention_backward"):
        real = getattr(_paths, name)

        def counting(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(_paths, name, counting)
    with _modules.module_factory(ShimModule), serve_numpy_arrays():
        yield calls


def cuda_available() -> bool:
    """True only where CuPy can really run arrays (it imports without a GPU)."""
    try:
        import cupy

        return bool(cupy.cuda.is_available())
    except Exception:
        return False


@dataclass
class Backend:
    """One array library as seen by the tests."""

    name: str
    xp: Any
    asarray: Callable[[np.ndarray], Any]
    to_numpy: Callable[[Any], np.ndarray]


def _numpy_backend() -> Backend:
    import array_api_compat.numpy as xnp

    return Backend("numpy", xnp, lambda a: np.asarray(a), lambda x: np.asarray(x))


def _strict_backend() -> Backend:
    import array_api_strict as xs

    def to_numpy(x: Any) -> np.ndarray:
        return np.asarray(x.__array__()) if hasattr(x, "__array__") else np.from_dlpack(x)

    return Backend("array_api_strict", xs, lambda a: xs.asarray(np.asarray(a)), to_numpy)


def _torch_backend() -> Backend:
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as xt

    return Backend(
        "torch", xt, lambda a: torch.from_numpy(np.array(a, copy=True)),
        lambda x: x.detach().cpu().numpy(),
    )


def _cupy_backend() -> Backend:
    import array_api_compat.cupy as xc
    import cupy

    return Backend("cupy", xc, lambda a: cupy.asarray(a), lambda x: cupy.asnumpy(x))


BACKENDS = {
    "numpy": _numpy_backend,
    "array_api_strict": _strict_backend,
    "torch": _torch_backend,
    "cupy": _cupy_backend,
}


@pytest.fixture(
    scope="session",
    params=[
        "numpy",
        "array_api_strict",
        pytest.param("torch", marks=pytest.mark.torch),
        pytest.param(
            "cupy",
            marks=[
                pytest.mark.cuda,
                pytest.mark.skipif(not cuda_available(), reason="no CUDA device"),
            ],
        ),
    ]
)
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each array library the suite runs on (session-scoped: it holds no state, and
    hypothesis tests may then use it without a function-scoped-fixture warning)."""
    return BACKENDS[request.param]()
