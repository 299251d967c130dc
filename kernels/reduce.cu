// Deterministic reductions. Every partial sum is accumulated in f64 in a fixed order (fixed block
// size REDUCE_THREADS, fixed grid for a given length, fixed tree), with no atomics, so results
// are bit-identical run to run.
//
// Launch contract: blockDim.x == REDUCE_THREADS for every kernel here.
#include "common.cuh"

// Stage 1 of a full sum: block b sums the elements b, b + gridDim.x * REDUCE_THREADS, ... of its
// threads and writes one f64 partial. The host picks gridDim.x from n alone.
// hot
extern "C" __global__ void reduce_sum_partial_f32(const float* x, i64 n, double* partials) {
    __shared__ double scratch[REDUCE_THREADS / 32];
    const i64 stride = (i64)gridDim.x * REDUCE_THREADS;
    double acc = 0.0;
    for (i64 i = (i64)blockIdx.x * REDUCE_THREADS + threadIdx.x; i < n; i += stride) acc += (double)x[i];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// Stage 2: one block sums the partials and writes the f32 result.
extern "C" __global__ void reduce_sum_finish(const double* partials, int count, float* out) {
    __shared__ double scratch[REDUCE_THREADS / 32];
    double acc = 0.0;
    for (int i = threadIdx.x; i < count; i += REDUCE_THREADS) acc += partials[i];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) out[0] = (float)acc;
}

// out[r] = sum_c a[r, c] * b[r, c] for a batch of `rows` rows of length `cols`. One block per row
// (grid-stride over rows). With sqrt_result, out[r] = sqrt of that (the L2 norm when a == b).
// hot
extern "C" __global__ void reduce_row_dot_f32(const float* a, const float* b, float* out, i64 rows, i64 cols,
                                              int sqrt_result) {
    __shared__ double scratch[REDUCE_THREADS / 32];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* ar = a + r * cols;
        const float* br = b + r * cols;
        double acc = 0.0;
        for (i64 c = threadIdx.x; c < cols; c += REDUCE_THREADS) acc += (double)ar[c] * (double)br[c];
        acc = block_sum(acc, scratch);
        if (threadIdx.x == 0) out[r] = (float)(sqrt_result ? sqrt(acc) : acc);
    }
}
