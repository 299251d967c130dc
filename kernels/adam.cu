// One fused optimizer pass over the flat parameter buffer: global-norm gradient clipping (the
// norm comes from the deterministic reduction in reduce.cu and is read here from device memory),
// Adam with bias correction (optax semantics), and the EMA update of the averaged copy; and the
// end of that norm's reduction, which also keeps the training log's sticky non-finite flag.
// Identical to src/train/adam.rs and src/train/log.rs on the CPU.
#include "common.cuh"

// The training log (src/train/log.rs), one f32 buffer: a header, then one record per step.
//   log[0]  1 once a step had a non-finite loss or gradient norm (sticky), else 0
//   log[1]  the record index of the first such step
//   log[2]  the norm Adam clips with: this step's norm, or NaN once the flag is up
//   log[3]  unused
//   log[LOG_HEADER + 2 s], log[LOG_HEADER + 2 s + 1]: step s's loss and gradient norm
#define LOG_HEADER 4

// The gradient norm of one step: sqrt of the sum of the `count` f64 partials that
// reduce_rows_partial_f32 wrote for the flat gradient, added in a fixed order. Records it in slot
// `slot`, raises the flag when that step's loss (written before, in stream order) or its norm is
// not finite, and sets the gate. One block of REDUCE_THREADS threads.
extern "C" __global__ void adam_norm_finish_f32(const double* partials, int count, float* log, i64 slot) {
    __shared__ double scratch[REDUCE_THREADS / 32];
    double acc = 0.0;
    for (int i = threadIdx.x; i < count; i += REDUCE_THREADS) acc += partials[i];
    acc = block_sum(acc, scratch);
    if (threadIdx.x != 0) return;
    const float norm = (float)sqrt(acc);
    float* record = log + LOG_HEADER + 2 * slot;
    record[1] = norm;
    if (log[0] == 0.0f && !(isfinite(record[0]) && isfinite(norm))) {
        log[0] = 1.0f;
        log[1] = (float)slot;
    }
    log[2] = log[0] != 0.0f ? __int_as_float(0x7fc00000) : norm;
}

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

// The update. `grad_norm` is the log's gate: when it is not finite (this step or an earlier one
// went non-finite) the kernel leaves every buffer alone, so the parameters stay those of the
// last good step. `p_bf16` (may be null): the bf16 copy of the parameters the bf16 policy's
// layers read, rounded to nearest even from each new value in the same pass (the weights cast
// once per step, with no pass of their own). Launch contract: any grid/block; grid-stride.
// hot
extern "C" __global__ void adam_step_f32(float* p, const float* g, float* m, float* v, NULLABLE float* ema,
                                         NULLABLE __nv_bfloat16* p_bf16, const float* grad_norm, i64 n,
                                         AdamKernelParams a) {
    const float norm = *grad_norm;
    if (!isfinite(norm)) return;
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
        if (p_bf16 != nullptr) p_bf16[i] = __float2bfloat16_rn(pi);
    }
}
