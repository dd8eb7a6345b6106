// Fused attention forward pass: one query tile per block, key/value tiles streamed
// through shared memory, online softmax (running max, running sum, rescaled accumulator).
//
// Shape legend: B batch, H query heads, K key heads, Kv value heads, L query length,
// S key length, E head dim of q/k, Ev head dim of v. All arrays are C-contiguous:
//   q (B, H, L, E), k (B, K, S, E), v (B, Kv, S, Ev), out (B, H, L, Ev), lse (B, H, L).
//
// This file is compiled by NVRTC (through CuPy, and by the compile gate) and by g++
// through the CPU shim, unchanged. NVRTC sees no host headers and does not define
// INFINITY, so nothing here may include a header or rely on <cmath> macros.
//
// Work split: a block owns BLOCK_M = WARPS * ROWS query rows; warp w owns ROWS of them.
// For each key tile of 32 keys, lane j scores key j against each of the warp's rows, the
// warp reduces max and sum with butterfly shuffles (which leave every lane with the
// bit-identical result, so the branches below are warp-uniform), and then the lanes
// split the Ev output columns (lane d owns columns d, d+32, ...) and receive each key's
// probability by a broadcast shuffle. DV_MAX (a multiple of 32, >= Ev) fixes the size of
// the per-lane accumulator so that it stays in registers.

template <typename T>
struct FlashMath;

template <>
struct FlashMath<float> {
    static __device__ __forceinline__ float neg_inf() { return __int_as_float((int)0xff800000u); }
    static __device__ __forceinline__ float exp_(float x) { return expf(x); }
    static __device__ __forceinline__ float log_(float x) { return logf(x); }
};

template <>
struct FlashMath<double> {
    static __device__ __forceinline__ double neg_inf() {
        return __longlong_as_double((long long)0xfff0000000000000ull);
    }
    static __device__ __forceinline__ double exp_(double x) { return exp(x); }
    static __device__ __forceinline__ double log_(double x) { return log(x); }
};

// fmax drops a NaN operand; an oracle must not, or a row of NaN scores would look
// fully masked and come out as zeros instead of NaN.
template <typename T>
__device__ __forceinline__ T flash_max(T a, T b) {
    return (a > b || a != a) ? a : b;
}

template <typename T>
__device__ __forceinline__ T flash_warp_max(T x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        x = flash_max(x, __shfl_xor_sync(0xffffffffu, x, offset));
    }
    return x;
}

template <typename T>
__device__ __forceinline__ T flash_warp_sum(T x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        x += __shfl_xor_sync(0xffffffffu, x, offset);
    }
    return x;
}

