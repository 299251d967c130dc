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

// hot
extern "C" __global__ void attn_softmax_f32(const float* s, float* p, i64 rows, int cols) {
    const i64 warps = ((i64)gridDim.x * blockDim.x) >> 5;
    const int lane = threadIdx.x & 31;
    for (i64 row = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5; row < rows; row += warps) {
        const float* sr = s + row * cols;
        float* pr = p + row * cols;
        float mx = -INFINITY;
        for (int j = lane; j < cols; j += 32) mx = fmaxf(mx, sr[j]);
        mx = warp_allmax(mx);
        float sum = 0.0f;
        for (int j = lane; j < cols; j += 32) {
            const float e = expf(sr[j] - mx);
            pr[j] = e;
            sum += e;
        }
        const float inv = 1.0f / warp_allsum(sum);
        for (int j = lane; j < cols; j += 32) pr[j] *= inv;
    }
}

// ds = p * (dp - sum_j p_j dp_j). ds may alias dp.
// hot
extern "C" __global__ void attn_softmax_backward_f32(const float* p, const float* dp, float* ds, i64 rows, int cols) {
    const i64 warps = ((i64)gridDim.x * blockDim.x) >> 5;
    const int lane = threadIdx.x & 31;
    for (i64 row = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5; row < rows; row += warps) {
        const float* pr = p + row * cols;
        const float* gr = dp + row * cols;
        float dot = 0.0f;
        for (int j = lane; j < cols; j += 32) dot = fmaf(pr[j], gr[j], dot);
        dot = warp_allsum(dot);
        float* dr = ds + row * cols;
        for (int j = lane; j < cols; j += 32) dr[j] = pr[j] * (gr[j] - dot);
    }
}

// The bf16 policy's forward: as attn_softmax_f32, each probability rounded to bf16 as it is
// stored (the form the backward keeps). The exponentials are recomputed in the last pass rather
// than stored unnormalised, so every value is the f32 kernel's, rounded once.
// hot
extern "C" __global__ void attn_softmax_f32_to_bf16(const float* s, __nv_bfloat16* p, i64 rows, int cols) {
    const i64 warps = ((i64)gridDim.x * blockDim.x) >> 5;
    const int lane = threadIdx.x & 31;
    for (i64 row = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5; row < rows; row += warps) {
        const float* sr = s + row * cols;
        __nv_bfloat16* pr = p + row * cols;
        float mx = -INFINITY;
        for (int j = lane; j < cols; j += 32) mx = fmaxf(mx, sr[j]);
        mx = warp_allmax(mx);
        float sum = 0.0f;
        for (int j = lane; j < cols; j += 32) sum += expf(sr[j] - mx);
        const float inv = 1.0f / warp_allsum(sum);
        for (int j = lane; j < cols; j += 32) pr[j] = __float2bfloat16_rn(expf(sr[j] - mx) * inv);
    }
}

// The softmax VJP from bf16 probabilities, in place: g = p * (g - sum_j p_j g_j). Each row's dot
// is complete (warp_allsum) before any of its elements is overwritten.
// hot
extern "C" __global__ void attn_softmax_backward_bf16p(const __nv_bfloat16* p, float* g, i64 rows, int cols) {
    const i64 warps = ((i64)gridDim.x * blockDim.x) >> 5;
    const int lane = threadIdx.x & 31;
    for (i64 row = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5; row < rows; row += warps) {
        const __nv_bfloat16* pr = p + row * cols;
        float* gr = g + row * cols;
        float dot = 0.0f;
        for (int j = lane; j < cols; j += 32) dot = fmaf(__bfloat162float(pr[j]), gr[j], dot);
        dot = warp_allsum(dot);
        for (int j = lane; j < cols; j += 32) gr[j] = __bfloat162float(pr[j]) * (gr[j] - dot);
    }
}
