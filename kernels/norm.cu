// LayerNorm over the channel (last) axis without affine parameters, as the paper's networks use
// it: y = (x - mean) / sqrt(var + eps). One warp per row (a pixel's channels); the saved 1/std
// and the output y are all the backward needs.
//
// Launch contract: blockDim.x a multiple of 32; any grid (warps stride over rows).
#include "common.cuh"

// Y: float, or bf16 for an output kept in bf16 under the bf16 policy (no f32 copy to cast).
template <class Y>
__device__ __forceinline__ void ln_forward(const float* x, Y* y, float* rstd, i64 rows, int C, float eps) {
    const i64 warps = ((i64)gridDim.x * blockDim.x) >> 5;
    const int lane = threadIdx.x & 31;
    const float inv_c = 1.0f / (float)C;
    for (i64 row = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5; row < rows; row += warps) {
        const float* xr = x + row * C;
        float s = 0.0f;
        for (int c = lane; c < C; c += 32) s += xr[c];
        const float mean = warp_allsum(s) * inv_c;
        float v = 0.0f;
        for (int c = lane; c < C; c += 32) {
            const float d = xr[c] - mean;
            v = fmaf(d, d, v);
        }
        const float r = 1.0f / sqrtf(warp_allsum(v) * inv_c + eps);
        Y* yr = y + row * C;
        for (int c = lane; c < C; c += 32) st(yr, c, (xr[c] - mean) * r);
        if (lane == 0) rstd[row] = r;
    }
}

// hot
extern "C" __global__ void ln_forward_f32(const float* x, float* y, float* rstd, i64 rows, int C, float eps) {
    ln_forward(x, y, rstd, rows, C, eps);
}

// hot
extern "C" __global__ void ln_forward_f32_bf16y(const float* x, __nv_bfloat16* y, float* rstd, i64 rows, int C,
                                                float eps) {
    ln_forward(x, y, rstd, rows, C, eps);
}

// dx = rstd * (dy - mean(dy) - y * mean(dy * y)). dx may alias dy. Y: float, or bf16 for a
// LayerNorm output kept in bf16.
template <class Y>
__device__ __forceinline__ void ln_backward(const Y* y, const float* rstd, const float* dy, float* dx, i64 rows,
                                            int C) {
    const i64 warps = ((i64)gridDim.x * blockDim.x) >> 5;
    const int lane = threadIdx.x & 31;
    const float inv_c = 1.0f / (float)C;
    for (i64 row = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5; row < rows; row += warps) {
        const Y* yr = y + row * C;
        const float* gr = dy + row * C;
        float a = 0.0f, b = 0.0f;
        for (int c = lane; c < C; c += 32) {
            a += gr[c];
            b = fmaf(gr[c], ld(yr, c), b);
        }
        const float ma = warp_allsum(a) * inv_c, mb = warp_allsum(b) * inv_c;
        const float r = rstd[row];
        float* dr = dx + row * C;
        for (int c = lane; c < C; c += 32) dr[c] = r * (gr[c] - ma - ld(yr, c) * mb);
    }
}

// hot
extern "C" __global__ void ln_backward_f32(const float* y, const float* rstd, const float* dy, float* dx, i64 rows,
                                           int C) {
    ln_backward(y, rstd, dy, dx, rows, C);
}

// hot
extern "C" __global__ void ln_backward_bf16y(const __nv_bfloat16* y, const float* rstd, const float* dy, float* dx,
                                             i64 rows, int C) {
    ln_backward(y, rstd, dy, dx, rows, C);
}

