// Deterministic reductions. Every partial sum is accumulated in f64 in a fixed order (fixed block
// size REDUCE_THREADS, fixed grid for a given shape, fixed tree), with no atomics, so results
// are bit-identical run to run. No grid here depends on the device (its SM count): a shape has
// one summation order on every GPU.
//
// Version 1 (reduce_sum_*, reduce_row_dot_f32) stays for the parity trials and the benchmark;
// version 2 (reduce_rows_*) serves every sum, dot and norm: one warp per short row, or
// fixed-length chunks of a long row summed by one block each, then one finishing block per row.
//
// Launch contract: blockDim.x == REDUCE_THREADS for every kernel here.
#include "common.cuh"

// ---- version 1 ---------------------------------------------------------------------------------

// Stage 1 of a full sum: block b sums the elements b, b + gridDim.x * REDUCE_THREADS, ... of its
// threads and writes one f64 partial. The host picks gridDim.x from n alone.
extern "C" __global__ void reduce_sum_partial_f32(const float* x, i64 n, double* partials) {
    __shared__ double scratch[REDUCE_THREADS / 32];
    const i64 stride = (i64)gridDim.x * REDUCE_THREADS;
    double acc = 0.0;
    for (i64 i = (i64)blockIdx.x * REDUCE_THREADS + threadIdx.x; i < n; i += stride) acc += (double)x[i];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// Stage 2: one block sums the partials and writes the f32 result.
extern "C" __global__ void reduce_sum_finish(const double* partials, int count, float* out) {
    __shared__ double scratch[REDUCE_THREADS / 32];
    double acc = 0.0;
    for (int i = threadIdx.x; i < count; i += REDUCE_THREADS) acc += partials[i];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) out[0] = (float)acc;
}

// out[r] = sum_c a[r, c] * b[r, c] for a batch of `rows` rows of length `cols`. One block per row
// (grid-stride over rows). With sqrt_result, out[r] = sqrt of that (the L2 norm when a == b).
// A whole block per row idles on short rows (CG's [8192, 10]) and a long row gets one block.
extern "C" __global__ void reduce_row_dot_f32(const float* a, const float* b, float* out, i64 rows, i64 cols,
                                              int sqrt_result) {
    __shared__ double scratch[REDUCE_THREADS / 32];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* ar = a + r * cols;
        const float* br = b + r * cols;
        double acc = 0.0;
        for (i64 c = threadIdx.x; c < cols; c += REDUCE_THREADS) acc += (double)ar[c] * (double)br[c];
        acc = block_sum(acc, scratch);
        if (threadIdx.x == 0) out[r] = (float)(sqrt_result ? sqrt(acc) : acc);
    }
}

// ---- version 2 ---------------------------------------------------------------------------------
// out[r] = sum_c a[r, c] * b[r, c], or sum_c a[r, c] when b is null; its square root with
// sqrt_result (the L2 norm when b == a). Products of two floats are exact in f64, so only the
// order of the additions, fixed below, decides the rounding.

// Must match src/ops/reduce.rs.
#define ROW_WARP_MAX 512   // rows up to this long get one warp each
#define ROW_CHUNK 16384    // longer rows are cut into chunks of this many elements, one block each

__device__ __forceinline__ float finish_value(double acc, int sqrt_result) {
    return (float)(sqrt_result ? sqrt(acc) : acc);
}

// Short rows: warp w = blockIdx.x * (REDUCE_THREADS / 32) + warp-in-block takes row w; lane l
// adds the elements l, l + 32, ... in order, then the warp's fixed shuffle tree. Grid:
// ceil(rows / 8) blocks.
// hot
extern "C" __global__ void reduce_rows_warp_f32(const float* a, NULLABLE const float* b, float* out, i64 rows,
                                                i64 cols, int sqrt_result) {
    const i64 r = (i64)blockIdx.x * (REDUCE_THREADS / 32) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (r >= rows) return;  // whole warps leave together: the shuffles below see full warps
    const float* ar = a + r * cols;
    const float* br = b ? b + r * cols : nullptr;
    double acc = 0.0;
    for (i64 c = lane; c < cols; c += 32) acc += br ? (double)ar[c] * (double)br[c] : (double)ar[c];
    acc = warp_sum(acc);
    if (lane == 0) out[r] = finish_value(acc, sqrt_result);
}

// Long rows, stage 1: block k of the grid takes chunk k % chunks of row k / chunks, the elements
// [c0, c0 + len) with c0 = (k % chunks) * ROW_CHUNK. Thread t adds the groups of four elements
// t, t + REDUCE_THREADS, ... of the chunk, each group in order, read as one float4 when every
// pointer allows: the same order either way, so alignment never changes the bits. The block's
// total goes to partials[k], or, when out is given (chunks == 1), finished to out[row].
// Grid: rows * chunks blocks.
// hot
extern "C" __global__ void reduce_rows_partial_f32(const float* a, NULLABLE const float* b, i64 rows, i64 cols,
                                                   i64 chunks, NULLABLE double* partials, NULLABLE float* out,
                                                   int sqrt_result) {
    __shared__ double scratch[REDUCE_THREADS / 32];
    const i64 k = blockIdx.x;
    const i64 r = k / chunks, c0 = (k % chunks) * ROW_CHUNK;
    if (r >= rows) return;  // never taken with the grid above; uniform across the block
    const i64 len = min((i64)ROW_CHUNK, cols - c0);
    const float* ar = a + r * cols + c0;
    const float* br = b ? b + r * cols + c0 : nullptr;
    const bool vec = aligned16(ar) && (!br || aligned16(br));
    double acc = 0.0;
    for (i64 e = 4 * (i64)threadIdx.x; e < len; e += 4 * REDUCE_THREADS) {
        float x[4] = {0.0f, 0.0f, 0.0f, 0.0f}, y[4] = {1.0f, 1.0f, 1.0f, 1.0f};
        if (vec && e + 4 <= len) {
            const float4 v = *reinterpret_cast<const float4*>(ar + e);
            x[0] = v.x, x[1] = v.y, x[2] = v.z, x[3] = v.w;
            if (br) {
                const float4 w = *reinterpret_cast<const float4*>(br + e);
                y[0] = w.x, y[1] = w.y, y[2] = w.z, y[3] = w.w;
            }
        } else {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                if (e + j < len) {
                    x[j] = ar[e + j];
                    if (br) y[j] = br[e + j];
                }
            }
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            if (e + j < len) acc += br ? (double)x[j] * (double)y[j] : (double)x[j];
        }
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x != 0) return;
    if (out) {
        out[r] = finish_value(acc, sqrt_result);
    } else {
        partials[k] = acc;
    }
}

// Long rows, stage 2: block r adds row r's partials (chunks of them) in a fixed order and
// writes out[r]. Grid: rows blocks.
// hot
extern "C" __global__ void reduce_rows_finish_f32(const double* partials, i64 rows, i64 chunks, float* out,
                                                  int sqrt_result) {
    __shared__ double scratch[REDUCE_THREADS / 32];
    const i64 r = blockIdx.x;
    if (r >= rows) return;
    double acc = 0.0;
    for (i64 i = threadIdx.x; i < chunks; i += REDUCE_THREADS) acc += partials[r * chunks + i];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) out[r] = finish_value(acc, sqrt_result);
}
