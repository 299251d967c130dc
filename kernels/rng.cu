// Counter-based random streams (Philox4x32-10, see common.cuh). Element j of the output is element
// offset + j of stream `stream` under key `seed`, exactly as src/ops/rng.rs computes it on the CPU.
//
// Launch contract: any grid and block; each thread produces whole counter blocks (4 values), so
// the work is independent of the launch geometry.
#include "common.cuh"

// Calls emit(j, value) for every output index j whose element lands in counter block `blk`.
template <class Emit>
__device__ __forceinline__ void for_block_elements(u64 blk, u64 offset, i64 n, const float (&v)[4], Emit emit) {
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
        const u64 e = blk * 4 + lane;
        if (e >= offset && e < offset + (u64)n) emit((i64)(e - offset), v[lane]);
    }
}

struct Store {
    float* out;
    __device__ void operator()(i64 j, float v) const { out[j] = v; }
};

// `clock`, `stream_per_step`, `offset_per_step`: the position may move with a step clock
// (philox_at in common.cuh; clock 0: fixed at `stream`, `offset`).
extern "C" __global__ void rng_uniform_f32(float* out, i64 n, u64 seed, u64 stream, u64 offset, u64 clock,
                                           u64 stream_per_step, u64 offset_per_step) {
    if (n <= 0) return;
    const PhiloxAt at = philox_at(stream, offset, clock, stream_per_step, offset_per_step);
    stream = at.stream;
    offset = at.offset;
    const u64 first = offset / 4, last = (offset + (u64)n - 1) / 4;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 blk = first + (u64)blockIdx.x * blockDim.x + threadIdx.x; blk <= last; blk += stride) {
        const Philox4 r = philox_block(seed, stream, blk);
        const float v[4] = {philox_uniform(r.v[0]), philox_uniform(r.v[1]), philox_uniform(r.v[2]),
                            philox_uniform(r.v[3])};
        for_block_elements(blk, offset, n, v, Store{out});
    }
}

extern "C" __global__ void rng_normal_f32(float* out, i64 n, u64 seed, u64 stream, u64 offset, u64 clock,
                                          u64 stream_per_step, u64 offset_per_step) {
    if (n <= 0) return;
    const PhiloxAt at = philox_at(stream, offset, clock, stream_per_step, offset_per_step);
    stream = at.stream;
    offset = at.offset;
    const u64 first = offset / 4, last = (offset + (u64)n - 1) / 4;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 blk = first + (u64)blockIdx.x * blockDim.x + threadIdx.x; blk <= last; blk += stride) {
        const Philox4 r = philox_block(seed, stream, blk);
        float v[4];
        philox_normal_pair(r.v[0], r.v[1], &v[0], &v[1]);
        philox_normal_pair(r.v[2], r.v[3], &v[2], &v[3]);
        for_block_elements(blk, offset, n, v, Store{out});
    }
}

// The noise levels of a training batch (src/diffusion/schedule.rs beta33 and VeSchedule::sigma):
// row i's training time t is the median of the five uniforms 5 r .. 5 r + 4 of the stream,
// r = offset + i (rows, moved by the clock per step: a step's batch starts at step * batch), and
// sigma = exp((1 - t) ln_min + t ln_max) in f64, stored f32. One thread per row.
extern "C" __global__ void rng_train_sigmas_f32(float* sigma, i64 n, u64 seed, u64 stream, u64 offset, u64 clock,
                                                u64 stream_per_step, u64 offset_per_step, double ln_min,
                                                double ln_max) {
    const PhiloxAt at = philox_at(stream, offset, clock, stream_per_step, offset_per_step);
    const i64 step = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
        float u[5];
#pragma unroll
        for (int j = 0; j < 5; ++j) {
            const u64 e = 5 * (at.offset + (u64)i) + (u64)j;
            const Philox4 r = philox_block(seed, at.stream, e >> 2);
            const uint32_t lane = (uint32_t)(e & 3);
            u[j] = philox_uniform(lane == 0 ? r.v[0] : lane == 1 ? r.v[1] : lane == 2 ? r.v[2] : r.v[3]);
        }
        // The median of five by partial selection sort (no NaN: uniforms are in (0, 1)).
#pragma unroll
        for (int a = 0; a < 3; ++a) {
#pragma unroll
            for (int b = a + 1; b < 5; ++b) {
                const float lo = fminf(u[a], u[b]), hi = fmaxf(u[a], u[b]);
                u[a] = lo;
                u[b] = hi;
            }
        }
        const double t = (double)u[2];
        // No fma contraction (the host's roundings); CUDA's exp is within 1 ulp of libm's.
        sigma[i] = (float)exp(__dadd_rn(__dmul_rn(1.0 - t, ln_min), __dmul_rn(t, ln_max)));
    }
}

