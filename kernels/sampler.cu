// The samplers' update, fused with its noise: x <- x - a (x - d) + c * eps, where d is the
// denoiser's output and eps element i is normal element offset + i of Philox (seed, stream).
//   DDPM (ancestral, DDIM eta = 1): a = tau = 1 - s^2/t^2, c = s sqrt(tau)
//   DDIM (eta = 0):                  a = 1 - s/t,          c = 0
//   Langevin correction at s:        a = tau_c,            c = s sqrt(2 tau_c)
// Identical to src/diffusion/sampler.rs on the CPU (same Philox normals).
//
// Launch contract: any grid/block; grid-stride.
#include "common.cuh"

// hot
extern "C" __global__ void sampler_step_f32(float* x, const float* d, i64 n, float a, float c, u64 seed, u64 stream,
                                            u64 offset) {
    const i64 step = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
        float v = x[i] - a * (x[i] - d[i]);
        if (c != 0.0f) {
            const u64 e = offset + (u64)i;
            const Philox4 r = philox_block(seed, stream, e / 4);
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
