// The tensor-core main loop shared by the bf16 GEMMs (gemm_bf16.cu) and the implicit-GEMM
// convolutions (conv.cu): bf16 operands, f32 accumulation, sm_80 and newer.
//
// One thread block computes a TC_BM x TC_BN tile of C = A B (A is M x K, B is K x N) over a range
// of K tiles of TC_BK, with 8 warps in a 2 x 4 grid (a 64 x 32 warp tile = 4 x 4 m16n8k16 MMAs
// per 16 of K). Operands move global -> shared with cp.async (16 bytes = 8 bf16 per copy, zero
// filled where a loader says the chunk is outside the problem) in a TC_STAGES-deep ring, and
// shared -> registers with ldmatrix. Each operand tile is stored in one of two orders:
// - K-major: one row per M (or N) index, TC_BK = 32 values = 4 chunks of 16 bytes per row; chunk c
//   of row r lives at chunk c ^ ((r >> 1) & 3) (conflict-free ldmatrix and cp.async);
// - MN-major: one row per K index, 128 values = 16 chunks per row; chunk c of row r lives at
//   chunk c ^ (r & 7). Fragments are read with ldmatrix .trans.
// The loaders (the GEMM's plain matrices, the convolutions' on-the-fly im2col gathers) only say
// where each 16-byte chunk of a tile comes from and whether it exists.
//
// Fragment layout of mma.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16"; lane = 4 g + t):
// A regs a0..a3 = A[g][2t..], A[g+8][2t..], A[g][2t+8..], A[g+8][2t+8..]; B regs b0, b1 =
// B[2t..2t+1][g], B[2t+8..2t+9][g]; C regs c0..c3 = C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1].
// The ldmatrix addressing below produces exactly these (shared/docs/tensor-cores.md §1.3).
#pragma once
#include <cuda_bf16.h>
#include "common.cuh"
#include "tc_index.cuh"

typedef __nv_bfloat16 bf16;

// ---- PTX wrappers (volatile + "memory": never moved across waits and barriers) ------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

// Copies 16 bytes from global to shared, or writes 16 zero bytes when !valid (src-size 0; the
// source address is then a valid in-bounds pointer passed by the loader, never dereferenced).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    const int src_bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
                 "r"(src_bytes)
                 : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const bf16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p))
                 : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const bf16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p))
                 : "memory");
}

// d += a b for one m16n8k16 tile, bf16 operands, f32 accumulators.
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---- the main loop -------------------------------------------------------------------------------

// Accumulators of one thread: acc[i][j][r] is C[row][col] with row = warp_m + 16 i + g + 8 (r >> 1)
// and col = warp_n + 8 j + 2 t + (r & 1) (tile-relative; see tc_acc_row / tc_acc_col).
struct TcAcc {
    float v[4][4][4];
};


// Fills one stage: every thread issues 2 chunks of A and 2 of B (512 chunks each per tile), at
// the addresses its loaders give (tc_index.cuh) from the operands' bases.
template <class LoadA, class LoadB>
__device__ __forceinline__ void tc_load_stage(bf16* stage, const bf16* a, const LoadA& la, const bf16* b,
                                              const LoadB& lb, int kt) {
    bf16* as = stage;
    bf16* bs = stage + TC_TILE;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int id = threadIdx.x + i * TC_THREADS;
        int r, c;
        bool valid;
        tc_chunk_of(LoadA::K_MAJOR, id, r, c);
        tc_i64 off = la.chunk(r, c, kt, valid);
        cp_async16(as + (LoadA::K_MAJOR ? kmajor_offset(r, c) : mnmajor_offset(r, c)), a + off, valid);
        tc_chunk_of(LoadB::K_MAJOR, id, r, c);
        off = lb.chunk(r, c, kt, valid);
        cp_async16(bs + (LoadB::K_MAJOR ? kmajor_offset(r, c) : mnmajor_offset(r, c)), b + off, valid);
    }
}

