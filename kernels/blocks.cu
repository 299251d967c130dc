// The fused pieces of the paper's ResBlock and AttBlock around their convolutions / attention:
//   modulate:  h = (1 + a) * x + b          (forward fused into LayerNorm: kernels/norm.cu)
//   residual:  out = (x + c * h) / sqrt(1 + c^2)
// where (a, b, c) = m[n, 0:C], m[n, C:2C], m[n, 2C:3C] come from the block's modulation MLP and
// broadcast over the P pixels of sample n. x, h, out are [N, P, C]; m is [N, 3C].
//
// The backward kernels give one thread a (sample, channel) pair and walk its pixels in order:
// they write the input gradients and the deterministic per-sample sums that d m needs, with no
// atomics. Forward kernels: any grid, grid-stride. Backward: grid = (ceil(C / 256), N), block 256.
#include "common.cuh"

// The kernels are templated on the type of x and h: float, or bf16 for a block's input and
// h kept in bf16 by the bf16 policy (read through `ld`, so both compute the same f32 values).

// dx = (1 + a) dh; dm[:, 0:C] = sum_p dh * x; dm[:, C:2C] = sum_p dh. dx may alias dh.
template <class X>
__device__ __forceinline__ void blk_modulate_backward(const X* x, const float* m, const float* dh, float* dx, float* dm,
                                                      i64 n, i64 p, i64 c) {
    const i64 ch = (i64)blockIdx.x * blockDim.x + threadIdx.x, s = blockIdx.y;
    if (ch >= c || s >= n) return;
    const float scale = 1.0f + m[s * 3 * c + ch];
    double sa = 0.0, sb = 0.0;
    for (i64 q = 0; q < p; ++q) {
        const i64 i = (s * p + q) * c + ch;
        const float g = dh[i];
        sa += (double)g * (double)ld(x, i);
        sb += (double)g;
        dx[i] = scale * g;
    }
    dm[s * 3 * c + ch] = (float)sa;
    dm[s * 3 * c + c + ch] = (float)sb;
}

// hot
extern "C" __global__ void blk_modulate_backward_f32(const float* x, const float* m, const float* dh, float* dx,
                                                     float* dm, i64 n, i64 p, i64 c) {
    blk_modulate_backward(x, m, dh, dx, dm, n, p, c);
}

// hot
extern "C" __global__ void blk_modulate_backward_bf16x(const __nv_bfloat16* x, const float* m, const float* dh,
                                                       float* dx, float* dm, i64 n, i64 p, i64 c) {
    blk_modulate_backward(x, m, dh, dx, dm, n, p, c);
}

template <class X, class Y>
__device__ __forceinline__ void blk_residual(const X* x, const X* h, const float* m, Y* out, i64 n, i64 p, i64 c) {
    const i64 total = n * p * c, step = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        const i64 ch = i % c, s = i / (p * c);
        const float cc = m[s * 3 * c + 2 * c + ch];
        st(out, i, fmaf(cc, ld(h, i), ld(x, i)) / sqrtf(1.0f + cc * cc));
    }
}

// hot
extern "C" __global__ void blk_residual_f32(const float* x, const float* h, const float* m, float* out, i64 n, i64 p,
                                            i64 c) {
    blk_residual(x, h, m, out, n, p, c);
}

// hot
extern "C" __global__ void blk_residual_bf16xh(const __nv_bfloat16* x, const __nv_bfloat16* h, const float* m,
                                               float* out, i64 n, i64 p, i64 c) {
    blk_residual(x, h, m, out, n, p, c);
}

// The output kept in bf16 (the next block's input under the bf16 policy): no f32 copy to cast.
// hot
extern "C" __global__ void blk_residual_bf16xh_bf16y(const __nv_bfloat16* x, const __nv_bfloat16* h, const float* m,
                                                    __nv_bfloat16* out, i64 n, i64 p, i64 c) {
    blk_residual(x, h, m, out, n, p, c);
}

// dx = dout / s; dh = c dout / s; dm[:, 2C:3C] = sum_p dout * (h - out c / s) / s, s = sqrt(1 + c^2).
template <class X>
__device__ __forceinline__ void blk_residual_backward(const X* x, const X* h, const float* m, const float* dout,
                                                      float* dx, float* dh, float* dm, i64 n, i64 p, i64 c) {
    const i64 ch = (i64)blockIdx.x * blockDim.x + threadIdx.x, s = blockIdx.y;
    if (ch >= c || s >= n) return;
    const float cc = m[s * 3 * c + 2 * c + ch];
    const float sq = sqrtf(1.0f + cc * cc), inv = 1.0f / sq;
    double sc = 0.0;
    for (i64 q = 0; q < p; ++q) {
        const i64 i = (s * p + q) * c + ch;
        const float g = dout[i], hv = ld(h, i);
        const float out = fmaf(cc, hv, ld(x, i)) * inv;
        sc += (double)g * (double)((hv - out * cc * inv) * inv);
        dx[i] = g * inv;
        dh[i] = cc * g * inv;
    }
    dm[s * 3 * c + 2 * c + ch] = (float)sc;
}

// hot
extern "C" __global__ void blk_residual_backward_f32(const float* x, const float* h, const float* m,
                                                     const float* dout, float* dx, float* dh, float* dm, i64 n,
                                                     i64 p, i64 c) {
    blk_residual_backward(x, h, m, dout, dx, dh, dm, n, p, c);
}

// hot
extern "C" __global__ void blk_residual_backward_bf16xh(const __nv_bfloat16* x, const __nv_bfloat16* h,
                                                        const float* m, const float* dout, float* dx, float* dh,
                                                        float* dm, i64 n, i64 p, i64 c) {
    blk_residual_backward(x, h, m, dout, dx, dh, dm, n, p, c);
}
