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
//   log[3]  the current step's loss, written by the step before its norm is finished
//   log[4]  records written since the host last read the log (the next record's index)
//   log[5..8]  the current update's learning rate, 1 - beta1^t and 1 - beta2^t
//   log[LOG_HEADER + 2 s], log[LOG_HEADER + 2 s + 1]: record s's loss and gradient norm
// Everything a step varies by (its record, its learning rate, its bias correction) lives here or
// in the step clock, on the device, so a captured step replays as the next step.
#define LOG_HEADER 8
#define LOG_FLAG 0
#define LOG_FIRST_BAD 1
#define LOG_GATE 2
#define LOG_LOSS 3
#define LOG_RECORDS 4
#define LOG_LR 5
#define LOG_BIAS1 6
#define LOG_BIAS2 7

// The learning-rate schedule and the moments' decays, for the per-step scalars the norm's finish
// computes from the step clock: lr as src/train/adam.rs LrSchedule::at computes it (the same f64
// operations); 1 - beta^t by CUDA's pow where the host uses powi, which may differ in the last
// f64 bit and so, rarely, in the last bit of the f32 value.
struct AdamSchedule {
    double lr_init, lr_end;  // constant: lr_init (lr_end unused)
    double beta1, beta2;
    u64 lr_steps;            // linear: the steps the decay spans
    int linear;              // 0: constant, 1: linear
};
CHECK_LAYOUT(AdamSchedule);

// The gradient norm of one step: sqrt of the sum of the `count` f64 partials that
// reduce_rows_partial_f32 wrote for the flat gradient, added in a fixed order. Then, in one
// thread: the step's record (the next of the log's `capacity`) gets the loss waiting in log[3]
// and the norm; the flag goes up when either is not finite (or the log is full: the host grows
// it before that); the gate is set; the update's learning rate and bias corrections are computed
// from the step clock `clock` (the update's index, 0 for the first), which then advances to the
// next step. One block of REDUCE_THREADS threads.
extern "C" __global__ void adam_norm_finish_f32(const double* partials, int count, float* log, i64 capacity,
                                                u64* clock, AdamSchedule s) {
    __shared__ double scratch[REDUCE_THREADS / 32];
    double acc = 0.0;
    for (int i = threadIdx.x; i < count; i += REDUCE_THREADS) acc += partials[i];
    acc = block_sum(acc, scratch);
    if (threadIdx.x != 0) return;
    const float norm = (float)sqrt(acc);
    const float loss = log[LOG_LOSS];
    const i64 slot = (i64)log[LOG_RECORDS];
    const bool stored = slot < capacity;
    if (stored) {
        float* record = log + LOG_HEADER + 2 * slot;
        record[0] = loss;
        record[1] = norm;
        log[LOG_RECORDS] = (float)(slot + 1);
    }
    if (log[LOG_FLAG] == 0.0f && !(stored && isfinite(loss) && isfinite(norm))) {
        log[LOG_FLAG] = 1.0f;
        log[LOG_FIRST_BAD] = (float)slot;
    }
    log[LOG_GATE] = log[LOG_FLAG] != 0.0f ? __int_as_float(0x7fc00000) : norm;
    const u64 step = *clock;
    // __dmul_rn / __dadd_rn: no contraction into an fma, so the same roundings as the host's.
    const double lr = s.linear ? __dadd_rn(s.lr_init, __dmul_rn(s.lr_end - s.lr_init,
                                                                fmin((double)(step + 1) / (double)(s.lr_steps + 1), 1.0)))
                               : s.lr_init;
    const double t = (double)(step + 1);
    log[LOG_LR] = (float)lr;
    log[LOG_BIAS1] = (float)(1.0 - pow(s.beta1, t));
    log[LOG_BIAS2] = (float)(1.0 - pow(s.beta2, t));
    *clock = step + 1;
}

// Mirrored in Rust by a generated struct (build/interface.rs). The (1 - x) factors come from the
// host, rounded once from f64 as the CPU body rounds them; the per-step scalars come from the log.
struct AdamKernelParams {
    float beta1, beta2, one_minus_beta1, one_minus_beta2, eps;
    float max_norm;           // <= 0: no clipping
    float one_minus_decay;    // the EMA step
    int use_ema;              // 0: no EMA (and `ema` may be null)
};
CHECK_LAYOUT(AdamKernelParams);

// The update. It reads the log's header `log`: the gate (when it is not finite, this step or an
// earlier one went non-finite, and the kernel leaves every buffer alone, so the parameters stay
// those of the last good step), the learning rate and the bias corrections. `p_bf16` (may be
// null): the bf16 copy of the parameters the bf16 policy's layers read, rounded to nearest even
// from each new value in the same pass (the weights cast once per step, with no pass of their
// own). Launch contract: any grid/block; grid-stride.
// hot
extern "C" __global__ void adam_step_f32(float* p, const float* g, float* m, float* v, NULLABLE float* ema,
                                         NULLABLE __nv_bfloat16* p_bf16, const float* log, i64 n,
                                         AdamKernelParams a) {
    const float norm = log[LOG_GATE], lr = log[LOG_LR], bias1 = log[LOG_BIAS1], bias2 = log[LOG_BIAS2];
    if (!isfinite(norm)) return;
    const float scale = (a.max_norm > 0.0f && norm > a.max_norm) ? a.max_norm / norm : 1.0f;
    const i64 step = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
        const float gi = g[i] * scale;
        const float mi = a.beta1 * m[i] + a.one_minus_beta1 * gi;
        const float vi = a.beta2 * v[i] + a.one_minus_beta2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        const float pi = p[i] - lr * (mi / bias1) / (sqrtf(vi / bias2) + a.eps);
        p[i] = pi;
        if (a.use_ema) ema[i] += a.one_minus_decay * (pi - ema[i]);
        if (p_bf16 != nullptr) p_bf16[i] = __float2bfloat16_rn(pi);
    }
}