// The MMAs of one stage: two k16 steps over the warp's 64 x 32 tile.
template <bool A_KMAJOR, bool B_KMAJOR>
__device__ __forceinline__ void tc_compute_stage(const bf16* stage, TcAcc& acc) {
    const bf16* as = stage;
    const bf16* bs = stage + TC_TILE;
    const int lane = threadIdx.x & 31;
    const int wm = tc_warp_m(threadIdx.x), wn = tc_warp_n(threadIdx.x);
#pragma unroll
    for (int kk = 0; kk < TC_BK; kk += 16) {
        uint32_t a[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const bf16* row = as + tc_a_ldsm_offset(A_KMAJOR, lane, wm, i, kk);
            if (A_KMAJOR)
                ldmatrix_x4(a[i], row);
            else
                ldmatrix_x4_trans(a[i], row);
        }
        uint32_t b[4][2];
#pragma unroll
        for (int j = 0; j < 4; j += 2) {
            uint32_t r[4];
            const bf16* row = bs + tc_b_ldsm_offset(B_KMAJOR, lane, wn, j, kk);
            if (B_KMAJOR)
                ldmatrix_x4(r, row);
            else
                ldmatrix_x4_trans(r, row);
            b[j][0] = r[0];
            b[j][1] = r[1];
            b[j + 1][0] = r[2];
            b[j + 1][1] = r[3];
        }
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) mma_bf16_16816(acc.v[i][j], a[i], b[j][0], b[j][1]);
    }
}

// The copies of the stage ring (tc_pipeline's load, commit and wait), the same under either
// MMA: this machine's and wgmma.cuh's derive from it.
template <class LoadA, class LoadB>
struct TcCopies {
    bf16* smem;
    const bf16* a;
    const LoadA& la;
    const bf16* b;
    const LoadB& lb;
    int kt_begin;
    __device__ __forceinline__ void load(int stage, int t) {
        tc_load_stage(smem + stage * TC_STAGE_ELEMS, a, la, b, lb, kt_begin + t);
    }
    __device__ __forceinline__ void commit() { cp_async_commit(); }
    // `pending` is 0 or TC_STAGES - 2 (tc_pipeline's two waits): the instruction takes an
    // immediate, and after inlining the branch folds away.
    __device__ __forceinline__ void wait(int pending) {
        if (pending == 0)
            cp_async_wait<0>();
        else
            cp_async_wait<TC_STAGES - 2>();
    }
};

// The device's side of tc_pipeline (tc_index.cuh): real copies, waits, barriers and MMAs.
template <class LoadA, class LoadB>
struct TcDeviceMachine : TcCopies<LoadA, LoadB> {
    TcAcc& acc;
    __device__ __forceinline__ void sync() { __syncthreads(); }
    __device__ __forceinline__ void compute(int stage, int) {
        tc_compute_stage<LoadA::K_MAJOR, LoadB::K_MAJOR>(this->smem + stage * TC_STAGE_ELEMS, acc);
    }
};

// acc = the product over K tiles [kt_begin, kt_end). `smem` holds TC_STAGES * TC_STAGE_ELEMS
// bf16, 128-byte aligned. Every thread of the block must call this (barriers inside).
template <class LoadA, class LoadB>
__device__ __forceinline__ void tc_mainloop(bf16* smem, const bf16* a, const LoadA& la, const bf16* b,
                                            const LoadB& lb, int kt_begin, int kt_end, TcAcc& acc) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc.v[i][j][r] = 0.0f;
    TcDeviceMachine<LoadA, LoadB> m{{smem, a, la, b, lb, kt_begin}, acc};
    tc_pipeline(m, kt_end - kt_begin);
}

// The shared memory of one block: the stage ring (48 KiB, the static limit).
#define TC_SMEM_DECL __shared__ __align__(128) bf16 tc_smem[TC_STAGES * TC_STAGE_ELEMS]

// ---- the epilogue --------------------------------------------------------------------------------

