// Fused attention backward pass (FlashAttention-2's): the weights are recomputed tile by
// tile from the forward's LSE, P = exp(S - lse), never stored. Needs flash_common.cu in
// front (_modules.kernel_source puts it there).
//
// With dO the output gradient, O the forward output and D = rowsum(dO * O) (computed on
// the host, one value per row):
//     dP = dO V^T, dropped like the weights      dS = P * (dP - D)
//     dV = P_drop^T dO     dK = scale dS^T Q     dQ = scale dS K     d bias = dS
// with softcap's slope 1 - tanh^2 applied to dS on its way to dQ and dK (not to d bias,
// which enters after the softcap).
//
// Two kernels, neither with atomics, so every result is deterministic:
// flash_bwd_dq owns a tile of query rows and streams the keys (the forward's split);
// it also writes dS when the bias needs its gradient. flash_bwd_dkdv owns a tile of
// keys and streams the queries; it loops over the query heads of a group itself and
// sums their contributions in registers, so a key/value head's gradient is written by
// exactly one block.
//
// Arrays: q, dq (B, H, L, E); k, dk (B, K, S, E); v, dv (B, Kv, S, Ev); dout (B, H, L, Ev);
// lse, delta (B, H, L); dbias (B, H, L, S) when flags has FLASH_DBIAS. All C-contiguous.

// P and the bias gradient of one (row, key) pair: shared by both kernels so that they
// recompute bit-identical weights. `s` is the final score, `cap` the softcap's tanh,
// `dp` = dO_i . v_j, `lse` and `delta` the row's. A fully masked row (lse = -inf) has
// weights by policy on every key: 0, NaN or 1/S, and dS = 0 except under "nan" (whose
// NaN gradient is what the plain softmax gives).
template <typename T>
struct FlashGrad {
    T p;       // the weight before dropout
    T p_drop;  // after dropout (kept weights scaled by 1 / (1 - p))
    T ds;      // d loss / d score (the bias gradient)
    T ds_raw;  // d loss / d (scale q.k): ds times the softcap's slope
};

// `empty_p` is the policy's weight, from flash_empty_weight.
template <typename T>
__device__ __forceinline__ FlashGrad<T> flash_grad(T s, T cap, T dp, T lse, T delta, bool kept,
                                                   T keep_scale, int flags, int masked_rows,
                                                   T empty_p) {
    const bool empty = lse == FlashMath<T>::neg_inf();
    FlashGrad<T> g;
    g.p = empty ? empty_p : FlashMath<T>::exp_(s - lse);
    T dpd = dp;
    g.p_drop = g.p;
    if (flags & FLASH_KEEP) {
        // Selected, not multiplied: a dropped NaN weight is dropped (where(keep, w, 0)).
        g.p_drop = kept ? g.p * keep_scale : T(0);
        dpd = kept ? dp * keep_scale : T(0);
    }
    g.ds = g.p * (dpd - delta);
    if (empty && masked_rows != FLASH_ROWS_NAN) g.ds = T(0);
    g.ds_raw = (flags & FLASH_SOFTCAP) ? g.ds * (T(1) - cap * cap) : g.ds;
    return g;
}

