// Inverted dropout driven by Philox: element i is kept when uniform(seed, stream, offset + i)
// >= p, and scaled by 1 / (1 - p). The backward regenerates the same mask from the same
// counters, so nothing is stored. Identical to src/nn/dropout.rs on the CPU.
//
// The Philox position may move with a step clock on the device (`clock`, `stream_per_step`,
// `offset_per_step`: philox_at in common.cuh; clock 0: fixed), so a captured training step
// replays with the next step's masks. Launch contract: any grid/block; grid-stride.
#include "common.cuh"

// `scale` = 1 / (1 - p), rounded once on the host from f64 as the CPU body does.
// hot
extern "C" __global__ void dropout_f32(const float* x, float* y, i64 n, float p, float scale, u64 seed, u64 stream,
                                       u64 offset, u64 clock, u64 stream_per_step, u64 offset_per_step) {
    const PhiloxAt at = philox_at(stream, offset, clock, stream_per_step, offset_per_step);
    stream = at.stream;
    offset = at.offset;
    const i64 step = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
        const u64 e = offset + (u64)i;
        const Philox4 r = philox_block(seed, stream, e / 4);
        const float u = philox_uniform(r.v[e % 4]);
        y[i] = u >= p ? x[i] * scale : 0.0f;
    }
}

// The ResBlock's conv2 input from c1 kept in bf16 (the bf16 policy), one pass:
// out = dropout(silu(c1)), the same arithmetic as ew_silu then dropout_f32 (p = 0: silu(c1),
// nothing drawn). Stored f32, or bf16 (rounded to nearest even) when conv2 reads bf16 operands:
// then conv2 needs no cast of its own.
template <class Y>
__device__ __forceinline__ void silu_dropout(const __nv_bfloat16* x, Y* out, i64 n, float p, float scale, u64 seed,
                                             PhiloxAt at) {
    const u64 stream = at.stream, offset = at.offset;
    const i64 step = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
        float v = silu_value(ld(x, i));
        if (p > 0.0f) {
            const u64 e = offset + (u64)i;
            const Philox4 r = philox_block(seed, stream, e / 4);
            v = philox_uniform(r.v[e % 4]) >= p ? v * scale : 0.0f;
        }
        st(out, i, v);
    }
}

// hot
extern "C" __global__ void silu_dropout_bf16x(const __nv_bfloat16* x, float* out, i64 n, float p, float scale,
                                              u64 seed, u64 stream, u64 offset, u64 clock, u64 stream_per_step,
                                              u64 offset_per_step) {
    silu_dropout(x, out, n, p, scale, seed, philox_at(stream, offset, clock, stream_per_step, offset_per_step));
}

// hot
extern "C" __global__ void silu_dropout_bf16x_bf16y(const __nv_bfloat16* x, __nv_bfloat16* out, i64 n, float p,
                                                    float scale, u64 seed, u64 stream, u64 offset, u64 clock,
                                                    u64 stream_per_step, u64 offset_per_step) {
    silu_dropout(x, out, n, p, scale, seed, philox_at(stream, offset, clock, stream_per_step, offset_per_step));
}

// Its VJP in place: g = silu'(c1) * dropout(g), the same arithmetic as dropout_f32 then
// ew_silu_backward. p = 0 (no dropout) keeps every element with scale 1 and draws nothing.
// hot
extern "C" __global__ void silu_dropout_backward_bf16x(const __nv_bfloat16* x, float* g, i64 n, float p, float scale,
                                                       u64 seed, u64 stream, u64 offset, u64 clock,
                                                       u64 stream_per_step, u64 offset_per_step) {
    const PhiloxAt at = philox_at(stream, offset, clock, stream_per_step, offset_per_step);
    stream = at.stream;
    offset = at.offset;
    const i64 step = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
        float d = g[i];
        if (p > 0.0f) {
            const u64 e = offset + (u64)i;
            const Philox4 r = philox_block(seed, stream, e / 4);
            d = philox_uniform(r.v[e % 4]) >= p ? d * scale : 0.0f;
        }
        g[i] = silu_grad(ld(x, i), d);
    }
}