// A training batch drawn with replacement from a pool of rows kept on the device: row k of dst is
// row min(floor(u_k * rows), rows - 1) of src, u_k = uniform element offset + k of the stream
// (the same f32 product and truncation as src/ops/rng.rs's CPU body).
extern "C" __global__ void rng_gather_rows_uniform_f32(const float* src, float* dst, i64 rows, int per, i64 batch,
                                                        u64 seed, u64 stream, u64 offset) {
    const i64 total = batch * per, step = (i64)gridDim.x * blockDim.x;
    for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += step) {
        const i64 k = e / per;
        const u64 el = offset + (u64)k;
        const Philox4 r = philox_block(seed, stream, el >> 2);
        // A select, not r.v[el & 3]: a dynamic index would put r in local memory.
        const uint32_t lane = (uint32_t)(el & 3);
        const uint32_t bits = lane == 0 ? r.v[0] : lane == 1 ? r.v[1] : lane == 2 ? r.v[2] : r.v[3];
        const float u = philox_uniform(bits);
        i64 i = (i64)(u * (float)rows);
        if (i > rows - 1) i = rows - 1;
        dst[e] = src[i * per + (e - k * per)];
    }
}

// Position i of a random permutation of 0..rows (src/ops/rng.rs permuted_index, the same integer
// operations): a 4-round Feistel network over the smallest even power of two >= rows, keyed by
// Philox (seed, stream) and `key`, walked until it lands inside 0..rows.
__device__ __forceinline__ u64 permuted_index(u64 seed, u64 stream, u64 key, u64 rows, u64 i) {
    const u64 m = rows > 1 ? rows - 1 : 0;
    int bits = 64 - __clzll((long long)m);
    if (bits < 2) bits = 2;
    const int half = (bits + 1) / 2;
    const u64 mask = (1ull << half) - 1;
    u64 x = i;
    for (;;) {
        u64 l = x >> half, r = x & mask;
        for (u64 round = 0; round < 4; ++round) {
            const u64 f = (u64)philox_block(seed, stream, ((key * 4 + round) << 32) | r).v[0] & mask;
            const u64 t = l ^ f;
            l = r;
            r = t;
        }
        x = (l << half) | r;
        if (x < rows) return x;
    }
}

// One epoch's batch without replacement: row k of dst is row permuted_index(start + k) of src.
// A block per output row (grid-stride over rows): thread 0 walks the permutation, the block copies.
extern "C" __global__ void rng_gather_rows_permuted_f32(const float* src, float* dst, i64 rows, i64 per, i64 batch,
                                                         i64 start, u64 seed, u64 stream, u64 key) {
    __shared__ i64 row;
    for (i64 k = blockIdx.x; k < batch; k += gridDim.x) {
        if (threadIdx.x == 0) row = (i64)permuted_index(seed, stream, key, (u64)rows, (u64)(start + k));
        __syncthreads();
        const float* s = src + row * per;
        float* d = dst + k * per;
        for (i64 e = threadIdx.x; e < per; e += blockDim.x) d[e] = s[e];
        __syncthreads();
    }
}
