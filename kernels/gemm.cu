// Batched f32 GEMM with transposes, row-major:
//   C[b] = alpha * op(A[b]) * op(B[b]) + beta * C[b],   op(A) is M x K, op(B) is K x N, C is M x N.
// op(A) = A (stored M x K, row stride lda) or A^T (A stored K x M); likewise for B (N x K when
// transposed). A batch stride of 0 broadcasts one matrix over the batch (a shared weight).
// beta == 0 means C is not read (so an uninitialised or poisoned C is fine). An optional bias
// (length N, null for none) is added in the epilogue: C = alpha op(A) op(B) + beta C + bias.
//
// The kernel: 128 x 128 output tile per block of 256 threads, K in steps of 8 through shared
// memory, each thread accumulating an 8 x 8 register block (two 4-wide strips 64 apart, so the
// float4 shared loads of a warp are contiguous). Loads are bounds-checked (zero fill), so any
// M, N, K work. f32 FMA on the SIMT cores: this is the exact path the oracle checks; tensor-core
// bf16 GEMMs come as a separate precision policy.
//
// Launch contract: blockDim = 256; grid = (ceil(N/128), ceil(M/128), min(batch, 65535)).
//
// Version 2, the tensor-core GEMM (gemm_bf16_*, at the end of this file): bf16 operands, f32
// accumulation and epilogue, f32 and/or bf16 output, the main loop of mma.cuh. Launch contract:
// blockDim = 256; grid = (ceil(M/128), ceil(N/128), min(batch, 65535)); lda, ldb, N and the
// dimension each operand's 16-byte chunks run along (K, or M / N for an operand stored the other
// way) multiples of 8, pointers 16-byte aligned (whole pool buffers): src/ops/gemm.rs
// (bf16_gemm_dims) checks before launching. Rows beyond M or N, and K past its end, are zero
// filled, so M (or K for A^T B) may be anything.
#include "common.cuh"
#include "mma.cuh"

#define GEMM_BM 128
#define GEMM_BN 128
#define GEMM_BK 8
#define GEMM_THREADS 256

// Mirrored in Rust by a generated struct (build/interface.rs), re-exported by src/ops/gemm.rs.
struct GemmParams {
    int m, n, k;
    int lda, ldb, ldc;
    i64 stride_a, stride_b, stride_c;
    int batch;
    float alpha, beta;
};
CHECK_LAYOUT(GemmParams);

template <bool TA, bool TB>
__device__ __forceinline__ void gemm_body(const float* __restrict__ A, const float* __restrict__ B,
                                          float* __restrict__ C, const GemmParams& p,
                                          const float* __restrict__ bias) {
    // +4 padding: the transposing stores below (8 consecutive threads along k) hit 8 distinct
    // banks, and rows stay 16-byte aligned for the float4 reads.
    __shared__ __align__(16) float As[GEMM_BK][GEMM_BM + 4];
    __shared__ __align__(16) float Bs[GEMM_BK][GEMM_BN + 4];
    const int tid = threadIdx.x;
    const int tx = tid % 16, ty = tid / 16;
    const int m0 = blockIdx.y * GEMM_BM, n0 = blockIdx.x * GEMM_BN;

    for (int bz = blockIdx.z; bz < p.batch; bz += gridDim.z) {
        const float* Ab = A + (i64)bz * p.stride_a;
        const float* Bb = B + (i64)bz * p.stride_b;
        float* Cb = C + (i64)bz * p.stride_c;
        float acc[8][8];
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;

        for (int k0 = 0; k0 < p.k; k0 += GEMM_BK) {
            // Tile of op(A): 128 x 8 = 1024 values, 4 per thread; consecutive threads walk the
            // dimension that is contiguous in memory.
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int idx = tid + i * GEMM_THREADS;
                const int mm = TA ? idx % GEMM_BM : idx / GEMM_BK;
                const int kk = TA ? idx / GEMM_BM : idx % GEMM_BK;
                const int gm = m0 + mm, gk = k0 + kk;
                float v = 0.0f;
                if (gm < p.m && gk < p.k) v = TA ? Ab[(i64)gk * p.lda + gm] : Ab[(i64)gm * p.lda + gk];
                As[kk][mm] = v;
            }
            // Tile of op(B): 8 x 128.
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int idx = tid + i * GEMM_THREADS;
                const int nn = TB ? idx / GEMM_BK : idx % GEMM_BN;
                const int kk = TB ? idx % GEMM_BK : idx / GEMM_BN;
                const int gn = n0 + nn, gk = k0 + kk;
                float v = 0.0f;
                if (gn < p.n && gk < p.k) v = TB ? Bb[(i64)gn * p.ldb + gk] : Bb[(i64)gk * p.ldb + gn];
                Bs[kk][nn] = v;
            }
            __syncthreads();
#pragma unroll
            for (int kk = 0; kk < GEMM_BK; ++kk) {
                const float4 a0 = *reinterpret_cast<const float4*>(&As[kk][ty * 4]);
                const float4 a1 = *reinterpret_cast<const float4*>(&As[kk][64 + ty * 4]);
                const float4 b0 = *reinterpret_cast<const float4*>(&Bs[kk][tx * 4]);
                const float4 b1 = *reinterpret_cast<const float4*>(&Bs[kk][64 + tx * 4]);
                const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
                const float b[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
                for (int i = 0; i < 8; ++i)
#pragma unroll
                    for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
            }
            __syncthreads();
        }

#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int gm = m0 + (i < 4 ? ty * 4 + i : 64 + ty * 4 + (i - 4));
            if (gm >= p.m) continue;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const int gn = n0 + (j < 4 ? tx * 4 + j : 64 + tx * 4 + (j - 4));
                if (gn >= p.n) continue;
                float* c = Cb + (i64)gm * p.ldc + gn;
                float v = p.alpha * acc[i][j];
                if (p.beta != 0.0f) v = fmaf(p.beta, *c, v);
                if (bias) v += bias[gn];
                *c = v;
            }
        }
    }
}

