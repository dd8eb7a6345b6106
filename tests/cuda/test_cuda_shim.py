"""The CPU shim runs CUDA C++ as a GPU would, and reports what a GPU would get wrong.

Each kernel below is tiny and checks one piece of CUDA semantics against a NumPy model
of it (indices, shuffles, votes, barriers, shared memory, atomics), or one misuse that
the shim must report instead of hanging or silently computing garbage.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from refattn._cuda_shim import (
    MAX_DYNAMIC_SMEM,
    ArgumentError,
    CompileError,
    LaunchConfigError,
    SanitizerError,
    ShimError,
    ShimModule,
    SyncError,
    TrapError,
    build,
)

pytestmark = pytest.mark.usefixtures("gxx")

FULL = 0xFFFFFFFF

SOURCE = r"""
extern __shared__ float dyn[];

extern "C" __global__ void indices(int* out) {
    const int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    int* o = out + (b * (blockDim.x * blockDim.y * blockDim.z) + t) * 12;
    o[0] = threadIdx.x; o[1] = threadIdx.y; o[2] = threadIdx.z;
    o[3] = blockIdx.x; o[4] = blockIdx.y; o[5] = blockIdx.z;
    o[6] = blockDim.x; o[7] = blockDim.y; o[8] = blockDim.z;
    o[9] = gridDim.x; o[10] = gridDim.y; o[11] = gridDim.z;
}

template <typename T>
__device__ void shuffle_all(const T* x, T* out, int arg, int width) {
    const int lane = threadIdx.x;
    const T v = x[lane];
    out[0 * 32 + lane] = __shfl_sync(0xffffffffu, v, arg, width);
    out[1 * 32 + lane] = __shfl_up_sync(0xffffffffu, v, (unsigned)arg, width);
    out[2 * 32 + lane] = __shfl_down_sync(0xffffffffu, v, (unsigned)arg, width);
    out[3 * 32 + lane] = __shfl_xor_sync(0xffffffffu, v, arg, width);
}
extern "C" __global__ void shuffles_f32(const float* x, float* out, int arg, int width) {
    shuffle_all(x, out, arg, width);
}
extern "C" __global__ void shuffles_f64(const double* x, double* out, int arg, int width) {
    shuffle_all(x, out, arg, width);
}

// Warps are formed from the linear thread index, whatever the block's shape.
extern "C" __global__ void warp_of_3d_block(int* out) {
    const int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    out[t] = __shfl_xor_sync(0xffffffffu, t, 1);
}

extern "C" __global__ void votes(const int* pred, unsigned int* out) {
    const int p = pred[threadIdx.x];
    out[threadIdx.x * 3 + 0] = __ballot_sync(0xffffffffu, p);
    out[threadIdx.x * 3 + 1] = __any_sync(0xffffffffu, p);
    out[threadIdx.x * 3 + 2] = __all_sync(0xffffffffu, p);
}

// Only the lower half-warp takes part, with a mask that says so.
extern "C" __global__ void half_warp(const int* x, int* out) {
    const int lane = threadIdx.x;
    if (lane < 16) {
        out[lane] = __shfl_down_sync(0x0000ffffu, x[lane], 1, 16);
        __syncwarp(0x0000ffffu);
    } else {
        out[lane] = -1;
    }
}

// Votes and __syncwarp count only the lanes of the mask that have not exited.
extern "C" __global__ void votes_after_exit(const int* pred, unsigned int* out) {
    if (threadIdx.x % 32 >= 20) return;
    __syncwarp();
    out[threadIdx.x] = __ballot_sync(0xffffffffu, pred[threadIdx.x]);
    out[64 + threadIdx.x] = __all_sync(0xffffffffu, pred[threadIdx.x]);
}

