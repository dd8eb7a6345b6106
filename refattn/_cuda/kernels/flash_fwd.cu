// Fused attention forward pass: one query tile per block, key/value tiles streamed
// through shared memory, online softmax (running max, running sum, rescaled accumulator).
// Needs flash_common.cu in front (_modules.kernel_source puts it there).
//
// Arrays: q (B, H, L, E), k (B, K, S, E), v (B, Kv, S, Ev), out (B, H, L, Ev),
// lse (B, H, L), all C-contiguous; mask, bias and keep are broadcast operands (see
// FlashOperand) whose flags bit says whether they are there at all.
//
// Work split: a block owns BLOCK_M = WARPS * ROWS query rows; warp w owns ROWS of them.
// For each key tile of 32 keys, lane j scores key j against each of the warp's rows, the
// warp reduces max and sum with butterfly shuffles (which leave every lane with the
// bit-identical result, so the branches below are warp-uniform), and then the lanes
// split the Ev output columns (lane d owns columns d, d+32, ...) and receive each key's
// probability by a broadcast shuffle. DV_MAX (a multiple of 32, >= Ev) fixes the size of
// the per-lane accumulator so that it stays in registers.

template <typename T, int DV_MAX, int WARPS, int ROWS>
__global__ void __launch_bounds__(WARPS * 32, 1)
flash_fwd(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
          T* __restrict__ out, T* __restrict__ lse,
          const bool* __restrict__ mask, long long mask_sb, long long mask_sh,
          long long mask_sl, long long mask_ss,
          const T* __restrict__ bias, long long bias_sb, long long bias_sh,
          long long bias_sl, long long bias_ss,
          const bool* __restrict__ keep, long long keep_sb, long long keep_sh,
          long long keep_sl, long long keep_ss,
          int H, int group_k, int group_v, int L, int S, int E, int Ev, int m_tiles,
          T scale, T softcap, T inv_softcap, T keep_scale, int flags, long long shift,
          long long win_left, long long win_right, int masked_rows) {
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
    const long long h = bh - b * H;
    const long long key_heads = H / group_k;
    const long long value_heads = H / group_v;

    const T* q_bh = q + bh * L * E;
    const T* k_bh = k + (b * key_heads + h / group_k) * S * E;
    const T* v_bh = v + (b * value_heads + h / group_v) * S * Ev;

    const T NEG_INF = FlashMath<T>::neg_inf();
    const FlashScore<T> score{scale, softcap, inv_softcap, flags, shift, win_left, win_right,
                              {mask, mask_sb, mask_sh, mask_sl, mask_ss},
                              {bias, bias_sb, bias_sh, bias_sl, bias_ss}};
    const FlashOperand<bool> keep_op{keep, keep_sb, keep_sh, keep_sl, keep_ss};
    const bool has_keep = (flags & FLASH_KEEP) != 0;
    const T empty_w = flash_empty_weight<T>(masked_rows, S);

    for (int i = tid; i < BLOCK_M * E; i += THREADS) {
        const int r = i / E;
        const int e = i - r * E;
        q_tile[r * q_stride + e] = (m0 + r < L) ? q_bh[(long long)(m0 + r) * E + e] : T(0);
    }

    // Key tiles outside the window of every row of the block are skipped outright.
    const long long last_row = (m0 + BLOCK_M < L ? m0 + BLOCK_M : L) - 1;
    long long n_begin, n_end;
    flash_key_range(m0, last_row, S, shift, win_left, win_right, BLOCK_N, &n_begin, &n_end);

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

    for (long long n0 = n_begin; n0 < n_end; n0 += BLOCK_N) {
        // The previous tile's values must be consumed before its keys are overwritten;
        // on the first pass this publishes the query tile.
        __syncthreads();
        for (int i = tid; i < BLOCK_N * E; i += THREADS) {
            const int r = i / E;
            const int e = i - r * E;
            kv_tile[r * kv_stride + e] =
                (n0 + r < S) ? k_bh[(n0 + r) * E + e] : T(0);
        }
        __syncthreads();

        const long long n = n0 + lane;
        T s[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const int row_local = warp * ROWS + r;
            const long long row = m0 + row_local;
            const T* q_row = q_tile + row_local * q_stride;
            const T* k_row = kv_tile + lane * kv_stride;
            T dot = T(0);
            for (int e = 0; e < E; ++e) dot += q_row[e] * k_row[e];
            T cap;
            // Keys past S and rows past L have no operand entries: -inf outright.
            s[r] = (n < S && row < L) ? score(dot, b, h, row, n, &cap) : NEG_INF;
        }

        // Every warp is done with the keys before the values replace them.
        __syncthreads();
        for (int i = tid; i < BLOCK_N * Ev; i += THREADS) {
            const int r = i / Ev;
            const int e = i - r * Ev;
            kv_tile[r * kv_stride + e] =
                (n0 + r < S) ? v_bh[(n0 + r) * Ev + e] : T(0);
        }
        __syncthreads();

        const int n_valid = (S - n0 < BLOCK_N) ? (int)(S - n0) : BLOCK_N;
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
            // Dropout acts on the weights after the softmax: the running sum counts every
            // key, the accumulator only the kept ones (selected, so a NaN weight that is
            // dropped is dropped, as where(keep, w, 0) does).
            const long long row = m0 + warp * ROWS + r;
            if (has_keep && n < S && row < L && !keep_op.at(b, h, row, n)) p = T(0);
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

    // A row that saw no key at all (S = 0, masks, a window that misses it) is "fully
    // masked". Under "nan" and "uniform" its weights are NaN or 1/S on EVERY key, the
    // window's outside included, and dropout still applies: a second pass over all the
    // values, taken only by blocks that have such a row.
    if (masked_rows != FLASH_ROWS_ZERO && S > 0) {
        bool mine = false;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            if (m0 + warp * ROWS + r < L && m_run[r] == NEG_INF) mine = true;
        }
        if (__syncthreads_or(mine)) {
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                if (m_run[r] != NEG_INF) continue;
#pragma unroll
                for (int c = 0; c < CHUNKS; ++c) acc[r][c] = T(0);
            }
            for (long long n0 = 0; n0 < S; n0 += BLOCK_N) {
                __syncthreads();
                for (int i = tid; i < BLOCK_N * Ev; i += THREADS) {
                    const int r = i / Ev;
                    const int e = i - r * Ev;
                    kv_tile[r * kv_stride + e] =
                        (n0 + r < S) ? v_bh[(n0 + r) * Ev + e] : T(0);
                }
                __syncthreads();
                const long long n = n0 + lane;
                const int n_valid = (S - n0 < BLOCK_N) ? (int)(S - n0) : BLOCK_N;
#pragma unroll
                for (int r = 0; r < ROWS; ++r) {
                    const long long row = m0 + warp * ROWS + r;
                    if (row >= L || m_run[r] != NEG_INF) continue;  // warp-uniform
                    T wd = (n < S) ? empty_w : T(0);
                    if (has_keep && n < S) {
                        wd = keep_op.at(b, h, row, n) ? empty_w * keep_scale : T(0);
                    }
                    for (int j = 0; j < n_valid; ++j) {
                        const T w_j = __shfl_sync(0xffffffffu, wd, j);
                        const T* v_row = kv_tile + j * kv_stride;
#pragma unroll
                        for (int c = 0; c < CHUNKS; ++c) {
                            const int d = lane + 32 * c;
                            if (d < Ev) acc[r][c] += w_j * v_row[d];
                        }
                    }
                }
            }
        }
    }

#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int row = m0 + warp * ROWS + r;
        if (row >= L) continue;
        // LSE -inf marks the fully masked row whatever the policy. Its output is 0
        // ("zero", and the NaN of 0/0 avoided) or the second pass's sum.
        const bool empty = m_run[r] == NEG_INF;
        const bool keep_sum = empty && masked_rows != FLASH_ROWS_ZERO;
        T* out_row = out + (bh * L + row) * (long long)Ev;
#pragma unroll
        for (int c = 0; c < CHUNKS; ++c) {
            const int d = lane + 32 * c;
            if (d < Ev) {
                out_row[d] = keep_sum ? acc[r][c]
                           : empty    ? T(0)
                                      : acc[r][c] / l_run[r] * keep_scale;
            }
        }
        if (lane == 0) {
            lse[bh * L + row] = empty ? NEG_INF : m_run[r] + FlashMath<T>::log_(l_run[r]);
        }
    }
}