template <typename T, int DV_MAX, int WARPS, int ROWS>
__global__ void __launch_bounds__(WARPS * 32)
flash_fwd(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
          T* __restrict__ out, T* __restrict__ lse,
          int H, int group_k, int group_v, int L, int S, int E, int Ev,
          int m_tiles, T scale, int causal, int causal_offset) {
    constexpr int BLOCK_M = WARPS * ROWS;
    constexpr int BLOCK_N = 32;
    constexpr int THREADS = WARPS * 32;
    constexpr int CHUNKS = DV_MAX / 32;

    // One buffer holds the key tile and then the value tile of the same keys: keeping
    // them apart would double the footprint and push fp64 with E = 256 past the
    // 99 KiB that consumer GPUs grant a block.
    extern __shared__ __align__(16) unsigned char flash_smem[];
    // Lane j reads row j of the key tile: an odd row stride (in elements) puts the 32
    // rows in 32 different banks. Query rows are read by a whole warp at once (a
    // broadcast), so only the key/value stride matters.
    const int q_stride = E + 1;
    const int kv_stride = ((E + 1 > Ev) ? (E + 1) : Ev) | 1;
    T* q_tile = reinterpret_cast<T*>(flash_smem);
    T* kv_tile = q_tile + BLOCK_M * q_stride;

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;

    const long long bh = blockIdx.x / m_tiles;
    const int m0 = (int)(blockIdx.x - bh * m_tiles) * BLOCK_M;
    const long long b = bh / H;
    const int h = (int)(bh - b * H);
    const long long key_heads = H / group_k;
    const long long value_heads = H / group_v;

    const T* q_bh = q + bh * L * E;
    const T* k_bh = k + (b * key_heads + h / group_k) * S * E;
    const T* v_bh = v + (b * value_heads + h / group_v) * S * Ev;

    const T NEG_INF = FlashMath<T>::neg_inf();

    for (int i = tid; i < BLOCK_M * E; i += THREADS) {
        const int r = i / E;
        const int e = i - r * E;
        q_tile[r * q_stride + e] = (m0 + r < L) ? q_bh[(long long)(m0 + r) * E + e] : T(0);
    }

    // Key tiles past the causal limit of the block's last row are skipped outright.
    long long n_end = S;
    if (causal) {
        const long long last_row = (m0 + BLOCK_M < L ? m0 + BLOCK_M : L) - 1;
        const long long limit = last_row + causal_offset + 1;
        if (limit < n_end) n_end = limit;
    }

    T m_run[ROWS];
    T l_run[ROWS];
    T acc[ROWS][CHUNKS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        m_run[r] = NEG_INF;
        l_run[r] = T(0);
#pragma unroll
        for (int c = 0; c < CHUNKS; ++c) acc[r][c] = T(0);
    }

    for (int n0 = 0; n0 < n_end; n0 += BLOCK_N) {
        // The previous tile's values must be consumed before its keys are overwritten;
        // on the first pass this publishes the query tile.
        __syncthreads();
        for (int i = tid; i < BLOCK_N * E; i += THREADS) {
            const int r = i / E;
            const int e = i - r * E;
            kv_tile[r * kv_stride + e] =
                (n0 + r < S) ? k_bh[(long long)(n0 + r) * E + e] : T(0);
        }
        __syncthreads();

        const int n = n0 + lane;
        T s[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const int row_local = warp * ROWS + r;
            const T* q_row = q_tile + row_local * q_stride;
            const T* k_row = kv_tile + lane * kv_stride;
            T dot = T(0);
            for (int e = 0; e < E; ++e) dot += q_row[e] * k_row[e];
            const bool visible =
                n < S && (!causal || (long long)n <= (long long)(m0 + row_local) + causal_offset);
            s[r] = visible ? dot * scale : NEG_INF;
        }

        // Every warp is done with the keys before the values replace them.
        __syncthreads();
        for (int i = tid; i < BLOCK_N * Ev; i += THREADS) {
            const int r = i / Ev;
            const int e = i - r * Ev;
            kv_tile[r * kv_stride + e] =
                (n0 + r < S) ? v_bh[(long long)(n0 + r) * Ev + e] : T(0);
        }
        __syncthreads();

        const int n_valid = (S - n0 < BLOCK_N) ? (S - n0) : BLOCK_N;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const T m_new = flash_max(m_run[r], flash_warp_max(s[r]));
            T alpha;
            T p;
            if (m_new == NEG_INF) {
                // Nothing visible yet: exp(-inf - -inf) would be NaN.
                alpha = T(1);
                p = T(0);
            } else {
                alpha = FlashMath<T>::exp_(m_run[r] - m_new);
                p = FlashMath<T>::exp_(s[r] - m_new);
            }
            l_run[r] = l_run[r] * alpha + flash_warp_sum(p);
            m_run[r] = m_new;
#pragma unroll
            for (int c = 0; c < CHUNKS; ++c) acc[r][c] *= alpha;
            for (int j = 0; j < n_valid; ++j) {
                const T p_j = __shfl_sync(0xffffffffu, p, j);
                const T* v_row = kv_tile + j * kv_stride;
#pragma unroll
                for (int c = 0; c < CHUNKS; ++c) {
                    const int d = lane + 32 * c;
                    if (d < Ev) acc[r][c] += p_j * v_row[d];
                }
            }
        }
    }

#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int row = m0 + warp * ROWS + r;
        if (row >= L) continue;
        // A row that saw no key (bottom-right causal with L > S, or S = 0) is defined
        // as output 0 and LSE -inf, not the NaN that 0/0 would give.
        const bool empty = m_run[r] == NEG_INF;
        T* out_row = out + (bh * L + row) * (long long)Ev;
#pragma unroll
        for (int c = 0; c < CHUNKS; ++c) {
            const int d = lane + 32 * c;
            if (d < Ev) out_row[d] = empty ? T(0) : acc[r][c] / l_run[r];
        }
        if (lane == 0) {
            lse[bh * L + row] = empty ? NEG_INF : m_run[r] + FlashMath<T>::log_(l_run[r]);
        }
    }
}
