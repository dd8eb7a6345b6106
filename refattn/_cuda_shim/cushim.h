// cushim.h: the CUDA C++ dialect on the CPU.
//
// Included ahead of an unchanged .cu file so that g++ compiles it. Each CUDA thread
// of a block is a fiber; one OS worker runs one block at a time, which is why
// `__shared__` can be `thread_local`. The synchronising intrinsics park the calling
// fiber; the scheduler in cushim_runtime.cpp releases it once every participant has
// arrived and reports misuse (partial or divergent barriers, shuffle masks naming
// missing lanes) instead of hanging.
//
// Everything here has internal linkage or hidden visibility (see cushim_core.h).
#pragma once

#include <cmath>
#include <cstdio>

#include "cushim_core.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// A block-scope `thread_local` is static, like `__shared__`; `extern __shared__ T x[];`
// becomes an extern thread_local array that the generated wrapper defines, one per OS
// worker, refilled with NaN bytes before each block.
#define __shared__ thread_local

#define threadIdx (::cushim::tl_thread->tid)
#define blockIdx (::cushim::tl_block_idx)
#define blockDim (::cushim::tl_block_dim)
#define gridDim (::cushim::tl_grid_dim)
#define warpSize 32

#define __syncthreads() ((void)::cushim::block_barrier(::cushim::kBarPlain, 1, __FILE__, __LINE__))
#define __syncthreads_count(p) ::cushim::block_barrier(::cushim::kBarCount, (p) ? 1 : 0, __FILE__, __LINE__)
#define __syncthreads_and(p) ::cushim::block_barrier(::cushim::kBarAnd, (p) ? 1 : 0, __FILE__, __LINE__)
#define __syncthreads_or(p) ::cushim::block_barrier(::cushim::kBarOr, (p) ? 1 : 0, __FILE__, __LINE__)
#define __trap() ::cushim::kernel_trap("__trap()", __FILE__, __LINE__)

static inline void __syncwarp(unsigned int mask = 0xffffffffu,
                              const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    (void)::cushim::warp_op(::cushim::kSyncWarp, mask, 0, 0, 0, 32, file, line);
}

template <typename T>
static inline T __shfl_sync(unsigned int mask, T var, int src_lane, int width = 32,
                            const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return ::cushim::from_bits<T>(::cushim::warp_op(::cushim::kShfl, mask,
                                                    ::cushim::to_bits(var), sizeof(T),
                                                    src_lane, width, file, line));
}

template <typename T>
static inline T __shfl_up_sync(unsigned int mask, T var, unsigned int delta, int width = 32,
                               const char* file = __builtin_FILE(),
                               int line = __builtin_LINE()) {
    return ::cushim::from_bits<T>(::cushim::warp_op(::cushim::kShflUp, mask,
                                                    ::cushim::to_bits(var), sizeof(T),
                                                    (int)delta, width, file, line));
}

template <typename T>
static inline T __shfl_down_sync(unsigned int mask, T var, unsigned int delta, int width = 32,
                                 const char* file = __builtin_FILE(),
                                 int line = __builtin_LINE()) {
    return ::cushim::from_bits<T>(::cushim::warp_op(::cushim::kShflDown, mask,
                                                    ::cushim::to_bits(var), sizeof(T),
                                                    (int)delta, width, file, line));
}

template <typename T>
static inline T __shfl_xor_sync(unsigned int mask, T var, int lane_mask, int width = 32,
                                const char* file = __builtin_FILE(),
                                int line = __builtin_LINE()) {
    return ::cushim::from_bits<T>(::cushim::warp_op(::cushim::kShflXor, mask,
                                                    ::cushim::to_bits(var), sizeof(T),
                                                    lane_mask, width, file, line));
}

static inline unsigned int __ballot_sync(unsigned int mask, int pred,
                                         const char* file = __builtin_FILE(),
                                         int line = __builtin_LINE()) {
    return (unsigned int)::cushim::warp_op(::cushim::kBallot, mask, pred ? 1 : 0, 0, 0, 32,
                                           file, line);
}

static inline int __any_sync(unsigned int mask, int pred, const char* file = __builtin_FILE(),
                             int line = __builtin_LINE()) {
    return (int)::cushim::warp_op(::cushim::kAny, mask, pred ? 1 : 0, 0, 0, 32, file, line);
}

