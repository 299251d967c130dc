// The samplers' update, fused with its noise: x <- x - a (x - d) + c * eps, where d is the
// denoiser's output and eps element i is normal element offset + i of Philox (seed, stream).
//   DDPM (ancestral, DDIM eta = 1): a = tau = 1 - s^2/t^2, c = s sqrt(tau)
//   DDIM (eta = 0):                  a = 1 - s/t,          c = 0
//   Langevin correction at s:        a = tau_c,            c = s sqrt(2 tau_c)
// A sampler step reads everything that changes from step to step on the device, so one step
// captured in a CUDA graph replays as the next (src/diffusion/sampler.rs): a and c come from
// row `step` of the sampler's table (columns col, col + 1), the noise from the stream moved by
// the same step clock, and the noise levels its denoiser runs at from the table's first three
// columns (sampler_levels_f32). Identical to src/diffusion/sampler.rs on the CPU (same Philox
// normals, the table's f32 values).
//
// Launch contract: any grid/block; grid-stride (step_clock_advance: one thread).
#include "common.cuh"

// hot
extern "C" __global__ void sampler_step_f32(float* x, const float* d, i64 n, const float* table, i64 stride, i64 col,
                                            u64 seed, u64 stream, u64 offset, u64 clock, u64 stream_per_step,
                                            u64 offset_per_step) {
    const u64 row = *reinterpret_cast<const u64*>(clock);
    const float a = table[row * (u64)stride + (u64)col];
    const float c = table[row * (u64)stride + (u64)col + 1];
    const PhiloxAt at = philox_at(stream, offset, clock, stream_per_step, offset_per_step);
    const i64 step = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
        float v = x[i] - a * (x[i] - d[i]);
        if (c != 0.0f) {
            const u64 e = at.offset + (u64)i;
            const Philox4 r = philox_block(seed, at.stream, e / 4);
            const int lane = (int)(e % 4);
            // Selected, not indexed: r.v[lane & 2] would put r in local memory.
            const bool hi = lane & 2;
            float z0, z1;
            philox_normal_pair(hi ? r.v[2] : r.v[0], hi ? r.v[3] : r.v[1], &z0, &z1);
            v += c * ((lane & 1) ? z1 : z0);
        }
        x[i] = v;
    }
}

// A noise level for every row of a batch: sigma, sigma^2 and sigma^2 / (1 + sigma^2) from
// columns 0, 1, 2 of row (clock's step + ahead) of the sampler's table.
extern "C" __global__ void sampler_levels_f32(const float* table, i64 stride, u64 clock, i64 ahead, float* sigma,
                                              float* sigma2, float* shrink, i64 n) {
    const u64 row = *reinterpret_cast<const u64*>(clock) + (u64)ahead;
    const float s = table[row * (u64)stride], s2 = table[row * (u64)stride + 1],
                r = table[row * (u64)stride + 2];
    const i64 step = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
        sigma[i] = s;
        sigma2[i] = s2;
        shrink[i] = r;
    }
}

// Ends a sampler step: its clock moves to the next one (one thread; queued after every kernel
// of the step, so each of them read the step it belongs to).
extern "C" __global__ void step_clock_advance(u64* clock) {
    if (blockIdx.x == 0 && threadIdx.x == 0) *clock += 1;
}