// hot
extern "C" __global__ void __launch_bounds__(GEMM_THREADS)
    gemm_f32_nn(const float* A, const float* B, float* C, GemmParams p, NULLABLE const float* bias) {
    gemm_body<false, false>(A, B, C, p, bias);
}
// hot
extern "C" __global__ void __launch_bounds__(GEMM_THREADS)
    gemm_f32_nt(const float* A, const float* B, float* C, GemmParams p, NULLABLE const float* bias) {
    gemm_body<false, true>(A, B, C, p, bias);
}
// hot
extern "C" __global__ void __launch_bounds__(GEMM_THREADS)
    gemm_f32_tn(const float* A, const float* B, float* C, GemmParams p, NULLABLE const float* bias) {
    gemm_body<true, false>(A, B, C, p, bias);
}
// hot
extern "C" __global__ void __launch_bounds__(GEMM_THREADS)
    gemm_f32_tt(const float* A, const float* B, float* C, GemmParams p, NULLABLE const float* bias) {
    gemm_body<true, true>(A, B, C, p, bias);
}

// ---- version 2: bf16 tensor cores ---------------------------------------------------------------

// A not transposed is stored [m][k]: a K-major tile (DenseKMajor); transposed, [k][m]: MN-major.
// B not transposed is stored [k][n]: MN-major; transposed, [n][k]: K-major.
template <class LoadA, class LoadB>
__device__ __forceinline__ void gemm_bf16_body(const bf16* A, const bf16* B, float* C, bf16* C_bf16,
                                               const GemmParams& p, const float* bias) {
#if __CUDA_ARCH__ >= 800
    TC_SMEM_DECL;
    const int m0 = blockIdx.x * TC_BM, n0 = blockIdx.y * TC_BN;
    const int ktiles = (p.k + TC_BK - 1) / TC_BK;
    for (int bz = blockIdx.z; bz < p.batch; bz += gridDim.z) {
        const LoadA la{m0, p.m, p.k, p.lda};
        const LoadB lb{n0, p.n, p.k, p.ldb};
        TcAcc acc;
        tc_mainloop(tc_smem, A + (i64)bz * p.stride_a, la, B + (i64)bz * p.stride_b, lb, 0, ktiles, acc);
        const TcEpilogue e{p.alpha, p.beta, bias, C ? C + (i64)bz * p.stride_c : nullptr,
                           C_bf16 ? C_bf16 + (i64)bz * p.stride_c : nullptr, p.ldc};
        tc_store(acc, e, m0, n0, p.m, p.n);
    }
#else
    __trap();  // tensor-core kernels need sm_80 or newer; src/ops/tc.rs never launches them below
#endif
}

// hot tensor-core
extern "C" __global__ void __launch_bounds__(TC_THREADS, 2)
    gemm_bf16_nn(const __nv_bfloat16* A, const __nv_bfloat16* B, NULLABLE float* C,
                 NULLABLE __nv_bfloat16* C_bf16, GemmParams p, NULLABLE const float* bias) {
    gemm_bf16_body<DenseKMajor, DenseMNMajor>(A, B, C, C_bf16, p, bias);
}
// hot tensor-core
extern "C" __global__ void __launch_bounds__(TC_THREADS, 2)
    gemm_bf16_nt(const __nv_bfloat16* A, const __nv_bfloat16* B, NULLABLE float* C,
                 NULLABLE __nv_bfloat16* C_bf16, GemmParams p, NULLABLE const float* bias) {
    gemm_bf16_body<DenseKMajor, DenseKMajor>(A, B, C, C_bf16, p, bias);
}
// hot tensor-core
extern "C" __global__ void __launch_bounds__(TC_THREADS, 2)
    gemm_bf16_tn(const __nv_bfloat16* A, const __nv_bfloat16* B, NULLABLE float* C,
                 NULLABLE __nv_bfloat16* C_bf16, GemmParams p, NULLABLE const float* bias) {
    gemm_bf16_body<DenseMNMajor, DenseMNMajor>(A, B, C, C_bf16, p, bias);
}