// C[row][col] = alpha acc + beta C + bias[col] for the tile at (m0, n0), stored as f32 (C) and/or
// bf16 (C_bf16); pairs of adjacent columns go out as one 8-byte (f32) or 4-byte (bf16) store, so
// ldc and N must be even. beta == 0 never reads C.
struct TcEpilogue {
    float alpha, beta;
    const float* bias;  // may be null
    float* c;           // may be null
    bf16* c_bf16;       // may be null
    i64 ldc;
    // The ResBlock's residual fused into conv2's forward (res_x non-null; rows are output pixels,
    // ldc = C channels, c_bf16 set: h is kept in bf16): out = (x + c h) / sqrt(1 + c^2) with h
    // the bf16-rounded value just stored, x [pixels][C] in bf16, c = res_m[s][2C + col] for the
    // sample s = row / res_pixels, into res_out (f32) or res_out_bf16. The arithmetic of
    // blocks.cu's blk_residual, operation for operation, so the same bits as the two kernels.
    const bf16* res_x;
    const float* res_m;
    float* res_out;
    bf16* res_out_bf16;
    int res_pixels;
};

// The row of C that a tile row is stored to: itself, or a map (the stride-2 input gradient's
// parity classes, DgradParity).
struct TcRowsIdentity {
    __device__ __forceinline__ i64 operator()(int row) const { return row; }
};

// One pair of adjacent columns (col, col + 1) of tile row `row`, through the epilogue; nothing
// outside the m x n problem is stored.
template <class RowMap>
__device__ __forceinline__ void tc_store_pair(const TcEpilogue& e, const RowMap& rows, int row, int col, int m, int n,
                                              float v0, float v1) {
    if (row >= m || col >= n) return;
    v0 *= e.alpha;
    v1 *= e.alpha;
    const i64 at = (i64)rows(row) * e.ldc + col;
    if (e.c && e.beta != 0.0f) {
        const float2 old = *reinterpret_cast<const float2*>(e.c + at);
        v0 += e.beta * old.x;
        v1 += e.beta * old.y;
    }
    if (e.bias) {
        v0 += e.bias[col];
        v1 += e.bias[col + 1];
    }
    if (e.c) *reinterpret_cast<float2*>(e.c + at) = make_float2(v0, v1);
    if (e.c_bf16) *reinterpret_cast<__nv_bfloat162*>(e.c_bf16 + at) = __floats2bfloat162_rn(v0, v1);
    if (e.res_x) {
        const float2 h = __bfloat1622float2(__floats2bfloat162_rn(v0, v1));
        const float2 x = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(e.res_x + at));
        const float* cm = e.res_m + (i64)(row / e.res_pixels) * 3 * e.ldc + 2 * e.ldc + col;
        const float o0 = fmaf(cm[0], h.x, x.x) / sqrtf(1.0f + cm[0] * cm[0]);
        const float o1 = fmaf(cm[1], h.y, x.y) / sqrtf(1.0f + cm[1] * cm[1]);
        if (e.res_out) *reinterpret_cast<float2*>(e.res_out + at) = make_float2(o0, o1);
        if (e.res_out_bf16) *reinterpret_cast<__nv_bfloat162*>(e.res_out_bf16 + at) = __floats2bfloat162_rn(o0, o1);
    }
}

template <class RowMap = TcRowsIdentity>
__device__ __forceinline__ void tc_store(const TcAcc& acc, const TcEpilogue& e, int m0, int n0, int m, int n,
                                         const RowMap& rows = RowMap{}) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int h = 0; h < 2; ++h)
                tc_store_pair(e, rows, m0 + tc_acc_row(threadIdx.x, i, 2 * h), n0 + tc_acc_col(threadIdx.x, j, 0), m, n,
                              acc.v[i][j][2 * h], acc.v[i][j][2 * h + 1]);
}

// The mma.sync engine of the kernels written once for both MMAs (conv_tc.cuh): its
// accumulators, main loop and epilogue.
struct TcEngine {
    typedef TcAcc Acc;
    template <class LoadA, class LoadB>
    static __device__ __forceinline__ void mainloop(bf16* smem, const bf16* a, const LoadA& la, const bf16* b,
                                                    const LoadB& lb, int kt_begin, int kt_end, Acc& acc) {
        tc_mainloop(smem, a, la, b, lb, kt_begin, kt_end, acc);
    }
    template <class RowMap = TcRowsIdentity>
    static __device__ __forceinline__ void store(const Acc& acc, const TcEpilogue& e, int m0, int n0, int m, int n,
                                                 const RowMap& rows = RowMap{}) {
        tc_store(acc, e, m0, n0, m, n, rows);
    }
};
