"""Fixtures for the CUDA layer's tests: the CPU shim and the gates on its tools.

Tests that need g++ (the shim), AddressSanitizer or NVRTC skip with the reason when
the tool is genuinely absent on a developer's machine. Under CI (``CI`` set) a missing
tool is a failure instead: CI installs all three (the test extra brings the NVRTC wheels,
Debian's g++ brings libasan), so a skip there would hide a broken install.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from refattn._cuda import _modules
from refattn._cuda._nvrtc_gate import nvrtc_available
from refattn._cuda_shim import MAX_DYNAMIC_SMEM, ShimModule, compiler, sanitizer_available


def _missing(reason: str) -> None:
    # A skip on a developer's machine; a failure in CI, where the tool must be present.
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must provide it)")
    pytest.skip(reason)


def cupy_device_available() -> bool:
    """True only where CuPy can run kernels: it imports without a GPU."""
    try:
        import cupy

        return bool(cupy.cuda.is_available())
    except Exception:
        return False


@pytest.fixture(scope="session")
def gxx() -> str:
    """The C++ compiler the shim uses; skips when there is none."""
    path = compiler()
    if path is None:
        _missing("no C++ compiler (g++) for the CPU shim")
    return path


@pytest.fixture(scope="session")
def asan(gxx: str) -> None:
    """Skips unless g++ can build and run AddressSanitizer executables."""
    if not sanitizer_available():
        _missing("g++ cannot build AddressSanitizer executables here (libasan missing)")


@pytest.fixture(scope="session")
def nvrtc() -> None:
    """Skips unless NVRTC loads from the cuda-bindings / nvidia-cuda-nvrtc wheels."""
    if not nvrtc_available():
        _missing("NVRTC wheels missing: pip install -e '.[test]' (cuda-bindings, "
                 "nvidia-cuda-nvrtc)")


@pytest.fixture(scope="session")
def cupy_device() -> object:
    """CuPy, where it can run kernels; skips elsewhere (it imports without a GPU)."""
    if not cupy_device_available():
        pytest.skip("no CUDA device (cupy.cuda.is_available() is false)")
    import cupy

    return cupy


@pytest.fixture(scope="session", autouse=True)
def _shim_cache(shim_build_cache: None) -> None:
    """Every test here keeps its shim builds out of the user's cache (tests/conftest.py)."""


@pytest.fixture
def shim_backend() -> Iterator[Callable[..., None]]:
    """Make ``refattn._cuda`` build its modules with the CPU shim.

    Yields ``install(**shim_options)``; ``max_dynamic_smem`` sets the shared memory
    limit launches are planned against (default: the shim's 227 KiB). The previous
    factory is restored afterwards.
    """
    previous = _modules.set_module_factory(None)

    def install(*, max_dynamic_smem: int = MAX_DYNAMIC_SMEM, **shim_options: object) -> None:
        _modules.set_module_factory(functools.partial(ShimModule, **shim_options),
                                    max_dynamic_smem=max_dynamic_smem)

    try:
        yield install
    finally:
        factory, smem = previous
        _modules.set_module_factory(factory, max_dynamic_smem=smem)


