"""The fused forward kernel, run unchanged on the CPU shim through ``flash_forward``.

This is the CuPy code path with its RawModule factory swapped for the shim, so the
launch planning, argument packing and shared-memory opt-in are exercised too. Results
are held against a materialised float64 NumPy reference with tolerances derived from
the dtype and the sizes (see ``error_bounds`` in conftest.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from refattn._cuda import UnsupportedLaunch, _launch, _modules, flash_attention, flash_forward
from refattn._cuda_shim import ShimModule

pytestmark = pytest.mark.usefixtures("gxx")

# (B, H, K, Kv, L, S, E, Ev): GQA with K != Kv, Ev != E, L > S (bottom-right causal then
# masks whole rows), lengths that end mid-tile (keys come in tiles of 32; query tiles
# are 8 or 16 rows), single rows and single keys.
SHAPES = [
    (1, 1, 1, 1, 1, 1, 16, 16),
    (1, 2, 1, 2, 5, 33, 16, 24),
    (2, 4, 2, 1, 33, 70, 64, 64),
    (1, 2, 2, 2, 70, 5, 64, 40),
    (1, 3, 1, 3, 70, 70, 16, 16),
    (1, 1, 1, 1, 33, 1, 64, 16),
]
MASKS = [(False, "top_left"), (True, "top_left"), (True, "bottom_right")]


def make_inputs(shape, dtype, seed: int = 0, spread: float = 1.0):
    B, H, K, Kv, L, S, E, Ev = shape
    rng = np.random.default_rng(seed)
    q = (spread * rng.standard_normal((B, H, L, E))).astype(dtype)
    k = rng.standard_normal((B, K, S, E)).astype(dtype)
    v = rng.standard_normal((B, Kv, S, Ev)).astype(dtype)
    return q, k, v


def run_forward(q, k, v, *, scale, causal, alignment, need_lse=True):
    return flash_forward(q, k, v, scale=scale, causal=causal, alignment=alignment,
                         compute_dtype=q.dtype.name, need_lse=need_lse)


@pytest.mark.parametrize("schedule", ["forward", "reverse", "random"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(("causal", "alignment"), MASKS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shim_backend, mismatch, shape, causal, alignment, dtype,
                           schedule) -> None:
    shim_backend(schedule=schedule, seed=7)
    q, k, v = make_inputs(shape, dtype)
    scale = 1 / np.sqrt(shape[6])
    out, lse = run_forward(q, k, v, scale=scale, causal=causal, alignment=alignment)
    assert out.shape == (*q.shape[:3], v.shape[3]) and out.dtype == q.dtype
    assert lse.shape == q.shape[:3] and lse.dtype == q.dtype
    problem = mismatch(out, lse, q, k, v, scale=scale, causal=causal, alignment=alignment)
    assert problem is None, problem


def test_results_do_not_depend_on_schedule_or_workers(shim_backend) -> None:
    """Each lane's arithmetic order is fixed, so a race-free kernel is bitwise stable."""
    q, k, v = make_inputs((2, 4, 2, 1, 33, 70, 64, 40), "float64", seed=3)
    results = []
    for schedule, workers in [("forward", 1), ("reverse", 2), ("random", 2)]:
        shim_backend(schedule=schedule, seed=11, workers=workers)
        results.append(run_forward(q, k, v, scale=0.3, causal=True, alignment="bottom_right"))
    for out, lse in results[1:]:
        np.testing.assert_array_equal(out, results[0][0])
        np.testing.assert_array_equal(lse, results[0][1])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_large_logits_stay_finite_and_accurate(shim_backend, mismatch, dtype) -> None:
    """Logits of several hundred overflow exp() without the running max subtraction."""
    shim_backend()
    q, k, v = make_inputs((1, 2, 2, 2, 40, 70, 16, 16), dtype, seed=5, spread=60.0)
    out, lse = run_forward(q, k, v, scale=1.0, causal=True, alignment="top_left")
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    assert np.abs(lse).max() > 200
    problem = mismatch(out, lse, q, k, v, scale=1.0, causal=True, alignment="top_left")
    assert problem is None, problem


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(("E", "Ev"), [(256, 256), (256, 8), (8, 256), (0, 16), (16, 0)])
def test_head_dim_extremes(shim_backend, mismatch, dtype, E, Ev) -> None:
    # E = 256 needs more than 48 KiB of shared memory in float32 and float64 alike, so
    # the launch must raise the kernel's shared memory attribute first (the shim, like
    # CUDA, refuses it otherwise). E = 0 makes every score 0; Ev = 0 leaves only the LSE.
    shim_backend()
    q, k, v = make_inputs((1, 2, 1, 1, 17, 40, E, Ev), dtype, seed=1)
    out, lse = run_forward(q, k, v, scale=0.1, causal=True, alignment="bottom_right")
    problem = mismatch(out, lse, q, k, v, scale=0.1, causal=True, alignment="bottom_right")
    assert problem is None, problem


def test_zero_key_length_masks_every_row(shim_backend) -> None:
    shim_backend()
    q, k, v = make_inputs((2, 2, 1, 1, 9, 0, 16, 8), "float64")
    out, lse = run_forward(q, k, v, scale=0.25, causal=False, alignment="top_left")
    np.testing.assert_array_equal(out, np.zeros((2, 2, 9, 8)))
    assert np.isneginf(lse).all()