static inline int __all_sync(unsigned int mask, int pred, const char* file = __builtin_FILE(),
                             int line = __builtin_LINE()) {
    return (int)::cushim::warp_op(::cushim::kAll, mask, pred ? 1 : 0, 0, 0, 32, file, line);
}

// Fences order memory between threads; fibers of one block share an OS thread, and
// blocks on other workers only meet through atomics, so a compiler+CPU fence suffices.
static inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// Atomics must be real: blocks run on several OS workers at once.
static inline int atomicAdd(int* address, int val) {
    return __atomic_fetch_add(address, val, __ATOMIC_SEQ_CST);
}
static inline unsigned int atomicAdd(unsigned int* address, unsigned int val) {
    return __atomic_fetch_add(address, val, __ATOMIC_SEQ_CST);
}
static inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long val) {
    return __atomic_fetch_add(address, val, __ATOMIC_SEQ_CST);
}
static inline float atomicAdd(float* address, float val) {
    float old = *reinterpret_cast<volatile float*>(address);
    for (;;) {
        float desired = old + val;
        if (__atomic_compare_exchange(address, &old, &desired, false, __ATOMIC_SEQ_CST,
                                      __ATOMIC_SEQ_CST)) {
            return old;
        }
    }
}
static inline double atomicAdd(double* address, double val) {
    double old = *reinterpret_cast<volatile double*>(address);
    for (;;) {
        double desired = old + val;
        if (__atomic_compare_exchange(address, &old, &desired, false, __ATOMIC_SEQ_CST,
                                      __ATOMIC_SEQ_CST)) {
            return old;
        }
    }
}
static inline int atomicMax(int* address, int val) {
    int old = __atomic_load_n(address, __ATOMIC_SEQ_CST);
    while (old < val && !__atomic_compare_exchange_n(address, &old, val, false,
                                                     __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    }
    return old;
}
static inline int atomicMin(int* address, int val) {
    int old = __atomic_load_n(address, __ATOMIC_SEQ_CST);
    while (old > val && !__atomic_compare_exchange_n(address, &old, val, false,
                                                     __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    }
    return old;
}
static inline int atomicExch(int* address, int val) {
    return __atomic_exchange_n(address, val, __ATOMIC_SEQ_CST);
}
static inline int atomicCAS(int* address, int compare, int val) {
    __atomic_compare_exchange_n(address, &compare, val, false, __ATOMIC_SEQ_CST,
                                __ATOMIC_SEQ_CST);
    return compare;
}

// Device math that CUDA provides without headers and <cmath> lacks.
using std::isfinite;
using std::isinf;
using std::isnan;

static inline float __int_as_float(int x) { return ::cushim::from_bits<float>((std::uint32_t)x); }
static inline int __float_as_int(float x) { return (int)(std::uint32_t)::cushim::to_bits(x); }
static inline float __uint_as_float(unsigned int x) { return ::cushim::from_bits<float>(x); }
static inline unsigned int __float_as_uint(float x) {
    return (unsigned int)::cushim::to_bits(x);
}
static inline double __longlong_as_double(long long x) {
    return ::cushim::from_bits<double>((std::uint64_t)x);
}
static inline long long __double_as_longlong(double x) {
    return (long long)::cushim::to_bits(x);
}
static inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
static inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
// The fast-math intrinsics are approximations on the GPU; exact results here lie within
// their documented error, so a test that passes on the GPU's error budget passes here.
// Macros, because glibc already declares functions of these names.
#define __expf(x) expf(x)
#define __logf(x) logf(x)
static inline float __fdividef(float a, float b) { return a / b; }
static inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
static inline int __popc(unsigned int x) { return __builtin_popcount(x); }
static inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
static inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned int)x); }
static inline int __ffs(int x) { return __builtin_ffs(x); }

static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
static inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
static inline long long max(long long a, long long b) { return a > b ? a : b; }
static inline float min(float a, float b) { return std::fmin(a, b); }
static inline float max(float a, float b) { return std::fmax(a, b); }
static inline double min(double a, double b) { return std::fmin(a, b); }
static inline double max(double a, double b) { return std::fmax(a, b); }