# ------------------------------------------------------------------ attention reference
def reference_attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, *, scale: float, causal: bool, alignment: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Materialised float64 attention: scores -> mask -> softmax -> @ V.

    Returns ``(out, lse, visible)``; a fully masked row has output 0 and LSE -inf.
    """
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    H, K, Kv = q.shape[1], k.shape[1], v.shape[1]
    L, S = q.shape[2], k.shape[2]
    k = np.repeat(k, H // K, axis=1)
    v = np.repeat(v, H // Kv, axis=1)
    scores = scale * (q @ np.swapaxes(k, -1, -2))
    visible = np.ones((L, S), dtype=bool)
    if causal:
        offset = 0 if alignment == "top_left" else S - L
        visible = np.arange(S)[None, :] <= np.arange(L)[:, None] + offset
    scores = np.where(visible, scores, -np.inf)
    m = scores.max(axis=-1, keepdims=True, initial=-np.inf)
    empty = np.isneginf(m)
    p = np.exp(scores - np.where(empty, 0.0, m))
    total = p.sum(axis=-1, keepdims=True)
    out = np.where(empty, 0.0, (p @ v) / np.where(empty, 1.0, total))
    lse = np.where(empty, -np.inf, m + np.log(np.where(empty, 1.0, total)))[..., 0]
    return out, lse, np.broadcast_to(visible, scores.shape)


def error_bounds(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, *, scale: float, visible: np.ndarray,
    lse: np.ndarray, dtype: np.dtype,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-row bounds on |kernel - reference| for the output and the LSE.

    With u the unit roundoff of the kernel's dtype, for row i:

    - each score s_ij = scale * q_i.k_j carries a rounding error of at most
      D_i = (E + 2) u |scale| max_j sum_e |q_ie k_je|  (E products and sums, one scale);
    - perturbing the scores by up to D_i moves each softmax weight by a factor within
      exp(+-2 D_i), so the output, a convex combination of rows of V, moves by at most
      2 D_i max|v|; the LSE by at most D_i;
    - exp(s - m) adds 2u plus u |s - m| (the rounded exponent), i.e. u (2 + R_i) with
      R_i the row's score range, in numerator and denominator alike;
    - the sums over S keys add gamma_S ~ S u, and the rescaling by alpha once per tile
      (T = ceil(S / 32)) and the division add (2 T + 2) u; alpha's own error cancels,
      as it scales numerator and denominator alike.

    The float64 reference obeys the same bound with its own u; the sum of both, doubled
    because the bounds are first-order, is the tolerance. Everything scales with max|v|
    (output) or is absolute (LSE), so no bare constant is involved.
    """
    E, S = q.shape[-1], k.shape[2]
    H, K = q.shape[1], k.shape[1]
    kk = np.repeat(np.abs(np.asarray(k, np.float64)), H // K, axis=1)
    dots = abs(scale) * (np.abs(np.asarray(q, np.float64)) @ np.swapaxes(kk, -1, -2))
    dots = np.where(visible, dots, 0.0)
    a = dots.max(axis=-1, initial=0.0)
    scores_range = 2.0 * a  # |s_ij - m_i| <= |s_ij| + |m_i|
    tiles = -(-S // 32)
    vmax = float(np.abs(v).max(initial=0.0))

    def one(u: float) -> tuple[np.ndarray, np.ndarray]:
        delta = (E + 2) * u * a
        rounding = u * (2 + scores_range) + (S + 2 * tiles + 2) * u
        out_bound = vmax * (2 * delta + 2 * rounding)
        lse_bound = delta + rounding + u * np.abs(np.where(np.isfinite(lse), lse, 0.0))
        return out_bound, lse_bound

    kernel_out, kernel_lse = one(float(np.finfo(dtype).eps) / 2)
    ref_out, ref_lse = one(float(np.finfo(np.float64).eps) / 2)
    return 2 * (kernel_out + ref_out), 2 * (kernel_lse + ref_lse)


def attention_mismatch(
    out: np.ndarray, lse: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray, *,
    scale: float, causal: bool, alignment: str,
) -> str | None:
    """Why the kernel's (out, lse) disagree with the reference, or None when they agree."""
    ref_out, ref_lse, visible = reference_attention(q, k, v, scale=scale, causal=causal,
                                                    alignment=alignment)
    tol_out, tol_lse = error_bounds(q, k, v, scale=scale, visible=visible, lse=ref_lse,
                                    dtype=out.dtype)
    empty = np.isneginf(ref_lse)
    if not np.array_equal(np.isneginf(lse), empty):
        return f"fully masked rows differ: kernel {np.argwhere(np.isneginf(lse)).tolist()}, " \
               f"reference {np.argwhere(empty).tolist()}"
    if np.any(out[empty] != 0):
        return "a fully masked row has a nonzero output"
    err_out = np.abs(out - ref_out)
    bad = ~(err_out <= tol_out[..., None])
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        return f"out{list(i)} = {out[i]!r}, reference {ref_out[i]!r}, " \
               f"tolerance {tol_out[i[:-1]]:.3g} ({int(bad.sum())} elements off)"
    err_lse = np.abs(np.where(empty, 0.0, lse) - np.where(empty, 0.0, ref_lse))
    bad = ~(err_lse <= tol_lse)
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        return f"lse{list(i)} = {lse[i]!r}, reference {ref_lse[i]!r}, " \
               f"tolerance {tol_lse[i]:.3g}"
    return None


@pytest.fixture(scope="session")
def mismatch() -> Callable[..., str | None]:
    """:func:`attention_mismatch`: compare a kernel's (out, lse) with the reference."""
    return attention_mismatch


@pytest.fixture(scope="session")
def reference() -> Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """:func:`reference_attention`, the materialised float64 attention."""
    return reference_attention