// dQ (and dS for the bias). Block x handles query tile x % m_tiles of the (batch, head)
// pair x / m_tiles; warp w owns ROWS of its BLOCK_M rows. For each tile of 32 keys, lane
// j handles key j: dP from the value tile, then S, P and dS from the key tile, and the
// lanes split dQ's E columns to add dS_j k_j with dS_j broadcast by a shuffle.
template <typename T, int D_MAX, int WARPS, int ROWS>
__global__ void __launch_bounds__(WARPS * 32, 1)
flash_bwd_dq(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
             const T* __restrict__ dout, const T* __restrict__ lse,
             const T* __restrict__ delta, T* __restrict__ dq, T* __restrict__ dbias,
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
    constexpr int CHUNKS = D_MAX / 32;

    // Query and output-gradient rows are read by a whole warp at once (broadcasts), so
    // they need no padding; lane j reads row j of the key-or-value tile (odd stride).
    extern __shared__ __align__(16) unsigned char flash_smem[];
    const int kv_stride = ((E + 1 > Ev) ? (E + 1) : Ev) | 1;
    T* q_tile = reinterpret_cast<T*>(flash_smem);
    T* do_tile = q_tile + BLOCK_M * E;
    T* kv_tile = do_tile + BLOCK_M * Ev;

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;

    const long long bh = blockIdx.x / m_tiles;
    const int m0 = (int)(blockIdx.x - bh * m_tiles) * BLOCK_M;
    const long long b = bh / H;
    const long long h = bh - b * H;
    const T* q_bh = q + bh * L * E;
    const T* do_bh = dout + bh * L * Ev;
    const T* k_bh = k + (b * (H / group_k) + h / group_k) * S * E;
    const T* v_bh = v + (b * (H / group_v) + h / group_v) * S * Ev;

    const T NEG_INF = FlashMath<T>::neg_inf();
    const FlashScore<T> score{scale, softcap, inv_softcap, flags, shift, win_left, win_right,
                              {mask, mask_sb, mask_sh, mask_sl, mask_ss},
                              {bias, bias_sb, bias_sh, bias_sl, bias_ss}};
    const FlashOperand<bool> keep_op{keep, keep_sb, keep_sh, keep_sl, keep_ss};
    const T empty_p = flash_empty_weight<T>(masked_rows, S);

    for (int i = tid; i < BLOCK_M * E; i += THREADS) {
        const int r = i / E;
        const int e = i - r * E;
        q_tile[i] = (m0 + r < L) ? q_bh[(long long)(m0 + r) * E + e] : T(0);
    }
    for (int i = tid; i < BLOCK_M * Ev; i += THREADS) {
        const int r = i / Ev;
        const int e = i - r * Ev;
        do_tile[i] = (m0 + r < L) ? do_bh[(long long)(m0 + r) * Ev + e] : T(0);
    }

    T row_lse[ROWS];
    T row_delta[ROWS];
    T acc[ROWS][CHUNKS];
    bool any_nan_row = false;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const long long row = m0 + warp * ROWS + r;
        row_lse[r] = (row < L) ? lse[bh * L + row] : NEG_INF;
        row_delta[r] = (row < L) ? delta[bh * L + row] : T(0);
        if (row < L && row_lse[r] == NEG_INF) any_nan_row = true;
#pragma unroll
        for (int c = 0; c < CHUNKS; ++c) acc[r][c] = T(0);
    }

    const long long last_row = (m0 + BLOCK_M < L ? m0 + BLOCK_M : L) - 1;
    long long n_begin, n_end;
    flash_key_range(m0, last_row, S, shift, win_left, win_right, BLOCK_N, &n_begin, &n_end);
    // Under "nan" a fully masked row's gradient is NaN on every key, the window's
    // outside included: blocks with such a row visit every key tile.
    if (masked_rows == FLASH_ROWS_NAN &&
        __syncthreads_or(any_nan_row && masked_rows == FLASH_ROWS_NAN)) {
        n_begin = 0;
        n_end = S;
    }

    for (long long n0 = n_begin; n0 < n_end; n0 += BLOCK_N) {
        // dP first, from the values; then the keys replace them in the same buffer.
        __syncthreads();
        for (int i = tid; i < BLOCK_N * Ev; i += THREADS) {
            const int r = i / Ev;
            const int e = i - r * Ev;
            kv_tile[r * kv_stride + e] = (n0 + r < S) ? v_bh[(n0 + r) * Ev + e] : T(0);
        }
        __syncthreads();

        const long long n = n0 + lane;
        T dp[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const T* do_row = do_tile + (warp * ROWS + r) * Ev;
            const T* v_row = kv_tile + lane * kv_stride;
            T dot = T(0);
            for (int e = 0; e < Ev; ++e) dot += do_row[e] * v_row[e];
            dp[r] = dot;
        }

        __syncthreads();
        for (int i = tid; i < BLOCK_N * E; i += THREADS) {
            const int r = i / E;
            const int e = i - r * E;
            kv_tile[r * kv_stride + e] = (n0 + r < S) ? k_bh[(n0 + r) * E + e] : T(0);
        }
        __syncthreads();

        const int n_valid = (S - n0 < BLOCK_N) ? (int)(S - n0) : BLOCK_N;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const long long row = m0 + warp * ROWS + r;
            if (row >= L) continue;  // warp-uniform
            const T* q_row = q_tile + (warp * ROWS + r) * E;
            const T* k_row = kv_tile + lane * kv_stride;
            T ds_raw = T(0);
            if (n < S) {
                T dot = T(0);
                for (int e = 0; e < E; ++e) dot += q_row[e] * k_row[e];
                T cap;
                const T s = score(dot, b, h, row, n, &cap);
                const bool kept = (flags & FLASH_KEEP) ? keep_op.at(b, h, row, n) : true;
                const FlashGrad<T> g = flash_grad(s, cap, dp[r], row_lse[r], row_delta[r],
                                                  kept, keep_scale, flags, masked_rows, empty_p);
                ds_raw = g.ds_raw;
                if (flags & FLASH_DBIAS) dbias[(bh * L + row) * S + n] = g.ds;
            }
            for (int j = 0; j < n_valid; ++j) {
                const T ds_j = __shfl_sync(0xffffffffu, ds_raw, j);
                const T* kj = kv_tile + j * kv_stride;
#pragma unroll
                for (int c = 0; c < CHUNKS; ++c) {
                    const int d = lane + 32 * c;
                    if (d < E) acc[r][c] += ds_j * kj[d];
                }
            }
        }
    }