extern "C" __global__ void block_votes(const int* pred, int* out) {
    const int p = pred[blockIdx.x * blockDim.x + threadIdx.x];
    const int c = __syncthreads_count(p);
    const int a = __syncthreads_and(p);
    const int o = __syncthreads_or(p);
    if (threadIdx.x == 0) {
        out[blockIdx.x * 3 + 0] = c;
        out[blockIdx.x * 3 + 1] = a;
        out[blockIdx.x * 3 + 2] = o;
    }
}

extern "C" __global__ void reverse_static(const float* x, float* y) {
    __shared__ float tile[1024];
    const int i = threadIdx.x;
    const int base = blockIdx.x * blockDim.x;
    tile[i] = x[base + i];
    __syncthreads();
    y[base + i] = tile[blockDim.x - 1 - i];
}

extern "C" __global__ void reverse_dynamic(const float* x, float* y) {
    const int i = threadIdx.x;
    const int base = blockIdx.x * blockDim.x;
    dyn[i] = x[base + i];
    __syncthreads();
    y[base + i] = dyn[blockDim.x - 1 - i];
}

// The same without the barrier: each thread may read a slot before its owner wrote it.
extern "C" __global__ void reverse_racy(const float* x, float* y) {
    const int i = threadIdx.x;
    const int base = blockIdx.x * blockDim.x;
    dyn[i] = x[base + i];
    y[base + i] = dyn[blockDim.x - 1 - i];
}

extern "C" __global__ void read_dynamic(float* out, int n) {
    if (threadIdx.x == 0) {
        for (int i = 0; i < n; ++i) out[i] = dyn[i];
    }
}

extern "C" __global__ void histogram(const int* x, int n, int* bins, float* fsum,
                                     double* dsum) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        atomicAdd(&bins[x[i]], 1);
        atomicAdd(fsum, 1.0f);
        atomicAdd(dsum, 0.5);
    }
}

extern "C" __global__ void early_exit(int* out) {
    if (threadIdx.x >= 5) return;
    out[threadIdx.x] = 1;
}

extern "C" __global__ void partial_barrier(int* out) {
    if (threadIdx.x >= 5) return;
    __syncthreads();
    out[threadIdx.x] = 1;
}

extern "C" __global__ void divergent_barrier(int* out) {
    if (threadIdx.x & 1) {
        __syncthreads();
        out[threadIdx.x] = 1;
    } else {
        __syncthreads();
        out[threadIdx.x] = 2;
    }
}

extern "C" __global__ void shfl_exited_lane(int* out) {
    if (threadIdx.x == 3) return;
    out[threadIdx.x] = __shfl_sync(0xffffffffu, (int)threadIdx.x, 0);
}

extern "C" __global__ void shfl_missing_lane(int* out) {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (int)threadIdx.x, 1);
}

extern "C" __global__ void shfl_vs_barrier(int* out) {
    if (threadIdx.x == 0) {
        __syncthreads();
    } else {
        out[threadIdx.x] = __shfl_sync(0xffffffffu, 1, 0);
    }
}

extern "C" __global__ void mismatched_ops(int* out) {
    if (threadIdx.x & 1) {
        out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
    } else {
        out[threadIdx.x] = __ballot_sync(0xffffffffu, 1);
    }
}

extern "C" __global__ void mask_without_caller(int* out) {
    out[threadIdx.x] = __shfl_sync(0x1u, (int)threadIdx.x, 0);
}

extern "C" __global__ void bad_width(int* out) {
    out[threadIdx.x] = __shfl_sync(0xffffffffu, (int)threadIdx.x, 0, 12);
}

extern "C" __global__ void shfl_outside_mask(int* out) {
    if (threadIdx.x < 2) out[threadIdx.x] = __shfl_sync(0x3u, (int)threadIdx.x, 5);
}

extern "C" __global__ void trap_kernel(int* out) {
    if (threadIdx.x == 7) __trap();
    out[threadIdx.x] = 1;
}

extern "C" __global__ void typed_args(float* x, const double* y, int n, long long m, double s,
                                      unsigned int u, bool flag, void* any) {
    if (threadIdx.x == 0) {
        x[0] = (float)(y[0] * s + n + m + u + (flag ? 1 : 0));
        ((unsigned char*)any)[0] = 7;
    }
}

