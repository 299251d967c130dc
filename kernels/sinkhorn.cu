// The log-sum-exp pass of POT's log-domain Sinkhorn (src/metrics/sinkhorn.rs has the algorithm):
// out[r] = LSE_c(pot[c] - |x_r - y_c|^2) over the columns c, coordinates already divided by
// sqrt(reg), f32 exponents, f64 result.
//
// It mirrors the CPU loop operation for operation so that the results agree to the last f32 bit
// before the final f64 log (CUDA's log may differ from glibc's by an ulp): 16 threads per row,
// thread l taking columns l, l + 16, ... exactly as the CPU's lane l does; the squared distance
// summed over coordinates in order from 0; every add and multiply written as an _rn intrinsic so
// nvcc cannot fuse them into FMAs (the CPU never fuses); the same exp (range reduction and the
// same degree-5 polynomial) and the same cut; the 16 lane sums added by the CPU's pairwise tree.
// The CPU skips column blocks that provably add nothing; this kernel evaluates every column,
// which gives the same bits.
//
// Launch contract: blockDim.x == 256 (16 rows of 16 threads), any grid (grid-stride over rows).
#include "common.cuh"

#define SK_LANES 16
#define SK_CUT 40.0f

// fast_exp of src/metrics/sinkhorn.rs, constant for constant.
__device__ __forceinline__ float sk_exp(float x) {
    const float LOG2E = 1.44269504088896340736f;
    const float LN2_HI = 0.693359375f;
    const float LN2_LO = -2.12194440e-4f;
    const float ROUND = 12582912.0f;
    const float C1 = 0.9999997f, C2 = 0.49999148f, C3 = 0.1666764f, C4 = 0.041898377f, C5 = 0.008290223f;
    const float shifted = __fadd_rn(__fmul_rn(x, LOG2E), ROUND);
    const float n = __fsub_rn(shifted, ROUND);
    const float r = __fsub_rn(__fsub_rn(x, __fmul_rn(n, LN2_HI)), __fmul_rn(n, LN2_LO));
    float p = __fadd_rn(C4, __fmul_rn(r, C5));
    p = __fadd_rn(C3, __fmul_rn(r, p));
    p = __fadd_rn(C2, __fmul_rn(r, p));
    p = __fadd_rn(C1, __fmul_rn(r, p));
    p = __fadd_rn(1.0f, __fmul_rn(r, p));
    const int bits = (int)(__float_as_uint(shifted) - __float_as_uint(ROUND)) + 127;
    const float two_n = __uint_as_float((unsigned)bits << 23);
    return x < -86.0f ? 0.0f : __fmul_rn(p, two_n);
}

// The exponent of column c for the row at x (d coordinates, stride x_stride).
__device__ __forceinline__ float sk_exponent(const float* x, i64 x_stride, const float* cols, i64 cols_padded,
                                             int d, const float* pot, i64 c) {
    float k = 0.0f;
    for (int t = 0; t < d; ++t) {
        const float delta = __fsub_rn(x[t * x_stride], cols[t * cols_padded + c]);
        k = __fadd_rn(k, __fmul_rn(delta, delta));
    }
    return __fsub_rn(pot[c], k);
}

// rows: [d][rows_padded] (point r at rows[t * rows_padded + r]); cols: [d][cols_padded]; pot:
// [cols_padded], -inf on the padding. Writes lse[r] for r < n_rows; when pot_out is not null also
// the updated potential pot_out[r] = log_w - lse[r] (f64) and its f32 copy pot32_out[r].
// hot
extern "C" __global__ void sinkhorn_lse_f32(const float* rows, i64 n_rows, i64 rows_padded, const float* cols,
                                            i64 cols_padded, int d, const float* pot, double* lse, double log_w,
                                            NULLABLE double* pot_out, NULLABLE float* pot32_out) {
    const int lane = threadIdx.x & (SK_LANES - 1);
    const i64 rows_per_block = blockDim.x / SK_LANES;
    const i64 stride = (i64)gridDim.x * rows_per_block;
    // Both half-warps of a warp stay in the loop together (the shuffles need the whole warp): a
    // half-warp past the last row computes a clamped row and writes nothing.
    for (i64 base = (i64)blockIdx.x * rows_per_block; base < n_rows; base += stride) {
        const i64 row = base + threadIdx.x / SK_LANES;
        const bool active = row < n_rows;
        const float* x = rows + (active ? row : n_rows - 1);
        float mx = -INFINITY;
        for (i64 c = lane; c < cols_padded; c += SK_LANES) {
            const float e = sk_exponent(x, rows_padded, cols, cols_padded, d, pot, c);
            mx = e > mx ? e : mx;
        }
#pragma unroll
        for (int w = SK_LANES / 2; w > 0; w >>= 1) {
            const float other = __shfl_down_sync(0xffffffffu, mx, w, SK_LANES);
            mx = mx > other ? mx : other;
        }
        const float top = __shfl_sync(0xffffffffu, mx, 0, SK_LANES);
        float acc = 0.0f;
        for (i64 c = lane; c < cols_padded; c += SK_LANES) {
            const float z = __fsub_rn(sk_exponent(x, rows_padded, cols, cols_padded, d, pot, c), top);
            acc = __fadd_rn(acc, z >= -SK_CUT ? sk_exp(z) : 0.0f);
        }
        // The CPU's tree: v[l] = v[l] + v[l + w] for w = 8, 4, 2, 1.
#pragma unroll
        for (int w = SK_LANES / 2; w > 0; w >>= 1) {
            const float other = __shfl_down_sync(0xffffffffu, acc, w, SK_LANES);
            acc = __fadd_rn(acc, other);
        }
        if (active && lane == 0) {
            const double value = (double)top + log((double)acc);
            lse[row] = value;
            if (pot_out) {
                const double p = log_w - value;
                pot_out[row] = p;
                pot32_out[row] = (float)p;
            }
        }
    }
}