#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const long long row = m0 + warp * ROWS + r;
        if (row >= L) continue;
        T* dq_row = dq + (bh * L + row) * E;
#pragma unroll
        for (int c = 0; c < CHUNKS; ++c) {
            const int d = lane + 32 * c;
            if (d < E) dq_row[d] = acc[r][c] * scale;
        }
    }
}

// dK and dV. Block x handles key tile x % n_tiles of (batch, head super-group)
// x / n_tiles; warp w owns KROWS of its BLOCK_N = WARPS * KROWS keys. A super-group is
// the `heads_per_block` = lcm(H / K, H / Kv) consecutive query heads that serve whole
// key heads and whole value heads (with K != Kv a key head's query heads may straddle
// two value heads); the block loops over them, adding into registers, and writes a
// key (value) head's gradient when its last query head is done.
//
// For each tile of 32 query rows, lane i handles row i: S, P from the query tile, dP from
// the output-gradient tile, dS; then the lanes split the E (Ev) columns to add
// P_drop_i dO_i to dV and dS_i q_i to dK, with the row's weight broadcast by a shuffle.
// The query tile is loaded twice per step (once for S, once for dK): one buffer serves
// q, then dO, then q again, which keeps fp64 with E = Ev = 256 within 99 KiB.
template <typename T, int D_MAX, int WARPS, int KROWS>
__global__ void __launch_bounds__(WARPS * 32, 1)
flash_bwd_dkdv(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
               const T* __restrict__ dout, const T* __restrict__ lse,
               const T* __restrict__ delta, T* __restrict__ dk, T* __restrict__ dv,
               const bool* __restrict__ mask, long long mask_sb, long long mask_sh,
               long long mask_sl, long long mask_ss,
               const T* __restrict__ bias, long long bias_sb, long long bias_sh,
               long long bias_sl, long long bias_ss,
               const bool* __restrict__ keep, long long keep_sb, long long keep_sh,
               long long keep_sl, long long keep_ss,
               int H, int group_k, int group_v, int heads_per_block, int L, int S, int E,
               int Ev, int n_tiles, T scale, T softcap, T inv_softcap, T keep_scale, int flags,
               long long shift, long long win_left, long long win_right, int masked_rows) {
    constexpr int BLOCK_N = WARPS * KROWS;
    constexpr int BLOCK_M = 32;
    constexpr int THREADS = WARPS * 32;
    constexpr int CHUNKS = D_MAX / 32;

    // Lane i reads row i of the row buffer (odd stride: 32 banks); key and value rows
    // are read by the whole warp at once (broadcasts).
    extern __shared__ __align__(16) unsigned char flash_smem[];
    const int row_stride = ((E > Ev) ? E : Ev) | 1;
    T* row_buf = reinterpret_cast<T*>(flash_smem);
    T* k_tile = row_buf + BLOCK_M * row_stride;
    T* v_tile = k_tile + BLOCK_N * E;

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;

    const long long groups_per_batch = H / heads_per_block;
    const long long bg = blockIdx.x / n_tiles;
    const long long n0 = (blockIdx.x - bg * n_tiles) * (long long)BLOCK_N;
    const long long b = bg / groups_per_batch;
    const long long h_first = (bg - b * groups_per_batch) * heads_per_block;
    const long long key_heads = H / group_k;
    const long long value_heads = H / group_v;

    const T NEG_INF = FlashMath<T>::neg_inf();
    const FlashScore<T> score{scale, softcap, inv_softcap, flags, shift, win_left, win_right,
                              {mask, mask_sb, mask_sh, mask_sl, mask_ss},
                              {bias, bias_sb, bias_sh, bias_sl, bias_ss}};
    const FlashOperand<bool> keep_op{keep, keep_sb, keep_sh, keep_sl, keep_ss};
    const T empty_p = flash_empty_weight<T>(masked_rows, S);

    const long long last_key = (n0 + BLOCK_N < S ? n0 + BLOCK_N : S) - 1;
    long long m_begin, m_end;
    flash_row_range(n0, last_key, L, shift, win_left, win_right, BLOCK_M, &m_begin, &m_end);
    // Fully masked rows weigh every key under "nan" and "uniform", however far outside
    // the window: those policies visit every query tile, skipping the ones outside the
    // window that hold no such row.
    const bool all_rows = masked_rows != FLASH_ROWS_ZERO;

    T dk_acc[KROWS][CHUNKS];
    T dv_acc[KROWS][CHUNKS];

    for (long long h = h_first; h < h_first + heads_per_block; ++h) {
        const long long bh = b * H + h;
        if (h % group_k == 0) {
            // A new key head: its tile replaces the last one's (after every warp is done
            // with it) and its gradient starts from 0.
            __syncthreads();
            const T* k_src = k + (b * key_heads + h / group_k) * S * E;
            for (int i = tid; i < BLOCK_N * E; i += THREADS) {
                const int r = i / E;
                const int e = i - r * E;
                k_tile[i] = (n0 + r < S) ? k_src[(n0 + r) * E + e] : T(0);
            }
#pragma unroll
            for (int r = 0; r < KROWS; ++r) {
#pragma unroll
                for (int c = 0; c < CHUNKS; ++c) dk_acc[r][c] = T(0);
            }
        }
        if (h % group_v == 0) {
            __syncthreads();
            const T* v_src = v + (b * value_heads + h / group_v) * S * Ev;
            for (int i = tid; i < BLOCK_N * Ev; i += THREADS) {
                const int r = i / Ev;
                const int e = i - r * Ev;
                v_tile[i] = (n0 + r < S) ? v_src[(n0 + r) * Ev + e] : T(0);
            }
#pragma unroll
            for (int r = 0; r < KROWS; ++r) {
#pragma unroll
                for (int c = 0; c < CHUNKS; ++c) dv_acc[r][c] = T(0);
            }
        }
        const T* q_bh = q + bh * L * E;
        const T* do_bh = dout + bh * L * Ev;

        for (long long m0 = all_rows ? 0 : m_begin; m0 < (all_rows ? L : m_end);
             m0 += BLOCK_M) {
            const long long row = m0 + lane;
            const T row_lse = (row < L) ? lse[bh * L + row] : NEG_INF;
            const T row_delta = (row < L) ? delta[bh * L + row] : T(0);
            if (all_rows && (m0 + BLOCK_M <= m_begin || m0 >= m_end)) {
                // Outside the window only fully masked rows contribute.
                if (!__syncthreads_or(row < L && row_lse == NEG_INF)) continue;
            }

            __syncthreads();
            for (int i = tid; i < BLOCK_M * E; i += THREADS) {
                const int r = i / E;
                const int e = i - r * E;
                row_buf[r * row_stride + e] = (m0 + r < L) ? q_bh[(m0 + r) * E + e] : T(0);
            }
            __syncthreads();

            T s[KROWS];
            T cap[KROWS];
#pragma unroll
            for (int r = 0; r < KROWS; ++r) {
                const long long n = n0 + warp * KROWS + r;
                const T* q_row = row_buf + lane * row_stride;
                const T* k_row = k_tile + (warp * KROWS + r) * E;
                T dot = T(0);
                for (int e = 0; e < E; ++e) dot += q_row[e] * k_row[e];
                cap[r] = T(0);
                s[r] = (row < L && n < S) ? score(dot, b, h, row, n, &cap[r]) : NEG_INF;
            }

            __syncthreads();
            for (int i = tid; i < BLOCK_M * Ev; i += THREADS) {
                const int r = i / Ev;
                const int e = i - r * Ev;
                row_buf[r * row_stride + e] = (m0 + r < L) ? do_bh[(m0 + r) * Ev + e] : T(0);
            }
            __syncthreads();

            const int m_valid = (L - m0 < BLOCK_M) ? (int)(L - m0) : BLOCK_M;
            T ds_raw[KROWS];
#pragma unroll
            for (int r = 0; r < KROWS; ++r) {
                const long long n = n0 + warp * KROWS + r;
                const T* do_row = row_buf + lane * row_stride;
                const T* v_row = v_tile + (warp * KROWS + r) * Ev;
                T dp = T(0);
                for (int e = 0; e < Ev; ++e) dp += do_row[e] * v_row[e];
                T p_drop = T(0);
                ds_raw[r] = T(0);
                if (row < L && n < S) {
                    const bool kept = (flags & FLASH_KEEP) ? keep_op.at(b, h, row, n) : true;
                    const FlashGrad<T> g =
                        flash_grad(s[r], cap[r], dp, row_lse, row_delta, kept, keep_scale, flags,
                                   masked_rows, empty_p);
                    p_drop = g.p_drop;
                    ds_raw[r] = g.ds_raw;
                }
                // Keys past S are warp-uniform (a warp's keys are its own rows of the tile).
                for (int i = 0; i < m_valid; ++i) {
                    const T p_i = __shfl_sync(0xffffffffu, p_drop, i);
                    const T* do_i = row_buf + i * row_stride;
#pragma unroll
                    for (int c = 0; c < CHUNKS; ++c) {
                        const int d = lane + 32 * c;
                        if (d < Ev) dv_acc[r][c] += p_i * do_i[d];
                    }
                }
            }

            __syncthreads();
            for (int i = tid; i < BLOCK_M * E; i += THREADS) {
                const int r = i / E;
                const int e = i - r * E;
                row_buf[r * row_stride + e] = (m0 + r < L) ? q_bh[(m0 + r) * E + e] : T(0);
            }
            __syncthreads();

#pragma unroll
            for (int r = 0; r < KROWS; ++r) {
                for (int i = 0; i < m_valid; ++i) {
                    const T ds_i = __shfl_sync(0xffffffffu, ds_raw[r], i);
                    const T* q_i = row_buf + i * row_stride;
#pragma unroll
                    for (int c = 0; c < CHUNKS; ++c) {
                        const int d = lane + 32 * c;
                        if (d < E) dk_acc[r][c] += ds_i * q_i[d];
                    }
                }
            }
        }

        if (h % group_k == group_k - 1) {
            T* dk_head = dk + (b * key_heads + h / group_k) * S * E;
#pragma unroll
            for (int r = 0; r < KROWS; ++r) {
                const long long n = n0 + warp * KROWS + r;
                if (n >= S) continue;
#pragma unroll
                for (int c = 0; c < CHUNKS; ++c) {
                    const int d = lane + 32 * c;
                    if (d < E) dk_head[n * E + d] = dk_acc[r][c] * scale;
                }
            }
        }
        if (h % group_v == group_v - 1) {
            T* dv_head = dv + (b * value_heads + h / group_v) * S * Ev;
#pragma unroll
            for (int r = 0; r < KROWS; ++r) {
                const long long n = n0 + warp * KROWS + r;
                if (n >= S) continue;
#pragma unroll
                for (int c = 0; c < CHUNKS; ++c) {
                    const int d = lane + 32 * c;
                    if (d < Ev) dv_head[n * Ev + d] = dv_acc[r][c];
                }
            }
        }
    }
}
