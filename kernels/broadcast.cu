// Row-broadcast maps and deterministic column reductions over a [rows, cols] matrix (rows = all
// leading axes, cols = channels): bias add, per-sample scaling, and the column sums that bias and
// per-sample gradients need.
//
// Launch contracts are given per kernel.
#include "common.cuh"

// y[r, c] += b[c]. Any grid/block, grid-stride over rows * cols.
// hot
extern "C" __global__ void bc_add_bias_f32(float* y, const float* b, i64 rows, i64 cols) {
    const i64 n = rows * cols, stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) y[i] += b[i % cols];
}

// Version 1 of the column sums (kept for the parity trials and the benchmark):
// out[g, c] (+)= sum over r in group g of x[g * rows_per_group + r, c]: with groups = 1 a bias
// gradient, with groups = batch a per-sample reduction over pixels. One thread per (g, c),
// summing its rows in order (f64 accumulation): deterministic and coalesced across c, but a
// [262144, 128] bias gradient runs on 128 threads.
// grid = (ceil(cols / 256), groups), block = 256.
extern "C" __global__ void bc_sum_rows_f32(const float* x, float* out, i64 groups, i64 rows_per_group, i64 cols,
                                           int accumulate) {
    const i64 c = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 g = blockIdx.y;
    if (c >= cols || g >= groups) return;
    const float* base = x + g * rows_per_group * cols + c;
    double acc = 0.0;
    for (i64 r = 0; r < rows_per_group; ++r) acc += (double)base[r * cols];
    float* o = out + g * cols + c;
    *o = accumulate ? *o + (float)acc : (float)acc;
}

// Version 2: the same sums in two stages that fill the chip, deterministic. The rows of each
// group are cut into `chunks` chunks of chunk_rows rows (both chosen from the shape alone by
// src/ops/broadcast.rs) and the columns into tiles of 32. A block of 32 x 8 threads takes one
// (group, chunk, tile): thread (tx, ty) adds column tile * 32 + tx over the rows ty, ty + 8, ...
// of the chunk in order (a warp reads 32 adjacent floats of one row), then thread (tx, 0) adds
// the eight lanes in order. f64 throughout, no atomics.
#define COL_TILE 32
#define COL_LANES (REDUCE_THREADS / COL_TILE)

__device__ __forceinline__ void store_sum(float* o, double acc, int accumulate) {
    *o = accumulate ? *o + (float)acc : (float)acc;
}

// Stage 1. Block k (1-D grid of groups * chunks * tiles blocks) takes tile k % tiles, chunk
// (k / tiles) % chunks, group k / (tiles * chunks). Its column totals go to
// partials[(g * chunks + chunk) * cols + c], or, when out is given (chunks == 1), to out[g, c].
// block = REDUCE_THREADS.
// hot
extern "C" __global__ void bc_col_sum_partial_f32(const float* x, i64 groups, i64 rows_per_group, i64 cols,
                                                  i64 chunk_rows, i64 chunks, NULLABLE double* partials,
                                                  NULLABLE float* out, int accumulate) {
    __shared__ double lanes[COL_LANES][COL_TILE];
    const i64 tiles = (cols + COL_TILE - 1) / COL_TILE;
    const i64 k = blockIdx.x;
    const i64 tile = k % tiles, chunk = (k / tiles) % chunks, g = k / (tiles * chunks);
    const int tx = threadIdx.x % COL_TILE, ty = threadIdx.x / COL_TILE;
    const i64 c = tile * COL_TILE + tx;
    const i64 r0 = chunk * chunk_rows, r1 = min(r0 + chunk_rows, rows_per_group);
    double acc = 0.0;
    if (g < groups && c < cols) {
        const float* base = x + g * rows_per_group * cols + c;
        for (i64 r = r0 + ty; r < r1; r += COL_LANES) acc += (double)base[r * cols];
    }
    lanes[ty][tx] = acc;
    __syncthreads();
    if (ty != 0 || g >= groups || c >= cols) return;
    double total = 0.0;
#pragma unroll
    for (int l = 0; l < COL_LANES; ++l) total += lanes[l][tx];
    if (out) {
        store_sum(out + g * cols + c, total, accumulate);
    } else {
        partials[(g * chunks + chunk) * cols + c] = total;
    }
}

// Stage 2. Block k (groups * tiles blocks) takes tile k % tiles of group k / tiles: thread
// (tx, ty) adds the chunks ty, ty + 8, ... of its column in order, thread (tx, 0) the eight lanes.
// block = REDUCE_THREADS.
// hot
extern "C" __global__ void bc_col_sum_finish_f32(const double* partials, i64 groups, i64 chunks, i64 cols,
                                                 float* out, int accumulate) {
    __shared__ double lanes[COL_LANES][COL_TILE];
    const i64 tiles = (cols + COL_TILE - 1) / COL_TILE;
    const i64 k = blockIdx.x;
    const i64 tile = k % tiles, g = k / tiles;
    const int tx = threadIdx.x % COL_TILE, ty = threadIdx.x / COL_TILE;
    const i64 c = tile * COL_TILE + tx;
    double acc = 0.0;
    if (g < groups && c < cols) {
        for (i64 i = ty; i < chunks; i += COL_LANES) acc += partials[(g * chunks + i) * cols + c];
    }
    lanes[ty][tx] = acc;
    __syncthreads();
    if (ty != 0 || g >= groups || c >= cols) return;
    double total = 0.0;
#pragma unroll
    for (int l = 0; l < COL_LANES; ++l) total += lanes[l][tx];
    store_sum(out + g * cols + c, total, accumulate);
}

// y[s, i] = alpha[s] * a[s, i] + beta[s] * b[s, i] for per-sample scalars (EDM preconditioning:
// c_skip * x_t + c_out * F). b may be null (then y = alpha * a). Grid-stride over samples * len.
extern "C" __global__ void bc_scale_rows_f32(const float* a, const float* alpha, NULLABLE const float* b, NULLABLE const float* beta,
                                             float* y, i64 samples, i64 len) {
    const i64 n = samples * len, stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const i64 s = i / len;
        float v = alpha[s] * a[i];
        if (b) v = fmaf(beta[s], b[i], v);
        y[i] = v;
    }
}

// y[r, c] = x[r, c] * v[c]: a diagonal matrix applied to every row (Gaussian priors' diagonal
// parts, per-feature scalings). y may alias x. Grid-stride over rows * cols.
extern "C" __global__ void bc_scale_cols_f32(const float* x, const float* v, float* y, i64 rows, i64 cols) {
    const i64 n = rows * cols, stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) y[i] = x[i] * v[i % cols];
}
