// Elementwise maps over contiguous f32 buffers: fill, add, mul, scale, axpy, SiLU and its
// backward. Grid-stride loops with float4 loads when every pointer is 16-byte aligned (always
// true for buffers from the device pool), scalar otherwise and for the tail.
//
// Launch contract: any grid, any block size; n is the element count (64-bit). Outputs may alias
// inputs (axpy updates y in place).
#include <cuda_bf16.h>
#include "common.cuh"

struct AddOp {
    __device__ float operator()(float a, float b) const { return a + b; }
};
struct MulOp {
    __device__ float operator()(float a, float b) const { return a * b; }
};
struct ScaleOp {
    float alpha;
    __device__ float operator()(float x) const { return alpha * x; }
};
struct AxpyOp {  // (x, y) -> y + alpha * x
    float alpha;
    __device__ float operator()(float x, float y) const { return fmaf(alpha, x, y); }
};
struct SiluOp {
    __device__ float operator()(float x) const { return silu_value(x); }
};
struct SiluBackwardOp {  // (x, dy) -> dy * d/dx[x * sigmoid(x)]
    __device__ float operator()(float x, float dy) const { return silu_grad(x, dy); }
};

template <class Op>
__device__ __forceinline__ float4 map4(const float4& x, const Op& op) {
    return make_float4(op(x.x), op(x.y), op(x.z), op(x.w));
}
template <class Op>
__device__ __forceinline__ float4 map4(const float4& x, const float4& y, const Op& op) {
    return make_float4(op(x.x, y.x), op(x.y, y.y), op(x.z, y.z), op(x.w, y.w));
}

template <class Op>
__device__ __forceinline__ void unary_map(const float* x, float* out, i64 n, Op op) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    const i64 first = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    i64 done = 0;
    if (aligned16(x) && aligned16(out)) {
        const i64 n4 = n / 4;
        const float4* x4 = reinterpret_cast<const float4*>(x);
        float4* o4 = reinterpret_cast<float4*>(out);
        for (i64 i = first; i < n4; i += stride) o4[i] = map4(x4[i], op);
        done = n4 * 4;
    }
    for (i64 i = done + first; i < n; i += stride) out[i] = op(x[i]);
}

template <class Op>
__device__ __forceinline__ void binary_map(const float* a, const float* b, float* out, i64 n, Op op) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    const i64 first = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    i64 done = 0;
    if (aligned16(a) && aligned16(b) && aligned16(out)) {
        const i64 n4 = n / 4;
        const float4* a4 = reinterpret_cast<const float4*>(a);
        const float4* b4 = reinterpret_cast<const float4*>(b);
        float4* o4 = reinterpret_cast<float4*>(out);
        for (i64 i = first; i < n4; i += stride) o4[i] = map4(a4[i], b4[i], op);
        done = n4 * 4;
    }
    for (i64 i = done + first; i < n; i += stride) out[i] = op(a[i], b[i]);
}

extern "C" __global__ void ew_fill_f32(float* out, i64 n, float value) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) out[i] = value;
}

// hot
extern "C" __global__ void ew_add_f32(const float* a, const float* b, float* out, i64 n) {
    binary_map(a, b, out, n, AddOp{});
}

// hot
extern "C" __global__ void ew_mul_f32(const float* a, const float* b, float* out, i64 n) {
    binary_map(a, b, out, n, MulOp{});
}

// hot
extern "C" __global__ void ew_scale_f32(const float* x, float* out, i64 n, float alpha) {
    unary_map(x, out, n, ScaleOp{alpha});
}

// y <- y + alpha * x, in place.
// hot
extern "C" __global__ void ew_axpy_f32(const float* x, float* y, i64 n, float alpha) {
    binary_map(x, y, y, n, AxpyOp{alpha});
}

// hot
extern "C" __global__ void ew_silu_f32(const float* x, float* out, i64 n) {
    unary_map(x, out, n, SiluOp{});
}

// dx = dy * silu'(x); dx may alias dy.
// hot
extern "C" __global__ void ew_silu_backward_f32(const float* x, const float* dy, float* dx, i64 n) {
    binary_map(x, dy, dx, n, SiluBackwardOp{});
}

// SiLU and its VJP of an activation kept in bf16 (ResBlock's c1 under the bf16 policy): the same
// f32 arithmetic on the widened values, without a widened copy in memory.
// hot
extern "C" __global__ void ew_silu_bf16x(const __nv_bfloat16* x, float* out, i64 n) {
    const i64 step = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) out[i] = silu_value(ld(x, i));
}

// hot
extern "C" __global__ void ew_silu_backward_bf16x(const __nv_bfloat16* x, const float* dy, float* dx, i64 n) {
    const i64 step = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) dx[i] = silu_grad(ld(x, i), dy[i]);
}

// out = a / b, and 0 where b == 0 (CG's per-system step sizes: a converged system has p = 0).
// hot
extern "C" __global__ void ew_div_guarded_f32(const float* a, const float* b, float* out, i64 n) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) out[i] = b[i] == 0.0f ? 0.0f : a[i] / b[i];
}

// ---- precision casts (the bf16 policy's operands) -----------------------------------------------
// f32 -> bf16 rounds to nearest even (NaN stays NaN, +-inf and +-0 are kept); bf16 -> f32 is exact.
// Launch contract as above; n is the element count.

// hot
extern "C" __global__ void cast_f32_to_bf16(const float* x, __nv_bfloat16* y, i64 n) {
    const i64 step = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) y[i] = __float2bfloat16_rn(x[i]);
}

// hot
extern "C" __global__ void cast_bf16_to_f32(const __nv_bfloat16* x, float* y, i64 n) {
    const i64 step = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) y[i] = __bfloat162float(x[i]);
}
