// Shared device helpers: grid-stride indexing, deterministic block reductions, and the Philox4x32-10
// generator that src/ops/rng.rs mirrors bit for bit on the CPU.
#pragma once
#include <stdint.h>

typedef long long i64;
typedef unsigned long long u64;

// Every kernel that reduces is launched with exactly this many threads per block, so the
// reduction tree (and hence the rounding) is fixed: results are identical run to run.
#define REDUCE_THREADS 256

// True when every pointer is 16-byte aligned, so float4 loads and stores are legal.
__device__ __forceinline__ bool aligned16(const void* a) { return ((uintptr_t)a & 15u) == 0; }

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    return v;
}

// Sum of `v` over a block of REDUCE_THREADS threads, in a fixed order; the result is valid in
// thread 0. `scratch` needs REDUCE_THREADS / 32 doubles of shared memory. Ends with a barrier so
// the caller may reuse `scratch` immediately.
__device__ __forceinline__ double block_sum(double v, double* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    double total = 0.0;
    if (warp == 0) {
        total = lane < (REDUCE_THREADS / 32) ? scratch[lane] : 0.0;
        total = warp_sum(total);
    }
    __syncthreads();
    return total;
}

// ---------------------------------------------------------------------------------------------
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11).
// Key = the 64-bit seed; counter = (block index lo, hi, stream lo, hi). Element i of a stream is
// lane i % 4 of counter block i / 4.
// ---------------------------------------------------------------------------------------------
struct Philox4 {
    uint32_t v[4];
};

__device__ __forceinline__ Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                                uint32_t k0, uint32_t k1) {
    const uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
    const uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#pragma unroll
    for (int r = 0; r < 10; ++r) {
        if (r > 0) {
            k0 += W0;
            k1 += W1;
        }
        const uint32_t hi0 = __umulhi(M0, c0), lo0 = M0 * c0;
        const uint32_t hi1 = __umulhi(M1, c2), lo1 = M1 * c2;
        const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
        c0 = n0;
        c1 = lo1;
        c2 = n2;
        c3 = lo0;
    }
    Philox4 out;
    out.v[0] = c0;
    out.v[1] = c1;
    out.v[2] = c2;
    out.v[3] = c3;
    return out;
}

__device__ __forceinline__ Philox4 philox_block(u64 seed, u64 stream, u64 block) {
    return philox4x32_10((uint32_t)block, (uint32_t)(block >> 32), (uint32_t)stream,
                         (uint32_t)(stream >> 32), (uint32_t)seed, (uint32_t)(seed >> 32));
}

// Uniform in the open interval (0, 1) from the top 23 bits, centred in their bin: (k + 0.5) / 2^23
// is exact in f32 for k < 2^23, so the largest value is 1 - 2^-24, never 1 (with 24 bits the
// + 0.5 would round k = 2^24 - 1 up to exactly 1).
__device__ __forceinline__ float philox_uniform(uint32_t x) {
    return ((float)(x >> 9) + 0.5f) * 1.1920928955078125e-7f;  // 2^-23
}

// Box-Muller on two 32-bit words, computed in f64 and rounded once, so the CPU (Rust's libm)
// and the GPU agree on the f32 result except in vanishingly rare rounding ties.
__device__ __forceinline__ void philox_normal_pair(uint32_t a, uint32_t b, float* z0, float* z1) {
    const double u1 = ((double)a + 0.5) * 2.3283064365386963e-10;  // 2^-32, in (0, 1)
    const double u2 = ((double)b + 0.5) * 2.3283064365386963e-10;
    const double r = sqrt(-2.0 * log(u1));
    double s, c;
    sincos(6.283185307179586 * u2, &s, &c);  // the same f64 product as the CPU side
    *z0 = (float)(r * c);
    *z1 = (float)(r * s);
}

// f32 warp sum by butterfly: every lane ends with the same total, in a fixed order.
__device__ __forceinline__ float warp_allsum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}