def test_bottom_right_rows_before_the_keys_are_zero(shim_backend) -> None:
    shim_backend()
    q, k, v = make_inputs((1, 1, 1, 1, 40, 3, 16, 16), "float32")
    out, lse = run_forward(q, k, v, scale=0.25, causal=True, alignment="bottom_right")
    # Query i sees keys j <= i + S - L = i - 37: rows 0..36 see nothing.
    np.testing.assert_array_equal(out[0, 0, :37], 0)
    assert np.isneginf(lse[0, 0, :37]).all() and np.isfinite(lse[0, 0, 37:]).all()


def test_scale_zero_gives_the_mean_of_v(shim_backend) -> None:
    shim_backend()
    q, k, v = make_inputs((1, 1, 1, 1, 6, 50, 16, 16), "float64")
    out, lse = run_forward(q, k, v, scale=0.0, causal=False, alignment="top_left")
    mean = v[0, 0].mean(axis=0)
    # Every weight is exactly 1/S; what is left is the rounding of two sums of 50 terms.
    tol = 4 * 50 * np.finfo(np.float64).eps * np.abs(v).max()
    np.testing.assert_allclose(out[0, 0], np.broadcast_to(mean, (6, 16)), rtol=0, atol=tol)
    np.testing.assert_allclose(lse, np.log(50), rtol=4 * np.finfo(np.float64).eps)


def test_nan_in_a_query_row_stays_in_that_row(shim_backend, mismatch) -> None:
    shim_backend()
    q, k, v = make_inputs((1, 1, 1, 1, 20, 40, 16, 16), "float64")
    q[0, 0, 7, 3] = np.nan
    out, lse = run_forward(q, k, v, scale=0.25, causal=False, alignment="top_left")
    assert np.isnan(out[0, 0, 7]).all() and np.isnan(lse[0, 0, 7])
    rows = np.r_[0:7, 8:20]
    problem = mismatch(out[:, :, rows], lse[:, :, rows], q[:, :, rows], k, v, scale=0.25,
                       causal=False, alignment="top_left")
    assert problem is None, problem


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_leading_dims_broadcast(shim_backend, mismatch, dtype) -> None:
    """flash_attention: batch dims broadcast like matmul, then are flattened for the kernel."""
    shim_backend()
    rng = np.random.default_rng(8)
    q = rng.standard_normal((2, 3, 4, 9, 16)).astype(dtype)  # (2, 3) batch, H = 4
    k = rng.standard_normal((1, 3, 2, 11, 16)).astype(dtype)  # broadcast over dim 0, K = 2
    v = rng.standard_normal((4, 11, 8)).astype(dtype)  # no batch dims, Kv = 4
    out, lse = flash_attention(q, k, v, batch_shape=(2, 3), scale=0.25, causal=True,
                               alignment="bottom_right", compute_dtype=np.dtype(dtype),
                               need_lse=True)
    assert out.shape == (2, 3, 4, 9, 8) and lse.shape == (2, 3, 4, 9)
    kb, vb = np.broadcast_to(k, (2, 3, 2, 11, 16)), np.broadcast_to(v, (2, 3, 4, 11, 8))
    flat = [x.reshape(6, *x.shape[2:]) for x in (q, kb, vb, out)]
    problem = mismatch(flat[3], lse.reshape(6, 4, 9), *flat[:3], scale=0.25, causal=True,
                       alignment="bottom_right")
    assert problem is None, problem


def test_lse_is_optional(shim_backend) -> None:
    shim_backend()
    q, k, v = make_inputs((1, 1, 1, 1, 4, 4, 16, 16), "float32")
    out, lse = run_forward(q, k, v, scale=0.25, causal=False, alignment="top_left",
                           need_lse=False)
    assert lse is None and out.shape == (1, 1, 4, 16)


def test_shared_memory_beyond_the_device_is_unsupported(shim_backend) -> None:
    shim_backend(max_dynamic_smem=48 * 1024)
    q, k, v = make_inputs((1, 1, 1, 1, 4, 4, 256, 256), "float32")
    with pytest.raises(UnsupportedLaunch, match="shared memory"):
        run_forward(q, k, v, scale=0.25, causal=False, alignment="top_left")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_kernel_is_clean_under_address_sanitizer(asan, dtype, mismatch) -> None:
    """Every global and shared memory access stays in bounds, at every tile edge."""
    q, k, v = make_inputs((1, 2, 1, 2, 33, 70, 16, 24), dtype, seed=2)
    name = _launch.flash_config(dtype, 24).name_expression

    def factory(**kwargs):
        # One instantiation keeps the sanitizer build short.
        return ShimModule(kwargs["code"], options=kwargs["options"], name_expressions=[name],
                          sanitize=True, schedule="random", seed=1)

    with _modules.module_factory(factory, max_dynamic_smem=232448):
        for causal, alignment in MASKS:
            out, lse = run_forward(q, k, v, scale=0.25, causal=causal, alignment=alignment)
            problem = mismatch(out, lse, q, k, v, scale=0.25, causal=causal,
                               alignment=alignment)
            assert problem is None, problem


def test_modules_are_built_once_per_factory(shim_backend) -> None:
    calls = []

    def factory(**kwargs):
        calls.append(kwargs["name_expressions"])
        return ShimModule(**kwargs)

    with _modules.module_factory(factory, max_dynamic_smem=232448):
        q, k, v = make_inputs((1, 1, 1, 1, 3, 3, 16, 16), "float64")
        for _ in range(3):
            run_forward(q, k, v, scale=0.5, causal=False, alignment="top_left")
        q32, k32, v32 = (x.astype(np.float32) for x in (q, k, v))
        run_forward(q32, k32, v32, scale=0.5, causal=False, alignment="top_left")
    assert calls == [_modules.name_expressions("flash_fwd.cu")]
