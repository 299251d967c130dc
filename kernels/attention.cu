// Row softmax and its backward for self-attention scores (the matrix products run in
// kernels/gemm.cu as batched GEMMs: at 256 tokens per image attention is under 1% of the U-Net's
// FLOPs, so a fused flash kernel buys nothing here). One warp per row.
//
// Launch contract: blockDim.x a multiple of 32; any grid (warps stride over rows).
#include <cuda_bf16.h>
#include "common.cuh"

__device__ __forceinline__ float warp_allmax(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

// Row softmax. The exponentials are recomputed in the last pass rather than stored unnormalised
// and rescaled (expf is deterministic, so the values are the same): one write per element, and
// P may be bf16, each probability rounded once as it is stored (the bf16 policy keeps them so).
__device__ __forceinline__ void st(float* p, int j, float v) { p[j] = v; }
__device__ __forceinline__ void st(__nv_bfloat16* p, int j, float v) { p[j] = __float2bfloat16_rn(v); }

template <class P>
__device__ __forceinline__ void attn_softmax(const float* s, P* p, i64 rows, int cols) {
    const i64 warps = ((i64)gridDim.x * blockDim.x) >> 5;
    const int lane = threadIdx.x & 31;
    for (i64 row = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5; row < rows; row += warps) {
        const float* sr = s + row * cols;
        P* pr = p + row * cols;
        float mx = -INFINITY;
        for (int j = lane; j < cols; j += 32) mx = fmaxf(mx, sr[j]);
        mx = warp_allmax(mx);
        float sum = 0.0f;
        for (int j = lane; j < cols; j += 32) sum += expf(sr[j] - mx);
        const float inv = 1.0f / warp_allsum(sum);
        for (int j = lane; j < cols; j += 32) st(pr, j, expf(sr[j] - mx) * inv);
    }
}

// hot
extern "C" __global__ void attn_softmax_f32(const float* s, float* p, i64 rows, int cols) {
    attn_softmax(s, p, rows, cols);
}

// hot
extern "C" __global__ void attn_softmax_f32_to_bf16(const float* s, __nv_bfloat16* p, i64 rows, int cols) {
    attn_softmax(s, p, rows, cols);
}

// ds = p * (dp - sum_j p_j dp_j). ds may alias dp (each row's dot is complete, warp_allsum,
// before any of its elements is written). P: f32, or bf16 probabilities kept by the bf16 policy.
template <class P>
__device__ __forceinline__ void attn_softmax_backward(const P* p, const float* dp, float* ds, i64 rows, int cols) {
    const i64 warps = ((i64)gridDim.x * blockDim.x) >> 5;
    const int lane = threadIdx.x & 31;
    for (i64 row = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5; row < rows; row += warps) {
        const P* pr = p + row * cols;
        const float* gr = dp + row * cols;
        float dot = 0.0f;
        for (int j = lane; j < cols; j += 32) dot = fmaf(ld(pr, j), gr[j], dot);
        dot = warp_allsum(dot);
        float* dr = ds + row * cols;
        for (int j = lane; j < cols; j += 32) dr[j] = ld(pr, j) * (gr[j] - dot);
    }
}

// hot
extern "C" __global__ void attn_softmax_backward_f32(const float* p, const float* dp, float* ds, i64 rows, int cols) {
    attn_softmax_backward(p, dp, ds, rows, cols);
}

// In place: g = p * (g - sum_j p_j g_j).
// hot
extern "C" __global__ void attn_softmax_backward_bf16p(const __nv_bfloat16* p, float* g, i64 rows, int cols) {
    attn_softmax_backward(p, g, g, rows, cols);
}
