// The Hopper main loop (sm_90a only): mma.cuh's block tile, stage ring, loaders and pipeline, with
// each stage's MMAs issued as warpgroup MMAs (wgmma.mma_async m64n128k16, bf16 operands read
// straight from shared memory through descriptors, f32 accumulators in registers) instead of
// ldmatrix + mma.sync. Why the K-major tile order is already wgmma's 64-byte swizzle, the
// descriptors and the accumulator layout: tc_index.cuh ("Hopper's warpgroup MMA").
//
// Synchronisation. cp.async writes shared memory through the generic proxy and wgmma reads it
// through the async proxy, so every thread fences its landed copies (fence.proxy.async) before
// the barrier that publishes them. A stage's wgmmas are committed and waited for (wait_group 0)
// before compute returns, so the stage is free at the next barrier exactly as in tc_pipeline's
// mma.sync machine (and tests/tc_emulator.cpp checks this machine's order with the same model).
// Overlap comes from the two blocks resident per SM, not from wgmmas left in flight.
//
// Nothing here runs below sm_90a: the module that includes it is compiled for sm_90a only
// (kernels/conv_sm90a.cu), and the kernels are chosen only where that module loaded.
#pragma once
#include "mma.cuh"

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// Makes this thread's generic-proxy writes to shared memory (its landed cp.async copies) visible
// to the async proxy that wgmma reads through.
__device__ __forceinline__ void fence_proxy_async_shared() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// d += A B for one m64n128k16 step: A (64 x 16) and B (128 x 16, i.e. N x K) K-major in shared
// memory, described by da and db; no transposes, scales +1.
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], unsigned long long da, unsigned long long db) {
    asm volatile(
        "{\n"
        ".reg .pred accumulate;\n"
        "setp.ne.b32 accumulate, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, accumulate, 1, 1, 0, 0;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db)
        : "memory");
}

// The accumulators of one thread: register i is C[wg_acc_row(tid, i)][wg_acc_col(tid, i)].
struct WgAcc {
    float v[64];
};

// Pins the accumulators in place around the asynchronous MMAs (CUTLASS's
// warpgroup_fence_operand): no access to them may be moved across this point by the compiler.
__device__ __forceinline__ void wg_fence_operands(WgAcc& acc) {
#pragma unroll
    for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(acc.v[i])::"memory");
}

// The device's side of tc_pipeline for the wgmma main loop: mma.cuh's copies and waits, a
// proxy fence before each barrier, and the stage's two k16 steps as wgmmas.
template <class LoadA, class LoadB>
struct WgDeviceMachine : TcCopies<LoadA, LoadB> {
    static_assert(LoadA::K_MAJOR && LoadB::K_MAJOR, "the wgmma path takes K-major operands only");
    WgAcc& acc;
    __device__ __forceinline__ void sync() {
        fence_proxy_async_shared();
        __syncthreads();
    }
    __device__ __forceinline__ void compute(int stage, int) {
        const unsigned base = smem_addr(this->smem + stage * TC_STAGE_ELEMS);
        const int wg = threadIdx.x >> 7;
        wg_fence_operands(acc);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < TC_BK; kk += 16)
            wgmma_m64n128k16(acc.v, wg_desc(base + 2u * wg_a_offset(wg, kk)), wg_desc(base + 2u * wg_b_offset(kk)));
        wg_commit();
        wg_wait_all();
        wg_fence_operands(acc);
    }
};

// acc = the product over K tiles [kt_begin, kt_end), as tc_mainloop. `smem` must be 512-byte
// aligned (WG_SMEM_DECL): the swizzle is on absolute addresses.
template <class LoadA, class LoadB>
__device__ __forceinline__ void wg_mainloop(bf16* smem, const bf16* a, const LoadA& la, const bf16* b,
                                            const LoadB& lb, int kt_begin, int kt_end, WgAcc& acc) {
#pragma unroll
    for (int i = 0; i < 64; ++i) acc.v[i] = 0.0f;
    WgDeviceMachine<LoadA, LoadB> m{{smem, a, la, b, lb, kt_begin}, acc};
    tc_pipeline(m, kt_end - kt_begin);
}

#define WG_SMEM_DECL __shared__ __align__(1024) bf16 tc_smem[TC_STAGES * TC_STAGE_ELEMS]

// mma.cuh's epilogue for the wgmma accumulators: registers 2 p and 2 p + 1 are adjacent columns.
template <class RowMap = TcRowsIdentity>
__device__ __forceinline__ void wg_store(const WgAcc& acc, const TcEpilogue& e, int m0, int n0, int m, int n,
                                         const RowMap& rows = RowMap{}) {
#pragma unroll
    for (int p = 0; p < 32; ++p)
        tc_store_pair(e, rows, m0 + wg_acc_row(threadIdx.x, 2 * p), n0 + wg_acc_col(threadIdx.x, 2 * p), m, n,
                      acc.v[2 * p], acc.v[2 * p + 1]);
}

// The wgmma engine of the kernels written once for both MMAs (conv_tc.cuh).
struct WgEngine {
    typedef WgAcc Acc;
    template <class LoadA, class LoadB>
    static __device__ __forceinline__ void mainloop(bf16* smem, const bf16* a, const LoadA& la, const bf16* b,
                                                    const LoadB& lb, int kt_begin, int kt_end, Acc& acc) {
        wg_mainloop(smem, a, la, b, lb, kt_begin, kt_end, acc);
    }
    template <class RowMap = TcRowsIdentity>
    static __device__ __forceinline__ void store(const Acc& acc, const TcEpilogue& e, int m0, int n0, int m, int n,
                                                 const RowMap& rows = RowMap{}) {
        wg_store(acc, e, m0, n0, m, n, rows);
    }
};
