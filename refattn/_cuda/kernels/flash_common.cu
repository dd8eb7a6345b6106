// flash_common.cu: what the forward and backward kernels share (no kernel of its own).
//
// _modules.kernel_source() puts this file in front of flash_fwd.cu and flash_bwd.cu
// (textually, not with #include: CuPy's binary cache is keyed by the source it is
// given, so an included header could change without the cache noticing). NVRTC sees
// no host headers and does not define INFINITY or NAN, so nothing here may include a
// header or rely on <cmath> macros.
//
// Shape legend: B batch, H query heads, K key heads, Kv value heads, L query length,
// S key length, E head dim of q/k, Ev head dim of v.

// Every kernel is declared __launch_bounds__(threads, 1): the minimum of one resident
// block lets ptxas use up to 255 registers per thread. Without it ptxas trades registers
// for occupancy and spills the per-lane accumulators (the compile gate refuses spills).

// Which optional operands a launch has (the `flags` argument of every kernel).
// Enumerators rather than constexpr variables: NVRTC warns about an unused variable,
// and each kernel file uses only some of these.
enum FlashFlag : int {
    FLASH_MASK = 1,     // a boolean mask, True = take part
    FLASH_BIAS = 2,     // an additive float bias
    FLASH_KEEP = 4,     // a dropout keep-mask, True = keep
    FLASH_SOFTCAP = 8,  // softcap c * tanh(s / c) before the bias
    FLASH_DBIAS = 16,   // backward: write dS, the bias gradient, at (B, H, L, S)
};

// The policies for a row whose every score is -inf (refattn's masked_rows).
enum FlashMaskedRows : int {
    FLASH_ROWS_ZERO = 0,     // output 0 (torch's SDPA)
    FLASH_ROWS_NAN = 1,      // NaN (the plain softmax)
    FLASH_ROWS_UNIFORM = 2,  // weight 1/S on every key (JAX's finite fill)
};

template <typename T>
struct FlashMath;

template <>
struct FlashMath<float> {
    static __device__ __forceinline__ float neg_inf() { return __int_as_float((int)0xff800000u); }
    static __device__ __forceinline__ float nan() { return __int_as_float(0x7fc00000); }
    static __device__ __forceinline__ float exp_(float x) { return expf(x); }
    static __device__ __forceinline__ float log_(float x) { return logf(x); }
    static __device__ __forceinline__ float tanh_(float x) { return tanhf(x); }
};

template <>
struct FlashMath<double> {
    static __device__ __forceinline__ double neg_inf() {
        return __longlong_as_double((long long)0xfff0000000000000ull);
    }
    static __device__ __forceinline__ double nan() {
        return __longlong_as_double((long long)0x7ff8000000000000ull);
    }
    static __device__ __forceinline__ double exp_(double x) { return exp(x); }
    static __device__ __forceinline__ double log_(double x) { return log(x); }
    static __device__ __forceinline__ double tanh_(double x) { return tanh(x); }
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

// An operand broadcast to (B, H, L, S): element (b, h, i, j) lives at
// base[b * sb + h * sh + i * sl + j * ss]. The host passes the operand in its own
// (compact) shape with stride 0 along each broadcast axis, so a (L, S) mask or a
// (B, 1, 1, S) padding mask is never expanded to the full score shape.
template <typename U>
struct FlashOperand {
    const U* base;
    long long sb, sh, sl, ss;