extern "C" __global__ void oob_read(const float* x, float* y) {
    y[threadIdx.x] = x[threadIdx.x + 1];
}

extern "C" __global__ void smem_past_launch(float* y, int n) {
    dyn[threadIdx.x] = 1.0f;
    __syncthreads();
    if (threadIdx.x == 0) y[0] = dyn[n];
}

extern "C" __global__ void local_overflow(const int* idx, float* y) {
    float local[8];
    for (int i = 0; i < 8; ++i) local[i] = (float)i;
    y[threadIdx.x] = local[idx[threadIdx.x]];
}
"""


@pytest.fixture(scope="module")
def module() -> ShimModule:
    mod = ShimModule(SOURCE, workers=2)
    mod.compile()
    return mod


def run(module: ShimModule, name: str, grid, block, args, **kw) -> None:
    module.get_function(name)(grid, block, args, **kw)


# ------------------------------------------------------------------ CUDA semantics
def test_thread_and_block_indices(module: ShimModule) -> None:
    grid, block = (3, 2, 2), (4, 3, 2)
    nthreads = int(np.prod(grid) * np.prod(block))
    out = np.full((nthreads, 12), -1, dtype=np.int32)
    run(module, "indices", grid, block, (out,))
    rows = []
    for bz in range(2):
        for by in range(2):
            for bx in range(3):
                for tz in range(2):
                    for ty in range(3):
                        for tx in range(4):
                            rows.append([tx, ty, tz, bx, by, bz, *block, *grid])
    np.testing.assert_array_equal(out, np.array(rows, dtype=np.int32))


def _shuffle_model(x: np.ndarray, arg: int, width: int) -> np.ndarray:
    """CUDA's shuffle semantics, one lane at a time (Programming Guide, warp shuffle)."""
    out = np.empty((4, 32), dtype=x.dtype)
    for lane in range(32):
        seg = lane & ~(width - 1)
        out[0, lane] = x[seg + (arg & (width - 1))]
        out[1, lane] = x[lane - arg] if lane - arg >= seg else x[lane]
        out[2, lane] = x[lane + arg] if lane + arg < seg + width else x[lane]
        src = lane ^ arg
        out[3, lane] = x[src] if src < seg + width else x[lane]
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("arg", "width"), [(0, 32), (1, 32), (5, 32), (16, 32), (3, 8),
                                            (1, 2), (7, 16), (37, 32)])
def test_shuffles_match_cuda_semantics(module: ShimModule, dtype, arg: int, width: int) -> None:
    x = (np.arange(32) * 1.5 + 0.25).astype(dtype)
    out = np.zeros(4 * 32, dtype=dtype)
    name = "shuffles_f32" if dtype == np.float32 else "shuffles_f64"
    run(module, name, (1,), (32,), (x, out, np.int32(arg), np.int32(width)))
    np.testing.assert_array_equal(out.reshape(4, 32), _shuffle_model(x, arg, width))


def test_warps_are_formed_from_the_linear_thread_index(module: ShimModule) -> None:
    out = np.zeros(64, dtype=np.int32)
    run(module, "warp_of_3d_block", (1,), (4, 4, 4), (out,))
    np.testing.assert_array_equal(out, np.arange(64) ^ 1)


def test_votes(module: ShimModule) -> None:
    rng = np.random.default_rng(1)
    pred = (rng.random(64) < 0.5).astype(np.int32)
    pred[32:] = 1  # second warp: all true
    out = np.zeros(64 * 3, dtype=np.uint32)
    run(module, "votes", (1,), (64,), (pred, out))
    out = out.reshape(64, 3)
    for w in range(2):
        bits = sum(int(p) << i for i, p in enumerate(pred[32 * w:32 * w + 32]))
        np.testing.assert_array_equal(out[32 * w:32 * w + 32, 0], bits)
        np.testing.assert_array_equal(out[32 * w:32 * w + 32, 1], int(bits != 0))
        np.testing.assert_array_equal(out[32 * w:32 * w + 32, 2], int(bits == FULL))


