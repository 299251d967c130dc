// One fused optimizer pass over the flat parameter buffer: global-norm gradient clipping (the
// norm comes from the deterministic reduction in reduce.cu and is read here from device memory),
// Adam with bias correction (optax semantics), and the EMA update of the averaged copy.
// Identical to src/train/adam.rs on the CPU.
//
// Launch contract: any grid/block; grid-stride.
#include "common.cuh"

// Mirrored in Rust by a generated struct (build/interface.rs). The (1 - x) factors come from the
// host, rounded once from f64 as the CPU body rounds them.
struct AdamKernelParams {
    float lr, beta1, beta2, one_minus_beta1, one_minus_beta2, eps;
    float bias1, bias2;       // 1 - beta^t
    float max_norm;           // <= 0: no clipping
    float one_minus_decay;    // the EMA step
    int use_ema;              // 0: no EMA (and `ema` may be null)
};
CHECK_LAYOUT(AdamKernelParams);

// hot
extern "C" __global__ void adam_step_f32(float* p, const float* g, float* m, float* v, NULLABLE float* ema,
                                         const float* grad_norm, i64 n, AdamKernelParams a) {
    const float norm = *grad_norm;
    const float scale = (a.max_norm > 0.0f && norm > a.max_norm) ? a.max_norm / norm : 1.0f;
    const i64 step = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
        const float gi = g[i] * scale;
        const float mi = a.beta1 * m[i] + a.one_minus_beta1 * gi;
        const float vi = a.beta2 * v[i] + a.one_minus_beta2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        const float pi = p[i] - a.lr * (mi / a.bias1) / (sqrtf(vi / a.bias2) + a.eps);
        p[i] = pi;
        if (a.use_ema) ema[i] += a.one_minus_decay * (pi - ema[i]);
    }
}