    __device__ __forceinline__ U at(long long b, long long h, long long i, long long j) const {
        return base[b * sb + h * sh + i * sl + j * ss];
    }
};

// Everything between q.k and the softmax, in the documented order (docs/variants.rst):
// scale, softcap, bias, then the masks (the boolean mask and the positional window).
// Masks ADD -inf rather than select it, so that a NaN or +inf score at a masked position
// still makes its row NaN, exactly as on the array-API path (which adds
// where(allowed, 0, -inf)).
template <typename T>
struct FlashScore {
    T scale;
    T softcap;
    // 1 / softcap, from the host: a division in the loop would be a call to CUDA's
    // IEEE division slow path, and ptxas spills the live accumulators around calls.
    T inv_softcap;
    int flags;
    long long shift;      // alignment: 0 top-left, S - L bottom-right
    long long win_left;   // query i sees keys j with -left <= j - (i + shift) <= right;
    long long win_right;  // a negative edge is unlimited
    FlashOperand<bool> mask;
    FlashOperand<T> bias;

    // Is key j inside query i's window?
    __device__ __forceinline__ bool in_window(long long i, long long j) const {
        const long long offset = j - (i + shift);
        return (win_right < 0 || offset <= win_right) && (win_left < 0 || offset >= -win_left);
    }

    // The final score of (query i, key j) of batch b, head h from dot = q_i . k_j.
    // `cap` receives tanh(scale * dot / softcap), the softcap's slope being 1 - cap^2
    // (the backward needs it); it is 0 without softcap. The caller guarantees i < L and
    // j < S: the operands have no entry beyond.
    __device__ __forceinline__ T operator()(T dot, long long b, long long h, long long i,
                                            long long j, T* cap) const {
        T s = dot * scale;
        *cap = T(0);
        if (flags & FLASH_SOFTCAP) {
            *cap = FlashMath<T>::tanh_(s * inv_softcap);
            s = *cap * softcap;
        }
        if (flags & FLASH_BIAS) s += bias.at(b, h, i, j);
        const T NEG_INF = FlashMath<T>::neg_inf();
        if ((flags & FLASH_MASK) && !mask.at(b, h, i, j)) s += NEG_INF;
        if (!in_window(i, j)) s += NEG_INF;
        return s;
    }
};

// The keys [*lo, *hi) that query rows row_lo..row_hi can see through the window, with
// *lo rounded down to a multiple of `tile` so that key tiles stay aligned. Tiles
// outside are skipped; the range is empty (*hi <= *lo) when no row sees any key.
__device__ __forceinline__ void flash_key_range(long long row_lo, long long row_hi, long long S,
                                                long long shift, long long win_left,
                                                long long win_right, int tile, long long* lo,
                                                long long* hi) {
    long long first = 0;
    long long end = S;
    if (win_left >= 0) {
        first = row_lo + shift - win_left;
        if (first < 0) first = 0;
        first -= first % tile;
    }
    if (win_right >= 0) {
        const long long limit = row_hi + shift + win_right + 1;
        if (limit < end) end = limit;
    }
    *lo = first;
    *hi = end;
}

// The query rows [*lo, *hi) that can see some key of key_lo..key_hi through the window,
// with *lo rounded down to a multiple of `tile`: the transpose of flash_key_range.
__device__ __forceinline__ void flash_row_range(long long key_lo, long long key_hi, long long L,
                                                long long shift, long long win_left,
                                                long long win_right, int tile, long long* lo,
                                                long long* hi) {
    long long first = 0;
    long long end = L;
    if (win_right >= 0) {
        first = key_lo - shift - win_right;
        if (first < 0) first = 0;
        first -= first % tile;
    }
    if (win_left >= 0) {
        const long long limit = key_hi - shift + win_left + 1;
        if (limit < end) end = limit;
    }
    *lo = first;
    *hi = end;
}

// The weight a fully masked row gives every key under `masked_rows`: 0, NaN or 1/S.
// Kernels compute it once at the start: a division inside a loop is a call to the IEEE
// division slow path, around which ptxas spills whatever registers are live.
template <typename T>
__device__ __forceinline__ T flash_empty_weight(int masked_rows, long long S) {
    if (masked_rows == FLASH_ROWS_NAN) return FlashMath<T>::nan();
    if (masked_rows == FLASH_ROWS_UNIFORM && S > 0) return T(1) / T(S);
    return T(0);
}
