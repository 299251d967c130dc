// The paper's sinusoidal noise embedding of c_noise = ln(sigma), one row per sample:
// emb[n, j] = sin(f_j c[n]) for j < E/2 and cos(f_{j - E/2} c[n]) after, f_j = 1e-4^(j / (E/2 - 1)).
//
// Launch contract: any grid/block; grid-stride over n * E.
#include "common.cuh"

extern "C" __global__ void emb_sinusoidal_f32(const float* c_noise, float* emb, i64 n, int e) {
    const int half = e / 2;
    const i64 total = n * e, step = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        const int j = (int)(i % e), k = j < half ? j : j - half;
        const i64 s = i / e;
        // ln(1e-4) = -9.210340371976184; in f64 and rounded once, as the CPU body does.
        const float freq = (float)exp(-9.210340371976184 * (double)k / (double)(half - 1));
        const float arg = freq * c_noise[s];
        emb[i] = j < half ? sinf(arg) : cosf(arg);
    }
}

// EDM preconditioning coefficients for one sigma per sample (method.md §2.2), computed on the
// device so a sampler step uploads nothing: sigma[s] from `sigmas`, or `sigma_all` for every
// sample when `sigmas` is null. Writes c_skip, c_out, c_in, c_noise = ln sigma.
extern "C" __global__ void emb_precond_f32(NULLABLE const float* sigmas, double sigma_all, float* c_skip, float* c_out,
                                           float* c_in, float* c_noise, i64 n) {
    const i64 step = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
        const double s = sigmas ? (double)sigmas[i] : (double)sigma_all;
        const double s2 = __dmul_rn(s, s);  // not fused into s * s + 1: the host's rounding
        c_skip[i] = (float)(1.0 / (s2 + 1.0));
        c_out[i] = (float)(s / sqrt(s2 + 1.0));
        c_in[i] = (float)(1.0 / sqrt(s2 + 1.0));
        c_noise[i] = (float)log(s);
    }
}