// The block entry of ResBlock and AttBlock fused: y = LN((1 + a) x + b), with (a, b) =
// m[s, 0:C], m[s, C:2C] for the sample s = row / p that the row (pixel) belongs to. The
// modulated value is recomputed in each pass instead of being stored: nothing but y and 1/std
// goes to memory, and the backward needs nothing else.
// X: float, or bf16 for a block input kept in bf16. Y: float, or bf16 for the output kept in bf16
// (the bf16 policy keeps it for the backward and the next layer reads it on the tensor cores), so
// no f32 copy is written and cast.
template <class X, class Y>
__device__ __forceinline__ void ln_modulate_forward(const X* x, const float* m, Y* y, float* rstd, i64 rows, i64 p,
                                                    int C, float eps) {
    const i64 warps = ((i64)gridDim.x * blockDim.x) >> 5;
    const int lane = threadIdx.x & 31;
    const float inv_c = 1.0f / (float)C;
    for (i64 row = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5; row < rows; row += warps) {
        const X* xr = x + row * C;
        const float* ma = m + (row / p) * 3 * C;
        const float* mb = ma + C;
        float s = 0.0f;
        for (int c = lane; c < C; c += 32) s += fmaf(1.0f + ma[c], ld(xr, c), mb[c]);
        const float mean = warp_allsum(s) * inv_c;
        float v = 0.0f;
        for (int c = lane; c < C; c += 32) {
            const float d = fmaf(1.0f + ma[c], ld(xr, c), mb[c]) - mean;
            v = fmaf(d, d, v);
        }
        const float r = 1.0f / sqrtf(warp_allsum(v) * inv_c + eps);
        Y* yr = y + row * C;
        for (int c = lane; c < C; c += 32) st(yr, c, (fmaf(1.0f + ma[c], ld(xr, c), mb[c]) - mean) * r);
        if (lane == 0) rstd[row] = r;
    }
}

// hot
extern "C" __global__ void ln_modulate_forward_f32(const float* x, const float* m, float* y, float* rstd, i64 rows,
                                                   i64 p, int C, float eps) {
    ln_modulate_forward(x, m, y, rstd, rows, p, C, eps);
}

// hot
extern "C" __global__ void ln_modulate_forward_bf16x(const __nv_bfloat16* x, const float* m, float* y, float* rstd,
                                                     i64 rows, i64 p, int C, float eps) {
    ln_modulate_forward(x, m, y, rstd, rows, p, C, eps);
}

// hot
extern "C" __global__ void ln_modulate_forward_bf16x_bf16y(const __nv_bfloat16* x, const float* m, __nv_bfloat16* y,
                                                           float* rstd, i64 rows, i64 p, int C, float eps) {
    ln_modulate_forward(x, m, y, rstd, rows, p, C, eps);
}

// The TimeMLP's activation and normalisation fused: y = LN(silu(z)). SiLU's output goes to y
// (each lane rereads only what it wrote) and is normalised there; the backward recomputes it
// from z, which the layer keeps as its pre-activation.
// hot
extern "C" __global__ void ln_silu_forward_f32(const float* z, float* y, float* rstd, i64 rows, int C, float eps) {
    const i64 warps = ((i64)gridDim.x * blockDim.x) >> 5;
    const int lane = threadIdx.x & 31;
    const float inv_c = 1.0f / (float)C;
    for (i64 row = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5; row < rows; row += warps) {
        const float* zr = z + row * C;
        float* yr = y + row * C;
        float s = 0.0f;
        for (int c = lane; c < C; c += 32) {
            const float a = silu_value(zr[c]);
            yr[c] = a;
            s += a;
        }
        const float mean = warp_allsum(s) * inv_c;
        float v = 0.0f;
        for (int c = lane; c < C; c += 32) {
            const float d = yr[c] - mean;
            v = fmaf(d, d, v);
        }
        const float r = 1.0f / sqrtf(warp_allsum(v) * inv_c + eps);
        for (int c = lane; c < C; c += 32) yr[c] = (yr[c] - mean) * r;
        if (lane == 0) rstd[row] = r;
    }
}

// dz = silu'(z) * rstd * (dy - mean(dy) - y * mean(dy * y)): the fused pair's backward.
// hot
extern "C" __global__ void ln_silu_backward_f32(const float* z, const float* y, const float* rstd, const float* dy,
                                                float* dz, i64 rows, int C) {
    const i64 warps = ((i64)gridDim.x * blockDim.x) >> 5;
    const int lane = threadIdx.x & 31;
    const float inv_c = 1.0f / (float)C;
    for (i64 row = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5; row < rows; row += warps) {
        const float* yr = y + row * C;
        const float* gr = dy + row * C;
        float a = 0.0f, b = 0.0f;
        for (int c = lane; c < C; c += 32) {
            a += gr[c];
            b = fmaf(gr[c], yr[c], b);
        }
        const float ma = warp_allsum(a) * inv_c, mb = warp_allsum(b) * inv_c;
        const float r = rstd[row];
        const float* zr = z + row * C;
        float* dr = dz + row * C;
        for (int c = lane; c < C; c += 32) dr[c] = silu_grad(zr[c], r * (gr[c] - ma - yr[c] * mb));
    }
}