@pytest.mark.parametrize("schedule", ["forward", "reverse", "random"])
def test_votes_skip_exited_and_missing_lanes(schedule: str) -> None:
    mod = ShimModule(SOURCE, schedule=schedule, seed=5)
    pred = np.ones(40, dtype=np.int32)
    pred[3] = 0
    out = np.zeros(128, dtype=np.uint32)
    # Block of 40: warp 1 has lanes 0..7 only; in both warps lanes >= 20 exit first.
    mod.get_function("votes_after_exit")((1,), (40,), (pred, out))
    np.testing.assert_array_equal(out[:20], (2**20 - 1) & ~(1 << 3))
    np.testing.assert_array_equal(out[32:40], 2**8 - 1)
    np.testing.assert_array_equal(out[64:84], 0)
    np.testing.assert_array_equal(out[96:104], 1)


def test_half_warp_with_matching_mask(module: ShimModule) -> None:
    x = np.arange(100, 132, dtype=np.int32)
    out = np.zeros(32, dtype=np.int32)
    run(module, "half_warp", (1,), (32,), (x, out))
    expected = np.r_[x[1:16], x[15], np.full(16, -1)]
    np.testing.assert_array_equal(out, expected)


def test_block_votes(module: ShimModule) -> None:
    pred = np.zeros((3, 96), dtype=np.int32)
    pred[1, 17] = 1
    pred[2, :] = 1
    out = np.zeros(9, dtype=np.int32)
    run(module, "block_votes", (3,), (96,), (pred, out))
    np.testing.assert_array_equal(out.reshape(3, 3), [[0, 0, 0], [1, 0, 1], [96, 1, 1]])


@pytest.mark.parametrize("schedule", ["forward", "reverse", "random"])
@pytest.mark.parametrize("kernel", ["reverse_static", "reverse_dynamic"])
def test_shared_memory_is_per_block(kernel: str, schedule: str) -> None:
    mod = ShimModule(SOURCE, schedule=schedule, seed=3, workers=2)
    x = np.arange(5 * 96, dtype=np.float32)
    y = np.zeros_like(x)
    smem = 96 * 4 if kernel == "reverse_dynamic" else 0
    mod.get_function(kernel)((5,), (96,), (x, y), shared_mem=smem)
    np.testing.assert_array_equal(y.reshape(5, 96), x.reshape(5, 96)[:, ::-1])


def test_dynamic_shared_memory_starts_as_nan(module: ShimModule) -> None:
    out = np.zeros(64, dtype=np.float32)
    run(module, "read_dynamic", (1,), (32,), (out, np.int32(64)), shared_mem=256)
    assert np.isnan(out).all()


def test_missing_barrier_shows_as_schedule_dependent_nan() -> None:
    """A race makes results depend on the thread order; the shim lets a test pick it."""
    x = np.arange(64, dtype=np.float32)
    results = {}
    for schedule in ("forward", "reverse"):
        y = np.zeros_like(x)
        ShimModule(SOURCE, schedule=schedule).get_function("reverse_racy")(
            (1,), (64,), (x, y), shared_mem=64 * 4)
        results[schedule] = np.isnan(y)
    # Forward order: threads 0..31 read slots that threads 32..63 have not written yet.
    np.testing.assert_array_equal(results["forward"], np.arange(64) < 32)
    np.testing.assert_array_equal(results["reverse"], np.arange(64) >= 32)
    seeds = {tuple(np.flatnonzero(_racy(seed))) for seed in range(4)}
    assert len(seeds) > 1, "the random schedule should vary with its seed"


