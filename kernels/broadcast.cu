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

// out[g, c] (+)= sum over r in group g of x[g * rows_per_group + r, c]: with groups = 1 a bias
// gradient, with groups = batch a per-sample reduction over pixels. One thread per (g, c),
// summing its rows in order (f64 accumulation): deterministic and coalesced across c.
// grid = (ceil(cols / 256), groups), block = 256.
// hot
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
