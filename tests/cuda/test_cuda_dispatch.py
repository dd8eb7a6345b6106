"""``refattn.attention`` routes to the fused kernel: the dispatch glue, run on the CPU
shim by letting NumPy arrays through to the kernels (``_KERNEL_LIBRARIES``)."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

import refattn

# The module, not the function refattn.attention that shadows it in the package.
attention_module = importlib.import_module("refattn.attention")


@pytest.fixture
def numpy_to_kernels(shim_backend, monkeypatch):
    shim_backend()
    monkeypatch.setattr(attention_module, "_KERNEL_LIBRARIES", frozenset({"numpy"}))
    calls = []
    from refattn import _cuda

    real = _cuda.flash_attention

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(_cuda, "flash_attention", counting)
    return calls


@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize("implementation", [None, "cuda"])
def test_kernel_serves_supported_options_and_matches_the_direct_path(
        numpy_to_kernels, implementation, alignment):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 4, 7, 16))
    k = rng.standard_normal((2, 2, 9, 16))
    v = rng.standard_normal((2, 1, 9, 8))
    got = refattn.attention(q, k, v, causal=True, alignment=alignment, return_lse=True,
                            implementation=implementation)
    ref = refattn.attention(q, k, v, causal=True, alignment=alignment, return_lse=True,
                            implementation="direct")
    assert len(numpy_to_kernels) == 1
    # Online softmax over tiles versus one pass: the rounding bound of two float64
    # evaluations (refattn._tolerance).
    from refattn._tolerance import rounding_bound

    bound = rounding_bound(q, k, v, scale=0.25)
    assert np.abs(got.out - ref.out).max() <= bound
    np.testing.assert_allclose(got.lse, ref.lse, rtol=0, atol=bound)


def test_none_falls_back_for_options_the_kernel_lacks(numpy_to_kernels):
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 2, 5, 8)) for _ in range(3))
    out = refattn.attention(q, k, v, mask=np.tril(np.ones((5, 5), bool)))
    assert out.shape == (1, 2, 5, 8) and numpy_to_kernels == []


@pytest.mark.parametrize("kwargs,named", [
    ({"mask": np.ones((5, 5), bool)}, "mask"),
    ({"window": (2, 0)}, "window"),
    ({"dropout_p": 0.5, "rng": 0}, "dropout_p=0.5"),
    ({"return_weights": True}, "return_weights=True"),
    ({"softcap": 3.0}, "softcap=3.0"),
])
def test_cuda_names_the_option_it_lacks(numpy_to_kernels, kwargs, named):
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((1, 2, 5, 8)) for _ in range(3))
    with pytest.raises(ValueError, match=rf"implementation='cuda' does not support {named}"):
        refattn.attention(q, k, v, implementation="cuda", **kwargs)


def test_cuda_needs_cupy_arrays():
    q = np.ones((1, 2, 3, 4))
    with pytest.raises(ValueError, match=r"implementation='cuda' runs on CuPy arrays; got "
                       r"numpy arrays"):
        refattn.attention(q, q, q, implementation="cuda")