def _racy(seed: int) -> np.ndarray:
    x = np.arange(64, dtype=np.float32)
    y = np.zeros_like(x)
    ShimModule(SOURCE, schedule="random", seed=seed).get_function("reverse_racy")(
        (1,), (64,), (x, y), shared_mem=64 * 4)
    return np.isnan(y)


def test_atomics_across_workers() -> None:
    mod = ShimModule(SOURCE, workers=2)
    rng = np.random.default_rng(2)
    x = rng.integers(0, 7, size=1000).astype(np.int32)
    bins = np.zeros(7, dtype=np.int32)
    fsum = np.zeros(1, dtype=np.float32)
    dsum = np.zeros(1, dtype=np.float64)
    mod.get_function("histogram")((8,), (128,), (x, np.int32(x.size), bins, fsum, dsum))
    np.testing.assert_array_equal(bins, np.bincount(x, minlength=7))
    assert fsum[0] == 1000.0 and dsum[0] == 500.0  # exact: small integers and halves


def test_early_exit_without_later_barrier_is_fine(module: ShimModule) -> None:
    out = np.zeros(32, dtype=np.int32)
    run(module, "early_exit", (1,), (32,), (out,))
    np.testing.assert_array_equal(out, np.arange(32) < 5)


def test_ucontext_fallback_gives_the_same_results() -> None:
    """Other architectures than x86-64 switch fibers with ucontext; it must agree."""
    mod = ShimModule(SOURCE, extra_flags=("-DCUSHIM_FORCE_UCONTEXT",))
    x = (np.arange(32) * 1.5).astype(np.float64)
    out = np.zeros(4 * 32)
    mod.get_function("shuffles_f64")((1,), (32,), (x, out, np.int32(3), np.int32(8)))
    np.testing.assert_array_equal(out.reshape(4, 32), _shuffle_model(x, 3, 8))
    with pytest.raises(SyncError, match="partial barrier"):
        mod.get_function("partial_barrier")((1,), (32,), (np.zeros(32, np.int32),))


# ------------------------------------------------------------------ misuse reported
@pytest.mark.parametrize(
    ("kernel", "block", "match"),
    [
        ("partial_barrier", 32, r"partial barrier: __syncthreads\(\) at kernel\.cu:\d+ "
                                r"reached by 5 of 32 threads; the other 27 exited"),
        ("divergent_barrier", 32, r"divergent barrier: .* waits at __syncthreads\(\) at "
                                  r"kernel\.cu:(\d+), while .* waits at __syncthreads\(\) at "
                                  r"kernel\.cu:(?!\1)\d+"),
        ("shfl_exited_lane", 32, r"names lane 3 in its mask, but thread \(3,0,0\) .* has "
                                 r"exited: a shuffle would read undefined values"),
        ("shfl_missing_lane", 40, r"names lane 8 of warp 1 .* does not exist \(the block has "
                                  r"40 threads\)"),
        ("shfl_vs_barrier", 32, r"deadlock: .* waits at __shfl_sync.* for lane 0, while "
                                r"thread \(0,0,0\) .* waits at __syncthreads"),
        ("mismatched_ops", 32, r"mismatched warp operations: .*__ballot_sync.*__shfl_xor_sync"),
        ("mask_without_caller", 32, r"mask 0x00000001 does not name the calling lane (1|31)\b"),
        ("bad_width", 32, r"width 12 is not a power of two"),
        ("shfl_outside_mask", 32, r"reads lane 5, which is not in the mask 0x00000003"),
    ],
)
@pytest.mark.parametrize("schedule", ["forward", "reverse"])
def test_sync_misuse_is_reported(kernel: str, block: int, match: str, schedule: str) -> None:
    mod = ShimModule(SOURCE, schedule=schedule)
    with pytest.raises(SyncError, match=match):
        mod.get_function(kernel)((2,), (block,), (np.zeros(64, dtype=np.int32),))


def test_trap_is_reported(module: ShimModule) -> None:
    with pytest.raises(TrapError, match=r"__trap\(\) at kernel\.cu:\d+ by thread \(7,0,0\)"):
        run(module, "trap_kernel", (1,), (32,), (np.zeros(32, dtype=np.int32),))


def _typed_args() -> list:
    return [np.zeros(1, np.float32), np.full(1, 2.0), np.int32(3), 4, 0.5, np.uint32(5),
            True, np.zeros(4, np.uint8)]


def test_arguments_matching_the_signature_run(module: ShimModule) -> None:
    args = _typed_args()
    run(module, "typed_args", (1,), (1,), tuple(args))
    assert args[0][0] == 2.0 * 0.5 + 3 + 4 + 5 + 1
    assert args[7][0] == 7


@pytest.mark.parametrize(
    ("index", "value", "match"),
    [
        (0, np.zeros(1, np.float64), r"argument 0 .*\(float\*\): got a float64 array"),
        (1, np.zeros(1, np.float32), r"argument 1 .*\(const double\*\): got a float32 array"),
        (2, 3, r"argument 2 .*\(int\): got a Python int, which CuPy passes as long long"),
        (2, np.int64(3), r"argument 2 .*\(int\): got numpy.int64"),
        (3, np.int32(4), r"argument 3 .*\(long long\): got numpy.int32"),
        (4, np.float32(0.5), r"argument 4 .*\(double\): got numpy.float32"),
        (5, 5, r"argument 5 .*\(unsigned int\): got a Python int"),
        (6, 1, r"argument 6 .*\(bool\): got a Python int"),
        (0, np.float32(1), r"argument 0 .*expected an array"),
        (2, np.zeros(1, np.int32), r"argument 2 .*got an array"),
    ],
)
def test_arguments_are_checked_against_the_signature(module: ShimModule, index: int, value,
                                                     match: str) -> None:
    args = _typed_args()
    args[index] = value
    with pytest.raises(ArgumentError, match=match):
        run(module, "typed_args", (1,), (1,), tuple(args))


def test_argument_count_and_read_only_arrays(module: ShimModule) -> None:
    with pytest.raises(ArgumentError, match=r"takes 8 arguments \(float\*, const double\*, int"):
        run(module, "typed_args", (1,), (1,), tuple(_typed_args()[:7]))
    args = _typed_args()
    args[1].flags.writeable = False  # fine: the kernel takes const double*
    run(module, "typed_args", (1,), (1,), tuple(args))
    args[0].flags.writeable = False
    with pytest.raises(ArgumentError, match="read-only"):
        run(module, "typed_args", (1,), (1,), tuple(args))


@pytest.mark.parametrize(
    ("grid", "block", "match"),
    [
        ((1,), (1025,), "block"),
        ((1,), (32, 32, 2), "block"),
        ((1,), (1, 1, 65), "block"),
        ((1,), (0,), "block"),
        ((1, 65536), (32,), "grid"),
        ((0,), (32,), "grid"),
        ((1, 1, 1, 1), (32,), "1 to 3 dimensions"),
    ],
)
def test_launch_configurations_beyond_device_limits(module: ShimModule, grid, block,
                                                    match: str) -> None:
    with pytest.raises(LaunchConfigError, match=match):
        run(module, "early_exit", grid, block, (np.zeros(2048, np.int32),))


def test_dynamic_shared_memory_limits(module: ShimModule) -> None:
    fn = module.get_function("read_dynamic")
    out = np.zeros(16, dtype=np.float32)
    with pytest.raises(LaunchConfigError, match="exceed the device limit of 232448"):
        fn((1,), (32,), (out, np.int32(16)), shared_mem=MAX_DYNAMIC_SMEM + 1)
    with pytest.raises(LaunchConfigError, match="raise that attribute"):
        fn((1,), (32,), (out, np.int32(16)), shared_mem=48 * 1024 + 4)
    with pytest.raises(LaunchConfigError, match="beyond the device limit"):
        fn.max_dynamic_shared_size_bytes = MAX_DYNAMIC_SMEM + 1
    fn.max_dynamic_shared_size_bytes = MAX_DYNAMIC_SMEM
    fn((1,), (32,), (out, np.int32(16)), shared_mem=MAX_DYNAMIC_SMEM)
    assert np.isnan(out).all()


def test_unknown_kernel_name(module: ShimModule) -> None:
    with pytest.raises(ShimError, match="no kernel 'nope'"):
        module.get_function("nope")


def test_compile_errors_carry_gxx_diagnostics() -> None:
    with pytest.raises(CompileError, match="undeclared_thing"):
        ShimModule('extern "C" __global__ void k(int* x) { x[0] = undeclared_thing; }').compile()


def test_two_dynamic_shared_names_are_refused() -> None:
    code = ('extern __shared__ float a[]; extern __shared__ int b[];\n'
            'extern "C" __global__ void k(int* x) { x[0] = 0; }')
    with pytest.raises(CompileError, match="only one name"):
        ShimModule(code).compile()


def test_builds_are_cached_by_content() -> None:
    code = 'extern "C" __global__ void cached(int* x) { x[threadIdx.x] = 3; }'
    first = build(code)
    stamp = os.stat(first.path).st_mtime_ns
    again = build(code)
    assert again.path == first.path and os.stat(again.path).st_mtime_ns == stamp
    other = build(code.replace("= 3", "= 4"))
    assert other.path != first.path


# ------------------------------------------------------------------ AddressSanitizer
@pytest.fixture(scope="module")
def asan_module(asan: None) -> ShimModule:
    mod = ShimModule(SOURCE, sanitize=True)
    mod.compile()
    return mod


def test_sanitized_run_returns_results(asan_module: ShimModule) -> None:
    x = np.arange(2 * 64, dtype=np.float32)
    y = np.zeros_like(x)
    asan_module.get_function("reverse_dynamic")((2,), (64,), (x, y), shared_mem=64 * 4)
    np.testing.assert_array_equal(y.reshape(2, 64), x.reshape(2, 64)[:, ::-1])


def test_asan_catches_a_global_read_past_the_end(asan_module: ShimModule) -> None:
    x = np.zeros(32, dtype=np.float32)
    with pytest.raises(SanitizerError, match="heap-buffer-overflow"):
        asan_module.get_function("oob_read")((1,), (32,), (x, np.zeros(32, np.float32)))
    # The same launch reading in bounds is clean.
    asan_module.get_function("oob_read")((1,), (31,), (x, np.zeros(32, np.float32)))


def test_asan_catches_shared_memory_past_the_launch_size(asan_module: ShimModule) -> None:
    fn = asan_module.get_function("smem_past_launch")
    y = np.zeros(1, dtype=np.float32)
    fn((1,), (32,), (y, np.int32(31)), shared_mem=32 * 4)
    assert y[0] == 1.0
    with pytest.raises(SanitizerError, match="use-after-poison"):
        fn((1,), (32,), (y, np.int32(40)), shared_mem=32 * 4)


def test_asan_catches_a_fiber_stack_overflow(asan_module: ShimModule) -> None:
    idx = np.zeros(32, dtype=np.int32)
    idx[9] = 8
    with pytest.raises(SanitizerError, match="stack-buffer-overflow"):
        asan_module.get_function("local_overflow")((1,), (32,), (idx, np.zeros(32, np.float32)))


def test_sanitized_run_still_reports_sync_misuse(asan_module: ShimModule) -> None:
    with pytest.raises(SyncError, match="partial barrier"):
        asan_module.get_function("partial_barrier")((1,), (32,), (np.zeros(32, np.int32),))


def test_sanitized_run_refuses_aliasing_arrays(asan_module: ShimModule) -> None:
    x = np.zeros(64, dtype=np.float32)
    with pytest.raises(ArgumentError, match="overlap"):
        asan_module.get_function("oob_read")((1,), (8,), (x[:32], x[16:48]))
